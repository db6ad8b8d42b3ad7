"""The memory-mapped seed table's identity, its journal and the journal's replay (the lock: ``file_lock.py``).

Invariants:

- a table file ends with a 32-byte trailer: a random id drawn at creation, the table's **version**
  (bumped each time the journal is folded in) and the number of **calls** applied since; its journal
  (``PATH.journal``) starts with a header naming the same id and version, and each record carries its
  call number. A journal of another table (deleted, replaced) is never replayed into this one;
- replay never undoes a call the table holds: a journal that ends before the table's call count (cut
  after the table took those calls) is not replayed; one that reaches it is replayed whole, in order (the
  version's start plus every call, whatever part the table already held). A journal written for a newer
  version than the table (the table restored from a backup taken before the last fold), or one whose
  records skip a call or start past the table's count, is refused by name; one of an older version was
  already folded in and is discarded;
- replay is all or nothing: every record must be whole and pass its crc, except a torn last record
  (a write the crash interrupted); damage followed by more bytes is refused, naming the journal, and
  the journal is kept.

Files written before versions existed (a 16-byte trailer, or none; journals of format 1) are read as
version 0 and given a version when opened.
"""

from __future__ import annotations

import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from ...._io import current_umask, fsync_dir, remove_stale_temps, temp_prefix
from .file_lock import hold, release

# A journal: a header (magic, table id, table version, crc32 of the three), then records: magic, call
# number, entry count, crc32 of the number and the payload, then the payload: int64 flat indices
# (row * K + slot) and their int64 new seeds. Format 1 (before versions): header (magic, id, crc),
# records (magic, count, crc of the payload); still replayed beside a table of version 0.
REC = struct.Struct("<4sQQI")
MAGIC = b"LJR2"
HEAD = struct.Struct("<4sQQI")
_HEAD_MAGIC = b"LJH2"
_REC1, _MAGIC1, _HEAD1 = struct.Struct("<4sQI"), b"LJR1", b"LJH1"
TRAILER = struct.Struct("<8sQQQ")  # after the table's data: magic, table id, version, calls applied
_ID_MAGIC = b"LOOMTID2"
_TRAILER1, _ID_MAGIC1 = struct.Struct("<8sQ"), b"LOOMTID1"  # id only (before versions)
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


@dataclass
class Mark:
    """What a table file's trailer says: its id, version and calls applied since the version began.

    ``version`` 0: a file written before versions existed (``table_id`` 0: before ids existed)."""

    table_id: int
    version: int
    calls: int
    at: int  # the trailer's byte offset (the end of the table's data)


def write_mark(fd: int, mark: Mark) -> None:
    os.pwrite(fd, TRAILER.pack(_ID_MAGIC, mark.table_id, mark.version, mark.calls), mark.at)


def write_calls(fd: int, mark: Mark) -> None:
    """Records that the table holds ``mark.calls`` calls (8 bytes in place: no new page, no sync)."""
    os.pwrite(fd, struct.pack("<Q", mark.calls), mark.at + 24)


