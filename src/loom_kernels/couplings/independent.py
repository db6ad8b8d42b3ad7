"""Independent coupling: fresh Gaussian noise for every data item."""
from __future__ import annotations

import torch

from .base import Coupling
from .common import check_labels, check_metric, check_x1


class IndependentCoupling(Coupling):
    """Fresh Gaussian noise for every data item (plain CFM / rectified flow).

    ``x0 = torch.randn(x1.shape)`` on ``x1``'s device and dtype, drawn from ``generator`` when given
    (it must live on ``x1``'s device) and otherwise from torch's global RNG (so ``torch.manual_seed``
    makes runs reproducible). ``labels`` are checked and change nothing: independent noise never
    crosses classes. ``stats`` holds the mean pair cost under ``metric`` (``pre_cost ==
    post_cost``, ``swaps == 0``) so the three couplings can be logged side by side.

    Shapes: ``x1 (b, *shape)`` -> ``(x0, x1)``, both ``(b, *shape)``.

    Example::

        x0, x1 = IndependentCoupling()(torch.rand(8, 2))
    """

    def __init__(self, *, generator: torch.Generator | None = None, metric: str = "sqeuclidean") -> None:
        self.generator = generator
        self.metric = check_metric(metric)
        self.stats = {}

    def __call__(self, x1: torch.Tensor, indices: torch.Tensor | None = None, *,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_x1(x1)
        check_labels(labels, x1.shape[0], x1.device)
        x0 = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        d = (x1 - x0).flatten(1).double().pow(2).sum(1)
        c = d if self.metric == "sqeuclidean" else d.sqrt()
        mean = c.mean() if len(c) else c.sum()
        swaps = torch.zeros((), dtype=torch.int64, device=x1.device)
        self.stats = {"pre_cost": mean, "post_cost": mean, "swaps": swaps}
        return x0, x1

