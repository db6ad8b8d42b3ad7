"""Standard normal noise as a pure function of a 64-bit seed, the same on every device.

Philox4x32-10: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers:
as easy as 1, 2, 3", SC'11 (the counter-based generator of the Random123 library).
Box-Muller: G. E. P. Box, M. E. Muller, Ann. Math. Statist. 29 (1958) 610-611.

The stream (a persistence format: ``LoomCoupling`` stores seeds, not noise, so this definition
must never change). For a seed ``s`` and a row of ``n = prod(shape)`` elements:

1. key ``(k0, k1)``: the 64 bits of ``s`` as two's complement, ``k0`` = low 32 bits, ``k1`` =
   high 32 bits (so negative seeds are as good as any).
2. For each block ``j = 0, 1, ..., ceil(n / 4) - 1``: counter ``(j, 0, 0, 0)`` and
   ``(x0, x1, x2, x3) = Philox4x32-10(counter, key)`` (Random123's round function and key
   schedule, multipliers 0xD2511F53 / 0xCD9E8D57, Weyl increments 0x9E3779B9 / 0xBB67AE85;
   checked against Random123's known-answer vectors in the tests).
3. Uniforms in (0, 1], exact in float32 (never 0, so the logarithm is finite):
   ``u(x) = ((x >> 8) + 1) * 2**-24``.
4. Box-Muller in float32, ``2pi`` rounded to float32:
   ``r0 = sqrt(-2 ln u(x0))``, ``t0 = 2pi * u(x1)``: element ``4j`` = ``r0 cos t0``, ``4j+1`` = ``r0 sin t0``;
   ``r1 = sqrt(-2 ln u(x2))``, ``t1 = 2pi * u(x3)``: element ``4j+2`` = ``r1 cos t1``, ``4j+3`` = ``r1 sin t1``.
   Elements past ``n`` in the last block are dropped; the row is reshaped to ``shape`` (C order).

CUDA runs one Triton kernel (``_gaussian_noise_kernel``) for the whole batch, with the rounds
written out in uint32 (``tl.umulhi`` for the high half of the products); the CPU runs the same
rounds in ``loom_kernels._C`` (csrc/cpu/philox_cpu.cpp: SIMD, threaded over rows), or with
numpy's exact unsigned arithmetic where the compiled module is not built. The integers are
bit-identical on every device and library version; the floats differ only by the last-ulp
rounding of log/sqrt/sin/cos between the math libraries (< 1e-5). The
value of row i depends on ``seeds[i]`` and ``shape`` only: not on the batch, the position or
the dtype requested (float32 is computed, then cast).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from . import _native
from ._triton import check_launchable, interpreting, tl, triton, use_kernel

__all__ = ["gaussian_noise", "gaussian_noise_op", "custom_op"]

# Philox4x32 constants (Salmon et al. 2011, Random123 philox.h).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_TWO_PI_F32 = float(np.float32(2.0 * math.pi))
_MAX_ELEMENTS = 4 * 2**32  # the block counter j is one 32-bit word
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- Triton kernel: math only -------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gaussian_noise_kernel(
        SEEDS,  # [S] int64
        OUT,  # [S, n] float (NORMAL) or [S, n] int64 holding uint32 values (raw stream)
        n,  # elements per row
        blocks_per_program_row,  # programs per row
        BLOCK: tl.constexpr,  # Philox counters per program
        RAW: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row = pid // blocks_per_program_row
        chunk = pid - row * blocks_per_program_row
        seed = tl.load(SEEDS + row).to(tl.uint64, bitcast=True)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
        j = chunk * BLOCK + tl.arange(0, BLOCK)
        c0 = j.to(tl.uint32)
        c1 = tl.zeros((BLOCK,), dtype=tl.uint32)
        c2 = tl.zeros((BLOCK,), dtype=tl.uint32)
        c3 = tl.zeros((BLOCK,), dtype=tl.uint32)
        m0 = tl.full((BLOCK,), 0xD2511F53, dtype=tl.uint32)
        m1 = tl.full((BLOCK,), 0xCD9E8D57, dtype=tl.uint32)
        for r in tl.static_range(10):
            if r > 0:
                k0 = k0 + 0x9E3779B9  # uint32 arithmetic wraps, as the key schedule wants
                k1 = k1 + 0xBB67AE85
            hi0 = tl.umulhi(c0, m0)
            lo0 = c0 * m0
            hi1 = tl.umulhi(c2, m1)
            lo1 = c2 * m1
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0

        if RAW:
            v0, v1, v2, v3 = c0.to(tl.int64), c1.to(tl.int64), c2.to(tl.int64), c3.to(tl.int64)
        else:
            scale = 1.0 / 16777216.0
            u0 = ((c0 >> 8) + 1).to(tl.float32) * scale
            u1 = ((c1 >> 8) + 1).to(tl.float32) * scale
            u2 = ((c2 >> 8) + 1).to(tl.float32) * scale
            u3 = ((c3 >> 8) + 1).to(tl.float32) * scale
            r0 = tl.sqrt(-2.0 * tl.log(u0))
            r1 = tl.sqrt(-2.0 * tl.log(u2))
            t0 = u1 * 6.2831854820251465  # float32(2 pi), exactly
            t1 = u3 * 6.2831854820251465
            ty = OUT.dtype.element_ty
            v0, v1 = (r0 * tl.cos(t0)).to(ty), (r0 * tl.sin(t0)).to(ty)
            v2, v3 = (r1 * tl.cos(t1)).to(ty), (r1 * tl.sin(t1)).to(ty)
        # Element 4j + lane in stream order, so the store is one contiguous run per program
        # (join(join(v0, v2), join(v1, v3))[j, p, q] is lane 2p + q) instead of four strided ones.
        vals = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (4 * BLOCK,))
        e = chunk.to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
        tl.store(OUT + row.to(tl.int64) * n + e, vals, mask=e < n)


# ---- launcher -----------------------------------------------------------------------------------


def _block_config(num_blocks: int, interpret: bool):
    """The one launch policy: (Philox counters per program, num_warps).

    512 counters (2048 outputs) per program keeps 16 outputs per thread at 4 warps: enough
    independent work to hide the multiply latency, few enough programs to launch cheaply.
    """
    block = 1024 if interpret else 512
    block = max(16, min(block, 1 << max(0, (int(num_blocks) - 1).bit_length())))
    return block, 4


def _launch(seeds: torch.Tensor, n: int, out: torch.Tensor, raw: bool) -> torch.Tensor:
    """One launch of ``_gaussian_noise_kernel``: ``out`` (S, n) gets the stream of every seed."""
    check_launchable("gaussian_noise", out.device, "ask for device='cpu'")
    interpret = interpreting()
    S = seeds.numel()
    num_blocks = -(-n // 4)
    if S == 0 or n == 0:
        return out
    block, warps = _block_config(num_blocks, interpret)
    per_row = -(-num_blocks // block)
    # Launch on the output's GPU, not whichever is current.
    with torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext():
        _gaussian_noise_kernel[(S * per_row,)](seeds, out, n, per_row, BLOCK=block, RAW=raw, num_warps=warps)
    return out


# ---- CPU path: the compiled stream (loom_kernels._C), numpy where it is not built -----------------


def _compiled_cpu():
    """``loom_kernels._C`` when it is built with the noise stream, else None (the numpy path below:
    the same integers, floats within 1e-5, ~30x slower)."""
    try:
        mod = _native.cpu()
    except ImportError:
        return None
    return mod if hasattr(mod, "philox_normal") else None


def _stream_cpu(seeds: torch.Tensor, n: int, normals: bool) -> np.ndarray:
    """The stream of every seed on the CPU: [S, n] float32 normals or uint32 words."""
    s = np.ascontiguousarray(seeds.cpu().numpy(), dtype=np.int64)
    mod = _compiled_cpu()
    if mod is not None:
        fn = mod.philox_normal if normals else mod.philox_uint32
        return fn(s, n, torch.get_num_threads())  # torch's thread budget, which users set
    return _stream_numpy(s, -(-n // 4), normals)[:, :n]


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy arrays of uint32 values (any broadcastable shapes) -> 4 uint32 arrays.

    The 32x32-bit products are formed in uint64, where they are exact (< 2**64) and well
    defined: no signed overflow, no emulation of the high half. The state is updated in place
    in uint32 buffers, so each round is ~10 passes over 4-byte words.
    """
    shape = np.broadcast_shapes(*(np.shape(v) for v in (c0, c1, c2, c3, k0, k1)))
    c0, c1, c2, c3 = (
        np.array(np.broadcast_to(np.asarray(v, np.uint64), shape), dtype=np.uint32) for v in (c0, c1, c2, c3)
    )
    k0 = np.array(k0, dtype=np.uint64).astype(np.uint32)
    k1 = np.array(k1, dtype=np.uint64).astype(np.uint32)
    p0 = np.empty(shape, np.uint64)
    p1 = np.empty(shape, np.uint64)
    m0, m1, s32 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(32)
    with np.errstate(over="ignore"):  # the key schedule wraps modulo 2**32 by definition
        for r in range(PHILOX_ROUNDS):
            if r:
                k0 += np.uint32(PHILOX_W0)
                k1 += np.uint32(PHILOX_W1)
            np.multiply(c0, m0, out=p0, dtype=np.uint64)
            np.multiply(c2, m1, out=p1, dtype=np.uint64)
            # c2's buffer takes the new c0 = hi(M1 c2) ^ c1 ^ k0, c0's the new c2 = hi(M0 c0) ^ c3 ^ k1
            np.right_shift(p1, s32, out=c2, casting="unsafe")
            c2 ^= c1
            c2 ^= k0
            np.right_shift(p0, s32, out=c0, casting="unsafe")
            c0 ^= c3
            c0 ^= k1
            np.copyto(c1, p1, casting="unsafe")  # lo(M1 c2): the cast keeps the low 32 bits
            np.copyto(c3, p0, casting="unsafe")  # lo(M0 c0)
            c0, c2 = c2, c0
    return c0, c1, c2, c3


