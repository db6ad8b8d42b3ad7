"""``assign`` and ``linear_sum_assignment``'s argument checks: options, shape, dtype, device, the
exact range of integer costs, and the native solvers' status codes as the errors scipy raises.

Each check is written once, here: the eager path (``dispatch.py``) and the custom op's fake
implementation (``op.py``: shapes only, no value read) call the same ones. Needs numpy only.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "BACKENDS",
    "METHODS",
    "DEFAULT_TOL",
    "is_torch",
    "check_options",
    "check_shape",
    "check_real_tensor",
    "check_rows",
    "check_tensor",
    "check_tensor_device",
    "numpy_cost",
    "torch_cost",
    "raise_for_status",
]

BACKENDS = ("auto", "cpu", "cuda")
METHODS = ("auto", "lap", "auction")
# Default optimality tolerance (relative to the optimum) by input precision; integer and bool
# costs are solved exactly.
DEFAULT_TOL = {"float64": 1e-9, "float32": 1e-6, "exact": 0.0}


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def check_options(maximize, backend, tol, method, threads):
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tol is not None:
        if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, numbers.Real):
            raise TypeError(f"tol must be a real number or None, got {type(tol).__name__}")
        if not (np.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0 (or None for the dtype default), got {tol!r}")
    if threads is None:
        return 0
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"threads must be a positive int or None, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")
    return int(threads)


def check_shape(shape):
    if len(shape) not in (2, 3):
        raise ValueError(
            f"cost must have shape (N, M) or (B, N, M) (expected a matrix or a batch of matrices), got {tuple(shape)}"
        )


def _exact_limit(shape) -> int:
    # The solvers work in float64: integers stay exact while every potential and path length they form
    # (sums of up to ~2 max(N, M) entries, with margin) stays below 2**53.
    return 2**53 // (4 * max(int(shape[-2]), int(shape[-1]), 1))


def _int_range_error(span, shape, limit):
    return ValueError(
        f"integer cost entries span {span} (after subtracting each {'row' if shape[-2] <= shape[-1] else 'column'}'s "
        f"minimum, which keeps every optimum), but the solver is exact only for spans below "
        f"2**53 / (4 * max(N, M)) = {limit} for cost of shape {tuple(shape)}: float64 would round them and "
        f"return a suboptimal assignment. Scale the costs down, or pass cost.astype(float64) to accept rounding"
    )


def _exact_numpy(a: np.ndarray) -> np.ndarray:
    """Integer costs -> float64 holding them exactly: each row (each column when N > M) is shifted by its
    minimum (every assignment's total moves by the same constant), then the span must fit (else ValueError)."""
    if a.size == 0:
        return a.astype(np.float64)
    axis = -1 if a.shape[-2] <= a.shape[-1] else -2
    u = a.astype(np.uint64)
    lo = a.min(axis=axis, keepdims=True).astype(np.uint64)
    with np.errstate(over="ignore"):
        shifted = u - lo  # the true difference lies in [0, 2**64): exact modulo 2**64
    span, limit = int(shifted.max()), _exact_limit(a.shape)
    if span >= limit:
        raise _int_range_error(span, a.shape, limit)
    return shifted.astype(np.float64)


def _exact_torch(t):
    """``_exact_numpy`` for an integer/bool tensor on any device (int64 wrap-around is the uint64 difference)."""
    import torch

    if t.numel() == 0:
        return t.to(torch.float64)
    t = t.to(torch.int64)
    dim = -1 if t.shape[-2] <= t.shape[-1] else -2
    shifted = t - t.amin(dim=dim, keepdim=True)
    limit = _exact_limit(t.shape)
    bad = (shifted < 0) | (shifted >= limit)  # < 0: a span of 2**63 or more wrapped around
    if bool(bad.any()):
        span = int(shifted[shifted >= 0].max()) if bool((shifted >= 0).all()) else "2**63 or more"
        raise _int_range_error(span, t.shape, limit)
    return shifted.to(torch.float64)


def numpy_cost(cost):
    """numpy/list input -> (float32/float64 array in any layout, precision class)."""
    try:
        a = np.asarray(cost)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(f"cost must be a rectangular (N, M) or (B, N, M) array-like: {exc}") from None
    kind = a.dtype.kind
    if kind not in "biuf":
        raise TypeError(f"cost must hold real numbers (float, int or bool), got dtype {a.dtype}")
    check_shape(a.shape)
    if kind == "f" and a.dtype.itemsize <= 4:
        return a.astype(np.float32, copy=False), "float32"
    if kind == "f":
        return a.astype(np.float64, copy=False), "float64"
    return _exact_numpy(a), "exact"


def torch_cost(t):
    """torch input -> (float32/float64 tensor, precision class); the device is kept."""
    import torch

    check_real_tensor(t)
    t = t.detach()
    if t.dtype == torch.float64:
        return t, "float64"
    if t.dtype == torch.float32:
        return t, "float32"
    if t.is_floating_point():
        return t.to(torch.float32), "float32"
    return _exact_torch(t), "exact"


def raise_for_status(status, batched, maximize):
    """status: int8 numpy [B] from a native solver; raises like scipy on the first bad problem."""
    if not np.count_nonzero(status):
        return
    b = int(np.flatnonzero(status)[0])
    where = f" (problem {b} of the batch)" if batched else ""
    if status[b] == 2:
        extra = " (NaN or +inf; with maximize=True -inf marks a forbidden pair)" if maximize else " (NaN or -inf)"
        raise ValueError(f"cost matrix contains invalid numeric entries{extra}{where}")
    if status[b] == 1:
        raise ValueError(f"cost matrix is infeasible: no complete assignment avoids the +inf entries{where}")
    if status[b] == 3:
        raise RuntimeError(
            f"the auction did not converge within its round bound{where}; use method='lap' (exact, CPU) or a larger tol"
        )
    raise RuntimeError(f"native solver returned unknown status {int(status[b])}{where}")


def check_real_tensor(t) -> None:
    if t.is_complex():
        raise TypeError(f"cost must hold real numbers (float, int or bool), got dtype {t.dtype}")
    check_shape(t.shape)


def check_rows(shape) -> None:
    """``assign`` gives every row a column: N <= M."""
    if shape[-2] > shape[-1]:
        raise ValueError(
            f"assign needs N <= M (every row gets a column), got cost of shape {tuple(shape)}: "
            f"use linear_sum_assignment for more rows than columns"
        )


def check_tensor(cost, backend, tol, method, maximize, threads) -> None:
    """The checks ``assign`` makes on a tensor before it reads a value, with its messages."""
    check_options(maximize, backend, tol, method, threads)
    check_real_tensor(cost)
    check_rows(cost.shape)


def check_tensor_device(device, backend, method) -> None:
    """A tensor's device against ``backend`` and ``method``: no silent copy between host and device."""
    on_gpu = device.type == "cuda"
    if on_gpu and backend == "cpu":
        raise ValueError(
            f"backend='cpu' but cost is on {device}: move it yourself with cost.cpu() "
            f"(loom_kernels never copies between device and host silently)"
        )
    if not on_gpu and backend == "cuda":
        raise ValueError(
            f"backend='cuda' but cost is on {device}: move it with cost.cuda() first "
            f"(loom_kernels never copies between host and device silently)"
        )
    if on_gpu and method == "lap":
        raise ValueError(
            f"method='lap' (exact Jonker-Volgenant) runs on the CPU but cost is on {device}: "
            f"use method='auto'/'auction' on the GPU, or pass cost.cpu()"
        )
