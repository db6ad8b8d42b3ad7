"""The pairs folder: one 64-bit noise seed and one generated target per pair, crash-safe and checksummed.

Files (all written through ``loom_kernels._io``'s atomic writes except the targets' memory map):

- ``manifest.json``: what made the pairs (model checksum, method, nfe, guidance, seed, ...), the target's
  shape and dtype, the count, the block size and the digests of ``seeds.npy`` / ``labels.npy`` /
  ``cond.npy``; written last at creation, so a folder without it was never started;
- ``seeds.npy`` ``(N,)`` int64 and, for a conditional model, ``labels.npy`` ``(N,)`` int64 / ``cond.npy``
  ``(N, Dc)`` float32: known before sampling, written whole at creation;
- ``targets.npy`` ``(N, *shape)`` float16/float32, memory-mapped, filled block by block;
- ``progress.json``: the pairs done and one blake2b digest per finished block of targets.

Crash safety: a block's targets are written into the map, then ``progress.json`` is replaced atomically
(rename). A kill at any point leaves either the old progress (the block is redone from its seeds: nothing
is duplicated) or the new one over written rows (nothing is lost): the page cache outlives a killed process
(durability ``"crash"``, the seed table's default). ``"power"`` also msyncs the rows and fsyncs each file
before the rename, to survive a power loss (a few ms a batch). Opening checks the
manifest's own checksum, the seeds' and labels' digests, the file sizes and every finished block's digest,
and names the file at fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile

import numpy as np

from .._io import atomic_path, current_umask, remove_stale_temps, temp_prefix

__all__ = ["FORMAT", "PairsFolder", "open_pairs", "seeds_for"]

FORMAT = "loom_kernels.reflow_pairs"
VERSION = 1
MANIFEST, PROGRESS, SEEDS, LABELS, COND, TARGETS = (
    "manifest.json",
    "progress.json",
    "seeds.npy",
    "labels.npy",
    "cond.npy",
    "targets.npy",
)
OUR_FILES = (MANIFEST, PROGRESS, SEEDS, LABELS, COND, TARGETS)
DTYPES = ("float16", "float32")


def digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8))
    return h.hexdigest()


def _json_digest(obj: dict) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=16).hexdigest()


@contextlib.contextmanager
def _replace(path: str, durable: bool, suffix: str):
    """A temp path renamed over ``path`` on success: ``atomic_path`` (fsyncs) when ``durable``, else the same
    rename without syncs (enough against kill -9: the page cache outlives the process, as for the seed
    table's default durability "crash")."""
    if durable:
        with atomic_path(path, suffix=suffix) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(os.path.basename(path)), suffix=suffix, dir=os.path.dirname(path))
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj: dict, durable: bool = True) -> None:
    obj = {**obj, "checksum": _json_digest(obj)}
    with _replace(path, durable, ".tmp") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"pairs {what} {path!r} is damaged or truncated (not valid JSON: {exc})") from None
    stored = obj.pop("checksum", None) if isinstance(obj, dict) else None
    if stored is None or stored != _json_digest(obj):
        raise ValueError(f"pairs {what} {path!r} fails its checksum: it was changed or damaged after it was written")
    return obj


