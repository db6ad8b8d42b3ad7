"""The replicated table: every rank holds all ``(num_points, num_caches)`` seeds, in memory or memory-mapped
(a crash-consistent file): :class:`ReplicatedTable`, storage and :class:`.base.LoomTable` interface in one.

Every rank applies every update, so reads need no communication and writes of a local or grouped step
gather the updates of all ranks first. The seed stream the table is filled from lives in
``loom/seed_stream.py``; the file's lock in ``file_lock.py``, its identity and journal in ``journal.py``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch

from ...._io import atomic_path, atomic_save
from ...scopes.group import to_device
from .base import LoomTable
from .file_lock import claim, hold, lock_table_path, release, track
from .journal import (
    DEFAULT_DURABILITY,
    JOURNAL_LIMIT,
    TRAILER,
    Mark,
    check_durability,
    close_journal,
    discard_journal,
    journal_path,
    map_table,
    new_table_id,
    open_journal,
    pack_record,
    recover,
    unlink_if_same,
    write_calls,
    write_mark,
)

_INIT_CHUNK = 1 << 22  # rows per chunk when filling or copying big (memory-mapped) tables


# ---- storage -----------------------------------------------------------------------------------------

RowsFn = Callable[[int, int], np.ndarray]  # (a, b) -> rows a..b-1 of the table, int64 (b - a, K)


def fill_rows(dst, rows: RowsFn) -> None:
    """``dst[a:b] = rows(a, b)`` in chunks (bounded memory for 10^8-row tables); ``dst`` a tensor or array."""
    n = dst.shape[0]
    for a in range(0, n, _INIT_CHUNK):
        b = min(n, a + _INIT_CHUNK)
        r = rows(a, b)
        if isinstance(dst, torch.Tensor):
            dst[a:b].copy_(torch.as_tensor(r))
        else:
            dst[a:b] = r.cpu().numpy() if isinstance(r, torch.Tensor) else r


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
    """Redo the journaled calls of a crashed writer into ``path`` (locked by the caller); how many were applied.

    All or nothing: a journal of another table, or one damaged before its end, is refused (``ValueError``
    naming it, nothing applied, journal kept); only a torn last record is dropped.
    """
    if not os.path.exists(journal_path(path)):
        return 0
    mm, mark = map_table(path)
    try:
        return recover(path, mm, mark)
    finally:
        del mm


class ReplicatedTable(LoomTable):
    """The whole ``(P, K)`` int64 seed table on this rank: a tensor in memory, or a memory-mapped ``.npy`` file.

    A file table is

    - exclusive: an ``flock`` on the file, taken before anything is written (so of several processes
      creating one new path, one wins and the others raise :class:`TableInUseError`) and held while the
      table is open, by this process only (forked children such as DataLoader workers drop it);
    - crash-consistent: every :meth:`write` appends its ``(index, new seed)`` pairs to ``PATH.journal``
      (headed by the table's random id, also stored in the file's trailer) before the rows change; opening
      the file again redoes the journal, so a crash at any instant leaves the table of the last completed
      write or the one before, never a mix. ``durability="crash"`` (the default) survives every process
      fault (kill -9, OOM kill, segfault): the page cache keeps what a dead process wrote. ``"power"`` also
      fdatasyncs each record before the rows change, which survives a power loss or kernel crash at
      ~0.1-7 ms a call. :meth:`flush` folds the journal into the file (msync, then unlink);
    - replaced whole (:meth:`replace`) by building a new file beside it (preallocated, filled, synced)
      and renaming it into place: the previous table survives a crash at any instant.

    Shapes: ``seeds (P, K)`` int64 (``self.seeds``, a tensor on ``device``; on the CPU for a file).

    Example::

        t = ReplicatedTable.create("table.npy", (1000, 2), rows)   # rows(a, b) -> int64 (b - a, 2)
        t.write(torch.tensor([3]), torch.tensor([1]), torch.tensor([42]))
        t.close(); t = ReplicatedTable.open("table.npy")
        t = ReplicatedTable.in_memory((100, 2), "cpu", rows)
        t.write_global(grp, torch.tensor([3]), torch.tensor([1]), torch.tensor([42]), slice(0, 1))
    """

    gathers_group_updates = True

    def __init__(
        self,
        seeds: torch.Tensor,
        *,
        path: str | None = None,
        memmap=None,
        lock_fd: int | None = None,
        mark: Mark | None = None,
        durability: str = DEFAULT_DURABILITY,
    ):
        self.seeds = seeds
        self.path = path
        self.durability = check_durability(durability)
        self._memmap = memmap
        self._lock_fd = lock_fd
        self._mark = mark  # a file table's id, version and calls applied (its trailer)
        self._jfd: int | None = None
        self._jbytes = 0
        if memmap is not None:
            track(self)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def in_memory(cls, shape: tuple, device, rows: RowsFn | None = None) -> ReplicatedTable:
        t = cls(torch.empty(shape, dtype=torch.int64, device=device))
        if rows is not None:
            fill_rows(t.seeds, rows)
        return t

    @classmethod
    def create(
        cls, path, shape: tuple, rows: RowsFn, *, overwrite: bool = False, durability: str = DEFAULT_DURABILITY
    ) -> ReplicatedTable:
        """A new table file at ``path`` holding ``rows``; an existing file is replaced only with ``overwrite``.

        ``durability``: "crash" (default) or "power" (see the class). A damaged file (or journal) at
        ``path`` is replaced as well with ``overwrite``.
        """
        path, durability = os.fspath(path), check_durability(durability)
        try:
            old, existed = claim(path)  # locked before anything is written: one creator of a new path wins
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise OSError(
                exc.errno,
                f"cannot write the seed table {path!r} ({exc.strerror}): pass mmap_path=None to hold the table "
                "in memory (LoomCoupling.load(..., mmap_path=None) for a checkpoint), or a writable mmap_path",
                path,
            ) from exc
        try:
            if existed and not overwrite:
                raise FileExistsError(
                    f"seed table {path!r} already exists; LoomCoupling never resets a table silently: resume it "
                    f"with LoomCoupling.load(checkpoint, mmap_path={path!r}), pass overwrite=True to start a "
                    f"fresh table, or choose another mmap_path"
                )
            if existed:
                try:  # the old table stays whole until the new one is renamed over it
                    _recover(path)
                except ValueError as exc:  # a damaged table or journal: it is being replaced anyway
                    discard_journal(path, f"the table it describes is being overwritten ({str(exc)[:300]})")
            else:  # a journal beside a new table was left by a table deleted from under it: never ours
                discard_journal(path, "it belonged to a table no longer at this path (a new table was created)")
            fd, mm, mark = cls._build(path, shape, rows)
        except BaseException:
            if not existed:  # our placeholder: a failed creation leaves nothing behind
                unlink_if_same(path, old)
            raise
        finally:
            release(old)
        return cls(torch.from_numpy(mm), path=path, memmap=mm, lock_fd=fd, mark=mark, durability=durability)

    @classmethod
    def open(cls, path, *, durability: str = DEFAULT_DURABILITY) -> ReplicatedTable:
        """Open an existing table file (locked), first redoing the journal of a writer that crashed."""
        path, durability = os.fspath(path), check_durability(durability)
        fd = lock_table_path(path)
        if fd is None:
            raise FileNotFoundError(f"seed table {path!r} does not exist")
        try:
            if os.fstat(fd).st_size == 0:
                raise ValueError(
                    f"seed table {path!r} is empty: its creation was killed before the table was "
                    f"written; create it again (overwrite=True) or restore it with LoomCoupling.load"
                )
            mm, mark = map_table(path)
            recover(path, mm, mark, fd)
            if mark.version == 0:  # a file written before versions (or ids) existed: give it both now
                mark = Mark(mark.table_id or new_table_id(), 1, 0, mark.at)
                write_mark(fd, mark)
                os.fsync(fd)
        except BaseException:
            release(fd)
            raise
        return cls(torch.from_numpy(mm), path=path, memmap=mm, lock_fd=fd, mark=mark, durability=durability)

    @staticmethod
    def _build(path: str, shape: tuple, rows: RowsFn):
        """A new file at ``path`` (temp, locked, preallocated, filled, synced, renamed): ``(lock fd, memmap, mark)``."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        nbytes = 128 + 8 * int(np.prod(shape)) + TRAILER.size  # the .npy header: 128 bytes for 2-D int64
        _check_space(directory, nbytes, path)
        with atomic_path(path, suffix=".npy") as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=tuple(shape))
            fd = hold(os.open(tmp, os.O_RDWR | os.O_CLOEXEC))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked before it appears under its name
                end = os.fstat(fd).st_size
                _preallocate(fd, end + TRAILER.size, path)
                mark = Mark(new_table_id(), 1, 0, end)
                write_mark(fd, mark)
                fill_rows(mm, rows)
                mm.flush()
                os.fsync(fd)
            except BaseException:
                release(fd)
                raise
        return fd, mm, mark

    # -- access ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.seeds.device

    def _journal(self) -> int:
        if self._lock_fd is None:
            raise RuntimeError(
                f"seed table {self.path!r} is closed, or this process is a forked child of the one that holds it "
                f"(a DataLoader worker): only the process that opened the table may write it"
            )
        if self._jfd is None:
            self._jfd = open_journal(self.path, self._mark, self.durability)
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
        call = self._mark.calls + 1
        record = pack_record(call, flat, vals)
        fd = self._journal()
        start = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            if self.durability == "power":  # a process crash keeps the page cache; a power loss needs the disk
                os.fdatasync(fd)
        except OSError as exc:
            self._undo_append(fd, start, exc)
        self._memmap.reshape(-1)[flat] = vals
        self._mark.calls = call
        write_calls(self._lock_fd, self._mark)  # after the rows: a crash before it only redoes this call
        self._jbytes += len(record)
        if self._jbytes > JOURNAL_LIMIT:
            self.flush()

    def _undo_append(self, fd: int, start: int, exc: OSError):
        """Rolls a failed append (a full disk, say) back and raises naming the journal; the table is unchanged.

        A partial record left in place, followed by the next call's record, would make the journal damaged
        before its end, so a later crash could not be replayed. It is cut off; if even that fails, the table
        is flushed, which folds the journal in and removes it (the table holds every completed call)."""
        jpath = journal_path(self.path)
        try:
            os.ftruncate(fd, start)
            os.lseek(fd, start, os.SEEK_SET)
        except OSError:
            self.flush()
        raise OSError(
            exc.errno,
            f"cannot append to the journal {jpath!r} of the seed table {self.path!r} ({exc.strerror}): the call "
            "was not applied and the table is unchanged; free space and call again",
            jpath,
        ) from exc

    def replace(self, rows: RowsFn) -> None:
        """Replace every row with ``rows(a, b)``; a file table gets a new file, renamed into place when full."""
        if self._memmap is None:
            fill_rows(self.seeds, rows)
            return
        self.flush()  # the journal describes the old file: fold it in before that file is replaced
        fd, mm, mark = self._build(self.path, tuple(self.seeds.shape), rows)
        release(self._lock_fd)
        self._lock_fd, self._memmap, self.seeds, self._mark = fd, mm, torch.from_numpy(mm), mark

    def flush(self) -> None:
        """Persist a file table (msync) and fold its journal in (no-op in memory, closed or in a forked child)."""
        if self._memmap is None or self._lock_fd is None:
            return
        self._memmap.flush()
        if self._jfd is not None:
            # A new version once the rows are synced: the journal (of the old one) is then known folded in,
            # and a crash before its removal below leaves a journal that open() discards, not replays.
            self._mark.version, self._mark.calls = self._mark.version + 1, 0
            write_mark(self._lock_fd, self._mark)
            fd, self._jfd = self._jfd, None
            close_journal(self.path, fd)

    def close(self) -> None:
        """Flush and release the file's lock; the table must not be used afterwards."""
        if self._lock_fd is None:
            return
        self.flush()
        release(self._lock_fd)
        self._lock_fd = None

    def forget_descriptors(self) -> None:
        """In a forked child: the lock and journal belong to the parent (closed by ``file_lock``)."""
        self._lock_fd = self._jfd = None

    # -- the LoomTable interface ----------------------------------------------------------------

    @property
    def rows_held(self) -> tuple:
        return 0, self.seeds.shape[0]

    def read(self, grp, rows, slots):
        return self.seeds[rows, slots]

    def read_global(self, grp, rows, slots, mine):
        return self.seeds[rows, slots]

    def write_global(self, grp, rows, slots, values, mine):
        self.write(rows, slots, values)

    def write_local(self, grp, rows, slots, values, mine):
        self.write(rows, slots, grp.gather(values, self.device))

    def write_groups(self, grp, part, rows, slots, own, new):
        self.write(rows, slots, to_device(new, self.device))
        return new[grp.rank * part.b : (grp.rank + 1) * part.b]

    def write_same(self, rows, slots, values):
        self.write(rows, slots, values)

    def fingerprint(self) -> int:
        return int((self.seeds[: min(self.seeds.shape[0], 4096)] % 1000003).sum())

    def state(self) -> dict:
        return {}

    def save(self, grp, path, state):
        self.flush()
        atomic_save(state, path)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown, a deleted directory: the journal recovers on open
            pass
