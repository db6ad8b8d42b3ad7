"""Using a Sinkhorn solution without forming the plan: pairs drawn from it, its sharpness.

Gumbel-max: ``argmax_j(log P_ij + G_ij)`` with i.i.d. Gumbel ``G_ij`` is a draw from
``P_ij / sum_j P_ij`` (E. J. Gumbel 1954; C. J. Maddison et al., "A* sampling", NeurIPS 2014),
so a row's sample is one more streamed pass with a running argmax. The noise is a hash of
``(seed, b, i, j)`` (``_tiles.gumbel_hash``): the same on the Triton and torch paths, reproducible,
independent of tiling. Sharpness: the normalised entropy of M. Klein, A. Mousavi-Hosseini,
S. Zhang, M. Cuturi, "On Fitting Flow Models with Large Sinkhorn Couplings", 2025.
"""

from __future__ import annotations

import torch

from . import _tiles
from ._problem import Problem
from .solver import SinkhornResult

__all__ = ["dense_plan", "draw_pairs", "plan_sharpness"]


def _problem(result, x, y, cost, allow_tf32=False):
    if not isinstance(result, SinkhornResult):
        raise TypeError(f"result must be a SinkhornResult (from sinkhorn), got {type(result).__name__}")
    if (cost is None) == (x is None or y is None):
        raise ValueError("pass the points x and y the result was solved on, or cost=, not both")
    prob = Problem(x=x, y=y, cost=cost, allow_tf32=allow_tf32)
    B, n, m = prob.shape
    f, g = (result.f, result.g) if prob.batched else (result.f[None], result.g[None])
    if f.shape != (B, n) or g.shape != (B, m):
        raise ValueError(
            f"the problem has shape (B, n, m) = {(B, n, m)} but result.f is {tuple(result.f.shape)} "
            f"and result.g {tuple(result.g.shape)}: pass the inputs of the solve"
        )
    eps = result.epsilon.reshape(-1)[:, None].to(device=prob.device, dtype=prob.dtype)
    return prob, f.to(prob.dtype), g.to(prob.dtype), eps


def _seed(seed) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**63 - 1, (), generator=seed, device=seed.device))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return seed


def draw_pairs(
    result: SinkhornResult, x=None, y=None, *, cost=None, seed=0, argmax: bool = False, allow_tf32: bool = False
) -> torch.Tensor:
    """For each row i, a column j drawn from ``P_ij / sum_j P_ij`` (or its argmax), streamed.

    Args:
        result: the ``sinkhorn`` solution for these inputs.
        x, y: the points it was solved on (``(n, D)``/``(B, n, D)``...), or ``cost=`` the matrix.
        seed: int (any 64-bit value) or a ``torch.Generator`` (one draw from it); the same seed
            gives the same pairs on the CPU and on CUDA, whatever the tiling.
        argmax: the most likely column of each row instead of a draw (deterministic pairing).

    Returns:
        int64 ``(n,)`` or ``(B, n)`` column indices, on the inputs' device. To draw a row for each
        column, solve (or transpose) the other way round: ``sinkhorn(y, x)``.

    Example:
        >>> res = sinkhorn(x1, x0, epsilon=0.01)
        >>> x0_paired = x0[draw_pairs(res, x1, x0, seed=step)]
    """
    prob, _, g, eps = _problem(result, x, y, cost, allow_tf32)
    return prob.unbatch(prob.argmax(g, eps, None if argmax else _seed(seed)))


def plan_sharpness(result: SinkhornResult, x=None, y=None, *, cost=None, row_shards=None) -> torch.Tensor:
    """The scale-invariant sharpness of the plan: its normalised entropy in [0, 1], float64.

    ``(H(P) - max(H(r), H(c))) / min(H(r), H(c))`` for the plan normalised to mass 1, with
    ``r``, ``c`` its marginals: 0 for a permutation (sharp), 1 for the independent coupling
    ``r c^T``. With uniform marginals and n = m this is ``H(P) / log n - 1``, the paper's
    quantity. One streamed pass (torch tiles on every device). A single point on a side: 0.
    ``row_shards`` (a ``RowShards``, as in ``sinkhorn``): ``x`` is this process's rows of the
    problem; the sums are combined so every process gets the whole plan's sharpness.

    Example:
        >>> plan_sharpness(sinkhorn(x1, x0, epsilon=0.01), x1, x0)   # tensor(0.21...)
    """
    prob, f, g, eps = _problem(result, x, y, cost)
    rows, cols, plogp = _tiles.plan_moments(prob.geo, f, g, eps)
    red = (lambda t: t) if row_shards is None else row_shards.sum
    cols, plogp = red(cols), red(plogp)
    mass = red(rows.sum(-1))

    def entropy(p, reduce):
        p = p / mass[:, None]
        return -reduce(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1))

    h = -plogp / mass + torch.log(mass)
    hr, hc = entropy(rows, red), entropy(cols, lambda t: t)
    lo, span = torch.maximum(hr, hc), torch.minimum(hr, hc)
    out = torch.where(span > 0, (h - lo) / span.clamp_min(1e-300), torch.zeros_like(h))
    return prob.unbatch(out)


def dense_plan(result: SinkhornResult, x=None, y=None, *, cost=None) -> torch.Tensor:
    """The plan ``exp((f_i + g_j - C_ij) / eps)`` ``(n, m)``/``(B, n, m)``, formed: O(n m) memory,
    for small problems, tests and plots."""
    prob, f, g, eps = _problem(result, x, y, cost)
    u, scale, r = prob.geo.terms(g, eps)
    B, n, m = prob.shape
    t = prob.geo.tile(u, scale, slice(0, B), slice(0, n), slice(0, m))
    return prob.unbatch(torch.exp(t + (f / eps + r)[..., None]))
