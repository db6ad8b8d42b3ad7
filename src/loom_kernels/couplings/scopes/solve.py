"""The solve every scope ends in: the cost dtype, the label-aware exact assignment, the condition penalty
and the pair statistics (shared by minibatch OT's and LOOM's steps and the grouped solves)."""

from __future__ import annotations

import torch

from ...assign import assign

_COST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cost_dtype(dtype):
    # pairwise_cost takes float32/float16/bfloat16; float64 data is compared in float32.
    return dtype if dtype in _COST_DTYPES else torch.float32


def pair_stats(cost, col):
    """pre_cost (mean diagonal), post_cost (mean matched), swaps; 0-dim tensors, no host sync."""
    n = cost.shape[0]
    ar = torch.arange(n, device=cost.device)
    pre = cost.diagonal()[:n].double().sum() / max(n, 1)
    post = cost.gather(1, col[:, None]).double().sum() / max(n, 1)
    return {"pre_cost": pre, "post_cost": post, "swaps": (col != ar).sum()}


def solve(cost: torch.Tensor, labels: torch.Tensor | None = None, data: str = "x1") -> torch.Tensor:
    """``assign(cost)`` with the pairs of different labels forbidden; ``col (n,)`` int64.

    ``cost (n, m)``: rows are data items, columns noises; with ``labels (n,)`` (square cost) column
    ``j`` is item ``j``'s noise, so forbidding cross-label pairs (+inf) solves exact OT per class in
    one batched solve (the identity stays feasible). A non-finite cost can only come from the data
    (noise is finite), so it is reported as the argument ``data``'s, before any caller changes its state.
    """
    # No pass of our own over the cost: a bad data row makes assign refuse (NaN entries, or a row of
    # +inf that leaves no feasible assignment), and only then is the cost checked, to name the data.
    # On CUDA non-finite costs become NaN so the refusal needs no host read besides assign's own sync.
    raw = cost
    if cost.device.type != "cpu":
        cost = torch.where(torch.isfinite(cost), cost, cost.new_full((), float("nan")))
    if labels is not None:
        cost = cost.masked_fill(labels[:, None] != labels[None, :], float("inf"))
    try:
        return assign(cost)
    except ValueError:
        if not bool(torch.isfinite(raw).all()):
            raise_bad_data(data)
        raise


def raise_bad_data(data):
    raise ValueError(
        f"{data} contains NaN or inf (or values so large that the pair costs overflow float32): "
        "the batch was refused and the coupling's state left unchanged"
    ) from None


# ---- continuous conditions (issue 21 item 6): shared by every coupling ----------------------------------

# A penalty above this is capped: the cost stays finite (a +inf entry would read as bad data on CUDA) and
# any cross-condition pair it marks is already far costlier than every pair of equal conditions.
COND_PENALTY_CAP = 1e30


def cond_cost(c_rows: torch.Tensor, c_cols: torch.Tensor, cond_weight: float) -> torch.Tensor:
    """The ``(n, m)`` float64 penalty ``cond_weight * ||c_rows[i] - c_cols[j]||^2``, capped at ``COND_PENALTY_CAP``.

    ``c_rows (n, Dc)``, ``c_cols (m, Dc)`` float64 (``check_cond``'s output). The Gram identity as ONE
    matrix product of augmented rows, ``[c_i, |c_i|^2, 1] . w [-2 c_j, 1, |c_j|^2]`` (inner size ``Dc + 2``),
    then one clamp: two passes over the ``(n, m)`` matrix and no ``(n, m, Dc)`` tensor. Few passes matter
    more than flops here (each is a parallel region; the penalty's flops are ``Dc / D`` of the cost's).
    Float64 keeps the cancellation error near ``1e-16 * w |c|^2``, far below the float32 cost's
    resolution, so equal conditions cost (next to) nothing even at a huge weight.

    Example::

        pen = cond_cost(torch.zeros(4, 1, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64), 2.0)  # all 2
    """
    rows = torch.cat([c_rows, c_rows.square().sum(1, keepdim=True), torch.ones_like(c_rows[:, :1])], 1)
    cols = torch.cat([-2.0 * c_cols, torch.ones_like(c_cols[:, :1]), c_cols.square().sum(1, keepdim=True)], 1)
    return (rows @ (cols * cond_weight).T).clamp_(0.0, COND_PENALTY_CAP)


def add_cond_cost(
    cost: torch.Tensor, c_rows: torch.Tensor | None, c_cols: torch.Tensor | None, cond_weight: float
) -> torch.Tensor:
    """``cost += cond_weight * ||c_rows[i] - c_cols[j]||^2`` in place (one pass), and return it.

    ``cost (n, m)`` float32 (rows: data items, columns: noises, column ``j`` carrying the condition
    ``c_cols[j]`` of the item that drew or holds it), a fresh tensor the caller owns; without a condition
    or at ``cond_weight == 0`` it is returned untouched, so the unconditioned coupling is reproduced bit
    for bit. Any coupling (exact or entropic) adds its condition term here.

    Example::

        cost = add_cond_cost(pairwise_cost(x1f, noise), cond, cond, 1.0)
    """
    if c_rows is None or cond_weight == 0.0:
        return cost
    return cost.add_(cond_cost(c_rows.to(cost.device), c_cols.to(cost.device), cond_weight))
