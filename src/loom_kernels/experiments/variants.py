"""The study's variant table: the data sets, the variants (what each trains with, ``make_variant``),
their labels and the settings of the grid; ``LABELS`` also names the demo's couplings."""

from __future__ import annotations

import torch

from ..couplings.base import Coupling
from ..couplings.factory import COUPLINGS as COUPLING_NAMES

__all__ = [
    "COUPLINGS",
    "LABELS",
    "DATASETS",
    "VARIANTS",
    "SINKHORN_VARIANTS",
    "NEW_VARIANTS",
    "ALL_VARIANTS",
    "NFES",
    "DEFAULTS",
    "converge",
    "LargeBatchSinkhorn",
    "make_variant",
    "caches_of",
]

#: the couplings the demo compares: three of the factory's names (the others are study variants or need
#: inputs of their own, e.g. reflow's pairs)
COUPLINGS = ("independent", "ot", "loom")
assert set(COUPLINGS) <= set(COUPLING_NAMES)


DATASETS = ("8gaussians", "moons", "checkerboard", "digits")


VARIANTS = ("ot", "fixed", "converged", "loom1", "loom4", "loom16", "loom64")


# The entropic rival (issue 25 item 5; Klein et al. 2025): Sinkhorn couplings at the study's batch (32, for
# parity) and with the whole data set as one batch ("N"), at a relative epsilon (scale of the mean cost).
SINKHORN_VARIANTS = ("sinkhorn32_e0.1", "sinkhornN_e0.1", "sinkhornN_e0.01")


# The field's newer couplings (issue 32): semidiscrete OT with fresh noise, LOOM seeded from its cells, nearest-of-16.
NEW_VARIANTS = ("semidiscrete", "sdseeded", "knn16")


ALL_VARIANTS = ("independent",) + VARIANTS + SINKHORN_VARIANTS + NEW_VARIANTS


# Every name a table or figure prints: the demo's couplings and the study's variants.
LABELS = {
    "independent": "independent",
    "ot": "minibatch OT",
    "loom": "LOOM-CFM",
    "fixed": "fixed noise, no reassignment",
    "converged": "trained after convergence",
    "loom1": "LOOM 1 cache",
    "loom4": "LOOM 4 caches",
    "loom16": "LOOM 16 caches",
    "loom64": "LOOM 64 caches",
    **{v: f"Sinkhorn batch {v[8:].split('_')[0]}, eps {v.split('_e')[1]}" for v in SINKHORN_VARIANTS},
    "semidiscrete": "semidiscrete OT, fresh noise",
    "sdseeded": "LOOM seeded from semidiscrete cells",
    "knn16": "nearest of 16 noises",
}


NFES = (1, 2, 4, 8)  # Euler


# The default grid, sized to finish inside 30 minutes on 2 CPU cores (two runs at a time).
DEFAULTS = {
    "2d": dict(n=1024, steps=2000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=1024),
    "digits": dict(n=None, steps=2000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=None),
}


CONVERGE_RTOL = 1e-4  # "converged": an epoch of reassignment improves the dataset cost by less than this


CONVERGE_MAX_EPOCHS = 500


MAX_OPT_POINTS = 2048  # the global optimum (a dense exact assignment) only up to this many noise samples


def converge(coupling, x_train: torch.Tensor, batch_size: int, seed: int) -> list:
    """Sweeps LOOM's reassignment over the data set (random minibatches of ``batch_size``, one epoch at a
    time) until an epoch improves the dataset-wide cost by less than ``CONVERGE_RTOL`` (relative).

    Returns the curve ``[(epoch, dataset cost)]`` from epoch 0 (the initial table).
    """
    from ..metrics import dataset_cost

    gen = torch.Generator().manual_seed(seed + 4242)
    n = len(x_train)
    curve = [(0, dataset_cost(coupling, x_train))]
    for epoch in range(1, CONVERGE_MAX_EPOCHS + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(n // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            coupling(x_train[idx], idx)
        curve.append((epoch, dataset_cost(coupling, x_train)))
        if curve[-2][1] - curve[-1][1] <= CONVERGE_RTOL * curve[-2][1]:
            break
    return curve


class LargeBatchSinkhorn(Coupling):
    """The whole data set as one Sinkhorn batch (OTT's ``LinearOTDataloader`` pattern, Klein et al. 2025).

    Every ``refresh`` calls (one epoch of minibatches) it draws fresh noise for all ``N`` points, solves
    the ``N x N`` entropic problem (streamed) and draws each point's partner from its row of the plan;
    each minibatch call then returns its items' partners. Called as the library's couplings; ``cond`` is
    refused (the plan is unconditioned), ``return_indices=True`` also returns each item's partner's row of
    the epoch's noise.
    """

    def __init__(self, x_train: torch.Tensor, epsilon: float, refresh: int, seed: int):
        from ..couplings.factory import make_coupling

        self.x_train, self.refresh, self.calls = x_train, max(1, refresh), 0
        self.gen = torch.Generator().manual_seed(seed + 777)
        self.inner = make_coupling("sinkhorn", epsilon=epsilon, generator=self.gen)
        self.x0_all, self.rows_all, self.stats = None, None, {}

    def __call__(self, x1: torch.Tensor, indices=None, *, x0=None, labels=None, cond=None, return_indices=False):  # noqa: ARG002
        if cond is not None:
            raise ValueError("LargeBatchSinkhorn solves one unconditioned plan per epoch: cond must be None")
        if self.calls % self.refresh == 0:
            noise = torch.randn(self.x_train.shape, generator=self.gen, dtype=self.x_train.dtype)
            self.x0_all, _, self.rows_all = self.inner(self.x_train, x0=noise, return_indices=True)
            self.stats = dict(self.inner.stats)
        self.calls += 1
        idx = torch.as_tensor(indices)
        x0 = self.x0_all[idx].to(x1.device, x1.dtype)
        return (x0, x1, self.rows_all[idx].to(x1.device)) if return_indices else (x0, x1)


def make_variant(variant: str, n: int, shape, seed: int, x_train=None, batch_size: int = 32):
    from ..couplings.factory import make_coupling

    if variant in SINKHORN_VARIANTS:
        size, eps = variant[len("sinkhorn") :].split("_e")
        if size == "N":
            return LargeBatchSinkhorn(x_train, float(eps), n // batch_size, seed)
        return make_coupling("sinkhorn", epsilon=float(eps), generator=torch.Generator().manual_seed(seed + 777))
    if variant in ("independent", "ot", "fixed"):
        return make_coupling(variant, n, shape, seed=seed)
    if variant in NEW_VARIANTS:
        name = {"semidiscrete": "semidiscrete", "sdseeded": "semidiscrete-seeded", "knn16": "knn"}[variant]
        opts = {"k": 16} if variant == "knn16" else {"progress": False}  # the factory's fit: to 5% or 20,000 steps
        return make_coupling(name, n, shape, seed=seed, data=x_train, options=opts)
    caches = 1 if variant == "converged" else int(variant[len("loom") :])
    return make_coupling("loom", n, shape, num_caches=caches, seed=seed)


def caches_of(variant: str) -> int | None:
    """Noise caches per point of a variant with a finite noise set (None: fresh noise every step)."""
    if variant in ("independent", "ot") or variant in SINKHORN_VARIANTS + NEW_VARIANTS:  # sdseeded: refilled
        return None
    return 1 if variant in ("fixed", "converged") else int(variant[len("loom") :])
