"""Nearest-of-k noise: each data item takes the closest of k fresh noise candidates of its own.

Immiscible Diffusion (Li et al., NeurIPS 2024) in its per-item form (kohya-ss/sd-scripts ``--knn_noise_k``,
OneTrainer): no assignment between items, so it works at batch size 1 and costs k noise draws per item.
The k candidates of item i are noise rows ``i*k .. i*k+k-1``; the distances and the argmin are one batched
matrix-vector pass (``|x - z|^2 = |z|^2 - 2 <x, z> + const``), never an ``(b, k, D)`` difference tensor.

Seeded candidates (``noise="seeds"`` or a call's ``seeds=``): candidate ``c`` is ``gaussian_noise(seeds[c])``.
On the CPU one fused C++ pass (``_C.philox_nearest``) draws each candidate from its seed and sums ``|z|^2``
and ``<x, z>`` while the block of normals is still in L1, so no candidate is ever written to memory; only the
``b`` winners are drawn again (the same bits). The sums are float64 (exact products of float32 values).
"""

from __future__ import annotations

import torch

from .. import _native
from ..noise import gaussian_noise, prepare_seeds
from .base import Coupling, check_cond, check_flag, check_indices, check_x1
from .scopes.solve import cost_dtype

__all__ = ["KNNNoiseCoupling", "nearest_of_k", "nearest_of_seeds"]

NOISE_MODES = ("randn", "seeds")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact in float32: the kernel's input
FALLBACK_ELEMENTS = 1 << 22  # float64 candidate elements per chunk of the fallback


