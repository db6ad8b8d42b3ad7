"""The collectives the couplings use under torch.distributed (one code path for every coupling).

Every collective goes through ``_all_gather`` or ``_all_to_all``, so ``count_bytes()`` sees all the
traffic a coupling makes (the bench and docs/scaling.md quote these counts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from ..cost import pairwise_cost
from .common import to_device


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
    """The process group as one coupling call sees it: the exchange shared by both OT couplings.

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

    def agree(self, who: str, sizes: dict, inputs: dict, config: dict, failed: bool = False):
        """One small all-gather that every rank makes before the call's collectives.

        Raises on every rank at once (none is left waiting in a collective) when: a rank ``failed`` its
        own input checks (that rank then raises its own error), the coupling's ``config`` (name -> int)
        differs, the ``sizes`` differ (the first one is the batch size), or an optional input (``inputs``:
        name -> given) is passed on some ranks only. Every rank must pass as many of each.
        """
        if self.world == 1:
            return
        vals = [int(failed), *sizes.values(), *(int(v) for v in inputs.values()), *config.values()]
        rows = _all_gather(torch.tensor([vals], dtype=torch.int64), self.group, self.world, self.cdev).cpu()
        bad_ranks = torch.nonzero(rows[:, 0]).flatten().tolist()
        if bad_ranks:
            if failed:
                return  # the caller raises its own error
            raise ValueError(
                f"rank(s) {bad_ranks} refused their input to {who} (see the error raised there); every rank "
                f"raises so that none waits in a collective"
            )
        # The configuration first: ranks built differently (another scope, say) disagree on the sizes too,
        # and the configuration is what to fix.
        cfg = rows[:, 1 + len(sizes) + len(inputs) :]
        bad = [name for j, name in enumerate(config) if (cfg[:, j] != cfg[0, j]).any()]
        if bad:
            raise ValueError(
                f"{who} differs across ranks ({', '.join(bad)}): build it with the same arguments on "
                f"every rank and resume every rank from the same checkpoint"
            )
        # Optional inputs before sizes: a cond passed on one rank only also differs in its column count,
        # and "passed on some ranks only" is what to fix.
        col = 1 + len(sizes)
        for j, name in enumerate(inputs):
            got = rows[:, col + j]
            if (got != got[0]).any():
                given = torch.nonzero(got).flatten().tolist()
                raise ValueError(
                    f"{name} must be passed on every rank or on none: rank(s) {given} passed {name}, "
                    f"rank(s) {torch.nonzero(got == 0).flatten().tolist()} did not"
                )
        for j, (name, _) in enumerate(sizes.items()):
            got = rows[:, 1 + j]
            if (got != got[0]).any():
                hint = " (use drop_last=True in the DataLoader/DistributedSampler)" if j == 0 else ""
                what = "a batch of the same size" if j == 0 else f"the same {name}"
                raise ValueError(f"every rank must pass {what} to {who}, got sizes {got.tolist()}{hint}")

    def global_cost(self, x1f: torch.Tensor, noise: torch.Tensor, metric: str) -> torch.Tensor:
        """The ``(W*b, N)`` cost between every rank's data and ``noise (N, D)``, the same on every rank.

        ``x1f (b, D)`` is this rank's data. Ranks send what is smaller: their cost rows (``b x N``
        floats) or their data (``b x D``), never both; ``noise`` must already be the same on every rank.
        """
        if self.world == 1 or x1f.shape[1] >= noise.shape[0]:
            rows = pairwise_cost(x1f, noise, metric=metric)
            return self.gather(rows)
        return pairwise_cost(self.gather(x1f), noise, metric=metric)
