"""Where each step's data comes from: the device, the rank, the epoch order and the batch fetch, and the
data set's fingerprint kept in checkpoints."""

from __future__ import annotations

import hashlib

import torch

from ..data import IndexedDataset


def dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # A pure function of (seed, epoch): the same on every rank and after any resume.
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def fetch(dataset, idx: torch.Tensor):
    """``(x (b, *shape), y (b,) or None)`` of items ``idx``; datasets with ``batch()`` gather at once."""
    if hasattr(dataset, "batch") and isinstance(dataset, torch.utils.data.Dataset):
        return dataset.batch(idx)
    xs, ys = [], []
    for i in idx.tolist():
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) in (2, 3)):
            raise ValueError(
                f"dataset items must be (index, x) pairs or (index, x, y) triples, got "
                f"{type(item).__name__} for item {i}"
            )
        if int(item[0]) != i:
            raise ValueError(
                f"dataset item {i} returned index {int(item[0])}: items must be (index, x) with index == i"
            )
        xs.append(torch.as_tensor(item[1]))
        if len(item) == 3:
            ys.append(torch.as_tensor(item[2]))
    if ys and len(ys) != len(xs):
        raise ValueError("dataset items must all be (index, x) or all (index, x, y)")
    return torch.stack(xs), (torch.stack(ys).long() if ys else None)


def fingerprint(dataset) -> str:
    """Identifies the data set in checkpoints: its length and a hash of its contents (or of three items)."""
    h = hashlib.sha1(str(len(dataset)).encode())
    base = getattr(dataset, "base", dataset)
    h.update(type(dataset).__name__.encode())
    if isinstance(base, IndexedDataset):
        tensors = [base.data] + ([base.labels] if hasattr(base, "labels") else [])
    else:
        n = len(dataset)
        tensors = [torch.as_tensor(dataset[i][1]) for i in sorted({0, n // 2, n - 1})]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
