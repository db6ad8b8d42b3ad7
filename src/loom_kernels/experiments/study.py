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
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from .._io import atomic_write
from ..couplings.base import Coupling

DATASETS = ("8gaussians", "moons", "checkerboard", "digits")


VARIANTS = ("ot", "fixed", "converged", "loom1", "loom4", "loom16", "loom64")


# The entropic rival (issue 25 item 5; Klein et al. 2025): Sinkhorn couplings at the study's batch (32, for
# parity) and with the whole data set as one batch ("N"), at a relative epsilon (scale of the mean cost).
SINKHORN_VARIANTS = ("sinkhorn32_e0.1", "sinkhornN_e0.1", "sinkhornN_e0.01")


# The field's newer couplings (issue 32): semidiscrete OT with fresh noise, seeded LOOM from its cells, nearest-of-16.
NEW_VARIANTS = ("semidiscrete", "sdseeded", "knn16")


ALL_VARIANTS = ("independent",) + VARIANTS + SINKHORN_VARIANTS + NEW_VARIANTS


LABELS = {
    "independent": "independent",
    "ot": "minibatch OT",
    "fixed": "fixed noise, no reassignment",
    "converged": "trained after convergence",
    "loom1": "LOOM 1 cache",
    "loom4": "LOOM 4 caches",
    "loom16": "LOOM 16 caches",
    "loom64": "LOOM 64 caches",
    **{v: f"Sinkhorn batch {v[8:].split('_')[0]}, eps {v.split('_e')[1]}" for v in SINKHORN_VARIANTS},
    "semidiscrete": "semidiscrete OT, fresh noise",
    "sdseeded": "LOOM seeded from semidiscrete cells",
    "knn16": "nearest of 16 noises",
}


NFES = (1, 2, 4, 8)  # Euler


# The default grid, sized to finish inside 30 minutes on 2 CPU cores (two runs at a time).
DEFAULTS = {
    "2d": dict(n=1024, steps=2000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=1024),
    "digits": dict(n=None, steps=2000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=None),
}


CONVERGE_RTOL = 1e-4  # "converged": an epoch of reassignment improves the dataset cost by less than this


CONVERGE_MAX_EPOCHS = 500


MAX_OPT_POINTS = 2048  # the global optimum (a dense exact assignment) only up to this many noise samples


