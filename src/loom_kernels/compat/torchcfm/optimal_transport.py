"""TorchCFM's ``torchcfm.optimal_transport`` (``OTPlanSampler``, ``wasserstein``) on loom_kernels' exact solver.

Names, signatures, return types and random-number use follow torchcfm 1.0 (Tong et al., "Improving
and generalizing flow-based generative models with minibatch optimal transport", TMLR 2024):

- ``method="exact"`` on square batches is solved by ``loom_kernels.assign`` on the tensors' device.
  Its plan equals POT's ``ot.emd`` plan on continuous data (a permutation matrix / b), and
  ``replace=True`` draws from it with TorchCFM's ``np.random.choice`` call, so seeded runs give the
  same pairs as TorchCFM. ``replace=False`` returns the exact permutation in ``x1``'s order.
- ``sinkhorn``, ``unbalanced``, ``partial``: POT's solvers (``_plans.entropic_plan``): TorchCFM's own
  call for host tensors (bit-identical plans), POT's torch backend on the tensors' device otherwise
  (no host copy; draws on the device from numpy's uniforms). Exact plans between batches of
  different sizes: POT's ``emd``.
- ``sample_plan_with_scipy``: TorchCFM's (newer than 1.0.7) assignment draw, on our solver.
- New: ``sample_plan(..., labels=y)``, class-conditional exact OT (noise never crosses classes), and
  ``sample_plan(..., cond=c)`` with the constructor's ``cond_weight``: continuous conditions, the exact
  plan of ``|x1_k - x0_j|^2 + cond_weight * ||c_k - c_j||^2`` (as the couplings' ``cond=``).

This module imports neither torchcfm nor POT (POT is imported when a POT method is used).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import torch

from . import _plans
from ._plans import check_labels as _check_labels
from ._plans import flat as _flat
from ._plans import solve as _solve

__all__ = ["OTPlanSampler", "wasserstein"]

_METHODS = ("exact", "sinkhorn", "unbalanced", "partial")


def _check_y(y, name: str, x, xname: str) -> None:
    """Labels drawn with the pairs must have one entry per row of their batch (else they are misaligned)."""
    if y is None:
        return
    n = y.shape[0] if hasattr(y, "shape") and len(y.shape) > 0 else (len(y) if hasattr(y, "__len__") else None)
    if n != x.shape[0]:
        got = f"shape {tuple(y.shape)}" if hasattr(y, "shape") else type(y).__name__
        raise ValueError(f"{name} must have one label per row of {xname}: length {x.shape[0]}, got {got}")


class OTPlanSampler:
    """TorchCFM's ``OTPlanSampler``: an OT plan between two minibatches (squared Euclidean cost) and draws from it.

    Args: as torchcfm's (``method`` in "exact", "sinkhorn", "unbalanced", "partial"; ``reg`` and
    ``reg_m`` for POT's entropic solvers; ``normalize_cost`` divides the cost by its max (no effect
    on an exact plan); ``num_threads`` is passed to POT's ``emd``; ``warn`` warns on a degenerate plan).
    New: ``cond_weight`` (float >= 0, default 1.0, or C2OT's ``"adaptive"`` / ``"c2ot"`` with ``cond_ratio``,
    None: the rule's default), the weight of ``cond=`` in ``sample_plan``, and ``cond_metric``
    (``"sqeuclidean"`` or ``"cosine"``).

    Shapes: ``x0 (b, *dim)``, ``x1 (b, *dim)``; ``get_map`` returns a numpy ``(b, b)`` plan.

    Example::

        sampler = OTPlanSampler(method="exact")
        x0, x1 = sampler.sample_plan(torch.randn(64, 2), torch.rand(64, 2), replace=False)
        x0, x1 = sampler.sample_plan(noise, data, replace=False, labels=classes)  # never crosses classes
        x0, x1 = sampler.sample_plan(noise, data, replace=False, cond=temperature[:, None])  # penalised
    """

    def __init__(
        self,
        method: str,
        reg: float = 0.05,
        reg_m: float = 1.0,
        normalize_cost: bool = False,
        num_threads: int | str = 1,
        warn: bool = True,
        *,
        cond_weight: float | str = 1.0,
        cond_metric: str = "sqeuclidean",
        cond_ratio: float | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"Unknown method: {method} (expected one of {_METHODS})")
        self.method = method
        self.reg = _plans.check_reg(reg, f"method={method!r}") if method != "exact" else reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.cond_weight, self.cond_metric, self.cond_ratio = _plans.check_cond_options(
            cond_weight, cond_metric, cond_ratio
        )
        if method != "exact":
            _plans.pot(f"OTPlanSampler(method={method!r})")  # fail at construction, as TorchCFM's import would

    @property
    def ot_fn(self):
        """TorchCFM's attribute: the POT function ``ot_fn(a, b, M)`` of this method (imports POT)."""
        ot = _plans.pot(f"OTPlanSampler(method={self.method!r}).ot_fn")
        return {
            "exact": partial(ot.emd, numThreads=self.num_threads),
            "sinkhorn": partial(ot.sinkhorn, reg=self.reg),
            "unbalanced": partial(ot.unbalanced.sinkhorn_knopp_unbalanced, reg=self.reg, reg_m=self.reg_m),
            "partial": partial(ot.partial.entropic_partial_wasserstein, reg=self.reg),
        }[self.method]

    def _ours(self, x0, x1) -> bool:
        """Whether our solver makes the plan: an exact plan between batches of the same size."""
        return self.method == "exact" and x0.shape[0] == x1.shape[0]

    def _plan(self, x0, x1):
        """The plan ``(b0, b1)``: numpy (exact) or a float64 tensor on the batches' device (entropic)."""
        if self._ours(x0, x1):
            return _plans.permutation_plan(_plans.exact_col(x0, x1))
        if self.method == "exact":
            p = _plans.pot_exact_plan(x0, x1, self.normalize_cost, self.num_threads)
        else:
            p = _plans.entropic_plan(self.method, x0, x1, self.reg, self.reg_m, self.normalize_cost)
        finite = bool(torch.isfinite(p).all()) if isinstance(p, torch.Tensor) else bool(np.all(np.isfinite(p)))
        if not finite:
            raise ValueError(
                f"the OT plan is not finite (method={self.method!r}, reg={self.reg}); check x0 and x1 "
                "for NaN/inf, or raise reg"
            )
        if abs(float(p.sum())) < 1e-8:
            if self.warn:
                warnings.warn("Numerical errors in OT plan, reverting to uniform plan.", stacklevel=3)
            p = torch.ones_like(p) / p.numel() if isinstance(p, torch.Tensor) else np.ones_like(p) / p.size
        return p

    def get_map(self, x0, x1) -> np.ndarray:
        """The OT plan ``pi (b0, b1)`` (numpy float64) between ``x0`` and ``x1``, as TorchCFM returns it."""
        p = self._plan(x0, x1)
        return p.cpu().numpy() if isinstance(p, torch.Tensor) else p

    def sample_map(self, pi: np.ndarray, batch_size: int, replace: bool = True):
        """Draw ``batch_size`` index pairs ``(i, j)`` from the plan ``pi`` with numpy's global RNG (as TorchCFM)."""
        p = pi.flatten()
        p = p / p.sum()
        choices = np.random.choice(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
        return np.divmod(choices, pi.shape[1])

    def _draw(self, x0, x1, replace: bool):
        """Index pairs ``(i, j)`` drawn from the plan (``b0`` of them), as TorchCFM's ``sample_map(get_map(...))``."""
        b0, b1 = x0.shape[0], x1.shape[0]
        if b0 == 0:  # nothing to draw (numpy would refuse the empty plan: "probabilities do not sum to 1")
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        if b1 == 0:
            raise ValueError(f"x1 is empty: cannot draw {b0} pairs for x0 from a plan with no target")
        p = self._plan(x0, x1)
        if isinstance(p, torch.Tensor) and (p.device.type != "cpu") and replace:
            return _plans.draw_on_device(p, b0)
        if isinstance(p, torch.Tensor):
            p = p.cpu().numpy()
        return self.sample_map(p, b0, replace=replace)

    def sample_plan(
        self, x0, x1, replace: bool = True, *, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ):
        """Pairs ``(x0[i], x1[j])`` from the OT plan; ``replace=False`` gives the exact permutation in ``x1``'s order.

        ``labels (b,)`` (integer, on ``x1``'s device; exact method, ``replace=False``): class-conditional
        OT, ``x0`` is only permuted within each class of ``x1``. ``cond (b, Dc)`` or ``(b,)`` (floating, on
        ``x1``'s device; exact method, ``replace=False``): one condition per item, ``x0[j]`` carrying
        ``cond[j]``; the plan is exact for ``|x1_k - x0_j|^2 + cond_weight * ||cond_k - cond_j||^2``
        (labels forbid, cond penalises; ``cond_weight=0`` is the plain plan).
        """
        _plans.check_pair(x0, x1)
        if labels is not None:
            self._check_labels_usable(x0, x1, replace)
            labels = _check_labels(labels, x1.shape[0], x1.device)
        if cond is not None:
            self._check_labels_usable(x0, x1, replace, "cond")
            cond = _plans.check_cond(cond, x1.shape[0], x1.device)
        if self._ours(x0, x1) and not replace:
            return x0[_plans.exact_col(x0, x1, labels, cond, *self._cond_options)], x1
        i, j = self._draw(x0, x1, replace)
        return x0[i], x1[j]

    def sample_plan_with_scipy(self, x0, x1):
        """TorchCFM's assignment draw: ``(x0, x1[j])`` with ``j`` the exact assignment of each row of ``x0``.

        As TorchCFM, both outputs are flattened to ``(b, D)`` and ``x0`` keeps its order. Square batches
        are solved by our solver (the same assignment as scipy's on continuous data), others by scipy.
        """
        _plans.check_pair(x0, x1)
        x0, x1 = _flat(x0), _flat(x1)
        if x0.shape[0] == x1.shape[0]:
            return x0, x1[_solve(_plans.sq_cost(x0, x1), data="x0 or x1")]
        from scipy.optimize import linear_sum_assignment

        M = torch.cdist(x0.detach(), x1.detach()) ** 2
        if self.normalize_cost:
            M = M / M.max()
        _, j = linear_sum_assignment(M.cpu().numpy())
        return x0, x1[j]

    @property
    def _cond_options(self) -> tuple:
        return self.cond_weight, self.cond_metric, self.cond_ratio

    def _check_labels_usable(self, x0, x1, replace, name="labels"):
        if self.method != "exact" or x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"{name} need method='exact' and batches of the same size, got method={self.method!r} with "
                f"{x0.shape[0]} and {x1.shape[0]} items"
            )
        if replace:
            raise ValueError(
                f"{name} need replace=False: with replace=True pairs are redrawn from the plan, so rows of x1 are "
                f"duplicated or dropped and no longer line up with {name} (use sample_plan_with_labels to get "
                "the drawn labels back)"
            )

    def sample_plan_with_labels(
        self, x0, x1, y0=None, y1=None, replace: bool = True, *, cond: torch.Tensor | None = None
    ):
        """TorchCFM's labelled draw: ``(x0[i], x1[j], y0[i], y1[j])`` from the (label-blind) OT plan.

        ``y0`` (``y1``) needs one entry per row of ``x0`` (``x1``). As in TorchCFM the plan ignores the
        labels; for OT that never crosses classes use ``sample_plan(x0, x1, replace=False, labels=y1)``.
        ``cond`` (new; exact method, ``replace=False``): the plan penalised as in ``sample_plan``.
        """
        _plans.check_pair(x0, x1)
        _check_y(y0, "y0", x0, "x0")
        _check_y(y1, "y1", x1, "x1")
        if cond is not None:
            self._check_labels_usable(x0, x1, replace, "cond")
            cond = _plans.check_cond(cond, x1.shape[0], x1.device)
        if self._ours(x0, x1) and not replace:
            col = _plans.exact_col(x0, x1, None, cond, *self._cond_options)
            return x0[col], x1, (y0[col] if y0 is not None else None), y1
        i, j = self._draw(x0, x1, replace)
        return x0[i], x1[j], (y0[i] if y0 is not None else None), (y1[j] if y1 is not None else None)

    def sample_trajectory(self, X):
        """OT trajectories through populations ``X (bs, times, *dim)``: numpy ``(bs, times, *dim)``, as TorchCFM."""
        pis = [self.get_map(X[:, t], X[:, t + 1]) for t in range(X.shape[1] - 1)]
        indices = [np.arange(X.shape[0])]
        for pi in pis:
            indices.append(np.array([np.random.choice(pi.shape[1], p=pi[i] / pi[i].sum()) for i in indices[-1]]))
        return np.stack([X[:, t][indices[t]] for t in range(X.shape[1])], axis=1)


def wasserstein(
    x0: torch.Tensor, x1: torch.Tensor, method: str | None = None, reg: float = 0.05, power: int = 2, **kwargs
) -> float:
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
    if method == "sinkhorn":
        _plans.check_reg(reg, "wasserstein(method='sinkhorn')")
    M = torch.cdist(_flat(x0), _flat(x1)).detach()
    if power == 2:
        M = M**2
    if method == "sinkhorn" or x0.shape[0] != x1.shape[0]:
        ot = _plans.pot(f"wasserstein(method={method!r}) between batches of {x0.shape[0]} and {x1.shape[0]} items")
        fn = partial(ot.sinkhorn2, reg=reg) if method == "sinkhorn" else ot.emd2
        a, b = ot.unif(x0.shape[0]), ot.unif(x1.shape[0])
        ret = float(fn(a, b, M.cpu().numpy(), numItermax=int(1e7)))
    else:
        col = _solve(M, data="x0 or x1")
        ret = float(M.gather(1, col[:, None]).double().sum() / max(M.shape[0], 1))
    return math.sqrt(ret) if power == 2 else ret
