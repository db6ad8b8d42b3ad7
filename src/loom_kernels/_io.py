"""Atomic file writes: every file the package persists (couplings, memory-mapped tables,
checkpoints, logs, figures, samples) goes through :func:`atomic_path`, so a crash mid-write leaves
the previous file intact.

Temp files are named ``NAME.tmp-HOST-PID-XXXXXXXX[SUFFIX]`` beside ``NAME``: a failed write removes its
own, and the next write to ``NAME`` removes those of killed writers (same host, process gone). Files
get the permissions ``open()`` would give (``0o666`` less the umask), and a full disk is reported as
``OSError(ENOSPC)`` naming the file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_LOW_SPACE = 16 << 20  # bytes: below this a failed write is reported as out of space


def fsync_dir(path) -> None:
    """Persist a rename in ``path`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # read without changing it (os.umask is process-wide, racy)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _temp_prefix(base: str) -> str:
    return f"{base}.tmp-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_temps(path) -> list:
    """Remove the temp files of killed writes to ``path`` (this host, writer process gone); returns them."""
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}(\..*)?$")
    host, removed = socket.gethostname(), []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _space_errno(exc: BaseException, directory: str):
    """ENOSPC / EDQUOT / EFBIG when ``exc`` comes from running out of room, else None."""
    seen = exc
    while seen is not None:  # torch.save wraps the OSError in a RuntimeError ("unexpected pos")
        if isinstance(seen, OSError) and seen.errno in _SPACE_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, (OSError, RuntimeError)):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(directory).free < _LOW_SPACE:
                return errno.ENOSPC
    return None


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = ".tmp"):
    """Yield a temp path beside ``path``; when the block succeeds, rename it over ``path`` and fsync
    the directory, otherwise remove it. The block must write (and sync) the temp file itself.

    Example::

        with atomic_path("table.npy", suffix=".npy") as tmp:
            np.save(tmp, table)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(os.path.basename(path)), suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    finally:
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        code = _space_errno(exc, directory)
        if code is not None:
            free = shutil.disk_usage(directory).free
            raise OSError(
                code,
                f"no room to write {path!r}: {os.strerror(code)} ({free:,} bytes free in {directory!r}; the write "
                f"failed with {type(exc).__name__}: {str(exc)[:200]}); {os.path.basename(path)!r} was not replaced",
            ) from exc
        raise
    fsync_dir(directory)


def atomic_write(path, write_fn, *, mode: str = "wb", suffix: str = ".tmp") -> None:
    """Write ``path`` atomically: ``write_fn(f)`` on a temp file, flush, fsync, rename.

    Example::

        atomic_write("table.json", lambda f: json.dump(obj, f), mode="w")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, suffix=suffix) as tmp:
        with open(tmp, mode, **({"newline": ""} if mode == "w" else {})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
