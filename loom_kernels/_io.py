"""Atomic file writes: every file the package persists (couplings, memory-mapped tables,
checkpoints, logs, figures, samples) goes through :func:`atomic_path`, so a crash mid-write leaves
the previous file intact."""
from __future__ import annotations

import contextlib
import os
import tempfile


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
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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
