"""Batched pairwise (squared) Euclidean cost between point sets, as ``torch.cdist`` shapes it.

Both paths use the Gram identity ``|x - y|^2 = |x|^2 + |y|^2 - 2 x.y`` (the formula cuBLAS-based
``cdist`` uses for large inputs), so the work is one matrix product and no ``(N, M, D)`` tensor
is ever formed:

- CUDA: one Triton kernel (``_pairwise_cost_kernel``) computes an output tile from K-tiles of
  ``x`` and ``y``: ``tl.dot`` for the product (tensor cores for 16-bit inputs; IEEE fp32 FMA for
  float32 unless ``allow_tf32``), the row norms accumulated from the same tiles while they are
  in registers, and the epilogue (clamp at 0, sqrt for ``"euclidean"``) before the single store.
- CPU: norms + ``addmm``/``baddbmm`` in float32 (float64 for float64 input), clamp, sqrt.

Accuracy: the identity cancels when ``|x - y|`` is much smaller than ``|x|`` and ``|y|``; the
absolute error is a few float32 ulps of ``|x|^2 + |y|^2`` (times the input rounding for 16-bit
inputs). This is what the coupling needs (costs are compared across pairs of similar norms).
Non-finite inputs give non-finite (NaN) costs in their rows/columns, which ``assign`` rejects.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton import check_launchable, interpreting, tl, triton, use_kernel

__all__ = ["pairwise_cost", "pairwise_cost_op", "custom_op"]

# The metric names every module accepts (couplings, trainer, compat): defined once, here.
METRICS = ("sqeuclidean", "euclidean")
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_GRID_Z = 65535  # CUDA's limit on the third grid dimension, which indexes the problems


# ---- Triton kernel: math only -------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _pairwise_cost_kernel(
        X,  # [B, N, D] float32/float16/bfloat16 (any strides)
        Y,  # [B, M, D] same dtype as X
        OUT,  # [B, N, M] float32
        N,
        M,
        D,
        sxb,
        sxn,
        sxd,
        syb,
        sym,
        syd,
        sob,
        son,
        som,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SQRT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        x_ptrs = X + b * sxb + rn[:, None].to(tl.int64) * sxn + rk[None, :] * sxd
        y_ptrs = Y + b * syb + rm[:, None].to(tl.int64) * sym + rk[None, :] * syd
        n_ok = rn[:, None] < N
        m_ok = rm[:, None] < M

        dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        yy = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = (k0 + rk)[None, :] < D
            # Masked lanes load 0: they add nothing to the product or to the norms.
            xt = tl.load(x_ptrs, mask=n_ok & k_ok, other=0.0)
            yt = tl.load(y_ptrs, mask=m_ok & k_ok, other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                yt = yt.to(tl.float32)
            dot = tl.dot(xt, tl.trans(yt), dot, input_precision=INPUT_PRECISION)
            xf = xt.to(tl.float32)
            yf = yt.to(tl.float32)
            xx += tl.sum(xf * xf, axis=1)
            yy += tl.sum(yf * yf, axis=1)
            x_ptrs += BLOCK_K * sxd
            y_ptrs += BLOCK_K * syd

        cost = xx[:, None] + yy[None, :] - 2.0 * dot
        # Rounding can make near-duplicates slightly negative. Not tl.maximum: it drops NaN,
        # and a NaN from a non-finite input must reach the caller (assign rejects it).
        cost = tl.where(cost < 0.0, 0.0, cost)
        if SQRT:
            cost = tl.sqrt(cost)
        o_ptrs = OUT + b * sob + rn[:, None].to(tl.int64) * son + rm[None, :] * som
        tl.store(o_ptrs, cost, mask=(rn[:, None] < N) & (rm[None, :] < M))


# ---- launcher: grid, block sizes, warps, dtype rules --------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _rows_aligned(t: torch.Tensor) -> bool:
    """True when Triton's JIT will see 16-aligned rows: a unit feature stride, the row and batch
    strides multiples of 16 elements and a 16-byte aligned start (what lets it vectorize loads)."""
    return t.stride(2) == 1 and t.stride(1) % 16 == 0 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def _block_config(n: int, m: int, d: int, dtype: torch.dtype, interpret: bool, aligned: bool = True):
    """The one block-size policy: (BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages).

    16-bit inputs take 128x128 tiles with K=64 (an H100 tensor-core shape with 3 stages in
    shared memory); IEEE fp32 runs on FMA units, where 64x64x16 tiles keep registers in bounds.
    Rows that are not 16-aligned (D not a multiple of 16, sliced or transposed inputs) are
    loaded element by element, which needs more registers: 16-bit inputs then take K=16, or the
    128x128x64 tile spills ~0.8 KB per thread (ptxas, sm_80/sm_90; K=32 sits at 255 registers),
    and float32 one stage (triton 3.9's ptxas spilled 16-24 B at two or three).
    python_tests/test_gpu_compile.py compiles these choices for sm_80/sm_90 and fails on spills.
    Small problems shrink the tile (16 is tl.dot's minimum) so fewer lanes are masked.
    The interpreter runs tiles as numpy arrays, so it gets big tiles (fewer programs).
    """
    if interpret:
        bn, bm, bk, warps, stages = 64, 64, 64, 4, 1
    elif dtype in (torch.float16, torch.bfloat16):
        bn, bm, bk, warps, stages = 128, 128, (64 if aligned else 16), 8, 3
    else:  # float32 at K=32 sat at 255 registers on sm_80; unaligned rows spilled at 2-3 stages
        bn, bm, bk, warps, stages = 64, 64, 16, 4, (3 if aligned else 1)
    bn = max(16, min(bn, _next_pow2(n)))
    bm = max(16, min(bm, _next_pow2(m)))
    bk = max(16, min(bk, _next_pow2(d)))
    return bn, bm, bk, warps, stages


def _launch(x: torch.Tensor, y: torch.Tensor, sqrt: bool, allow_tf32: bool) -> torch.Tensor:
    """Run ``_pairwise_cost_kernel`` on 3-D ``x`` (B, N, D) and ``y`` (B, M, D) -> (B, N, M) float32."""
    check_launchable("pairwise_cost", x.device, "pass CPU tensors")
    interpret = interpreting()
    # dtype rules: tl.dot wants both operands in one dtype; float64 has no fast tensor-core path.
    if x.dtype != y.dtype or x.dtype == torch.float64:
        x, y = x.float(), y.float()
    B, N, D = x.shape
    M = y.shape[1]
    out = torch.empty((B, N, M), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    aligned = _rows_aligned(x) and _rows_aligned(y)
    bn, bm, bk, warps, stages = _block_config(N, M, D, x.dtype, interpret, aligned)
    # "ieee" keeps float32 products exact (FMA units); 16-bit operands always take tensor cores,
    # and get the default setting, which only concerns float32.
    precision = "ieee" if (x.dtype == torch.float32 and not allow_tf32) else "tf32"
    # The interpreter's tl.dot multiplies bfloat16 bit patterns (triton issue #11584, "not
    # supported yet"): feed it the exact float32 values instead; products of bf16 are exact in fp32.
    upcast = interpret and x.dtype == torch.bfloat16
    # Launch on the inputs' GPU, not whichever is current; grid axis 2 holds at most 65535 problems.
    with _on_device(x.device):
        for b0 in range(0, B, _MAX_GRID_Z):
            xb, yb, ob = x[b0 : b0 + _MAX_GRID_Z], y[b0 : b0 + _MAX_GRID_Z], out[b0 : b0 + _MAX_GRID_Z]
            grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), xb.shape[0])
            _pairwise_cost_kernel[grid](
                xb,
                yb,
                ob,
                N,
                M,
                D,
                xb.stride(0),
                xb.stride(1),
                xb.stride(2),
                yb.stride(0),
                yb.stride(1),
                yb.stride(2),
                ob.stride(0),
                ob.stride(1),
                ob.stride(2),
                BLOCK_N=bn,
                BLOCK_M=bm,
                BLOCK_K=bk,
                SQRT=sqrt,
                INPUT_PRECISION=precision,
                UPCAST=upcast,
                num_warps=warps,
                num_stages=stages,
            )
    return out


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---- CPU path -----------------------------------------------------------------------------------


def sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x_i - y_j|^2`` by the Gram identity ``|x|^2 + |y|^2 - 2 x.y``, in the inputs' dtype.

    x ``(N, D)`` or ``(B, N, D)``, y ``(M, D)`` or ``(B, M, D)`` (same ndim) -> ``(N, M)`` or
    ``(B, N, M)``, clamped at 0 (cancellation can round a true 0 below it). The one torch copy
    of the identity: the CPU cost path, ``metrics.w2`` and the test problem factories call it.
    """
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    if x.ndim == 2:
        cost = torch.addmm(xx[:, None] + yy[None, :], x, y.T, alpha=-2.0)
    else:
        cost = torch.baddbmm(xx.unsqueeze(-1) + yy.unsqueeze(-2), x, y.transpose(-1, -2), alpha=-2.0)
    return cost.clamp_min_(0.0)


def _cost_torch(x: torch.Tensor, y: torch.Tensor, sqrt: bool) -> torch.Tensor:
    """Norms + ``baddbmm`` on 3-D inputs; float32 accumulation (float64 for float64 input)."""
    work = torch.float64 if (x.dtype == torch.float64 and y.dtype == torch.float64) else torch.float32
    cost = sq_dists(x.to(work), y.to(work))
    if sqrt:
        cost.sqrt_()
    return cost.to(torch.float32)


# ---- public function: validation and dispatch ---------------------------------------------------


def check_points(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D) or (B, N, D), got {type(t).__name__}")
    if t.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (N, D) or (B, N, D), got {tuple(t.shape)}")
    if t.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64), got {t.dtype}")


def check_inputs(x, y, metric) -> None:
    """pairwise_cost's checks, before it touches a value (its custom op's fake runs them too)."""
    check_points("x", x)
    check_points("y", y)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x on {x.device} and y on {y.device}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must have the same number of features D (last dimension), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.ndim == 3 and y.ndim == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size B, got x {tuple(x.shape)} and y {tuple(y.shape)}")


def pairwise_cost(
    x: torch.Tensor,
    y: torch.Tensor,
    metric: str = "sqeuclidean",
    *,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Pairwise squared-Euclidean (or Euclidean) cost between the rows of ``x`` and ``y``.

    Args:
        x: ``(N, D)`` or ``(B, N, D)`` float32/float16/bfloat16 (float64 accepted). Flatten image
            dimensions first: ``x.flatten(1)`` for one problem, ``x.flatten(2)`` for a batch.
        y: ``(M, D)`` or ``(B, M, D)``, same device and D (and B) as ``x``. A 2-D operand is
            shared by every problem of a 3-D one.
        metric: ``"sqeuclidean"`` (``|x_i - y_j|^2``) or ``"euclidean"`` (its square root).
        allow_tf32: let float32 inputs use TF32 tensor cores on CUDA (faster, ~1e-3 relative
            error on the product); the default computes the product in IEEE float32.

    Returns:
        float32 ``(N, M)``, or ``(B, N, M)`` if either input is 3-D; on the inputs' device.
        Accumulation is in float32 (float64 for float64 inputs on the CPU); no ``(N, M, D)``
        tensor is formed. CUDA runs one fused Triton kernel; the CPU runs norms + ``baddbmm``.

    Example:
        >>> x1 = torch.randn(128, 3, 32, 32); x0 = torch.randn(128, 3, 32, 32)
        >>> c = pairwise_cost(x0.flatten(1), x1.flatten(1))   # (128, 128) float32
    """
    if torch.compiler.is_compiling():  # one graph node: the custom op (end of this module)
        return pairwise_cost_op(x, y, metric, allow_tf32=allow_tf32)
    check_inputs(x, y, metric)
    return _pairwise_cost(x, y, metric, allow_tf32)


def _pairwise_cost(x, y, metric, allow_tf32):
    batched = x.ndim == 3 or y.ndim == 3
    B = x.shape[0] if x.ndim == 3 else (y.shape[0] if y.ndim == 3 else 1)
    # A 2-D operand becomes a stride-0 batch: no copy on either path.
    x3 = x.unsqueeze(0).expand(B, -1, -1) if x.ndim == 2 else x
    y3 = y.unsqueeze(0).expand(B, -1, -1) if y.ndim == 2 else y
    sqrt = metric == "euclidean"

    if use_kernel(x.device):
        out = _launch(x3, y3, sqrt, allow_tf32)
    else:
        out = _cost_torch(x3, y3, sqrt)
    return out if batched else out[0]


# ---- the custom op loom_kernels::pairwise_cost (torch.compile; see loom_kernels.ops) -------------


def _fake(x, y, metric, allow_tf32):
    check_inputs(x, y, metric)
    shape = (x.shape[-2], y.shape[-2])
    if x.ndim == 3 or y.ndim == 3:
        shape = ((x if x.ndim == 3 else y).shape[0], *shape)
    return x.new_empty(shape, dtype=torch.float32)


custom_op = torch.library.custom_op(
    "loom_kernels::pairwise_cost",
    _pairwise_cost,
    mutates_args=(),
    schema="(Tensor x, Tensor y, str metric, bool allow_tf32) -> Tensor",
)
custom_op.register_fake(_fake)


def pairwise_cost_op(x, y, metric="sqeuclidean", *, allow_tf32=False):
    """:func:`pairwise_cost` as one graph node: the custom op ``loom_kernels::pairwise_cost``."""
    check_inputs(x, y, metric)
    return custom_op(x, y, metric, allow_tf32)
