"""Checkpoint files: ``checkpoint.pt`` (everything to resume), ``model.pt`` (EMA weights), ``coupling.pt``.

All are written atomically (``loom_kernels._io``) with a checksum of their contents (``atomic_save``),
and read back with ``torch.load(weights_only=True)`` (no code runs from a crafted file) by
``load_verified``, which names the file and the cause of every failure (empty, truncated, not a
PyTorch file, refused objects, a checksum mismatch). They hold tensors and plain Python types only,
so ``torch.load(path, weights_only=True)`` works for users too.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from ._io import atomic_save, checksum, load_verified  # noqa: F401  (re-exported: the trainer's formats use them)

__all__ = ["save_model", "load_checkpoint", "load_model", "load_verified"]


def rng_state(device: torch.device) -> dict:
    """The global RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (
            npst["kind"],
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    np.random.set_state(npst)  # a tuple in files written before the state was stored as tensors
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_model(path: str, ema: nn.Module, *, metadata: dict | None = None, step: int | None = None) -> None:
    """Writes the weights to sample with (the EMA) and metadata to ``path``, atomically.

    Example:
        >>> save_model("out/model.pt", result.ema, metadata={"model": result.ema.spec})  # doctest: +SKIP
    """
    atomic_save(
        {
            "format": "loom_kernels.model",
            "version": 2,
            "weights": "ema",
            "model": ema.state_dict(),
            "metadata": metadata or {},
            "step": step,
        },
        path,
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The fields each format must carry, with a check of their type: a file whose checksum is valid can still
# have been written by other code (or edited and re-checksummed); torch would fail on it with a raw
# TypeError/KeyError naming no file, or accept it (a step of 2.5 ends a run at 6.5).
_FIELDS = {
    "loom_kernels.checkpoint": {
        "step": ("a non-negative int", lambda v: _is_int(v) and v >= 0),
        "epoch": ("a non-negative int", lambda v: _is_int(v) and v >= 0),
        "seen": ("a non-negative int", lambda v: _is_int(v) and v >= 0),
        "world_size": ("a positive int", lambda v: _is_int(v) and v >= 1),
        "model": ("a state dict", lambda v: isinstance(v, dict)),
        "ema": ("a state dict", lambda v: isinstance(v, dict)),
        "optimizer": ("a state dict", lambda v: isinstance(v, dict)),
        "scheduler": ("a state dict", lambda v: isinstance(v, dict)),
        "scaler": ("a state dict", lambda v: isinstance(v, dict)),
        "rng": ("a list of RNG states", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)),
        "config": ("a dict", lambda v: isinstance(v, dict)),
    },
    "loom_kernels.model": {
        "model": ("a state dict", lambda v: isinstance(v, dict)),
    },
}
_OPTIONAL = {
    "coupling": ("a state dict or None", lambda v: v is None or isinstance(v, dict)),
    "metadata": ("a dict", lambda v: isinstance(v, dict)),
    "data": ("a string or None", lambda v: v is None or isinstance(v, str)),
}


def check_fields(ck: dict, path: str, *, complete: bool = False) -> None:
    """Raises ValueError naming ``path`` and the field when a field is of the wrong type, or (``complete``:
    what resuming or sampling from the file needs) missing."""
    fields = _FIELDS[ck["format"]]
    for key, (what, ok) in fields.items():
        if key not in ck:
            if not complete:
                continue
            raise ValueError(f"{path!r} is damaged or not written by loom_kernels: its field {key!r} is missing")
        if not ok(ck[key]):
            raise ValueError(
                f"{path!r} is damaged or not written by loom_kernels: its field {key!r} must be {what}, "
                f"got {type(ck[key]).__name__} {ck[key]!r:.60}"
            )
    for key, (what, ok) in _OPTIONAL.items():
        if key in ck and not ok(ck[key]):
            raise ValueError(
                f"{path!r} is damaged or not written by loom_kernels: its field {key!r} must be {what}, "
                f"got {type(ck[key]).__name__}"
            )
    if (
        ck["format"] == "loom_kernels.checkpoint"
        and {"rng", "world_size"} <= ck.keys()
        and len(ck["rng"]) != ck["world_size"]
    ):
        raise ValueError(f"{path!r} is damaged: it holds {len(ck['rng'])} RNG states for world_size {ck['world_size']}")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads a ``checkpoint.pt`` or ``model.pt`` written by :func:`train` / :func:`save_model` as a dict.

    Example:
        >>> ck = load_checkpoint("out/checkpoint.pt")  # doctest: +SKIP
        >>> ck["step"], ck["metadata"]  # doctest: +SKIP
    """
    ck = load_verified(path, "checkpoint", map_location)
    if not isinstance(ck, dict) or ck.get("format") not in ("loom_kernels.checkpoint", "loom_kernels.model"):
        raise ValueError(f"{path!r} is not a loom_kernels checkpoint or model file (no loom_kernels format tag)")
    check_fields(ck, path)
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
    check_fields(ck, path, complete=ck["format"] == "loom_kernels.model")
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
