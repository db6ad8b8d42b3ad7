"""Small velocity networks ``v(x, t)`` for the demo and the command line.

Both take ``x`` of shape ``(B, *shape)`` and ``t`` of shape ``(B,)`` and return ``(B, *shape)``.
Time enters through sinusoidal features (Vaswani et al., 2017; as in DDPM / TorchCFM's MLPs).
A model is rebuilt from ``model.spec`` (a plain dict kept in checkpoints) by :func:`build`.
"""
from __future__ import annotations

import math

import torch
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

    def __init__(self, shape, hidden: int = 256, depth: int = 3, time_dim: int = 32):
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


def build(spec: dict) -> nn.Module:
    """Rebuilds a model from its ``spec`` dict (as stored in checkpoints).

    Example:
        >>> net = build(MLPVelocity((2,), hidden=64).spec)
    """
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "mlp":
        return MLPVelocity(**spec)
    raise ValueError(f"model spec kind must be 'mlp', got {kind!r}")
