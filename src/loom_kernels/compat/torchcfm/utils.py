"""TorchCFM's ``torchcfm.utils.torch_wrapper`` (the rest of torchcfm.utils is plotting and toy data)."""

from __future__ import annotations

import torch

__all__ = ["torch_wrapper"]


class torch_wrapper(torch.nn.Module):  # noqa: N801  (TorchCFM's name)
    """Wraps ``model(cat([x, t]))`` as a torchdyn vector field ``forward(t, x)``, as TorchCFM defines it.

    ``x (b, d)``, ``t`` a 0-dim tensor; the model sees ``(b, d + 1)`` with ``t`` as the last column.

    Example::

        node = NeuralODE(torch_wrapper(mlp), solver="euler")
        traj = node.trajectory(torch.randn(64, 2), t_span=torch.linspace(0, 1, 100))
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t, x, *args, **kwargs):
        return self.model(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))
