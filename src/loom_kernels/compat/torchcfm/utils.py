"""TorchCFM's ``torchcfm.utils``: the 2-D tutorials' toy samplers, ``plot_trajectories`` and ``torch_wrapper``.

Written to TorchCFM's signatures and random-number use, so a tutorial draws the same numbers for the
same seeds: ``eight_normal_sample`` / ``sample_8gaussians`` / ``sample_normal`` use torch's global
generator (``torch.manual_seed``) in TorchCFM's order (the normal noise, then the centre indices),
``sample_moons`` numpy's global generator (``np.random.seed``), as torchdyn's ``generate_moons`` does.
Needs neither torchdyn nor (until ``plot_trajectories`` is called) matplotlib.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..._optional import require

__all__ = [
    "eight_normal_sample",
    "sample_8gaussians",
    "sample_moons",
    "sample_normal",
    "plot_trajectories",
    "torch_wrapper",
]

_S = 1.0 / math.sqrt(2.0)
#: the 8 unit-circle centres, in TorchCFM's order (the order decides which index draws which centre)
_CENTERS = ((1, 0), (-1, 0), (0, 1), (0, -1), (_S, _S), (_S, -_S), (-_S, _S), (-_S, -_S))


def eight_normal_sample(n: int, dim: int, scale: float = 1, var: float = 1) -> torch.Tensor:
    """``n`` points of a mixture of 8 Gaussians at ``scale`` times the unit-circle centres, ``(n, dim)`` float64.

    As TorchCFM's: the covariance is ``sqrt(var) * I`` (so the standard deviation is ``var ** 0.25``),
    ``dim`` must be 2 (the centres are 2-D), and the sum is float64 (TorchCFM's centres are).
    """
    noise = torch.distributions.MultivariateNormal(torch.zeros(dim), math.sqrt(var) * torch.eye(dim)).sample((n,))
    which = torch.multinomial(torch.ones(8), n, replacement=True)
    return torch.tensor(_CENTERS, dtype=torch.float64)[which] * scale + noise


def sample_8gaussians(n: int) -> torch.Tensor:
    """TorchCFM's source distribution for its tutorials: 8 Gaussians of radius 5, ``(n, 2)`` float32."""
    return eight_normal_sample(n, 2, scale=5, var=0.1).float()


def sample_normal(n: int) -> torch.Tensor:
    """``n`` standard normal points in 2-D, ``(n, 2)``, drawn as TorchCFM's tutorials draw them."""
    return torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2)).sample((n,))


def sample_moons(n: int) -> torch.Tensor:
    """Two interleaved half circles, ``(n, 2)`` float32, mapped by ``3x - 1`` as TorchCFM's ``sample_moons``.

    torchdyn's ``generate_moons(n, noise=0.2)``: ``n // 2`` evenly spaced points on the outer arc, the
    rest on the inner one, then one uniform ``[0, 0.2)`` draw per point (numpy's global generator) added
    to both coordinates.
    """
    n_out = n // 2
    n_in = n - n_out
    outer = np.linspace(0, np.pi, n_out)
    inner = np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.cos(outer), 1 - np.cos(inner)])
    y = np.concatenate([np.sin(outer), 1 - np.sin(inner) - 0.5])
    points = np.stack([x, y], axis=1) + np.random.rand(n, 1) * 0.2
    return torch.tensor(points, dtype=torch.float32) * 3 - 1


def plot_trajectories(traj) -> None:
    """Plots the first 2,000 trajectories of ``traj (steps, n, 2)``: start points, paths, end points (as TorchCFM)."""
    plt = require("matplotlib.pyplot", "plot_trajectories")
    n = 2000
    plt.figure(figsize=(6, 6))
    plt.scatter(traj[0, :n, 0], traj[0, :n, 1], s=10, alpha=0.8, c="black")
    plt.scatter(traj[:, :n, 0], traj[:, :n, 1], s=0.2, alpha=0.2, c="olive")
    plt.scatter(traj[-1, :n, 0], traj[-1, :n, 1], s=4, alpha=1, c="blue")
    plt.legend(["Prior sample z(S)", "Flow", "z(0)"])
    plt.xticks([])
    plt.yticks([])
    plt.show()


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
