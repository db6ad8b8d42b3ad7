"""The sharded table: rank ``r`` holds the rows ``[r*N//W, (r+1)*N//W)``; reads and writes are all-to-alls.

The shard storage, routing and checkpoint files are :mod:`..sharded`; this class adds the interface of
:class:`.base.LoomTable`. Values never leave int64, so every step gives the replicated table's results
bit for bit; a rank sends only its own items' entries (to their owners), never the whole batch's.
"""

from __future__ import annotations

from ..common import to_device
from ..grouped import Route
from ..sharded import ShardedSeedTable, new_save_id, save_shards, write_manifest
from .base import LoomTable


class ShardedTable(ShardedSeedTable, LoomTable):
    """This rank's block of the seed table (in memory); built like ``ShardedSeedTable(grp, N, K, device, rows)``.

    Example (on every rank of a gloo group)::

        t = ShardedTable(grp, 1000, 2, "cpu", rows)
        vals = t.read(grp, torch.tensor([3, 997]), torch.tensor([0, 1]))    # fetched from their owners
    """

    gathers_group_updates = False  # owners write their groups' seeds to the table's owners directly

    @property
    def rows_held(self) -> tuple:
        return self.lo, self.hi

    def read(self, grp, rows, slots):
        return self.fetch(grp, rows, slots)

    def read_global(self, grp, rows, slots, mine):
        return grp.gather(self.fetch(grp, rows[mine], slots[mine]))  # every rank fetches its own b seeds

    def write_global(self, grp, rows, slots, values, mine):
        self.update(grp, rows[mine], slots[mine], values[mine])

    def write_local(self, grp, rows, slots, values, mine):
        self.update(grp, rows[mine], slots[mine], to_device(values, self.device))

    def write_groups(self, grp, part, rows, slots, own, new):
        self.update(grp, rows[own], slots[own], to_device(new, self.device))
        return Route(part, grp).to_homes(new)  # each item's new seed back to its rank

    def write_same(self, rows, slots, values):
        self.write_owned(rows, slots, values)

    def fingerprint(self) -> int:
        return -1  # a shard's rows differ across ranks: only the table kind is compared

    def state(self) -> dict:
        return {"shard_rows": [self.lo, self.hi], "world": self.world}

    def save(self, grp, path, state):
        save_id = new_save_id(grp)
        save_shards(grp, self, path, save_id, state["config"])
        manifest = {k: v for k, v in state.items() if k not in ("seeds", "shard_rows")}
        manifest.update(save_id=save_id, world=grp.world, bounds=self.bounds)
        write_manifest(grp, manifest, path)
