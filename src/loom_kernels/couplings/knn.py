"""Nearest-of-k noise: each data item takes the closest of k fresh noise candidates of its own.

Immiscible Diffusion (Li et al., NeurIPS 2024) in its per-item form (kohya-ss/sd-scripts ``--knn_noise_k``,
OneTrainer): no assignment between items, so it works at batch size 1 and costs k noise draws per item.
The k candidates of item i are noise rows ``i*k .. i*k+k-1``; the distances and the argmin are one batched
matrix-vector pass (``|x - z|^2 = |z|^2 - 2 <x, z> + const``), never an ``(b, k, D)`` difference tensor.
"""

from __future__ import annotations

import torch

from .base import Coupling, check_cond, check_flag, check_indices, check_x1
from .scopes.solve import cost_dtype

__all__ = ["KNNNoiseCoupling"]


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


class KNNNoiseCoupling(Coupling):
    """Each item keeps the nearest (squared Euclidean) of ``k`` fresh noise candidates.

    ``coupling(x1, indices=None, *, x0=None)``: ``x0`` (keyword) may give the ``k * b`` candidates (row
    ``i*k + j`` is item i's j-th; default: drawn with ``torch.randn`` from ``generator``). ``k = 1`` is the
    independent coupling. ``labels`` need nothing (each item's candidates are its own); ``cond`` is checked
    and unused (the candidates are drawn for the item's condition). ``return_indices=True`` adds ``perm``:
    ``x0[i]`` is candidate row ``perm[i]``. ``stats``: ``pre_cost`` (the first candidate's mean cost, the
    independent coupling's), ``post_cost``, ``swaps`` (items whose nearest is not the first).

    Example::

        coupling = KNNNoiseCoupling(k=16)
        x0, x1 = coupling(torch.randn(1, 3, 64, 64))   # batch size 1 works
    """

    def __init__(self, k: int = 16, *, generator: torch.Generator | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (noise candidates per item), got {k!r}")
        self.k, self.generator = k, generator
        self.stats = {}

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices: bool = False):  # noqa: ARG002
        check_x1(x1)
        b, k = x1.shape[0], self.k
        check_indices(indices, b, type(self).__name__)
        check_cond(cond, b, x1.device)
        check_flag(return_indices, "return_indices")
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
        out = x0[perm]
        if b:  # the costs from the pass's own distances: |x|^2 + d
            xx = torch.linalg.vector_norm(xf.float(), dim=1).square().double()
            first, post = xx + dist[:, 0].double(), xx + dist.gather(1, j[:, None])[:, 0].double()
            self.stats = {"pre_cost": first.mean(), "post_cost": post.mean(), "swaps": (j != 0).sum()}
        else:
            self.stats = {}
        return (out, x1, perm) if return_indices else (out, x1)
