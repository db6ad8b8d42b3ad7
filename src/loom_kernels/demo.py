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

from ._io import atomic_write

COUPLINGS = ("independent", "ot", "loom")
LABELS = {"independent": "independent", "ot": "minibatch OT", "loom": "LOOM-CFM"}
COLORS = {"independent": "tab:gray", "ot": "tab:blue", "loom": "tab:red"}
EVALS = (("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("midpoint", 2), ("midpoint", 4), ("midpoint", 8))
COLUMNS = tuple(f"{m}{k}" for m, k in EVALS) + ("dopri5",)  # keys of every W2 record
DOPRI5_TOL = 1e-5  # the paper's dopri5 reference tolerance (rtol = atol)
STRAIGHTNESS_NFE = 16

# Default budgets, sized so that the default (3 seeds) finishes inside 5 minutes on a 2-core CPU.
_PRESETS = {
    # data kind -> (n_train, steps, batch_size, hidden, depth, lr, n_eval, seeds)
    "2d": dict(n=2048, steps=3000, batch_size=32, hidden=256, depth=3, lr=1e-3, n_eval=2048, seeds=3),
    "digits": dict(n=None, steps=3000, batch_size=32, hidden=512, depth=3, lr=1e-3, n_eval=None, seeds=3),
    "quick": dict(n=512, steps=40, batch_size=64, hidden=32, depth=2, lr=1e-3, n_eval=256, seeds=3),
}


def column_label(col: str) -> str:
    """'euler1' -> 'Euler NFE 1', 'midpoint4' -> 'midpoint NFE 4', 'dopri5' -> 'dopri5'."""
    if col == "dopri5":
        return "dopri5"
    method = col.rstrip("0123456789")
    return f"{'Euler' if method == 'euler' else method} NFE {col[len(method):]}"


# settings key -> command-line flag (its dest) of the run sizes the demo and the study share
SIZE_FLAGS = {"steps": "steps", "batch_size": "batch_size", "n": "points", "n_eval": "n_eval"}


def add_size_options(p: argparse.ArgumentParser) -> None:
    """The run-size options of the demo and the study (each defaults to its data set's preset)."""
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per data set)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default per data set)")
    p.add_argument("--points", type=int, default=None,
                   help="training points of a 2-D set (held-out set: the same size)")
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.demo",
        description="Train the same flow-matching model with independent, minibatch-OT and LOOM-CFM couplings "
                    "(same steps, batch and seed) over several seeds and compare sample quality (exact W2 vs "
                    "held-out data) at Euler NFE 1/2/4/8, midpoint NFE 2/4/8 and dopri5, straightness and "
                    "coupling cost, as mean and spread over seeds. Prints tables and the rankings that hold on "
                    "every seed, writes a PNG figure, a JSON of the numbers and the EMA model of each run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="8gaussians", help="8gaussians, moons, checkerboard or digits")
    add_size_options(p)
    p.add_argument("--num-caches", type=int, default=1, help="LOOM noise caches per data point")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (seed, seed+1, ...); default 3")
    p.add_argument("--out", default="loom_demo", help="output folder (figure, JSON, models)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the demo's small models run fastest on one (several threads "
                        "spin-wait on tiny ops and slow down badly on a busy machine); 0 keeps torch's choice")
    p.add_argument("--max-opt-points", type=int, default=4096,
                   help="solve LOOM's global optimum (the floor of its cost) only up to this many points x caches")
    p.add_argument("--no-dopri5", action="store_true", help="skip the dopri5 reference")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def _settings(args) -> dict:
    from .data import TOY_2D

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


# ---- building blocks (the study reuses them) ----------------------------------------------------------


def dopri5_sample(model, x0: torch.Tensor, *, rtol: float = DOPRI5_TOL, atol: float = DOPRI5_TOL) -> tuple:
    """The adaptive reference solution: dopri5 from t=0 to t=1; returns ``(x1, nfe)``.

    ``x0`` (B, *dims) -> ``x1`` (B, *dims) and the number of model evaluations the solver made
    (the sampler's native Dormand-Prince 5(4), error-controlled as torchdiffeq's).

    Example:
        >>> x1, nfe = dopri5_sample(lambda x, t: -x, torch.ones(4, 2))  # x1 = exp(-1)
    """
    from .sampler import sample

    info = {}
    x1 = sample(model, x0, method="dopri5", rtol=rtol, atol=atol, info=info)
    return x1, info["nfe"]


