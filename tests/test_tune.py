"""Timesteps tuned to a model (ddim_fast.tune): the GITS dynamic program, the search beating its
starting spacing on a closed-form mixture and on the embedded digits model, determinism, errors,
and the JSON file that records what the timesteps were tuned for."""

import itertools
import json
import os
import types

import numpy as np
import pytest
import torch

import ddim_fast
from ddim_fast import FusedSampler, NoiseSchedule, layout, reference, solvers, tune
from ddim_fast.reference import GaussianMixtureEps

FAST = dict(grid=40, teacher_steps=120, max_trials=30, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixture():
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(3)
    model = GaussianMixtureEps(schedule.alphas_cumprod, torch.randn(6, 4, generator=g, dtype=torch.float64), stds=0.1)
    return model, schedule


@pytest.fixture(scope="module")
def digits():
    from ddim_fast.train import load_model

    return load_model()


def _run(model, st, tau, x_T):
    """The solver's table along tau from x_T, in float64 with the reference step (independent of the tuner's loop)."""
    x = x_T.clone()
    R = st.history_slots
    hist = torch.empty((R, *x.shape), dtype=torch.float64) if R else None
    saved = torch.zeros_like(x) if st.uses_saved else None
    with torch.inference_mode():
        for k, t in enumerate(np.asarray(tau)[::-1].tolist()):
            m = model(x.float(), torch.full((x.shape[0],), int(t))).double()
            out = torch.empty_like(x)
            reference.fused_step(x, m, st.table, k, torch.tensor([0, 0]), 0, 0.0, st.history_kind, hist, saved, None, out,
                                 None, None, compute_dtype=torch.float64)  # fmt: skip
            x = out
    return x


def _error(model, schedule, solver, tau, x_T):
    """RMS distance of the solver's x_0 along tau to the converged ODE solution (3M on all timesteps), same x_T."""
    full = np.arange(schedule.T)
    converged = _run(model, solvers.build("dpmpp_3m", schedule, full), full, x_T)
    return float((_run(model, solvers.build(solver, schedule, tau), tau, x_T) - converged).pow(2).mean().sqrt())


def test_dynamic_program_finds_the_cheapest_path_of_exactly_s_jumps():
    rng = np.random.default_rng(0)
    G = 8
    cost = np.where(np.triu(np.ones((G, G)), 1) > 0, rng.random((G, G)), np.inf)
    for S in range(1, G):
        best = min(
            (sum(cost[a, b] for a, b in zip((0,) + mid, mid + (G - 1,))), (0,) + mid)
            for mid in itertools.combinations(range(1, G - 1), S - 1)
        )
        path = tune._dp_path(cost, S)
        assert path == list(best[1]), f"S={S}"


@pytest.mark.parametrize("solver", ["ipndm", "unipc"])
def test_tuned_timesteps_beat_the_starting_spacings_on_a_mixture(mixture, solver):
    """Tuned on one batch (seed 0), judged on another x_T: closer to the converged ODE solution than
    every named spacing the search may start from, and than the GITS path alone."""
    model, schedule = mixture
    info = {}
    tau = tune.tune_timesteps(model, 5, (256, 4), schedule, solver, seed=0, info=info, **FAST)
    assert tau.dtype == torch.int64 and len(tau) == 5 and (tau.diff() > 0).all() and 0 <= tau[0] and tau[-1] < 1000
    assert info["error_after"] <= info["error_before"] == min(info["start_errors"].values())
    x_T = torch.randn(512, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    tuned = _error(model, schedule, solver, tau.numpy(), x_T)
    for name in ("logsnr", "karras", "quad"):
        start = _error(model, schedule, solver, solvers.timesteps(schedule, 5, name), x_T)
        assert tuned < 0.9 * start, f"{solver}: tuned {tau.tolist()} error {tuned:.4f} vs {name} {start:.4f}"


@pytest.mark.parametrize("loss", ["rms", "log"])
def test_tuning_is_deterministic_for_a_seed(mixture, loss):
    model, schedule = mixture
    a = tune.tune_timesteps(model, 4, (64, 4), schedule, "ipndm", seed=5, loss=loss, **FAST)
    b = tune.tune_timesteps(model, 4, (64, 4), schedule, "ipndm", seed=5, loss=loss, **FAST)
    assert torch.equal(a, b)


def test_log_loss_is_the_geometric_mean_of_the_samples_rms_errors():
    a = torch.zeros(3, 2, 2)
    b = torch.stack([torch.full((2, 2), v) for v in (1.0, 2.0, 4.0)])
    assert tune._log_rms(a, b) == pytest.approx(2.0, rel=1e-12)  # (1 * 2 * 4) ** (1 / 3)
    assert tune._rms(a, b) == pytest.approx(((1 + 4 + 16) / 3) ** 0.5, rel=1e-12)


def test_log_loss_tuning_beats_its_starts_on_fine_structure():
    """A mixture whose modes are narrow next to their spacing (std 0.05, as the sharp one of
    docs/results/quality.md): with the log loss, the tuned S = 6 schedule has the lower log loss on
    a held-out x_T than every named spacing, and it brings its smallest timestep to the low-noise
    end, where the mode's width is resolved (the RMS loss leaves it near t = 70)."""
    schedule = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(0)
    model = GaussianMixtureEps(schedule.alphas_cumprod, torch.randn(6, 8, generator=g, dtype=torch.float64), stds=0.05)
    info = {}
    tau = tune.tune_timesteps(model, 6, (128, 8), schedule, "unipc", seed=7, loss="log", info=info, grid=60, teacher_steps=150,
                              max_trials=80, progress=False)  # fmt: skip
    assert info["loss"] == "log" and info["error_after"] <= info["error_before"]
    x_T = torch.randn(256, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    full = np.arange(schedule.T)
    converged = _run(model, solvers.build("dpmpp_3m", schedule, full), full, x_T)
    err = lambda t: tune._log_rms(_run(model, solvers.build("unipc", schedule, t), t, x_T), converged)  # noqa: E731
    tuned = err(tau.numpy())
    for name in ("logsnr", "karras", "quad"):
        assert tuned < err(solvers.timesteps(schedule, 6, name)), f"tuned {tau.tolist()} vs {name}"
    assert int(tau[0]) < 20, tau.tolist()


def test_tuned_timesteps_beat_the_start_on_the_digits_model(digits):
    """The embedded UNet on a small budget (160 calls of batch 16, ~10 s): the tuned S = 4
    schedule is closer to the converged solution than the spacing the search started from, on a
    held-out x_T of 32 (measured 0.134 vs quad's 0.141; on 8 held-out samples the two tie, so the
    held-out batch is not smaller). Determinism is checked on the mixture, where it is cheap."""
    model, schedule = digits
    info = {}
    tau = ddim_fast.tune_timesteps(model, 4, (16, 1, 16, 16), schedule, "ipndm", seed=0, info=info, grid=12, teacher_steps=30,
                                   max_trials=24, progress=False)  # fmt: skip
    assert info["error_after"] < info["error_before"]
    x_T = reference.gaussian(5, (32, 1, 16, 16), stream=layout.STREAM_X_T)

    def run(solver, t):
        s = FusedSampler(model, schedule, steps=len(t), skip=t, solver=solver, precision="fp32", backend="torch", cuda_graph=False)
        return s.sample(x_T).double()

    converged = run("dpmpp_3m", solvers.logsnr_timesteps(schedule, 60))  # 3M at 60 vs 200 steps: 0.0035 apart
    err = lambda t: float((run("ipndm", t) - converged).pow(2).mean().sqrt())  # noqa: E731
    start = solvers.timesteps(schedule, 4, info["start"]) if info["start"] != "gits_dp" else None
    baselines = {name: err(solvers.timesteps(schedule, 4, name)) for name in {"logsnr", info["start"]} - {"gits_dp"}}
    tuned = err(tau.numpy())
    assert start is None or tuned < err(start), f"tuned {tau.tolist()}: {tuned:.4f} vs {baselines}"
    assert tuned < min(baselines.values()), f"tuned {tau.tolist()}: {tuned:.4f} vs {baselines}"


@pytest.mark.parametrize("solver", ["unipc", "ipndm", "dpmpp_3m"])
def test_the_last_call_machinery_is_the_full_run(mixture, solver):
    """``last_calls`` (the trajectory to its last call, then the last row run on copies of the ring
    and the saved state) gives the full run's x_0 bit for bit when the last call keeps its timestep,
    and the sampler's x_0 with ``model_timesteps`` when it does not."""
    model, schedule = mixture
    tau = solvers.timesteps(schedule, 5, "logsnr")
    runner = tune._Runner(model, schedule, (16, 4), 3, None, "epsilon", "torch")
    st = solvers.build(solver, schedule, tau)
    finish = runner.last_calls(st, tau)
    torch.testing.assert_close(finish(int(tau[0])), runner.run(st, tau), rtol=0, atol=0)
    told = tau.copy()
    told[0] = int(tau[0]) + 20
    shifted = finish(int(told[0]))
    sampler = FusedSampler(model, schedule, steps=5, skip=tau, solver=solver, model_timesteps=told, backend="torch", precision="fp32")
    torch.testing.assert_close(shifted, sampler.sample(runner.x_T), rtol=0, atol=0)
    assert not torch.equal(shifted, runner.run(st, tau))


def test_shifting_the_last_call_keeps_a_narrow_mode_wide():
    """The sharp mixture of docs/results/quality.md (std 0.05, D = 8), unipc at S = 5 with the log
    loss: timesteps alone leave each mode at ~0.83 of its width (the last x0-prediction collapses
    it; measured 0.83); with the last call's model timestep searched too (``shift_last``), samples
    drawn by the sampler with the tuned ``model_timesteps`` keep it (measured 1.06), and the tuning
    error falls ~4x (0.0216 -> 0.0056). Only the last call is told another timestep."""
    schedule = NoiseSchedule.linear(1000)
    means = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = GaussianMixtureEps(schedule.alphas_cumprod, means, stds=0.05)
    widths, errors = {}, {}
    for shift in (False, True):
        info = {}
        tau = tune.tune_timesteps(model, 5, (256, 8), schedule, "unipc", seed=7, loss="log", shift_last=shift, info=info,
                                  progress=False)  # fmt: skip
        told = info["model_timesteps"]
        assert told[1:] == tau.tolist()[1:] and (told[0] != int(tau[0])) == shift, (tau.tolist(), told)
        sampler = FusedSampler(model, schedule, steps=5, skip=tau, solver="unipc", model_timesteps=told, backend="torch",
                               precision="fp32")  # fmt: skip
        x = sampler.sample(shape=(4000, 8), seed=123).double()
        dist = torch.cdist(x, means)
        inside = dist.min(1).values < 0.5  # 0.3-0.6% of the samples lie between modes either way
        widths[shift] = float((x - means[dist.argmin(1)])[inside].pow(2).mean().sqrt()) / 0.05
        errors[shift] = info["error_after"]
    assert widths[False] < 0.9 and 0.95 < widths[True] < 1.15, widths
    assert errors[True] < 0.5 * errors[False], errors


def test_shift_last_is_deterministic_and_validated(mixture):
    model, schedule = mixture
    a, b = ({}, {})
    ta = tune.tune_timesteps(model, 3, (32, 4), schedule, "ipndm", seed=5, shift_last=True, info=a, **FAST)
    tb = tune.tune_timesteps(model, 3, (32, 4), schedule, "ipndm", seed=5, shift_last=True, info=b, **FAST)
    assert torch.equal(ta, tb) and a["model_timesteps"] == b["model_timesteps"]
    with pytest.raises(ValueError, match="shift_last: expected True or False"):
        tune.tune_timesteps(model, 3, (32, 4), schedule, "ipndm", shift_last="yes", **FAST)


def test_tuned_timesteps_run_in_the_sampler(mixture):
    model, schedule = mixture
    tau = tune.tune_timesteps(model, 3, (32, 4), schedule, "unipc", seed=1, **FAST)
    sampler = FusedSampler(model, schedule, steps=3, skip=tau, solver="unipc", backend="torch", precision="fp32")
    assert sampler.timesteps.tolist() == tau.flip(0).tolist()
    assert torch.isfinite(sampler.sample(shape=(4, 4), seed=0)).all()


class _Wrapped(torch.nn.Module):
    """The mixture's eps in the output conventions the sampler accepts (DESIGN.md: model(x, t))."""

    def __init__(self, inner, kind):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x, t):
        eps = self.inner(x, t)
        if self.kind == "learned_variance":  # improved DDPM: [eps, variance] along the channels
            return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)
        if self.kind == "tuple":
            return (eps, None)
        return types.SimpleNamespace(sample=eps)  # diffusers' UNet2DOutput


@pytest.mark.parametrize("kind", ["learned_variance", "tuple", "sample"])
def test_the_tuner_accepts_every_output_the_sampler_accepts(mixture, kind):
    """One output normalisation (trajectory.ModelCall) for the sampler and the tuner: the same
    timesteps as the plain tensor model, and the sampler runs the wrapped model to the same x_0."""
    model, schedule = mixture
    wrapped = _Wrapped(model, kind)
    plain = tune.tune_timesteps(model, 3, (32, 4), schedule, "unipc", seed=2, **FAST)
    assert torch.equal(tune.tune_timesteps(wrapped, 3, (32, 4), schedule, "unipc", seed=2, **FAST), plain)
    run = lambda m: FusedSampler(m, schedule, steps=3, skip=plain, solver="unipc", backend="torch", precision="fp32").sample(  # noqa: E731
        shape=(8, 4), seed=0)  # fmt: skip
    torch.testing.assert_close(run(wrapped), run(model), rtol=0, atol=0)


def test_progress_bar(mixture, capsys):
    model, schedule = mixture
    tune.tune_timesteps(model, 2, (16, 4), schedule, "ipndm", seed=0, **{**FAST, "progress": True})
    assert "tune ipndm S=2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), r"steps: expected an integer in \[1, 1000\]"),
        (dict(steps=1001), r"steps: expected an integer in \[1, 1000\]"),
        (dict(steps=2.5), "steps: expected an integer"),
        (dict(solver="euler"), "solver: expected one of"),
        (dict(solver="dpmpp_2m_sde"), "solver: 'dpmpp_2m_sde' is stochastic"),
        (dict(shape=(4, 5)), r"shape: the model rejects input of shape \(4, 5\)"),
        (dict(shape=(0, 4)), "shape: expected positive sizes"),
        (dict(seed=-1), "seed: expected an integer"),
        (dict(schedule="linear"), "schedule: expected a NoiseSchedule"),
        (dict(prediction="score"), "prediction: expected one of"),
        (dict(loss="l1"), "loss: expected one of"),
    ],
)
def test_bad_arguments_raise_clearly(mixture, kwargs, message):
    model, schedule = mixture
    args = dict(model=model, steps=3, shape=(8, 4), schedule=schedule, solver="ipndm", seed=0, **FAST)
    with pytest.raises(ValueError, match=message):
        tune.tune_timesteps(**{**args, **kwargs})


