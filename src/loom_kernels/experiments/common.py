"""The building blocks the demo and the study share: run sizes, fitting (``fit``), sample quality
(``quality``, ``dopri5_sample``), spread over seeds and rankings that hold on every seed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..metrics import dataset_cost
from .variants import COUPLINGS

COLORS = {"independent": "tab:gray", "ot": "tab:blue", "loom": "tab:red"}


EVALS = (("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("midpoint", 2), ("midpoint", 4), ("midpoint", 8))


COLUMNS = tuple(f"{m}{k}" for m, k in EVALS) + ("dopri5",)  # keys of every W2 record


DOPRI5_TOL = 1e-5  # the paper's dopri5 reference tolerance (rtol = atol)


STRAIGHTNESS_NFE = 16


def default_out(name: str) -> str:
    """Where ``--out`` points when not given: ``name`` under the current directory, except inside a loom_kernels
    checkout (found by its pyproject.toml and src/loom_kernels), where it goes beside the checkout: results
    never land in the source tree unless the user names it there."""
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "pyproject.toml").is_file() and (d / "src" / "loom_kernels").is_dir():
            return str(d.parent / name)
    return name


def column_label(col: str) -> str:
    """'euler1' -> 'Euler NFE 1', 'midpoint4' -> 'midpoint NFE 4', 'dopri5' -> 'dopri5'."""
    if col == "dopri5":
        return "dopri5"
    method = col.rstrip("0123456789")
    return f"{'Euler' if method == 'euler' else method} NFE {col[len(method) :]}"


# settings key -> command-line flag (its dest) of the run sizes the demo and the study share
SIZE_FLAGS = {"steps": "steps", "batch_size": "batch_size", "n": "points", "n_eval": "n_eval"}


def add_size_options(p: argparse.ArgumentParser) -> None:
    """The run-size options of the demo and the study (each defaults to its data set's preset)."""
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (None: the data set's preset)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (None: the data set's preset)")
    p.add_argument(
        "--points", type=int, default=None, help="training points of a 2-D set (held-out set: the same size)"
    )
    p.add_argument("--n-eval", type=int, default=None, help="generated samples / held-out points for W2")


def override_sizes(s: dict, args, flags: dict = SIZE_FLAGS) -> dict:
    """``s`` (settings, changed in place and returned) with every flag of ``flags`` the user gave;
    a given value must be positive (SystemExit naming the flag)."""
    for key, flag in flags.items():
        v = getattr(args, flag)
        if v is not None:
            if v <= 0:
                raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {v}")
            s[key] = v
    return s


# ---- building blocks (the study reuses them) ----------------------------------------------------------


def dopri5_sample(model, x0: torch.Tensor, *, rtol: float = DOPRI5_TOL, atol: float = DOPRI5_TOL) -> tuple:
    """The adaptive reference solution: dopri5 from t=0 to t=1; returns ``(x1, nfe)``.

    ``x0`` (B, *dims) -> ``x1`` (B, *dims) and the number of model evaluations the solver made
    (the sampler's native Dormand-Prince 5(4), error-controlled as torchdiffeq's).

    Example:
        >>> x1, nfe = dopri5_sample(lambda x, t: -x, torch.ones(4, 2))  # x1 = exp(-1)
    """
    from ..sampler import Options, sample

    info = {}
    x1 = sample(model, x0, method="dopri5", atol=atol, rtol=rtol, options=Options(info=info))
    return x1, info["nfe"]


def quality(model, x0: torch.Tensor, x_ref: torch.Tensor, *, dopri5: bool = True) -> tuple:
    """Exact W2 between samples from ``x0`` and ``x_ref`` at every column of ``COLUMNS``.

    ``x0`` and ``x_ref`` are (n, *dims). Returns ``(w2s, samples, dopri5_nfe)``: ``w2s`` maps
    'euler1', ..., 'midpoint8' (and 'dopri5' when ``dopri5``) to a float, ``samples`` the same keys
    to the CPU samples, ``dopri5_nfe`` the reference's evaluations (None when skipped).
    """
    from ..metrics import w2
    from ..sampler import sample

    w2s, samples, nfe_ref = {}, {}, None
    for method, nfe in EVALS:
        x1 = sample(model, x0, nfe, method=method)
        w2s[f"{method}{nfe}"] = w2(x1, x_ref)
        samples[f"{method}{nfe}"] = x1.cpu()
    if dopri5:
        x1, nfe_ref = dopri5_sample(model, x0)
        w2s["dopri5"] = w2(x1, x_ref)
        samples["dopri5"] = x1.cpu()
    return w2s, samples, nfe_ref


def fit(
    model,
    x_train: torch.Tensor,
    coupling,
    s: dict,
    *,
    seed: int,
    device,
    progress: bool = False,
    track_cost: bool = False,
    metadata: dict | None = None,
) -> dict:
    """Trains ``model`` on ``x_train`` (N, *shape) under ``coupling`` with the budget ``s`` (steps,
    batch_size, lr) through ``loom_kernels.train.train``.

    Returns a dict: ``ema`` (the model to sample), ``history`` (the trainer's rows), ``train_seconds``
    and, when ``track_cost`` (a coupling with a seed table), ``dataset_cost``: ``[(step, mean cost over
    every point and cache)]`` at step 0 and at ~60 steps, geometric early (LOOM converges within a few
    epochs) and regular later.
    """
    from ..data import IndexedDataset
    from ..train import TrainConfig, train

    cfg = TrainConfig(
        steps=s["steps"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        warmup=min(200, s["steps"] // 10),
        ema_decay=0.999,
        seed=seed,
        device=str(device),
        log_every=1,
        progress=progress,
    )
    x_dev = x_train.to(device)
    curve, callback, every = [], None, 0
    if track_cost:
        at = set(np.unique(np.geomspace(1, s["steps"], 30).astype(int)).tolist())
        at |= set(range(0, s["steps"] + 1, max(1, s["steps"] // 40)))
        curve.append((0, dataset_cost(coupling, x_dev)))
        every = 1

        def callback(step, *, model, ema, coupling):  # noqa: ARG001 - the trainer's callback signature
            if step in at:
                curve.append((step, dataset_cost(coupling, x_dev)))

    t0 = time.perf_counter()
    res = train(
        model, IndexedDataset(x_train), coupling, cfg, callback=callback, callback_every=every, metadata=metadata
    )
    return {
        "ema": res.ema.eval(),
        "history": res.history,
        "train_seconds": time.perf_counter() - t0,
        "dataset_cost": curve,
    }


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    v = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "values": v.tolist(),
    }


def fmt(sp: dict | None, digits: int = 3, sep: str = "±") -> str:
    """'0.553±0.025' (mean ± sd over seeds; ``sep`` between them), '-' for None."""
    return "-" if sp is None else f"{sp['mean']:.{digits}f}{sep}{sp['sd']:.{digits}f}"


def ranking(per_seed: list, names=COUPLINGS) -> dict:
    """The order of ``names`` by value on each seed, and whether it is the same on every seed.

    ``per_seed``: one dict name -> value per seed (lower is better). Returns ``order`` (the common
    order, best first, or None when the seeds disagree), ``orders`` (each seed's) and ``below``:
    for every ordered pair (a, b), on how many seeds a < b.

    Example:
        >>> ranking([{"a": 1, "b": 2}, {"a": 3, "b": 2}], names=("a", "b"))["order"] is None
        True
    """
    orders = [sorted(names, key=lambda c: v[c]) for v in per_seed]
    same = all(o == orders[0] for o in orders)
    below = {f"{a}<{b}": sum(v[a] < v[b] for v in per_seed) for a in names for b in names if a != b}
    return {"order": orders[0] if same else None, "orders": orders, "below": below, "seeds": len(per_seed)}
