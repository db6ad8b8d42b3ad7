"""TorchCFM's OT plan sampler and flow matchers on loom_kernels' exact solver: change the import line.

``from torchcfm.optimal_transport import OTPlanSampler`` becomes
``from loom_kernels.compat.torchcfm import OTPlanSampler`` (likewise ``wasserstein``,
``ConditionalFlowMatcher``, ``ExactOptimalTransportConditionalFlowMatcher``, ``pad_t_like_x``).
Names, signatures, return types and random-number use follow torchcfm 1.0 (Tong et al., "Improving
and generalizing flow-based generative models with minibatch optimal transport", TMLR 2024):

- ``method="exact"`` on square batches is solved by ``loom_kernels.assign`` on the tensors' device
  (no host copy of a CUDA batch with ``replace=False``). Its plan equals POT's ``ot.emd`` plan on
  continuous data (a permutation matrix / b), and ``replace=True`` draws from it with TorchCFM's
  ``np.random.choice`` call, so seeded runs give the same pairs as TorchCFM.
- ``replace=False`` returns the exact permutation in ``x1``'s order (``x0[k]`` is paired with
  ``x1[k]``) without using numpy's RNG; TorchCFM returns the same pairs in a random order.
- Methods solved by POT (sinkhorn, unbalanced, partial, and exact plans between batches of different
  sizes) hand off to POT when it is installed, else raise an ImportError naming the extra.
- New: ``sample_plan(..., labels=y)`` (class-conditional exact OT, noise never crosses classes) and
  :class:`LoomConditionalFlowMatcher` (LOOM-CFM's persistent coupling behind the same methods).

This module imports neither torchcfm nor POT.
"""
from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import torch

from ..cost import pairwise_cost
from ..couplings.common import check_labels as _check_labels
from ..couplings.common import cost_dtype as _cost_dtype
from ..couplings.common import solve as _solve
from ..couplings.loom import LoomCoupling

__all__ = [
    "OTPlanSampler",
    "wasserstein",
    "pad_t_like_x",
    "ConditionalFlowMatcher",
    "ExactOptimalTransportConditionalFlowMatcher",
    "LoomConditionalFlowMatcher",
]

_METHODS = ("exact", "sinkhorn", "unbalanced", "partial")
_POT_HINT = "install the extra with pip install 'loom_kernels[torchcfm]' (or pip install POT)"


def _pot(what: str):
    try:
        import ot
    except ImportError as exc:
        raise ImportError(f"{what} is solved by POT, which is not installed: {_POT_HINT}") from exc
    return ot


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


