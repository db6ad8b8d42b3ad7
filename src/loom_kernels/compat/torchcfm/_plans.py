"""The plans behind ``OTPlanSampler``: the exact permutation (our solver), POT's entropic plans, and draws.

- exact, square batches: ``loom_kernels.assign`` on the tensors' device (Bertsekas' auction).
- sinkhorn / unbalanced / partial: POT's solvers (Flamary et al., "POT: Python Optimal Transport",
  JMLR 2021) on host tensors (TorchCFM's bit-identical call); off the host, sinkhorn by the native
  streamed solver (``loom_kernels.sinkhorn``), the others on POT's torch backend, so the cost and the
  plan stay on the tensors' device. :func:`entropic_plan` is the one place that chooses.
- draws with replacement repeat TorchCFM's ``np.random.choice(b0 * b1, p=pi.flatten(), size=b0)``:
  on the host with numpy's own call, on another device with the same uniforms from numpy's global
  RNG and numpy's inverse-CDF rule (``cdf.searchsorted(u, side="right")``), so only ``b0`` floats
  cross to the device and seeded runs draw the same pairs.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from ...cost import pairwise_cost
from ...couplings.base import check_cond, check_cond_weight, check_labels  # noqa: F401  (re-exported)
from ...couplings.c2ot import add_weighted_cond_cost, check_c2ot_options, cond_pair_cost, is_weight_rule, rule_weight
from ...couplings.scopes.solve import cost_dtype, solve

_POT_HINT = "install the extra with pip install 'loom_kernels[torchcfm]' (or pip install POT)"


def pot(what: str):
    """POT, or an ImportError that names the extra to install."""
    try:
        import ot
    except ImportError as exc:
        raise ImportError(f"{what} is solved by POT, which is not installed: {_POT_HINT}") from exc
    return ot


def check_reg(reg, what: str) -> float:
    """An entropic method's ``reg``: a positive finite number. TorchCFM hands any value to POT, which
    returns a plan costlier than independent pairs for a negative one and the independent plan for 0,
    without a word; both are refused here."""
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg <= 0:
        raise ValueError(
            f"reg must be a positive finite number for {what}, got {reg!r} (TorchCFM passes it to POT unchecked: "
            "reg < 0 gives a plan costlier than independent pairs and reg = 0 the independent plan; use "
            "method='exact' for the unregularised plan)"
        )
    return float(reg)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


def check_pair(x0, x1) -> None:
    if not isinstance(x0, torch.Tensor) or not isinstance(x1, torch.Tensor):
        raise TypeError(f"x0 and x1 must be torch.Tensors (b, *dim), got {type(x0).__name__} and {type(x1).__name__}")
    if x0.shape[1:] != x1.shape[1:] or x0.device != x1.device:
        raise ValueError(
            f"x0 and x1 must have the same shape (b, *dim) and device, got x0 {tuple(x0.shape)} on {x0.device} "
            f"and x1 {tuple(x1.shape)} on {x1.device}"
        )


def sq_cost(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean cost ``(n, m)`` between flattened rows; float64 stays float64 (as TorchCFM's cdist)."""
    a, b = flat(rows).detach(), flat(cols).detach()
    if a.dtype == torch.float64:
        return torch.cdist(a, b) ** 2
    dt = cost_dtype(a.dtype)
    return pairwise_cost(a.to(dt), b.to(dt), metric="sqeuclidean")


def check_cond_options(cond_weight, cond_metric, cond_ratio) -> tuple:
    """``OTPlanSampler``'s condition keywords, as the couplings check them: ``(cond_weight, cond_metric,
    cond_ratio)``; no ``oversample``: the sampler is given both batches."""
    why = "OTPlanSampler pairs the x0 it is given; draw k*b noise rows yourself, or use MinibatchOTCoupling"
    return check_c2ot_options(cond_weight, cond_metric, cond_ratio, no_oversample=why)[:3]


def exact_col(x0, x1, labels=None, cond=None, cond_weight=0.0, cond_metric="sqeuclidean", cond_ratio=0.5):
    """``col (b,)`` on the tensors' device: ``x0[col[k]]`` is paired with ``x1[k]`` in the exact plan.

    ``cond (b, Dc)`` float64 (``check_cond``'s output) or None: ``x0[j]`` carries ``cond[j]``, and the cost
    of pairing ``x1[k]`` with ``x0[j]`` gets ``cond_weight * d(cond_k, cond_j)`` (the couplings' term, C2OT's
    options included: ``couplings/c2ot.py``; ``"adaptive"``, ``"c2ot"``: per call)."""
    check_pair(x0, x1)
    cost = sq_cost(x1, x0)
    if cond is not None and is_weight_rule(cond_weight):  # "c2ot": x0[k] is item k's independent pair
        pen = cond_pair_cost(cond.to(cost.device), cond.to(cost.device), cond_metric)
        cond_weight = rule_weight(cond_weight, cost, pen, cond_ratio)
    cost = add_weighted_cond_cost(cost, cond, cond, cond_weight, cond_metric)
    return solve(cost, labels, data="x0 or x1")


def permutation_plan(col: torch.Tensor) -> np.ndarray:
    """POT's exact plan for the permutation: ``pi[col[k], k] = 1 / b`` (float64, host)."""
    n = col.shape[0]
    pi = np.zeros((n, n))
    pi[col.cpu().numpy(), np.arange(n)] = np.ones(n) / n  # ot.unif(n): the same float per entry
    return pi