_CHUNK_WORDS = 1 << 16  # Philox blocks per chunk: the working set stays in the L2 cache


def _stream_numpy(seeds: np.ndarray, num_blocks: int, normals: bool) -> np.ndarray:
    """The stream of every seed: [S, 4 * num_blocks] uint32 words, or float32 normals."""
    u = seeds.astype(np.int64).view(np.uint64)
    S = u.shape[0]
    out = np.empty((S, num_blocks, 4), np.float32 if normals else np.uint32)
    j = np.arange(num_blocks, dtype=np.uint64)[None, :]
    rows = max(1, _CHUNK_WORDS // max(1, num_blocks))
    for r0 in range(0, S, rows):
        part = u[r0 : r0 + rows, None]
        words = _philox4x32_10(j, 0, 0, 0, part & np.uint64(0xFFFFFFFF), part >> np.uint64(32))
        dst = out[r0 : r0 + rows]
        if not normals:
            for lane in range(4):
                dst[..., lane] = words[lane]
            continue
        uni = [((w >> np.uint32(8)) + np.uint32(1)).astype(np.float32) * np.float32(2.0**-24) for w in words]
        for a, b, lane in ((0, 1, 0), (2, 3, 2)):
            radius = np.sqrt(np.float32(-2.0) * np.log(uni[a]))
            theta = uni[b] * np.float32(_TWO_PI_F32)
            np.multiply(radius, np.cos(theta), out=dst[..., lane])
            np.multiply(radius, np.sin(theta), out=dst[..., lane + 1])
    return out.reshape(S, 4 * num_blocks)


# ---- validation ---------------------------------------------------------------------------------


def _as_seed_tensor(seeds) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        t = seeds
    else:
        arr = np.asarray(seeds)
        if arr.dtype == object or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(
                f"seeds must hold integers that fit in int64 (or uint64 bit patterns), got dtype {arr.dtype}"
            )
        if arr.dtype == np.uint64:  # keep the 64 bits: two's complement view
            arr = arr.view(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64, copy=False)))
    if t.dtype in (torch.bool,) or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"seeds must be an integer (int64) tensor, got {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"seeds must be 1-D (S,), got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def as_shape(shape) -> tuple:
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        if isinstance(shape, (str, bytes)):
            raise TypeError
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape


