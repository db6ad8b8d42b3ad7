"""The memory-mapped seed table's file machinery: its lock, its identity, its journal and the journal's replay.

Invariants:

- one writer per path: an exclusive ``flock`` on the table file, taken before anything is written (a new
  path first appears as an empty placeholder that is already locked), held only by the process that
  took it (released in forked children, close-on-exec);
- a table file ends with a 16-byte trailer holding a random id drawn at creation; its journal
  (``PATH.journal``) starts with a header holding the same id, so a journal left by another table
  (deleted, replaced) is never replayed into this one;
- replay is all or nothing: every record must be whole and pass its crc, except a torn last record
  (a write the crash interrupted, which never reached the table); damage followed by more bytes is
  refused, naming the journal, and the journal is kept.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile
import warnings
import weakref
import zlib

import numpy as np

from .._io import current_umask, fsync_dir, remove_stale_temps, temp_prefix

# A journal: one header (magic, table id, crc32 of the id), then records: magic, entry count, crc32 of
# the payload, then the payload: int64 flat indices (row * K + slot) and their int64 new seeds.
_REC = struct.Struct("<4sQI")
_MAGIC = b"LJR1"
_HEAD = b"LJH1"
_TRAILER = struct.Struct("<8sQ")  # after the table's data: magic, table id
_ID_MAGIC = b"LOOMTID1"
_JOURNAL_LIMIT = 64 << 20  # journal bytes before they are folded into the table (msync, truncate)

DURABILITIES = ("crash", "power")
DEFAULT_DURABILITY = "crash"


class TableInUseError(RuntimeError):
    """The table file is held (``flock``) by another process or another open ``SeedTable``."""


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


# ---- locks: held by this process only --------------------------------------------------------------

_HELD: set = set()  # this process's lock and journal descriptors
_TABLES: weakref.WeakSet = weakref.WeakSet()  # open file tables (reset in forked children)


def _hold(fd: int) -> int:
    _HELD.add(fd)
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's open file descriptions, and with them the
    # flock: closing its copies leaves the lock to the parent alone (released when the parent dies).
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    for table in list(_TABLES):
        table._lock_fd = table._jfd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _in_use(path: str) -> TableInUseError:
    return TableInUseError(
        f"seed table {path!r} is in use by another LoomCoupling (another process, or another coupling in "
        f"this process: close() it first); two writers would corrupt it. Under DDP give each rank its own "
        f"mmap_path (e.g. f'table.rank{{rank}}.npy'). Load with mmap_path=None or another path to inspect a "
        f"checkpoint while training runs"
    )


def lock_table_path(path: str) -> int | None:
    """An fd holding an exclusive ``flock`` on the existing file ``path``; None when there is no file."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(path) from None
        try:  # a rename may have replaced the file between open and flock: lock the new one
            st, cur = os.fstat(fd), os.stat(path)
            if (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev):
                return _hold(fd)
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_new(path: str) -> int | None:
    """Create ``path`` as an empty placeholder, locked before it appears; None when ``path`` exists."""
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(base), suffix=".lock", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows this file yet
        linked = _link_new(tmp, path)  # appears under its name already locked
    except BaseException:
        os.close(fd)
        raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    if linked:
        return _hold(fd)
    os.close(fd)
    if linked is False:
        return None
    try:  # no hard links on this file system: O_EXCL, and the lock right after the file appears
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return _hold(fd)


