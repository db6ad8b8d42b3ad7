"""The streamed pass over a whole data set: ``argmin_j c(z_i, x_j) - g_j`` for a batch of noise rows.

This is the assignment step of semidiscrete OT (a noise row goes to the Laguerre cell it falls in) and
of nearest-neighbour couplings: O(b N D) arithmetic, no ``(b, N)`` matrix. CUDA runs the Triton kernel
of ``_kernels.py`` (the tile in registers), the CPU the torch tiles of ``_tiles.py`` (one tile of
``sinkhorn._tiles.TILE_ELEMENTS`` scores alive at a time). ``streamed_argmin`` is the one dispatch
point: a fused C++ CPU kernel plugs in beside ``_tiles.stream_max`` with the same arguments.

With ``epsilon > 0`` the index is a draw from ``softmax(-(c_ij - g_j) / epsilon)`` over j (Gumbel-max
with the counter hash of ``sinkhorn.draw_pairs``: the same seed draws the same indices on every device
and tiling, and on a shard of the data set given its ``offset``).

    >>> from loom_kernels.streamed import streamed_argmin
    >>> value, index = streamed_argmin(torch.randn(256, 784), data, g)   # data (N, 784): tensor or memmap
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .._triton import use_kernel
from ..sinkhorn import _cpu
from ..sinkhorn._cpu import argmax, available, disabled, lse
from ..sinkhorn._tiles import row_keys
from . import _tiles

# lse / argmax / available / disabled: the fused C++ CPU tile kernel (csrc/cpu/stream_cpu.cpp) that serves
# Sinkhorn's passes, draw_pairs and, below, the CPU float32 pass; ``disabled()`` routes all of them back
# to the torch tiles (the reference in the tests).
__all__ = ["STREAM_METRICS", "streamed_argmin", "lse", "argmax", "available", "disabled"]

STREAM_METRICS = ("sqeuclidean", "inner")  # c = |z - x|^2, or c = -<z, x>


class Pass:
    """One streamed problem, checked: scores ``scale <z, x_j> + u_j`` (+ aux dot, labels, Gumbel)."""

    def __init__(self, z, x, u, scale, aux, labels, eps, keys, offset):
        self.z, self.x, self.u, self.scale, self.eps, self.keys, self.offset = z, x, u, scale, eps, keys, offset
        self.n = x.shape[0]
        self.a, self.c, self.cscale = (None, None, 0.0) if aux is None else aux
        self.row_labels, self.col_labels = (None, None) if labels is None else labels


def _check_float(name, v, lo_ok):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or not lo_ok(v):
        raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    return float(v)


def _check(z, x, g, metric, x_sqnorm):
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"z must be a floating torch.Tensor of shape (b, D), got {getattr(z, 'shape', type(z))}")
    if not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim < 2:
        raise ValueError(f"x must be a tensor or numpy array of shape (N, D), got {getattr(x, 'shape', type(x))}")
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    if d != z.shape[1]:
        raise ValueError(f"x must have D = {z.shape[1]} features per row to match z, got {tuple(x.shape)}")
    if metric not in STREAM_METRICS:
        raise ValueError(f"metric must be one of {STREAM_METRICS}, got {metric!r}")
    if g is not None and (not isinstance(g, torch.Tensor) or g.shape != (n,)):
        raise ValueError(f"g must be a tensor of shape (N,) = ({n},), got {getattr(g, 'shape', type(g))}")
    if x_sqnorm is not None and (not isinstance(x_sqnorm, torch.Tensor) or x_sqnorm.shape != (n,)):
        raise ValueError(f"x_sqnorm must be a tensor of shape (N,) = ({n},), got {getattr(x_sqnorm, 'shape', None)}")
    return n, d


def sq_norms(x, device, dtype=torch.float32, tile: int | None = None) -> torch.Tensor:
    """``|x_j|^2`` ``(N,)`` of a data set (tensor or memmap), read in row blocks (no copy of the whole)."""
    n = x.shape[0]
    d = max(1, int(np.prod(x.shape[1:])))
    step = max(1, (tile or _tiles.TILE_ELEMENTS) // d)
    out = torch.empty(n, device=device, dtype=dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        out[lo:hi] = _tiles.rows_of(x, lo, hi, device, dtype).square().sum(1)
    return out


def streamed_argmin(
    z: torch.Tensor,
    x,
    g: torch.Tensor | None = None,
    *,
    metric: str = "sqeuclidean",
    epsilon: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    x_sqnorm: torch.Tensor | None = None,
    aux: tuple | None = None,
    labels: tuple | None = None,
    tile: int | None = None,
    allow_tf32: bool = False,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value (b,), index (b,) int64)``: for each noise row, the data item minimising ``c(z_i, x_j) - g_j``.

    Args:
        z: ``(b, D)`` noise rows (floating; float64 computes in float64 on the torch path).
        x: ``(N, *shape)`` data set with ``prod(shape) == D``: a tensor on z's device, or a numpy array /
            ``np.memmap`` (read tile by tile, never copied whole).
        g: ``(N,)`` potential (None: 0, plain nearest neighbour).
        metric: ``"sqeuclidean"`` (``|z - x|^2``) or ``"inner"`` (``-<z, x>``, maximum inner product).
        epsilon: 0 for the hard argmin; ``> 0`` draws j from ``softmax(-(c_ij - g_j) / epsilon)``.
        seed: 64-bit key of the Gumbel noise (a step counter; unused at epsilon 0).
        offset: the global number of ``x``'s first row (a shard of a larger data set; keys the noise).
        x_sqnorm: cached ``|x_j|^2`` ``(N,)`` (``sq_norms``), else computed in the pass's dtype.
        aux: ``(a (b, Da), c (N, Da), w)``: adds ``-w <a_i, c_j>`` to the cost (a condition's cross term;
            the caller folds its per-column part into ``g``).
        labels: ``(row (b,), col (N,))`` int64: only columns of the row's label are eligible (a row whose
            label no column has gets index 0 and value +inf).
        process_group: the data set is sharded over its ranks, ``x`` (with ``g``, ``aux``'s columns, the
            column labels) this rank's contiguous block starting at global row ``offset``; every rank passes the
            same ``z`` and gets the global result: one all-gather of each rank's ``(score, index, value)``, the
            best score wins (ties: the lowest rank, i.e. the lowest global index). Collective.

    Returns:
        ``value``: ``c(z_i, x_j) - g_j - w <a_i, c_j>`` at the chosen j (float, z's dtype on the torch
        path, float32 on CUDA); ``index``: j.
    """
    n, d = _check(z, x, g, metric, x_sqnorm)
    eps = _check_float("epsilon", epsilon, lambda v: v >= 0)
    b = z.shape[0]
    kernel = use_kernel(z.device) and isinstance(x, torch.Tensor)
    dt = torch.float32 if kernel or z.dtype != torch.float64 else torch.float64
    dev = z.device
    if b == 0 or n == 0:
        if n == 0 and b:
            raise ValueError("x must hold at least one row (N >= 1)")
        return z.new_zeros((0,), dtype=dt), torch.zeros((0,), dtype=torch.int64, device=dev)
    best, arg, value = _local(z, x, g, n, d, metric, eps, seed, offset, x_sqnorm, aux, labels, tile, allow_tf32, dt)
    if process_group is None or torch.distributed.get_world_size(process_group) == 1:
        return value, arg
    return _global(best, arg + offset, value, process_group)