def test_a_model_that_rejects_the_shape_is_a_shape_error(digits):
    model, schedule = digits
    with pytest.raises(ValueError, match=r"shape: the model rejects input of shape \(2, 3, 16, 16\)"):
        tune.tune_timesteps(model, 3, (2, 3, 16, 16), schedule, **FAST)


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_models():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    return a, b


def test_save_and_load_round_trip(tmp_path, tiny_models):
    model, _ = tiny_models
    schedule = NoiseSchedule.linear(1000)
    path = tmp_path / "steps.json"
    info = {"method": "test", "seed": 0}
    tune.save_tuned(path, torch.tensor([3, 80, 400, 999]), model=model, schedule=schedule, solver="ipndm", steps=4, info=info)
    assert os.listdir(tmp_path) == ["steps.json"]  # no temporary file left behind
    tau = tune.load_tuned(path, model=model, schedule=schedule, solver="ipndm")
    assert tau.dtype == np.int64 and tau.tolist() == [3, 80, 400, 999]
    assert tune.load_tuned(str(path)).tolist() == [3, 80, 400, 999]  # nothing to compare against: accepted
    record = json.loads(path.read_text())
    assert record["schedule"] == {"name": schedule.name, "T": 1000, "alphas_cumprod_sha256": tune.schedule_digest(schedule)}
    assert record["info"] == info and record["solver"] == "ipndm" and record["steps"] == 4


