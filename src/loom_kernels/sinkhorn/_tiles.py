"""The blocked torch path: every reduction over the (implicit) cost matrix, tile by tile.

Both geometries expose ``tile(u, scale, rows, cols)``, the tile ``u_j + s(i, j)`` of logits
whose row log-sum-exp / argmax the solver and the sampler need, and a row term ``r_i`` such that
``(g_j - C_ij) / eps = r_i + u_j + s(i, j)`` for the ``u`` the caller passes:

- points (squared Euclidean, Gram identity): ``s = (2 / eps) <x_i, y_j>``, ``u_j = (g_j - |y_j|^2) / eps``,
  ``r_i = -|x_i|^2 / eps``: one ``baddbmm`` per tile, the cost itself never formed;
- a given cost matrix: ``s = -C_ij / eps``, ``u_j = g_j / eps``, ``r_i = 0``.

Memory: one tile of at most ``TILE_ELEMENTS`` numbers (plus its row reductions) is alive at a
time, whatever n and m are; the running reductions are O(B * n). The Triton kernels of
``_kernels.py`` compute the same reductions on CUDA, with the tile in registers.

The Gumbel noise of the sampler is a counter-based hash of ``(seed, b, i, j)`` (``gumbel``),
written once here in int64 arithmetic and once in the Triton kernel with the same operations, so
both paths draw the same noise for the same seed.
"""

from __future__ import annotations

import torch

#: Numbers in one tile (4 MiB of float32): small enough for the CPU caches and the stated memory
#: bound, big enough that the Python loop over tiles costs little next to the arithmetic.
TILE_ELEMENTS = 1 << 20
_COLS = 1024  # columns per tile: rows of the tile stay contiguous and vectorise well

_M32 = 0xFFFFFFFF
_MIX1 = 0x7FEB352D  # lowbias32 (C. Wellons, "Hash function prospector"): a full-avalanche 32-bit mix
_MIX2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32) (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * _MIX1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX2) & _M32
    return x ^ (x >> 16)


def row_keys(seed: int, batch: int, n: int, device) -> torch.Tensor:
    """int64 ``(B, n)``: ``mix32(k_b ^ i)``, ``k_b`` a 32-bit key from the 64-bit seed and problem b."""
    s = int(seed) & ((1 << 64) - 1)
    b = torch.arange(batch, device=device, dtype=torch.int64)
    k = mix32(mix32(b ^ (s >> 32)) ^ (s & _M32))
    return mix32(k[:, None] ^ torch.arange(n, device=device, dtype=torch.int64)[None, :])


def col_keys(m: int, device) -> torch.Tensor:
    """int64 ``(m,)``: ``mix32((j + golden) mod 2**32)``."""
    return mix32((torch.arange(m, device=device, dtype=torch.int64) + _GOLDEN) & _M32)


def gumbel(ki: torch.Tensor, kj: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) float32 ``(B, bn, bm)`` from row keys ``(B, bn)`` and column keys ``(bm,)``:
    ``h = mix32(ki ^ kj)``, uniform ``((h >> 8) + 0.5) * 2**-24`` in (0, 1) (exact in float32),
    ``-log(-log(u))``. The Triton kernel runs the very same integer operations."""
    h = mix32(ki[:, :, None] ^ kj[None, None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    return -torch.log(-torch.log(u))


class PointTiles:
    """Logit tiles of the squared-Euclidean cost between centred points (never the cost itself)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y  # (B, n, D), (B, m, D), centred, compute dtype
        self.xx = (x * x).sum(-1)  # (B, n)
        self.yy = (y * y).sum(-1)  # (B, m)

    def transposed(self) -> PointTiles:
        return PointTiles(self.y, self.x)

    def terms(self, g: torch.Tensor, eps: torch.Tensor):
        """``(u, scale, r)`` for ``(g_j - C_ij) / eps = r_i + u_j + scale <x_i, y_j>``; ``eps`` ``(B, 1)``."""
        return (g - self.yy) / eps, (2.0 / eps)[:, 0], -self.xx / eps

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.y.shape[1]

    def tile(self, u, scale, bs, rs, cs) -> torch.Tensor:
        # scale folded into the (bn, D) operand, not the (bn, bm) tile: one pass less over the tile
        xs = self.x[bs, rs] * scale[bs, None, None]
        return torch.baddbmm(u[bs, None, cs], xs, self.y[bs, cs].transpose(1, 2))


