"""``generate_pairs``: sample reflow pairs with the sampler and store them as seeds + targets (``store.py``)."""

from __future__ import annotations

import numbers
import os
import time

import numpy as np
import torch
from torch import nn

from .._device import resolve_device
from .._io import checksum
from ..noise import gaussian_noise
from ..sampler import sample
from ..sampler.fixed import ADAPTIVE
from .store import DTYPES, MANIFEST, OUR_FILES, PairsFolder, create, seeds_for

__all__ = ["generate_pairs", "METHODS"]

METHODS = ("euler", "midpoint", "heun", "dopri5")


def _load(model):
    if isinstance(model, (str, os.PathLike)):
        from ..checkpoint import load_model

        return load_model(os.fspath(model)), os.fspath(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module or the path of a model.pt/checkpoint.pt, got {type(model).__name__}"
        )
    return model, None


def _labels(labels, model, num: int):
    classes = getattr(model, "num_classes", None)
    if not classes:
        if labels is not None:
            raise ValueError("labels were given but the model is not conditional (it has no num_classes)")
        return None
    if labels is None:
        raise ValueError(
            f"the model is conditional ({classes} classes): pass labels= (a ({num},) integer array, or "
            f"'balanced' for class i % {classes}), --labels on the command line"
        )
    if isinstance(labels, str):
        if labels != "balanced":
            raise ValueError(f"labels must be 'balanced' or a ({num},) integer array, got {labels!r}")
        return np.arange(num, dtype=np.int64) % classes
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.shape != (num,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a ({num},) integer array, got {y.dtype} {y.shape}")
    if num and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _seeds(seeds, seed: int, num: int) -> np.ndarray:
    if seeds is None:
        return seeds_for(seed, num)
    s = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds)
    if s.shape != (num,) or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"seeds must be a ({num},) integer array, got {s.dtype} {s.shape}")
    s = s.astype(np.uint64).view(np.int64) if s.dtype == np.uint64 else s.astype(np.int64)
    uniq, counts = np.unique(s, return_counts=True)
    if len(uniq) != num:
        raise ValueError(
            f"seeds has a seed collision: {int((counts > 1).sum())} values repeat (e.g. {uniq[counts > 1][0]})"
        )
    return s


