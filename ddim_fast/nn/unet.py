"""The DDPM / DDIM UNet (Ho et al. 2020; the ``models/diffusion.py`` of the DDIM code).

Architecture, as in the original code:

- sinusoidal timestep embedding (``ch`` wide) -> Linear -> SiLU -> Linear (``4 * ch`` wide);
- ``conv_in``, then per resolution level ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
  3x3 conv, + projected timestep embedding, GroupNorm, SiLU, dropout, 3x3 conv, 1x1 shortcut
  when the width changes), self-attention after each block at the resolutions named in
  ``attn_resolutions``, and a stride-2 conv between levels;
- a middle block (res, attention, res);
- the mirrored up path with ``num_res_blocks + 1`` blocks per level fed by the skip
  connections, nearest-neighbour x2 upsampling + 3x3 conv between levels;
- GroupNorm, SiLU, ``conv_out`` (zero-initialised here, so an untrained model predicts eps = 0).

``attn_resolutions`` refers to the configured ``resolution`` (the training size): attention
layers are placed at construction time. At run time any H, W divisible by
``2 ** (len(ch_mult) - 1)`` is accepted (the attention simply runs on more tokens).

Called as ``model(x, t)`` with ``x`` (B, in_channels, H, W) and ``t`` an int64 tensor (B,) of
training timesteps in [0, T); returns the epsilon prediction, the shape of ``x``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["UNet", "timestep_embedding", "LIMITS"]

# Upper bounds of a UNet config, checked before any layer is built, so that a config read from a
# file cannot ask for an unbounded model. They sit far above the DDPM paper's largest model
# (LSUN 256 px: ch 128, ch_mult (1, 1, 2, 2, 4, 4), width 512, 114M parameters) and below
# sizes no machine here can hold: one ResBlock at the width limit is 1.3e9 parameters (5 GB).
LIMITS: Dict[str, int] = {
    "in_channels": 1024,
    "out_channels": 1024,
    "resolution": 8192,
    "ch": 2048,
    "ch_mult": 64,  # each multiplier
    "levels": 10,  # len(ch_mult)
    "width": 8192,  # ch * max(ch_mult)
    "num_res_blocks": 32,
    "num_groups": 1024,
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The DDPM sinusoidal embedding (Vaswani et al.'s, sin half first), float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / max(half - 1, 1))
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.temb_proj(F.silu(temb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # scale = 1/sqrt(C), as the original code
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the original code's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM/DDIM epsilon-prediction UNet. See the module docstring for the layout."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        resolution: int = 32,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_groups: int = 32,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("resolution", resolution),
                            ("ch", ch), ("num_res_blocks", num_res_blocks), ("num_groups", num_groups)):
            _check_int(name, value, LIMITS[name])
        ch_mult = _int_tuple("ch_mult", ch_mult, LIMITS["ch_mult"], min_len=1, max_len=LIMITS["levels"])
        attn_resolutions = _int_tuple("attn_resolutions", attn_resolutions, LIMITS["resolution"])
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        widths = [ch * m for m in (1,) + ch_mult]
        if max(widths) > LIMITS["width"]:
            raise ValueError(
                f"ch, ch_mult: the widest level would have {max(widths)} channels (ch={ch}, ch_mult={ch_mult}); "
                f"expected at most {LIMITS['width']}"
            )
        for w in widths:
            if w % min(num_groups, w):
                raise ValueError(f"num_groups: {num_groups} does not divide the channel width {w} (ch={ch}, ch_mult={ch_mult})")
        in_channels, out_channels, resolution, ch, num_res_blocks, num_groups = (
            int(v) for v in (in_channels, out_channels, resolution, ch, num_res_blocks, num_groups)
        )
        factor = 2 ** (len(ch_mult) - 1)
        if resolution % factor:
            raise ValueError(f"resolution: {resolution} is not divisible by 2**(len(ch_mult)-1) = {factor}")
        valid = {resolution // 2**i for i in range(len(ch_mult))}
        if not set(attn_resolutions) <= valid:
            raise ValueError(
                f"attn_resolutions: {attn_resolutions} must be among the level resolutions {sorted(valid, reverse=True)}"
            )

        self._config: Dict[str, Any] = dict(
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            resolution=int(resolution),
            ch=int(ch),
            ch_mult=list(ch_mult),
            num_res_blocks=int(num_res_blocks),
            attn_resolutions=list(attn_resolutions),
            dropout=float(dropout),
            num_groups=int(num_groups),
        )
        self.ch = ch
        self.in_channels = in_channels
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path: record the width of every tensor pushed onto the skip stack.
        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, temb_ch, dropout, num_groups))
                cur = ch * mult
                attns.append(AttnBlock(cur, num_groups) if res in attn_resolutions else nn.Identity())
                skips.append(cur)
            stage = nn.Module()
            stage.blocks, stage.attns = blocks, attns
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(cur)
                skips.append(cur)
                res //= 2
            self.down.append(stage)

        self.mid_block1 = ResBlock(cur, cur, temb_ch, dropout, num_groups)
        self.mid_attn = AttnBlock(cur, num_groups)
        self.mid_block2 = ResBlock(cur, cur, temb_ch, dropout, num_groups)

        # Up path, lowest resolution first (stored in that order: self.up[0] is the deepest level).
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cur + skips.pop(), ch * ch_mult[level], temb_ch, dropout, num_groups))
                cur = ch * ch_mult[level]
                attns.append(AttnBlock(cur, num_groups) if res in attn_resolutions else nn.Identity())
            stage = nn.Module()
            stage.blocks, stage.attns = blocks, attns
            if level != 0:
                stage.upsample = Upsample(cur)
                res *= 2
            self.up.append(stage)
        assert not skips

        self.norm_out = _norm(cur, num_groups)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # -- config ---------------------------------------------------------------------------
    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict (``UNet.from_config`` inverts it)."""
        return {"type": "UNet", **{k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "UNet":
        if not isinstance(config, dict):
            raise ValueError(f"config: expected a dict of UNet arguments, got {type(config).__name__}")
        config = dict(config)
        kind = config.pop("type", "UNet")
        if kind != "UNet":
            raise ValueError(f"config: 'type' is {kind!r}, expected 'UNet'")
        known = set(cls._config_keys())
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config: unknown UNet argument(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**config)

    @classmethod
    def state_shapes(cls, config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """The state-dict shapes ``from_config(config)`` would have, without allocating its weights
        (built on the meta device), so a checkpoint's tensors can be checked against its config first."""
        with torch.device("meta"):
            model = cls.from_config(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @staticmethod
    def _config_keys():
        return (
            "in_channels",
            "out_channels",
            "resolution",
            "ch",
            "ch_mult",
            "num_res_blocks",
            "attn_resolutions",
            "dropout",
            "num_groups",
        )

    @property
    def size_factor(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (self.num_levels - 1)

    # -- forward --------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"x: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        f = self.size_factor
        h, w = x.shape[-2:]
        if h < f or w < f or h % f or w % f:
            raise ValueError(
                f"x: height and width must be positive multiples of 2**(len(ch_mult)-1) = {f} "
                f"for this UNet, got {h}x{w}"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: expected a 1-D tensor of {x.shape[0]} timesteps, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"t: expected an integer tensor of timestep indices, got dtype {t.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_input(x, t)
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(h, temb))
                hs.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
                hs.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)
        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_int(name: str, value, limit: int) -> None:
    """A positive integer up to ``limit``; floats are refused, not truncated (1.5 is not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= limit:
        raise ValueError(f"{name}: expected a positive integer up to {limit}, got {value!r}")


def _int_tuple(name: str, values, limit: int, min_len: int = 0, max_len: int = 64) -> Tuple[int, ...]:
    try:
        items = list(values) if not isinstance(values, (str, bytes, dict)) else None
    except TypeError:
        items = None
    if items is None:
        raise ValueError(f"{name}: expected a sequence of positive integers, got {values!r}")
    values = items
    ok = min_len <= len(values) <= max_len and all(
        not isinstance(v, bool) and isinstance(v, numbers.Integral) and 1 <= v <= limit for v in values
    )
    if not ok:
        raise ValueError(
            f"{name}: expected {min_len} to {max_len} positive integers up to {limit}, got {tuple(values)!r}"
        )
    return tuple(int(v) for v in values)
