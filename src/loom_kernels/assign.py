"""Dense linear assignment: a scipy-compatible ``linear_sum_assignment`` and the batched ``assign``.

This module is the only caller of the native solvers. It validates the arguments (shape, dtype,
device, options) once and dispatches in one place (:func:`_solve`); the numeric content (NaN,
-inf, infeasible +inf patterns) is checked by the native solvers inside the sweep they make over
the cost anyway, and reported here as the errors scipy raises.

``import loom_kernels.assign`` needs numpy only: torch is imported when a tensor is passed.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _native

if TYPE_CHECKING:  # torch stays optional: the hints name it without importing it
    import torch

    ArrayLike = np.ndarray | torch.Tensor | list

__all__ = ["linear_sum_assignment", "assign"]

_BACKENDS = ("auto", "cpu", "cuda")
_METHODS = ("auto", "lap", "auction")
# Default optimality tolerance (relative to the optimum) by input precision; integer and bool
# costs are solved exactly.
_DEFAULT_TOL = {"float64": 1e-9, "float32": 1e-6, "exact": 0.0}


def linear_sum_assignment(
    cost: ArrayLike,
    maximize: bool = False,
    *,
    backend: str = "auto",
    tol: float | None = None,
    method: str = "auto",
    threads: int | None = None,
) -> tuple[Any, Any]:
    """Solve the linear sum assignment problem, like ``scipy.optimize.linear_sum_assignment``.

    Args:
        cost: ``(N, M)`` one problem, or ``(B, N, M)`` a batch of independent problems; a numpy
            array (any real or bool dtype, any memory order), a list of lists, or a torch tensor
            on the CPU or a CUDA device. ``+inf`` marks a forbidden pair.
        maximize: maximize the total instead of minimizing it.
        backend: ``"auto"`` (CUDA tensors on their GPU, everything else on the CPU), ``"cpu"``
            or ``"cuda"``. Data is never copied between host and device behind your back.
        tol: optimality tolerance relative to the optimum, for the auction solvers; ``None``
            means 1e-9 for float64 input, 1e-6 for float32/float16/bfloat16 input and exact (0)
            for integer or bool input. The CPU ``"lap"`` method is exact and ignores it.
        method: ``"auto"`` (``"lap"`` on the CPU, the auction on CUDA), ``"lap"`` (exact
            Jonker-Volgenant shortest augmenting paths, CPU) or ``"auction"`` (epsilon-scaling
            auction, exact within ``tol``).
        threads: CPU worker threads across a batch; ``None`` uses every core.

    Returns:
        ``(row_ind, col_ind)``: int64 arrays of shape ``(K,)``, or ``(B, K)`` for a batch, with
        ``K = min(N, M)``; ``row_ind`` is sorted. numpy arrays for numpy/list input, torch
        tensors on the input's device for torch input.

    Raises:
        ValueError: wrong ndim, NaN or -inf entries (+inf too when maximizing), an infeasible
            problem (for a batch the message names the problem index), bad options.
        TypeError: non-numeric input (object, str, complex).

    Example:
        >>> import numpy as np
        >>> from loom_kernels.assign import linear_sum_assignment
        >>> rows, cols = linear_sum_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
        >>> rows.tolist(), cols.tolist()
        ([0, 1, 2], [1, 0, 2])
    """
    sol = _solve(cost, maximize, backend, tol, method, threads, "linear_sum_assignment")
    return sol.row_col()


def assign(
    cost: ArrayLike,
    *,
    backend: str = "auto",
    tol: float | None = None,
    method: str = "auto",
    maximize: bool = False,
    threads: int | None = None,
) -> np.ndarray | torch.Tensor:
    """The coupling's fast path: the column given to every row, for ``N <= M``.

    Args:
        cost: ``(N, M)`` or ``(B, N, M)`` with ``N <= M``; same input types and options as
            :func:`linear_sum_assignment` (``backend``, ``tol``, ``method``, ``maximize``,
            ``threads``).

    Returns:
        ``col_for_row`` int64 of shape ``(N,)`` or ``(B, N)``, a permutation when square;
        numpy for numpy/list input, a torch tensor on the input's device for torch input.

    Example:
        >>> import numpy as np
        >>> from loom_kernels.assign import assign
        >>> assign(np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])).tolist()
        [[1, 0], [0, 1]]
    """
    if _is_torch(cost):
        import torch

        if torch.compiler.is_compiling():  # one graph node (the custom op), see loom_kernels.ops
            from . import ops

            if ops.compiling():
                return ops.assign(cost, backend=backend, tol=tol, method=method, maximize=maximize, threads=threads)
    sol = _solve(cost, maximize, backend, tol, method, threads, "assign")
    return sol.col_for_row()


# ---- validation and dispatch -------------------------------------------------------------------


class _Solution:
    """A solved batch in the N <= M orientation, turned into the public outputs."""

    def __init__(self, col4row, transposed, batched, lib, wrap=None):
        self.col4row = col4row  # [B, N'] int64, N' = min(N, M)
        self.transposed = transposed  # the caller's problem was (M', N') with more rows than columns
        self.batched = batched
        self.lib = lib  # _NumpyOps or _TorchOps: how col4row is held
        self.wrap = wrap  # torch.from_numpy for CPU tensors solved through numpy, else None

    def col_for_row(self):
        out = self.col4row
        out = out if self.batched else out[0]
        return out if self.wrap is None else self.wrap(out)

    def row_col(self):
        rows, cols = self._row_col()
        return (rows, cols) if self.wrap is None else (self.wrap(rows), self.wrap(cols))

    def _row_col(self):
        lib, c4r = self.lib, self.col4row
        if not self.transposed and not self.batched and lib is _NumpyOps:  # the common case, kept lean
            return np.arange(c4r.shape[1], dtype=np.int64), c4r[0]
        if not self.transposed:
            rows = lib.arange_like(c4r)
            cols = c4r
        else:
            # c4r[b, j] is the row of original column j: sort the pairs by row, as scipy does.
            order = lib.argsort(c4r)
            rows = lib.take(c4r, order)
            cols = order
        if not self.batched:
            rows, cols = rows[0], cols[0]
        return rows, cols


class _NumpyOps:
    @staticmethod
    def arange_like(a):
        r = np.arange(a.shape[-1], dtype=np.int64)
        return r[None] if a.shape[0] == 1 else np.tile(r, (a.shape[0], 1))

    @staticmethod
    def argsort(a):
        return np.argsort(a, axis=-1, kind="stable").astype(np.int64, copy=False)

    @staticmethod
    def take(a, idx):
        return np.take_along_axis(a, idx, axis=-1)


class _TorchOps:
    @staticmethod
    def arange_like(a):
        import torch

        return torch.arange(a.shape[-1], dtype=torch.int64, device=a.device).expand(a.shape).contiguous()

    @staticmethod
    def argsort(a):
        import torch

        return torch.argsort(a, dim=-1, stable=True)

    @staticmethod
    def take(a, idx):
        import torch

        return torch.gather(a, -1, idx)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def check_options(maximize, backend, tol, method, threads):
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
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


def _numpy_cost(cost):
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


def _torch_cost(t):
    """torch input -> (float32/float64 tensor, precision class); the device is kept."""
    import torch

    if t.is_complex():
        raise TypeError(f"cost must hold real numbers (float, int or bool), got dtype {t.dtype}")
    check_shape(t.shape)
    t = t.detach()
    if t.dtype == torch.float64:
        return t, "float64"
    if t.dtype == torch.float32:
        return t, "float32"
    if t.is_floating_point():
        return t.to(torch.float32), "float32"
    return _exact_torch(t), "exact"


def _raise_for_status(status, batched, maximize):
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


def _solve(cost, maximize, backend, tol, method, threads, caller):
    threads = check_options(maximize, backend, tol, method, threads)
    maximize = bool(maximize)

    if _is_torch(cost):
        import torch

        if not isinstance(cost, torch.Tensor):
            raise TypeError(f"cost must be an array-like or a torch.Tensor, got {type(cost).__name__}")
        t, prec = _torch_cost(cost)
        on_gpu = t.device.type == "cuda"
        if backend == "cuda" and not _native.has_cuda_build():
            _native.cuda()  # raises the "built without CUDA" error
        if on_gpu and backend == "cpu":
            raise ValueError(
                f"backend='cpu' but cost is on {t.device}: move it yourself with cost.cpu() "
                f"(loom_kernels never copies between device and host silently)"
            )
        if not on_gpu and backend == "cuda":
            raise ValueError(
                f"backend='cuda' but cost is on {t.device}: move it with cost.cuda() first "
                f"(loom_kernels never copies between host and device silently)"
            )
        if on_gpu and method == "lap":
            raise ValueError(
                f"method='lap' (exact Jonker-Volgenant) runs on the CPU but cost is on {t.device}: "
                f"use method='auto'/'auction' on the GPU, or pass cost.cpu()"
            )
        if on_gpu:
            lib, data, is_gpu, wrap = _TorchOps, t, True, None
        else:
            # A CPU tensor is solved through its zero-copy numpy view; outputs go back to torch.
            lib, data, is_gpu, wrap = _NumpyOps, t.numpy(), False, torch.from_numpy
    else:
        if backend == "cuda":
            _native.cuda()  # raises the "built without CUDA" error on a CPU-only build
            raise ValueError(
                f"backend='cuda' needs a CUDA torch tensor, got a {type(cost).__name__} on the host: "
                f"pass torch.as_tensor(cost, device='cuda')"
            )
        data, prec = _numpy_cost(cost)
        lib, is_gpu, wrap = _NumpyOps, False, None

    tol = _DEFAULT_TOL[prec] if tol is None else float(tol)
    batched = data.ndim == 3
    c3 = data if batched else data[None]
    B, N, M = c3.shape
    transposed = N > M
    if transposed and caller == "assign":
        raise ValueError(
            f"assign needs N <= M (every row gets a column), got cost of shape {tuple(data.shape)}: "
            f"use linear_sum_assignment for more rows than columns"
        )
    K = min(N, M)
    if transposed:
        c3 = c3.transpose(-1, -2) if lib is _TorchOps else c3.transpose(0, 2, 1)

    if B == 0 or K == 0:
        col4row = _empty(lib, data, B, K)
    elif is_gpu:
        col4row, status = _solve_cuda(c3.contiguous(), maximize, tol)
        _raise_for_status(status.cpu().numpy(), batched, maximize)  # the one host sync
    else:
        col4row = _solve_cpu(np.ascontiguousarray(c3), maximize, tol, method, threads, batched)
    return _Solution(col4row, transposed, batched, lib, wrap)


def _empty(lib, data, B, K):
    if lib is _TorchOps:
        import torch

        return torch.empty((B, K), dtype=torch.int64, device=data.device)
    return np.empty((B, K), dtype=np.int64)


def _solve_cpu(c3, maximize, tol, method, threads, batched):
    """c3: [B, N, M] C-contiguous float32/float64, N <= M -> col4row int64 [B, N]."""
    mod = _native.cpu()
    if method in ("auto", "lap"):
        col4row, status = mod.solve_lap(c3, maximize, threads)
    else:
        col4row, status = mod.solve_auction(c3, maximize, tol, threads)
    _raise_for_status(np.asarray(status), batched, maximize)
    return col4row


def _solve_cuda(t, maximize, tol, *, mode=0, rounds=None):
    """t: [B, N, M] contiguous float32/float64 CUDA tensor, N <= M, B >= 1, N >= 1.

    Returns ``(col4row int64 [B, N], status int8 [B])`` on ``t.device`` (status codes as in
    csrc/common/status.h), launched on the current stream without synchronizing; the caller
    syncs once to raise errors. ``mode`` forces a kernel (0 auto = 1, one block per problem; 2 the
    same with its state in global memory; 3 the multi-block cooperative kernel) and ``rounds``
    (int64 [B] on t.device) receives the bidding rounds per problem: both for tests/benchmarks.
    """
    import torch

    mod = _native.cuda()  # raises the "built without CUDA" error on a CPU-only build
    B, N, M = (int(s) for s in t.shape)
    dev = t.device
    with torch.cuda.device(dev):
        idx = torch.cuda.current_device()
        col4row = torch.empty((B, N), dtype=torch.int64, device=dev)
        status = torch.empty((B,), dtype=torch.int8, device=dev)
        nbytes = int(mod.workspace_bytes(B, N, M, mode, idx))
        # Freed when this returns: the caching allocator hands the block out again only to
        # work queued after the kernel on this same stream.
        ws = torch.empty((max(nbytes, 1),), dtype=torch.uint8, device=dev)
        stream = torch.cuda.current_stream(dev).cuda_stream
        mod.solve_auction(
            t.data_ptr(),
            "float64" if t.dtype == torch.float64 else "float32",
            B,
            N,
            M,
            bool(maximize),
            float(tol),
            col4row.data_ptr(),
            status.data_ptr(),
            ws.data_ptr(),
            nbytes,
            0 if rounds is None else rounds.data_ptr(),
            stream,
            idx,
            int(mode),
        )
    return col4row, status
