"""The replicated table: every rank holds all ``(num_points, num_caches)`` seeds, in memory or memory-mapped.

The storage (journal, lock, atomic replacement) is :class:`..table.SeedTable`; this class adds the
interface of :class:`.base.LoomTable`. Every rank applies every update, so reads need no communication
and writes of a local or grouped step gather the updates of all ranks first.
"""

from __future__ import annotations

from ..._io import atomic_save
from ..common import to_device
from ..table import SeedTable
from .base import LoomTable


class ReplicatedTable(SeedTable, LoomTable):
    """A whole seed table on this rank (``SeedTable.in_memory`` / ``create`` / ``open`` build one).

    Example::

        t = ReplicatedTable.in_memory((100, 2), "cpu", rows)      # rows(a, b) -> int64 (b - a, 2)
        t.write_global(grp, torch.tensor([3]), torch.tensor([1]), torch.tensor([42]), slice(0, 1))
    """

    gathers_group_updates = True

    @property
    def rows_held(self) -> tuple:
        return 0, self.seeds.shape[0]

    def read(self, grp, rows, slots):
        return self.seeds[rows, slots]

    def read_global(self, grp, rows, slots, mine):
        return self.seeds[rows, slots]

    def write_global(self, grp, rows, slots, values, mine):
        self.write(rows, slots, values)

    def write_local(self, grp, rows, slots, values, mine):
        self.write(rows, slots, grp.gather(values, self.device))

    def write_groups(self, grp, part, rows, slots, own, new):
        self.write(rows, slots, to_device(new, self.device))
        return new[grp.rank * part.b : (grp.rank + 1) * part.b]

    def write_same(self, rows, slots, values):
        self.write(rows, slots, values)

    def fingerprint(self) -> int:
        return int((self.seeds[: min(self.seeds.shape[0], 4096)] % 1000003).sum())

    def state(self) -> dict:
        return {}

    def save(self, grp, path, state):
        self.flush()
        atomic_save(state, path)
