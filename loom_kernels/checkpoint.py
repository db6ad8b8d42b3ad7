"""Checkpoint files of the trainer: ``checkpoint.pt`` (everything to resume) and ``model.pt`` (EMA weights).

Both are written atomically (``loom_kernels._io``); ``load_checkpoint`` checks the format tag before
anything reads the contents.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from ._io import atomic_write

__all__ = ["save_model", "load_checkpoint", "load_model"]


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_model(path: str, ema: nn.Module, *, metadata: dict | None = None, step: int | None = None) -> None:
    """Writes the weights to sample with (the EMA) and metadata to ``path``, atomically.

    Example:
        >>> save_model("out/model.pt", result.ema, metadata={"model": result.ema.spec})  # doctest: +SKIP
    """
    atomic_save({"format": "loom_kernels.model", "version": 1, "weights": "ema", "model": ema.state_dict(),
                  "metadata": metadata or {}, "step": step}, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Loads a ``checkpoint.pt`` or ``model.pt`` written by :func:`train` / :func:`save_model` as a dict.

    Example:
        >>> ck = load_checkpoint("out/checkpoint.pt")  # doctest: +SKIP
        >>> ck["step"], ck["metadata"]  # doctest: +SKIP
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    # weights_only=False: the checkpoint holds numpy / python RNG states; only load files you trust.
    ck = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") not in ("loom_kernels.checkpoint", "loom_kernels.model"):
        raise ValueError(f"{path!r} is not a loom_kernels checkpoint or model file")
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