class OTPlanSampler:
    """TorchCFM's ``OTPlanSampler``: an OT plan between two minibatches (squared Euclidean cost) and draws from it.

    Args: as torchcfm's (``method`` in "exact", "sinkhorn", "unbalanced", "partial"; ``reg`` and
    ``reg_m`` for POT's entropic solvers; ``normalize_cost`` divides the cost by its max (no effect
    on an exact plan); ``num_threads`` is passed to POT's ``emd``; ``warn`` warns on a degenerate plan).

    Shapes: ``x0 (b, *dim)``, ``x1 (b, *dim)``; ``get_map`` returns a numpy ``(b, b)`` plan.

    Example::

        sampler = OTPlanSampler(method="exact")
        x0, x1 = sampler.sample_plan(torch.randn(64, 2), torch.rand(64, 2), replace=False)
        x0, x1 = sampler.sample_plan(noise, data, replace=False, labels=classes)  # never crosses classes
    """

    def __init__(self, method: str, reg: float = 0.05, reg_m: float = 1.0, normalize_cost: bool = False,
                 num_threads: int | str = 1, warn: bool = True) -> None:
        if method not in _METHODS:
            raise ValueError(f"Unknown method: {method} (expected one of {_METHODS})")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.ot_fn = None if method == "exact" else self._pot_fn()

    def _pot_fn(self):
        ot = _pot(f"OTPlanSampler(method={self.method!r})")
        return {
            "exact": partial(ot.emd, numThreads=self.num_threads),
            "sinkhorn": partial(ot.sinkhorn, reg=self.reg),
            "unbalanced": partial(ot.unbalanced.sinkhorn_knopp_unbalanced, reg=self.reg, reg_m=self.reg_m),
            "partial": partial(ot.partial.entropic_partial_wasserstein, reg=self.reg),
        }[self.method]

    def _ours(self, x0, x1) -> bool:
        """Whether our solver makes the plan: an exact plan between batches of the same size."""
        return self.method == "exact" and x0.shape[0] == x1.shape[0]

    def _exact_col(self, x0, x1, labels=None) -> torch.Tensor:
        """``col (b,)`` on the tensors' device: ``x0[col[k]]`` is paired with ``x1[k]`` in the exact plan."""
        if x0.shape[1:] != x1.shape[1:] or x0.device != x1.device:
            raise ValueError(
                f"x0 and x1 must have the same shape (b, *dim) and device, got x0 {tuple(x0.shape)} on {x0.device} "
                f"and x1 {tuple(x1.shape)} on {x1.device}"
            )
        a, b = _flat(x1).detach(), _flat(x0).detach()
        if a.dtype == torch.float64:  # keep TorchCFM's float64 cost (our kernels compute in float32)
            cost = torch.cdist(a, b) ** 2
        else:
            dt = _cost_dtype(a.dtype)
            cost = pairwise_cost(a.to(dt), b.to(dt), metric="sqeuclidean")
        return _solve(cost, labels, data="x0 or x1")

    @staticmethod
    def _plan(col: torch.Tensor) -> np.ndarray:
        """POT's exact plan for the permutation: ``pi[col[k], k] = 1 / b`` (float64, host)."""
        n = col.shape[0]
        pi = np.zeros((n, n))
        pi[col.cpu().numpy(), np.arange(n)] = np.ones(n) / n  # ot.unif(n): the same float per entry
        return pi

    def get_map(self, x0, x1) -> np.ndarray:
        """The OT plan ``pi (b0, b1)`` (numpy float64) between ``x0`` and ``x1``, as TorchCFM returns it."""
        if self._ours(x0, x1):
            return self._plan(self._exact_col(x0, x1))
        ot = _pot(f"OTPlanSampler(method={self.method!r}) between batches of {x0.shape[0]} and {x1.shape[0]} items")
        ot_fn = self.ot_fn if self.ot_fn is not None else self._pot_fn()
        a, b = ot.unif(x0.shape[0]), ot.unif(x1.shape[0])
        M = torch.cdist(_flat(x0), _flat(x1)) ** 2
        if self.normalize_cost:
            M = M / M.max()
        p = ot_fn(a, b, M.detach().cpu().numpy())
        if not np.all(np.isfinite(p)):
            raise ValueError(f"the OT plan is not finite (cost mean {float(M.mean())}, max {float(M.max())})")
        if np.abs(p.sum()) < 1e-8:
            if self.warn:
                warnings.warn("Numerical errors in OT plan, reverting to uniform plan.", stacklevel=2)
            p = np.ones_like(p) / p.size
        return p

    def sample_map(self, pi: np.ndarray, batch_size: int, replace: bool = True):
        """Draw ``batch_size`` index pairs ``(i, j)`` from the plan ``pi`` with numpy's global RNG (as TorchCFM)."""
        p = pi.flatten()
        p = p / p.sum()
        choices = np.random.choice(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
        return np.divmod(choices, pi.shape[1])

    def sample_plan(self, x0, x1, replace: bool = True, *, labels: torch.Tensor | None = None):
        """Pairs ``(x0[i], x1[j])`` from the OT plan; ``replace=False`` gives the exact permutation in ``x1``'s order.

        ``labels (b,)`` (integer, on ``x1``'s device; exact method, ``replace=False``): class-conditional
        OT, ``x0`` is only permuted within each class of ``x1``.
        """
        if labels is not None:
            self._check_labels_usable(x0, x1, replace)
            labels = _check_labels(labels, x1.shape[0], x1.device)
        if not self._ours(x0, x1):
            i, j = self.sample_map(self.get_map(x0, x1), x0.shape[0], replace=replace)
            return x0[i], x1[j]
        col = self._exact_col(x0, x1, labels)
        if not replace:
            return x0[col], x1
        i, j = self.sample_map(self._plan(col), x0.shape[0], replace=True)
        return x0[i], x1[j]

    def _check_labels_usable(self, x0, x1, replace):
        if self.method != "exact" or x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"labels need method='exact' and batches of the same size, got method={self.method!r} with "
                f"{x0.shape[0]} and {x1.shape[0]} items"
            )
        if replace:
            raise ValueError(
                "labels need replace=False: with replace=True pairs are redrawn from the plan, so rows of x1 are "
                "duplicated or dropped and no longer line up with labels (use sample_plan_with_labels to get "
                "the drawn labels back)"
            )

    def sample_plan_with_labels(self, x0, x1, y0=None, y1=None, replace: bool = True):
        """TorchCFM's labelled draw: ``(x0[i], x1[j], y0[i], y1[j])`` from the (label-blind) OT plan.

        As in TorchCFM the plan ignores the labels; for OT that never crosses classes use
        ``sample_plan(x0, x1, replace=False, labels=y1)``.
        """
        if self._ours(x0, x1) and not replace:
            col = self._exact_col(x0, x1)
            return x0[col], x1, (y0[col] if y0 is not None else None), y1
        i, j = self.sample_map(self.get_map(x0, x1), x0.shape[0], replace=replace)
        return x0[i], x1[j], (y0[i] if y0 is not None else None), (y1[j] if y1 is not None else None)

    def sample_trajectory(self, X):
        """OT trajectories through populations ``X (bs, times, *dim)``: numpy ``(bs, times, *dim)``, as TorchCFM."""
        pis = [self.get_map(X[:, t], X[:, t + 1]) for t in range(X.shape[1] - 1)]
        indices = [np.arange(X.shape[0])]
        for pi in pis:
            indices.append(np.array([np.random.choice(pi.shape[1], p=pi[i] / pi[i].sum()) for i in indices[-1]]))
        return np.stack([X[:, t][indices[t]] for t in range(X.shape[1])], axis=1)