def quality(model, x0: torch.Tensor, x_ref: torch.Tensor, *, dopri5: bool = True) -> tuple:
    """Exact W2 between samples from ``x0`` and ``x_ref`` at every column of ``COLUMNS``.

    ``x0`` and ``x_ref`` are (n, *dims). Returns ``(w2s, samples, dopri5_nfe)``: ``w2s`` maps
    'euler1', ..., 'midpoint8' (and 'dopri5' when ``dopri5``) to a float, ``samples`` the same keys
    to the CPU samples, ``dopri5_nfe`` the reference's evaluations (None when skipped).
    """
    from .metrics import w2
    from .sampler import sample

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


def fit(model, x_train: torch.Tensor, coupling, s: dict, *, seed: int, device, progress: bool = False,
        track_cost: bool = False, metadata: dict | None = None) -> dict:
    """Trains ``model`` on ``x_train`` (N, *shape) under ``coupling`` with the budget ``s`` (steps,
    batch_size, lr) through ``loom_kernels.train.train``.

    Returns a dict: ``ema`` (the model to sample), ``history`` (the trainer's rows), ``train_seconds``
    and, when ``track_cost`` (a coupling with a seed table), ``dataset_cost``: ``[(step, mean cost over
    every point and cache)]`` at step 0 and at ~60 steps, geometric early (LOOM converges within a few
    epochs) and regular later.
    """
    from .data import IndexedDataset
    from .train import TrainConfig, train

    cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], warmup=min(200, s["steps"] // 10),
                      ema_decay=0.999, seed=seed, device=str(device), log_every=1, progress=progress)
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
    res = train(model, IndexedDataset(x_train), coupling, cfg, callback=callback, callback_every=every,
                metadata=metadata)
    return {"ema": res.ema.eval(), "history": res.history, "train_seconds": time.perf_counter() - t0,
            "dataset_cost": curve}


def dataset_cost(coupling, x_train: torch.Tensor) -> float:
    """A seed table's dataset-wide cost: mean over points and caches of ||x1_i - noise(seeds[i, k])||^2."""
    from .metrics import coupling_cost
    from .noise import gaussian_noise

    seeds = coupling.seeds
    total = 0.0
    for k in range(seeds.shape[1]):
        z = gaussian_noise(seeds[:, k], x_train.shape[1:], device=x_train.device)
        total += coupling_cost(z, x_train)
    return total / seeds.shape[1]


def global_optimum(seeds: torch.Tensor, x_train: torch.Tensor, max_points: int) -> float | None:
    """Mean cost of the exact assignment between a seed table's noise set and the data (each point once per cache).

    ``seeds`` (N, K). LOOM only permutes its seeds, so this optimum is the floor of its dataset-wide
    cost. None when N*K > ``max_points`` (a dense exact assignment needs (NK)^2 memory, ~(NK)^3 time).
    """
    if seeds.numel() > max_points:
        return None
    from .assign import assign
    from .cost import pairwise_cost
    from .noise import gaussian_noise

    z = gaussian_noise(seeds.reshape(-1), x_train.shape[1:], device=x_train.device)
    x = x_train.flatten(1).repeat_interleave(seeds.shape[1], dim=0)  # row i*K + k is entry (i, k)
    cost = pairwise_cost(x, z.flatten(1))
    col = assign(cost)
    return float(cost.gather(1, col[:, None]).double().mean())


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def fmt(sp: dict, digits: int = 3) -> str:
    """'0.553±0.025' (mean ± sd over seeds)."""
    return f"{sp['mean']:.{digits}f}±{sp['sd']:.{digits}f}"


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


# ---- the demo ------------------------------------------------------------------------------------------


