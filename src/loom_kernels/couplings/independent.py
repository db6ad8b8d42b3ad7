"""Independent coupling: fresh Gaussian noise for every data item."""

from __future__ import annotations

import torch

from .base import (
    Coupling,
    check_cond,
    check_cond_weight,
    check_flag,
    check_indices,
    check_labels,
    check_metric,
    check_x1,
)


class IndependentCoupling(Coupling):
    """Fresh Gaussian noise for every data item (plain CFM / rectified flow).

    ``x0 = torch.randn(x1.shape)`` on ``x1``'s device and dtype, drawn from ``generator`` when given (it
    must live on ``x1``'s device) and otherwise from torch's global RNG (so ``torch.manual_seed`` makes runs
    reproducible); a given ``x0`` (same shape, device and dtype as ``x1``) is paired as it is. ``indices``
    are checked (integers, ``(b,)``) and not used. ``labels`` are checked and change nothing: independent
    noise never crosses classes; ``cond`` likewise (checked like every coupling's, see ``Coupling``;
    ``cond_weight`` is accepted for symmetry). ``return_indices=True`` returns ``(x0, x1, arange(b))``.
    ``stats`` holds the mean pair cost under ``metric`` (``pre_cost ==
    post_cost``, ``swaps == 0``) so the three couplings can be logged side by side.

    Shapes: ``x1 (b, *shape)``, ``indices (b,)``, ``x0 (b, *shape)`` -> ``(x0, x1)``, both ``(b, *shape)``.

    Example::

        x0, x1 = IndependentCoupling()(torch.rand(8, 2))
    """

    def __init__(
        self, *, generator: torch.Generator | None = None, metric: str = "sqeuclidean", cond_weight: float = 1.0
    ) -> None:
        self.generator = generator
        self.cond_weight = check_cond_weight(cond_weight)
        self.metric = check_metric(metric)
        self.stats = {}

    def __call__(
        self,
        x1: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        return_indices: bool = False,
    ) -> tuple:
        check_x1(x1)
        check_indices(indices, x1.shape[0], type(self).__name__)
        check_labels(labels, x1.shape[0], x1.device)
        check_cond(cond, x1.shape[0], x1.device)
        check_flag(return_indices, "return_indices")
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        else:
            check_x1(x0, "x0")
            if x0.shape != x1.shape or x0.device != x1.device or x0.dtype != x1.dtype:
                raise ValueError(
                    f"x0 must match x1 (shape {tuple(x1.shape)}, {x1.device}, {x1.dtype}), got "
                    f"{tuple(x0.shape)} on {x0.device}, {x0.dtype}"
                )
        d = (x1 - x0).flatten(1).double().pow(2).sum(1)
        c = d if self.metric == "sqeuclidean" else d.sqrt()
        mean = c.mean() if len(c) else c.sum()
        swaps = torch.zeros((), dtype=torch.int64, device=x1.device)
        self.stats = {"pre_cost": mean, "post_cost": mean, "swaps": swaps}
        if return_indices:
            return x0, x1, torch.arange(x1.shape[0], device=x1.device)
        return x0, x1
