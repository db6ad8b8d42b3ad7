"""The ablation study (``python -m loom_kernels.study``): what in LOOM-CFM makes the difference, and when it fails.

The paper's ablations (Davtyan et al., ICLR 2025, section 5) on the built-in data sets, each trained
with the same model, steps, batch and seed through ``loom_kernels.train.train``:

- ``ot``: minibatch OT (fresh noise each step, assignment not saved);
- ``fixed``: fixed noise without reassignment (point i always trains with the noise of its seed in a
  LoomCoupling's initial table: a random but frozen pairing; ``FixedNoiseCoupling``);
- ``converged``: training after the coupling has converged (LOOM's reassignment swept over the data
  set, minibatch by minibatch, until its dataset-wide cost stops improving; then training with it);
- ``loom1``, ``loom4``, ``loom16``, ``loom64``: LOOM-CFM with 1, 4, 16, 64 noise caches per point;
- ``independent`` (optional): fresh noise, random pairs.

Measured per run: exact W2 (``metrics.w2``) to held-out data at Euler NFE 1, 2, 4, 8, from fresh
noise and from the noise the model trained on (rows of its seed table), the straightness of the
flow, the coupling's cost curve over training, and its dataset-wide cost against the global
optimum. The gap between the two W2 measures the memorisation of a finite noise set; the study
tabulates it against the total number of noise samples (caches x points).

Outputs in ``--out``: ``study.csv`` (one row per run), ``study_summary.csv`` and ``study.md`` (mean,
sd, min, max over seeds), ``study.png``, ``runs/*.json`` (each run, with its curves; a rerun skips
the runs already there, so an interrupted grid resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from .._io import atomic_write
from .report import csv_row, markdown, summarize, versus_ot, write_outputs
from .variants import (
    ALL_VARIANTS,
    CONVERGE_MAX_EPOCHS,
    CONVERGE_RTOL,
    DATASETS,
    DEFAULTS,
    LABELS,
    MAX_OPT_POINTS,
    NEW_VARIANTS,
    NFES,
    SINKHORN_VARIANTS,
    VARIANTS,
    LargeBatchSinkhorn,
    caches_of,
    converge,
    make_variant,
)

# The variant table (variants.py) and the outputs (report.py), by this module's names too.
__all__ = [
    "run_one",
    "settings",
    "run",
    "main",
    "markdown",
    "csv_row",
    "summarize",
    "versus_ot",
    "write_outputs",
    "ALL_VARIANTS",
    "CONVERGE_MAX_EPOCHS",
    "CONVERGE_RTOL",
    "DATASETS",
    "DEFAULTS",
    "LABELS",
    "MAX_OPT_POINTS",
    "NFES",
    "SINKHORN_VARIANTS",
    "NEW_VARIANTS",
    "VARIANTS",
    "LargeBatchSinkhorn",
    "caches_of",
    "converge",
]


def run_one(data: str, variant: str, seed: int, s: dict, threads: int = 1) -> dict:
    """Trains and measures one (data set, variant, seed); returns a JSON-able record."""
    from .. import data as data_mod
    from ..metrics import global_optimum, straightness, w2
    from ..models import MLPVelocity
    from ..noise import gaussian_noise
    from ..sampler import sample
    from .common import fit, spread

    torch.set_num_threads(threads)
    x_train = data_mod.load(data, "train", n=s["n"], seed=seed)
    x_test = data_mod.load(data, "test", n=s["n"], seed=seed)
    n, shape = len(x_train), tuple(x_train.shape[1:])
    n_eval = min(s["n_eval"] or len(x_test), len(x_test), n)
    gen = torch.Generator().manual_seed(seed + 12345)
    x0_fresh = torch.randn(n_eval, *shape, generator=gen)
    x_ref = x_test[torch.randperm(len(x_test), generator=gen)[:n_eval]]
    rows = torch.randperm(n, generator=gen)[:n_eval]
    floor = w2(x_train[rows], x_ref)

    coupling = make_variant(variant, n, shape, seed, x_train, s["batch_size"])
    rec = {
        "data": data,
        "variant": variant,
        "seed": seed,
        "n_train": n,
        "n_eval": n_eval,
        "caches": caches_of(variant),
        "steps": s["steps"],
        "batch_size": s["batch_size"],
        "w2_floor": floor,
    }
    rec["noise_total"] = None if rec["caches"] is None else rec["caches"] * n
    t0 = time.perf_counter()
    if variant == "converged":
        rec["converge_curve"] = converge(coupling, x_train, s["batch_size"], seed)
    rec["converge_seconds"] = time.perf_counter() - t0
    table = getattr(coupling, "seeds", None)
    if table is not None:
        rec["global_optimum"] = global_optimum(table, x_train, MAX_OPT_POINTS)

    torch.manual_seed(seed)  # the same initial weights for every variant
    model = MLPVelocity(shape, hidden=s["hidden"], depth=s["depth"])
    f = fit(model, x_train, coupling, s, seed=seed, device="cpu", track_cost=table is not None)
    ema = f["ema"]
    rec["train_seconds"] = f["train_seconds"]
    t_eval = time.perf_counter()
    rec["w2_fresh"] = {k: w2(sample(ema, x0_fresh, k, method="euler"), x_ref) for k in NFES}
    if table is not None:
        # The noise the model trained on: each evaluated point's current partner in cache 0.
        x0_train = gaussian_noise(coupling.seeds[rows, 0], shape)
        rec["w2_train"] = {k: w2(sample(ema, x0_train, k, method="euler"), x_ref) for k in NFES}
    else:
        rec["w2_train"] = {k: None for k in NFES}
    rec["straightness"] = straightness(ema, x0_fresh, 16)
    rec["eval_seconds"] = time.perf_counter() - t_eval
    hist = f["history"]
    tail = hist[-max(1, len(hist) // 10) :]
    rec["minibatch_cost_end"] = float(np.mean([h["post_cost"] for h in tail]))
    rec["minibatch_cost_curve"] = _thin([(h["step"], h["post_cost"]) for h in hist], 200)
    rec["dataset_cost_curve"] = f["dataset_cost"]
    if f["dataset_cost"]:
        rec["dataset_cost_start"], rec["dataset_cost_end"] = f["dataset_cost"][0][1], f["dataset_cost"][-1][1]
    rec["final_loss"] = spread(h["loss"] for h in tail)["mean"]
    return rec


def _thin(points: list, k: int) -> list:
    """At most ~k points of a curve: trailing means over equal windows (keeps its shape, drops its noise)."""
    if len(points) <= k:
        return points
    w = len(points) // k
    return [
        (points[i + w - 1][0], float(np.mean([p[1] for p in points[i : i + w]])))
        for i in range(0, len(points) - w + 1, w)
    ]


# ---- the grid ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from ..cli._errors import HelpFormatter
    from .common import add_size_options

    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.study",
        description="The paper's ablations (minibatch OT, fixed noise without reassignment, training after "
        "convergence, LOOM with 1/4/16/64 caches) on the built-in data sets over several seeds: "
        "W2 on fresh and on training noise, straightness, coupling cost curves; CSV, markdown "
        "table and figure.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS, help="data sets")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=ALL_VARIANTS, help="couplings compared")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    add_size_options(p)
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes, one thread each)")
    p.add_argument("--out", default=None, help="output folder; None: loom_study here (beside a loom_kernels checkout)")
    return p


def settings(args, data: str) -> dict:
    from .common import override_sizes

    return override_sizes(dict(DEFAULTS["digits" if data == "digits" else "2d"]), args)


def run(args) -> list:
    """Runs the grid for parsed ``args`` (resuming from ``out/runs``); writes the outputs; returns the records."""
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit(f"--seeds and --jobs must be positive, got {args.seeds} and {args.jobs}")
    grid = {d: settings(args, d) for d in args.data}  # validates the flags before any work
    from .._optional import require
    from .common import default_out

    require("matplotlib", "the study's figure")  # before the runs, not after them
    args.out = args.out or default_out("loom_study")
    runs_dir = os.path.join(args.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    tasks = [(d, v, k) for d in args.data for v in args.variants for k in range(args.seeds)]
    todo = [t for t in tasks if not os.path.exists(_run_path(runs_dir, *t))]
    print(
        f"study: {len(tasks)} runs "
        f"({len(args.data)} data sets x {len(args.variants)} variants x {args.seeds} seeds), "
        f"{len(tasks) - len(todo)} already in {runs_dir}; {args.jobs} at a time",
        flush=True,
    )
    t0 = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, d, v, k, grid[d]): (d, v, k) for d, v, k in todo}
            for i, fut in enumerate(_as_completed(futures), 1):
                rec = fut.result()
                path = _run_path(runs_dir, rec["data"], rec["variant"], rec["seed"])
                atomic_write(path, lambda f, r=rec: json.dump(r, f), mode="w")
                print(
                    f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f} s] {rec['data']:<12} {rec['variant']:<10} "
                    f"seed {rec['seed']}: W2 fresh@1 {rec['w2_fresh'][1]:.3f}  train {rec['train_seconds']:.0f} s",
                    flush=True,
                )
    records = []
    for t in tasks:
        with open(_run_path(runs_dir, *t)) as f:
            records.append(_fix_keys(json.load(f)))
    write_outputs(records, args.out)
    print(f"grid wall time {time.perf_counter() - t0:.0f} s")
    return records


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def _run_path(runs_dir, data, variant, seed) -> str:
    return os.path.join(runs_dir, f"{data}_{variant}_seed{seed}.json")


def _fix_keys(rec: dict) -> dict:
    """JSON turns the NFE keys into strings; make them ints again."""
    for key in ("w2_fresh", "w2_train"):
        rec[key] = {int(k): v for k, v in rec[key].items()}
    return rec


def main(argv=None) -> int:
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