def wasserstein(x0: torch.Tensor, x1: torch.Tensor, method: str | None = None, reg: float = 0.05,
                power: int = 2, **kwargs) -> float:
    """W1 or W2 (Euclidean ground cost) between two equal-weight point clouds ``x0 (b0, *dim)``, ``x1 (b1, *dim)``.

    ``method`` None or "exact" (ours for ``b0 == b1``, else POT's ``emd2``) or "sinkhorn" (POT). The
    cost is TorchCFM's (``torch.cdist``, squared for W2), so the value equals POT's on it.

    Example::

        w2 = wasserstein(torch.randn(256, 2), torch.randn(256, 2))
    """
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if method not in (None, "exact", "sinkhorn"):
        raise ValueError(f"Unknown method: {method} (expected None, 'exact' or 'sinkhorn')")
    M = torch.cdist(_flat(x0), _flat(x1)).detach()
    if power == 2:
        M = M ** 2
    if method == "sinkhorn" or x0.shape[0] != x1.shape[0]:
        ot = _pot(f"wasserstein(method={method!r}) between batches of {x0.shape[0]} and {x1.shape[0]} items")
        fn = partial(ot.sinkhorn2, reg=reg) if method == "sinkhorn" else ot.emd2
        a, b = ot.unif(x0.shape[0]), ot.unif(x1.shape[0])
        ret = float(fn(a, b, M.cpu().numpy(), numItermax=int(1e7)))
    else:
        col = _solve(M, data="x0 or x1")
        ret = float(M.gather(1, col[:, None]).double().sum() / max(M.shape[0], 1))
    return math.sqrt(ret) if power == 2 else ret