def map_table(path: str):
    """The table file memory-mapped (``r+``) and its :class:`Mark`.

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
            mark = Mark(0, 0, 0, end)
            f.seek(end)
            tail = f.read(size - end)
            if size == end + TRAILER.size:
                magic, table_id, ver, calls = TRAILER.unpack(tail)
                if magic != _ID_MAGIC or table_id == 0 or ver == 0:
                    raise ValueError("its identity trailer is damaged")
                mark = Mark(table_id, ver, calls, end)
            elif size == end + _TRAILER1.size:
                magic, table_id = _TRAILER1.unpack(tail)
                if magic != _ID_MAGIC1 or table_id == 0:
                    raise ValueError("its identity trailer is damaged")
                mark = Mark(table_id, 0, 0, end)
            elif size != end:
                raise ValueError(f"it has {size:,} bytes where its header promises {end:,} (+{TRAILER.size})")
        mm = np.memmap(path, dtype=np.int64, mode="r+", offset=offset, shape=shape)
    except Exception as exc:  # numpy's "EOF: reading array header", mmap errors, ... : name the file
        raise ValueError(
            f"seed table {path!r} is damaged or not a seed table ({type(exc).__name__}: {str(exc)[:200]}): restore "
            f"it from a checkpoint with LoomCoupling.load(checkpoint, mmap_path={path!r}), or start a fresh table "
            f"with overwrite=True (both replace the file and discard its journal)"
        ) from exc
    return mm, mark


# ---- the journal ------------------------------------------------------------------------------------


def pack_record(call: int, flat: np.ndarray, vals: np.ndarray) -> bytes:
    """Journal record of call number ``call``: ``seeds.flat[flat] = vals`` (both int64 ``(n,)``), with its crc."""
    payload = struct.pack("<Q", call) + flat.tobytes() + vals.tobytes()
    return REC.pack(MAGIC, call, len(flat), zlib.crc32(payload)) + payload[8:]


def journal_header(mark: Mark) -> bytes:
    body = struct.pack("<QQ", mark.table_id, mark.version)
    return HEAD.pack(_HEAD_MAGIC, mark.table_id, mark.version, zlib.crc32(_HEAD_MAGIC + body))


@dataclass(frozen=True)
class _Format:
    rec: struct.Struct
    magic: bytes
    numbered: bool  # records carry their call number (format 2)

    def record_at(self, data: bytes, pos: int):
        """``(call, count, end)`` of a whole record at ``pos`` whose crc holds, else None."""
        if pos + self.rec.size > len(data):
            return None
        if self.numbered:
            magic, call, count, crc = self.rec.unpack_from(data, pos)
            covered = struct.pack("<Q", call)
        else:
            (magic, count, crc), call, covered = self.rec.unpack_from(data, pos), None, b""
        end = pos + self.rec.size + 16 * count
        if magic != self.magic or end > len(data):
            return None
        if zlib.crc32(memoryview(data)[pos + self.rec.size : end], zlib.crc32(covered)) != crc:
            return None
        return call, count, end


_V2, _V1 = _Format(REC, MAGIC, True), _Format(_REC1, _MAGIC1, False)


def record_spans(data: bytes) -> list:
    """``(start, end)`` byte spans of the whole records of a journal's bytes (past its header), in order."""
    fmt, pos = (_V2, HEAD.size) if data[:4] == _HEAD_MAGIC else (_V1, _REC1.size if data[:4] == _HEAD1 else 0)
    spans = []
    while (rec := fmt.record_at(data, pos)) is not None:
        spans.append((pos, rec[2]))
        pos = rec[2]
    return spans


def _damaged(jpath: str, what: str) -> ValueError:
    table = jpath[: -len(".journal")]
    return ValueError(
        f"the journal {jpath!r} of the seed table {table!r} {what}: replaying part of it would mix calls "
        f"(seeds lost and doubled), so nothing was applied and the journal is kept. Restore the table from the "
        f"last checkpoint with LoomCoupling.load(checkpoint, mmap_path={table!r}) (this discards the journal), or "
        f"start a fresh table with overwrite=True"
    )


def _torn_tail(fmt: _Format, data: bytes, pos: int) -> bool:
    """Whether the bytes from ``pos`` are the torn last record of a crash (and not damage before more records)."""
    rest = memoryview(data)[pos:]
    if len(rest) < fmt.rec.size or not any(rest):  # a cut header, or a tail the file system never filled
        return True
    if bytes(rest[:4]) != fmt.magic:
        return False
    at = data.find(fmt.magic, pos + 1)
    while at >= 0:  # a whole record after this one: the damage is in the middle
        if fmt.record_at(data, at) is not None:
            return False
        at = data.find(fmt.magic, at + 1)
    return True


def _other_table(jpath: str, what: str, mark: Mark) -> ValueError:
    return ValueError(
        f"the journal {jpath!r} {what}, but {jpath[: -len('.journal')]!r} has id {mark.table_id:016x}: it was left "
        f"by a table that was deleted or replaced at this path. Nothing was applied; remove the journal to open the "
        f"table as it is, or restore the table it belongs to"
    )


def _header(jpath: str, data: bytes, mark: Mark):
    """The journal's format and where its records start; None for a journal already folded into the table."""
    if len(data) >= HEAD.size and data[:4] == _HEAD_MAGIC:
        _, jid, jver, crc = HEAD.unpack_from(data, 0)
        if crc != zlib.crc32(_HEAD_MAGIC + struct.pack("<QQ", jid, jver)):
            raise _damaged(jpath, "has a damaged header")
        if jid != mark.table_id:
            raise _other_table(jpath, f"belongs to another seed table (id {jid:016x})", mark)
        if jver < mark.version:  # written before the last fold, which msynced the table before the bump
            return None
        if jver > mark.version:
            raise _damaged(
                jpath,
                f"was written for version {jver} of the table, but the table file is at version {mark.version}: "
                "the file is older than its journal (restored from a backup taken before the last flush?)",
            )
        return _V2, HEAD.size
    if mark.version != 0:
        raise _damaged(jpath, f"is not a journal of version {mark.version} of the table (format 1, or damaged)")
    if len(data) >= _REC1.size and data[:4] == _HEAD1:
        _, jid, crc = _REC1.unpack_from(data, 0)
        if crc != zlib.crc32(_HEAD1 + struct.pack("<Q", jid)):
            raise _damaged(jpath, "has a damaged header")
        if jid != mark.table_id:
            raise _other_table(jpath, f"belongs to another seed table (id {jid:016x})", mark)
        return _V1, _REC1.size
    if data and (mark.table_id != 0 or data[:4] != _MAGIC1):  # header-less: only beside a table without id
        if not any(data):
            return _V1, len(data)
        raise _other_table(jpath, "has no header naming its seed table", mark)
    return _V1, 0


