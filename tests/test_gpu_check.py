"""bench/gpu_check.py on a CPU: the no-CUDA exit, the report (records, time boxes, writers), the
source-checkout imports. The CUDA checks themselves only run on a GPU."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit path of a machine without CUDA")
def test_no_cuda_exits_2_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing checked"
    assert not (tmp_path / "out").exists()


def test_report_records_pass_fail_skip_and_keeps_going(gpu_check, tmp_path):
    clock = FakeClock()
    report = gpu_check.Report(str(tmp_path), budget_s=100.0, clock=clock, meta={"device": "fake"})

    def slow():
        clock.now += 30.0
        return {"steps_per_s": 123.5, "nan": float("nan")}

    def broken():
        raise RuntimeError("kernel mismatch at (0, 1)")

    with report.section("kernel", 50.0):
        report.check("first", slow)
        report.check("second", broken)
        report.check("third", slow)  # 20 s left in the section: runs
        report.check("fourth", slow, min_s=5.0)  # the section's time box is spent: skipped
    with report.section("speed", 50.0):
        report.check("fifth", lambda: None, min_s=1.0)  # 40 s of the run left, minus the reserve
    status = [(r["name"], r["status"]) for r in report.results]
    assert status == [("first", "pass"), ("second", "fail"), ("third", "pass"), ("fourth", "skip"), ("fifth", "pass")]
    assert report.results[1]["error"] == "RuntimeError: kernel mismatch at (0, 1)"
    assert "time box" in report.results[3]["error"]

    data = json.loads((tmp_path / "report.json").read_text())
    assert data["counts"] == {"pass": 3, "fail": 1, "skip": 1}
    assert data["results"][0]["metrics"] == {"steps_per_s": 123.5, "nan": "nan"}  # still valid JSON
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# GPU check\n\n3 passed, 1 failed, 1 skipped")
    assert "## kernel" in md and "## speed" in md and "- device: fake" in md
    assert "| second | FAIL |" in md and "kernel mismatch at (0, 1)" in md
    assert "steps_per_s=123.5" in md


def test_run_budget_skips_every_later_check(gpu_check):
    clock = FakeClock()
    report = gpu_check.Report(None, budget_s=20.0, clock=clock)
    with report.section("a", 100.0):  # a section cannot outlast the run
        clock.now = 20.0 - gpu_check.RESERVE_S - 0.5
        report.check("late", lambda: None, min_s=1.0)
    assert report.results[0]["status"] == "skip"


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="time boxes use SIGALRM")
def test_a_check_past_its_time_box_is_stopped(gpu_check):
    report = gpu_check.Report(None, budget_s=gpu_check.RESERVE_S + 0.3)

    def hangs():
        try:
            time.sleep(30)
        except Exception:  # the timeout must get through code that swallows errors
            pass
        return {"never": True}

    t0 = time.monotonic()
    with report.section("s", 10.0):
        report.check("hangs", hangs, min_s=0.1)
        report.check("after", lambda: {"ok": 1}, min_s=0.0)
    assert time.monotonic() - t0 < 5
    assert report.results[0]["status"] == "fail" and "timed out" in report.results[0]["error"]


def test_source_checkout_imports_find_the_kernels_package(tmp_path):
    # -S: no site-packages, so no editable install maps ddim_fast.kernels to kernels/ for us
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g); g.source_checkout_imports(); "
            "import ddim_fast.kernels, ddim_fast.layout; print(ddim_fast.kernels.__file__)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-S", "-c", code, SCRIPT], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(REPO, "kernels", "__init__.py")
