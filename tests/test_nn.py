"""The DDPM UNet: shapes, input checks, config round trip."""

import math

import pytest
import torch

from ddim_fast.nn import UNet, timestep_embedding


def tiny(**kw):
    cfg = dict(in_channels=1, resolution=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4)
    cfg.update(kw)
    return UNet(**cfg)


@pytest.mark.parametrize(
    "ch_mult, size",
    [((1, 2), (8, 8)), ((1, 2), (2, 2)), ((1, 2), (6, 10)), ((1, 2, 2), (16, 16)), ((1, 2, 2), (12, 8)), ((1,), (5, 7))],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input(ch_mult, size, channels):
    attn = (4,) if 4 in [8 // 2**i for i in range(len(ch_mult))] else ()
    model = tiny(in_channels=channels, ch_mult=ch_mult, attn_resolutions=attn).eval()
    x = torch.randn(3, channels, *size)
    t = torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize("size", [(6, 6), (8, 6), (2, 4), (10, 12)])
def test_unsupported_size_is_a_clear_error(size):
    model = tiny(ch_mult=(1, 2, 2), attn_resolutions=())
    with pytest.raises(ValueError, match=r"multiples of 2\*\*\(len\(ch_mult\)-1\) = 4.*got \d+x\d+"):
        model(torch.randn(1, 1, *size), torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize(
    "x, t, match",
    [
        (torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64), "expected 1 channels"),
        (torch.randn(2, 8, 8), torch.zeros(2, dtype=torch.int64), r"\(B, C, H, W\)"),
        (torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.int64), "t: expected a 1-D tensor of 2"),
        (torch.randn(2, 1, 8, 8), torch.zeros(2), "t: expected an integer tensor"),
    ],
)
def test_bad_inputs_name_the_argument(x, t, match):
    with pytest.raises(ValueError, match=match):
        tiny()(x, t)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(resolution=6, ch_mult=(1, 2, 2)), "resolution: 6 is not divisible"),
        (dict(attn_resolutions=(3,)), "attn_resolutions"),
        (dict(ch=6), "num_groups: 4 does not divide"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(ch=0), "ch: expected a positive integer"),
    ],
)
def test_bad_config_names_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_round_trip():
    model = tiny(in_channels=3, ch_mult=(1, 2, 2), resolution=16, attn_resolutions=(8, 4), dropout=0.1)
    cfg = model.config
    import json

    again = UNet.from_config(json.loads(json.dumps(cfg)))
    assert again.config == cfg
    again.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    torch.testing.assert_close(again.eval()(x, t), model.eval()(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unknown UNet argument\(s\) \['bogus'\]"):
        UNet.from_config({**cfg, "bogus": 1})
    with pytest.raises(ValueError, match="'type' is 'VAE'"):
        UNet.from_config({**cfg, "type": "VAE"})


def test_attention_at_chosen_resolutions_only():
    from ddim_fast.nn.unet import AttnBlock

    n_attn = lambda m: sum(isinstance(x, AttnBlock) for x in m.modules())  # noqa: E731
    # mid-block attention always; plus one per block at 4x4: 1 down + 2 up (num_res_blocks + 1)
    assert n_attn(tiny(attn_resolutions=())) == 1
    assert n_attn(tiny(attn_resolutions=(4,))) == 1 + 1 + 2
    assert n_attn(tiny(attn_resolutions=(8, 4))) == 1 + 2 * 3


def test_untrained_model_predicts_zero_and_depends_on_t_after_a_step():
    model = tiny()
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([1, 2])).abs().max() == 0  # zero-initialised conv_out
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    a, b = model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900]))
    assert (a - b).abs().max() > 1e-4


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 32)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    assert timestep_embedding(t, 33).shape == (3, 33)


def test_gradients_reach_every_parameter():
    model = tiny(dropout=0.1)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    model(torch.randn(2, 1, 8, 8), torch.tensor([5, 600])).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ch_mult=(1, 2.5)), r"ch_mult: expected 1 to 10 positive integers up to 64, got \(1, 2.5\)"),
        (dict(ch_mult="12"), r"ch_mult: expected a sequence of positive integers"),
        (dict(attn_resolutions=(4.0,)), r"attn_resolutions: expected 0 to 64 positive integers"),
        (dict(ch=8.0), r"ch: expected a positive integer up to 2048, got 8.0"),
        (dict(resolution=True), r"resolution: expected a positive integer"),
        (dict(dropout="0.1"), r"dropout: expected a probability"),
        (dict(ch=4096), r"ch: expected a positive integer up to 2048, got 4096"),
        (dict(ch=1024, ch_mult=(1, 16)), r"ch, ch_mult: the widest level would have 16384 channels"),
        (dict(num_res_blocks=1000), r"num_res_blocks: expected a positive integer up to 32"),
        (dict(ch_mult=(1,) * 11, resolution=1024, attn_resolutions=()), r"ch_mult: expected 1 to 10"),
    ],
)
def test_non_integers_and_oversized_configs_are_refused(kw, match):
    """1.5 is not truncated to 1, and a config cannot ask for an unbounded model (see unet.LIMITS)."""
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_numpy_integers_are_integers():
    import numpy as np

    model = tiny(ch=np.int64(8), ch_mult=np.array([1, 2]))
    assert model.config["ch"] == 8 and type(model.config["ch"]) is int and model.config["ch_mult"] == [1, 2]


def test_state_shapes_match_the_model_and_allocate_nothing():
    cfg = tiny(ch_mult=(1, 2, 2), resolution=16, attn_resolutions=(8,)).config
    real = {k: tuple(v.shape) for k, v in UNet.from_config(cfg).state_dict().items()}
    assert UNet.state_shapes(cfg) == real
    # A 6.0e9-parameter config (24 GB as float32) is described from the meta device alone.
    big = {**cfg, "ch": 1024, "ch_mult": [1, 2, 4], "num_res_blocks": 4}
    shapes = UNet.state_shapes(big)
    assert sum(math.prod(s) for s in shapes.values()) > 1e9
    with pytest.raises(ValueError, match="ch: expected a positive integer up to 2048"):
        UNet.state_shapes({**cfg, "ch": 4096})
