"""C2OT's condition options (Cheng, Schwing, "The curse of conditions", ICCV 2025; issue 32): a cosine condition
cost, two rules that set the condition weight, noise oversampling; and the condition term in the streamed pass's
form. Functions only, for every coupling that takes ``cond`` (minibatch OT, Sinkhorn, LOOM, semidiscrete).

The two weight rules (``cond_weight=`` a rule's name, ``cond_ratio=r``; ``cond_ratio=None``: the rule's default):

- ``"adaptive"`` (``adaptive_cond_weight``, r = 0.5): the condition term is the fraction r of the mean pair cost
  over the independent pairs, in closed form. Our reading of the issue's words ("the condition term is the given
  fraction of the cost"); it was the library's only rule and stays bit for bit what it was.
- ``"c2ot"`` (``c2ot_search_weight``, r = 0.05): C2OT's own ``search_for_w`` (github hkchengrex/C2OT): the
  largest ``w`` with ``mean_ij [M_ij + w C_ij <= M_jj] >= r``, ``M`` the data-noise cost, ``M_jj`` item j's
  independent pair, ``C`` the condition cost: a fraction r of all (item, noise) pairs must stay no dearer than
  the item's own independent pair. Their code bisects; here it is one order statistic, exact. In the 2-D C2OT
  experiment it beat the share rule (docs/evidence.md, "P3, 2-D").
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


COND_WEIGHT_RULES = ("adaptive", "c2ot")
DEFAULT_COND_RATIO = {"adaptive": 0.5, "c2ot": 0.05}  # a number as cond_weight: 0.5 (unused, as before)
C2OT_WEIGHT_CAP = 1e8  # C2OT's search_for_w's upper end: pairs with equal conditions alone reach r


def is_weight_rule(cond_weight) -> bool:
    """Whether ``cond_weight`` names a rule (``COND_WEIGHT_RULES``) rather than a number."""
    return isinstance(cond_weight, str) and cond_weight in COND_WEIGHT_RULES


def weight_code(cond_weight) -> float:
    """``cond_weight`` as one number for the ranks' agreement: the weight, -1 for ``"adaptive"``, -2 for
    ``"c2ot"``."""
    return -1.0 - COND_WEIGHT_RULES.index(cond_weight) if is_weight_rule(cond_weight) else cond_weight


def check_cond_ratio(ratio, rule=None) -> float:
    """The target fraction ``r`` of a weight rule: a float strictly inside (0, 1); None: ``rule``'s default
    (``DEFAULT_COND_RATIO``: 0.5 for ``"adaptive"`` and for a number, 0.05 for ``"c2ot"``)."""
    if ratio is None:
        return DEFAULT_COND_RATIO.get(rule if is_weight_rule(rule) else "adaptive")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(
            f"cond_ratio must be None or a float in (0, 1) (the target fraction of the weight rule), got {ratio!r}"
        )
    return float(ratio)


def check_cond_weight_or_adaptive(cond_weight):
    """``cond_weight``: a finite float >= 0, or a rule of ``COND_WEIGHT_RULES`` (set per batch from ``cond_ratio``)."""
    if isinstance(cond_weight, str) and not is_weight_rule(cond_weight):
        raise ValueError(f"cond_weight must be a finite float >= 0 or one of {COND_WEIGHT_RULES}, got {cond_weight!r}")
    return cond_weight if is_weight_rule(cond_weight) else check_cond_weight(cond_weight)


def check_oversample(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"oversample must be an int >= 1 (k*b noise rows drawn, b kept), got {k!r}")
    return k


def check_c2ot_options(cond_weight, cond_metric, cond_ratio, oversample=1, *, no_oversample: str = "") -> tuple:
    """The C2OT keywords of any coupling, checked by name: ``(cond_weight, cond_metric, cond_ratio, oversample)``.

    ``no_oversample``: why this coupling cannot oversample (``oversample > 1`` is then refused with it)."""
    rule = check_cond_weight_or_adaptive(cond_weight)
    out = (
        rule,
        check_cond_metric(cond_metric),
        check_cond_ratio(cond_ratio, rule),
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


def c2ot_thresholds(cost: torch.Tensor, pen: torch.Tensor, own: torch.Tensor, zero: float | None = None) -> tuple:
    """What ``c2ot_search_weight`` needs of a block of pairs: ``(thr, free, pairs)``.

    ``cost (n, m)`` data-noise, ``pen (n, m)`` unit-weight condition, ``own (n,)`` each row item's independent
    pair cost. Pair (i, j) stays no dearer than ``own_i`` at weight w iff ``w <= thr = (own_i - cost_ij) /
    pen_ij`` (``pen_ij > zero``); ``free``: the other pairs with ``cost_ij <= own_i`` (at any w). ``zero``: the
    condition costs taken as equal conditions, None: rounding's, ``64 eps max(pen)`` (the cosine of a row with
    itself is ``1 - u.u``, up to 2e-16, and the own pair must count at every w as in exact arithmetic)."""
    d = own.double()[:, None] - cost.double()
    if zero is None:
        zero = 64 * torch.finfo(torch.float64).eps * float(pen.max()) if pen.numel() else 0.0
    pos = pen > zero
    return d[pos] / pen[pos].double(), int(((~pos) & (d >= 0)).sum()), d.numel()


def c2ot_order_weight(thr: torch.Tensor, free: int, pairs: int, ratio: float) -> float:
    """The largest ``w`` with ``(free + #{thr >= w}) / pairs >= ratio``, clamped to ``[0, C2OT_WEIGHT_CAP]``."""
    need = math.ceil(ratio * pairs - 1e-9) - free
    if need <= 0:
        return C2OT_WEIGHT_CAP
    if need > thr.numel():
        return 0.0
    return min(max(float(thr.kthvalue(thr.numel() - need + 1).values), 0.0), C2OT_WEIGHT_CAP)


def c2ot_search_weight(
    cost: torch.Tensor, pen: torch.Tensor, ratio: float, own=None, zero: float | None = None
) -> float:
    """C2OT's ``search_for_w``, exactly: the largest ``w`` with ``mean_ij [cost_ij + w pen_ij <= own_i] >= ratio``.

    ``cost (n, m)`` the data-noise cost (row i an item), ``pen (n, m)`` the unit-weight condition cost, ``own
    (n,)`` item i's independent pair cost (None: the diagonal, ``m == n``). The fraction only drops as ``w``
    grows, pair (i, j) leaving it at ``(own_i - cost_ij) / pen_ij``, so the answer is an order statistic (their
    code bisects to 1e-3 in r). 0 when the fraction is below ``ratio`` already at w = 0; their cap
    ``C2OT_WEIGHT_CAP`` = 1e8 when the pairs with equal conditions (``pen <= zero``, ``c2ot_thresholds``) alone
    reach it (every condition equal: the cap or 0, whichever the data-noise costs give; no weight matters)."""
    return c2ot_order_weight(*c2ot_thresholds(cost, pen, cost.diagonal() if own is None else own, zero), ratio)


def rule_weight(rule: str, cost: torch.Tensor, pen: torch.Tensor, ratio: float, own=None) -> float:
    """The weight rule ``rule`` (``COND_WEIGHT_RULES``) on one block of independent pairs."""
    return c2ot_search_weight(cost, pen, ratio, own) if rule == "c2ot" else adaptive_cond_weight(cost, pen, ratio)


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


def gathered_c2ot_weight(grp, x_rows, x_cols, cond, k: int, cond_metric: str, ratio: float) -> float:
    """Rule ``"c2ot"`` over the global batch of ``grp`` (a ``scopes.group.Group``) for a streamed coupling:
    rows, columns (``k`` per row, item i's own pair its column ``i*k``) and conditions gathered, the squared
    Euclidean ``(n, k n)`` cost formed once in float64 (the same on every rank, so the same weight)."""
    xr, xc, c = (grp.gather(t).double() for t in (x_rows, x_cols, cond))
    cost = torch.cdist(xr, xc, compute_mode="donot_use_mm_for_euclid_dist").square()
    pen = cond_pair_cost(c, c.repeat_interleave(k, 0), cond_metric)
    ar = torch.arange(cost.shape[0], device=cost.device)
    return c2ot_search_weight(cost, pen, ratio, cost[ar, ar * k])


def c2ot_global_step(grp, x1f, x0, labels, cond, metric, k, cond_weight, cond_metric, cond_ratio) -> tuple:
    """Minibatch OT's global step with C2OT's options: ``(x0 matched (b, ...), stats, perm)``.

    ``x0`` holds ``k * b`` rows per rank (row ``i*k + j`` drawn for item i: it carries item i's label and
    condition); the rectangular assignment keeps ``b``. Rule ``"c2ot"``: item i's independent pair is its first
    row ``i*k`` (the pair the independent coupling would keep), over all ``b x k b`` pairs.
    ``stats["cond_weight"]``: the weight used."""
    b = x1f.shape[0]
    g_x0 = grp.gather(x0)
    cost = grp.global_cost(x1f, g_x0.flatten(1).to(x1f.dtype), metric)
    g_cond = None if cond is None else grp.gather(cond)
    g_lab = None if labels is None else grp.gather(labels)
    cols = None if g_cond is None else g_cond.repeat_interleave(k, 0)
    w = cond_weight
    if g_cond is not None and is_weight_rule(cond_weight):  # over every pair, before labels forbid some
        pen = cond_pair_cost(g_cond.to(cost.device), cols.to(cost.device), cond_metric)
        ar = torch.arange(cost.shape[0], device=cost.device)
        w = rule_weight(cond_weight, cost, pen, cond_ratio, cost[ar, ar * k])  # item i's own pair: row i*k
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
