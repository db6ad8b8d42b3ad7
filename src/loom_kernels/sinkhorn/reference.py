"""Dense float64 references for the tests: the plan formed, nothing streamed, no epsilon scaling."""

from __future__ import annotations

import torch


def sq_cost64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x_i - y_j|^2`` in float64 by explicit differences ``(..., n, m)`` (no Gram identity)."""
    return ((x.double()[..., :, None, :] - y.double()[..., None, :, :]) ** 2).sum(-1)


def sinkhorn_dense(cost, a, b, eps, tau=None, tol=1e-13, max_iter=200_000):
    """Plain log-domain Sinkhorn on a dense float64 cost ``(n, m)``: ``(f, g, plan)``.

    Same model as ``loom_kernels.sinkhorn`` (plan ``exp((f_i + g_j - C_ij) / eps)``, KL relaxation
    ``f <- tau / (tau + eps) f_balanced``), iterated until the potentials move less than
    ``tol * eps``; a RuntimeError if that never happens.
    """
    c = cost.double()
    la, lb = torch.log(a.double()), torch.log(b.double())
    lam = 1.0 if tau is None else tau / (tau + eps)
    f = torch.zeros(c.shape[0], dtype=torch.float64)
    g = torch.zeros(c.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        f_new = lam * eps * (la - torch.logsumexp((g[None, :] - c) / eps, 1))
        g_new = lam * eps * (lb - torch.logsumexp((f_new[:, None] - c) / eps, 0))
        delta = max(float((f_new - f).abs().max()), float((g_new - g).abs().max()))
        f, g = f_new, g_new
        if delta < tol * eps:
            return f, g, torch.exp((f[:, None] + g[None, :] - c) / eps)
    raise RuntimeError(f"sinkhorn_dense did not converge in {max_iter} iterations (last move {delta:.3g})")


def normalised_entropy(plan: torch.Tensor) -> float:
    """``(H(P) - max(H(r), H(c))) / min(H(r), H(c))`` of a dense plan normalised to mass 1."""
    p = plan.double() / plan.double().sum()

    def h(q):
        q = q[q > 0]
        return float(-(q * torch.log(q)).sum())

    hr, hc = h(p.sum(1)), h(p.sum(0))
    return (h(p.flatten()) - max(hr, hc)) / min(hr, hc)