def pad_t_like_x(t, x):
    """Reshape times ``t (bs,)`` to ``(bs, 1, ..., 1)`` to broadcast against ``x (bs, *dim)``; numbers pass through."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class ConditionalFlowMatcher:
    """TorchCFM's independent CFM: ``xt ~ N(t x1 + (1 - t) x0, sigma^2)``, target ``ut = x1 - x0``.

    Example::

        fm = ConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def __init__(self, sigma: float | int = 0.0):
        self.sigma = sigma

    def compute_mu_t(self, x0, x1, t):
        t = pad_t_like_x(t, x0)
        return t * x1 + (1 - t) * x0

    def compute_sigma_t(self, t):
        del t
        return self.sigma

    def sample_xt(self, x0, x1, t, epsilon):
        mu_t = self.compute_mu_t(x0, x1, t)
        sigma_t = pad_t_like_x(self.compute_sigma_t(t), x0)
        return mu_t + sigma_t * epsilon

    def compute_conditional_flow(self, x0, x1, t, xt):
        del t, xt
        return x1 - x0

    def sample_noise_like(self, x):
        return torch.randn_like(x)

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """``(t (bs,), xt, ut)`` (and ``eps`` with ``return_noise``); ``t ~ U[0, 1]`` when not given."""
        if t is None:
            t = torch.rand(x0.shape[0]).type_as(x0)
        if len(t) != x0.shape[0]:
            raise ValueError(f"t must have shape (bs,) = ({x0.shape[0]},), got {tuple(t.shape)}")
        eps = self.sample_noise_like(x0)
        xt = self.sample_xt(x0, x1, t, eps)
        ut = self.compute_conditional_flow(x0, x1, t, xt)
        return (t, xt, ut, eps) if return_noise else (t, xt, ut)

    def compute_lambda(self, t):
        """The score weighting ``2 sigma_t / (sigma^2 + 1e-8)`` (Tong et al., SF2M)."""
        return 2 * self.compute_sigma_t(t) / (self.sigma**2 + 1e-8)


class ExactOptimalTransportConditionalFlowMatcher(ConditionalFlowMatcher):
    """TorchCFM's OT-CFM: the pairs are drawn from the exact minibatch OT plan (``OTPlanSampler("exact")``).

    Example::

        fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
        t, xt, ut = fm.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
    """

    def __init__(self, sigma: float | int = 0.0):
        super().__init__(sigma)
        self.ot_sampler = OTPlanSampler(method="exact")

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None, return_noise=False):
        """As TorchCFM: ``(t, xt, ut, y0, y1)`` (``eps`` last with ``return_noise``), labels drawn with the pairs."""
        x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        out = super().sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])


class LoomConditionalFlowMatcher(ConditionalFlowMatcher):
    """OT-CFM's methods on LOOM-CFM's persistent coupling (:class:`loom_kernels.couplings.LoomCoupling`).

    The noise comes from the coupling's seed table, so the calls take the batch's dataset indices
    (keyword ``indices``); ``x0`` may be ``None`` (a given ``x0`` must be shaped like ``x1`` and is not
    used). The batch keeps its order: ``x0[k]`` is ``x1[k]``'s noise. ``guided_...`` couples within
    the classes ``y1``. ``state_dict``/``load_state_dict`` checkpoint the coupling.

    Example::

        fm = LoomConditionalFlowMatcher(len(dataset), (3, 32, 32), sigma=0.0, num_caches=4, device="cuda")
        for idx, x1 in loader:
            t, xt, ut = fm.sample_location_and_conditional_flow(None, x1.cuda(), indices=idx)
    """

    def __init__(self, num_points: int, shape, sigma: float | int = 0.0, **options):
        super().__init__(sigma)
        self.coupling = LoomCoupling(num_points, shape, **options)

    def _couple(self, x0, x1, indices, labels=None):
        if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.shape != x1.shape):
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"x0 must be None or shaped like x1 {tuple(x1.shape)} (it is not used), got {got}")
        x0, _ = self.coupling(x1, indices, labels=labels)
        return x0

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False, *, indices=None,
                                             labels=None):
        x0 = self._couple(x0, x1, indices, labels)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None, return_noise=False,
                                                    *, indices=None):
        x0 = self._couple(x0, x1, indices, y1)
        out = super().sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])

    def state_dict(self) -> dict:
        return self.coupling.state_dict()

    def load_state_dict(self, state: dict):
        self.coupling.load_state_dict(state)
