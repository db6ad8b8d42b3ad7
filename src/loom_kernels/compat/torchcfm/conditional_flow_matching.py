"""TorchCFM's ``torchcfm.conditional_flow_matching``: every flow matcher, with TorchCFM's formulas and RNG use.

The probability paths and targets (Tong et al. TMLR 2024, Lipman et al. ICLR 2023 for
``TargetConditionalFlowMatcher``, Albergo et al. 2023 for ``VariancePreservingConditionalFlowMatcher``,
Tong et al. AISTATS 2024 "Simulation-free Schrodinger bridges" for ``SchrodingerBridge...``) are
computed with TorchCFM's operations in TorchCFM's order, so seeded calls return bit-identical
tensors; each call draws from torch's global RNG exactly as TorchCFM does (``t = torch.rand(b)``
when not given, then ``eps = torch.randn_like(x0)``), after the plan sampler's numpy draw.

What is faster: the OT matchers' plans come from loom_kernels' exact solver
(:mod:`.optimal_transport`); the pointwise formulas reuse their intermediate buffers.
"""

from __future__ import annotations

import math
import warnings

import torch

from .optimal_transport import OTPlanSampler

__all__ = [
    "pad_t_like_x",
    "ConditionalFlowMatcher",
    "ExactOptimalTransportConditionalFlowMatcher",
    "TargetConditionalFlowMatcher",
    "SchrodingerBridgeConditionalFlowMatcher",
    "VariancePreservingConditionalFlowMatcher",
]


def pad_t_like_x(t, x):
    """Reshape times ``t (bs,)`` to ``(bs, 1, ..., 1)`` to broadcast against ``x (bs, *dim)``; numbers pass through."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _fits(shape, into) -> bool:
    """Whether ``shape`` broadcasts to ``into`` (torch.broadcast_shapes is slow Python, and imports sympy)."""
    return len(shape) <= len(into) and all(s == 1 or s == d for s, d in zip(reversed(shape), reversed(into)))


def _into(out, other):
    """``out + other``, written into ``out`` (a fresh tensor of ours) when shape and dtype allow.

    The sum is rounded exactly as the out-of-place one; in-place addition is safe under autograd
    (its backward needs neither operand).
    """
    if _fits(other.shape, out.shape) and out.dtype == torch.result_type(out, other):
        return out.add_(other)
    return out + other


def _combine(a, x, b, y):
    """``a * x + b * y`` rounded as TorchCFM's expression (two products, then the sum), one buffer fewer."""
    return _into(torch.mul(a, x), torch.mul(b, y))


