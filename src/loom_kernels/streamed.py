"""The streamed logit pass on the CPU: one fused C++ tile kernel (csrc/cpu/stream_cpu.cpp).

For each row ``i`` it reduces the logits ``s_ij = u_j + scale_b <x_i, y_j>`` over ``j`` without
ever storing them: a log-sum-exp (Sinkhorn's row and column updates), an argmax, or a Gumbel-max
draw whose noise is the counter-based hash of ``sinkhorn._tiles`` (the same pairs as the torch
tiles and the Triton kernel for the same seed). The logits are formed in registers by a GEMM
micro-kernel (AVX-512 / AVX2 / SSE2, chosen at run time like the exact solver's kernels) and
folded at once; memory beyond the inputs is one small tile per thread and the ``(B, n)`` output.

``lse`` / ``argmax`` mirror ``sinkhorn._kernels`` (float32 CPU tensors); ``streamed_argmin`` is the
public pass of the semidiscrete and nearest-neighbour couplings. The torch tiles
(``sinkhorn._tiles``) stay the reference: ``disabled()`` routes the solver back to them.
"""

from __future__ import annotations

import torch

from ._triton import use_kernel
from .sinkhorn import _kernels, _tiles
from .sinkhorn._cpu import argmax, available, disabled, lse
from .sinkhorn.plan import _seed

__all__ = ["argmax", "available", "disabled", "lse", "streamed_argmin"]


def _points(name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2 or (dims is not None and t.shape[1] != dims):
        want = f"(k, {dims})" if dims is not None else "(k, D)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    # one reduction first (NaN and inf propagate into the sum); the elementwise check only where it
    # is not finite, which may also be an overflow of the sum: ~5x cheaper on a large data set
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite: it holds NaN or inf")


def streamed_argmin(z, x, g=None, *, metric: str = "sqeuclidean", eps: float = 0.0, seed=None, threads=None):
    """For each query ``z_i``, the point ``x_j`` minimising ``c(z_i, x_j) - g_j``, streamed over x.

    Args:
        z: ``(b, D)`` queries; x: ``(N, D)`` points (the data set), same device.
        g: ``(N,)`` potentials subtracted from the cost (the semidiscrete dual), or None (0: nearest).
        metric: ``"sqeuclidean"`` (``|z - x|^2``) or ``"inner"`` (``-<z, x>``).
        eps: 0 for the argmin; > 0 with ``seed`` draws ``j`` from ``softmax_j((g_j - c_ij) / eps)``
            by Gumbel-max with the noise of ``sinkhorn.draw_pairs`` (the same draws on every
            device for the same seed); > 0 without a seed is the argmin too.
        seed: int (any 64-bit value) for the draw, or None.
        threads: CPU threads (None: ``torch.get_num_threads()``).

    Returns:
        ``(values, indices)``: float32 ``(b,)`` ``c(z_i, x_j) - g_j`` at the chosen ``j`` (computed
        directly, not from the streamed logits), int64 ``(b,)``. CPU float32 runs the C++ kernel;
        other devices the Triton kernel or the torch tiles. Memory: O(tile) beyond the inputs.

    Example:
        >>> vals, idx = streamed_argmin(torch.randn(256, 784), data, g)   # semidiscrete assignment
    """
    _points("z", z, None)
    _points("x", x, z.shape[1])
    if x.device != z.device:
        raise ValueError(f"x must be on {z.device}, got {x.device}")
    if x.shape[0] == 0 and z.shape[0] > 0:
        raise ValueError("x must hold at least one point to take an argmin over")
    if g is not None:
        if not isinstance(g, torch.Tensor) or g.shape != (x.shape[0],) or g.device != x.device:
            raise ValueError(f"g must be a ({x.shape[0]},) tensor on {x.device}, got {getattr(g, 'shape', g)!r}")
        if bool(torch.isnan(g).any()):
            raise ValueError("g must not hold NaN")
    if metric not in ("sqeuclidean", "inner"):
        raise ValueError(f"metric must be 'sqeuclidean' or 'inner', got {metric!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if seed is not None and eps == 0:
        raise ValueError("seed draws from softmax((g - c) / eps): pass eps > 0 with it")
    seed = None if seed is None else _seed(seed)

    dev, b, N = z.device, z.shape[0], x.shape[0]
    zf, xf = z.float(), x.float()
    gf = torch.zeros(N, device=dev) if g is None else g.float()
    temp = float(eps) if eps > 0 else 1.0
    if metric == "sqeuclidean":  # centred on x's mean: the Gram identity cancels less
        centre = xf.mean(0, keepdim=True) if N else torch.zeros_like(zf[:1])
        zc, xc = (zf - centre).contiguous(), (xf - centre).contiguous()
        u, s = (gf - torch.linalg.vector_norm(xc, dim=-1).square()) / temp, 2.0 / temp
    else:
        zc, xc, u, s = zf.contiguous(), xf.contiguous(), gf / temp, 1.0 / temp
    u = u[None].contiguous()
    scale = torch.full((1,), s, device=dev, dtype=torch.float32)
    ki = None if seed is None else _tiles.row_keys(seed, 1, b, dev)
    kj = None if seed is None else _tiles.col_keys(N, dev)
    if b == 0:
        idx = torch.zeros(0, dtype=torch.int64, device=dev)
    elif available(dev, torch.float32):
        idx = argmax(zc[None], xc[None], u, scale, ki, kj, threads)[0]
    else:
        if use_kernel(dev):
            idx = _kernels.argmax(zc[None], xc[None], u, scale, ki, kj)[0]
        else:
            idx = _tiles.row_argmax(_tiles.PointTiles(zc[None], xc[None]), u, scale, ki, kj)[0]
    xj = xf[idx]
    cost = ((zf - xj) ** 2).sum(-1) if metric == "sqeuclidean" else -(zf * xj).sum(-1)
    return cost - gf[idx], idx
