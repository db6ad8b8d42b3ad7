"""The torch path of the streamed pass: column tiles of the data set, one at a time.

For each noise row ``z_i`` the pass maximises the score ``s_ij = scale <z_i, x_j> + u_j`` (plus the
condition's dot ``cscale <a_i, c_j>``, ``-inf`` across labels, ``/ eps + Gumbel`` when sampling) over
the data set in tiles of ``TILE_ELEMENTS`` scores: a tile is formed by one ``addmm``, reduced to a
running (max, argmax) and freed. Ties keep the lowest column, as the Triton kernel does. The Gumbel
noise is ``sinkhorn._tiles.gumbel`` of the row keys and the *global* column keys, so a shard of the
data set (``offset``) draws the same noise as the whole.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sinkhorn._tiles import _GOLDEN, _M32, TILE_ELEMENTS, gumbel, mix32


def col_keys(lo: int, hi: int, device) -> torch.Tensor:
    """``sinkhorn._tiles.col_keys`` for the global columns ``lo .. hi`` only."""
    return mix32((torch.arange(lo, hi, device=device, dtype=torch.int64) + _GOLDEN) & _M32)


def rows_of(x, lo: int, hi: int, device, dtype) -> torch.Tensor:
    """Rows ``lo .. hi`` of the data set (a tensor or a numpy array / memmap) as ``(m, D)`` ``dtype``."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x[lo:hi]))  # a copy of one tile (a memmap may be read-only)
    else:
        t = x[lo:hi]
    return t.reshape(hi - lo, -1).to(device=device, dtype=dtype)


def stream_max(p, tile: int | None = None):
    """``(best, arg)``: the max over j of the scores of ``p`` (a ``_pass.Pass``) and its column."""
    b, n = p.z.shape[0], p.n
    dt, dev = p.z.dtype, p.z.device
    cols = max(1, min(n, (tile or TILE_ELEMENTS) // max(b, 1)))
    best = torch.full((b,), -float("inf"), dtype=dt, device=dev)
    arg = torch.zeros((b,), dtype=torch.int64, device=dev)
    zs = p.z * p.scale
    for lo in range(0, n, cols):
        hi = min(n, lo + cols)
        xt = rows_of(p.x, lo, hi, dev, dt)
        s = torch.addmm(p.u[lo:hi][None, :], zs, xt.T)
        if p.a is not None:
            s.addmm_(p.a * p.cscale, p.c[lo:hi].to(dt).T)
        if p.row_labels is not None:
            s.masked_fill_(p.row_labels[:, None] != p.col_labels[None, lo:hi], -float("inf"))
        if p.keys is not None:
            s = s / p.eps + gumbel(p.keys[None], col_keys(p.offset + lo, p.offset + hi, dev))[0].to(dt)
        val, j = s.max(1)
        take = val > best  # strictly: a tie keeps the earlier tile's column
        best = torch.where(take, val, best)
        arg = torch.where(take, j + lo, arg)
    return best, arg