def prepare_seeds(seeds, shape, device):
    t = _as_seed_tensor(seeds)
    shape = as_shape(shape)
    if device is not None:
        device = torch.device(device)
    else:
        device = t.device if isinstance(seeds, torch.Tensor) else torch.device("cpu")
    n = math.prod(shape)
    if n > _MAX_ELEMENTS:
        raise ValueError(f"shape must have at most 4 * 2**32 elements per row, got {n}")
    return t, shape, n, device


def check_inputs(seeds, shape, device, dtype) -> tuple:
    """gaussian_noise's checks (its custom op's fake runs them too): ``(seeds (S,) int64, shape, n, device)``."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
    return prepare_seeds(seeds, shape, device)


# ---- public function ----------------------------------------------------------------------------


def gaussian_noise(
    seeds: Sequence[int] | np.ndarray | torch.Tensor,
    shape: int | Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise, row i a pure function of ``seeds[i]`` (Philox4x32-10 + Box-Muller).

    Args:
        seeds: ``(S,)`` int64: a list, numpy array or torch integer tensor; any 64-bit value
            (negative ones too) is a valid seed.
        shape: shape of one sample, e.g. ``(3, 32, 32)`` (an int is a 1-D shape).
        device: where the noise is made; ``None`` means the seeds' device for a tensor, else CPU.
        dtype: float32 (computed), float16, bfloat16 or float64 (cast from the float32 values).

    Returns:
        ``(S, *shape)`` tensor on ``device``. The same seed gives the same row on CPU and CUDA
        (integers bit-identical, floats to 1e-5), in any batch and position; the exact stream is
        defined in this module's docstring. CUDA: one Triton launch for the whole batch.

    Example:
        >>> x0 = gaussian_noise(torch.tensor([7, -3]), (3, 32, 32))     # (2, 3, 32, 32)
        >>> torch.equal(x0[1], gaussian_noise([-3], (3, 32, 32))[0])    # True
    """
    if torch.compiler.is_compiling():  # one graph node: the custom op (end of this module)
        return gaussian_noise_op(seeds, shape, device=device, dtype=dtype)
    t, shape, n, device = check_inputs(seeds, shape, device, dtype)
    return _gaussian_noise(t, shape, n, device, dtype)


