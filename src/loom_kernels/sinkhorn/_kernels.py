"""Triton kernels of the Sinkhorn solver and sampler: the cost is streamed, never stored.

``_sinkhorn_stream_kernel`` (one kernel, two reductions): each program owns BLOCK_N rows
``x_i`` and walks the columns in BLOCK_M tiles; a tile of logits ``u_j + scale <x_i, y_j>``
is formed in registers (``tl.dot`` over K-tiles of the points) and folded into a running max
and sum (the FlashAttention pattern: T. Dao et al., "FlashAttention", NeurIPS 2022).
Only the ``(B, n)`` result is written.
With ARGMAX, the same walk keeps a running argmax of the logits plus, when sampling, the
Gumbel noise ``_tiles.gumbel`` defines (Gumbel-max: a draw from the row's softmax). Reads per
pass: x once, y once per row block (n / BLOCK_N times, mostly from L2); the tile lives in
registers, so memory beyond the inputs is the ``(B, n)`` output.

The launchers (``lse``, ``argmax``) hold the policy: float32 contiguous operands (the solver
centres and converts once per solve), tile sizes, warps, the grid.
"""

from __future__ import annotations

import contextlib

import torch

from .._triton import check_launchable, interpreting, tl, triton

_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension, which indexes the problems

if triton is not None:

    @triton.jit
    def _sinkhorn_stream_kernel(
        X,  # [B, N, D] float32, unit feature stride
        Y,  # [B, M, D] float32, unit feature stride
        U,  # [B, M] float32: column terms (may be -inf)
        SCALE,  # [B] float32
        KI,  # [B, N] int64: row hash keys mix32(key_b ^ i) (read when GUMBEL)
        KJ,  # [M] int64: column hash keys mix32(j + golden) (read when GUMBEL)
        OUT,  # [B, N] float32 LSE_j(s_ij), or int64 argmax_j(s_ij [+ Gumbel]) when ARGMAX
        N,
        M,
        D,
        sxb,
        sxn,
        syb,
        sym,
        sub,
        skb,
        sob,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ONE_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        ARGMAX: tl.constexpr,
        GUMBEL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        # rows past N read row N-1 (never stored): every load of the column walk stays in bounds
        x_ptrs = X + b * sxb + tl.minimum(rn, N - 1)[:, None].to(tl.int64) * sxn + rk[None, :]
        x_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ONE_K:  # D fits one K-tile: the rows are loaded once, before the column walk
            x_tile = tl.load(x_ptrs, mask=rk[None, :] < D, other=0.0)
        scale = tl.load(SCALE + b)
        if GUMBEL:
            key_i = tl.load(KI + b * skb + rn, mask=n_ok, other=0)
            # lowbias32 (as _tiles.mix32) in int64 with 32-bit masks; int64 constants, since a bare
            # literal above 2**31 would be typed uint32
            mask32 = tl.full((), 0xFFFFFFFF, tl.int64)
            mul1 = tl.full((), 0x7FEB352D, tl.int64)
            mul2 = tl.full((), 0x846CA68B, tl.int64)
        run_max = tl.full((BLOCK_N,), -float("inf"), tl.float32)  # LSE: running max; ARGMAX: best
        run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
        for j0 in range(0, M, BLOCK_M):
            rm = j0 + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            # ---- the logit tile u_j + scale <x_i, y_j>, in registers --------------------------
            y_ptrs = Y + b * syb + rm[:, None].to(tl.int64) * sym + rk[None, :]
            if ONE_K:
                yt = tl.load(y_ptrs, mask=m_ok[:, None] & (rk[None, :] < D), other=0.0)
                dot = tl.dot(x_tile, tl.trans(yt), input_precision=INPUT_PRECISION)
            else:
                dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    k_ok = (k0 + rk)[None, :] < D
                    xt = tl.load(x_ptrs + k0, mask=k_ok, other=0.0)
                    yt = tl.load(y_ptrs + k0, mask=m_ok[:, None] & k_ok, other=0.0)
                    dot = tl.dot(xt, tl.trans(yt), dot, input_precision=INPUT_PRECISION)
            u = tl.load(U + b * sub + rm, mask=m_ok, other=-float("inf"))
            s = dot * scale + u[None, :]
            # ---- fold it into the running reduction -------------------------------------------
            if ARGMAX:
                if GUMBEL:
                    h = key_i[:, None] ^ tl.load(KJ + rm, mask=m_ok, other=0)[None, :]
                    h = h ^ (h >> 16)
                    h = (h * mul1) & mask32
                    h = h ^ (h >> 15)
                    h = (h * mul2) & mask32
                    h = h ^ (h >> 16)
                    unif = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                    s = s - tl.log(-tl.log(unif))
                s = tl.where(m_ok[None, :], s, -float("inf"))
                val = tl.max(s, axis=1)
                j = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + j0
                take = val > run_max  # ties keep the earlier tile's column, as the torch path
                arg = tl.where(take, j, arg)
                run_max = tl.where(take, val, run_max)
            else:
                new_max = tl.maximum(run_max, tl.max(s, axis=1))
                safe = tl.where(new_max == -float("inf"), 0.0, new_max)  # all -inf so far: no inf - inf
                run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
                run_max = new_max
        if ARGMAX:
            tl.store(OUT + b * sob + rn, arg, mask=n_ok)
        else:
            tl.store(OUT + b * sob + rn, run_max + tl.log(run_sum), mask=n_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_config(n: int, m: int, d: int, interpret: bool, aligned: bool = True):
    """(BLOCK_N, BLOCK_M, BLOCK_K, ONE_K, num_warps, num_stages): the one tile policy.

    IEEE float32 ``tl.dot`` runs on FMA units: 64x64 logit tiles at 8 warps. D <= 64 is one
    K-tile and the row block stays in registers for the whole column walk; larger D loops over
    K-tiles of 32 (64 spilled on sm_80). Rows that are not 16-aligned (D % 16 != 0) take one
    stage (two spilled at D = 100). triton 3.9's ptxas, sm_80/sm_90, no spills: checked by
    python_tests/test_gpu_compile.py. 16 is tl.dot's minimum.
    """
    bk = max(16, _next_pow2(d)) if d <= 64 else 32  # D <= 64: one K-tile, the rows kept in registers
    bn = max(16, min(64, _next_pow2(n)))
    bm = max(16, min(128 if interpret else 64, _next_pow2(m)))
    return bn, bm, bk, d <= bk, 8, (2 if aligned else 1)


def _check(x, y, u, scale):
    check_launchable("sinkhorn", x.device, "pass CPU tensors")
    for name, t in (("x", x), ("y", y), ("u", u), ("scale", scale)):
        if t.dtype != torch.float32 or (t.ndim == 3 and t.stride(2) != 1):
            raise ValueError(f"{name}: the sinkhorn kernels take float32 with unit feature stride")


def _grid_launch(x, y, u, scale, ki, kj, out, allow_tf32, argmax, gumbel):
    B, N, D = x.shape
    M = y.shape[1]
    if out.numel() == 0 or M == 0:
        return out
    aligned = all(t.stride(1) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x, y))
    bn, bm, bk, one_k, warps, stages = block_config(N, M, D, interpreting(), aligned)
    precision = "tf32" if allow_tf32 else "ieee"
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        for b0 in range(0, B, _MAX_GRID_Y):
            sl = slice(b0, b0 + _MAX_GRID_Y)
            xb, yb, ub, kb, ob = x[sl], y[sl], u[sl], ki[sl], out[sl]
            grid = (triton.cdiv(N, bn), xb.shape[0])
            _sinkhorn_stream_kernel[grid](
                xb,
                yb,
                ub,
                scale[sl],
                kb,
                kj,
                ob,
                N,
                M,
                D,
                xb.stride(0),
                xb.stride(1),
                yb.stride(0),
                yb.stride(1),
                ub.stride(0),
                kb.stride(0),
                ob.stride(0),
                BLOCK_N=bn,
                BLOCK_M=bm,
                BLOCK_K=bk,
                ONE_K=one_k,
                INPUT_PRECISION=precision,
                ARGMAX=argmax,
                GUMBEL=gumbel,
                num_warps=warps,
                num_stages=stages,
            )
    return out


def lse(x, y, u, scale, allow_tf32: bool = False) -> torch.Tensor:
    """``LSE_j(u_j + scale_b <x_i, y_j>)`` float32 ``(B, n)``; x ``(B, n, D)``, y ``(B, m, D)``,
    u ``(B, m)``, scale ``(B,)``, all float32."""
    _check(x, y, u, scale)
    out = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    dummy = torch.zeros((x.shape[0], 1), device=x.device, dtype=torch.int64)  # never read
    return _grid_launch(x, y, u, scale, dummy, dummy[0], out, allow_tf32, False, False)


def argmax(x, y, u, scale, ki=None, kj=None, allow_tf32: bool = False) -> torch.Tensor:
    """int64 ``(B, n)``: argmax over j of the logits, plus the Gumbel noise of the row keys ``ki``
    ``(B, n)`` and column keys ``kj`` ``(m,)`` (``_tiles.gumbel_keys``), or none where they are None."""
    _check(x, y, u, scale)
    out = torch.empty(x.shape[:2], device=x.device, dtype=torch.int64)
    gumbel = ki is not None
    if not gumbel:
        ki = torch.zeros((x.shape[0], 1), device=x.device, dtype=torch.int64)
        kj = ki[0]
    return _grid_launch(x, y, u, scale, ki, kj, out, allow_tf32, True, gumbel)
