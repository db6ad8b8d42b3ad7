"""One trainer per training directory: an exclusive ``flock`` on ``out_dir/.lock``, held for the run.

Two trainers on one ``out_dir`` (a scheduler's requeue racing the old job, a command launched twice)
would both resume, interleave ``log.csv`` rows and overwrite each other's checkpoints. The lock is the
seed table's (``flock``): the kernel drops it when the holder dies, so a killed run never leaves a
stale lock behind, and forked children (data-loader workers) close their copies.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ..couplings.loom.tables.file_lock import hold, release

LOCK = ".lock"


class RunDirInUseError(RuntimeError):
    """The training directory is held by another trainer (its ``.lock`` is locked)."""


def lock_run_dir(out_dir: str) -> int:
    """Creates ``out_dir`` if needed and returns an fd holding its exclusive lock; raises if it is held."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot create the training directory's lock {os.path.join(out_dir, LOCK)!r}: {e.strerror}"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(e.errno, f"cannot lock {path!r}: {e.strerror}") from e
        raise RunDirInUseError(
            f"{out_dir!r} is in use by another trainer (pid {holder}, holding {path!r}): two runs in one "
            "directory would overwrite each other's checkpoints and logs; wait for it to end, stop it, "
            "or use another out_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return hold(fd)  # the seed table's registry: closed in forked children (data-loader workers)


def unlock_run_dir(fd: int | None) -> None:
    release(fd)  # closing the last copy releases the flock
