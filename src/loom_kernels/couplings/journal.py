"""The old import path of the memory-mapped table's journal and lock: ``loom/tables/journal.py`` and
``loom/tables/file_lock.py``."""

from .loom.tables.file_lock import TableInUseError, claim, lock_table_path
from .loom.tables.journal import (
    DEFAULT_DURABILITY,
    DURABILITIES,
    check_durability,
    close_journal,
    discard_journal,
    journal_header,
    journal_path,
    map_table,
    new_table_id,
    open_journal,
    parse_journal,
    record_spans,
    recover,
    unlink_if_same,
    write_mark,
)

__all__ = [
    "DEFAULT_DURABILITY",
    "DURABILITIES",
    "TableInUseError",
    "check_durability",
    "claim",
    "close_journal",
    "discard_journal",
    "journal_header",
    "journal_path",
    "lock_table_path",
    "map_table",
    "new_table_id",
    "open_journal",
    "parse_journal",
    "recover",
    "record_spans",
    "unlink_if_same",
    "write_mark",
]