def _check_args(num, method, nfe, dtype, batch_size, guidance):
    if isinstance(num, bool) or not isinstance(num, numbers.Integral) or num < 1:
        raise ValueError(f"num must be a positive integer (the pairs to generate), got {num!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method not in ADAPTIVE and (isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1):
        raise ValueError(f"nfe must be a positive integer for method {method!r}, got {nfe!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (how targets are stored), got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if guidance is not None and not isinstance(guidance, numbers.Real):
        raise ValueError(f"guidance must be a number or None, got {guidance!r}")


def _open_or_create(out, manifest, seeds, labels, cond, durable) -> PairsFolder:
    out = os.fspath(out)
    if os.path.exists(os.path.join(out, MANIFEST)):
        pf = PairsFolder(out, verify=True, writable=True, durable=durable)
        old, new = pf.manifest, {**manifest, "files": pf.manifest["files"]}
        diff = [
            f"{k}: {old.get(k)!r} -> {new[k]!r}"
            for k in ("model", "settings", "shape", "dtype", "count")
            if old.get(k) != new[k]
        ]
        for name, mine, theirs in (("seeds", seeds, pf.seeds), ("labels", labels, pf.labels), ("cond", cond, pf.cond)):
            if (mine is None) != (theirs is None) or (mine is not None and not np.array_equal(mine, theirs)):
                diff.append(f"{name} differ")
        if diff:
            raise ValueError(
                f"pairs folder {out!r} was made by another model or other settings ({'; '.join(diff)}): "
                f"use another --out, or the same model and settings to resume it"
            )
        return pf
    if os.path.isdir(out):
        foreign = [n for n in os.listdir(out) if n not in OUR_FILES and ".tmp-" not in n]
        if foreign:
            raise FileExistsError(
                f"out {out!r} is a folder with other files ({foreign[:3]}): give an empty or new folder"
            )
    return create(out, manifest, seeds, labels, cond, durable)


@torch.no_grad()
def generate_pairs(
    model,
    num: int,
    method: str = "euler",
    nfe: int | None = None,
    out: str = "pairs",
    *,
    guidance: float | None = None,
    labels=None,
    cond=None,
    seed: int = 0,
    seeds=None,
    shape=None,
    dtype: str = "float32",
    batch_size: int = 256,
    device=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = True,
    durability: str = "crash",
    commit_every: float = 1.0,
) -> PairsFolder:
    """Samples ``num`` reflow pairs ``(noise(seed_i), model's ODE solution from it)`` into the folder ``out``.

    Pair ``i``'s noise is ``noise.gaussian_noise([seed_i], shape)`` (regenerated from its 64-bit seed on any
    device), its target the sampler's ``sample(model, x0, nfe, method=...)`` stored as ``dtype``: 8 bytes +
    the target per pair. Batches of ``batch_size`` run through :func:`loom_kernels.sampler.sample` (CUDA
    graphs where they apply); each finished batch is flushed and recorded atomically, so a killed run
    resumes where it stopped when called again with the same arguments (nothing redone twice, nothing lost);
    a folder made by another model or settings is refused.

    Args:
        model: a velocity ``nn.Module`` or the path of a ``model.pt``/``checkpoint.pt`` (its EMA weights).
        num: pairs to make. method: ``euler``, ``midpoint``, ``heun`` or ``dopri5``. nfe: evaluations
            (fixed-step methods). out: the pairs folder.
        guidance: classifier-free guidance scale for a conditional model (None: plain conditional).
        labels: a conditional model (``num_classes``) needs them: ``(num,)`` integers or ``"balanced"``.
        cond: optional ``(num, Dc)`` float condition per pair, passed to the model as ``cond=`` and stored.
        seed: the seeds are ``seeds_for(seed, num)`` (distinct); or give ``seeds`` ``(num,)`` (distinct).
        shape: one target's shape (default ``model.shape``). dtype: ``"float32"`` or ``"float16"``.
        device: where to sample (default CUDA if available). rtol, atol: dopri5's tolerances.
        durability: ``"crash"`` (default: survives kill -9 and any process fault) or ``"power"`` (also a
            power loss: each batch is msynced and fsynced before it counts).
        commit_every: seconds between progress records (0: after every batch); a kill redoes at most the
            batches since the last one, from their seeds.

    Returns:
        the :class:`~loom_kernels.reflow.store.PairsFolder`, complete.

    Example:
        >>> pf = generate_pairs("run/model.pt", 10_000, "euler", 8, "pairs/")  # doctest: +SKIP
    """
    model, path = _load(model)
    _check_args(num, method, nfe, dtype, batch_size, guidance)
    if durability not in ("crash", "power"):
        raise ValueError(f"durability must be 'crash' or 'power', got {durability!r}")
    if isinstance(commit_every, bool) or not (isinstance(commit_every, (int, float)) and commit_every >= 0):
        raise ValueError(f"commit_every must be a number of seconds >= 0, got {commit_every!r}")
    shape = tuple(shape if shape is not None else getattr(model, "shape", ()) or ())
    if not shape:
        raise ValueError("shape: the model has no .shape; pass shape= (one target's shape)")
    y = _labels(labels, model, num)
    c = None
    if cond is not None:
        c = np.asarray(cond.cpu() if isinstance(cond, torch.Tensor) else cond, dtype=np.float32)
        c = c[:, None] if c.ndim == 1 else c
        if c.ndim != 2 or c.shape[0] != num or not np.isfinite(c).all():
            raise ValueError(f"cond must be a finite ({num}, Dc) float array, got shape {c.shape}")
    s = _seeds(seeds, seed, num)
    dev = resolve_device(device, prefer_cuda=True)
    model = model.to(dev)
    manifest = {
        "model": checksum({k: v.cpu() for k, v in model.state_dict().items()}),
        "model_path": path,
        "settings": {
            "method": method,
            "nfe": None if method in ADAPTIVE else int(nfe),
            "guidance": None if guidance is None else float(guidance),
            "rtol": rtol if method in ADAPTIVE else None,
            "atol": atol if method in ADAPTIVE else None,
        },
        "shape": list(shape),
        "dtype": dtype,
        "count": int(num),
        "block": int(batch_size),
    }
    pf = _open_or_create(out, manifest, s, y, c, durability == "power")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=pf.count, initial=pf.done, desc="reflow pairs", unit="pair", dynamic_ncols=True)
    written = len(pf.block_digests)  # blocks whose rows are all in the map
    last = time.monotonic()
    try:
        for j in range(written, -(-pf.count // pf.block)):
            rows = pf.block_rows(j)
            x0 = gaussian_noise(torch.from_numpy(pf.seeds[rows]), shape, device=dev)
            kw = {}
            if pf.labels is not None:
                kw["y"] = torch.from_numpy(pf.labels[rows]).to(dev)
            if pf.cond is not None:
                kw["cond"] = torch.from_numpy(pf.cond[rows]).to(dev)
            opts = {"rtol": rtol, "atol": atol} if method in ADAPTIVE else {}
            x1 = sample(model, x0, nfe, method=method, model_kwargs=kw or None, guidance=guidance, **opts)
            x1 = x1.cpu()
            if not bool(torch.isfinite(x1).all()):
                raise FloatingPointError(
                    f"the model produced non-finite targets for pairs {rows.start}..{rows.stop - 1}: nothing of "
                    f"this batch was stored (the {rows.start} pairs before it are kept)"
                )
            pf.targets[rows] = x1.numpy().astype(pf.dtype, copy=False)
            written = j + 1
            if time.monotonic() - last >= commit_every:
                pf.commit(written)
                last = time.monotonic()
            if bar is not None:
                bar.update(rows.stop - rows.start)
    finally:
        pf.commit(written)  # whatever is whole in the map (also on an error or Ctrl-C)
        if bar is not None:
            bar.close()
    return pf