def _link_new(tmp: str, path: str) -> bool | None:
    """Hard-link ``tmp`` as ``path``: True, False when ``path`` exists, None when links are unsupported."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
            return None
        raise
    return True


def claim(path: str) -> tuple:
    """``(fd, existed)``: an exclusive lock on ``path``, on the existing file or on a new empty placeholder.

    Exactly one of several concurrent claimers of a new path wins; the others raise
    :class:`TableInUseError`. An empty unlocked file is a placeholder whose creator died: ``existed`` False.
    """
    while True:
        fd = lock_table_path(path)
        if fd is not None:
            return fd, os.fstat(fd).st_size > 0
        fd = _lock_new(path)
        if fd is not None:
            return fd, False


# ---- the table's identity ---------------------------------------------------------------------------


def new_table_id() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1  # never 0 (0 marks a table without an id)


def write_table_id(fd: int, data_end: int, table_id: int) -> None:
    os.pwrite(fd, _TRAILER.pack(_ID_MAGIC, table_id), data_end)


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
            if size == end + _TRAILER.size:
                f.seek(end)
                magic, table_id = _TRAILER.unpack(f.read(_TRAILER.size))
                if magic != _ID_MAGIC or table_id == 0:
                    raise ValueError("its identity trailer is damaged")
            elif size != end:
                raise ValueError(f"it has {size:,} bytes where its header promises {end:,} (+{_TRAILER.size})")
        mm = np.memmap(path, dtype=np.int64, mode="r+", offset=offset, shape=shape)
    except Exception as exc:  # numpy's "EOF: reading array header", mmap errors, ... : name the file
        raise ValueError(
            f"seed table {path!r} is damaged or not a seed table ({type(exc).__name__}: {str(exc)[:200]}): restore "
            f"it from a checkpoint with LoomCoupling.load(checkpoint, mmap_path={path!r}), or start a fresh table "
            f"with overwrite=True (both replace the file and discard its journal)"
        ) from exc
    return mm, table_id


# ---- the journal ------------------------------------------------------------------------------------


def journal_header(table_id: int) -> bytes:
    ident = struct.pack("<Q", table_id)
    return _REC.pack(_HEAD, table_id, zlib.crc32(_HEAD + ident))


def _damaged(jpath: str, what: str) -> ValueError:
    table = jpath[: -len(".journal")]
    return ValueError(
        f"the journal {jpath!r} of the seed table {table!r} {what}: replaying part of it would mix calls "
        f"(seeds lost and doubled), so nothing was applied and the journal is kept. Restore the table from the "
        f"last checkpoint with LoomCoupling.load(checkpoint, mmap_path={table!r}) (this discards the journal), or "
        f"start a fresh table with overwrite=True"
    )


def _valid_record_at(data: bytes, pos: int, size: int) -> bool:
    if pos + _REC.size > len(data):
        return False
    magic, count, crc = _REC.unpack_from(data, pos)
    end = pos + _REC.size + 16 * count
    return magic == _MAGIC and end <= len(data) and zlib.crc32(memoryview(data)[pos + _REC.size : end]) == crc


def _torn_tail(data: bytes, pos: int, size: int) -> bool:
    """Whether the bytes from ``pos`` are the torn last record of a crash (and not damage before more records)."""
    rest = memoryview(data)[pos:]
    if len(rest) < _REC.size or not any(rest):  # a cut header, or a tail the file system never filled
        return True
    if bytes(rest[:4]) != _MAGIC:
        return False
    at = data.find(_MAGIC, pos + 1)
    while at >= 0:  # a whole record after this one: the damage is in the middle
        if _valid_record_at(data, at, size):
            return False
        at = data.find(_MAGIC, at + 1)
    return True


def parse_journal(jpath: str, data: bytes, table_id: int, size: int) -> list:
    """The ``(flat indices, values)`` of every record of ``data`` (the journal file ``jpath``), in order.

    ``size``: entries in the table. Raises ``ValueError`` (naming the journal) for another table's journal
    or for damage followed by more bytes; drops a torn last record (with a warning).
    """
    pos, records = 0, []
    if len(data) >= _REC.size and data[:4] == _HEAD:
        magic, jid, crc = _REC.unpack_from(data, 0)
        if crc != zlib.crc32(_HEAD + struct.pack("<Q", jid)):
            raise _damaged(jpath, "has a damaged header")
        if jid != table_id:
            raise ValueError(
                f"the journal {jpath!r} belongs to another seed table (id {jid:016x}; "
                f"{jpath[: -len('.journal')]!r} has id {table_id:016x}): it was left by a table that was deleted or "
                f"replaced at this path. Nothing was applied; remove the journal to open the table as it is, or "
                f"restore the table it belongs to"
            )
        pos = _REC.size
    elif data and (table_id != 0 or data[:4] != _MAGIC):  # a header-less journal only beside a table without id
        if not any(data):
            return records
        raise ValueError(
            f"the journal {jpath!r} has no header naming its seed table, but {jpath[: -len('.journal')]!r} has id "
            f"{table_id:016x}: it belongs to another table. Nothing was applied; remove the journal to open the table "
            f"as it is, or restore the table it belongs to"
        )
    while pos < len(data):
        if _valid_record_at(data, pos, size):
            _, count, _ = _REC.unpack_from(data, pos)
            payload = memoryview(data)[pos + _REC.size : pos + _REC.size + 16 * count]
            idx = np.frombuffer(payload, np.int64, count)
            if count and (idx.min() < 0 or idx.max() >= size):
                raise _damaged(jpath, f"holds a record at byte {pos} with indices outside the table's {size} entries")
            records.append((idx, np.frombuffer(payload, np.int64, count, offset=8 * count)))
            pos += _REC.size + 16 * count
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
    return _hold(fd)  # its offset is past the header: records are appended


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
    _release(fd)
