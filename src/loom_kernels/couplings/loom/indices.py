"""LOOM's input checks (``check_inputs``) and index checks: dataset indices must lie in ``[0, num_points)`` and
be distinct within a (global) batch; ``resample_rows`` draws fresh seeds for named rows.

Host indices are checked at once; device indices are flagged on the device and checked after the solve's
own host sync (no extra stall), while clamped copies keep the table's gathers in bounds meanwhile.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import check_cond, check_flag, check_labels, check_x1
from ..c2ot import check_cond_range
from .seed_stream import seed_values


def check_inputs(coupling, x1, indices, x0, labels, cond, return_indices) -> tuple:
    """A call's inputs checked against ``coupling`` (a ``LoomCoupling``): ``(indices, labels, cond)``."""
    check_x1(x1)
    if tuple(x1.shape[1:]) != coupling.shape:
        raise ValueError(f"x1 must have shape (b, {', '.join(map(str, coupling.shape))}), got {tuple(x1.shape)}")
    if x1.device != coupling.device:
        raise ValueError(
            f"x1 is on {x1.device} but the coupling computes on {coupling.device}; "
            f"build it with LoomCoupling(..., device={str(x1.device)!r}) or move x1"
        )
    if x0 is not None:
        raise ValueError(
            "LoomCoupling draws the noise from its seed table: x0 must be None (use "
            "MinibatchOTCoupling to pair a given noise batch)"
        )
    indices = as_index_tensor(indices, x1.shape[0], x1.shape, coupling.table_device)
    check_flag(return_indices, "return_indices")
    cond = check_cond(cond, x1.shape[0], x1.device)
    check_cond_range(cond, coupling.cond_term.value, coupling.cond_metric)
    return indices, check_labels(labels, x1.shape[0], x1.device), cond


def resample_rows(table, seed: int, start: int, num_points: int, indices) -> int:
    """Give the rows ``indices`` of ``table`` (all when None) fresh seeds, numbers ``start`` on of the stream of
    ``seed``, every cache slot; returns the next unused seed number."""
    k = table.seeds.shape[1]
    if indices is None:
        table.replace(lambda a, b: seed_values(seed, start + a * k, (b - a) * k).reshape(b - a, k))
        return start + num_points * k
    idx = resample_indices(indices, num_points)
    if len(idx):
        vals = torch.from_numpy(seed_values(seed, start, len(idx) * k))
        rows = idx.repeat_interleave(k).to(table.device)
        slots = torch.arange(k).repeat(len(idx)).to(table.device)
        table.write_same(rows, slots, vals.to(table.device))
    return start + len(idx) * k


def as_index_tensor(indices, b: int, x1_shape: tuple, table_device: torch.device) -> torch.Tensor:
    """``indices`` as an int64 ``(b,)`` tensor on the CPU or ``table_device``, or a clear error."""
    if indices is None:
        raise ValueError("LoomCoupling needs the dataset indices of the batch: call coupling(x1, indices)")
    if not isinstance(indices, torch.Tensor):
        indices = torch.as_tensor(np.asarray(indices))
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise TypeError(
            f"LoomCoupling(x1, indices, *, labels=None): indices must be integer dataset indices, got dtype "
            f"{indices.dtype}. Is this TorchCFM's argument order coupling(x0, x1)? LOOM draws the noise itself: "
            f"call coupling(x1, indices) with the data first"
        )
    if indices.dim() != 1 or indices.shape[0] != b:
        raise ValueError(
            f"indices must have shape (b,) = ({b},) to match x1 {tuple(x1_shape)}, got {tuple(indices.shape)}"
        )
    if indices.device.type != "cpu" and indices.device != table_device:
        raise ValueError(f"indices must be on the table's device {table_device} (or on the CPU), got {indices.device}")
    return indices.to(torch.int64)


def resample_indices(indices, num_points: int) -> torch.Tensor:
    """``resample``'s rows: int64 ``(n,)`` on the CPU, each in range and distinct, or a clear error."""
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"indices must have an integer dtype, got {idx.dtype}")
    idx = idx.reshape(-1).to(torch.int64).cpu()
    if len(idx) and bool(index_flags(idx, num_points).any()):
        raise_index_error(idx, num_points, where="a resample call")
    return idx


def index_flags(idx: torch.Tensor, num_points: int) -> torch.Tensor:
    """Device tensor [any out of range, any duplicate] (no host sync)."""
    out = ((idx < 0) | (idx >= num_points)).any()
    if idx.shape[0] > 1:
        s = torch.sort(idx).values
        dup = (s[1:] == s[:-1]).any()
    else:
        dup = torch.zeros((), dtype=torch.bool, device=idx.device)
    return torch.stack([out, dup])


def raise_index_error(idx: torch.Tensor, num_points: int, where: str = "the batch") -> None:
    """Raise the error that names what is wrong with ``idx`` (out of range first, then repeated)."""
    idx = idx.cpu()
    bad = idx[(idx < 0) | (idx >= num_points)]
    if len(bad):
        raise ValueError(
            f"indices must lie in [0, num_points) = [0, {num_points}), got {int(bad[0])} "
            f"({len(bad)} out of range, min {int(idx.min())}, max {int(idx.max())}); for data augmentation "
            f"give each augmented view its own index (e.g. i + len(dataset) for flipped images) and size "
            f"num_points for all views"
        )
    vals, counts = torch.unique(idx, return_counts=True)
    rep = vals[counts > 1]
    if len(rep):
        raise ValueError(
            f"indices must be distinct within {where}: index {int(rep[0])} appears "
            f"{int(counts[counts > 1][0])} times ({len(rep)} repeated); two items would overwrite the same "
            f"noise slot. Sample without replacement (drop_last=True with DistributedSampler), or give "
            f"augmented views their own index (i + len(dataset))"
        )


class IndexCheck:
    """The global batch's indices ``g_idx (W*b,)``, checked: ``safe`` (clamped on a device) to index with,
    ``after_solve()`` to call once the solve has synchronized (raises for bad device indices).

    Example::

        check = IndexCheck(torch.tensor([3, 1]), num_points=10, world=1)   # host: checked here
        rows = check.safe
    """

    def __init__(self, g_idx: torch.Tensor, num_points: int, world: int):
        self.g_idx, self.num_points = g_idx, num_points
        self.flags = index_flags(g_idx, num_points)
        self.where = "the batch" if world == 1 else f"the global batch of all {world} ranks"
        on_host = g_idx.device.type == "cpu"
        if on_host and bool(self.flags.any()):
            raise_index_error(g_idx, num_points, self.where)
        self.safe = g_idx if on_host else g_idx.clamp(0, num_points - 1)

    def after_solve(self) -> None:
        if self.flags.device.type != "cpu" and bool(self.flags.any()):  # the queue is empty after assign: cheap
            raise_index_error(self.g_idx, self.num_points, self.where)
