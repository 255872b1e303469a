"""Low-precision weights held once (trajectory.CastWeights) instead of autocast's per-call casts:
the user's module is never modified, trained weights are picked up, images match autocast's, and a
module that cannot run with the copies is run under autocast alone after one warning."""

import warnings

import pytest
import torch

from _utils import TinyConvModel
from ddim_fast import FusedSampler, trajectory


def _cast_of(sampler):
    return next(iter(sampler._casts.values()), None)


def _plain_autocast(model, steps, x_T):
    """The same trajectory with autocast casting fp32 weights at every call (no copies)."""
    sampler = FusedSampler(model, steps=steps, precision="bf16", backend="torch")
    sampler._cast_weights = lambda device, dtype: None
    return sampler.sample(x_T)


def test_bf16_on_cpu_holds_copies_and_leaves_the_module_alone():
    torch.manual_seed(0)
    model = TinyConvModel()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    sampler = FusedSampler(model, steps=8, precision="bf16", backend="torch")
    x_T = torch.randn(2, 3, 8, 8)
    out = sampler.sample(x_T)
    cast = _cast_of(sampler)
    assert isinstance(cast, trajectory.CastWeights) and cast.failed is None
    assert {n: c.dtype for n, c in cast.cast.items()} == {"conv.weight": torch.bfloat16, "conv.bias": torch.bfloat16}
    for n, p in model.named_parameters():  # same objects, dtype and values
        assert p is before[n][0] and p.dtype == torch.float32 and torch.equal(p, before[n][1])
    # the same images as autocast casting at every call, to bf16 rounding
    ref = _plain_autocast(model, 8, x_T)
    fp32 = FusedSampler(model, steps=8, precision="fp32", backend="torch").sample(x_T)
    assert (out - ref).abs().max() <= 2 * (ref - fp32).abs().max() + 1e-3


def test_no_copies_for_fp32_or_low_precision_modules():
    model = TinyConvModel()
    sampler = FusedSampler(model, steps=3, precision="fp32", backend="torch")
    sampler.sample(shape=(1, 3, 4, 4), seed=0)
    assert _cast_of(sampler) is None
    bf16_model = TinyConvModel().to(torch.bfloat16)
    sampler = FusedSampler(bf16_model, steps=3, precision="bf16", backend="torch")
    sampler.sample(shape=(1, 3, 4, 4), seed=0)
    assert _cast_of(sampler) is None


def test_trained_weights_are_cast_again_in_place():
    torch.manual_seed(0)
    model = TinyConvModel()
    sampler = FusedSampler(model, steps=4, precision="bf16", backend="torch")
    x_T = torch.randn(2, 3, 8, 8)
    first = sampler.sample(x_T)
    cast = _cast_of(sampler)
    storage = cast.cast["conv.weight"].data_ptr()
    with torch.no_grad():  # an optimizer or EMA step: in place
        model.conv.weight.mul_(-0.5)
    second = sampler.sample(x_T)
    assert _cast_of(sampler) is cast and cast.cast["conv.weight"].data_ptr() == storage  # same buffers
    assert torch.equal(cast.cast["conv.weight"], model.conv.weight.detach().to(torch.bfloat16))
    assert not torch.allclose(first, second)
    fresh = FusedSampler(model, steps=4, precision="bf16", backend="torch").sample(x_T)
    assert torch.equal(second, fresh)
    model.conv.weight = torch.nn.Parameter(torch.zeros_like(model.conv.weight))  # replaced, not updated
    third = sampler.sample(x_T)
    assert torch.equal(third, FusedSampler(model, steps=4, precision="bf16", backend="torch").sample(x_T))


class NeedsFloat32Weights(torch.nn.Module):
    """Reads a parameter through NumPy, which has no bfloat16: fails with bf16 copies only."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return self.conv(x) * float(self.scale.detach().numpy())


def test_a_module_that_fails_with_copies_runs_under_autocast_after_one_warning():
    model = NeedsFloat32Weights()
    sampler = FusedSampler(model, steps=4, precision="bf16", backend="torch")
    x_T = torch.randn(1, 3, 4, 4)
    with pytest.warns(RuntimeWarning, match="cast to torch.bfloat16 once") as record:
        out = sampler.sample(x_T)
    assert len([w for w in record if "cast to" in str(w.message)]) == 1
    assert _cast_of(sampler).failed.startswith("TypeError")
    torch.testing.assert_close(out, _plain_autocast(model, 4, x_T))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        sampler.sample(x_T)


def test_an_error_of_the_inputs_is_raised_and_the_copies_stay():
    model = TinyConvModel()
    sampler = FusedSampler(model, steps=2, precision="bf16", backend="torch")
    with pytest.raises(Exception):
        sampler.sample(shape=(1, 5, 4, 4), seed=0)  # 5 channels: the model's own error
    assert _cast_of(sampler).failed is None


def test_a_module_built_under_inference_mode_is_cast_every_call():
    with torch.inference_mode():  # its parameters are inference tensors: no version counter
        model = TinyConvModel()
    sampler = FusedSampler(model, steps=3, precision="bf16", backend="torch")
    x_T = torch.randn(1, 3, 4, 4)
    first = sampler.sample(x_T)
    with torch.inference_mode():
        model.conv.weight.mul_(-1)  # changed in place where no version counter sees it
    assert torch.equal(sampler.sample(x_T), FusedSampler(model, steps=3, precision="bf16", backend="torch").sample(x_T))
    assert not torch.equal(first, sampler.sample(x_T))
