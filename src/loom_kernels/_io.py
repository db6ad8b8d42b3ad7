"""The base I/O layer. Atomic file writes: every file the package persists (couplings, memory-mapped
tables, checkpoints, logs, figures, samples) goes through :func:`atomic_path`, so a crash mid-write
leaves the previous file intact. Checksummed torch files: :func:`atomic_save` writes a dict with a
checksum of its entries, :func:`load_verified` reads it safely (``weights_only``) and names the file and
the cause of any failure; the couplings and the trainer's formats (``checkpoint.py``) both use them.

Temp files are named ``NAME.tmp-HOST-PID-XXXXXXXX[SUFFIX]`` beside ``NAME``: a failed write removes its
own, and the next write to ``NAME`` removes those of killed writers (same host, process gone). Files
get the permissions ``open()`` would give (``0o666`` less the umask), and a full disk is reported as
``OSError(ENOSPC)`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import tempfile
import zipfile

import numpy as np
import torch

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_LOW_SPACE = 16 << 20  # bytes: below this a failed write is reported as out of space
_CHECKSUM = "checksum"  # the key atomic_save adds: {"algorithm": ..., "digest": hex}
_ALGORITHM = "blake2b-128"


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


def current_umask() -> int:
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


def temp_prefix(base: str) -> str:
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
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(os.path.basename(path)), suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give what open() would
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


# ---- checksummed torch files (couplings, tables, checkpoints) ---------------------------------------


def _feed(h, obj) -> None:
    """Hash ``obj`` canonically: tensors by dtype, shape and bytes; containers in order (dicts by key)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype.str}{obj.shape};".encode())
        h.update(np.ascontiguousarray(obj).view(np.uint8))
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d;" % len(obj))
        for v in obj:
            _feed(h, v)
    else:  # None, bool, int, float (repr round-trips), str, bytes, torch.dtype, torch.device
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(obj) -> str:
    """The hex digest that ``atomic_save`` stores beside ``obj``'s entries (a dict's ``"checksum"``)."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename); a dict gets a ``"checksum"`` entry
    over all its other entries, which :func:`load_verified` checks (a flipped bit in any weight or seed)."""
    if isinstance(obj, dict):
        obj = {
            **{k: v for k, v in obj.items() if k != _CHECKSUM},
            _CHECKSUM: {"algorithm": _ALGORITHM, "digest": checksum({k: v for k, v in obj.items() if k != _CHECKSUM})},
        }
    atomic_write(path, lambda f: torch.save(obj, f))


def _numpy_globals() -> list:
    # Files written before the numpy RNG state was stored as tensors hold a numpy array: allow exactly
    # the names that rebuild a plain array (no code runs; object arrays still go through the safe unpickler).
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _sniff(path: str, what: str) -> bool:
    """Name what is wrong with a file that is not a whole PyTorch file; True for the zip format."""
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(
            f"{what} {path!r} is empty (0 bytes): its write was cut off (a crash or a full disk); "
            f"use the previous checkpoint or another copy"
        )
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            whole = zipfile.is_zipfile(path)
        except zipfile.BadZipFile as exc:  # a damaged end record (e.g. a flipped bit in its disk number)
            raise ValueError(
                f"{what} {path!r} is damaged: its zip directory at the end is corrupt ({exc}); "
                f"use the previous checkpoint or another copy"
            ) from None
        if not whole:
            raise ValueError(
                f"{what} {path!r} is truncated or damaged ({size:,} bytes; the zip directory at its end "
                f"is missing): use the previous checkpoint or another copy"
            )
        return True
    if head[:1] != b"\x80":  # torch.save's legacy format starts with a pickle protocol byte
        text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        raise ValueError(
            f"{what} {path!r} is not a PyTorch file ({'a text file, ' if text else ''}it starts with "
            f"{head[:16]!r}); expected a file written by torch.save"
        )
    return False


def load_verified(path, what: str = "checkpoint", map_location="cpu", *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with clear errors, then the checksum check.

    Errors name ``path`` and the cause: ``FileNotFoundError`` for a missing file, ``ValueError`` for an
    empty, truncated, foreign or corrupted file (a checksum mismatch) and for objects that safe loading
    refuses. Returns the object without its ``"checksum"`` entry. Files without one (older versions)
    load unverified, except a dict with ``version >= 2``, which must carry it.

    Example:
        >>> state = load_verified("out/coupling.pt", "LoomCoupling file")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    is_zip = _sniff(path, what)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1][:300]
        raise ValueError(
            f"{what} {path!r} holds objects that safe loading (weights_only=True) refuses, since "
            f"unpickling them could run code: {first}. Load it with torch.load(weights_only=False) "
            f"only if you trust where it came from"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{what} {path!r} is corrupt or truncated: torch.load failed with {type(exc).__name__}: {str(exc)[:300]}"
        ) from None
    if not isinstance(obj, dict):
        return obj
    stored = obj.pop(_CHECKSUM, None)
    if stored is None:
        version = obj.get("version", 1)
        if isinstance(version, int) and version >= 2:
            raise ValueError(f"{what} {path!r} (format version {version}) has lost its checksum entry: corrupted")
        return obj
    digest = checksum(obj)
    if not isinstance(stored, dict) or stored.get("digest") != digest:
        raise ValueError(
            f"{what} {path!r} fails its checksum (stored {stored!r:.80}, computed {digest!r}): its "
            f"bytes changed after it was written (disk or copy corruption); use another copy"
        )
    return obj
