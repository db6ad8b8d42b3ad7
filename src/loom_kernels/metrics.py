"""Offline metrics for flow-matching models and couplings.

- ``w2``: exact 2-Wasserstein distance between two equal-size empirical measures: the optimal
  matching of a linear assignment problem (``loom_kernels.assign``: exact Jonker-Volgenant
  shortest augmenting paths on the CPU, Bertsekas' epsilon-scaling auction on CUDA).
- ``straightness``: Liu, Gong, Liu, "Flow Straight and Fast: Learning to Generate and Transfer
  Data with Rectified Flow" (ICLR 2023), eq. (4): S = int_0^1 E ||(x1 - x0) - v(x_t, t)||^2 dt.
- ``coupling_cost``: the mean squared distance of the pairs a coupling hands to training.
- ``fid_from_features``: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge
  to a Local Nash Equilibrium" (NeurIPS 2017): the Frechet distance between Gaussians fitted to
  two sets of features that the caller computed with their own network (nothing is downloaded).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["coupling_cost", "dataset_cost", "fid_from_features", "global_optimum", "straightness", "w2"]


def _as_points(name, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or array of shape (N, *dims), got {type(x).__name__}") from None
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape (N, *dims), got a 0-d tensor")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be real-valued, got {x.dtype}")
    return x.detach().reshape(x.shape[0], math.prod(x.shape[1:])).to(torch.float64)


def _check_pair(x, y, what):
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"{what} need x and y of the same shape (N, *dims), got {tuple(x.shape)} and {tuple(y.shape)}")
    if hasattr(x, "device") and hasattr(y, "device") and x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")


def w2(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Exact 2-Wasserstein distance between the empirical measures of two point clouds.

    W2(x, y) = sqrt(min_perm mean_i ||x_i - y_perm(i)||^2), each cloud weighted uniformly.

    Args:
        x, y: (N, *dims) tensors (or arrays) of the same shape; rows are points, flattened.
            Unequal sizes are rejected (this is the equal-weight, equal-size case).

    Returns:
        float. The squared-Euclidean cost is built in float64 and solved by
        ``loom_kernels.assign.assign`` on the inputs' device: CPU tensors and arrays on the CPU,
        CUDA tensors on the GPU (no host copy of the points; the matching is optimal to
        ``assign``'s float64 tolerance, relative 1e-9). The returned value re-measures the
        matched pairs directly in float64, so it carries no matmul cancellation. Memory: an
        (N, N) float64 cost.

    Example:
        >>> import torch
        >>> x = torch.randn(256, 2)
        >>> w2(x, x.flip(0))
        0.0
    """
    _check_pair(x, y, "w2")
    xs, ys = _as_points("x", x), _as_points("y", y)
    if xs.shape[0] == 0:
        raise ValueError("w2 needs at least one point, got N = 0")
    if not (bool(torch.isfinite(xs).all()) and bool(torch.isfinite(ys).all())):
        raise ValueError("w2: x and y must be finite, got NaN or inf entries")
    from .assign import assign
    from .cost import sq_dists

    col = torch.as_tensor(assign(sq_dists(xs, ys)), device=xs.device)
    matched = (xs - ys[col]).square().sum(1).mean()
    return float(matched.sqrt())