def test_model_timesteps_are_saved_in_format_2(tmp_path, tiny_models):
    model, _ = tiny_models
    schedule = NoiseSchedule.linear(1000)
    path = tmp_path / "steps.json"
    tune.save_tuned(path, [3, 80, 400, 999], model=model, schedule=schedule, solver="unipc", steps=4, info={},
                    model_timesteps=[9, 80, 400, 999])  # fmt: skip
    record = json.loads(path.read_text())
    assert record["format"] == tune.FORMAT_MODEL_TIMESTEPS and record["model_timesteps"] == [9, 80, 400, 999]
    tau, told = tune.load_tuned(path, model=model, schedule=schedule, solver="unipc", with_model_timesteps=True)
    assert tau.tolist() == [3, 80, 400, 999] and told.tolist() == [9, 80, 400, 999]
    with pytest.raises(ValueError, match="the model is told other timesteps than these"):
        tune.load_tuned(path)  # not silently run without them
    # the same timesteps for the model: a format-1 file, as before
    tune.save_tuned(path, [3, 80, 400, 999], model=model, schedule=schedule, solver="unipc", steps=4, info={},
                    model_timesteps=[3, 80, 400, 999])  # fmt: skip
    assert json.loads(path.read_text())["format"] == tune.FORMAT
    tau, told = tune.load_tuned(path, with_model_timesteps=True)
    assert told.tolist() == tau.tolist()
    with pytest.raises(ValueError, match=r"model_timesteps: expected a sequence of 4 integer timesteps in \[0, 1000\)"):
        tune.save_tuned(path, [3, 80, 400, 999], model=model, schedule=schedule, solver="unipc", steps=4, info={},
                        model_timesteps=[1000, 80, 400, 999])  # fmt: skip
    record.update(model_timesteps=[9, 80])
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="corrupt tuned-timesteps file"):
        tune.load_tuned(path)


