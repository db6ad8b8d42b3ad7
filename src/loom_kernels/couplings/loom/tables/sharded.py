"""The sharded table: rank ``r`` holds the rows ``[r*N//W, (r+1)*N//W)``; reads and writes are all-to-alls.

Invariants:

- ``fetch`` and ``update`` are collectives (every rank calls them, possibly with nothing): two uneven
  all-to-alls of ``O(items)`` integers after one all-to-all of ``W`` row counts; values never leave the
  table's dtype, so a sharded coupling equals a replicated one bit for bit; a rank sends only its own
  items' entries (to their owners), never the whole batch's;
- the layout (``shard_bounds``) and the checkpoint files (one per rank plus a manifest) are ``shard_files.py``.
"""

from __future__ import annotations

import torch

from ...scopes.group import Group, to_device
from ...scopes.partition import Route
from .base import LoomTable
from .replicated import RowsFn, fill_rows
from .shard_files import new_save_id, save_shards, shard_bounds, write_manifest


class ShardedTable(LoomTable):
    """This rank's block of the ``(N, K)`` seed table, in memory on ``device``; ``seeds (hi - lo, K)`` int64.

    ``rows(a, b)`` gives global rows ``a..b-1`` (the initial table, or a checkpoint's). Example (on every
    rank of a gloo group)::

        t = ShardedTable(grp, 1000, 2, "cpu", rows)
        vals = t.read(grp, torch.tensor([3, 997]), torch.tensor([0, 1]))    # fetched from their owners
        t.update(grp, torch.tensor([3]), torch.tensor([0]), torch.tensor([42]))
    """

    gathers_group_updates = False  # owners write their groups' seeds to the table's owners directly

    def __init__(self, grp: Group, num_points: int, num_caches: int, device, rows: RowsFn):
        self.world, self.rank = grp.world, grp.rank
        self.bounds = shard_bounds(num_points, self.world)
        self.lo, self.hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self._bounds = torch.tensor(self.bounds[1:-1], dtype=torch.int64)
        self.seeds = torch.empty((self.hi - self.lo, num_caches), dtype=torch.int64, device=device)  # rows [lo, hi)
        self.replace(rows)

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def owner(self, rows: torch.Tensor) -> torch.Tensor:
        """The rank owning each global row (``rows`` int64, any device)."""
        return torch.bucketize(rows, self._bounds.to(rows.device), right=True)

    def _route(self, grp: Group, rows: torch.Tensor):
        """``(order, send counts, recv counts)``: items sorted by owner, and the counts every rank exchanges."""
        self._check_world(grp)
        owner = self.owner(rows)
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=self.world).cpu()
        recv = grp.all_to_all(send, [1] * self.world, [1] * self.world)
        return order, send.tolist(), recv.tolist()

    def fetch(self, grp: Group, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """``table[rows, slots]`` (``(n,)`` each, int64, on the table's device) from their owners; collective."""
        order, send, recv = self._route(grp, rows)
        req = grp.all_to_all(torch.stack([rows, slots], 1)[order], send, recv)
        vals = self.seeds[req[:, 0] - self.lo, req[:, 1]]
        back = grp.all_to_all(vals, recv, send)
        out = torch.empty_like(back)
        out[order] = back
        return out

    def update(self, grp: Group, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """``table[rows, slots] = values`` at their owners; collective. Ranks pass disjoint entries."""
        order, send, recv = self._route(grp, rows)
        got = grp.all_to_all(torch.stack([rows, slots, values], 1)[order], send, recv)
        self.seeds[got[:, 0] - self.lo, got[:, 1]] = got[:, 2]

    def write_owned(self, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Apply the entries of a global write that fall in this shard (every rank passes the same write)."""
        mine = (rows >= self.lo) & (rows < self.hi)
        self.seeds[rows[mine] - self.lo, slots[mine]] = values[mine]

    def replace(self, rows: RowsFn) -> None:
        lo = self.lo
        fill_rows(self.seeds, lambda a, b: rows(lo + a, lo + b))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def _check_world(self, grp: Group):
        if (grp.world, grp.rank) != (self.world, self.rank):
            raise ValueError(
                f"the sharded seed table was built for rank {self.rank} of {self.world}, but this call runs as rank "
                f"{grp.rank} of {grp.world}: save() and load() the coupling to move it to another world size"
            )

    # -- the LoomTable interface ----------------------------------------------------------------

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
