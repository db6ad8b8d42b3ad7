"""The sharded table's layout and checkpoint files (the table itself: ``sharded.py``).

Invariants:

- rows are owned in contiguous blocks (``bounds[r] = r*N//W``, sizes differ by at most one), so a shard is
  one slice of the replicated table, its initial seeds are one run of the seed stream, and loading on
  another world size reads only the overlapping ranges of the saved shards (a round-robin ``i mod W``
  layout balances a random batch no better and would make every rank scan every saved shard);
- a checkpoint is one file per rank (``save_shards``, written in parallel, each with its own checksum)
  plus a small manifest written by rank 0 last; each shard names the save it belongs to, so a shard of
  another save (another run, another step) is refused at load. Gathering to rank 0 instead would make one
  rank write all ``8*N*K`` bytes alone (48 GB at N = 10^9, K = 6) while the others wait.
"""

from __future__ import annotations

import os
import re
import secrets

import numpy as np
import torch

from ...._io import atomic_save, load_verified
from ...scopes.group import Group
from ..seed_stream import check_counter, count_duplicates, seed_numbers_checked

SHARD_KIND = "LoomCoupling table shard"


def shard_bounds(num_points: int, world: int) -> list:
    """``bounds`` with rank ``r`` owning rows ``[bounds[r], bounds[r+1])``: ``r*N//W`` (balanced blocks)."""
    return [r * num_points // world for r in range(world + 1)]


def shard_path(path: str, save_id: str, rank: int, world: int) -> str:
    """Where rank ``rank`` of ``world`` writes its shard of the save ``save_id`` of manifest ``path``."""
    return f"{os.fspath(path)}.{save_id}.shard{rank:05d}-of-{world:05d}"


# ---- checkpoints ------------------------------------------------------------------------------------


def new_save_id(grp: Group) -> str:
    """A random id drawn by rank 0 and shared with every rank (one tiny all-gather)."""
    mine = torch.tensor([[secrets.randbits(63) if grp.rank == 0 else 0]], dtype=torch.int64)
    return f"{int(grp.gather(mine)[0, 0]):016x}"


def save_shards(grp: Group, table, path: str, save_id: str, config: dict) -> None:
    """``table``: a ``ShardedTable``."""
    """Every rank writes its own shard file (atomically, with a checksum); raises on every rank if any failed."""
    err: BaseException | None = None
    try:
        atomic_save(
            {
                "kind": SHARD_KIND,
                "save_id": save_id,
                "rank": table.rank,
                "world": table.world,
                "rows": [table.lo, table.hi],
                "config": config,
                "seeds": table.seeds.cpu(),
            },
            shard_path(path, save_id, table.rank, table.world),
        )
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
        err = exc
    flags = grp.gather(torch.tensor([[int(err is not None)]], dtype=torch.int64))
    if err is not None:
        raise err
    bad = torch.nonzero(flags.flatten()).flatten().tolist()
    if bad:
        raise OSError(
            f"rank(s) {bad} failed to write their seed-table shard of {os.fspath(path)!r} (see the error "
            f"raised there); the previous checkpoint at that path is untouched"
        )


def write_manifest(grp: Group, manifest: dict, path) -> None:
    """Rank 0 writes the manifest (after every shard is on disk), then removes older saves' shards at ``path``.

    Until the rename of the manifest, the previous manifest and its shards are intact; every rank returns
    (or raises) only once the new manifest is in place.
    """
    path = os.fspath(path)
    err: BaseException | None = None
    if grp.rank == 0:
        try:
            atomic_save(manifest, path)
            _remove_stale_shards(path, manifest["save_id"])
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
            err = exc
    flags = grp.gather(torch.tensor([[int(err is not None)]], dtype=torch.int64))
    if err is not None:
        raise err
    if bool(flags.any()):
        raise OSError(f"rank 0 failed to write the manifest {path!r} (see the error raised there)")


def _remove_stale_shards(path: str, keep: str) -> None:
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.([0-9a-f]{16})\.shard\d{5}-of-\d{5}$")
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m and m.group(1) != keep:
            os.unlink(os.path.join(directory, name))


class ShardReader:
    """Global rows of a sharded checkpoint (``rows(a, b)``), read from the shard files it needs, each verified.

    ``manifest``: the dict saved at ``path`` (``save_id``, ``world``, ``bounds``, ``config``).
    """

    def __init__(self, path, manifest: dict):
        self.path = os.fspath(path)
        for key in ("save_id", "world", "bounds"):
            if key not in manifest:
                raise ValueError(f"{self.path!r} is not a sharded LoomCoupling manifest: missing {key!r}")
        self.save_id, self.world = manifest["save_id"], int(manifest["world"])
        self.bounds, self.config = list(manifest["bounds"]), manifest["config"]
        self._shards: dict = {}

    def _shard(self, r: int) -> torch.Tensor:
        if r in self._shards:
            return self._shards[r]
        p = shard_path(self.path, self.save_id, r, self.world)
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"seed-table shard {p!r} (rank {r} of {self.world}) of the checkpoint {self.path!r} does not exist: "
                f"every shard must be on a file system this rank can read (a shared directory)"
            )
        s = load_verified(p, "seed-table shard", mmap=True)
        expected = {
            "kind": SHARD_KIND,
            "save_id": self.save_id,
            "rank": r,
            "world": self.world,
            "rows": [self.bounds[r], self.bounds[r + 1]],
            "config": self.config,
        }
        wrong = {
            k: (s.get(k) if isinstance(s, dict) else None, v)
            for k, v in expected.items()
            if not isinstance(s, dict) or s.get(k) != v
        }
        if wrong:
            detail = ", ".join(f"{k}: file {a!r:.60} vs manifest {b!r:.60}" for k, (a, b) in wrong.items())
            raise ValueError(
                f"seed-table shard {p!r} does not belong to the checkpoint {self.path!r} ({detail}): a shard of "
                f"another save or another run; restore the shard files written with this manifest"
            )
        seeds = s["seeds"]
        k = int(self.config["num_caches"])
        if (
            not isinstance(seeds, torch.Tensor)
            or seeds.dtype != torch.int64
            or tuple(seeds.shape) != (self.bounds[r + 1] - self.bounds[r], k)
        ):
            raise ValueError(
                f"seed-table shard {p!r} holds {getattr(seeds, 'shape', seeds)!r:.60}, expected int64 "
                f"rows [{self.bounds[r]}, {self.bounds[r + 1]}) x {k}"
            )
        self._shards[r] = seeds
        return seeds

    def parts(self, a: int, b: int):
        """``(rank, rows)`` of each saved shard overlapping global rows ``a..b-1``, in order."""
        r = max(0, int(np.searchsorted(self.bounds, a, side="right")) - 1)
        while a < b and r < self.world:
            lo, hi = self.bounds[r], self.bounds[r + 1]
            stop = min(b, hi)
            if stop > a:
                yield r, self._shard(r)[a - lo : stop - lo]
            a, r = max(a, stop), r + 1

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Global rows ``a..b-1``, int64 ``(b - a, K)``."""
        parts = [p for _, p in self.parts(a, b)]
        return torch.cat(parts) if parts else torch.empty((0, int(self.config["num_caches"])), dtype=torch.int64)


def check_shards(reader: ShardReader, lo: int, hi: int, seed: int, next_counter, grp: Group | None = None) -> None:
    """Refuse a sharded checkpoint whose rows ``[lo, hi)`` (this rank's), or the union over ranks, are corrupt.

    As ``check_seed_table`` for a replicated table: every seed handed out by the stream of ``seed`` before
    ``next_counter``, and no seed twice, across shards as well as within one. ``grp``: the group of a
    sharded load (each rank holds only its rows); a collective then: the ranks exchange their seeds'
    stream numbers by value range (``O(rows / W)`` integers each) and all raise if any rank finds a fault.
    """
    where = f"the sharded checkpoint {reader.path!r}"
    err, numbers = None, np.empty(0, dtype=np.uint64)
    try:
        check_counter(next_counter, reader.bounds[-1] * int(reader.config["num_caches"]), where)
        parts = [
            seed_numbers_checked(part, seed, next_counter, shard_path(reader.path, reader.save_id, r, reader.world))
            for r, part in reader.parts(lo, hi)
        ]
        numbers = np.sort(np.concatenate(parts)) if parts else numbers
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank knows
        err = exc
    if grp is not None and grp.world > 1:
        failed = grp.gather(torch.tensor([[int(err is not None)]], dtype=torch.int64)).flatten()
        if err is None and bool(failed.any()):
            raise ValueError(
                f"rank(s) {torch.nonzero(failed).flatten().tolist()} refused {where} (see the error "
                f"raised there); every rank raises so that none waits in a collective"
            )
    if err is not None:
        raise err
    if grp is not None and grp.world > 1:
        dup = _count_duplicates_across(grp, numbers, int(next_counter))
    else:
        dup = count_duplicates(numbers)
    if dup:
        raise ValueError(
            f"{where} holds {dup} duplicated seeds across its shards: a corrupted or hand-edited "
            f"checkpoint (noise would be lost and doubled); restore the shard files saved with it"
        )


def _count_duplicates_across(grp: Group, numbers: np.ndarray, next_counter: int) -> int:
    """Duplicates in the union of every rank's sorted ``numbers``: rank ``r`` gathers the values in the
    ``r``-th slice of ``[0, next_counter)`` and counts its own; the total is summed over ranks."""
    splits = np.array([next_counter * r // grp.world for r in range(1, grp.world)], dtype=np.uint64)
    cuts = np.searchsorted(numbers, splits, side="left")
    send = np.diff(np.concatenate([[0], cuts, [len(numbers)]])).tolist()
    recv = grp.all_to_all(torch.tensor(send, dtype=torch.int64), [1] * grp.world, [1] * grp.world).tolist()
    got = grp.all_to_all(torch.from_numpy(numbers.view(np.int64)), send, recv).numpy().view(np.uint64)
    mine = count_duplicates(np.sort(got))
    return int(grp.gather(torch.tensor([[mine]], dtype=torch.int64)).sum())
