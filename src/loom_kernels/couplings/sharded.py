"""The old import path of the sharded table and its checkpoint files: ``loom/tables/sharded.py`` (``ShardedSeedTable``
is ``ShardedTable``) and ``loom/tables/shard_files.py``."""

from .loom.tables.shard_files import (
    SHARD_KIND,
    ShardReader,
    check_shards,
    new_save_id,
    save_shards,
    shard_bounds,
    shard_path,
    write_manifest,
)
from .loom.tables.sharded import ShardedTable

ShardedSeedTable = ShardedTable

__all__ = [
    "SHARD_KIND",
    "ShardReader",
    "ShardedSeedTable",
    "check_shards",
    "new_save_id",
    "save_shards",
    "shard_bounds",
    "shard_path",
    "write_manifest",
]