def converge(coupling, x_train: torch.Tensor, batch_size: int, seed: int) -> list:
    """Sweeps LOOM's reassignment over the data set (random minibatches of ``batch_size``, one epoch at a
    time) until an epoch improves the dataset-wide cost by less than ``CONVERGE_RTOL`` (relative).

    Returns the curve ``[(epoch, dataset cost)]`` from epoch 0 (the initial table).
    """
    from ..metrics import dataset_cost

    gen = torch.Generator().manual_seed(seed + 4242)
    n = len(x_train)
    curve = [(0, dataset_cost(coupling, x_train))]
    for epoch in range(1, CONVERGE_MAX_EPOCHS + 1):
        perm = torch.randperm(n, generator=gen)
        for i in range(n // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            coupling(x_train[idx], idx)
        curve.append((epoch, dataset_cost(coupling, x_train)))
        if curve[-2][1] - curve[-1][1] <= CONVERGE_RTOL * curve[-2][1]:
            break
    return curve


class LargeBatchSinkhorn(Coupling):
    """The whole data set as one Sinkhorn batch (OTT's ``LinearOTDataloader`` pattern, Klein et al. 2025).

    Every ``refresh`` calls (one epoch of minibatches) it draws fresh noise for all ``N`` points, solves
    the ``N x N`` entropic problem (streamed) and draws each point's partner from its row of the plan;
    each minibatch call then returns its items' partners. Called as the library's couplings.
    """

    def __init__(self, x_train: torch.Tensor, epsilon: float, refresh: int, seed: int):
        from ..couplings import SinkhornCoupling

        self.x_train, self.refresh, self.calls = x_train, max(1, refresh), 0
        self.gen = torch.Generator().manual_seed(seed + 777)
        self.inner = SinkhornCoupling(epsilon, generator=self.gen)
        self.x0_all, self.stats = None, {}

    def __call__(self, x1: torch.Tensor, indices=None, *, x0=None, labels=None):  # noqa: ARG002 - the signature
        if self.calls % self.refresh == 0:
            noise = torch.randn(self.x_train.shape, generator=self.gen, dtype=self.x_train.dtype)
            self.x0_all, _ = self.inner(self.x_train, x0=noise)
            self.stats = dict(self.inner.stats)
        self.calls += 1
        return self.x0_all[torch.as_tensor(indices)].to(x1.device, x1.dtype), x1


def _coupling(variant: str, n: int, shape, seed: int, x_train=None, batch_size: int = 32):
    from ..couplings.factory import make_coupling

    if variant in SINKHORN_VARIANTS:
        from ..couplings import SinkhornCoupling

        size, eps = variant[len("sinkhorn") :].split("_e")
        if size == "N":
            return LargeBatchSinkhorn(x_train, float(eps), n // batch_size, seed)
        return SinkhornCoupling(float(eps), generator=torch.Generator().manual_seed(seed + 777))
    if variant in ("independent", "ot", "fixed"):
        return make_coupling(variant, n, shape, seed=seed)
    if variant in NEW_VARIANTS:
        name = {"semidiscrete": "semidiscrete", "sdseeded": "semidiscrete-seeded", "knn16": "knn"}[variant]
        opts = {"k": 16} if variant == "knn16" else {"fit_steps": 2000, "progress": False}
        return make_coupling(name, n, shape, seed=seed, data=x_train, options=opts)
    caches = 1 if variant == "converged" else int(variant[len("loom") :])
    return make_coupling("loom", n, shape, num_caches=caches, seed=seed)


def caches_of(variant: str) -> int | None:
    """Noise caches per point of a variant with a finite noise set (None: fresh noise every step)."""
    if variant in ("independent", "ot", "semidiscrete", "knn16") or variant in SINKHORN_VARIANTS:
        return None
    return 1 if variant in ("fixed", "converged", "sdseeded") else int(variant[len("loom") :])


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

    coupling = _coupling(variant, n, shape, seed, x_train, s["batch_size"])
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


# ---- outputs ---------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    ["data", "variant", "seed", "caches", "n_train", "noise_total", "steps", "batch_size", "n_eval"]
    + [f"w2_fresh_nfe{k}" for k in NFES]
    + [f"w2_train_nfe{k}" for k in NFES]
    + [f"gap_nfe{k}" for k in NFES]
    + [
        "w2_floor",
        "straightness",
        "dataset_cost_start",
        "dataset_cost_end",
        "global_optimum",
        "minibatch_cost_end",
        "converge_epochs",
        "final_loss",
        "train_seconds",
        "eval_seconds",
    ]
)


def _row(r: dict) -> dict:
    row = {k: r.get(k) for k in CSV_COLUMNS}
    for k in NFES:
        row[f"w2_fresh_nfe{k}"] = r["w2_fresh"][k]
        row[f"w2_train_nfe{k}"] = r["w2_train"][k]
        row[f"gap_nfe{k}"] = None if r["w2_train"][k] is None else r["w2_fresh"][k] - r["w2_train"][k]
    row["converge_epochs"] = r["converge_curve"][-1][0] if "converge_curve" in r else None
    return row


def summarize(records: list) -> list:
    """One row per (data, variant): mean, sd, min, max over seeds of every numeric CSV column."""
    from .common import spread

    groups = {}
    for r in records:
        groups.setdefault((r["data"], r["variant"]), []).append(_row(r))
    out = []
    for (data, variant), rows in groups.items():
        s = {
            "data": data,
            "variant": variant,
            "seeds": len(rows),
            "caches": rows[0]["caches"],
            "noise_total": rows[0]["noise_total"],
        }
        for col in CSV_COLUMNS[9:]:
            vals = [x[col] for x in rows if x[col] is not None]
            if vals:
                s[col] = spread(vals)
        out.append(s)
    return out


def _fmt(sp, digits=3):
    return "-" if sp is None else f"{sp['mean']:.{digits}f} ± {sp['sd']:.{digits}f}"


def markdown(summary: list) -> str:
    """The study's table: per data set and variant, mean ± sd over seeds."""
    head = (
        "variant",
        "noise samples",
        "W2 fresh NFE1",
        "NFE2",
        "NFE4",
        "NFE8",
        "W2 train-noise NFE1",
        "NFE8",
        "gap NFE1 (fresh - train)",
        "gap NFE8",
        "straightness",
        "dataset cost at the end",
        "global optimum",
    )
    lines = []
    for data in dict.fromkeys(s["data"] for s in summary):
        rows = [s for s in summary if s["data"] == data]
        lines += [
            f"\n**{data}** ({rows[0]['seeds']} seeds; W2 data floor {_fmt(rows[0]['w2_floor'])})\n",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
        ]
        for s in rows:
            cells = [LABELS[s["variant"]], str(s["noise_total"] or "fresh")]
            cells += [_fmt(s[f"w2_fresh_nfe{k}"]) for k in NFES]
            cells += [_fmt(s.get(key)) for key in ("w2_train_nfe1", "w2_train_nfe8", "gap_nfe1", "gap_nfe8")]
            cells += [_fmt(s["straightness"], 4), _fmt(s.get("dataset_cost_end")), _fmt(s.get("global_optimum"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _memorisation_table(summary)


def versus_ot(records: list) -> str:
    """On how many seeds each variant's fresh-noise W2 is below minibatch OT's (same data set and seed)."""
    ot = {(r["data"], r["seed"]): r for r in records if r["variant"] == "ot"}
    datasets = list(dict.fromkeys(r["data"] for r in records))
    variants = [v for v in dict.fromkeys(r["variant"] for r in records) if v != "ot"]
    if not ot or not variants:
        return ""
    lines = [
        "\n**Against minibatch OT**: seeds on which the variant's W2 (fresh noise) is below minibatch OT's, "
        "at Euler NFE 1 / NFE 8\n",
        "| variant | " + " | ".join(datasets) + " |",
        "|---|" + "---:|" * len(datasets),
    ]
    for v in variants:
        cells = []
        for d in datasets:
            pairs = [
                (r, ot[(d, r["seed"])])
                for r in records
                if r["data"] == d and r["variant"] == v and (d, r["seed"]) in ot
            ]
            cells.append(
                " / ".join(f"{sum(a['w2_fresh'][k] < b['w2_fresh'][k] for a, b in pairs)}/{len(pairs)}" for k in (1, 8))
                if pairs
                else "-"
            )
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _memorisation_table(summary: list) -> str:
    """W2 on fresh minus W2 on training noise (Euler NFE 8) against caches x points, LOOM only."""
    looms = [v for v in VARIANTS if v.startswith("loom")]
    rows = []
    for data in dict.fromkeys(s["data"] for s in summary):
        by = {s["variant"]: s for s in summary if s["data"] == data}
        cells = [f"{_fmt(by[v].get('gap_nfe8'))} ({by[v]['noise_total']})" if v in by else "-" for v in looms]
        if any(c != "-" for c in cells):
            rows.append(f"| {data} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = "| data | " + " | ".join(LABELS[v] for v in looms) + " |"
    return (
        "\n**Memorisation**: W2 from fresh noise minus W2 from the training noise at Euler NFE 8 "
        "(mean ± sd over seeds; in brackets the noise samples, caches x points)\n\n"
        + "\n".join([head, "|---|" + "---:|" * len(looms)] + rows)
        + "\n"
    )


def write_outputs(records: list, out: str) -> None:
    def write_csv(path, rows, cols):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")

    write_csv(os.path.join(out, "study.csv"), [_row(r) for r in records], CSV_COLUMNS)
    summary = summarize(records)
    flat = []
    for s in summary:
        row = {k: s[k] for k in ("data", "variant", "seeds", "caches", "noise_total")}
        for col in CSV_COLUMNS[9:]:
            if col in s:
                for stat in ("mean", "sd", "min", "max"):
                    row[f"{col}_{stat}"] = s[col][stat]
        flat.append(row)
    cols = list(dict.fromkeys(k for row in flat for k in row))
    write_csv(os.path.join(out, "study_summary.csv"), flat, cols)
    md = markdown(summary) + versus_ot(records)
    atomic_write(os.path.join(out, "study.md"), lambda f: f.write(md), mode="w")
    print(md)
    from .plots import study_figure

    study_figure(records, summary, os.path.join(out, "study.png"))


def main(argv=None) -> int:
    run(_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
