"""C2OT's condition options (Cheng, Schwing, "The curse of conditions", ICCV 2025; issue 32): a cosine condition
cost, an adaptive condition weight, noise oversampling; and the condition term in the streamed pass's form.
Functions only, for every coupling that takes ``cond``."""

from __future__ import annotations

import torch

from .base import check_cond_weight
from .scopes.solve import COND_PENALTY_CAP, cond_cost, pair_stats, solve

COND_METRICS = ("sqeuclidean", "cosine")


def check_cond_metric(cond_metric) -> str:
    if cond_metric not in COND_METRICS:
        raise ValueError(f"cond_metric must be one of {COND_METRICS}, got {cond_metric!r}")
    return cond_metric


def check_cond_ratio(ratio) -> float:
    """The target fraction ``r`` of ``cond_weight="adaptive"``: a float strictly inside (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(
            f"cond_ratio must be a float in (0, 1) (the condition term's share of the cost), got {ratio!r}"
        )
    return float(ratio)


def check_cond_weight_or_adaptive(cond_weight):
    """``cond_weight``: a finite float >= 0, or ``"adaptive"`` (set per batch to the ratio ``cond_ratio``)."""
    return "adaptive" if cond_weight == "adaptive" else check_cond_weight(cond_weight)


def check_oversample(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"oversample must be an int >= 1 (k*b noise rows drawn, b kept), got {k!r}")
    return k


def unit_rows(c: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (a zero row stays zero: cosine similarity 0 with everything)."""
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-300)


def cond_pair_cost(c_rows: torch.Tensor, c_cols: torch.Tensor, cond_metric: str = "sqeuclidean") -> torch.Tensor:
    """The unit-weight condition cost ``(n, m)`` float64: ``||c_i - c_j||^2``, or ``1 - cos(c_i, c_j)`` (C2OT's
    cosine option, for embeddings whose norm carries no meaning)."""
    if cond_metric == "cosine":
        return (1.0 - unit_rows(c_rows) @ unit_rows(c_cols).T).clamp_(0.0, 2.0)
    return cond_cost(c_rows, c_cols, 1.0)


def stream_cond_terms(c_rows, c_cols, weight: float, cond_metric: str):
    """The condition term ``weight * d(c_i, c_j)`` as the streamed pass takes it: ``(aux, col_term, row_term)``
    with ``d = row_term_i + col_term_j - <aux a_i, c_j> * w``, so ``streamed_argmin(..., aux=aux)`` with
    ``g - col_term`` minimises ``c + weight * d`` (``row_term`` adds the rest to the value)."""
    if cond_metric == "cosine":
        a, c = unit_rows(c_rows), unit_rows(c_cols)
        return (a, c, weight), torch.zeros_like(c[:, 0]), torch.full_like(a[:, 0], weight)
    return (c_rows, c_cols, 2.0 * weight), weight * c_cols.square().sum(1), weight * c_rows.square().sum(1)


def adaptive_cond_weight(cost: torch.Tensor, pen: torch.Tensor, ratio: float) -> float:
    """The weight ``w`` at which the condition is the fraction ``ratio`` of the mean pair cost (C2OT's target).

    ``cost (n, m)`` the data-noise cost, ``pen (n, m)`` the unit-weight condition cost: ``w mean(pen) /
    (mean(cost) + w mean(pen)) = ratio`` over all pairs (the independent coupling's pairs), solved in closed
    form. The share in the *matched* pairs is no target: matching drives it to 0 as ``w`` grows (each noise
    carries its own item's condition, so keeping one's noise costs no condition), so no weight reaches it.
    """
    mean_c, mean_p = float(cost.double().mean()), float(pen.mean())
    if mean_p <= 0.0 or mean_c <= 0.0:  # every condition equal (or a cost that is no distance): nothing to weigh
        return 0.0
    return ratio / (1.0 - ratio) * mean_c / mean_p


def add_c2ot_cond_cost(cost, c_rows, c_cols, cond_weight, cond_metric, cond_ratio):
    """``cost += w * d(c_rows[i], c_cols[j])`` in place with C2OT's options; returns ``(cost, w)``.

    ``d``: ``cond_metric``'s unit cost (``cond_pair_cost``); ``w``: ``cond_weight``, or with ``"adaptive"``
    ``adaptive_cond_weight``'s, per batch. Without a condition the cost is returned untouched."""
    if c_rows is None:
        return cost, cond_weight if cond_weight != "adaptive" else 0.0
    pen = cond_pair_cost(c_rows.to(cost.device), c_cols.to(cost.device), cond_metric)
    w = adaptive_cond_weight(cost, pen, cond_ratio) if cond_weight == "adaptive" else cond_weight
    return cost.add_((w * pen).clamp_(max=COND_PENALTY_CAP).to(cost.dtype)), w


def c2ot_global_step(grp, x1f, x0, labels, cond, metric, k, cond_weight, cond_metric, cond_ratio) -> tuple:
    """Minibatch OT's global step with C2OT's options: ``(x0 matched (b, ...), stats, perm)``.

    ``x0`` holds ``k * b`` rows per rank (row ``i*k + j`` drawn for item i: it carries item i's label and
    condition); the rectangular assignment keeps ``b``. ``stats["cond_weight"]``: the weight used."""
    b = x1f.shape[0]
    g_x0 = grp.gather(x0)
    cost = grp.global_cost(x1f, g_x0.flatten(1).to(x1f.dtype), metric)
    g_cond = None if cond is None else grp.gather(cond)
    g_lab = None if labels is None else grp.gather(labels)
    cols = None if g_cond is None else g_cond.repeat_interleave(k, 0)
    if g_lab is not None and k > 1:  # rectangular: forbid cross-label pairs here, not in solve
        cost = cost.masked_fill(g_lab[:, None] != g_lab.repeat_interleave(k)[None, :], float("inf"))
        g_lab = None
    cost, w = add_c2ot_cond_cost(cost, g_cond, cols, cond_weight, cond_metric, cond_ratio)
    col = solve(cost, g_lab)
    stats = pair_stats(cost, col)
    if cond is not None:
        stats["cond_weight"] = torch.tensor(float(w))
    perm = col[grp.rank * b : (grp.rank + 1) * b]
    return g_x0[perm], stats, perm
