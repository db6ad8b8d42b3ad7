"""Log-domain Sinkhorn with epsilon scaling, balanced or unbalanced, on a streamed cost.

M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS 2013.
B. Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
problems", SIAM J. Sci. Comput. 41 (2019): log-domain updates and epsilon scaling.
T. Sejourne, J. Feydy, F.-X. Vialard, A. Trouve, G. Peyre, "Sinkhorn divergences for unbalanced
optimal transport", 2019 (the KL-relaxed update ``f <- tau / (tau + eps) * f_balanced``).

Conventions: the plan is ``P_ij = exp((f_i + g_j - C_ij) / eps)`` (POT's ``exp(log_u + log_v
- C / eps)`` with ``f = eps log_u``); balanced: ``P 1 = a``, ``P^T 1 = b``. One iteration is a row
update ``f <- eps log a - eps LSE_j((g_j - C_ij) / eps)`` then a column update; each LSE pass
streams the cost (``_problem.Problem.lse``). The row pass also measures, for free, the marginal
error of the pair it starts from: the row sums of ``(f, g)`` are ``a_i exp((f_i - f'_i) / eps)``,
so the returned pair's error is measured exactly, never estimated.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ._problem import Problem

__all__ = ["RowShards", "SinkhornResult", "SinkhornWarning", "sinkhorn", "sinkhorn_cost"]


class SinkhornWarning(RuntimeWarning):
    """The solve stopped at ``max_iter`` above ``tol``: the potentials are returned with the error reached."""


@dataclass(frozen=True)
class SinkhornResult:
    """What ``sinkhorn`` found and did. ``B`` is absent from every shape for 2-D inputs.

    Attributes:
        f: ``(B, n)`` row potentials, in cost units (float32; float64 for float64 inputs).
        g: ``(B, m)`` column potentials. The plan is ``P_ij = exp((f_i + g_j - C_ij) / epsilon)``.
        epsilon: ``(B,)`` float64, the absolute epsilon of each problem (``epsilon * mean cost``
            when ``relative``).
        tau: ``(B,)`` float64 absolute KL weight, or None (balanced).
        mean_cost: ``(B,)`` float64, the mean of the cost matrix (the scale of relative epsilon).
        iterations: row+column update pairs done, epsilon-scaling stages included.
        error: ``(B,)`` float64, ``sum_i |(P 1)_i - a_i| / sum(a)`` of the returned potentials
            (balanced: the relative L1 marginal error, the columns being exact; unbalanced: the
            same expression, the residual of the row fixed-point equation).
        converged: every problem reached ``error <= tol``.
        tol: the tolerance asked for.
    """

    f: torch.Tensor
    g: torch.Tensor
    epsilon: torch.Tensor
    tau: torch.Tensor | None
    mean_cost: torch.Tensor
    iterations: int
    error: torch.Tensor
    converged: bool
    tol: float


def _positive(name, v, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0):  # NaN fails v > 0
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


class RowShards:
    """The rows of one problem split across processes (each holds its rows and every column).

    The hook that lets ``sinkhorn`` solve a problem whose rows live on several ranks: the row update
    is local (every column is here), the column update's log-sum-exp over the rows and the few scalar
    sums (masses, marginal error, mean cost) are combined by the three reductions below, so traffic
    per iteration is one ``(B, m)`` max and one ``(B, m)`` sum. The default (this class) is one
    process: every reduction is the identity. ``couplings.sinkhorn`` implements them with
    ``torch.distributed.all_reduce``.
    """

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def lse(self, t: torch.Tensor) -> torch.Tensor:
        """Combine per-shard ``LSE_i`` partials: ``M + log sum_shards exp(t - M)``, ``M`` the max."""
        mx = self.max(t)
        safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # all -inf: no NaN
        return safe + torch.log(self.sum(torch.exp(t - safe)))


def _update(prob, other, eps, lam, rows: bool, shards=None):
    """``lam * (eps log w - eps LSE((other - C) / eps))`` over the columns (rows=True) or the rows."""
    lse = prob.lse(other, eps, transpose=not rows)
    if shards is not None and not rows:  # the column update reduces over every shard's rows
        lse = shards.lse(lse)
    log_w = prob.log_a if rows else prob.log_b
    return lam * eps * (log_w - lse)


def _row_error(prob, f, f_new, eps, shards=None):
    """``sum_i a_i |exp((f_i - f'_i) / eps) - 1| / sum(a)`` float64 ``(B,)`` (0-weight rows add 0)."""
    d = ((f - f_new) / eps).double()
    w = torch.exp(prob.log_a.double())
    term = torch.where(w > 0, w * torch.expm1(d).abs(), torch.zeros_like(d)).sum(-1)
    return (term if shards is None else shards.sum(term)) / prob.mass_a


def _shard(prob, shards):
    """Make the problem's scalars global over the shards: masses, mean cost (row-weighted), max cost."""
    n = torch.full_like(prob.mean_cost, float(prob.shape[1]))
    total = shards.sum(n)
    prob.mass_a = shards.sum(prob.mass_a)
    if bool((prob.mass_a <= 0).any()):
        raise ValueError("a must have a positive sum in every problem (over all row shards)")
    prob.mean_cost = shards.sum(prob.mean_cost * n) / total
    prob.max_cost = shards.max(prob.max_cost)


def _scales(prob, epsilon, relative, tau):
    """Absolute ``(eps, tau)`` float64 ``(B,)``; a problem whose cost is all 0 keeps ``epsilon`` as is."""
    scale = (
        torch.where(prob.mean_cost > 0, prob.mean_cost, torch.ones_like(prob.mean_cost))
        if relative
        else torch.ones_like(prob.mean_cost)
    )
    return epsilon * scale, (None if tau is None else tau * scale)


def _schedule(prob, eps, eps_scaling):
    """Multipliers of eps for the scaling stages: ``r0 * s^k`` while above 1, from the largest cost."""
    if eps_scaling is None:
        return []
    r0 = float((prob.max_cost / eps).max())
    stages = [] if r0 <= 1 else [r0 * eps_scaling**k for k in range(int(math.log(r0) / -math.log(eps_scaling)) + 1)]
    return [r for r in stages if r > 1]


def _solve(prob, epsilon, relative, tau, tol, max_iter, eps_scaling, shards=None):
    epsilon = _positive("epsilon", epsilon)
    tau = _positive("tau", tau, allow_none=True)
    tau = None if tau == math.inf else tau
    tol = _positive("tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if eps_scaling is not None and not (isinstance(eps_scaling, (int, float)) and 0 < eps_scaling < 1):
        raise ValueError(f"eps_scaling must be in (0, 1) or None, got {eps_scaling!r}")
    if shards is not None:
        _shard(prob, shards)
    if tau is None and bool(((prob.mass_a - prob.mass_b).abs() > 1e-6 * torch.maximum(prob.mass_a, prob.mass_b)).any()):
        raise ValueError(
            f"a and b must have the same total mass for a balanced problem (tau=None), got "
            f"{prob.unbatch(prob.mass_a).tolist()} and {prob.unbatch(prob.mass_b).tolist()}; "
            f"pass tau for an unbalanced one"
        )
    eps64, tau64 = _scales(prob, epsilon, relative, tau)
    B, n, m = prob.shape

    def lam(e):
        return torch.ones_like(e) if tau64 is None else (tau64[:, None] / (tau64[:, None] + e.double())).to(prob.dtype)

    f = torch.zeros((B, n), dtype=prob.dtype, device=prob.device)
    g = torch.zeros((B, m), dtype=prob.dtype, device=prob.device)
    it = 0
    for r in _schedule(prob, eps64, eps_scaling)[: max_iter - 1]:
        e = (eps64 * r)[:, None].to(prob.dtype)
        f = _update(prob, g, e, lam(e), rows=True)
        g = _update(prob, f, e, lam(e), rows=False, shards=shards)
        it += 1
    e = eps64[:, None].to(prob.dtype)
    f = _update(prob, g, e, lam(e), rows=True)
    g = _update(prob, f, e, lam(e), rows=False, shards=shards)
    it += 1
    while True:
        f_new = _update(prob, g, e, lam(e), rows=True)
        err = _row_error(prob, f, f_new, e, shards)
        done = bool((err <= tol).all())
        if done or it >= max_iter:
            break
        f = f_new
        g = _update(prob, f, e, lam(e), rows=False, shards=shards)
        it += 1
    if not done:
        warnings.warn(
            SinkhornWarning(
                f"sinkhorn stopped at max_iter={max_iter} with marginal error {float(err.max()):.3g} > tol={tol} "
                f"(epsilon {prob.unbatch(eps64).tolist()}): raise max_iter or epsilon, or loosen tol"
            ),
            stacklevel=3,
        )
    u = prob.unbatch
    return SinkhornResult(
        f=u(f),
        g=u(g),
        epsilon=u(eps64),
        tau=u(tau64),
        mean_cost=u(prob.mean_cost),
        iterations=it,
        error=u(err),
        converged=done,
        tol=tol,
    )


def sinkhorn(
    x,
    y,
    a=None,
    b=None,
    *,
    epsilon: float = 0.05,
    relative: bool = True,
    tau: float | None = None,
    tol: float = 1e-3,
    max_iter: int = 1000,
    eps_scaling: float | None = None,
    allow_tf32: bool = False,
    row_shards: RowShards | None = None,
) -> SinkhornResult:
    """Entropic OT between point clouds for the squared-Euclidean cost, the cost never stored.

    Args:
        x: ``(n, D)`` or ``(B, n, D)`` points (float32/16-bit computed in float32; float64 in
            float64 on the torch path).
        y: ``(m, D)`` or ``(B, m, D)``, same device, D and B.
        a, b: marginal weights ``(n,)``/``(B, n)`` and ``(m,)``/``(B, m)``, non-negative;
            uniform ``1/n``, ``1/m`` by default. Balanced problems need equal masses.
        epsilon: entropic regularisation; relative to the mean cost when ``relative`` (scale
            invariant: the same coupling for ``x, y`` and ``c x, c y``), else absolute.
        tau: KL marginal relaxation (same units as epsilon, scaled alike); None: balanced.
        tol: the stop on ``error`` (see ``SinkhornResult``); max_iter: the most iterations,
            epsilon-scaling stages included (a ``SinkhornWarning`` says where it stopped).
        eps_scaling: geometric factor of an epsilon schedule, from the largest cost down to
            ``epsilon`` with one iteration per stage (Schmitzer 2019); None (the default) starts
            at ``epsilon``. One iteration per stage did not save iterations in our tests (see
            docs/sinkhorn.md): it is there for problems where the plain start stalls.
        allow_tf32: let CUDA use TF32 for the point products (faster, ~1e-3 relative error).
        row_shards: the rows ``x`` (and ``a``) are this process's share of a larger problem whose
            other rows live elsewhere (``y`` and ``b`` whole on every process); a ``RowShards``
            combines the column updates and the scalars, so every process gets the ``g`` of the
            whole problem and ``f`` for its rows. ``a`` is then this shard's part of the global
            weights (pass it: the uniform default would be ``1/n`` of the local rows).

    Returns:
        ``SinkhornResult``. Memory beyond the inputs and potentials: a centred copy of the points
        and ``O(B (n + m))`` vectors, plus one tile (torch path: ``_tiles.TILE_ELEMENTS``
        numbers; CUDA: registers). CUDA runs the Triton kernels of ``_kernels.py``.

    Example:
        >>> x1, x0 = torch.randn(4096, 2), torch.randn(4096, 2)
        >>> res = sinkhorn(x1, x0, epsilon=0.01)
        >>> cols = draw_pairs(res, x1, x0, seed=0)   # a noise index for each data row
    """
    prob = Problem(x=x, y=y, a=a, b=b, allow_tf32=allow_tf32, row_shard=row_shards is not None)
    return _solve(prob, epsilon, relative, tau, tol, max_iter, eps_scaling, row_shards)


def sinkhorn_cost(
    cost,
    a=None,
    b=None,
    *,
    epsilon: float = 0.05,
    relative: bool = True,
    tau: float | None = None,
    tol: float = 1e-3,
    max_iter: int = 1000,
    eps_scaling: float | None = None,
) -> SinkhornResult:
    """``sinkhorn`` on a given cost matrix ``(n, m)`` or ``(B, n, m)`` (any metric), read tile by tile.

    Example:
        >>> res = sinkhorn_cost(torch.rand(100, 80), epsilon=0.05)
    """
    return _solve(Problem(cost=cost, a=a, b=b), epsilon, relative, tau, tol, max_iter, eps_scaling)
