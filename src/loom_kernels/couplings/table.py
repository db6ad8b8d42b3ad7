"""LOOM's seed table storage (in memory, or a crash-consistent memory-mapped file): :class:`SeedTable`.

The seed stream the table is filled from lives in ``seed_stream.py``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import zlib
from collections.abc import Callable

import numpy as np
import torch

from .._io import atomic_path, fsync_dir
from .seed_stream import check_seed_table, seed_numbers, seed_values  # noqa: F401  (their old import path)

_seed_values = seed_values  # the stream moved to seed_stream.py; its old names stay importable from here
_INIT_CHUNK = 1 << 22  # rows per chunk when filling or copying big (memory-mapped) tables


# ---- storage -----------------------------------------------------------------------------------------

# A journal record: magic, entry count, crc32 of the payload, then the payload: int64 flat indices
# (row * K + slot) and their int64 new seeds. Appended and fdatasync'ed before the table is touched.
_REC = struct.Struct("<4sQI")
_MAGIC = b"LJR1"
_JOURNAL_LIMIT = 64 << 20  # journal bytes before they are folded into the table (msync, truncate)

RowsFn = Callable[[int, int], np.ndarray]  # (a, b) -> rows a..b-1 of the table, int64 (b - a, K)


class TableInUseError(RuntimeError):
    """The table file is held (``flock``) by another process or another open ``SeedTable``."""


def journal_path(path: str) -> str:
    return path + ".journal"


def _lock(path: str) -> int | None:
    """An fd holding an exclusive ``flock`` on the existing file ``path``; None when there is no file."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TableInUseError(
                f"seed table {path!r} is in use by another LoomCoupling (another process, or another coupling in "
                f"this process: close() it first); two writers would corrupt it. Load with mmap_path=None or "
                f"another path to inspect a checkpoint while training runs"
            ) from None
        try:  # a rename may have replaced the file between open and flock: lock the new one
            st, cur = os.fstat(fd), os.stat(path)
            if (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _check_space(directory: str, nbytes: int, path: str) -> None:
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space for the seed table {path!r}: it needs {nbytes:,} bytes, {directory!r} has "
            f"{free:,} free (a sparse file would die with SIGBUS when the disk fills): free space or choose "
            f"another mmap_path",
        )


