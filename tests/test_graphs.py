"""The static-buffer trajectory loop, its CUDA-graph runner (driven on the CPU), and precision modes."""

import warnings

import pytest
import torch

from _utils import EagerReplayCapturer, assert_close
from ddim_fast import FusedSampler, NoiseSchedule
from ddim_fast import trajectory
from ddim_fast.graphs import GraphCache


class SmallConvModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.a(x)) * (1 + t.float()[:, None, None, None] / 1000)
        return 0.3 * torch.tanh(self.b(h))


def make_plan(sampler, shape, kind="sample"):
    """The plan ``sampler`` would run for a batch of ``shape`` (seed 0, no noise, its own conditioning)."""
    dev = torch.device("cpu")
    return sampler._plan(kind, sampler._tables[kind], shape, dev, 0, 0, None, (sampler.model_kwargs, sampler.uncond_kwargs),
                         "torch")  # fmt: skip


def graphed(sampler, capturer=None):
    capturer = capturer or EagerReplayCapturer()
    sampler._graphs = GraphCache(capturer)
    return sampler, capturer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return SmallConvModel().eval()


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_static_loop_equals_eager_bit_for_bit(model, eta):
    kw = dict(steps=10, eta=eta, precision="fp32", backend="torch")
    eager = FusedSampler(model, cuda_graph=False, **kw)
    g, cap = graphed(FusedSampler(model, **kw))
    for seed in (1, 2):  # first call: warm-up result; second call: a replay with a new seed
        assert torch.equal(g.sample(shape=(2, 3, 8, 8), seed=seed), eager.sample(shape=(2, 3, 8, 8), seed=seed))
    assert (cap.warmups, cap.captures, cap.replays) == (1, 1, 1)
    assert len(g._graphs) == 1  # a new seed is read from device memory: no recapture


def test_static_loop_encode_decode_and_trajectory(model):
    kw = dict(steps=8, precision="fp32", backend="torch")
    eager = FusedSampler(model, cuda_graph=False, **kw)
    g, cap = graphed(FusedSampler(model, **kw))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    for _ in range(2):
        assert torch.equal(g.encode(x0), eager.encode(x0))
        tg, te = g.sample(x0, return_trajectory=True), eager.sample(x0, return_trajectory=True)
        assert torch.equal(tg.xs, te.xs) and torch.equal(tg.x0_preds, te.x0_preds)
    assert cap.captures == 2 and cap.replays == 2  # encode and recorded-sample are separate graphs


def test_explicit_noise_is_copied_into_the_static_buffer(model):
    kw = dict(steps=5, eta=1.0, precision="fp32", backend="torch")
    eager = FusedSampler(model, cuda_graph=False, **kw)
    g, _ = graphed(FusedSampler(model, **kw))
    x_T = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        noise = torch.randn(5, 2, 3, 8, 8)
        assert torch.equal(g.sample(x_T, noise=noise), eager.sample(x_T, noise=noise))


def test_outputs_are_cloned_after_replay(model):
    g, _ = graphed(FusedSampler(model, steps=4, precision="fp32", backend="torch"))
    a = g.sample(shape=(1, 3, 8, 8), seed=0)
    b = g.sample(shape=(1, 3, 8, 8), seed=1)  # a replay writes the static buffers again
    assert not torch.equal(a, b)
    assert torch.equal(a, g.sample(shape=(1, 3, 8, 8), seed=0))


def test_graph_keys_separate_configurations(model):
    g, cap = graphed(FusedSampler(model, steps=4, precision="fp32", backend="torch"))
    g.sample(shape=(1, 3, 8, 8), seed=0)
    g.sample(shape=(2, 3, 8, 8), seed=0)
    g.sample(shape=(2, 3, 8, 8), seed=0, return_trajectory=True)
    assert len(g._graphs) == 3 and cap.captures == 3
    plan = make_plan(g, (2, 3, 8, 8))
    assert plan.graph_key(torch.zeros(2, 3, 8, 8), False) != plan.graph_key(torch.zeros(2, 3, 8, 4), False)
    assert plan.graph_key(torch.zeros(2, 3, 8, 8), False) != plan.graph_key(torch.zeros(2, 3, 8, 8), True)
    other = make_plan(FusedSampler(model, steps=4, eta=0.5, precision="fp32", backend="torch"), (2, 3, 8, 8))
    assert other.graph_key(torch.zeros(2, 3, 8, 8), False) != plan.graph_key(torch.zeros(2, 3, 8, 8), False)
    g.reset()
    assert g._graphs is None


