"""ddim_fast.compile.maybe_compile: the modes, the "auto" rule, inductor options, one warning then eager."""

import warnings

import pytest
import torch

from ddim_fast import compile as C


class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.config = {"kind": "affine"}

    def forward(self, x, t):
        return self.scale * x + t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a recorder; ``state["fn"]`` decides what the 'compiled' call does."""
    state = {"kwargs": None, "fn": None, "calls": 0}

    def fake(model, **kwargs):
        state["kwargs"] = kwargs

        def compiled(*args, **kw):
            state["calls"] += 1
            return state["fn"](*args, **kw) if state["fn"] else model(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", fake)
    return state


def test_false_and_auto_where_compile_was_not_measured_to_pay_return_the_model_itself(fake_compile):
    model = Affine()
    assert C.maybe_compile(model, False, "cpu") is model
    # never measured on a GPU: CUDA models stay eager, however many calls
    assert C.break_even_calls("cuda") is None
    assert C.maybe_compile(model, "auto", "cuda", expected_calls=10**9) is model
    # on the CPU it was measured to pay only after more calls than one trajectory of S <= 1000 makes
    assert C.maybe_compile(model, "auto", "cpu", expected_calls=1000) is model
    assert C.maybe_compile(model, "auto", "cpu") is model  # the number of calls is unknown
    assert fake_compile["kwargs"] is None
    assert isinstance(C.maybe_compile(model, "auto", "cpu", expected_calls=10**9), C.CompiledModel)


@pytest.mark.parametrize("amx, calls", [(False, 13750), (True, 4762)])
def test_the_measured_row_follows_the_cpu(monkeypatch, amx, calls):
    monkeypatch.setattr(C, "_cpu_has_amx", lambda: amx)
    assert C.measured_kind("cpu") == ("cpu-amx" if amx else "cpu") and C.measured_kind("cuda:0") == "cuda"
    assert C.break_even_calls("cpu") == calls
    assert C.compile_pays_off("cpu", calls) and not C.compile_pays_off("cpu", calls - 1)


def test_no_saving_means_never(monkeypatch):
    monkeypatch.setattr(C, "_cpu_has_amx", lambda: False)
    monkeypatch.setitem(C.MEASURED, "cpu", (121.0, -1.2))  # a loaded machine's figure: slower compiled
    assert C.break_even_calls("cpu") is None
    assert C.maybe_compile(Affine(), "auto", "cpu", expected_calls=10**9).__class__ is Affine


def test_auto_compiles_from_the_break_even_point(fake_compile, monkeypatch):
    monkeypatch.setitem(C.MEASURED, "cuda", (30.0, 2.0))  # 30 s to compile, 2 ms saved a call
    model = Affine()
    assert C.break_even_calls("cuda:0") == 15000
    assert C.maybe_compile(model, "auto", "cuda", expected_calls=14999) is model
    assert C.maybe_compile(model, "auto", "cuda") is model  # the number of calls is unknown
    wrapped = C.maybe_compile(model, "auto", "cuda", expected_calls=15000)
    assert isinstance(wrapped, C.CompiledModel) and wrapped.model is model


def test_inductor_without_its_own_cuda_graphs(fake_compile):
    wrapped = C.maybe_compile(Affine(), True, "cuda")
    kw = fake_compile["kwargs"]
    assert kw["backend"] == "inductor" and kw["options"]["triton.cudagraphs"] is False
    assert kw.get("mode") in (None, "default")  # "reduce-overhead" would add inductor's CUDA graphs
    assert kw["dynamic"] is False
    assert C.maybe_compile(wrapped, True, "cuda") is wrapped  # never wrapped twice


def test_a_failure_at_the_first_call_is_one_warning_then_eager(fake_compile):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor: C++ compile failed\nlong log")

    fake_compile["fn"] = broken
    model = Affine()
    wrapped = C.maybe_compile(model, True, "cpu")
    x, t = torch.randn(2, 3), torch.tensor([1, 2])
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the model failed \(RuntimeError: inductor: C\+\+ compile failed\)"):
        out = wrapped(x, t)
    torch.testing.assert_close(out, model(x, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the compiled function is not retried
        torch.testing.assert_close(wrapped(x, t), model(x, t))
    assert fake_compile["calls"] == 1 and wrapped.failed.startswith("RuntimeError")


def test_a_failure_at_wrap_time_is_one_warning_then_eager(monkeypatch):
    def no_compiler(model, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    model = Affine()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        wrapped = C.maybe_compile(model, True, "cpu")
    x, t = torch.randn(2, 3), torch.tensor([1, 2])
    torch.testing.assert_close(wrapped(x, t), model(x, t))


def test_an_error_of_the_inputs_is_raised_and_compiling_goes_on(fake_compile):
    wrapped = C.maybe_compile(Affine(), True, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="size"):  # eager fails too: the caller's mistake
            wrapped(torch.randn(2, 3), torch.tensor([1, 2, 3]))
    assert wrapped.failed is None and wrapped.compiled is not None


def test_attributes_are_the_models(fake_compile):
    model = Affine()
    wrapped = C.CompiledModel(model, "cpu")
    assert wrapped.config == {"kind": "affine"}
    assert list(wrapped.parameters()) == list(model.parameters())
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute


@pytest.mark.parametrize("mode", ["yes", 1, None])
def test_bad_mode_is_a_value_error(mode):
    with pytest.raises(ValueError, match=r"compile: expected False, True or 'auto'"):
        C.maybe_compile(Affine(), mode, "cpu")


@pytest.mark.parametrize("calls", [-1, 2.5, True])
def test_bad_expected_calls_is_a_value_error(calls):
    with pytest.raises(ValueError, match="expected_calls: expected None or an int >= 0"):
        C.maybe_compile(Affine(), "auto", "cpu", expected_calls=calls)


def test_a_real_torch_compile_matches_eager():
    # dynamo with its "eager" backend: inductor's own code generation takes 35 s cold on these 2
    # cores (bench/test_bench_sampler.py runs it on the UNet and checks the images)
    model = Affine()
    wrapped = C.CompiledModel(model, "cpu", backend="eager")
    x, t = torch.randn(4, 3, 5), torch.arange(4)
    with torch.inference_mode():
        got = wrapped(x, t)
        again = wrapped(x + 1, t)
    assert wrapped.failed is None, wrapped.failed
    torch.testing.assert_close(got, model(x, t))
    torch.testing.assert_close(again, model(x + 1, t))
