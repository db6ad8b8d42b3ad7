"""Helpers shared by every coupling: argument checks, metric names, devices, pair statistics, the solve.

Public to the package (the couplings, the tables and compat import them); not part of the user API.
"""

from __future__ import annotations

import torch

from ..assign import assign
from ..cost import METRICS  # the metric names live beside the code that computes them

_COST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_x1(x1, name="x1"):
    if not isinstance(x1, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (b, *shape), got {type(x1).__name__}")
    if not x1.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x1.dtype}")
    if x1.dim() < 2:
        raise ValueError(f"{name} must have shape (b, *shape) with at least one feature dim, got {tuple(x1.shape)}")


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``t`` to ``device``; host -> GPU goes through pinned memory so the copy never stalls the host
    (a pageable source lets the driver synchronize with the stream)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_indices(indices, b: int, who: str):
    """``indices`` of a coupling that does not use them: ``None`` or ``b`` integers (tensor or array-like).

    A floating tensor in their place is the noise passed positionally in TorchCFM's ``(x0, x1)`` order,
    which would train the reverse flow: refused with a ``TypeError`` that names ``x0=``."""
    if indices is None:
        return None
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(
            f"{who}(x1, indices, *, x0=None, labels=None): indices must be integer dataset indices, got dtype "
            f"{idx.dtype}. Pass the noise as the keyword x0=: TorchCFM's order (x0, x1) would treat the noise "
            f"as data and train the reverse flow"
        )
    if idx.dim() != 1 or idx.shape[0] != b:
        raise ValueError(f"indices must have shape (b,) = ({b},) to match x1, got {tuple(idx.shape)}")
    return idx


def check_labels(labels, b: int, device: torch.device):
    """``labels`` as given (``None`` or an integer ``(b,)`` tensor on ``device``), or a clear error."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor of shape (b,), got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"labels must have shape (b,) = ({b},) to match x1, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on x1's device {device}, got {labels.device}")
    return labels


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


def check_cond_weight(cond_weight) -> float:
    """``cond_weight`` as a float, or a ``ValueError``: a finite real number ``>= 0``."""
    if isinstance(cond_weight, bool) or not isinstance(cond_weight, (int, float)):
        raise ValueError(f"cond_weight must be a finite float >= 0, got {cond_weight!r}")
    w = float(cond_weight)
    if not (w >= 0.0 and w != float("inf")):  # also refuses NaN
        raise ValueError(f"cond_weight must be a finite float >= 0, got {cond_weight!r}")
    return w


def check_cond(cond, b: int, device: torch.device) -> torch.Tensor | None:
    """``cond`` as a float64 ``(b, Dc)`` tensor (``(b,)`` is read as ``Dc = 1``), or None, or a clear error.

    ``cond`` holds one row of condition values per data item (a timestep, a physical parameter, an
    embedding). It must be a floating tensor on ``x1``'s device, finite: NaN or inf is refused here, before
    anything changes (on CUDA this reads one flag back from the device). Float64 keeps the penalty's
    precision whatever the input dtype, and every rank of a group sends the same dtype.

    Example::

        c = check_cond(torch.rand(8), 8, torch.device("cpu"))   # (8, 1) float64
    """
    if cond is None:
        return None
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"cond must be a floating torch.Tensor of shape (b, Dc) or (b,), got {type(cond).__name__}")
    if not cond.is_floating_point():
        raise TypeError(
            f"cond must have a floating dtype (continuous condition values), got {cond.dtype}; pass integer "
            "class labels as labels= instead"
        )
    if cond.dim() not in (1, 2) or cond.shape[0] != b:
        raise ValueError(f"cond must have shape (b, Dc) or (b,) with b = {b} to match x1, got {tuple(cond.shape)}")
    if cond.device != device:
        raise ValueError(f"cond must be on x1's device {device}, got {cond.device}")
    if not bool(torch.isfinite(cond).all()):
        raise ValueError("cond contains NaN or inf: the batch was refused and the coupling's state left unchanged")
    return (cond[:, None] if cond.dim() == 1 else cond).to(torch.float64)


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


def float_bits(value: float) -> int:
    """A float as the int64 of its bits: how a float setting enters the ranks' agreement (ints only)."""
    return int(torch.tensor(float(value), dtype=torch.float64).view(torch.int64))


def check_flag(value, name: str) -> bool:
    """A call's boolean keyword (``return_indices``): a real bool, not a truthy tensor or string."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r:.40}")
    return value


# ---- C2OT's condition options (issue 32): a cosine condition cost, an adaptive weight, oversampling ------

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
