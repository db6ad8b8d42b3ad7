"""The seed-table interface LOOM's steps and persistence talk to, whatever the table's kind.

A table holds the ``(num_points, num_caches)`` int64 seeds, or this rank's block of them. The steps never
ask which kind it is: every difference between a replicated table (each rank holds every row) and a
sharded one (each rank one block, reads and writes are all-to-alls) lives in the implementations:
``replicated.ReplicatedTable`` (in memory or memory-mapped) and ``sharded.ShardedTable``.

Conventions: ``rows``/``slots`` are int64 on the table's ``device``; ``mine`` is the slice of this rank's
items in a global batch (``rank*b .. rank*b+b``); a method marked *collective* must be called on every
rank of ``grp`` (possibly with nothing), in the same order.
"""

from __future__ import annotations

import os

import torch

from ...scopes.group import Group
from ...scopes.partition import Partition


class LoomTable:
    """The seed table as LOOM's steps see it (an interface: every method is implemented by both kinds).

    Example (any kind, one process)::

        t = make_table("replicated", grp, 100, 2, "cpu", rows)   # see tables.make_table
        vals = t.read(grp, torch.tensor([3, 7]), torch.tensor([0, 1]))
        t.write_global(grp, torch.tensor([3, 7]), torch.tensor([0, 1]), vals.flip(0), slice(0, 2))
    """

    seeds: torch.Tensor  # the rows this rank holds, ``rows_held``
    #: True when a grouped step must all-gather every owner's new seeds (each rank keeps every row)
    gathers_group_updates: bool

    @property
    def device(self) -> torch.device:
        """Where ``seeds`` lives (the CPU for a memory-mapped table)."""
        raise NotImplementedError

    @property
    def rows_held(self) -> tuple:
        """``(lo, hi)``: the global rows ``seeds`` holds."""
        raise NotImplementedError

    def read(self, grp: Group, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``table[rows, slots]`` for the entries this rank asks about (``(n,)`` each); collective."""
        raise NotImplementedError

    def read_global(self, grp: Group, rows: torch.Tensor, slots: torch.Tensor, mine: slice) -> torch.Tensor:
        """``table[rows, slots]`` of a whole global batch (the same ``(W*b,)`` on every rank); collective."""
        raise NotImplementedError

    def write_global(
        self, grp: Group, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, mine: slice
    ) -> None:
        """``table[rows, slots] = values`` for a global batch every rank computed alike; collective."""
        raise NotImplementedError

    def write_local(
        self, grp: Group, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor, mine: slice
    ) -> None:
        """Every rank's own items ``rows[mine]`` get ``values (b,)`` (computed by that rank); collective."""
        raise NotImplementedError

    def write_groups(
        self, grp: Group, part: Partition, rows: torch.Tensor, slots: torch.Tensor, own: torch.Tensor, new: torch.Tensor
    ) -> torch.Tensor:
        """Store a grouped step's new seeds and return this rank's items' ``(b,)``, position order; collective.

        ``own``: the positions this rank solved (``part.lists[rank]``); ``new``: the global ``(W*b,)`` new
        seeds when ``gathers_group_updates``, else the owned items' ``(len(own),)``, list order."""
        raise NotImplementedError

    def write_same(self, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """A write every rank makes with the same arguments (``resample``): no communication."""
        raise NotImplementedError

    def replace(self, rows) -> None:
        """Replace every held row with ``rows(a, b)`` (global rows ``a..b-1``, int64 ``(b - a, K)``)."""
        raise NotImplementedError

    def fingerprint(self) -> int:
        """A checksum of what must be equal on every rank (-1 when rows differ across ranks by design)."""
        raise NotImplementedError

    def state(self) -> dict:
        """The entries ``LoomCoupling.state_dict`` adds for this kind (beside ``seeds``)."""
        raise NotImplementedError

    def save(self, grp: Group, path: str | os.PathLike, state: dict) -> None:
        """Write the coupling's ``state`` (its ``state_dict``) to ``path``, atomically with checksums."""
        raise NotImplementedError

    def flush(self) -> None:
        """Persist what a file-backed table holds (a no-op in memory)."""

    def close(self) -> None:
        """Release the table's file (a no-op in memory); the table must not be used afterwards."""
