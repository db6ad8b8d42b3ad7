"""The demo: independent vs minibatch-OT vs LOOM-CFM couplings, same budget, several seeds
(``python -m loom_kernels.demo``).

Trains the same velocity network with the same steps, batch size and seed under the three couplings
on a finite built-in data set (no download), repeats that for several seeds (each seed draws its
own data set, noise, initial weights and data order), and reports the mean and spread over seeds of

- sample quality against held-out data, the paper's protocol: the exact 2-Wasserstein distance
  (``metrics.w2``, an exact assignment) at Euler NFE 1, 2, 4, 8 and midpoint NFE 2, 4, 8, and a
  dopri5 reference (adaptive, rtol = atol = 1e-5, its number of function evaluations recorded),
  next to the W2 between two finite samples of the data itself (the floor a perfect model reaches);
- the straightness of each model's flow (``metrics.straightness``; 0 = straight paths);
- the pair cost each coupling trains on (fresh minibatch pairs for independent / minibatch OT,
  LOOM's dataset-wide cost ``mean_i c(x1_i, noise(seeds[i]))``) against the global optimum
  between LOOM's fixed noise set and the data (the floor of LOOM's cost).

A ranking is printed only where it holds on every seed; elsewhere the demo says it is not resolved.
The default is a setting where minibatch OT is far from the global optimum (batch 32 on 2,048
points), the regime LOOM-CFM (Davtyan et al., ICLR 2025) targets. ``python -m loom_kernels.study``
runs the paper's ablations with the same building blocks (``fit``, ``quality``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from .._io import atomic_write
from .._optional import require
from ..cli._errors import HelpFormatter
from .common import (
    COLUMNS,
    DOPRI5_TOL,
    SIZE_FLAGS,
    STRAIGHTNESS_NFE,
    add_size_options,
    column_label,
    default_out,
    fit,
    fmt,
    override_sizes,
    quality,
    ranking,
    spread,
)
from .variants import COUPLINGS, LABELS

# Default budgets, sized so that the default (3 seeds) finishes inside 5 minutes on a 2-core CPU.
_PRESETS = {
    # data kind -> (n_train, steps, batch_size, hidden, depth, lr, n_eval, seeds)
    "2d": dict(n=2048, steps=3000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=2048, seeds=3),
    "digits": dict(n=None, steps=3000, batch_size=32, hidden=512, depth=3, lr=1e-3, n_eval=None, seeds=3),
    "quick": dict(n=512, steps=40, batch_size=64, hidden=32, depth=2, lr=1e-3, n_eval=256, seeds=3),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.demo",
        description="Train the same flow-matching model with independent, minibatch-OT and LOOM-CFM couplings "
        "(same steps, batch and seed) over several seeds and compare sample quality (exact W2 vs "
        "held-out data) at Euler NFE 1/2/4/8, midpoint NFE 2/4/8 and dopri5, straightness and "
        "coupling cost, as mean and spread over seeds. Prints tables and the rankings that hold on "
        "every seed, writes a PNG figure, a JSON of the numbers and the EMA model of each run.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--data", default="8gaussians", help="8gaussians, moons, checkerboard or digits")
    add_size_options(p)
    p.add_argument("--num-caches", type=int, default=1, help="LOOM noise caches per data point")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (seed, seed+1, ...); None: 3")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (figure, JSON, models); None: loom_demo in the current directory (beside the "
        "checkout when run inside a loom_kernels checkout)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the demo's small models run fastest on one (several threads "
        "spin-wait on tiny ops and slow down badly on a busy machine); 0 keeps torch's choice",
    )
    p.add_argument(
        "--max-opt-points",
        type=int,
        default=4096,
        help="solve LOOM's global optimum (the floor of its cost) only up to this many points x caches",
    )
    p.add_argument("--no-dopri5", action="store_true", help="skip the dopri5 reference")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def _settings(args) -> dict:
    from ..data import TOY_2D

    if args.data not in TOY_2D + ("digits",):
        raise SystemExit(f"--data must be one of {TOY_2D + ('digits',)}, got {args.data!r}")
    s = dict(_PRESETS["digits" if args.data == "digits" else "2d"])
    if args.quick:
        s.update(_PRESETS["quick"])
        if args.data == "digits":
            s.update(n=None, hidden=64, n_eval=128)
    override_sizes(s, args, {**SIZE_FLAGS, "seeds": "seeds"})
    if args.num_caches < 1:
        raise SystemExit(f"--num-caches must be >= 1, got {args.num_caches}")
    return s


# ---- the demo ------------------------------------------------------------------------------------------


def _run_seed(args, s, seed, device, dopri5) -> dict:
    """Trains and measures the three couplings on the data set drawn with ``seed``."""
    from .. import data as data_mod
    from ..checkpoint import save_model
    from ..couplings.factory import make_coupling
    from ..metrics import global_optimum, straightness, w2
    from ..models import MLPVelocity
    from ..sampler import sample

    x_train = data_mod.load(args.data, "train", n=s["n"], seed=seed)
    x_test = data_mod.load(args.data, "test", n=s["n"], seed=seed)
    n_eval = min(s["n_eval"] or len(x_test), len(x_test), len(x_train))
    shape = tuple(x_train.shape[1:])
    if s["batch_size"] > len(x_train):
        raise SystemExit(f"--batch-size {s['batch_size']} exceeds the {len(x_train)} training points")
    eval_gen = torch.Generator().manual_seed(seed + 12345)
    x0_eval = torch.randn(n_eval, *shape, generator=eval_gen).to(device)  # the same noise for every model
    x_test_eval = x_test[torch.randperm(len(x_test), generator=eval_gen)[:n_eval]].to(device)
    x_train_eval = x_train[torch.randperm(len(x_train), generator=eval_gen)[:n_eval]].to(device)
    out = {
        "seed": seed,
        "n_train": len(x_train),
        "n_eval": n_eval,
        "w2_floor": w2(x_train_eval, x_test_eval),
        "x_test": x_test_eval.cpu(),
        "couplings": {},
    }
    for name in COUPLINGS:
        torch.manual_seed(seed)  # the same initial weights for every coupling
        model = MLPVelocity(shape, hidden=s["hidden"], depth=s["depth"])
        coupling = make_coupling(name, len(x_train), shape, num_caches=args.num_caches, seed=seed, device=device)
        meta = {
            "model": model.spec,
            "data": args.data,
            "n": s["n"],
            "seed": seed,
            "coupling": name,
            "num_caches": args.num_caches,
        }
        f = fit(
            model,
            x_train,
            coupling,
            s,
            seed=seed,
            device=device,
            progress=not args.no_progress,
            track_cost=name == "loom",
            metadata=meta,
        )
        ema = f["ema"]
        save_model(
            os.path.join(args.out, f"{args.data}_{name}_seed{seed}", "model.pt"), ema, metadata=meta, step=s["steps"]
        )
        t_eval = time.perf_counter()
        print(
            f"  seed {seed}, {LABELS[name]}: trained in {f['train_seconds']:.0f} s; evaluating W2 at 7 fixed-step "
            f"samplers{' and dopri5 (the longest part)' if dopri5 else ''} on {n_eval} points...",
            flush=True,
        )
        w2s, samples, nfe_ref = quality(ema, x0_eval, x_test_eval, dopri5=dopri5)
        hist = f["history"]
        tail = hist[-max(1, len(hist) // 10) :]
        r = {
            "w2": w2s,
            "dopri5_nfe": nfe_ref,
            "straightness": straightness(ema, x0_eval, STRAIGHTNESS_NFE),
            "train_seconds": f["train_seconds"],
            "final_loss": float(np.mean([h["loss"] for h in tail])),
            "pair_cost_end": (
                f["dataset_cost"][-1][1] if name == "loom" else float(np.mean([h["post_cost"] for h in tail]))
            ),
            "cost_curve": ([h["step"] for h in hist], [h["post_cost"] for h in hist]),
            "dataset_cost": f["dataset_cost"],
            "samples": samples,
            "trajectory": (
                sample(ema, x0_eval[:48], STRAIGHTNESS_NFE, method="euler", return_trajectory=True).cpu()
                if len(shape) == 1
                else None
            ),
        }
        if name == "loom":
            t_opt = time.perf_counter()
            r["global_optimum"] = global_optimum(coupling.seeds, x_train.to(device), args.max_opt_points)
            r["global_optimum_seconds"] = time.perf_counter() - t_opt
        r["eval_seconds"] = time.perf_counter() - t_eval
        print(f"  seed {seed}, {LABELS[name]}: evaluated in {r['eval_seconds']:.0f} s", flush=True)
        out["couplings"][name] = r
    return out


def _aggregate(runs: list, dopri5: bool) -> dict:
    """Per coupling: mean/sd/min/max over seeds of every reported number; rankings per W2 column."""
    cols = [c for c in COLUMNS if dopri5 or c != "dopri5"]
    agg = {"w2_floor": spread(r["w2_floor"] for r in runs), "couplings": {}, "rankings": {}}
    for name in COUPLINGS:
        rs = [r["couplings"][name] for r in runs]
        a = {"w2": {c: spread(x["w2"][c] for x in rs) for c in cols}}
        for key in ("straightness", "pair_cost_end", "final_loss", "train_seconds", "eval_seconds"):
            a[key] = spread(x[key] for x in rs)
        if dopri5:
            a["dopri5_nfe"] = spread(x["dopri5_nfe"] for x in rs)
        agg["couplings"][name] = a
    opts = [r["couplings"]["loom"].get("global_optimum") for r in runs]
    agg["loom_global_optimum"] = spread(opts) if all(o is not None for o in opts) else None
    for c in cols:
        agg["rankings"][c] = ranking([{n: r["couplings"][n]["w2"][c] for n in COUPLINGS} for r in runs])
    agg["rankings"]["straightness"] = ranking([{n: r["couplings"][n]["straightness"] for n in COUPLINGS} for r in runs])
    return agg


def run(args) -> dict:
    """Runs the demo for parsed ``args`` (see ``--help``); returns the measured numbers as a dict."""
    from .._device import resolve_device
    from .plots import demo_figure

    if args.threads:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    # Before minutes of training, not after them: what the end (the figure) and the bars need.
    require("matplotlib", "the demo's figure")
    if not args.no_progress:
        require("tqdm", "the demo's progress bars (or --no-progress)")
    device = resolve_device(args.device, prefer_cuda=True)
    dopri5 = not args.no_dopri5
    seeds = list(range(args.seed, args.seed + s["seeds"]))
    args.out = args.out or default_out("loom_demo")
    os.makedirs(args.out, exist_ok=True)
    print(
        f"LOOM-CFM demo: {args.data}, {s['n'] or 'all'} training points per seed; MLP {s['depth']}x{s['hidden']}; "
        f"{s['steps']} steps x batch {s['batch_size']} per coupling; seeds {seeds}; device {device}"
        + ("" if dopri5 else "; dopri5 reference skipped")
        + f"; writing to {os.path.abspath(args.out)}",
        flush=True,
    )
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        runs.append(_run_seed(args, s, seed, device, dopri5))
        w = {n: runs[-1]["couplings"][n]["w2"]["euler1"] for n in COUPLINGS}
        print(
            f"seed {seed} done in {time.perf_counter() - t0:.0f} s: W2 at Euler NFE 1 "
            + ", ".join(f"{LABELS[n]} {w[n]:.3f}" for n in COUPLINGS),
            flush=True,
        )
    agg = _aggregate(runs, dopri5)
    _report(args, s, runs, agg, dopri5)
    summary = {
        "data": args.data,
        "settings": s,
        "seeds": seeds,
        "num_caches": args.num_caches,
        "n_eval": runs[0]["n_eval"],
        "dopri5": {"rtol": DOPRI5_TOL, "atol": DOPRI5_TOL} if dopri5 else None,
        **agg,
        "per_seed": [
            {
                "seed": r["seed"],
                "w2_floor": r["w2_floor"],
                "couplings": {
                    n: {
                        k: r["couplings"][n][k]
                        for k in (
                            "w2",
                            "dopri5_nfe",
                            "straightness",
                            "pair_cost_end",
                            "final_loss",
                            "train_seconds",
                            "eval_seconds",
                        )
                    }
                    | {"global_optimum": r["couplings"][n].get("global_optimum")}
                    for n in COUPLINGS
                },
                "loom_dataset_cost": r["couplings"]["loom"]["dataset_cost"],
            }
            for r in runs
        ],
    }
    fig_path = os.path.join(args.out, f"demo_{args.data}.png")
    demo_figure(fig_path, args, s, runs, agg, dopri5)
    summary["figure"] = fig_path
    json_path = os.path.join(args.out, f"demo_{args.data}.json")
    atomic_write(json_path, lambda f: json.dump(summary, f, indent=2), mode="w")
    models = os.path.join(args.out, args.data + "_<coupling>_seed<k>", "model.pt")
    print(f"figure: {fig_path}\nnumbers: {json_path}\nmodels: {models}")
    return summary


def _order_text(order, values) -> str:
    return " < ".join(f"{LABELS[c]} ({values[c]['mean']:.3f})" for c in order)


def _report(args, s, runs, agg, dopri5) -> None:
    k = len(runs)
    cols = [c for c in COLUMNS if dopri5 or c != "dopri5"]
    n_eval = runs[0]["n_eval"]
    print(
        f"\nExact W2 between {n_eval} generated samples and {n_eval} held-out points (lower is better), "
        f"mean±sd over {k} seeds (min-max in the JSON)"
    )
    head = f"{'coupling':<14}" + "".join(f"{column_label(c).replace(' NFE ', '@'):>13}" for c in cols)
    print(head)
    print("-" * len(head))
    for name in COUPLINGS:
        a = agg["couplings"][name]
        print(f"{LABELS[name]:<14}" + "".join(f"{fmt(a['w2'][c]):>13}" for c in cols))
    print(f"{'data floor':<14}{fmt(agg['w2_floor']):>13}   (W2 between {n_eval} training and {n_eval} held-out points)")
    if dopri5:
        nfes = ", ".join(f"{LABELS[n]} {agg['couplings'][n]['dopri5_nfe']['mean']:.0f}" for n in COUPLINGS)
        print(f"dopri5 (rtol = atol = {DOPRI5_TOL:g}) mean function evaluations: {nfes}")

    print(f"\n{'coupling':<14}{'straightness':>16}{'pair cost':>16}{'loss':>16}{'train s':>10}")
    for name in COUPLINGS:
        a = agg["couplings"][name]
        print(
            f"{LABELS[name]:<14}{fmt(a['straightness'], 4):>16}{fmt(a['pair_cost_end']):>16}"
            f"{fmt(a['final_loss'], 4):>16}{a['train_seconds']['mean']:>10.1f}"
        )
    opt = agg["loom_global_optimum"]
    size = f"{runs[0]['n_train']} points" + (f" x {args.num_caches} caches" if args.num_caches > 1 else "")
    if opt is not None:
        gaps = {
            n: spread(
                (r["couplings"][n]["pair_cost_end"] / r["couplings"]["loom"]["global_optimum"] - 1) * 100 for r in runs
            )
            for n in ("ot", "loom")
        }
        print(
            f"pair cost = mean ||x1 - x0||^2 of the training pairs at the end (minibatch OT: its minibatch optimum; "
            f"LOOM: over the whole data set). Global optimum for LOOM's noise set ({size}): {fmt(opt)}; "
            f"LOOM is {fmt(gaps['loom'], 2)}% above it, minibatch OT's pairs {fmt(gaps['ot'], 1)}% above it"
        )
    else:
        print(
            f"pair cost = mean ||x1 - x0||^2 of the training pairs at the end; global optimum not computed "
            f"({size} > --max-opt-points {args.max_opt_points})"
        )

    print(f"\nRankings (stated only where the order is the same on all {k} seeds):")
    for c in cols + ["straightness"]:
        r = agg["rankings"][c]
        vals = agg["couplings"]
        what = column_label(c) if c != "straightness" else "straightness"
        means = {n: (vals[n]["w2"][c] if c != "straightness" else vals[n]["straightness"]) for n in COUPLINGS}
        lo = r["below"]["loom<ot"]
        pair = (
            "LOOM-CFM below minibatch OT on every seed"
            if lo == k
            else "minibatch OT below LOOM-CFM on every seed"
            if r["below"]["ot<loom"] == k
            else f"LOOM-CFM vs minibatch OT not resolved (LOOM below on {lo}/{k} seeds)"
        )
        if r["order"] is not None:
            print(f"  {what:<17} {_order_text(r['order'], means)} on every seed; {pair}")
        else:
            print(f"  {what:<17} order not resolved over seeds; {pair}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    run(args)
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