def _run_seed(args, s, seed, device, dopri5) -> dict:
    """Trains and measures the three couplings on the data set drawn with ``seed``."""
    from . import data as data_mod
    from .metrics import straightness, w2
    from .models import MLPVelocity
    from .sampler import sample
    from .train import make_coupling, save_model

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
    out = {"seed": seed, "n_train": len(x_train), "n_eval": n_eval, "w2_floor": w2(x_train_eval, x_test_eval),
           "x_test": x_test_eval.cpu(), "couplings": {}}
    for name in COUPLINGS:
        torch.manual_seed(seed)  # the same initial weights for every coupling
        model = MLPVelocity(shape, hidden=s["hidden"], depth=s["depth"])
        coupling = make_coupling(name, len(x_train), shape, num_caches=args.num_caches, seed=seed, device=device)
        meta = {"model": model.spec, "data": args.data, "n": s["n"], "seed": seed, "coupling": name,
                "num_caches": args.num_caches}
        f = fit(model, x_train, coupling, s, seed=seed, device=device, progress=not args.no_progress,
                track_cost=name == "loom", metadata=meta)
        ema = f["ema"]
        save_model(os.path.join(args.out, f"{args.data}_{name}_seed{seed}", "model.pt"), ema, metadata=meta,
                   step=s["steps"])
        t_eval = time.perf_counter()
        w2s, samples, nfe_ref = quality(ema, x0_eval, x_test_eval, dopri5=dopri5)
        hist = f["history"]
        tail = hist[-max(1, len(hist) // 10):]
        r = {"w2": w2s, "dopri5_nfe": nfe_ref, "straightness": straightness(ema, x0_eval, STRAIGHTNESS_NFE),
             "train_seconds": f["train_seconds"], "final_loss": float(np.mean([h["loss"] for h in tail])),
             "pair_cost_end": (f["dataset_cost"][-1][1] if name == "loom"
                               else float(np.mean([h["post_cost"] for h in tail]))),
             "cost_curve": ([h["step"] for h in hist], [h["post_cost"] for h in hist]),
             "dataset_cost": f["dataset_cost"], "samples": samples,
             "trajectory": (sample(ema, x0_eval[:48], STRAIGHTNESS_NFE, method="euler", return_trajectory=True).cpu()
                            if len(shape) == 1 else None)}
        if name == "loom":
            t_opt = time.perf_counter()
            r["global_optimum"] = global_optimum(coupling.seeds, x_train.to(device), args.max_opt_points)
            r["global_optimum_seconds"] = time.perf_counter() - t_opt
        r["eval_seconds"] = time.perf_counter() - t_eval
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
    from .train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    device = resolve_device(args.device)
    dopri5 = not args.no_dopri5
    seeds = list(range(args.seed, args.seed + s["seeds"]))
    os.makedirs(args.out, exist_ok=True)
    print(f"LOOM-CFM demo: {args.data}, {s['n'] or 'all'} training points per seed; MLP {s['depth']}x{s['hidden']}; "
          f"{s['steps']} steps x batch {s['batch_size']} per coupling; seeds {seeds}; device {device}"
          + ("" if dopri5 else "; dopri5 reference skipped"),
          flush=True)
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        runs.append(_run_seed(args, s, seed, device, dopri5))
        w = {n: runs[-1]["couplings"][n]["w2"]["euler1"] for n in COUPLINGS}
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f} s: W2 at Euler NFE 1 "
              + ", ".join(f"{LABELS[n]} {w[n]:.3f}" for n in COUPLINGS), flush=True)
    agg = _aggregate(runs, dopri5)
    _report(args, s, runs, agg, dopri5)
    summary = {"data": args.data, "settings": s, "seeds": seeds, "num_caches": args.num_caches,
               "n_eval": runs[0]["n_eval"], "dopri5": {"rtol": DOPRI5_TOL, "atol": DOPRI5_TOL} if dopri5 else None,
               **agg,
               "per_seed": [{"seed": r["seed"], "w2_floor": r["w2_floor"],
                             "couplings": {n: {k: r["couplings"][n][k] for k in
                                               ("w2", "dopri5_nfe", "straightness", "pair_cost_end", "final_loss",
                                                "train_seconds", "eval_seconds")}
                                           | {"global_optimum": r["couplings"][n].get("global_optimum")}
                                           for n in COUPLINGS},
                             "loom_dataset_cost": r["couplings"]["loom"]["dataset_cost"]} for r in runs]}
    fig_path = os.path.join(args.out, f"demo_{args.data}.png")
    _figure(fig_path, args, s, runs, agg, dopri5)
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
    print(f"\nExact W2 between {n_eval} generated samples and {n_eval} held-out points (lower is better), "
          f"mean±sd over {k} seeds (min-max in the JSON)")
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
        print(f"{LABELS[name]:<14}{fmt(a['straightness'], 4):>16}{fmt(a['pair_cost_end']):>16}"
              f"{fmt(a['final_loss'], 4):>16}{a['train_seconds']['mean']:>10.1f}")
    opt = agg["loom_global_optimum"]
    size = f"{runs[0]['n_train']} points" + (f" x {args.num_caches} caches" if args.num_caches > 1 else "")
    if opt is not None:
        gaps = {n: spread((r["couplings"][n]["pair_cost_end"] / r["couplings"]["loom"]["global_optimum"] - 1) * 100
                          for r in runs) for n in ("ot", "loom")}
        print(f"pair cost = mean ||x1 - x0||^2 of the training pairs at the end (minibatch OT: its minibatch optimum; "
              f"LOOM: over the whole data set). Global optimum for LOOM's noise set ({size}): {fmt(opt)}; "
              f"LOOM is {fmt(gaps['loom'], 2)}% above it, minibatch OT's pairs {fmt(gaps['ot'], 1)}% above it")
    else:
        print(f"pair cost = mean ||x1 - x0||^2 of the training pairs at the end; global optimum not computed "
              f"({size} > --max-opt-points {args.max_opt_points})")

    print(f"\nRankings (stated only where the order is the same on all {k} seeds):")
    for c in cols + ["straightness"]:
        r = agg["rankings"][c]
        vals = agg["couplings"]
        what = column_label(c) if c != "straightness" else "straightness"
        means = {n: (vals[n]["w2"][c] if c != "straightness" else vals[n]["straightness"]) for n in COUPLINGS}
        lo = r["below"]["loom<ot"]
        pair = ("LOOM-CFM below minibatch OT on every seed" if lo == k else
                "minibatch OT below LOOM-CFM on every seed" if r["below"]["ot<loom"] == k else
                f"LOOM-CFM vs minibatch OT not resolved (LOOM below on {lo}/{k} seeds)")
        if r["order"] is not None:
            print(f"  {what:<17} {_order_text(r['order'], means)} on every seed; {pair}")
        else:
            print(f"  {what:<17} order not resolved over seeds; {pair}")


