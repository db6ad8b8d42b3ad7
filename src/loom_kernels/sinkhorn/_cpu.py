"""The fused C++ tile kernel (csrc/cpu/stream_cpu.cpp) as the Sinkhorn CPU path: thin wrappers
over ``_C.stream_lse`` / ``_C.stream_argmax`` mirroring ``_kernels.lse`` / ``argmax`` (float32
CPU tensors), and the switch that sends the solver back to the torch tiles. The design is in
``loom_kernels.streamed``, which re-exports these for other callers."""

from __future__ import annotations

import contextlib

import torch

from .. import _native

_ENABLED = True


@contextlib.contextmanager
def disabled():
    """Within the block the Sinkhorn CPU path runs the torch tiles instead of the kernel."""
    global _ENABLED
    saved, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = saved


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the kernel serves float32 tensors on ``device`` (CPU, module built, not disabled)."""
    if not (_ENABLED and device.type == "cpu" and dtype == torch.float32):
        return False
    try:
        _native.cpu()
    except ImportError:
        return False
    return True


def _threads(threads):
    return torch.get_num_threads() if threads is None else int(threads)


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def _check_u(u):
    if bool(torch.isnan(u).any()):
        raise ValueError("u must not hold NaN (the column terms, e.g. potentials or log-weights)")


def lse(x, y, u, scale, threads: int | None = None) -> torch.Tensor:
    """``LSE_j(u_j + scale_b <x_i, y_j>)`` float32 ``(B, n)``; x ``(B, n, D)``, y ``(B, m, D)``,
    u ``(B, m)``, scale ``(B,)``, float32 CPU. ``threads``: None follows ``torch.get_num_threads()``."""
    _check_u(u)
    out = _native.cpu().stream_lse(_np(x), _np(y), _np(u), _np(scale), _threads(threads))
    return torch.from_numpy(out)


def argmax(x, y, u, scale, ki=None, kj=None, threads: int | None = None, with_values: bool = False):
    """int64 ``(B, n)``: argmax over j of the logits plus the Gumbel noise of the row keys ``ki``
    ``(B, n)`` and column keys ``kj`` ``(m,)`` (``_tiles.row_keys`` / ``col_keys``), none where
    they are None; ties go to the lowest column. ``with_values`` adds the maxima float32 ``(B, n)``."""
    _check_u(u)
    keys = (None, None) if ki is None else (_np(ki), _np(kj))
    idx, best = _native.cpu().stream_argmax(_np(x), _np(y), _np(u), _np(scale), *keys, _threads(threads))
    idx = torch.from_numpy(idx)
    return (idx, torch.from_numpy(best)) if with_values else idx
