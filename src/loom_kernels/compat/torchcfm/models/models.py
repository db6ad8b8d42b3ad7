"""TorchCFM's ``torchcfm.models.models``: ``MLP`` and ``GradModel``.

``MLP`` has TorchCFM's layers in TorchCFM's order (Linear-SELU x3, Linear; ``dim + 1`` inputs when
``time_varying``, ``t`` as the last column), so the same ``torch.manual_seed`` gives the same initial
weights and a TorchCFM checkpoint loads into it (same ``state_dict`` keys).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "GradModel"]


class MLP(nn.Module):
    """``net(x)`` with ``x (b, dim [+ 1])``; TorchCFM's 2-D tutorials call it on ``cat([x, t[:, None]], 1)``.

    Args:
        dim: data dimension. out_dim: output dimension (``dim`` when None). w: hidden width.
        time_varying: one more input column for ``t``.

    Example::

        model = MLP(dim=2, time_varying=True)
        v = model(torch.cat([xt, t[:, None]], dim=-1))
    """

    def __init__(self, dim: int, out_dim: int | None = None, w: int = 64, time_varying: bool = False):
        super().__init__()
        for name, value in (("dim", dim), ("w", w), ("out_dim", dim if out_dim is None else out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLP: {name} must be a positive int, got {value!r}")
        self.time_varying = time_varying
        out_dim = dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            nn.Linear(dim + (1 if time_varying else 0), w),
            nn.SELU(),
            nn.Linear(w, w),
            nn.SELU(),
            nn.Linear(w, w),
            nn.SELU(),
            nn.Linear(w, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GradModel(nn.Module):
    """The gradient of a scalar ``action(x)`` with respect to ``x``, last column (time) dropped, as TorchCFM's."""

    def __init__(self, action: nn.Module):
        super().__init__()
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        grad = torch.autograd.grad(torch.sum(self.action(x)), x, create_graph=True)[0]
        return grad[:, :-1]
