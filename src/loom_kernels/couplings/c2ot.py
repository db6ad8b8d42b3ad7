"""C2OT's condition options (Cheng, Schwing, "The curse of conditions", ICCV 2025; issue 32): a cosine condition
cost, an adaptive condition weight, noise oversampling; and the condition term in the streamed pass's form.
Functions only, for every coupling that takes ``cond`` (minibatch OT, Sinkhorn, LOOM, semidiscrete).
"""

from __future__ import annotations

import math

import torch

from .base import check_cond_weight, check_cost_range
from .scopes.solve import COND_PENALTY_CAP, add_cond_cost, cond_cost, pair_stats, solve

COND_METRICS = ("sqeuclidean", "cosine")
_FIX = "scale cond down or lower cond_weight"


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


def check_c2ot_options(cond_weight, cond_metric, cond_ratio, oversample=1, *, no_oversample: str = "") -> tuple:
    """The C2OT keywords of any coupling, checked by name: ``(cond_weight, cond_metric, cond_ratio, oversample)``.

    ``no_oversample``: why this coupling cannot oversample (``oversample > 1`` is then refused with it)."""
    out = (
        check_cond_weight_or_adaptive(cond_weight),
        check_cond_metric(cond_metric),
        check_cond_ratio(cond_ratio),
        check_oversample(oversample),
    )
    if no_oversample and out[3] > 1:
        raise ValueError(f"oversample must be 1 here, got {oversample!r}: {no_oversample}")
    return out


def check_cond_range(cond, weight, cond_metric: str, dtype=torch.float64, fix=_FIX) -> None:
    """``check_cost_range`` of the condition term (``weight``: a number; None or "adaptive": not known yet).
    The cosine term is at most ``2 weight``, whatever the size of ``cond``."""
    if cond is None or not isinstance(weight, float):
        return
    check_cost_range("cond", unit_rows(cond) if cond_metric == "cosine" else cond, weight, dtype, fix)


def unit_rows(c: torch.Tensor) -> torch.Tensor:
    """``(n, Dc + 1)`` unit rows ``[c / |c|, 0]``, and ``[0, ..., 0, 1]`` for a zero row: ``u_i . u_j`` is the
    cosine similarity, and two zero rows (equal conditions) have similarity 1, a zero and a nonzero row 0."""
    norm = c.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, c / norm.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
    return torch.cat([unit, (norm == 0).to(c.dtype)], 1)


def cond_pair_cost(c_rows: torch.Tensor, c_cols: torch.Tensor, cond_metric: str = "sqeuclidean") -> torch.Tensor:
    """The unit-weight condition cost ``(n, m)`` float64: ``||c_i - c_j||^2``, or ``1 - cos(c_i, c_j)`` (C2OT's
    cosine option, for embeddings whose norm carries no meaning; ``unit_rows`` says what a zero row is)."""
    if cond_metric == "cosine":
        return (1.0 - unit_rows(c_rows) @ unit_rows(c_cols).T).clamp_(0.0, 2.0)
    return cond_cost(c_rows, c_cols, 1.0)


def add_weighted_cond_cost(cost, c_rows, c_cols, weight: float, cond_metric: str):
    """``cost += weight * d(c_rows[i], c_cols[j])`` in place (capped at ``COND_PENALTY_CAP``); returns ``cost``.

    The squared Euclidean ``d`` is ``scopes.solve.add_cond_cost`` (the couplings' default, bit for bit)."""
    if c_rows is None or weight == 0.0:
        return cost
    if cond_metric != "cosine":
        return add_cond_cost(cost, c_rows, c_cols, weight)
    pen = cond_pair_cost(c_rows.to(cost.device), c_cols.to(cost.device), cond_metric)
    return cost.add_((weight * pen).clamp_(max=COND_PENALTY_CAP).to(cost.dtype))


def cond_features(cond: torch.Tensor, weight: float, cond_metric: str) -> torch.Tensor:
    """Features whose squared Euclidean distance is ``weight * d(c_i, c_j)`` exactly (for a streamed cost such
    as Sinkhorn's): ``sqrt(weight) c``, or ``sqrt(weight / 2)`` times the unit rows (``|u_i - u_j|^2 = 2 - 2 cos``)."""
    if cond_metric == "cosine":
        return unit_rows(cond) * math.sqrt(weight / 2.0)
    return cond * math.sqrt(weight)


