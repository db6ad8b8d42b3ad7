"""One factory for the couplings by name: the trainer, its command line and the study build them here.

``COUPLINGS`` are the names (the CLI's ``--coupling`` choices); ``"fixed"`` is the paper's "fixed
noise, no reassignment" ablation (:class:`FixedNoiseCoupling`), the others the library's couplings.
"""

from __future__ import annotations

import torch

from .base import Coupling
from .independent import IndependentCoupling
from .loom import LoomCoupling
from .minibatch import MinibatchOTCoupling

__all__ = ["COUPLINGS", "make_coupling", "FixedNoiseCoupling"]

COUPLINGS = ("independent", "ot", "loom", "fixed", "reflow")


class FixedNoiseCoupling(Coupling):
    """Fixed noise without reassignment: item i is always paired with ``noise(seeds[i, 0])``.

    Reads the seed table of a ``LoomCoupling`` (its initial, random pairing) and never reassigns it:
    the paper's "fixed source, no reassignment" ablation. Its ``stats`` (pre = post cost, 0 swaps)
    reach the trainer's log like every coupling's; it has no state of its own (the seeds are a pure
    function of the LoomCoupling's seed).

    Example:
        >>> from loom_kernels.couplings import LoomCoupling
        >>> c = FixedNoiseCoupling(LoomCoupling(100, (2,), seed=0))
        >>> x0, x1 = c(torch.randn(8, 2), torch.arange(8))
    """

    def __init__(self, loom: LoomCoupling):
        self.seeds = loom.seeds[:, :1].clone()  # (N, 1): one fixed noise per point
        self.shape = tuple(loom.shape)
        self.stats = {}

    def __call__(self, x1: torch.Tensor, indices=None, *, x0=None, labels=None):  # noqa: ARG002 - labels: no swaps
        from ..noise import gaussian_noise

        if x0 is not None:
            raise ValueError("FixedNoiseCoupling draws the noise from its seeds: x0 must be None")
        if indices is None:
            raise ValueError("FixedNoiseCoupling needs the dataset indices of the batch: call coupling(x1, indices)")
        idx = torch.as_tensor(indices)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(
                f"FixedNoiseCoupling(x1, indices): indices must be integer dataset indices, got dtype {idx.dtype}. "
                "Is this TorchCFM's argument order coupling(x0, x1)? Call coupling(x1, indices) with the data first"
            )
        idx = idx.to(device=self.seeds.device, dtype=torch.int64)
        if idx.shape != (x1.shape[0],):
            raise ValueError(f"indices must have shape (b,) = ({x1.shape[0]},) to match x1, got {tuple(idx.shape)}")
        x0 = gaussian_noise(self.seeds[idx, 0], self.shape, device=x1.device, dtype=x1.dtype)
        cost = (x1 - x0).flatten(1).square().sum(1).mean()
        self.stats = {"pre_cost": cost, "post_cost": cost, "swaps": 0}
        return x0, x1


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
    pairs=None,
) -> Coupling:
    """The coupling named ``name``, one of ``COUPLINGS``.

    Args:
        name: ``"independent"``, ``"ot"`` (minibatch OT), ``"loom"`` (LOOM-CFM) or ``"fixed"``.
        num_points: data items N (``"loom"``/``"fixed"``); with flips ``2 * len(data)`` (each view
            keeps its own noise).
        shape: one item's shape (``"loom"``/``"fixed"``).
        num_caches, seed, device, process_group: ``LoomCoupling``'s (``"fixed"`` uses ``seed``/``device``).
        metric: the pair cost, ``"sqeuclidean"`` (default) or ``"euclidean"`` (the LOOM-CFM code's).
        pairs: ``"reflow"``: the pairs folder (``loom_kernels.reflow``); the data are its targets.

    Example:
        >>> make_coupling("loom", 100, (2,), num_caches=4).num_caches
        4
    """
    if name == "independent":
        return IndependentCoupling(metric=metric)
    if name == "ot":
        return MinibatchOTCoupling(metric=metric)
    if name == "reflow":
        from .reflow import ReflowCoupling

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
        )
    if name == "fixed":
        return FixedNoiseCoupling(LoomCoupling(num_points, tuple(shape), seed=seed, device=device))
    raise ValueError(f"coupling must be one of {COUPLINGS}, got {name!r}")
