"""Reflow coupling: the fixed pairs of a pairs folder (``loom_kernels.reflow``), noise regenerated from seeds."""

from __future__ import annotations

import torch

from ..noise import gaussian_noise
from .base import Coupling, check_cond, check_flag, check_labels, check_x1

__all__ = ["ReflowCoupling"]


class ReflowCoupling(Coupling):
    """Pairs each stored target with the noise it was generated from (Liu et al., 2023, rectified flow's reflow).

    ``pairs``: a pairs folder path or an opened ``PairsFolder`` (finished; checked on open). The data are
    the stored targets (``loom_kernels.reflow.pairs_dataset(pairs)``: item ``i`` is ``(i, target_i[,
    label_i])``), and ``coupling(x1, indices)`` returns ``x0[k] = gaussian_noise(seeds[indices[k]])``: the
    exact noise the target came from, regenerated on ``x1``'s device in ``x1``'s dtype. ``indices`` are
    required (the seeds are looked up by them); ``x0`` must be None (the noise is the pairs'). ``labels``
    given must equal the stored labels of those pairs (pairs without labels accept any: no noise changes
    item, so none crosses a class); ``cond`` is checked and otherwise unused. No
    reassignment: ``stats`` has pre = post cost, 0 swaps; ``return_indices=True`` gives ``arange(b)``. No
    state (the folder is the state).

    Example::

        ds = pairs_dataset("pairs/")
        coupling = ReflowCoupling("pairs/")
        x0, x1 = coupling(*reversed(ds.batch(idx)[:1]), idx)   # or via train(..., coupling)
    """

    def __init__(self, pairs, *, verify: bool = True):
        from ..reflow.store import open_pairs

        self.pairs = open_pairs(pairs, verify=verify)
        self.seeds = torch.from_numpy(self.pairs.seeds.copy())
        self.labels = None if self.pairs.labels is None else torch.from_numpy(self.pairs.labels.copy())
        self.shape = tuple(self.pairs.shape)
        self.stats = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False):
        check_x1(x1)
        b = x1.shape[0]
        check_labels(labels, b, x1.device)
        check_cond(cond, b, x1.device)
        check_flag(return_indices, "return_indices")
        if x0 is not None:
            raise ValueError("ReflowCoupling regenerates the noise from the pairs' seeds: x0 must be None")
        if indices is None:
            raise ValueError(
                "ReflowCoupling needs the dataset indices of the batch (its pairs): call coupling(x1, indices)"
            )
        idx = torch.as_tensor(indices)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(
                f"ReflowCoupling(x1, indices): indices must be integer pair indices, got dtype {idx.dtype}. Is this "
                "TorchCFM's argument order coupling(x0, x1)? Call coupling(x1, indices) with the data first"
            )
        if idx.shape != (b,):
            raise ValueError(f"indices must have shape (b,) = ({b},) to match x1, got {tuple(idx.shape)}")
        idx = idx.to("cpu", torch.int64)
        n = len(self.seeds)
        if b and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(
                f"indices must lie in [0, {n}) (the pairs folder's size), got [{int(idx.min())}, {int(idx.max())}]"
            )
        if tuple(x1.shape[1:]) != self.shape:
            raise ValueError(f"x1 must hold items of the pairs' shape {self.shape}, got {tuple(x1.shape[1:])}")
        if labels is not None and self.labels is not None:  # without stored labels: nothing crosses a class
            if not torch.equal(labels.cpu().long(), self.labels[idx]):
                raise ValueError(
                    "labels differ from the labels stored with these pairs: the batch is not the pairs' data"
                )
        x0 = gaussian_noise(self.seeds[idx], self.shape, device=x1.device, dtype=x1.dtype)
        cost = (x1 - x0).flatten(1).double().pow(2).sum(1)
        mean = cost.mean() if b else cost.sum()
        self.stats = {"pre_cost": mean, "post_cost": mean, "swaps": torch.zeros((), dtype=torch.int64)}
        return (x0, x1, torch.arange(b, device=x1.device)) if return_indices else (x0, x1)
