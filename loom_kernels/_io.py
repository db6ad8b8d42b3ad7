"""Atomic file writes: every file the package persists (couplings, checkpoints, logs, figures,
samples) goes through :func:`atomic_write`, so a crash mid-write leaves the previous file intact."""
from __future__ import annotations

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


def atomic_write(path, write_fn, *, mode: str = "wb", suffix: str = ".tmp") -> None:
    """Write ``path`` through a temp file in the same directory: ``write_fn(f)``, flush, fsync,
    rename over ``path``, fsync the directory. Readers see the old file or the complete new one.

    Example::

        atomic_write("table.json", lambda f: json.dump(obj, f), mode="w")
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if mode == "w" else {})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