def seeds_for(seed: int, n: int) -> np.ndarray:
    """``n`` distinct int64 seeds from ``seed``: splitmix64's bijective mix of ``mix(seed) + i`` (no collisions)."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed], dtype=np.uint64))[0]
        return _mix(base + np.arange(n, dtype=np.uint64)).view(np.int64)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _load_npy(path: str, what: str, mmap: str | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"pairs file {path!r} ({what}) is missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"pairs file {path!r} ({what}) is truncated or damaged: {exc}") from None


class PairsFolder:
    """An opened pairs folder: ``seeds`` ``(N,)`` int64, ``targets`` ``(N, *shape)`` (memory-mapped),
    ``labels`` ``(N,)`` or None, ``cond`` ``(N, Dc)`` or None, ``manifest``, ``done`` (pairs finished)."""

    def __init__(self, path: str, *, verify: bool = True, writable: bool = False, durable: bool = False):
        self.path, self.durable = os.fspath(path), durable
        mpath = os.path.join(self.path, MANIFEST)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"pairs folder {self.path!r} does not exist")
        if not os.path.exists(mpath):
            raise FileNotFoundError(
                f"pairs folder {self.path!r} has no {MANIFEST}: not a pairs folder (or its generation never "
                f"started); make one with python -m loom_kernels.reflow generate"
            )
        m = self.manifest = _read_json(mpath, "manifest")
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{mpath!r} is not a {FORMAT} v{VERSION} manifest (format {m.get('format')!r})")
        self.count, self.shape, self.dtype = int(m["count"]), tuple(m["shape"]), np.dtype(m["dtype"])
        self.block = int(m["block"])
        self.seeds = self._array(SEEDS, "seeds", (self.count,), np.int64)
        self.labels = self._array(LABELS, "labels", (self.count,), np.int64) if m["files"].get(LABELS) else None
        self.cond = self._array(COND, "cond", None, np.float32) if m["files"].get(COND) else None
        if len(np.unique(self.seeds)) != self.count:
            raise ValueError(
                f"pairs file {os.path.join(self.path, SEEDS)!r} has a seed collision: two pairs share a seed"
            )
        tpath = os.path.join(self.path, TARGETS)
        expect = (self.count, *self.shape)
        if os.path.exists(tpath):
            need = math.prod(expect) * self.dtype.itemsize
            if os.path.getsize(tpath) < need:
                raise ValueError(
                    f"pairs file {tpath!r} (targets) is truncated: {os.path.getsize(tpath):,} bytes, at least "
                    f"{need:,} expected"
                )
        if writable:  # the temp files of a killed writer (crash durability leaves them behind)
            for name in OUR_FILES:
                remove_stale_temps(os.path.join(self.path, name))
        self.targets = _load_npy(tpath, "targets", mmap="r+" if writable else "r")
        if self.targets.shape != expect or self.targets.dtype != self.dtype:
            raise ValueError(
                f"pairs file {tpath!r} holds {self.targets.dtype} {self.targets.shape}, the manifest says "
                f"{self.dtype} {expect}"
            )
        prog = _read_json(os.path.join(self.path, PROGRESS), "progress file")
        self.done, self.block_digests = int(prog["done"]), list(prog["digests"])
        if not 0 <= self.done <= self.count or len(self.block_digests) != -(-self.done // self.block):
            raise ValueError(f"pairs progress file {os.path.join(self.path, PROGRESS)!r} is inconsistent: {prog}")
        if verify:
            self.verify()

    def _array(self, name, what, shape, dtype) -> np.ndarray:
        path = os.path.join(self.path, name)
        a = _load_npy(path, what)
        if (
            a.dtype != dtype
            or (shape is not None and a.shape != shape)
            or (shape is None and a.shape[:1] != (self.count,))
        ):
            raise ValueError(
                f"pairs file {path!r} holds {a.dtype} {a.shape}, expected {np.dtype(dtype)} ({self.count}, ...)"
            )
        if digest(a) != self.manifest["files"][name]:
            raise ValueError(
                f"pairs file {path!r} ({what}) fails its checksum: damaged or changed after it was written"
            )
        return a

    def block_rows(self, j: int) -> slice:
        return slice(j * self.block, min((j + 1) * self.block, self.count))

    def verify(self) -> None:
        """Checks every finished block of targets against its digest (reads them all)."""
        for j, d in enumerate(self.block_digests):
            if digest(self.targets[self.block_rows(j)]) != d:
                rows = self.block_rows(j)
                raise ValueError(
                    f"pairs file {os.path.join(self.path, TARGETS)!r} fails its checksum in block {j} (pairs "
                    f"{rows.start}..{rows.stop - 1}): damaged after it was written; regenerate the folder"
                )

    def commit(self, upto: int) -> None:
        """Blocks up to ``upto`` (exclusive) have their targets in the map: record them as done, atomically."""
        first = len(self.block_digests)
        if upto <= first:
            return
        if self.durable:
            self.targets.flush()  # msync: the rows reach the disk before the progress that claims them
        self.block_digests += [digest(self.targets[self.block_rows(j)]) for j in range(first, upto)]
        self.done = self.block_rows(upto - 1).stop
        _write_json(os.path.join(self.path, PROGRESS), {"done": self.done, "digests": self.block_digests}, self.durable)

    @property
    def complete(self) -> bool:
        return self.done == self.count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"PairsFolder({self.path!r}, {self.done}/{self.count} pairs of {self.dtype.name} {self.shape}"
            f"{', labelled' if self.labels is not None else ''})"
        )


def open_pairs(path, *, verify: bool = True) -> PairsFolder:
    """A finished pairs folder, checked (manifest, digests, sizes, seeds distinct); an unfinished one raises."""
    if isinstance(path, PairsFolder):
        pf = path
    else:
        pf = PairsFolder(path, verify=verify)
    if not pf.complete:
        raise ValueError(
            f"pairs folder {pf.path!r} holds {pf.done} of {pf.count} pairs: its generation was interrupted; "
            f"finish it by rerunning the same python -m loom_kernels.reflow generate command"
        )
    return pf


def create(path: str, manifest: dict, seeds: np.ndarray, labels, cond, durable: bool) -> PairsFolder:
    """Writes a new folder (arrays first, manifest last) and opens it for writing."""
    os.makedirs(path, exist_ok=True)
    files = {SEEDS: seeds}
    if labels is not None:
        files[LABELS] = labels
    if cond is not None:
        files[COND] = cond
    for name, a in files.items():
        with _replace(os.path.join(path, name), durable, ".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, a)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
    shape = (manifest["count"], *manifest["shape"])
    with _replace(os.path.join(path, TARGETS), durable, ".npy") as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=manifest["dtype"], shape=shape)
        del mm  # the header is written; the zero rows need no flush (they are rewritten before they count)
        with open(tmp, "r+b") as f:  # reserve the space: a sparse map would die with SIGBUS on a full disk
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            except (AttributeError, OSError) as exc:
                if getattr(exc, "errno", None) in (28, 122):  # ENOSPC, EDQUOT
                    raise
            if durable:
                os.fsync(f.fileno())
    _write_json(os.path.join(path, PROGRESS), {"done": 0, "digests": []}, durable)
    _write_json(
        os.path.join(path, MANIFEST),
        {**manifest, "format": FORMAT, "version": VERSION, "files": {k: digest(v) for k, v in files.items()}},
        durable,
    )
    return PairsFolder(path, verify=False, writable=True, durable=durable)
