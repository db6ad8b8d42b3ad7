"""The old import path of the seed table's storage: the replicated table (``loom/tables/replicated.py``;
``SeedTable`` is ``ReplicatedTable``), its lock and journal, and the seed stream (``loom/seed_stream.py``)."""

from .loom.seed_stream import check_seed_table, seed_numbers, seed_values
from .loom.tables.file_lock import TableInUseError, lock_table_path
from .loom.tables.journal import DEFAULT_DURABILITY, DURABILITIES, journal_path
from .loom.tables.replicated import ReplicatedTable, RowsFn

SeedTable = ReplicatedTable

__all__ = [
    "DEFAULT_DURABILITY",
    "DURABILITIES",
    "RowsFn",
    "SeedTable",
    "TableInUseError",
    "check_seed_table",
    "journal_path",
    "lock_table_path",
    "seed_numbers",
    "seed_values",
]