def _global(best, arg, value, group):
    """The (value, global index) of the best score over the ranks' shards (one all-gather of 3 x b numbers)."""
    world = torch.distributed.get_world_size(group)
    packed = torch.stack([best.double(), arg.double(), value.double()])  # indices < 2**53: exact in float64
    parts = [torch.empty_like(packed) for _ in range(world)]
    torch.distributed.all_gather(parts, packed, group=group)
    allp = torch.stack(parts)  # (W, 3, b)
    r = allp[:, 0].argmax(0)  # first maximum: the lowest rank on a tie
    pick = allp.gather(0, r[None, None, :].expand(1, 3, -1))[0]
    return pick[2].to(value.dtype), pick[1].to(torch.int64)


def _local(z, x, g, n, d, metric, eps, seed, offset, x_sqnorm, aux, labels, tile, allow_tf32, dt):
    """(best score, local index, value) on this process's rows: the dispatch between the backends."""
    b, dev = z.shape[0], z.device
    kernel = use_kernel(dev) and isinstance(x, torch.Tensor)
    zc = z.to(dt)
    gg = torch.zeros(n, device=dev, dtype=dt) if g is None else g.to(device=dev, dtype=dt)
    if metric == "sqeuclidean":
        xx = sq_norms(x, dev, dt, tile) if x_sqnorm is None else x_sqnorm.to(device=dev, dtype=dt)
        u, scale = gg - xx, 2.0
    else:
        u, scale = gg, 1.0
    if aux is not None:
        a, c, w = aux
        aux = (a.to(device=dev, dtype=dt), c.to(device=dev, dtype=dt), float(w))
    if labels is not None:
        labels = (labels[0].to(device=dev, dtype=torch.int64), labels[1].to(device=dev, dtype=torch.int64))
    keys = row_keys(seed, 1, b, dev)[0] if eps > 0 else None
    if not kernel and _fused(x, dt, aux, labels, dev):
        # The fused C++ kernel: the same scores (divided by epsilon, plus the same Gumbel noise) in registers.
        t = eps if eps else 1.0
        kj = None if keys is None else _tiles.col_keys(offset, offset + n, dev)
        arg, best = _cpu.argmax(
            (zc * (scale / t))[None],
            x.reshape(n, d).to(torch.float32)[None],
            (u / t)[None],
            torch.ones(1),
            None if keys is None else keys[None],
            kj,
            with_values=True,
        )
        best, arg = best[0], arg[0]
    elif kernel:
        from . import _kernels

        xs = x.reshape(n, d).to(torch.float32).contiguous()
        kaux = None if aux is None else ((aux[0] * aux[2]).contiguous(), aux[1].contiguous())
        best, arg = _kernels.stream_max(
            (zc * scale).contiguous(),
            xs,
            u.contiguous(),
            kaux,
            labels,
            keys,
            1.0 / eps if eps else 1.0,
            offset,
            allow_tf32,
        )
    else:
        best, arg = _tiles.stream_max(Pass(zc, x, u, scale, aux, labels, eps, keys, offset), tile)
    # the value at the chosen column, from its b rows (the maximised score may carry Gumbel noise)
    xj = x.reshape(n, d)[arg].to(dt) if isinstance(x, torch.Tensor) else _gather(x, arg, dev, dt)
    cost = (zc - xj).square().sum(1) if metric == "sqeuclidean" else -(zc * xj).sum(1)
    value = cost - gg[arg]
    if aux is not None:
        value = value - aux[2] * (aux[0] * aux[1][arg]).sum(1)
    if labels is not None:
        value = torch.where(labels[0] == labels[1][arg], value, torch.full_like(value, float("inf")))
    return best, arg, value


def _fused(x, dt, aux, labels, dev) -> bool:
    """Whether the fused C++ CPU kernel serves this pass: float32 points resident in a tensor, no condition
    cross term or labels (those stay on the torch tiles)."""
    return (
        dt == torch.float32
        and isinstance(x, torch.Tensor)
        and aux is None
        and labels is None
        and (_cpu.available(dev, torch.float32))
    )


def _gather(x: np.ndarray, idx: torch.Tensor, device, dtype) -> torch.Tensor:
    rows = np.asarray(x[np.sort(idx.cpu().numpy())]).reshape(len(idx), -1)  # sorted: sequential reads
    order = torch.argsort(torch.argsort(idx.cpu()))
    return torch.from_numpy(rows)[order].to(device=device, dtype=dtype)
