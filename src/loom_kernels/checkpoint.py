"""Checkpoint files: ``checkpoint.pt`` (everything to resume), ``model.pt`` (EMA weights), ``coupling.pt``.

All are written atomically (``loom_kernels._io``) with a checksum of their contents (``atomic_save``),
and read back with ``torch.load(weights_only=True)`` (no code runs from a crafted file) by
``load_verified``, which names the file and the cause of every failure (empty, truncated, not a
PyTorch file, refused objects, a checksum mismatch). They hold tensors and plain Python types only,
so ``torch.load(path, weights_only=True)`` works for users too.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import zipfile

import numpy as np
import torch
from torch import nn

from ._io import atomic_write

__all__ = ["save_model", "load_checkpoint", "load_model", "load_verified"]

_CHECKSUM = "checksum"  # the key atomic_save adds: {"algorithm": ..., "digest": hex}
_ALGORITHM = "blake2b-128"


def _rng_state(device: torch.device) -> dict:
    """The global RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["kind"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)  # a tuple in files written before the state was stored as tensors
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
        obj = {**{k: v for k, v in obj.items() if k != _CHECKSUM},
               _CHECKSUM: {"algorithm": _ALGORITHM,
                           "digest": checksum({k: v for k, v in obj.items() if k != _CHECKSUM})}}
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
        raise ValueError(f"{what} {path!r} is empty (0 bytes): its write was cut off (a crash or a full disk); "
                         f"use the previous checkpoint or another copy")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{what} {path!r} is truncated or damaged ({size:,} bytes; the zip directory at its end "
                             f"is missing): use the previous checkpoint or another copy")
        return True
    if head[:1] != b"\x80":  # torch.save's legacy format starts with a pickle protocol byte
        text = all(32 <= c < 127 or c in b"\t\r\n" for c in head)
        raise ValueError(f"{what} {path!r} is not a PyTorch file ({'a text file, ' if text else ''}it starts with "
                         f"{head[:16]!r}); expected a file written by torch.save")
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
        raise ValueError(f"{what} {path!r} holds objects that safe loading (weights_only=True) refuses, since "
                         f"unpickling them could run code: {first}. Load it with torch.load(weights_only=False) "
                         f"only if you trust where it came from") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what} {path!r} is corrupt or truncated: torch.load failed with "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from None
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
        raise ValueError(f"{what} {path!r} fails its checksum (stored {stored!r:.80}, computed {digest!r}): its "
                         f"bytes changed after it was written (disk or copy corruption); use another copy")
    return obj


def save_model(path: str, ema: nn.Module, *, metadata: dict | None = None, step: int | None = None) -> None:
    """Writes the weights to sample with (the EMA) and metadata to ``path``, atomically.

    Example:
        >>> save_model("out/model.pt", result.ema, metadata={"model": result.ema.spec})  # doctest: +SKIP
    """
    atomic_save({"format": "loom_kernels.model", "version": 2, "weights": "ema", "model": ema.state_dict(),
                  "metadata": metadata or {}, "step": step}, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads a ``checkpoint.pt`` or ``model.pt`` written by :func:`train` / :func:`save_model` as a dict.

    Example:
        >>> ck = load_checkpoint("out/checkpoint.pt")  # doctest: +SKIP
        >>> ck["step"], ck["metadata"]  # doctest: +SKIP
    """
    ck = load_verified(path, "checkpoint", map_location)
    if not isinstance(ck, dict) or ck.get("format") not in ("loom_kernels.checkpoint", "loom_kernels.model"):
        raise ValueError(f"{path!r} is not a loom_kernels checkpoint or model file (no loom_kernels format tag)")
    return ck


def load_model(path: str, model: nn.Module | None = None, *, weights: str = "ema", map_location="cpu") -> nn.Module:
    """A model with the sampling weights of ``path`` (the EMA by default), rebuilt from metadata when not given.

    Args:
        path: ``checkpoint.pt`` or ``model.pt``.
        model: the module to load into; None rebuilds it from ``metadata["model"]`` (see ``models.build``).
        weights: ``"ema"`` or ``"raw"`` (``"raw"`` needs a full checkpoint).

    Example:
        >>> net = load_model("out/model.pt").eval()  # doctest: +SKIP
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    ck = load_checkpoint(path, map_location=map_location)
    if ck["format"] == "loom_kernels.model":
        if weights == "raw":
            raise ValueError(f"{path!r} holds only the EMA weights; weights='raw' needs checkpoint.pt")
        state = ck["model"]
    else:
        state = ck["ema"] if weights == "ema" else ck["model"]
    if model is None:
        spec = (ck.get("metadata") or {}).get("model")
        if spec is None:
            raise ValueError(f"{path!r} has no model spec in its metadata: pass the model to load into")
        from .models import build

        model = build(spec)
    model.load_state_dict(state)
    return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