def parse_journal(jpath: str, data: bytes, mark: Mark, size: int) -> list:
    """The ``(call, flat indices, values)`` records of ``data`` (the journal file ``jpath``) to redo on the
    table (``mark``, ``size`` entries), in order; ``call`` is None in a format-1 journal. All of them when the
    journal reaches the table's call count, none when it ends before it (it was cut after the table took
    those calls).

    Raises ``ValueError`` (naming the journal) for another table's journal, one newer than the table, a gap
    in the calls, or damage followed by more bytes; drops a torn last record (with a warning).
    """
    head = _header(jpath, data, mark)
    if head is None:
        warnings.warn(
            f"{jpath!r} was already folded into its table (a crash between the fold and its removal): removed",
            RuntimeWarning,
            stacklevel=3,
        )
        return []
    fmt, pos = head
    records, prev = [], None
    while pos < len(data):
        rec = fmt.record_at(data, pos)
        if rec is None:
            if not _torn_tail(fmt, data, pos):
                raise _damaged(
                    jpath, f"is damaged at byte {pos} of {len(data)} (a record fails its check and more bytes follow)"
                )
            held = fmt.numbered and prev is not None and prev + 1 <= mark.calls
            warnings.warn(
                f"dropped the torn last record ({len(data) - pos} bytes) of {jpath!r}: "
                + ("the table already holds its call" if held else "the call it belonged to had not changed the table"),
                RuntimeWarning,
                stacklevel=3,
            )
            break
        call, count, end = rec
        if fmt.numbered and prev is not None and call != prev + 1:
            raise _damaged(jpath, f"skips from call {prev} to call {call} at byte {pos}")
        idx = np.frombuffer(data, np.int64, count, offset=pos + fmt.rec.size)
        if count and (idx.min() < 0 or idx.max() >= size):
            raise _damaged(jpath, f"holds a record at byte {pos} with indices outside the table's {size} entries")
        records.append((call, idx, np.frombuffer(data, np.int64, count, offset=pos + fmt.rec.size + 8 * count)))
        prev, pos = call, end
    if not fmt.numbered or not records:
        return records
    if records[0][0] > mark.calls + 1:
        raise _damaged(
            jpath,
            f"starts at call {records[0][0]}, but the table holds calls up to {mark.calls}: "
            f"calls {mark.calls + 1} to {records[0][0] - 1} are missing",
        )
    if records[-1][0] < mark.calls:
        # Cut after the table took these calls: replaying its prefix would undo the later ones.
        return []
    # The whole journal, in order: the table at the version's start plus every call, whatever the table
    # already held (after a power loss its call count may have reached the disk before its rows did).
    return records


def recover(path: str, mm, mark: Mark, fd: int | None = None) -> int:
    """Redo the journaled calls the table ``path`` (memmap ``mm``, trailer ``mark``) lacks; returns how many.

    ``fd``: the table file open for writing, to record the calls applied in its trailer (None when the
    table is about to be replaced). The journal is removed once applied (or when empty); a refused journal
    is kept.
    """
    jpath = journal_path(path)
    try:
        with open(jpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    records = parse_journal(jpath, data, mark, mm.size)
    if records:
        flat = mm.reshape(-1)
        for _, idx, vals in records:
            flat[idx] = vals
        mm.flush()
        if fd is not None and records[-1][0] is not None:
            mark.calls = records[-1][0]
            write_calls(fd, mark)
            os.fsync(fd)
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


def open_journal(path: str, mark: Mark, durability: str) -> int:
    """A new journal for version ``mark.version`` of the table ``path`` (header first), open for appending.

    Created beside the table and renamed into place, so a journal some other process still appends to
    (one whose table was deleted under it) is never shared.
    """
    directory, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(journal_path(path))  # a writer killed between mkstemp and the rename left its temp
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(base + ".journal"), dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.write(fd, journal_header(mark))
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