class ConditionalFlowMatcher:
    """TorchCFM's independent CFM: ``xt ~ N(t x1 + (1 - t) x0, sigma^2)``, target ``ut = x1 - x0``.

    Shapes: ``x0, x1 (bs, *dim)``, ``t (bs,)``; returns ``t (bs,)``, ``xt, ut (bs, *dim)`` (and ``eps``).

    Example::

        fm = ConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def __init__(self, sigma: float | int = 0.0):
        self.sigma = sigma

    def compute_mu_t(self, x0, x1, t):
        t = pad_t_like_x(t, x0)
        return _combine(t, x1, 1 - t, x0)

    def compute_sigma_t(self, t):
        del t
        return self.sigma

    def sample_xt(self, x0, x1, t, epsilon):
        mu_t = self.compute_mu_t(x0, x1, t)
        sigma_t = pad_t_like_x(self.compute_sigma_t(t), x0)
        if type(self).compute_mu_t in _FRESH_MU:  # our mu_t is a fresh tensor; a subclass's may be shared
            return _into(mu_t, sigma_t * epsilon)
        return mu_t + sigma_t * epsilon

    def compute_conditional_flow(self, x0, x1, t, xt):
        del t, xt
        return x1 - x0

    def sample_noise_like(self, x):
        return torch.randn_like(x)

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """``(t (bs,), xt, ut)`` (and ``eps`` with ``return_noise``); ``t ~ U[0, 1]`` when not given.

        New: ``t`` may name a distribution to draw from (``"beta(0.5, 0.5)"``, ``"u_shaped"``,
        ``"logit_normal(0, 1)"``, a ``loom_kernels.timesteps.TimestepDist``)."""
        if t is None:
            t = torch.rand(x0.shape[0]).type_as(x0)
        elif isinstance(t, str) or type(t).__name__ == "TimestepDist":
            from ...timesteps import timestep_dist

            t = timestep_dist(t, arg="t").sample(x0.shape[0]).type_as(x0)
        if len(t) != x0.shape[0]:
            raise ValueError(f"t must have shape (bs,) = ({x0.shape[0]},), got {tuple(t.shape)}")
        eps = self.sample_noise_like(x0)
        xt = self.sample_xt(x0, x1, t, eps)
        ut = self.compute_conditional_flow(x0, x1, t, xt)
        return (t, xt, ut, eps) if return_noise else (t, xt, ut)

    def compute_lambda(self, t):
        """The score weighting ``2 sigma_t / (sigma^2 + 1e-8)`` (Tong et al., SF2M, eq. 23)."""
        sigma_t = self.compute_sigma_t(t)
        return 2 * sigma_t / (self.sigma**2 + 1e-8)


class _PlanMixin:
    """The OT matchers: pairs drawn from ``self.ot_sampler`` before the parent's path (TorchCFM's order).

    New keyword ``cond (b, Dc)`` or ``(b,)`` (floating, one row per item of ``x1``, exact plans only): the
    pairs are the exact permutation (``x1`` keeps its order, so ``cond`` and any label of ``x1`` still line
    up) for ``|x1_k - x0_j|^2 + cond_weight * ||cond_k - cond_j||^2``, ``x0[j]`` carrying ``cond[j]``. The
    constructors pass ``cond_weight`` (or ``"adaptive"`` / ``"c2ot"``), ``cond_metric`` and ``cond_ratio`` (C2OT's) to
    ``OTPlanSampler``.
    """

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False, *, cond=None):
        if cond is None:
            x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        else:
            x0, x1 = self.ot_sampler.sample_plan(x0, x1, replace=False, cond=cond)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(
        self, x0, x1, y0=None, y1=None, t=None, return_noise=False, *, cond=None
    ):
        """As TorchCFM: ``(t, xt, ut, y0, y1)`` (``eps`` last with ``return_noise``), labels drawn with the pairs.

        ``y0`` (``y1``) needs one entry per row of ``x0`` (``x1``), else a ValueError names it. With ``cond``
        the pairs are the penalised exact permutation (``x1``, ``y1`` in their order, ``y0`` follows ``x0``).
        """
        if cond is None:
            x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        else:
            x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1, replace=False, cond=cond)
        out = super().sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])


class ExactOptimalTransportConditionalFlowMatcher(_PlanMixin, ConditionalFlowMatcher):
    """TorchCFM's OT-CFM: the pairs are drawn from the exact minibatch OT plan (``OTPlanSampler("exact")``).

    Example::

        fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def __init__(self, sigma: float | int = 0.0, *, cond_weight: float | str = 1.0, **cond):
        super().__init__(sigma)
        self.ot_sampler = OTPlanSampler(method="exact", cond_weight=cond_weight, **cond)


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    """Lipman et al.'s target OT path: ``mu_t = t x1``, ``sigma_t = 1 - (1 - sigma) t``,
    ``ut = (x1 - (1 - sigma) xt) / (1 - (1 - sigma) t)``.

    Example::

        fm = TargetConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def compute_mu_t(self, x0, x1, t):
        del x0
        t = pad_t_like_x(t, x1)
        return t * x1

    def compute_sigma_t(self, t):
        return 1 - (1 - self.sigma) * t

    def compute_conditional_flow(self, x0, x1, t, xt):
        del x0
        t = pad_t_like_x(t, x1)
        return (x1 - (1 - self.sigma) * xt) / (1 - (1 - self.sigma) * t)


class SchrodingerBridgeConditionalFlowMatcher(_PlanMixin, ConditionalFlowMatcher):
    """SB-CFM (Tong et al.): pairs from an OT plan with ``reg = 2 sigma^2``, ``sigma_t = sigma sqrt(t (1 - t))``,
    ``ut = (1 - 2t) / (2t(1 - t) + 1e-8) (xt - mu_t) + x1 - x0``.

    Args:
        sigma: > 0 (``ValueError`` otherwise; a warning below 1e-3).
        ot_method: the ``OTPlanSampler`` method, "exact" (default, our solver) or POT's "sinkhorn", ...

    Example::

        fm = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def __init__(self, sigma: float | int = 1.0, ot_method="exact", *, cond_weight: float | str = 1.0, **cond):
        if sigma <= 0:
            raise ValueError(f"Sigma must be strictly positive, got {sigma}.")
        elif sigma < 1e-3:
            warnings.warn("Small sigma values may lead to numerical instability.", stacklevel=2)
        super().__init__(sigma)
        self.ot_method = ot_method
        self.ot_sampler = OTPlanSampler(method=ot_method, reg=2 * self.sigma**2, cond_weight=cond_weight, **cond)

    def compute_sigma_t(self, t):
        return self.sigma * torch.sqrt(t * (1 - t))

    def compute_conditional_flow(self, x0, x1, t, xt):
        t = pad_t_like_x(t, x0)
        mu_t = self.compute_mu_t(x0, x1, t)
        sigma_t_prime_over_sigma_t = (1 - 2 * t) / (2 * t * (1 - t) + 1e-8)
        ut = sigma_t_prime_over_sigma_t * (xt - mu_t)
        if ut.dtype == torch.result_type(ut, x1) == torch.result_type(ut, x0):
            return ut.add_(x1).sub_(x0)
        return ut + x1 - x0


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    """Albergo et al.'s trigonometric interpolant: ``mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1``,
    ``ut = pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0)``.

    Example::

        fm = VariancePreservingConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def compute_mu_t(self, x0, x1, t):
        t = pad_t_like_x(t, x0)
        return _combine(torch.cos(math.pi / 2 * t), x0, torch.sin(math.pi / 2 * t), x1)

    def compute_conditional_flow(self, x0, x1, t, xt):
        del xt
        t = pad_t_like_x(t, x0)
        # a - b == a + (-b) exactly, so the in-place sum rounds as TorchCFM's difference
        diff = _into(torch.mul(torch.cos(math.pi / 2 * t), x1), torch.mul(torch.sin(math.pi / 2 * t), x0).neg_())
        return diff.mul_(math.pi / 2)


#: compute_mu_t implementations that return a tensor nobody else holds (sample_xt may add into it)
_FRESH_MU = (
    ConditionalFlowMatcher.compute_mu_t,
    TargetConditionalFlowMatcher.compute_mu_t,
    VariancePreservingConditionalFlowMatcher.compute_mu_t,
)