def _entropic_fn(ot, method: str, reg: float, reg_m: float):
    return {
        "sinkhorn": partial(ot.sinkhorn, reg=reg),
        "unbalanced": partial(ot.unbalanced.sinkhorn_knopp_unbalanced, reg=reg, reg_m=reg_m),
        "partial": partial(ot.partial.entropic_partial_wasserstein, reg=reg),
    }[method]


def entropic_plan(method: str, x0, x1, reg: float, reg_m: float, normalize_cost: bool, native: bool | None = None):
    """POT's entropic plan ``(b0, b1)`` between the batches (TorchCFM's cost and uniform marginals).

    The one place that calls the entropic solvers. Host tensors: TorchCFM's own call (POT's numpy
    backend on the float32 cost), so the plan is bit-identical to TorchCFM's (numpy array); POT's torch
    backend is ~3x slower on 128x128 host problems. Other devices: ``"sinkhorn"`` is solved by
    :func:`native_sinkhorn_plan` (``loom_kernels.sinkhorn``, no POT needed), the other methods by
    :func:`entropic_plan_torch`; the plan stays on the device (float64 tensor). ``native=True``
    forces the native solver on the host as well (tests), ``False`` forbids it.
    """
    use_native = (x0.device.type != "cpu") if native is None else bool(native)
    if method == "sinkhorn" and use_native:
        return native_sinkhorn_plan(x0, x1, reg, normalize_cost)
    if x0.device.type != "cpu":
        return entropic_plan_torch(method, x0, x1, reg, reg_m, normalize_cost)
    ot = pot(f"OTPlanSampler(method={method!r})")
    M = torch.cdist(flat(x0), flat(x1)) ** 2
    if normalize_cost:
        M = M / M.max()
    return _entropic_fn(ot, method, reg, reg_m)(ot.unif(x0.shape[0]), ot.unif(x1.shape[0]), M.detach().cpu().numpy())


def native_sinkhorn_plan(
    x0, x1, reg: float, normalize_cost: bool, tol: float = 1e-9, max_iter: int = 1000
) -> torch.Tensor:
    """``ot.sinkhorn(unif, unif, M, reg)`` by ``loom_kernels.sinkhorn`` on the batches' device: float64 ``(b0, b1)``.

    TorchCFM's cost ``M = cdist(x0, x1)**2`` (``/ M.max()`` when ``normalize_cost``) in float64, absolute
    ``epsilon = reg``, POT's defaults (1000 iterations, a 1e-9 stop; no epsilon scaling, as POT): the
    same fixed point as POT's, so the plans agree to the solvers' tolerance. The plan is formed (the
    sampler draws from it with numpy's rule, as TorchCFM), which for a minibatch is small.
    """
    from ...sinkhorn import dense_plan, sinkhorn_cost

    M = torch.cdist(flat(x0).detach().double(), flat(x1).detach().double()) ** 2
    if normalize_cost:
        M = M / M.max()
    res = sinkhorn_cost(M, epsilon=float(reg), relative=False, tol=tol, max_iter=max_iter, eps_scaling=None)
    return dense_plan(res, cost=M)


def entropic_plan_torch(method: str, x0, x1, reg: float, reg_m: float, normalize_cost: bool) -> torch.Tensor:
    """POT's entropic plan on its torch backend: a float64 tensor ``(b0, b1)`` on the batches' device.

    POT gets TorchCFM's cost and uniform marginals as float64 tensors (mixed float32/float64 tensors
    fail in torch's matmul). TorchCFM's numpy call forms the kernel ``exp(-M / reg)`` in float32:
    where that underflows (``M / reg`` above ~87) its plan degenerates to the uniform fallback and
    this one does not; elsewhere the plans agree to ~1e-7 and seeded draws are the same.
    """
    ot = pot(f"OTPlanSampler(method={method!r})")
    M = torch.cdist(flat(x0), flat(x1)).detach() ** 2
    if normalize_cost:
        M = M / M.max()
    M = M.double()
    a = torch.full((x0.shape[0],), 1.0 / x0.shape[0], dtype=torch.float64, device=M.device)
    b = torch.full((x1.shape[0],), 1.0 / x1.shape[0], dtype=torch.float64, device=M.device)
    return _entropic_fn(ot, method, reg, reg_m)(a, b, M)


def pot_exact_plan(x0, x1, normalize_cost: bool, num_threads) -> np.ndarray:
    """POT's ``emd`` plan between batches of different sizes (host, as TorchCFM)."""
    ot = pot(f"OTPlanSampler(method='exact') between batches of {x0.shape[0]} and {x1.shape[0]} items")
    M = torch.cdist(flat(x0), flat(x1)) ** 2
    if normalize_cost:
        M = M / M.max()
    return ot.emd(ot.unif(x0.shape[0]), ot.unif(x1.shape[0]), M.detach().cpu().numpy(), numThreads=num_threads)


def draw_on_device(pi: torch.Tensor, batch_size: int):
    """``np.random.choice(pi.numel(), p=pi.flatten() / pi.sum(), size=batch_size)`` computed on pi's device.

    Uses numpy's global RNG exactly as that call does (``batch_size`` uniforms) and numpy's rule
    ``cdf = cumsum(p); cdf /= cdf[-1]; idx = searchsorted(cdf, u, right)``. Returns ``(i, j)`` int64
    tensors on pi's device.
    """
    p = pi.flatten().double()
    p = p / p.sum()
    cdf = torch.cumsum(p, 0)
    cdf = cdf / cdf[-1]
    u = torch.from_numpy(np.random.random_sample(batch_size)).to(cdf.device)
    idx = torch.searchsorted(cdf, u, right=True)
    return torch.div(idx, pi.shape[1], rounding_mode="floor"), idx % pi.shape[1]
