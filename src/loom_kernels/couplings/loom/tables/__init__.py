"""LOOM's seed tables behind one interface (:class:`.base.LoomTable`), one module per kind.

- ``base.py``: the interface the steps (``loom/steps.py``) and persistence use;
- ``replicated.py``: every rank holds the whole table, in memory or memory-mapped (storage and interface);
  its file's lock is ``file_lock.py``, its identity and journal ``journal.py``;
- ``sharded.py``: each rank holds one block of rows (storage, routing); its layout and checkpoint files
  ``shard_files.py``.

A new table kind is one class over ``base.LoomTable`` in a module of its own, added to ``make_table``.

``make_table`` builds either kind; ``rows_for`` says which rows a rank holds before its table exists.
"""

from __future__ import annotations

import os

from ...scopes.group import Group
from .base import LoomTable
from .journal import DEFAULT_DURABILITY
from .replicated import ReplicatedTable, RowsFn
from .shard_files import shard_bounds
from .sharded import ShardedTable

TABLES = ("replicated", "sharded")

__all__ = [
    "TABLES",
    "LoomTable",
    "ReplicatedTable",
    "ShardedTable",
    "check_table_args",
    "make_table",
    "mmap_path_for",
    "rows_for",
]


def check_table_args(kind: str, mmap_path) -> None:
    """Refuse an unknown kind, or a memory-mapped path for a sharded table (a clear error naming both)."""
    if kind not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {kind!r}")
    if kind == "sharded" and mmap_path is not None:
        raise ValueError(
            "table='sharded' keeps each rank's shard in memory (8*num_points*num_caches/W bytes); "
            "mmap_path is for the replicated table only: pass one or the other"
        )


def rows_for(kind: str, num_points: int, grp: Group) -> tuple:
    """``(lo, hi)``: the global rows a table of ``kind`` holds on this rank of ``grp``."""
    if kind == "replicated":
        return 0, num_points
    bounds = shard_bounds(num_points, grp.world)
    return bounds[grp.rank], bounds[grp.rank + 1]


def make_table(
    kind: str,
    grp: Group,
    num_points: int,
    num_caches: int,
    device,
    rows: RowsFn,
    *,
    mmap_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    durability: str = DEFAULT_DURABILITY,
) -> LoomTable:
    """A new table of ``kind`` holding ``rows(a, b)`` (global rows ``a..b-1``); a file when ``mmap_path``.

    Example::

        t = make_table("replicated", Group(None), 100, 2, "cpu", lambda a, b: initial_rows(a, b))
    """
    check_table_args(kind, mmap_path)
    shape = (num_points, num_caches)
    if kind == "sharded":
        return ShardedTable(grp, num_points, num_caches, device, rows)
    if mmap_path is None:
        return ReplicatedTable.in_memory(shape, device, rows)
    return ReplicatedTable.create(mmap_path, shape, rows, overwrite=overwrite, durability=durability)


def mmap_path_for(kind: str, saved_kind: str, saved_path):
    """The file a loaded table of ``kind`` maps by default: the saved one, when the kind is unchanged."""
    return saved_path if kind == saved_kind else None
