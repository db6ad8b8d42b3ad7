"""Minibatch OT: the exact assignment between each minibatch and its noise (Pooladian et al. 2023; Tong et al. 2023)."""
from __future__ import annotations

from typing import Optional

import torch

from ..assign import assign
from ..cost import pairwise_cost
from ._common import _check_metric, _check_x1, _cost_dtype, _pair_stats


class MinibatchOTCoupling:
    """Exact minibatch optimal transport: the noise of each batch is permuted to the optimal pairing.

    ``x0`` is drawn like ``IndependentCoupling`` when not given. With ``x0`` of ``m >= b`` rows, the
    ``b`` best-matching rows are kept (rectangular assignment). The assignment is exact (``assign``).

    Shapes: ``x1 (b, *shape)``, ``x0 (m, *shape)`` with ``m >= b`` -> ``(x0 (b, *shape), x1)``.

    Example::

        x0, x1 = MinibatchOTCoupling()(torch.rand(64, 2))
        # x0[i] is the noise paired with x1[i]; coupling.stats["post_cost"] <= ["pre_cost"]
    """

    def __init__(self, metric: str = "sqeuclidean", *, generator: Optional[torch.Generator] = None):
        self.metric = _check_metric(metric)
        self.generator = generator
        self.stats = {}

    def __call__(self, x1: torch.Tensor, x0: Optional[torch.Tensor] = None, indices=None):
        _check_x1(x1)
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        else:
            _check_x1(x0, "x0")
            if x0.shape[1:] != x1.shape[1:] or x0.shape[0] < x1.shape[0]:
                raise ValueError(
                    f"x0 must have shape (m, *x1.shape[1:]) with m >= b = {x1.shape[0]}, "
                    f"got x0 {tuple(x0.shape)} for x1 {tuple(x1.shape)}"
                )
            if x0.device != x1.device:
                raise ValueError(f"x0 must be on x1's device {x1.device}, got {x0.device}")
        b = x1.shape[0]
        if b == 0:
            self.stats = {}
            return x0[:0], x1
        dt = _cost_dtype(x1.dtype)
        cost = pairwise_cost(x1.flatten(1).to(dt), x0.flatten(1).to(dt), metric=self.metric)
        col = assign(cost)
        self.stats = _pair_stats(cost, col)
        return x0[col], x1
