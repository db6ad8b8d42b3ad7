"""The process group as a coupling call sees it (``Group``): the collectives every coupling uses.

Every collective goes through ``_all_gather``, ``_all_to_all`` or ``Group.all_reduce``, so ``count_bytes()``
sees all the traffic a coupling makes (the bench and docs/scaling.md quote these counts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from ...cost import pairwise_cost


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``t`` to ``device``; host -> GPU goes through pinned memory so the copy never stalls the host
    (a pageable source lets the driver synchronize with the stream)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _default_group(process_group):
    """(group, world_size, rank) of the active process group, or (None, 1, 0) without one."""
    if process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None, 1, 0
        process_group = torch.distributed.group.WORLD
    world = torch.distributed.get_world_size(process_group)
    rank = torch.distributed.get_rank(process_group)
    return process_group, world, rank


def _comm_device(group):
    # NCCL moves CUDA tensors only; gloo (and the rest) are happy with CPU tensors.
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_COUNTERS: list = []  # the active count_bytes() dicts


@contextlib.contextmanager
def count_bytes():
    """Count the bytes this process sends and receives through the couplings' collectives.

    Logical payload, whatever the backend's algorithm: an all-gather of ``s`` bytes sends ``s`` and
    receives ``(W-1) s``; an all-to-all sends and receives what leaves and reaches other ranks.

    Example::

        with count_bytes() as c:
            coupling(x1, idx)
        print(c["sent"], c["received"], c["calls"])
    """
    counter = {"sent": 0, "received": 0, "calls": 0}
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _count(sent: int, received: int):
    for c in _COUNTERS:
        c["sent"] += sent
        c["received"] += received
        c["calls"] += 1


def _all_gather(t: torch.Tensor, group, world: int, device) -> torch.Tensor:
    """Concatenate along dim 0 the same-shaped tensor from every rank (rank order)."""
    src = to_device(t, device).contiguous()
    out = [torch.empty_like(src) for _ in range(world)]
    torch.distributed.all_gather(out, src, group=group)
    nbytes = src.numel() * src.element_size()
    _count(nbytes, (world - 1) * nbytes)
    return torch.cat(out, 0)


def _all_to_all(t: torch.Tensor, send: Sequence[int], recv: Sequence[int], rank: int, group, device) -> torch.Tensor:
    """Rows ``t[sum(send[:r]) : sum(send[:r+1])]`` go to rank ``r``; returns the rows received, by source rank.

    ``send``/``recv`` are row counts per rank (every rank must know its own, e.g. from a shared partition).
    """
    src = to_device(t, device).contiguous()
    out = src.new_empty((sum(recv), *src.shape[1:]))
    torch.distributed.all_to_all_single(out, src, list(recv), list(send), group=group)
    row = src.element_size() * math.prod(src.shape[1:])  # a rank may send nothing (src[0] would not exist)
    _count(row * (sum(send) - send[rank]), row * (sum(recv) - recv[rank]))
    return out


def check_whole_world(process_group, who: str):
    """Refuse a ``process_group`` smaller than the default group for a coupling whose state is one table.

    The ranks outside the group would keep their own tables, which diverge silently (and no agreement
    check can see them). Checked in the constructor: every rank raises at once, before any collective.
    """
    if process_group is None or not torch.distributed.is_initialized():
        return
    size, world = torch.distributed.get_world_size(process_group), torch.distributed.get_world_size()
    if size != world:
        raise ValueError(
            f"{who}'s process_group has {size} of the {world} ranks of the default group: its seed table is "
            f"shared by every rank, and a subgroup would let the tables of different subgroups diverge silently. "
            f"Pass process_group=None (the whole world) and scope='grouped' to solve small groups in parallel, or "
            f"give each independent job its own default group (its own torch.distributed.init_process_group)"
        )


class Group:
    """The process group as one coupling call sees it: the exchange shared by every coupling.

    ``world == 1`` (no group, or a group of one) makes every method a no-op or a local computation, so
    the couplings have one code path. Collectives run on ``cdev`` (the CUDA device under NCCL).
    """

    def __init__(self, process_group, local: bool = False):
        # local: the call couples this rank's batch alone, as without a group
        self.group, self.world, self.rank = (None, 1, 0) if local else _default_group(process_group)
        self.cdev = _comm_device(self.group) if self.world > 1 else None

    def all_to_all(self, t: torch.Tensor, send: Sequence[int], recv: Sequence[int]) -> torch.Tensor:
        """Rows of ``t`` to each rank (``send[r]`` rows to rank ``r``, in rank order); the rows received
        (``recv[r]`` from rank ``r``, in rank order), on ``t``'s device."""
        if self.world == 1:
            return t
        return to_device(_all_to_all(t, send, recv, self.rank, self.group, self.cdev), t.device)

    def gather(self, t: torch.Tensor, device=None) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0 (rank order) on ``device`` (``t``'s by default)."""
        if self.world == 1:
            return t
        return to_device(_all_gather(t, self.group, self.world, self.cdev), t.device if device is None else device)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated on the communication device (no move back): for small checks."""
        return _all_gather(t, self.group, self.world, self.cdev)

    def all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        """``t`` reduced over the ranks with ``op`` (a ``torch.distributed.ReduceOp``), on ``t``'s device."""
        src = t.to(self.cdev).contiguous().clone()
        torch.distributed.all_reduce(src, op=op, group=self.group)
        nbytes = src.numel() * src.element_size()
        _count(nbytes, (self.world - 1) * nbytes)
        return src.to(t.device)

    def global_cost(self, x1f: torch.Tensor, noise: torch.Tensor, metric: str) -> torch.Tensor:
        """The ``(W*b, N)`` cost between every rank's data and ``noise (N, D)``, the same on every rank.

        ``x1f (b, D)`` is this rank's data. Ranks send what is smaller: their cost rows (``b x N``
        floats) or their data (``b x D``), never both; ``noise`` must already be the same on every rank.
        """
        if self.world == 1 or x1f.shape[1] >= noise.shape[0]:
            rows = pairwise_cost(x1f, noise, metric=metric)
            return self.gather(rows)
        return pairwise_cost(self.gather(x1f), noise, metric=metric)
