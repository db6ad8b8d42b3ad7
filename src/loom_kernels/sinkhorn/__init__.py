"""Entropic optimal transport at any batch size: log-domain Sinkhorn on a streamed cost.

The squared-Euclidean cost between point clouds is never stored: CUDA runs Triton kernels that
form each tile of logits in registers and fold it into a running log-sum-exp (or argmax), the CPU
a blocked torch path with the same property. Memory beyond the inputs and the potentials is
O(B (n + m) + tile). See docs/sinkhorn.md.

    >>> from loom_kernels.sinkhorn import sinkhorn, draw_pairs, plan_sharpness
    >>> res = sinkhorn(x1, x0, epsilon=0.01)          # relative to the mean cost
    >>> j = draw_pairs(res, x1, x0, seed=0)           # (n,) int64: x0[j[i]] pairs with x1[i]
"""

from .plan import dense_plan, draw_pairs, plan_sharpness
from .solver import RowShards, SinkhornResult, SinkhornWarning, sinkhorn, sinkhorn_cost

__all__ = [
    "RowShards",
    "SinkhornResult",
    "SinkhornWarning",
    "dense_plan",
    "draw_pairs",
    "plan_sharpness",
    "sinkhorn",
    "sinkhorn_cost",
]