def coupling_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Mean squared Euclidean distance between paired rows: mean_i ||x0_i - x1_i||^2.

    Args:
        x0, x1: (N, *dims) tensors (or arrays) of the same shape; row i of x0 is paired with row i
            of x1 (e.g. the output of a coupling). Computed in float64.

    Returns:
        float (0.0 for N = 0 is undefined: raises).

    Example:
        >>> import torch
        >>> coupling_cost(torch.zeros(3, 2), torch.ones(3, 2))
        2.0
    """
    _check_pair(x0, x1, "coupling_cost")
    a, b = _as_points("x0", x0), _as_points("x1", x1)
    if a.shape[0] == 0:
        raise ValueError("coupling_cost needs at least one pair, got N = 0")
    return float((a - b).square().sum(1).mean())


def straightness(model: Callable[..., torch.Tensor], x0: torch.Tensor, nfe: int, *, method: str = "euler") -> float:
    """Straightness of the sampled flow (Liu et al. 2023): 0 exactly when every path is straight.

    Integrates ``model`` from t=0 to t=1 with ``loom_kernels.sampler.sample(model, x0, nfe,
    method=method)`` and returns

        S = mean_b sum_k w_k ||v_k,b - (x1_b - x0_b)||^2

    where v_k are the nfe velocity evaluations along the trajectory, x1 is the sampled end point
    and w_k the method's own quadrature weights on [0, 1] (euler: h at each step's start; midpoint:
    h at each step's midpoint and 0 at its start; heun: h/2 at both ends of each step). These
    weights make sum_k w_k v_k = x1 - x0 exactly, so S is the weighted variance of each path's
    velocity around its chord: the discretization of int_0^1 E||(x1 - x0) - v(x_t, t)||^2 dt, the
    squared norm summed over all features, averaged over the batch. S = 0 for a model whose
    velocity is constant along each path (v = x1 - x0 of a straight coupling).

    Args:
        model: callable ``model(x, t)`` as in ``sample``.
        x0: (B, *dims) noise.
        nfe: model evaluations (even for midpoint and heun).
        method: "euler", "midpoint" or "heun".

    Returns:
        float, computed in float64 from the velocities (B * nfe * dims values are kept); the
        chord is taken as sum_k w_k v_k, which equals the sampled x1 - x0 without its rounding.

    Example:
        >>> import torch
        >>> straightness(lambda x, t: torch.ones_like(x), torch.randn(16, 2), nfe=4)
        0.0
    """
    from .sampler import Options, quadrature, sample

    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (B, *dims), got {type(x0).__name__}")
    _, weights = quadrature(method, nfe)
    if x0.ndim >= 1 and x0.shape[0] == 0:
        raise ValueError("straightness needs at least one sample, got B = 0")
    velocities = []
    sample(
        model,
        x0,
        nfe,
        method=method,
        options=Options(cuda_graph=False, velocity_hook=lambda v: velocities.append(v.detach().clone())),
    )
    flat = [v.reshape(x0.shape[0], -1).to(torch.float64) for v in velocities]
    # The chord as the method's own sum (== x1 - x0 up to the state's rounding, which would
    # otherwise leak into S for a perfectly straight flow).
    chord = sum(w * v for w, v in zip(weights, flat))
    total = sum(w * (v - chord).square().sum(1) for w, v in zip(weights, flat) if w != 0.0)
    return float(total.mean())


def _features(name, f) -> torch.Tensor:
    shape = tuple(f.shape) if isinstance(f, torch.Tensor) else np.shape(f)
    f = _as_points(name, f)
    if len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2 rows (a covariance needs two), got {shape}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf entries")
    return f


def _moments(f: torch.Tensor) -> tuple:
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)  # unbiased, as numpy.cov and pytorch-fid


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(s)
    return (vecs * vals.clamp_min(0.0).sqrt()) @ vecs.T


def fid_from_features(real_feats: torch.Tensor | np.ndarray, fake_feats: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    FID = ||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2)), with means ``mu`` and unbiased
    covariances ``S`` of the rows. The library ships no feature network and downloads nothing: compute
    the features with your own network (for numbers comparable with published FIDs, the pool3 features
    of the standard Inception-v3 FID weights on 50,000 samples) and pass them here.

    Args:
        real_feats: (N, D) tensor or array, one feature row per real image (N >= 2).
        fake_feats: (M, D) tensor or array, one row per generated image (M >= 2; M need not equal N).

    Returns:
        float. Computed in float64 on the inputs' device. tr((S_r S_f)^(1/2)) is taken as the sum of
        the square roots of the eigenvalues of the symmetric PSD matrix S_r^(1/2) S_f S_r^(1/2) (same
        spectrum as S_r S_f), so rank-deficient covariances (N <= D) need no regularising offset and
        the result has no imaginary part to discard. Memory and time: a few (D, D) float64 matrices,
        O(D^3) for the eigendecompositions.

    Example:
        >>> import torch
        >>> f = torch.randn(500, 8, dtype=torch.float64)
        >>> round(fid_from_features(f, f + 1.0), 6)  # a shift by 1 in each of 8 dimensions
        8.0
    """
    if hasattr(real_feats, "device") and hasattr(fake_feats, "device") and real_feats.device != fake_feats.device:
        raise ValueError(
            f"real_feats and fake_feats must be on the same device, got {real_feats.device} and {fake_feats.device}"
        )
    real, fake = _features("real_feats", real_feats), _features("fake_feats", fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"fid_from_features needs features of the same dimension D, got real_feats "
            f"{tuple(real.shape)} and fake_feats {tuple(fake.shape)}"
        )
    mu_r, s_r = _moments(real)
    mu_f, s_f = _moments(fake)
    root_r = _psd_sqrt(s_r)
    cross = torch.linalg.eigvalsh(root_r @ s_f @ root_r).clamp_min(0.0).sqrt().sum()
    fid = (mu_r - mu_f).square().sum() + torch.trace(s_r) + torch.trace(s_f) - 2.0 * cross
    return float(fid.clamp_min(0.0))  # rounding can take an exact 0 a hair below it


# ---- a seed table's dataset-wide cost and its floor (LOOM only permutes its seeds) -----------------


def dataset_cost(coupling, x_train: torch.Tensor) -> float:
    """A seed table's dataset-wide cost: mean over points and caches of ||x1_i - noise(seeds[i, k])||^2."""
    from .metrics import coupling_cost
    from .noise import gaussian_noise

    seeds = coupling.seeds
    total = 0.0
    for k in range(seeds.shape[1]):
        z = gaussian_noise(seeds[:, k], x_train.shape[1:], device=x_train.device)
        total += coupling_cost(z, x_train)
    return total / seeds.shape[1]


def global_optimum(seeds: torch.Tensor, x_train: torch.Tensor, max_points: int) -> float | None:
    """Mean cost of the exact assignment between a seed table's noise set and the data (each point once per cache).

    ``seeds`` (N, K). LOOM only permutes its seeds, so this optimum is the floor of its dataset-wide
    cost. None when N*K > ``max_points`` (a dense exact assignment needs (NK)^2 memory, ~(NK)^3 time).
    """
    if seeds.numel() > max_points:
        return None
    from .assign import assign
    from .cost import pairwise_cost
    from .noise import gaussian_noise

    z = gaussian_noise(seeds.reshape(-1), x_train.shape[1:], device=x_train.device)
    x = x_train.flatten(1).repeat_interleave(seeds.shape[1], dim=0)  # row i*K + k is entry (i, k)
    cost = pairwise_cost(x, z.flatten(1))
    col = assign(cost)
    return float(cost.gather(1, col[:, None]).double().mean())
