"""The seed-table file's lock: one writer per path, held by this process only.

Invariants: an exclusive ``flock`` on the table file, taken before anything is written (a new path first
appears as an empty placeholder that is already locked), held only by the process that took it (released
in forked children, close-on-exec).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import weakref

from ...._io import current_umask, remove_stale_temps, temp_prefix


class TableInUseError(RuntimeError):
    """The table file is held (``flock``) by another process or another open ``ReplicatedTable``."""


_HELD: set = set()  # this process's lock and journal descriptors
_TABLES: weakref.WeakSet = weakref.WeakSet()  # open file tables (reset in forked children)


def hold(fd: int) -> int:
    """Register ``fd`` (a lock or journal descriptor) as this process's: closed in forked children."""
    _HELD.add(fd)
    return fd


def release(fd: int | None) -> None:
    """Close ``fd`` (None: nothing) and forget it."""
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
        table.forget_descriptors()


def track(table) -> None:
    """Register an open file table: a forked child calls its ``forget_descriptors()`` (the parent's locks)."""
    _TABLES.add(table)


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
                return hold(fd)
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
        return hold(fd)
    os.close(fd)
    if linked is False:
        return None
    try:  # no hard links on this file system: O_EXCL, and the lock right after the file appears
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except FileExistsError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return hold(fd)


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
