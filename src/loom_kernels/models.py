"""Small velocity networks ``v(x, t)`` (and ``v(x, t, y)``) for the demo and the command line.

Both take ``x`` of shape ``(B, *shape)`` and ``t`` of shape ``(B,)`` and return ``(B, *shape)``;
:class:`UNet` (images ``(C, H, W)``, 8x8 digits up to 32x32x3) optionally takes class labels ``y``.
Time enters through sinusoidal features (Vaswani et al., 2017; as in DDPM / TorchCFM's MLPs).
A model is rebuilt from ``model.spec`` (a plain dict kept in checkpoints) by :func:`build`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` ``(B,)`` in [0, 1] -> ``(B, dim)``; ``dim`` even."""
    half = dim // 2
    # Frequencies from 1 to 1000 cycles over [0, 1], geometric, so both slow and fast time
    # dependence is easy to express.
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device, dtype=torch.float32))
    angles = 2.0 * math.pi * t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLPVelocity(nn.Module):
    """MLP velocity field on flattened inputs of any shape.

    Args:
        shape: shape of one item, e.g. ``(2,)`` or ``(1, 8, 8)``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        time_dim: number of sinusoidal time features.

    Example:
        >>> net = MLPVelocity((2,), hidden=64)
        >>> net(torch.zeros(5, 2), torch.rand(5)).shape
        torch.Size([5, 2])
    """

    def __init__(self, shape: Sequence[int], hidden: int = 256, depth: int = 3, time_dim: int = 32) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape}")
        if hidden <= 0 or depth <= 0 or time_dim <= 0 or time_dim % 2:
            raise ValueError(
                f"hidden and depth must be positive and time_dim positive and even, got "
                f"hidden={hidden}, depth={depth}, time_dim={time_dim}"
            )
        self.spec = {"kind": "mlp", "shape": list(shape), "hidden": hidden, "depth": depth, "time_dim": time_dim}
        self.shape = shape
        self.time_dim = time_dim
        dim = math.prod(shape)
        layers = []
        width = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = torch.cat([x.reshape(b, -1), time_features(t, self.time_dim).to(x.dtype)], dim=1)
        return self.net(h).reshape(x.shape)


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time/class embedding added in between (as in DDPM's UNet)."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """A small UNet for images ``(C, H, W)``, optionally class-conditional (for classifier-free guidance).

    One residual block per level, ``len(channel_mult)`` levels (H and W divisible by
    ``2 ** (levels - 1)``), skip connections by concatenation. With ``num_classes`` the label
    embedding has one extra row, ``null_label = num_classes``, the "no class" label used for label
    dropout in training and for the unconditional half of guidance; ``y=None`` means all null.

    Args:
        shape: ``(C, H, W)``, e.g. ``(1, 8, 8)`` or ``(3, 32, 32)``.
        channels: width of the first level. channel_mult: width multipliers per level.
        num_classes: number of classes, or None (unconditional). time_dim: sinusoidal features.

    Example:
        >>> net = UNet((1, 8, 8), channels=16, num_classes=10)
        >>> net(torch.zeros(5, 1, 8, 8), torch.rand(5), y=torch.arange(5)).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2),
        num_classes: int | None = None,
        time_dim: int = 64,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        mult = tuple(int(m) for m in channel_mult)
        if len(shape) != 3 or any(s <= 0 for s in shape):
            raise ValueError(f"shape must be (C, H, W) with positive entries, got {shape}")
        if channels <= 0 or not mult or any(m <= 0 for m in mult) or time_dim <= 0 or time_dim % 2:
            raise ValueError(
                f"channels and channel_mult must be positive and time_dim positive and even, got "
                f"channels={channels}, channel_mult={mult}, time_dim={time_dim}"
            )
        if any(s % 2 ** (len(mult) - 1) for s in shape[1:]):
            raise ValueError(
                f"H and W must be divisible by 2**(len(channel_mult) - 1) = {2 ** (len(mult) - 1)}, got shape {shape}"
            )
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.spec = {
            "kind": "unet",
            "shape": list(shape),
            "channels": channels,
            "channel_mult": list(mult),
            "num_classes": num_classes,
            "time_dim": time_dim,
        }
        self.shape, self.time_dim, self.num_classes = shape, time_dim, num_classes
        self.null_label = num_classes
        emb = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(num_classes + 1, emb) if num_classes is not None else None
        widths = [channels * m for m in mult]
        self.conv_in = nn.Conv2d(shape[0], widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.down.append(_ResBlock(cin, w, emb))
            cin = w
        self.mid = _ResBlock(cin, cin, emb)
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.up.append(_ResBlock(cin + w, w, emb))
            cin = w
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, shape[0], 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_mlp(time_features(t, self.time_dim).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            e = e + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels y were given")
        h, skips = self.conv_in(x), []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), e)
        return self.conv_out(F.silu(self.norm_out(h)))


def build(spec: dict) -> nn.Module:
    """Rebuilds a model from its ``spec`` dict (as stored in checkpoints).

    Example:
        >>> net = build(MLPVelocity((2,), hidden=64).spec)
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "mlp":
        return MLPVelocity(**spec)
    if kind == "unet":
        return UNet(**spec)
    raise ValueError(f"model spec kind must be 'mlp' or 'unet', got {kind!r}")