def stream_cond_terms(c_rows, c_cols, weight: float, cond_metric: str):
    """The condition term ``weight * d(c_i, c_j)`` as the streamed pass takes it: ``(aux, col_term, row_term)``
    with ``d = row_term_i + col_term_j - <aux a_i, c_j> * w``, so ``streamed_argmin(..., aux=aux)`` with
    ``g - col_term`` minimises ``c + weight * d`` (``row_term`` adds the rest to the value)."""
    if cond_metric == "cosine":
        a, c = unit_rows(c_rows), unit_rows(c_cols)
        return (a, c, weight), torch.zeros_like(c[:, 0]), torch.full_like(a[:, 0], weight)
    return (c_rows, c_cols, 2.0 * weight), weight * c_cols.square().sum(1), weight * c_rows.square().sum(1)


def ratio_weight(mean_cost: float, mean_pen: float, ratio: float) -> float | None:
    """The weight ``w`` with ``w mean_pen / (mean_cost + w mean_pen) = ratio`` (C2OT's target, closed form);
    None when there is nothing to weigh (every condition equal, a cost that is no distance, or NaN)."""
    if not (mean_pen > 0.0 and mean_cost > 0.0) or not math.isfinite(mean_pen * mean_cost):
        return None
    return ratio / (1.0 - ratio) * mean_cost / mean_pen


def adaptive_cond_weight(cost: torch.Tensor, pen: torch.Tensor, ratio: float) -> float:
    """The weight ``w`` at which the condition is the fraction ``ratio`` of the mean pair cost (C2OT's target).

    ``cost (n, m)`` the data-noise cost, ``pen (n, m)`` the unit-weight condition cost: ``w mean(pen) /
    (mean(cost) + w mean(pen)) = ratio`` over all pairs (the independent coupling's pairs), solved in closed
    form; 0 when every condition is equal. The share in the *matched* pairs is no target: matching drives it
    to 0 as ``w`` grows (each noise carries its own item's condition, so keeping one's noise costs no
    condition), so no weight reaches it.
    """
    w = ratio_weight(float(cost.double().mean()), float(pen.mean()), ratio)
    return 0.0 if w is None else w


def _sq_sums(x: torch.Tensor) -> torch.Tensor:
    """``[sum |x_i|^2, sum x_i, n]`` float64: what the mean squared distance to another set needs."""
    x = x.double()
    return torch.cat([x.square().sum().reshape(1), x.sum(0), x.new_full((1,), x.shape[0])])


def _mean_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean of ``|x_i - y_j|^2`` over all pairs, from ``_sq_sums`` of both sets."""
    na, nb = float(a[-1]), float(b[-1])
    return float(a[0] / na + b[0] / nb - 2.0 * (a[1:-1] / na) @ (b[1:-1] / nb))


def streamed_adaptive_weight(grp, x_rows, x_cols, c_rows, c_cols, cond_metric: str, ratio: float) -> float:
    """``adaptive_cond_weight`` over every (row, column) pair of the rows and columns of every rank of ``grp``
    (a ``scopes.group.Group``) without the ``(n, m)`` cost: the squared Euclidean means in closed form from
    the sums of each side (one all-reduce of ``2 (D + Dc) + 8`` numbers)."""
    fx = (x_rows, x_cols, *((unit_rows(c_rows), unit_rows(c_cols)) if cond_metric == "cosine" else (c_rows, c_cols)))
    sums = [_sq_sums(t) for t in fx]
    flat = torch.cat(sums)
    if grp.world > 1:
        flat = grp.all_reduce(flat, torch.distributed.ReduceOp.SUM)
    sums = flat.split([len(s) for s in sums])
    scale = 0.5 if cond_metric == "cosine" else 1.0  # |u_i - u_j|^2 = 2 (1 - cos)
    w = ratio_weight(_mean_sq(sums[0], sums[1]), scale * _mean_sq(sums[2], sums[3]), ratio)
    return 0.0 if w is None else w


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
    w = cond_weight
    if g_cond is not None and cond_weight == "adaptive":  # over every pair, before labels forbid some
        pen = cond_pair_cost(g_cond.to(cost.device), cols.to(cost.device), cond_metric)
        w = adaptive_cond_weight(cost, pen, cond_ratio)
    if g_lab is not None and k > 1:  # rectangular: forbid cross-label pairs here, not in solve
        cost = cost.masked_fill(g_lab[:, None] != g_lab.repeat_interleave(k)[None, :], float("inf"))
        g_lab = None
    cost = add_weighted_cond_cost(cost, g_cond, cols, w, cond_metric)
    col = solve(cost, g_lab)
    stats = pair_stats(cost, col)
    if cond is not None:
        stats["cond_weight"] = torch.tensor(float(w), dtype=torch.float64, device=cost.device)
    perm = col[grp.rank * b : (grp.rank + 1) * b]
    return g_x0[perm], stats, perm
