"""One factory for the couplings by name: the trainer, its command line and the study build them here.

``COUPLINGS`` are the names, the one list of them (the CLI's ``--coupling`` choices, the study's
variants); ``"fixed"`` is the paper's "fixed noise, no reassignment" ablation (:class:`FixedNoiseCoupling`),
the others the library's couplings. A new coupling adds its name here and one branch to ``make_coupling``.
"""

from __future__ import annotations

import torch

from .base import Coupling
from .fixed import FixedNoiseCoupling
from .independent import IndependentCoupling
from .loom import LoomCoupling
from .minibatch import MinibatchOTCoupling
from .reflow import ReflowCoupling
from .sinkhorn import SinkhornCoupling

__all__ = ["COUPLINGS", "make_coupling", "FixedNoiseCoupling"]

COUPLINGS = ("independent", "ot", "sinkhorn", "loom", "fixed", "reflow", "semidiscrete", "semidiscrete-seeded", "knn")
# C2OT's condition options (couplings/c2ot.py), taken from ``options`` by the couplings whose cost holds ``cond``
C2OT_OPTIONS = {
    "ot": ("cond_weight", "cond_metric", "cond_ratio", "oversample"),
    "sinkhorn": ("cond_weight", "cond_metric", "cond_ratio", "oversample"),
    "loom": ("cond_weight", "cond_metric", "cond_ratio"),
}


def make_coupling(
    name: str,
    num_points: int | None = None,
    shape=None,
    *,
    num_caches: int = 1,
    seed: int = 0,
    device=None,
    process_group=None,
    metric: str = "sqeuclidean",
    epsilon: float = 0.05,
    generator: torch.Generator | None = None,
    pairs=None,
    data=None,
    labels=None,
    options: dict | None = None,
) -> Coupling:
    """The coupling named ``name``, one of ``COUPLINGS``.

    Args:
        name: ``"independent"``, ``"ot"`` (minibatch OT), ``"sinkhorn"`` (entropic OT), ``"loom"`` (LOOM-CFM),
            ``"fixed"`` or ``"reflow"``.
        num_points: data items N (``"loom"``/``"fixed"``); with flips ``2 * len(data)`` (each view
            keeps its own noise).
        shape: one item's shape (``"loom"``/``"fixed"``).
        num_caches, seed, device, process_group: ``LoomCoupling``'s (``"fixed"`` uses ``seed``/``device``).
        metric: the pair cost, ``"sqeuclidean"`` (default) or ``"euclidean"`` (the LOOM-CFM code's); Sinkhorn's
            is always ``"sqeuclidean"``.
        epsilon, generator: ``SinkhornCoupling``'s (its relative epsilon and the generator of its draws).
        pairs: ``"reflow"``: the pairs folder (``loom_kernels.reflow``); the data are its targets.
        data, labels: the data set ``(N, *shape)`` (tensor or memmap) and its classes, for ``"semidiscrete"``
            (fresh noise: the trainer lets it choose each batch) and ``"semidiscrete-seeded"`` (LOOM's table
            filled from the cells every ``refresh_every`` epochs).
        options: ``"semidiscrete*"``: ``epsilon``, ``fit_steps`` (fitted here: at most that many steps, default
            20,000), ``fit_tol`` (stop once the cell masses are within it, RMS; default 0.05, as ``fit``'s),
            ``fit_batch``, ``refresh_every``, ``progress``, ``cond_weight``, ``cond_metric``, ``cond_ratio``;
            ``"knn"``: ``k`` (default 16), ``noise`` (``"randn"``, default, or ``"seeds"``: the candidates drawn
            from seeds, the fused CPU pass; ``KNNNoiseCoupling``); ``"ot"``, ``"sinkhorn"``, ``"loom"``: C2OT's
            ``C2OT_OPTIONS`` (LOOM: no ``oversample``).

    Example:
        >>> make_coupling("loom", 100, (2,), num_caches=4).num_caches
        4
    """
    c2ot = _c2ot_options(name, options)
    if name == "independent":
        return IndependentCoupling(metric=metric)
    if name == "ot":
        return MinibatchOTCoupling(metric=metric, **c2ot)
    if name == "sinkhorn":
        if metric != "sqeuclidean":
            raise ValueError(
                f"coupling 'sinkhorn' streams the squared Euclidean cost: metric must be 'sqeuclidean', got {metric!r}"
            )
        return SinkhornCoupling(epsilon, generator=generator, process_group=process_group, **c2ot)
    if name == "reflow":
        if pairs is None:
            raise ValueError("coupling 'reflow' needs pairs= (a pairs folder, --pairs DIR)")
        return ReflowCoupling(pairs)
    if name in ("loom", "fixed") and (num_points is None or shape is None):
        raise ValueError(f"coupling {name!r} needs num_points and shape, got {num_points!r} and {shape!r}")
    if name == "loom":
        return LoomCoupling(
            num_points,
            tuple(shape),
            num_caches=num_caches,
            seed=seed,
            device=device,
            process_group=process_group,
            metric=metric,
            **c2ot,
        )
    if name in ("semidiscrete", "semidiscrete-seeded", "knn"):
        return _new_coupling(name, num_points, shape, data, labels, dict(options or {}), seed, device, num_caches)
    if name == "fixed":
        return FixedNoiseCoupling(LoomCoupling(num_points, tuple(shape), seed=seed, device=device))
    raise ValueError(f"coupling must be one of {COUPLINGS}, got {name!r}")


def _c2ot_options(name, options) -> dict:
    """The C2OT options for ``name`` (checked by its constructor); any other key refused here, by name."""
    if name not in C2OT_OPTIONS:
        return {}
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(C2OT_OPTIONS[name]))
    if unknown:
        raise ValueError(f"options for coupling {name!r} may hold only {C2OT_OPTIONS[name]}, got {unknown}")
    return opts


def _new_coupling(name, num_points, shape, data, labels, opts, seed, device, num_caches):
    """The couplings of issue 32 (semidiscrete, fresh or seeded, and nearest-of-k), with their options."""
    if name == "knn":
        from .knn import KNNNoiseCoupling

        return KNNNoiseCoupling(opts.pop("k", 16), noise=opts.pop("noise", "randn"))
    from .semidiscrete import SemidiscreteCoupling
    from .semidiscrete_train import SemidiscreteSeededCoupling

    if data is None:
        raise ValueError(f"coupling {name!r} needs data= (the data set it fits its potential on)")
    steps, tol, batch = opts.pop("fit_steps", 20_000), opts.pop("fit_tol", 0.05), opts.pop("fit_batch", 256)
    progress, refresh = opts.pop("progress", True), opts.pop("refresh_every", 1)
    sd = SemidiscreteCoupling(data, labels=labels, seed=seed, device=device, **opts)
    if steps:
        sd.fit(steps, tol=tol, batch_size=batch, progress=progress)
    if name == "semidiscrete":
        return sd
    loom = LoomCoupling(num_points, tuple(shape), num_caches=num_caches, seed=seed, device=device)
    return SemidiscreteSeededCoupling(sd, loom, refresh_every=refresh)
