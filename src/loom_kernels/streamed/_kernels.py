"""Triton kernel of the streamed pass: max over the data set of ``scale <z_i, x_j> + u_j`` (+ terms).

``_streamed_max_kernel``: each program owns BLOCK_N noise rows and one contiguous chunk of the data
set's columns (the grid's second axis splits the N columns, since a batch of 256 rows alone would fill
only a few programs); it walks its chunk in BLOCK_M tiles, forms each tile of scores in registers
(``tl.dot`` over K-tiles, as ``sinkhorn._kernels``), adds the condition's dot, masks other labels,
adds the counter-hash Gumbel noise of ``sinkhorn._tiles.gumbel`` (column keys computed in place from
the global column number), and keeps a running (max, argmax). Each program writes its chunk's
``(S, b)`` partial result; the launcher reduces over the S chunks (ties to the lowest column).
Memory beyond the inputs: ``2 * S * b`` numbers.
"""

from __future__ import annotations

import contextlib

import torch

from .._triton import check_launchable, interpreting, tl, triton

if triton is not None:

    @triton.jit
    def _streamed_max_kernel(
        Z,  # [b, D] float32, pre-scaled by `scale`, unit feature stride
        X,  # [N, D] float32, unit feature stride
        U,  # [N] float32: the column terms (-inf: never chosen)
        A,  # [b, Da] float32 pre-scaled condition rows (read when HAS_AUX)
        C,  # [N, Da] float32 condition columns (read when HAS_AUX)
        RL,  # [b] int64 row labels (read when HAS_LABELS)
        CL,  # [N] int64 column labels (read when HAS_LABELS)
        KI,  # [b] int64 row hash keys (read when GUMBEL)
        OUTV,  # [S, b] float32 partial maxima
        OUTI,  # [S, b] int64 their columns
        NB,
        N,
        D,
        DA,
        CHUNK,
        OFFSET,
        INV_EPS,
        sz,
        sx,
        sa,
        sc,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_A: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        HAS_AUX: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        GUMBEL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < NB
        rows = tl.minimum(rn, NB - 1).to(tl.int64)  # rows past b read row b-1 (never stored)
        z_ptrs = Z + rows[:, None] * sz + rk[None, :]
        if HAS_AUX:
            ra = tl.arange(0, BLOCK_A)
            a_tile = tl.load(A + rows[:, None] * sa + ra[None, :], mask=ra[None, :] < DA, other=0.0)
        if HAS_LABELS:
            r_lab = tl.load(RL + rows)
        if GUMBEL:
            key_i = tl.load(KI + rows)
            mask32 = tl.full((), 0xFFFFFFFF, tl.int64)
            mul1 = tl.full((), 0x7FEB352D, tl.int64)
            mul2 = tl.full((), 0x846CA68B, tl.int64)
            golden = tl.full((), 0x9E3779B9, tl.int64)
        best = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, N)
        for j0 in range(lo, hi, BLOCK_M):
            rm = j0 + tl.arange(0, BLOCK_M)
            m_ok = rm < hi
            cols = rm.to(tl.int64)
            x_ptrs = X + cols[:, None] * sx + rk[None, :]
            dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_ok = (k0 + rk)[None, :] < D
                zt = tl.load(z_ptrs + k0, mask=k_ok, other=0.0)
                xt = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok, other=0.0)
                dot = tl.dot(zt, tl.trans(xt), dot, input_precision=INPUT_PRECISION)
            if HAS_AUX:
                ct = tl.load(C + cols[:, None] * sc + ra[None, :], mask=m_ok[:, None] & (ra[None, :] < DA), other=0.0)
                dot = tl.dot(a_tile, tl.trans(ct), dot, input_precision="ieee")
            s = dot + tl.load(U + rm, mask=m_ok, other=-float("inf"))[None, :]
            if HAS_LABELS:
                c_lab = tl.load(CL + rm, mask=m_ok, other=-1)
                s = tl.where(r_lab[:, None] == c_lab[None, :], s, -float("inf"))
            if GUMBEL:
                kj = (rm.to(tl.int64) + OFFSET + golden) & mask32  # sinkhorn col_keys of the global column
                kj = kj ^ (kj >> 16)
                kj = (kj * mul1) & mask32
                kj = kj ^ (kj >> 15)
                kj = (kj * mul2) & mask32
                kj = kj ^ (kj >> 16)
                h = key_i[:, None] ^ kj[None, :]
                h = h ^ (h >> 16)
                h = (h * mul1) & mask32
                h = h ^ (h >> 15)
                h = (h * mul2) & mask32
                h = h ^ (h >> 16)
                unif = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                s = s * INV_EPS - tl.log(-tl.log(unif))
            s = tl.where(m_ok[None, :], s, -float("inf"))
            val = tl.max(s, axis=1)
            j = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + j0
            take = val > best  # strictly: a tie keeps the earlier tile's column
            arg = tl.where(take, j, arg)
            best = tl.where(take, val, best)
        tl.store(OUTV + split * NB + rn, best, mask=n_ok)
        tl.store(OUTI + split * NB + rn, arg, mask=n_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_config(b: int, n: int, d: int, interpret: bool):
    """(BLOCK_N, BLOCK_M, BLOCK_K, splits, num_warps): 64x64 score tiles, K-tiles of 32 (as the
    Sinkhorn kernel's, whose register budget python_tests/test_gpu_compile.py checks), and enough
    column chunks for ~4 programs per SM of a large GPU (132 SMs) whatever b is."""
    bn = max(16, min(64, _next_pow2(b)))
    bm = max(16, min(128 if interpret else 64, _next_pow2(n)))
    bk = max(16, min(32, _next_pow2(d)))
    row_blocks = -(-b // bn)
    splits = 1 if interpret else max(1, min(-(-n // (4 * bm)), -(-528 // row_blocks)))
    return bn, bm, bk, splits, 8


def stream_max(z, x, u, aux, labels, keys, inv_eps, offset, allow_tf32=False):
    """``(best (b,), arg (b,))`` as ``_tiles.stream_max``; ``z`` pre-scaled float32 ``(b, D)``, ``x`` ``(N, D)``
    float32 on the same device, ``aux``: ``(a pre-scaled (b, Da), c (N, Da))`` or None, ``labels``: ``(row, col)``
    or None, ``keys``: ``(b,)`` row keys or None."""
    check_launchable("streamed argmin", z.device, "pass CPU tensors")
    b, d = z.shape
    n = x.shape[0]
    bn, bm, bk, splits, warps = block_config(b, n, d, interpreting())
    chunk = -(-n // splits)
    chunk = -(-chunk // bm) * bm
    splits = -(-n // chunk)
    outv = torch.empty((splits, b), device=z.device, dtype=torch.float32)
    outi = torch.empty((splits, b), device=z.device, dtype=torch.int64)
    dummy_f = torch.zeros((1, 1), device=z.device, dtype=torch.float32)
    dummy_i = torch.zeros((1,), device=z.device, dtype=torch.int64)
    a, c = aux if aux is not None else (dummy_f, dummy_f)
    rl, cl = labels if labels is not None else (dummy_i, dummy_i)
    ki = keys if keys is not None else dummy_i
    ba = max(16, _next_pow2(a.shape[1]))
    with torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext():
        _streamed_max_kernel[(triton.cdiv(b, bn), splits)](
            z, x, u, a, c, rl, cl, ki, outv, outi,
            b, n, d, a.shape[1], chunk, int(offset), float(inv_eps),
            z.stride(0), x.stride(0), a.stride(0), c.stride(0),
            BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_A=ba,
            INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
            HAS_AUX=aux is not None, HAS_LABELS=labels is not None, GUMBEL=keys is not None,
            num_warps=warps,
        )  # fmt: skip
    best, s = outv.max(0)  # max over splits: the first (lowest-column) split on a tie
    return best, outi.gather(0, s[None])[0]