def test_load_refuses_another_model_schedule_or_solver(tmp_path, tiny_models):
    model, other = tiny_models
    schedule = NoiseSchedule.linear(1000)
    path = tmp_path / "steps.json"
    tune.save_tuned(path, [3, 80, 400, 999], model=model, schedule=schedule, solver="ipndm", steps=4, info={})
    with pytest.raises(ValueError, match=r"steps.json: tuned for another setup: model fingerprint"):
        tune.load_tuned(path, model=other)
    with pytest.raises(ValueError, match=r"steps.json: tuned for another setup: schedule linear T=1000"):
        tune.load_tuned(path, schedule=NoiseSchedule.cosine(1000))
    with pytest.raises(ValueError, match=r"solver 'ipndm' in the file, 'unipc' given"):
        tune.load_tuned(path, model=model, schedule=schedule, solver="unipc")


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="nope.json: no such tuned-timesteps file"):
        tune.load_tuned(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a readable tuned-timesteps JSON file"):
        tune.load_tuned(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json: not a tuned-timesteps file"):
        tune.load_tuned(bad)
    bad.write_text(json.dumps({"format": tune.FORMAT, "timesteps": [5, 3], "steps": 2, "schedule": {"T": 1000}}))
    with pytest.raises(ValueError, match="bad.json: corrupt tuned-timesteps file"):
        tune.load_tuned(bad)


def test_save_rejects_bad_timesteps(tmp_path, tiny_models):
    model, _ = tiny_models
    schedule = NoiseSchedule.linear(100)
    for tau, steps in (([5, 3], 2), ([1, 2, 3], 2), ([1, 100], 2)):
        with pytest.raises(ValueError, match="timesteps: expected"):
            tune.save_tuned(tmp_path / "x.json", tau, model=model, schedule=schedule, solver="ipndm", steps=steps, info={})
    with pytest.raises(ValueError, match="solver: expected one of"):
        tune.save_tuned(tmp_path / "x.json", [1, 2], model=model, schedule=schedule, solver="heun", steps=2, info={})