def _preallocate(fd: int, nbytes: int, path: str) -> None:
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(
                exc.errno, f"cannot allocate {nbytes:,} bytes for the seed table {path!r}: {os.strerror(exc.errno)}"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _recover(path: str) -> int:
    """Redo the journaled calls of a crashed writer into ``path``; returns how many were applied.

    A record is applied only when complete and its crc matches: a torn last record belongs to a call
    that never touched the table (records are synced first), so the table is left as before that call.
    """
    jpath = journal_path(path)
    try:
        with open(jpath, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    applied = 0
    if data:
        mm = np.load(path, mmap_mode="r+")
        flat = mm.reshape(-1)
        pos = 0
        while pos + _REC.size <= len(data):
            magic, count, crc = _REC.unpack_from(data, pos)
            end = pos + _REC.size + 16 * count
            if magic != _MAGIC or end > len(data):
                break
            payload = memoryview(data)[pos + _REC.size:end]
            if zlib.crc32(payload) != crc:
                break
            idx = np.frombuffer(payload, np.int64, count)
            if count and (idx.min() < 0 or idx.max() >= flat.size):
                break
            flat[idx] = np.frombuffer(payload, np.int64, count, offset=8 * count)
            pos, applied = end, applied + 1
        mm.flush()
        del flat, mm
    os.unlink(jpath)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return applied


class SeedTable:
    """The ``(P, K)`` int64 seed table's storage: a tensor in memory, or a memory-mapped ``.npy`` file.

    A file table is

    - exclusive: an ``flock`` on the file, held while the table is open; a second process or a second
      table on the same file raises :class:`TableInUseError`;
    - crash-consistent: every :meth:`write` appends its ``(index, new seed)`` pairs to ``PATH.journal``
      and fdatasyncs them before the rows change; opening the file again redoes the journal, so a
      ``kill -9`` (or a power loss) at any instant leaves the table of the last completed write or the
      one before, never a mix. :meth:`flush` folds the journal into the file (msync, then unlink);
    - replaced whole (:meth:`replace`) by building a new file beside it (preallocated, filled, synced)
      and renaming it into place: the previous table survives a crash at any instant.

    Shapes: ``seeds (P, K)`` int64 (``self.seeds``, a tensor on ``device``; on the CPU for a file).

    Example::

        t = SeedTable.create("table.npy", (1000, 2), rows)   # rows(a, b) -> int64 (b - a, 2)
        t.write(torch.tensor([3]), torch.tensor([1]), torch.tensor([42]))
        t.close(); t = SeedTable.open("table.npy")
    """

    def __init__(self, seeds: torch.Tensor, *, path: str | None = None, memmap=None, lock_fd: int | None = None):
        self.seeds = seeds
        self.path = path
        self._memmap = memmap
        self._lock_fd = lock_fd
        self._jfd: int | None = None
        self._jbytes = 0

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def in_memory(cls, shape: tuple, device, rows: RowsFn | None = None) -> SeedTable:
        t = cls(torch.empty(shape, dtype=torch.int64, device=device))
        if rows is not None:
            t._fill(t.seeds, rows)
        return t

    @classmethod
    def create(cls, path, shape: tuple, rows: RowsFn, *, overwrite: bool = False) -> SeedTable:
        """A new table file at ``path`` holding ``rows``; an existing file is replaced only with ``overwrite``."""
        path = os.fspath(path)
        old = _lock(path)
        try:
            if old is not None:
                if not overwrite:
                    raise FileExistsError(
                        f"seed table {path!r} already exists; LoomCoupling never resets a table silently: resume it "
                        f"with LoomCoupling.load(checkpoint, mmap_path={path!r}), pass overwrite=True to start a "
                        f"fresh table, or choose another mmap_path"
                    )
                _recover(path)  # the old table stays whole until the new one is renamed over it
            fd, mm = cls._build(path, shape, rows)
        finally:
            if old is not None:
                os.close(old)
        return cls(torch.from_numpy(mm), path=path, memmap=mm, lock_fd=fd)

    @classmethod
    def open(cls, path) -> SeedTable:
        """Open an existing table file (locked), first redoing the journal of a writer that crashed."""
        path = os.fspath(path)
        fd = _lock(path)
        if fd is None:
            raise FileNotFoundError(f"seed table {path!r} does not exist")
        try:
            _recover(path)
            mm = np.load(path, mmap_mode="r+")
            if mm.dtype != np.int64 or mm.ndim != 2:
                raise ValueError(f"{path!r} is not a seed table: expected int64 (P, K), got {mm.dtype} {mm.shape}")
        except BaseException:
            os.close(fd)
            raise
        return cls(torch.from_numpy(mm), path=path, memmap=mm, lock_fd=fd)

    @staticmethod
    def _build(path: str, shape: tuple, rows: RowsFn):
        """A new file at ``path`` (temp, locked, preallocated, filled, synced, renamed): ``(lock fd, memmap)``."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        nbytes = 128 + 8 * int(np.prod(shape))  # the .npy header is 128 bytes for any 2-D int64 shape
        _check_space(directory, nbytes, path)
        with atomic_path(path, suffix=".npy") as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=tuple(shape))
            fd = os.open(tmp, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it appears under its name
                _preallocate(fd, os.fstat(fd).st_size, path)
                SeedTable._fill(mm, rows)
                mm.flush()
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
        return fd, mm

    @staticmethod
    def _fill(dst, rows: RowsFn) -> None:
        """``dst[a:b] = rows(a, b)`` in chunks (bounded memory for 10^8-row tables)."""
        n = dst.shape[0]
        for a in range(0, n, _INIT_CHUNK):
            b = min(n, a + _INIT_CHUNK)
            r = rows(a, b)
            if isinstance(dst, torch.Tensor):
                dst[a:b].copy_(torch.as_tensor(r))
            else:
                dst[a:b] = r.cpu().numpy() if isinstance(r, torch.Tensor) else r

    # -- access ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def _journal(self) -> int:
        if self._jfd is None:
            self._jfd = os.open(journal_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self._jbytes = 0
        return self._jfd

    def write(self, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """``seeds[rows, slots] = values`` (all ``(n,)`` int64), all-or-nothing under a crash for a file."""
        if self._memmap is None:
            self.seeds[rows, slots] = values
            return
        k = self.seeds.shape[1]
        flat = rows.cpu().numpy().astype(np.int64) * k + slots.cpu().numpy()
        vals = np.ascontiguousarray(values.cpu().numpy(), dtype=np.int64)
        payload = flat.tobytes() + vals.tobytes()
        record = _REC.pack(_MAGIC, len(flat), zlib.crc32(payload)) + payload
        fd = self._journal()
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
        self._memmap.reshape(-1)[flat] = vals
        self._jbytes += len(record)
        if self._jbytes > _JOURNAL_LIMIT:
            self.flush()

    def replace(self, rows: RowsFn) -> None:
        """Replace every row with ``rows(a, b)``; a file table gets a new file, renamed into place when full."""
        if self._memmap is None:
            self._fill(self.seeds, rows)
            return
        self.flush()  # the journal describes the old file: fold it in before that file is replaced
        fd, mm = self._build(self.path, tuple(self.seeds.shape), rows)
        os.close(self._lock_fd)
        self._lock_fd, self._memmap, self.seeds = fd, mm, torch.from_numpy(mm)

    def flush(self) -> None:
        """Persist a file table (msync) and fold its journal in (no-op in memory)."""
        if self._memmap is None:
            return
        self._memmap.flush()
        if self._jfd is not None:
            os.close(self._jfd)
            self._jfd = None
            os.unlink(journal_path(self.path))

    def close(self) -> None:
        """Flush and release the file's lock; the table must not be used afterwards."""
        if self._lock_fd is None:
            return
        self.flush()
        os.close(self._lock_fd)
        self._lock_fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown, a deleted directory: the journal recovers on open
            pass