class CostTiles:
    """Logit tiles of a given cost matrix ``(B, n, m)``."""

    def __init__(self, cost: torch.Tensor):
        self.cost = cost

    def transposed(self) -> CostTiles:
        return CostTiles(self.cost.transpose(1, 2))

    def terms(self, g, eps):
        return g / eps, (-1.0 / eps)[:, 0], torch.zeros_like(self.cost[:, :, 0], dtype=g.dtype)

    @property
    def shape(self):
        return tuple(self.cost.shape)

    def tile(self, u, scale, bs, rs, cs) -> torch.Tensor:
        return torch.addcmul(u[bs, None, cs], self.cost[bs, rs, cs], scale[bs, None, None])


def blocks(batch: int, n: int, m: int, tile: int | None = None):
    """Tile extents ``(bb, bn, bm)`` with ``bb * bn * bm <= tile`` (at least one row and column)."""
    tile = tile or TILE_ELEMENTS
    bm = max(1, min(m, _COLS, tile))
    bn = max(1, min(n, tile // bm))
    bb = max(1, min(batch, tile // (bn * bm)))
    return bb, bn, bm


def _spans(total: int, step: int):
    return [slice(s, min(s + step, total)) for s in range(0, total, step)]


def row_lse(geo, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LSE_j(u_j + s(i, j))`` ``(B, n)``: an online log-sum-exp over column tiles (FlashAttention's
    running max and sum), a tile freed before the next is formed."""
    B, n, m = geo.shape
    bb, bn, bm = blocks(B, n, m)
    out = torch.empty((B, n), dtype=u.dtype, device=u.device)
    for bs in _spans(B, bb):
        for rs in _spans(n, bn):
            run_max = run_sum = None
            for cs in _spans(m, bm):
                t = geo.tile(u, scale, bs, rs, cs)
                raw = t.amax(-1)
                empty = torch.isneginf(raw)  # an all -inf row of the tile: adds nothing, and no NaN
                mx = torch.where(empty, torch.zeros_like(raw), raw)
                # exp of arguments below -80 would produce float32 denormals, ~10x slower on x86; they
                # weigh < 2e-35 against the row's largest term (1), so they are raised to -80
                s = t.sub_(mx[..., None]).clamp_min_(-80.0).exp_().sum(-1)
                s = torch.where(empty, torch.zeros_like(s), s)
                del t
                if run_max is None:
                    run_max, run_sum = mx, s
                else:
                    new = torch.maximum(run_max, mx)
                    run_sum = run_sum * torch.exp(run_max - new) + s * torch.exp(mx - new)
                    run_max = new
            out[bs, rs] = run_max + torch.log(run_sum)
    return out


def row_argmax(geo, u: torch.Tensor, scale: torch.Tensor, ki=None, kj=None) -> torch.Tensor:
    """``argmax_j(u_j + s(i, j) + gumbel(ki, kj))`` int64 ``(B, n)`` (no noise where ``ki`` is None).
    Ties go to the lowest column, as in the Triton kernel."""
    B, n, m = geo.shape
    bb, bn, bm = blocks(B, n, m)
    out = torch.empty((B, n), dtype=torch.int64, device=u.device)
    for bs in _spans(B, bb):
        for rs in _spans(n, bn):
            best = arg = None
            for cs in _spans(m, bm):
                t = geo.tile(u, scale, bs, rs, cs).float()
                if ki is not None:
                    t += gumbel(ki[bs, rs], kj[cs])
                val, j = t.max(-1)
                j = j + cs.start
                if best is None:
                    best, arg = val, j
                else:  # strictly greater: an equal value in a later tile keeps the earlier column
                    take = val > best
                    best, arg = torch.where(take, val, best), torch.where(take, j, arg)
            out[bs, rs] = arg
    return out


def plan_moments(geo, f, g, eps):
    """One pass over the plan ``P_ij = exp((f_i + g_j - C_ij) / eps)``: its row sums ``(B, n)``,
    column sums ``(B, m)`` and ``sum_ij P_ij log P_ij`` ``(B,)``, in float64."""
    u, scale, r = geo.terms(g, eps)
    B, n = r.shape
    m = u.shape[1]
    lead = (f / eps + r).double()  # log P_ij = lead_i + tile_ij
    bb, bn, bm = blocks(B, n, m)
    rows = torch.zeros((B, n), dtype=torch.float64, device=f.device)
    cols = torch.zeros((B, m), dtype=torch.float64, device=f.device)
    plogp = torch.zeros((B,), dtype=torch.float64, device=f.device)
    for bs in _spans(B, bb):
        for rs in _spans(n, bn):
            for cs in _spans(m, bm):
                logp = geo.tile(u, scale, bs, rs, cs).double() + lead[bs, rs, None]
                p = torch.exp(logp)
                rows[bs, rs] += p.sum(-1)
                cols[bs, cs] += p.sum(-2)
                plogp[bs] += torch.where(p > 0, p * logp, torch.zeros_like(p)).sum((-1, -2))
    return rows, cols, plogp
