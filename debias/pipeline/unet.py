"""An ADM-style U-Net (Dhariwal & Nichol 2021, openai/guided-diffusion ``unet.py``).

Layout, for ``channel_mult = (m_0, ..., m_{L-1})`` and ``num_res_blocks = R``::

    conv_in 3x3 -> per level l: R x [ResBlock (+ Attention)] then a strided-conv Downsample
                   (not after the last level)
    middle:        ResBlock -> Attention -> ResBlock               (attention always)
    decoder:       per level l, deepest first: R + 1 x [ResBlock on concat(h, skip)
                   (+ Attention)], the last of them followed by Upsample (not at level 0)
    out:           GroupNorm -> SiLU -> conv 3x3 (zero-initialised)

Every ResBlock takes the timestep embedding (sinusoidal -> Linear -> SiLU -> Linear, width
``4 * base_channels``, plus a class embedding when ``num_classes`` is set) through a
scale-shift norm: ``GroupNorm(h) * (1 + scale) + shift``. ``num_res_blocks`` is the depth
knob: each level holds R encoder and R + 1 decoder ResBlocks, so the network has
``(2R + 1) L + 2`` ResBlocks in all.

Differences from ADM: ``attention_resolutions`` are image sides in pixels (ADM takes
downsampling factors), GroupNorm uses the largest divisor of the channel count that is
``<= num_groups`` (so narrow widths work), and attention heads are ``channels //
num_head_channels`` rounded down to a divisor of the channels (at least one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from debias.checks import check_float, check_int


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM's sinusoidal embedding: ``[B]`` timesteps (int or float) -> ``[B, dim]`` float32.

    ``cat(cos(t f), sin(t f))`` with ``f_i = max_period ** (-i / (dim // 2))``; an odd ``dim``
    gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_count(channels: int, num_groups: int) -> int:
    """The largest divisor of ``channels`` that is ``<= num_groups``."""
    return max(g for g in range(1, min(channels, num_groups) + 1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as ADM does, so half-precision inputs stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int, num_groups: int) -> GroupNorm32:
    return GroupNorm32(group_count(channels, num_groups), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, scale-shift by the embedding, GroupNorm-SiLU-dropout-conv (zero init).

    ``[B, in_ch, H, W], [B, emb_ch] -> [B, out_ch, H, W]``; the skip is a 1x1 conv when the
    channel count changes, else the identity.
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, num_groups: int
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(in_ch, num_groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch))
        self.out_norm = _norm(out_ch, num_groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the H*W positions.

    GroupNorm -> 1x1 conv to q, k, v -> softmax(q k^T / sqrt(d)) v per head -> 1x1 conv
    (zero init) -> + input. ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, num_head_channels: int, num_groups: int) -> None:
        super().__init__()
        heads = max(1, channels // num_head_channels)
        while channels % heads:
            heads -= 1
        self.num_heads = heads
        self.norm = _norm(channels, num_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        # [B, 3C, T] -> three [B, heads, T, C/heads]
        q, k, v = (
            qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(3, 4).unbind(1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h * w)
        return x + self.proj_out(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    """3x3 conv, stride 2 (ADM's ``conv_resample=True``): ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """A Sequential that hands the embedding to the ResBlocks in it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """ADM-style U-Net noise predictor ``(x_t [B, C, H, W], t [B], y [B]?) -> [B, C_out, H, W]``.

    Args:
        image_size: input side (square images); divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: input channels. Default 1.
        out_channels: output channels; default ``in_channels``.
        base_channels: width of the first level; level ``l`` has ``base_channels *
            channel_mult[l]`` channels and the timestep embedding ``4 * base_channels``.
            Default 64.
        channel_mult: per-level width multipliers; its length is the number of resolutions.
            Default (1, 2, 2).
        num_res_blocks: depth, ResBlocks per level: R in the encoder and R + 1 in the
            decoder, ``(2R + 1) * len(channel_mult) + 2`` with the middle. Default 2.
        attention_resolutions: image sides (pixels) whose levels get self-attention after
            every ResBlock, encoder and decoder; sides the U-Net never reaches are ignored
            (see :attr:`attention_sides`). The middle block always has attention.
            Default (16, 8).
        num_head_channels: channels per attention head. Default 32.
        dropout: dropout probability in the ResBlocks, in [0, 1). Default 0.
        num_classes: when set, a class embedding is added to the timestep embedding and
            ``forward`` needs ``y``. Default None (unconditional).
        num_groups: GroupNorm groups (the largest divisor of each width up to this). Default 32.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_head_channels: int = 32,
        dropout: float = 0.0,
        num_classes: int | None = None,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        for name, value in (
            ("image_size", image_size),
            ("in_channels", in_channels),
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("num_head_channels", num_head_channels),
            ("num_groups", num_groups),
        ):
            check_int(name, value, 1)
        if out_channels is not None:
            check_int("out_channels", out_channels, 1)
        if num_classes is not None:
            check_int("num_classes", num_classes, 1)
        channel_mult = _check_int_list(channel_mult, "channel_mult", allow_empty=False)
        attention_resolutions = _check_int_list(
            attention_resolutions, "attention_resolutions", allow_empty=True
        )
        dropout = check_float(
            "dropout", dropout, 0.0, inclusive=True, high=1.0, high_inclusive=False
        )
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2 ** (len(channel_mult) - 1) = "
                f"{factor} for channel_mult={channel_mult}"
            )

        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.base_channels = base_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.num_head_channels = num_head_channels
        self.dropout = float(dropout)
        self.num_classes = num_classes
        self.num_groups = num_groups

        emb_ch = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch)
        )
        self.label_emb = nn.Embedding(num_classes, emb_ch) if num_classes is not None else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, dropout, num_groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_head_channels, num_groups)

        ch = base_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans = [ch]
        side = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, base_channels * mult)]
                ch = base_channels * mult
                if side in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                side //= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), base_channels * mult)]
                ch = base_channels * mult
                if side in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    side *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            _norm(ch, num_groups),
            nn.SiLU(),
            _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    @property
    def config(self) -> dict:
        """JSON-serialisable constructor arguments: ``UNet(**config)`` rebuilds the network."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "base_channels": self.base_channels,
            "channel_mult": list(self.channel_mult),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attention_resolutions),
            "num_head_channels": self.num_head_channels,
            "dropout": self.dropout,
            "num_classes": self.num_classes,
            "num_groups": self.num_groups,
        }

    @property
    def attention_sides(self) -> list[int]:
        """Image sides (pixels) of the encoder/decoder levels that have attention, largest first."""
        sides = [self.image_size // 2**level for level in range(len(self.channel_mult))]
        return [s for s in sides if s in self.attention_resolutions]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicts ``[B, out_channels, H, W]``.

        Args:
            x: noisy images ``[B, in_channels, image_size, image_size]``.
            t: timesteps ``[B]``, int or float (fed to the sinusoidal embedding as given).
            y: class ids ``[B]`` int64 in ``[0, num_classes)``; required exactly when the
                model was built with ``num_classes``.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {got}")
        batch = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape != (batch,):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"t must be a tensor of shape [{batch}] (one per image), got {got}")
        if self.label_emb is None:
            if y is not None:
                raise ValueError("y was given but the model is unconditional (num_classes=None)")
        elif not isinstance(y, torch.Tensor) or y.shape != (batch,) or y.is_floating_point():
            got = "None" if y is None else _describe(y)
            raise ValueError(
                f"y must be an int tensor of shape [{batch}] (num_classes={self.num_classes}), "
                f"got {got}"
            )

        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y.long())
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat((h, skips.pop()), dim=1), emb)
        return self.out(h)


def _check_int_list(values, name: str, *, allow_empty: bool) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    if not values and not allow_empty:
        raise ValueError(f"{name} must hold at least one value, got {list(values)}")
    return [check_int(f"{name} entries", v, 1) for v in values]


def _describe(value: torch.Tensor) -> str:
    return f"{value.dtype} tensor of shape {list(value.shape)}"