def test_capture_failure_warns_once_names_reason_and_runs_eagerly(model):
    eager = FusedSampler(model, steps=4, precision="fp32", backend="torch", cuda_graph=False)
    reason = RuntimeError("operation not permitted when stream is capturing")
    g, cap = graphed(FusedSampler(model, steps=4, precision="fp32", backend="torch"), EagerReplayCapturer(reason))
    with pytest.warns(RuntimeWarning, match="operation not permitted when stream is capturing"):
        a = g.sample(shape=(1, 3, 8, 8), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = g.sample(shape=(1, 3, 8, 8), seed=0)  # remembered: no second warning, no second capture
    assert cap.captures == 1
    assert torch.equal(a, eager.sample(shape=(1, 3, 8, 8), seed=0)) and torch.equal(a, b)


def test_cuda_graph_auto_never_captures_on_a_cpu():
    """cuda_graph="auto" on CPU tensors runs eagerly and creates no graph cache, so a model that
    syncs with the host (not capturable on CUDA) samples on a CPU; the CUDA failure path itself
    is test_capture_failure_warns_once_names_reason_and_runs_eagerly."""

    def model(x, t):
        scale = float(x.abs().max().item())  # a host sync
        return x / (1.0 + scale)

    s = FusedSampler(model, steps=5)
    out = s.sample(shape=(2, 3, 4, 4), seed=0)
    assert torch.isfinite(out).all() and s._graphs is None


def test_no_allocation_of_state_per_step(model):
    """The loop updates one preallocated state buffer in place: the model always sees it."""
    seen = set()

    def spy(x, t):
        seen.add(x.data_ptr())
        return model(x, t)

    s = FusedSampler(spy, steps=6, precision="fp32", backend="torch", channels_last=False)
    plan = make_plan(s, (1, 3, 8, 8))
    bufs = trajectory.allocate(plan, torch.randn(1, 3, 8, 8), record=False)
    trajectory.run(plan, bufs)
    assert seen == {bufs.xs[0].data_ptr()}


def test_channels_last_auto_rule(model):
    """auto: NHWC input for conv models on CUDA, and on CPUs when the model runs in fp32 (the
    measured gain); never for bf16 on CPUs, for non-conv models or with channels_last=False."""

    def uses_cl(sampler, _precision):
        return isinstance(make_plan(sampler, (2, 3, 8, 8)).model, trajectory.ChannelsLast)

    assert uses_cl(FusedSampler(model, steps=3, precision="fp32"), "fp32")
    assert not uses_cl(FusedSampler(model, steps=3, precision="bf16"), "bf16")
    assert not uses_cl(FusedSampler(model, steps=3, precision="fp32", channels_last=False), "fp32")
    assert uses_cl(FusedSampler(model, steps=3, precision="bf16", channels_last=True), "bf16")

    def flat_model(x, t):  # .view() needs a contiguous input: auto must leave it NCHW
        return x.view(x.shape[0], -1).mul(0.5).view(x.shape)

    assert not uses_cl(FusedSampler(flat_model, steps=3, precision="fp32"), "fp32")
    assert torch.isfinite(FusedSampler(flat_model, steps=3, precision="fp32").sample(shape=(2, 3, 8, 8), seed=0)).all()


def test_channels_last_input_matches(model):
    x_T = torch.randn(2, 3, 8, 8)
    a = FusedSampler(model, steps=5, precision="fp32", channels_last=False).sample(x_T)
    b = FusedSampler(model, steps=5, precision="fp32", channels_last=True).sample(x_T)
    assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_error_within_pytorchs_own(model, precision, dtype):
    """Our low-precision sampling error is at most 2x that of a plain PyTorch DDIM loop under the same autocast."""
    schedule = NoiseSchedule.linear(1000)
    x_T = torch.randn(4, 3, 8, 8)
    ours32 = FusedSampler(model, schedule, steps=10, precision="fp32").sample(x_T)
    ours_lp = FusedSampler(model, schedule, steps=10, precision=precision).sample(x_T)

    def plain_loop(autocast):
        a = schedule.alphas_cumprod.float()
        ts = list(range(900, -1, -100))
        x = x_T.clone()
        with torch.no_grad():
            for i, t in enumerate(ts):
                ap = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
                with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                    eps = model(x, torch.full((4,), t)).float()
                x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
                x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
        return x

    torch_err = (plain_loop(True) - plain_loop(False)).abs().max().item()
    our_err = (ours_lp - ours32).abs().max().item()
    assert torch_err > 0, "autocast changed nothing: the test would not test anything"
    assert our_err <= 2 * torch_err + 1e-6, (our_err, torch_err)


def test_precision_auto_resolution(model, monkeypatch):
    import ddim_fast.sampler as sm

    s = FusedSampler(model, steps=2)
    monkeypatch.setattr(sm, "_cpu_has_native_bf16", lambda: True)
    assert s._autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(sm, "_cpu_has_native_bf16", lambda: False)
    assert s._autocast_dtype(torch.device("cpu")) is None
    assert s._autocast_dtype(torch.device("cuda")) == torch.float16
    assert FusedSampler(model, steps=2, precision="fp32")._autocast_dtype(torch.device("cuda")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_equals_eager(model):
    model = model.cuda()
    kw = dict(steps=10, eta=0.5, precision="fp32")
    eager = FusedSampler(model, cuda_graph=False, **kw)
    g = FusedSampler(model, cuda_graph=True, **kw)
    for seed in (0, 1, 2):
        assert_close(g.sample(shape=(2, 3, 8, 8), seed=seed, device="cuda"), eager.sample(shape=(2, 3, 8, 8), seed=seed, device="cuda"), atol=1e-5)
    assert len(g._graphs) == 1


def test_low_precision_on_a_cpu_without_it_warns_once(model, monkeypatch):
    """precision="bf16"/"fp16" asked for on a CPU that emulates it (26x slower than fp32 for a
    small UNet on an AVX2 Zen 3): one warning per sampler naming the option; "auto" and CPUs with
    the native flags stay silent."""
    import ddim_fast.sampler as sm

    cpu = torch.device("cpu")
    monkeypatch.setattr(sm, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        s = FusedSampler(model, steps=2, precision=precision)
        with pytest.warns(RuntimeWarning, match=f"precision='{precision}'.*no native {precision}") as record:
            assert s._autocast_dtype(cpu) == dtype
            assert s._autocast_dtype(cpu) == dtype
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FusedSampler(model, steps=2)._autocast_dtype(cpu) is None
        assert FusedSampler(model, steps=2, precision="bf16")._autocast_dtype(torch.device("cuda")) == torch.bfloat16
        monkeypatch.setattr(sm, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_fp16"}))
        assert FusedSampler(model, steps=2, precision="bf16")._autocast_dtype(cpu) == torch.bfloat16
        assert FusedSampler(model, steps=2, precision="fp16")._autocast_dtype(cpu) == torch.float16