def _smooth(steps, values, window):
    """Trailing mean over ``window`` points (fewer at the start, so the curve begins at the first step)."""
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - max(1, window))
    return np.asarray(steps), (csum[hi] - csum[lo]) / (hi - lo)

def _image_grid(x: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    x = x[: rows * cols].float().clamp(-1, 1).numpy()
    c, h, w = x.shape[1:]
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), dtype=np.float32)
    for k in range(len(x)):
        i, j = divmod(k, cols)
        grid[i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = (x[k].transpose(1, 2, 0) + 1) / 2
    return grid[..., 0] if c == 1 else grid

def _sample_panel(ax, key, x, c, r, first, ref, is_2d) -> None:
    """One sample panel: 2-D points over the held-out data, trajectories, or an image grid."""
    if key == "trajectories":
        tr = x.numpy()
        for k in range(tr.shape[1]):
            ax.plot(tr[:, k, 0], tr[:, k, 1], color=COLORS[c], lw=0.8, alpha=0.7)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, color="black", zorder=3, label="noise")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, color=COLORS[c], zorder=3, label="sample")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title(f"{LABELS[c]}: {STRAIGHTNESS_NFE}-step trajectories (seed {first['seed']}), "
                     f"straightness {r['straightness']:.3f}", fontsize=9)
        return
    if is_2d:
        ax.scatter(ref[:, 0], ref[:, 1], s=2, color="lightgray", label="held-out data")
        ax.scatter(x[:, 0], x[:, 1], s=2, color=COLORS[c], label="samples")
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
    else:
        ax.imshow(_image_grid(x, 8, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(f"{LABELS[c]}: {column_label(key)} (seed {first['seed']}), W2 {r['w2'][key]:.3f}", fontsize=9)


def _cost_panel(ax, s, runs) -> None:
    """The coupling cost over training: fresh minibatch pairs vs LOOM's whole data set and its optimum."""
    from matplotlib.ticker import FormatStrFormatter

    first = runs[0]
    window = max(1, s["steps"] // 50)
    for c in ("independent", "ot"):
        st, val = _smooth(*first["couplings"][c]["cost_curve"], window)
        ax.plot(st, val, color=COLORS[c], label=f"{LABELS[c]}: fresh minibatch pairs (seed {first['seed']})")
    for i, r in enumerate(runs):
        st, val = zip(*r["couplings"]["loom"]["dataset_cost"])
        ax.plot(st, val, color=COLORS["loom"], lw=1.5, alpha=0.8,
                label=f"LOOM-CFM: whole data set ({len(runs)} seeds)" if i == 0 else None)
        opt = r["couplings"]["loom"].get("global_optimum")
        if opt is not None:
            ax.axhline(opt, color=COLORS["loom"], ls="--", lw=0.8,
                       label="global OT optimum (LOOM's noise set)" if i == 0 else None)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, s["steps"])
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("mean pair cost ||x1 - x0||^2")
    ax.set_title("coupling cost over training", fontsize=10)
    ax.legend(fontsize=8)


def _figure(path, args, s, runs, agg, dopri5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[0]
    is_2d = first["couplings"]["loom"]["trajectory"] is not None
    x_test = first["x_test"]
    fig = plt.figure(figsize=(15, 17))
    gs = fig.add_gridspec(4, 6, height_ratios=[1, 1, 1, 1.05], hspace=0.35, wspace=0.45)
    lim = float(x_test.abs().max()) * 1.15 if is_2d else None
    ref = x_test[:1000] if is_2d else None
    for row, c in enumerate(COUPLINGS):  # one row of sample panels per coupling
        r = first["couplings"][c]
        panels = [("euler1", r["samples"]["euler1"]), ("euler2", r["samples"]["euler2"]),
                  ("trajectories" if is_2d else "euler8", r["trajectory"] if is_2d else r["samples"]["euler8"])]
        for col, (key, x) in enumerate(panels):
            ax = fig.add_subplot(gs[row, 2 * col: 2 * col + 2])
            _sample_panel(ax, key, x, c, r, first, ref, is_2d)
            if is_2d:
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_aspect("equal")

    bottom = gs[3, :].subgridspec(1, 2 if is_2d else 3, wspace=0.3)
    w2_panel(fig.add_subplot(bottom[0]), {LABELS[c]: agg["couplings"][c]["w2"] for c in COUPLINGS},
             {LABELS[c]: COLORS[c] for c in COUPLINGS}, agg["w2_floor"], len(runs))
    _cost_panel(fig.add_subplot(bottom[1]), s, runs)
    if not is_2d:
        ax = fig.add_subplot(bottom[2])
        ax.imshow(_image_grid(x_test, 8, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("held-out data", fontsize=10)

    fig.canvas.draw()  # apply the equal aspects, then put the title just above the top row
    top = max(a.get_position().y1 for a in fig.axes)
    fig.text(0.5, top + 0.025, f"Independent vs minibatch OT vs LOOM-CFM on {args.data}: same model, "
             f"{s['steps']} steps, batch {s['batch_size']}, {len(runs)} seeds (samples: seed {first['seed']})",
             ha="center", fontsize=12)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def w2_panel(ax, curves: dict, colors: dict, floor: dict | None, n_seeds: int) -> None:
    """W2 against NFE on ``ax``: Euler solid, midpoint dashed, mean over seeds with min-max bars; dopri5 dotted.

    ``curves``: label -> {column: spread dict} (the ``w2`` records of ``_aggregate``).
    """
    from matplotlib.ticker import FormatStrFormatter

    for label, w in curves.items():
        for method, ls in (("euler", "-"), ("midpoint", "--")):
            nfes = [k for m, k in EVALS if m == method]
            sp = [w[f"{method}{k}"] for k in nfes]
            mean = np.array([x["mean"] for x in sp])
            err = np.array([[x["mean"] - x["min"] for x in sp], [x["max"] - x["mean"] for x in sp]])
            ax.errorbar(nfes, mean, yerr=err, fmt="o" + ls, ms=4, capsize=3, color=colors[label],
                        label=f"{label} ({method})")
        if "dopri5" in w:
            ax.axhline(w["dopri5"]["mean"], color=colors[label], ls=":", lw=1)
    if floor is not None:
        ax.axhline(floor["mean"], color="black", ls=":", lw=1.5, label="data floor (train vs held-out)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    nfes = sorted({k for _, k in EVALS})
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(k) for k in nfes])
    ax.set_xlabel("NFE (Euler solid, midpoint dashed; dotted: dopri5)")
    ax.set_ylabel("exact W2 to held-out data")
    ax.set_title(f"sample quality vs NFE: mean over {n_seeds} seeds, bars min-max", fontsize=10)
    ax.legend(fontsize=7, ncol=2)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    run(args)
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