def _gaussian_noise(t, shape, n, device, dtype):
    S = t.numel()
    if use_kernel(device):
        out = torch.empty((S, n), device=device, dtype=dtype)
        _launch(t.to(device).contiguous(), n, out, raw=False)
        return out.view(S, *shape)
    z = torch.from_numpy(_stream_cpu(t, n, normals=True))
    return z.to(dtype).reshape(S, *shape)


def _philox_uint32(seeds, n: int, *, device=None) -> torch.Tensor:
    """The raw stream: ``(S, n)`` int64 holding the uint32 words ``x0, x1, x2, x3`` of blocks 0, 1, ..."""
    t, _, n, device = prepare_seeds(seeds, (n,), device)
    S = t.numel()
    if use_kernel(device):
        out = torch.empty((S, n), device=device, dtype=torch.int64)
        return _launch(t.to(device).contiguous(), n, out, raw=True)
    return torch.from_numpy(_stream_cpu(t, n, normals=False).astype(np.int64))


# ---- the custom op loom_kernels::gaussian_noise (torch.compile; see loom_kernels.ops) ------------


def _impl(seeds, shape, device, dtype):
    return _gaussian_noise(*check_inputs(seeds, shape, device, dtype), dtype)


def _fake(seeds, shape, device, dtype):
    t, shape, _, device = check_inputs(seeds, shape, device, dtype)
    return torch.empty((t.shape[0], *shape), dtype=dtype, device=device)


custom_op = torch.library.custom_op(
    "loom_kernels::gaussian_noise",
    _impl,
    mutates_args=(),
    schema="(Tensor seeds, SymInt[] shape, Device? device, ScalarType dtype) -> Tensor",
)
custom_op.register_fake(_fake)


def gaussian_noise_op(seeds, shape, *, device=None, dtype=torch.float32):
    """:func:`gaussian_noise` as one graph node: the custom op ``loom_kernels::gaussian_noise`` (list seeds
    become a tensor)."""
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if device is not None:
        device = torch.device(device)
    check_inputs(seeds, shape, device, dtype)
    return custom_op(seeds, list(as_shape(shape)), device, dtype)