def nearest_of_k(x1: torch.Tensor, cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(j (b,) int64, d (b, k))``: for each item ``x1[i]`` ``(D,)``, the index in ``0..k-1`` of its nearest
    candidate among ``cand[i*k : i*k+k]`` (``cand (b*k, D)``), and ``d = |z|^2 - 2 <x, z>`` (the squared
    distances less ``|x|^2``). One ``bmm`` of ``(b, k, D) x (b, D, 1)`` views (no copy) and one norm reduction:
    two reads of the noise, no ``(b, k, D)`` temporary."""
    b, d = x1.shape
    c3 = cand.view(b, k, d)
    dots = torch.bmm(c3, x1.unsqueeze(2)).squeeze(2)  # (b, k)
    dist = torch.linalg.vector_norm(c3, dim=2).square_().sub_(2.0 * dots)
    return dist.argmin(1), dist


def fused_pass():
    """``_C.philox_nearest``, or None where the compiled module lacks it (then the fallback below)."""
    try:
        mod = _native.cpu()
    except ImportError:
        return None
    return getattr(mod, "philox_nearest", None)


def nearest_of_seeds(x1: torch.Tensor, seeds: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """:func:`nearest_of_k` against the candidates ``gaussian_noise(seeds, (D,))``: ``(j (b,) int64,
    d (b, k) float64, xx (b,) float64 = |x|^2)`` for ``x1 (b, D)`` and ``seeds (b*k,)`` int64 (CPU), the sums
    in float64.

    CPU and ``x1`` float32 / float16 / bfloat16: the fused C++ pass (no candidate stored, torch's thread
    count). Otherwise, or where the compiled module lacks it: the candidates drawn with ``gaussian_noise``
    and measured by ``nearest_of_k`` in float64, a few items at a time; the same winners (ties: the lowest
    index) and distances to float64 rounding."""
    b, d = x1.shape
    fn = fused_pass() if x1.device.type == "cpu" and x1.dtype in _KERNEL_DTYPES else None
    if fn is not None:
        x = x1.detach().to(torch.float32).contiguous().numpy()
        return tuple(torch.from_numpy(a) for a in fn(seeds.contiguous().numpy(), x, k, torch.get_num_threads()))
    rows = max(1, FALLBACK_ELEMENTS // max(1, k * d))
    js, dists = [torch.zeros(0, dtype=torch.int64, device=x1.device)], [x1.new_zeros((0, k), dtype=torch.float64)]
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        cand = gaussian_noise(seeds[r0 * k : r1 * k], (d,), device=x1.device).double()
        j, dist = nearest_of_k(x1[r0:r1].double(), cand, k)
        js.append(j)
        dists.append(dist)
    return torch.cat(js), torch.cat(dists), x1.double().square().sum(1)


class KNNNoiseCoupling(Coupling):
    """Each item keeps the nearest (squared Euclidean) of ``k`` fresh noise candidates.

    ``coupling(x1, indices=None, *, x0=None, seeds=None)``: ``x0`` (keyword) may give the ``k * b`` candidates
    (row ``i*k + j`` is item i's j-th), or ``seeds`` their ``k * b`` int64 seeds (candidate ``c`` is
    ``gaussian_noise(seeds[c])``, the fused pass). Neither: ``noise="randn"`` (default) draws the candidates
    with ``torch.randn`` from ``generator`` (or torch's global RNG); ``noise="seeds"`` draws ``k * b`` seeds
    in ``[0, 2**63)`` from it and takes the seeded path (same cost as drawing the candidates on the CPU, see
    bench/RESULTS.md). ``k = 1`` is the independent coupling. ``labels`` need nothing (each item's candidates
    are its own); ``cond`` is checked and unused (the candidates are drawn for the item's condition).
    ``return_indices=True`` adds ``perm``: ``x0[i]`` is candidate row ``perm[i]``. After a seeded call
    ``candidate_seeds (k*b,)`` and ``chosen_seeds = candidate_seeds[perm] (b,)`` (CPU int64) hold the seeds:
    ``x0 == gaussian_noise(chosen_seeds, shape)``. ``stats``: ``pre_cost`` (the first candidate's mean cost,
    the independent coupling's), ``post_cost``, ``swaps`` (items whose nearest is not the first).

    Example::

        coupling = KNNNoiseCoupling(k=16)
        x0, x1 = coupling(torch.randn(1, 3, 64, 64))   # batch size 1 works
        seeded = KNNNoiseCoupling(16, noise="seeds")
        x0, x1, perm = seeded(torch.randn(8, 3, 64, 64), return_indices=True)  # seeded.chosen_seeds: x0's
    """

    def __init__(self, k: int = 16, *, generator: torch.Generator | None = None, noise: str = "randn"):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (noise candidates per item), got {k!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.k, self.generator, self.noise = k, generator, noise
        self.candidate_seeds = self.chosen_seeds = None
        self.stats = {}

    def __call__(
        self,
        x1,
        indices=None,
        *,
        x0=None,
        labels=None,  # noqa: ARG002
        cond=None,
        return_indices: bool = False,
        seeds=None,
    ):
        check_x1(x1)
        b, k = x1.shape[0], self.k
        check_indices(indices, b, type(self).__name__)
        check_cond(cond, b, x1.device)
        check_flag(return_indices, "return_indices")
        if x0 is not None and seeds is not None:
            raise ValueError("pass the candidates as x0 or their seeds as seeds, not both")
        if x0 is None and (seeds is not None or self.noise == "seeds"):
            out, perm = self._seeded(x1, seeds)
            return (out, x1, perm) if return_indices else (out, x1)
        if x0 is None:
            x0 = torch.randn((b * k, *x1.shape[1:]), generator=self.generator, device=x1.device, dtype=x1.dtype)
        else:
            check_x1(x0, "x0")
            if x0.shape != (b * k, *x1.shape[1:]) or x0.device != x1.device:
                raise ValueError(
                    f"x0 must be None (drawn here) or hold k*b = {b * k} candidates of shape {tuple(x1.shape[1:])} "
                    f"on {x1.device}, got "
                    f"{tuple(x0.shape)} on {x0.device}"
                )
        dt = cost_dtype(x1.dtype)
        xf, cf = x1.reshape(b, -1).to(dt), x0.reshape(b * k, -1).to(dt)
        j, dist = nearest_of_k(xf, cf, k)
        perm = torch.arange(b, device=x1.device) * k + j
        self._set_stats(torch.linalg.vector_norm(xf.float(), dim=1).square().double(), dist, j)
        return (x0[perm], x1, perm) if return_indices else (x0[perm], x1)

    def _seeded(self, x1, seeds):
        b, k, shape = x1.shape[0], self.k, tuple(x1.shape[1:])
        if seeds is None:
            seeds = torch.randint(0, 2**63 - 1, (b * k,), generator=self.generator, dtype=torch.int64)
        seeds = prepare_seeds(seeds, shape, None)[0].cpu()
        if seeds.numel() != b * k:
            raise ValueError(f"seeds must hold k*b = {b * k} int64 seeds (one per candidate), got {seeds.numel()}")
        xf = x1.reshape(b, -1)
        j, dist, xx = nearest_of_seeds(xf, seeds, k)
        perm_cpu = torch.arange(b) * k + j.cpu()
        self.candidate_seeds, self.chosen_seeds = seeds, seeds[perm_cpu]
        out = gaussian_noise(self.chosen_seeds, shape, device=x1.device, dtype=x1.dtype)
        self._set_stats(xx, dist, j)
        return out, perm_cpu.to(x1.device)

    def _set_stats(self, xx, dist, j):
        """The costs from the pass's own distances: ``|x|^2 + d`` (``xx (b,)`` float64)."""
        if not len(j):
            self.stats = {}
            return
        dist = dist.to(xx.device)
        first, post = xx + dist[:, 0].double(), xx + dist.gather(1, j[:, None].to(xx.device))[:, 0].double()
        self.stats = {"pre_cost": first.mean(), "post_cost": post.mean(), "swaps": (j != 0).sum()}
