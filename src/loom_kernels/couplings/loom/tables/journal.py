"""The memory-mapped seed table's identity, its journal and the journal's replay (the lock: ``file_lock.py``).

Invariants:

- a table file ends with a 16-byte trailer holding a random id drawn at creation; its journal
  (``PATH.journal``) starts with a header holding the same id, so a journal left by another table
  (deleted, replaced) is never replayed into this one;
- replay is all or nothing: every record must be whole and pass its crc, except a torn last record
  (a write the crash interrupted, which never reached the table); damage followed by more bytes is
  refused, naming the journal, and the journal is kept.
"""

from __future__ import annotations

import os
import struct
import tempfile
import warnings
import zlib

import numpy as np

from ...._io import current_umask, fsync_dir, temp_prefix
from .file_lock import hold, release

# A journal: one header (magic, table id, crc32 of the id), then records: magic, entry count, crc32 of
# the payload, then the payload: int64 flat indices (row * K + slot) and their int64 new seeds.
REC = struct.Struct("<4sQI")
MAGIC = b"LJR1"
_HEAD = b"LJH1"
TRAILER = struct.Struct("<8sQ")  # after the table's data: magic, table id
_ID_MAGIC = b"LOOMTID1"
JOURNAL_LIMIT = 64 << 20  # journal bytes before they are folded into the table (msync, truncate)

DURABILITIES = ("crash", "power")
DEFAULT_DURABILITY = "crash"


def check_durability(durability) -> str:
    """``durability`` validated: "crash" (survives any process fault) or "power" (also a power loss)."""
    if durability not in DURABILITIES:
        raise ValueError(
            f"durability must be one of {DURABILITIES}, got {durability!r}: 'crash' journals every call without "
            f"fdatasync (survives kill -9, OOM kills and every other process fault), 'power' also fdatasyncs "
            f"each call's journal record (survives a power loss or kernel crash, ~0.1-7 ms a call)"
        )
    return durability


def journal_path(path: str) -> str:
    return path + ".journal"


# ---- the table's identity ---------------------------------------------------------------------------


def new_table_id() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1  # never 0 (0 marks a table without an id)


def write_table_id(fd: int, data_end: int, table_id: int) -> None:
    os.pwrite(fd, TRAILER.pack(_ID_MAGIC, table_id), data_end)


