"""The dispatch of ``assign`` and ``linear_sum_assignment``: the one caller of the native solvers
(CPU Jonker-Volgenant / auction, CUDA auction), and the solved batch turned into the public outputs."""

from __future__ import annotations

import numpy as np

from .. import _native
from .checks import (
    DEFAULT_TOL,
    check_options,
    check_rows,
    check_tensor_device,
    is_torch,
    numpy_cost,
    raise_for_status,
    torch_cost,
)

__all__ = ["solve", "solve_cpu", "solve_cuda"]


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


def solve(cost, maximize, backend, tol, method, threads, caller):
    threads = check_options(maximize, backend, tol, method, threads)
    maximize = bool(maximize)

    if is_torch(cost):
        import torch

        if not isinstance(cost, torch.Tensor):
            raise TypeError(f"cost must be an array-like or a torch.Tensor, got {type(cost).__name__}")
        t, prec = torch_cost(cost)
        on_gpu = t.device.type == "cuda"
        if backend == "cuda" and not _native.has_cuda_build():
            _native.cuda()  # raises the "built without CUDA" error
        check_tensor_device(t.device, backend, method)
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
        data, prec = numpy_cost(cost)
        lib, is_gpu, wrap = _NumpyOps, False, None

    tol = DEFAULT_TOL[prec] if tol is None else float(tol)
    batched = data.ndim == 3
    c3 = data if batched else data[None]
    B, N, M = c3.shape
    transposed = N > M
    if caller == "assign":
        check_rows(data.shape)
    K = min(N, M)
    if transposed:
        c3 = c3.transpose(-1, -2) if lib is _TorchOps else c3.transpose(0, 2, 1)

    if B == 0 or K == 0:
        col4row = _empty(lib, data, B, K)
    elif is_gpu:
        col4row, status = solve_cuda(c3.contiguous(), maximize, tol)
        raise_for_status(status.cpu().numpy(), batched, maximize)  # the one host sync
    else:
        col4row = solve_cpu(np.ascontiguousarray(c3), maximize, tol, method, threads, batched)
    return _Solution(col4row, transposed, batched, lib, wrap)


def _empty(lib, data, B, K):
    if lib is _TorchOps:
        import torch

        return torch.empty((B, K), dtype=torch.int64, device=data.device)
    return np.empty((B, K), dtype=np.int64)


def solve_cpu(c3, maximize, tol, method, threads, batched):
    """c3: [B, N, M] C-contiguous float32/float64, N <= M -> col4row int64 [B, N]."""
    mod = _native.cpu()
    if method in ("auto", "lap"):
        col4row, status = mod.solve_lap(c3, maximize, threads)
    else:
        col4row, status = mod.solve_auction(c3, maximize, tol, threads)
    raise_for_status(np.asarray(status), batched, maximize)
    return col4row


def solve_cuda(t, maximize, tol, *, mode=0, rounds=None):
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
