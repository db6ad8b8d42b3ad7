"""Triton kernels of the Sinkhorn solver and sampler: the cost is streamed, never stored.

``_sinkhorn_lse_kernel``: each program owns BLOCK_N rows ``x_i`` and walks the columns in
BLOCK_M tiles; a tile of logits ``u_j + scale <x_i, y_j>`` is formed in registers (``tl.dot``
over K-tiles of the points) and folded into a running max and sum (the FlashAttention pattern:
T. Dao et al., "FlashAttention", NeurIPS 2022). Only the ``(B, n)`` result is written.
``_sinkhorn_argmax_kernel``: the same walk with a running argmax of the logits plus, when
sampling, the Gumbel noise ``_tiles.gumbel_hash`` defines (Gumbel-max: a draw from the row's
softmax). Global memory traffic per pass: the points once per row block, O((n + m) D); the
tile lives in registers, so memory beyond the inputs is the ``(B, n)`` output.

The launchers (``lse``, ``argmax``) hold the policy: float32 contiguous operands (the solver
centres and converts once per solve), tile sizes, warps, the grid.
"""
from __future__ import annotations

import torch

from .._triton import check_launchable, interpreting, tl, triton

_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which indexes the problems

if triton is not None:

    @triton.jit
    def _mix32(x):
        # lowbias32 in int64 with explicit 32-bit masks: the very operations of _tiles.mix32
        # constants as int64 scalars: a bare literal above 2**31 would be typed uint32
        mask = tl.full((), 0xFFFFFFFF, tl.int64)
        x = x ^ (x >> 16)
        x = (x * tl.full((), 0x7FEB352D, tl.int64)) & mask
        x = x ^ (x >> 15)
        x = (x * tl.full((), 0x846CA68B, tl.int64)) & mask
        return x ^ (x >> 16)

    @triton.jit
    def _logit_tile(x_ptrs, Y, u_ptr, scale, rm, M, D, sym, x_tile, BLOCK_N: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
        """``u_j + scale <x_i, y_j>`` for BLOCK_N rows and the columns ``rm`` (-inf past M)."""
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        y_ptrs = Y + rm[:, None].to(tl.int64) * sym + rk[None, :]
        if ONE_K:  # D fits one K-tile: the rows were loaded once, before the column walk
            yt = tl.load(y_ptrs, mask=m_ok[:, None] & (rk[None, :] < D), other=0.0)
            dot = tl.dot(x_tile, tl.trans(yt), input_precision=INPUT_PRECISION)
        else:
            dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_ok = (k0 + rk)[None, :] < D
                xt = tl.load(x_ptrs + k0, mask=k_ok, other=0.0)
                yt = tl.load(y_ptrs + k0, mask=m_ok[:, None] & k_ok, other=0.0)
                dot = tl.dot(xt, tl.trans(yt), dot, input_precision=INPUT_PRECISION)
        u = tl.load(u_ptr + rm, mask=m_ok, other=-float("inf"))
        return dot * scale + u[None, :]

    @triton.jit
    def _sinkhorn_lse_kernel(
        X,  # [B, N, D] float32, unit feature stride
        Y,  # [B, M, D] float32, unit feature stride
        U,  # [B, M] float32: column terms (may be -inf)
        SCALE,  # [B] float32
        OUT,  # [B, N] float32: LSE_j(U_j + SCALE <x_i, y_j>)
        N, M, D,
        sxb, sxn, syb, sym, sub, sob,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        ONE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        # rows past N read row N-1 (never stored): every load in the column walk stays in bounds
        x_ptrs = X + b * sxb + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * sxn + rk[None, :]
        x_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ONE_K:
            x_tile = tl.load(x_ptrs, mask=rk[None, :] < D, other=0.0)
        scale = tl.load(SCALE + b)
        run_max = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j0 in range(0, M, BLOCK_M):
            rm = j0 + tl.arange(0, BLOCK_M)
            s = _logit_tile(x_ptrs, Y + b * syb, U + b * sub, scale, rm, M, D, sym, x_tile,
                            BLOCK_N, BLOCK_M, BLOCK_K, ONE_K, INPUT_PRECISION)
            new_max = tl.maximum(run_max, tl.max(s, axis=1))
            safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # all -inf so far: no inf - inf
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            run_max = new_max
        tl.store(OUT + b * sob + rn, run_max + tl.log(run_sum), mask=n_ok)

    @triton.jit
    def _sinkhorn_argmax_kernel(
        X,  # [B, N, D] float32, unit feature stride
        Y,  # [B, M, D] float32, unit feature stride
        U,  # [B, M] float32
        SCALE,  # [B] float32
        KEYS,  # [B] int64: per-problem 32-bit hash keys (_tiles.problem_keys)
        OUT,  # [B, N] int64: argmax_j(U_j + SCALE <x_i, y_j> [+ Gumbel(key, i, j)])
        N, M, D,
        sxb, sxn, syb, sym, sub, sob,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        ONE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUMBEL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        # rows past N read row N-1 (never stored): every load in the column walk stays in bounds
        x_ptrs = X + b * sxb + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * sxn + rk[None, :]
        x_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ONE_K:
            x_tile = tl.load(x_ptrs, mask=rk[None, :] < D, other=0.0)
        scale = tl.load(SCALE + b)
        key_i = _mix32(tl.load(KEYS + b) ^ rn.to(tl.int64))
        best = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
        for j0 in range(0, M, BLOCK_M):
            rm = j0 + tl.arange(0, BLOCK_M)
            s = _logit_tile(x_ptrs, Y + b * syb, U + b * sub, scale, rm, M, D, sym, x_tile,
                            BLOCK_N, BLOCK_M, BLOCK_K, ONE_K, INPUT_PRECISION)
            if GUMBEL:
                kj = _mix32((rm.to(tl.int64) + tl.full((), 0x9E3779B9, tl.int64)) & tl.full((), 0xFFFFFFFF, tl.int64))
                h = _mix32(key_i[:, None] ^ kj[None, :])
                unif = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                s = s - tl.log(-tl.log(unif))
            s = tl.where((rm < M)[None, :], s, -float("inf"))
            val = tl.max(s, axis=1)
            j = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + j0
            take = val > best  # ties keep the earlier tile's column, as the torch path
            arg = tl.where(take, j, arg)
            best = tl.where(take, val, best)
        tl.store(OUT + b * sob + rn, arg, mask=n_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_config(n: int, m: int, d: int, interpret: bool):
    """(BLOCK_N, BLOCK_M, BLOCK_K, ONE_K, num_warps, num_stages): the one tile policy.

    IEEE float32 ``tl.dot`` runs on FMA units: 64x64 logit tiles with K up to 64 keep the row
    block (64 x 64 floats when D <= 64, loaded once) and the tile in registers at 4 warps
    (python_tests/test_gpu_compile.py checks sm_80/sm_90 for spills). 16 is tl.dot's minimum.
    """
    bk = max(16, min(64, _next_pow2(d)))
    bn = max(16, min(64, _next_pow2(n)))
    bm = max(16, min(128 if interpret else 64, _next_pow2(m)))
    return bn, bm, bk, d <= bk, 4, 2


def _check(x, y, u, scale):
    check_launchable("sinkhorn", x.device, "pass CPU tensors")
    for name, t in (("x", x), ("y", y), ("u", u), ("scale", scale)):
        if t.dtype != torch.float32 or (t.ndim == 3 and t.stride(2) != 1):
            raise ValueError(f"{name}: the sinkhorn kernels take float32 with unit feature stride")


def _grid_launch(kernel, x, y, u, scale, out, extra, allow_tf32, **meta):
    B, N, D = x.shape
    M = y.shape[1]
    if out.numel() == 0 or M == 0:
        return out
    bn, bm, bk, one_k, warps, stages = block_config(N, M, D, interpreting())
    precision = "tf32" if allow_tf32 else "ieee"
    with torch.cuda.device(x.device) if x.device.type == "cuda" else _null():
        for b0 in range(0, B, _MAX_GRID_Y):
            sl = slice(b0, b0 + _MAX_GRID_Y)
            xb, yb, ub, ob = x[sl], y[sl], u[sl], out[sl]
            grid = (triton.cdiv(N, bn), xb.shape[0])
            kernel[grid](xb, yb, ub, scale[sl], *[e[sl] for e in extra], ob, N, M, D,
                         xb.stride(0), xb.stride(1), yb.stride(0), yb.stride(1), ub.stride(0), ob.stride(0),
                         BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, ONE_K=one_k, INPUT_PRECISION=precision,
                         num_warps=warps, num_stages=stages, **meta)
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def lse(x, y, u, scale, allow_tf32: bool = False) -> torch.Tensor:
    """``LSE_j(u_j + scale_b <x_i, y_j>)`` float32 ``(B, n)``; x ``(B, n, D)``, y ``(B, m, D)``,
    u ``(B, m)``, scale ``(B,)``, all float32."""
    _check(x, y, u, scale)
    out = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    return _grid_launch(_sinkhorn_lse_kernel, x, y, u, scale, out, (), allow_tf32)


def argmax(x, y, u, scale, keys, allow_tf32: bool = False) -> torch.Tensor:
    """int64 ``(B, n)``: argmax over j of the logits (plus Gumbel noise from ``keys`` ``(B,)``
    int64, or none where ``keys`` is None)."""
    _check(x, y, u, scale)
    out = torch.empty(x.shape[:2], device=x.device, dtype=torch.int64)
    gumbel = keys is not None
    k = keys if gumbel else torch.zeros(x.shape[0], device=x.device, dtype=torch.int64)
    return _grid_launch(_sinkhorn_argmax_kernel, x, y, u, scale, out, (k,), allow_tf32, GUMBEL=gumbel)