def map_table(path: str):
    """The table file memory-mapped (``r+``) and its id (0 for a file written before ids existed).

    A damaged file is a ``ValueError`` naming it and the ways to start over. The size is checked before
    mapping: numpy's ``r+`` memmap would silently extend a cut file with zeros.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} (a seed table is written as 1.0)")
            shape, fortran, dtype = read_header(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
            if dtype != np.int64 or len(shape) != 2 or fortran:
                raise ValueError(f"expected a C-ordered int64 (P, K) array, got {dtype} {shape}")
            end = offset + 8 * shape[0] * shape[1]
            table_id = 0
            if size == end + TRAILER.size:
                f.seek(end)
                magic, table_id = TRAILER.unpack(f.read(TRAILER.size))
                if magic != _ID_MAGIC or table_id == 0:
                    raise ValueError("its identity trailer is damaged")
            elif size != end:
                raise ValueError(f"it has {size:,} bytes where its header promises {end:,} (+{TRAILER.size})")
        mm = np.memmap(path, dtype=np.int64, mode="r+", offset=offset, shape=shape)
    except Exception as exc:  # numpy's "EOF: reading array header", mmap errors, ... : name the file
        raise ValueError(
            f"seed table {path!r} is damaged or not a seed table ({type(exc).__name__}: {str(exc)[:200]}): restore "
            f"it from a checkpoint with LoomCoupling.load(checkpoint, mmap_path={path!r}), or start a fresh table "
            f"with overwrite=True (both replace the file and discard its journal)"
        ) from exc
    return mm, table_id


# ---- the journal ------------------------------------------------------------------------------------


def pack_record(flat: np.ndarray, vals: np.ndarray) -> bytes:
    """One journal record: ``seeds.flat[flat] = vals`` (both int64 ``(n,)``), with its crc."""
    payload = flat.tobytes() + vals.tobytes()
    return REC.pack(MAGIC, len(flat), zlib.crc32(payload)) + payload


def journal_header(table_id: int) -> bytes:
    ident = struct.pack("<Q", table_id)
    return REC.pack(_HEAD, table_id, zlib.crc32(_HEAD + ident))


def _damaged(jpath: str, what: str) -> ValueError:
    table = jpath[: -len(".journal")]
    return ValueError(
        f"the journal {jpath!r} of the seed table {table!r} {what}: replaying part of it would mix calls "
        f"(seeds lost and doubled), so nothing was applied and the journal is kept. Restore the table from the "
        f"last checkpoint with LoomCoupling.load(checkpoint, mmap_path={table!r}) (this discards the journal), or "
        f"start a fresh table with overwrite=True"
    )


def _valid_record_at(data: bytes, pos: int, size: int) -> bool:
    if pos + REC.size > len(data):
        return False
    magic, count, crc = REC.unpack_from(data, pos)
    end = pos + REC.size + 16 * count
    return magic == MAGIC and end <= len(data) and zlib.crc32(memoryview(data)[pos + REC.size : end]) == crc


def _torn_tail(data: bytes, pos: int, size: int) -> bool:
    """Whether the bytes from ``pos`` are the torn last record of a crash (and not damage before more records)."""
    rest = memoryview(data)[pos:]
    if len(rest) < REC.size or not any(rest):  # a cut header, or a tail the file system never filled
        return True
    if bytes(rest[:4]) != MAGIC:
        return False
    at = data.find(MAGIC, pos + 1)
    while at >= 0:  # a whole record after this one: the damage is in the middle
        if _valid_record_at(data, at, size):
            return False
        at = data.find(MAGIC, at + 1)
    return True


def parse_journal(jpath: str, data: bytes, table_id: int, size: int) -> list:
    """The ``(flat indices, values)`` of every record of ``data`` (the journal file ``jpath``), in order.

    ``size``: entries in the table. Raises ``ValueError`` (naming the journal) for another table's journal
    or for damage followed by more bytes; drops a torn last record (with a warning).
    """
    pos, records = 0, []
    if len(data) >= REC.size and data[:4] == _HEAD:
        magic, jid, crc = REC.unpack_from(data, 0)
        if crc != zlib.crc32(_HEAD + struct.pack("<Q", jid)):
            raise _damaged(jpath, "has a damaged header")
        if jid != table_id:
            raise ValueError(
                f"the journal {jpath!r} belongs to another seed table (id {jid:016x}; "
                f"{jpath[: -len('.journal')]!r} has id {table_id:016x}): it was left by a table that was deleted or "
                f"replaced at this path. Nothing was applied; remove the journal to open the table as it is, or "
                f"restore the table it belongs to"
            )
        pos = REC.size
    elif data and (table_id != 0 or data[:4] != MAGIC):  # a header-less journal only beside a table without id
        if not any(data):
            return records
        raise ValueError(
            f"the journal {jpath!r} has no header naming its seed table, but {jpath[: -len('.journal')]!r} has id "
            f"{table_id:016x}: it belongs to another table. Nothing was applied; remove the journal to open the table "
            f"as it is, or restore the table it belongs to"
        )
    while pos < len(data):
        if _valid_record_at(data, pos, size):
            _, count, _ = REC.unpack_from(data, pos)
            payload = memoryview(data)[pos + REC.size : pos + REC.size + 16 * count]
            idx = np.frombuffer(payload, np.int64, count)
            if count and (idx.min() < 0 or idx.max() >= size):
                raise _damaged(jpath, f"holds a record at byte {pos} with indices outside the table's {size} entries")
            records.append((idx, np.frombuffer(payload, np.int64, count, offset=8 * count)))
            pos += REC.size + 16 * count
            continue
        if _torn_tail(data, pos, size):
            warnings.warn(
                f"dropped the torn last record ({len(data) - pos} bytes) of {jpath!r}: the call it "
                f"belonged to had not changed the table",
                RuntimeWarning,
                stacklevel=3,
            )
            break
        raise _damaged(
            jpath, f"is damaged at byte {pos} of {len(data)} (a record fails its check and more bytes follow)"
        )
    return records


def recover(path: str, mm, table_id: int) -> int:
    """Redo the journaled calls of a crashed writer into the memmap ``mm`` of ``path``; returns how many.

    A torn last record belongs to a call that never touched the table, so the table is left as before that
    call. The journal is removed once applied (or when empty); a refused journal is kept.
    """
    jpath = journal_path(path)
    try:
        with open(jpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    records = parse_journal(jpath, data, table_id, mm.size)
    if records:
        flat = mm.reshape(-1)
        for idx, vals in records:
            flat[idx] = vals
        mm.flush()
    os.unlink(jpath)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return len(records)


def discard_journal(path: str, why: str) -> None:
    """Remove ``PATH.journal`` (the table it describes is being replaced), with a warning saying why."""
    jpath = journal_path(path)
    try:
        os.unlink(jpath)
    except FileNotFoundError:
        return
    warnings.warn(f"discarded {jpath!r}: {why}", RuntimeWarning, stacklevel=3)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def open_journal(path: str, table_id: int, durability: str) -> int:
    """A new journal for the table ``path`` (its header written first), open for appending.

    Created beside the table and renamed into place, so a journal some other process still appends to
    (one whose table was deleted under it) is never shared.
    """
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(base + ".journal"), dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.write(fd, journal_header(table_id))
        if durability == "power":
            os.fdatasync(fd)
        os.replace(tmp, journal_path(path))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durability == "power":
        fsync_dir(directory)
    return hold(fd)  # its offset is past the header: records are appended


def unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it is still the file open as ``fd`` (never a file another process put there)."""
    st = os.fstat(fd)
    try:
        cur = os.stat(path)
    except FileNotFoundError:
        return
    if (cur.st_ino, cur.st_dev) == (st.st_ino, st.st_dev):
        os.unlink(path)


def close_journal(path: str, fd: int) -> None:
    """Remove the journal open as ``fd`` (if it is still the one at ``PATH.journal``) and close it."""
    unlink_if_same(journal_path(path), fd)
    release(fd)
