"""The demo: independent vs minibatch-OT vs LOOM-CFM couplings, same budget, measured (``python -m loom_kernels.demo``).

Trains the same velocity network with the same steps, batch size and seed under the three couplings
on a finite built-in data set (no download), then measures

- sample quality against held-out data at NFE 1, 2, 4, 8 (Euler): the exact 2-Wasserstein distance
  ``metrics.w2`` (an exact assignment, ``loom_kernels.assign``), next to the W2 between two finite
  samples of the data itself (the floor a perfect model would reach at this sample size);
- the straightness of each model's flow (``metrics.straightness``; 0 = straight paths);
- the pair cost each coupling trains on: the mean cost of fresh pairs for independent / minibatch OT,
  LOOM's dataset-wide cost ``mean_i c(x1_i, noise(seeds[i]))`` measured during training, and the
  global optimum between LOOM's (fixed) noise set and the data for reference;

prints a table and the ranking it found, and writes one PNG figure. The expected finding (Davtyan
et al., ICLR 2025: LOOM's few-step W2 below minibatch OT's below independent's) is checked, not assumed.
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
NFES = (1, 2, 4, 8)

# Default budgets: each line was sized to finish well inside 5 minutes on a 2-core CPU.
_PRESETS = {
    # data kind -> (n_train, steps, batch_size, hidden, depth, lr, n_eval)
    "2d": dict(n=2048, steps=3000, batch_size=256, hidden=256, depth=3, lr=1e-3, n_eval=2048),
    "digits": dict(n=None, steps=3000, batch_size=128, hidden=512, depth=3, lr=1e-3, n_eval=None),
    "quick": dict(n=512, steps=40, batch_size=64, hidden=32, depth=2, lr=1e-3, n_eval=256),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.demo",
        description="Train the same flow-matching model with independent, minibatch-OT and LOOM-CFM couplings "
                    "(same steps, batch and seed) and compare sample quality (exact W2 vs held-out data) at "
                    "NFE 1/2/4/8, straightness and coupling cost. Prints a table, writes a PNG figure, a JSON "
                    "of the numbers and the EMA model of each run (sample with `python -m loom_kernels.sample`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="8gaussians", help="8gaussians, moons, checkerboard or digits")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per coupling (default per data set)")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default per data set)")
    p.add_argument("--points", type=int, default=None, help="training points of a 2-D set (held-out set: the same size)")
    p.add_argument("--num-caches", type=int, default=1, help="LOOM noise caches per data point")
    p.add_argument("--n-eval", type=int, default=None, help="generated samples / held-out points for W2")
    p.add_argument("--out", default="loom_demo", help="output folder (figure, JSON, models)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; the demo's small models run fastest on one (several threads "
                        "spin-wait on tiny ops and slow down badly on a busy machine); 0 keeps torch's choice")
    p.add_argument("--max-opt-points", type=int, default=4096,
                   help="solve LOOM's global optimum (the floor of its cost) only up to this many points x caches")
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
    flags = {"steps": "steps", "batch_size": "batch_size", "n": "points", "n_eval": "n_eval"}
    for key, flag in flags.items():
        if getattr(args, flag) is not None:
            s[key] = getattr(args, flag)
        if s[key] is not None and s[key] <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be positive, got {s[key]}")
    if args.num_caches < 1:
        raise SystemExit(f"--num-caches must be >= 1, got {args.num_caches}")
    return s


def _dataset_cost(coupling, x_train: torch.Tensor) -> float:
    """LOOM's dataset-wide cost: mean over points and caches of c(x1_i, noise(seeds[i, k]))."""
    from .metrics import coupling_cost
    from .noise import gaussian_noise

    seeds = coupling.seeds
    total = 0.0
    for k in range(seeds.shape[1]):
        z = gaussian_noise(seeds[:, k], x_train.shape[1:], device=x_train.device)
        total += coupling_cost(z, x_train)
    return total / seeds.shape[1]


def _global_optimum(coupling, x_train: torch.Tensor, max_points: int) -> float | None:
    """Mean cost of the exact assignment between LOOM's noise set and the data set (each point once per cache).

    LOOM only permutes its seeds, so this optimum is the floor of its dataset-wide cost. None when the
    problem has more than ``max_points`` rows (an exact dense assignment grows like N^2 memory, ~N^3 time).
    """
    seeds = coupling.seeds
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


def _smooth(steps, values, window):
    """Trailing mean over ``window`` points (fewer at the start, so the curve begins at the first step)."""
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - max(1, window))
    return np.asarray(steps), (csum[hi] - csum[lo]) / (hi - lo)


def run(args) -> dict:
    """Runs the study for parsed ``args`` (see ``--help``); returns the measured numbers as a dict."""
    from . import data as data_mod
    from .metrics import straightness, w2
    from .models import MLPVelocity
    from .sampler import sample
    from .train import TrainConfig, make_coupling, resolve_device, save_model, train

    if args.threads:
        torch.set_num_threads(args.threads)
    s = _settings(args)
    device = resolve_device(args.device)
    is_2d = args.data != "digits"
    x_train = data_mod.load(args.data, "train", n=s["n"], seed=args.seed)
    x_test = data_mod.load(args.data, "test", n=s["n"], seed=args.seed)
    n_eval = min(s["n_eval"] or len(x_test), len(x_test), len(x_train))
    shape = tuple(x_train.shape[1:])
    ds = data_mod.IndexedDataset(x_train)
    x_train_dev = x_train.to(device)
    if s["batch_size"] > len(ds):
        raise SystemExit(f"--batch-size {s['batch_size']} exceeds the {len(ds)} training points")

    eval_gen = torch.Generator().manual_seed(args.seed + 12345)
    x0_eval = torch.randn(n_eval, *shape, generator=eval_gen).to(device)  # the same noise for every model
    x_test_eval = x_test[torch.randperm(len(x_test), generator=eval_gen)[:n_eval]].to(device)
    x_train_eval = x_train[torch.randperm(len(x_train), generator=eval_gen)[:n_eval]].to(device)
    w2_floor = w2(x_train_eval, x_test_eval)

    os.makedirs(args.out, exist_ok=True)
    print(f"LOOM-CFM demo: {args.data}, {len(x_train)} training points {shape}, {len(x_test)} held out; "
          f"MLP {s['depth']}x{s['hidden']}; {s['steps']} steps x batch {s['batch_size']} per coupling; "
          f"seed {args.seed}; device {device}", flush=True)

    results = {}
    for name in COUPLINGS:
        torch.manual_seed(args.seed)  # the same initial weights for every coupling
        model = MLPVelocity(shape, hidden=s["hidden"], depth=s["depth"])
        coupling = make_coupling(name, len(ds), shape, num_caches=args.num_caches, seed=args.seed, device=device)
        cfg = TrainConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                          warmup=min(200, s["steps"] // 10), ema_decay=0.999, seed=args.seed,
                          device=str(device), log_every=1, progress=not args.no_progress)
        dataset_cost = []
        callback, every = None, 0
        if name == "loom":
            # Geometric spacing early (LOOM converges within a few epochs), regular spacing later.
            every = 1
            at = set(np.unique(np.geomspace(1, s["steps"], 30).astype(int)).tolist())
            at |= set(range(0, s["steps"] + 1, max(1, s["steps"] // 40)))
            dataset_cost.append((0, _dataset_cost(coupling, x_train_dev)))

            def callback(step, *, model, ema, coupling):  # noqa: ARG001 - the trainer's callback signature
                if step in at:
                    dataset_cost.append((step, _dataset_cost(coupling, x_train_dev)))

        t_start = time.perf_counter()
        res = train(model, ds, coupling, cfg, callback=callback, callback_every=every,
                    metadata={"model": model.spec, "data": args.data, "n": s["n"], "seed": args.seed,
                              "coupling": name, "num_caches": args.num_caches})
        train_s = time.perf_counter() - t_start
        ema = res.ema.eval()
        save_model(os.path.join(args.out, f"{args.data}_{name}", "model.pt"), ema,
                   metadata={"model": model.spec, "data": args.data, "coupling": name}, step=res.step)

        t_eval = time.perf_counter()
        w2s = {}
        samples = {}
        for nfe in NFES:
            x1 = sample(ema, x0_eval, nfe, method="euler")
            w2s[nfe] = w2(x1, x_test_eval)
            samples[nfe] = x1.cpu()
        straight = straightness(ema, x0_eval, 16)
        traj = sample(ema, x0_eval[:48], 16, method="euler", return_trajectory=True).cpu() if is_2d else None
        eval_s = time.perf_counter() - t_eval
        hist = res.history
        tail = hist[-max(1, len(hist) // 10):]
        pair_cost_end = dataset_cost[-1][1] if name == "loom" else float(np.mean([r["post_cost"] for r in tail]))
        results[name] = {
            "w2": w2s, "straightness": straight, "train_seconds": train_s, "eval_seconds": eval_s,
            "pair_cost_end": pair_cost_end, "final_loss": float(np.mean([r["loss"] for r in tail])),
            "cost_curve": ([r["step"] for r in hist], [r["post_cost"] for r in hist]),
            "dataset_cost": dataset_cost, "samples": samples, "trajectory": traj,
        }
        if name == "loom":
            t_opt = time.perf_counter()
            results[name]["global_optimum"] = _global_optimum(coupling, x_train_dev, args.max_opt_points)
            results[name]["global_optimum_seconds"] = time.perf_counter() - t_opt

    summary = _report(args, s, results, w2_floor, x_train, n_eval)
    fig_path = os.path.join(args.out, f"demo_{args.data}.png")
    _figure(fig_path, args, s, results, x_test_eval.cpu(), w2_floor, is_2d)
    summary["figure"] = fig_path
    json_path = os.path.join(args.out, f"demo_{args.data}.json")
    atomic_write(json_path, lambda f: json.dump(summary, f, indent=2), mode="w")
    print(f"figure: {fig_path}\nnumbers: {json_path}\nmodels: {os.path.join(args.out, args.data + '_{' + ','.join(COUPLINGS) + '}', 'model.pt')}")
    return summary


def _ranking(results, nfe):
    order = sorted(COUPLINGS, key=lambda c: results[c]["w2"][nfe])
    return order, " < ".join(f"{LABELS[c]} ({results[c]['w2'][nfe]:.3f})" for c in order)


def _report(args, s, results, w2_floor, x_train, n_eval) -> dict:
    head = f"{'coupling':<14}" + "".join(f"{'W2@NFE' + str(k):>10}" for k in NFES) + \
        f"{'straightness':>14}{'pair cost':>11}{'loss':>9}{'train s':>9}"
    print(f"\nExact W2 between {n_eval} generated samples (Euler) and {n_eval} held-out points "
          f"(lower is better); straightness at 16 Euler steps (0 = straight); pair cost = mean squared "
          f"distance of the training pairs at the end (LOOM: over the whole data set)")
    print(head)
    print("-" * len(head))
    for c in COUPLINGS:
        r = results[c]
        print(f"{LABELS[c]:<14}" + "".join(f"{r['w2'][k]:>10.3f}" for k in NFES) +
              f"{r['straightness']:>14.4f}{r['pair_cost_end']:>11.3f}{r['final_loss']:>9.4f}{r['train_seconds']:>9.1f}")
    print(f"{'data floor':<14}{w2_floor:>10.3f}   (W2 between {n_eval} training and {n_eval} held-out points)")
    loom = results["loom"]
    curve = loom["dataset_cost"]
    opt = loom.get("global_optimum")
    line = f"\nLOOM dataset-wide pair cost: {curve[0][1]:.3f} at step 0 -> {curve[-1][1]:.3f} at step {curve[-1][0]}"
    k = args.num_caches
    size = f"{len(x_train)} points" + (f" x {k} caches" if k > 1 else "")
    if opt is not None:
        gap = (curve[-1][1] - opt) / opt * 100 if opt > 0 else float("nan")
        line += (f"; global optimum for its noise set {opt:.3f} ({gap:+.2f}%; exact assignment of {size} "
                 f"in {loom['global_optimum_seconds']:.1f} s)")
    else:
        line += f"; global optimum not computed ({size} > --max-opt-points {args.max_opt_points})"
    print(line)
    expected = ["loom", "ot", "independent"]
    rankings = {}
    for nfe in (1, 2):
        order, text = _ranking(results, nfe)
        verdict = "matches" if order == expected else "does NOT match"
        rankings[nfe] = order
        print(f"ranking at NFE {nfe}: {text}  -> {verdict} the paper's expectation (LOOM < minibatch OT < independent)")
    return {
        "data": args.data, "settings": s, "seed": args.seed, "num_caches": args.num_caches, "n_eval": n_eval,
        "w2_floor": w2_floor, "rankings": {str(k): v for k, v in rankings.items()},
        "results": {c: {"w2": {str(k): v for k, v in results[c]["w2"].items()},
                        "straightness": results[c]["straightness"], "pair_cost_end": results[c]["pair_cost_end"],
                        "final_loss": results[c]["final_loss"], "train_seconds": results[c]["train_seconds"],
                        "eval_seconds": results[c]["eval_seconds"]} for c in COUPLINGS},
        "loom_dataset_cost": curve, "loom_global_optimum": opt,
    }


def _image_grid(x: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    x = x[: rows * cols].float().clamp(-1, 1).numpy()
    c, h, w = x.shape[1:]
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), dtype=np.float32)
    for k in range(len(x)):
        i, j = divmod(k, cols)
        grid[i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = (x[k].transpose(1, 2, 0) + 1) / 2
    return grid[..., 0] if c == 1 else grid


def _figure(path, args, s, results, x_test, w2_floor, is_2d) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 17))
    gs = fig.add_gridspec(4, 6, height_ratios=[1, 1, 1, 1.05], hspace=0.35, wspace=0.45)
    lim = float(x_test.abs().max()) * 1.15 if is_2d else None
    ref = x_test[:1000] if is_2d else None
    for row, c in enumerate(COUPLINGS):
        r = results[c]
        panels = [("NFE 1", r["samples"][1]), ("NFE 2", r["samples"][2]),
                  ("trajectories" if is_2d else "NFE 8", r["trajectory"] if is_2d else r["samples"][8])]
        for col, (title, x) in enumerate(panels):
            ax = fig.add_subplot(gs[row, 2 * col: 2 * col + 2])
            if is_2d and title == "trajectories":
                tr = x.numpy()
                for k in range(tr.shape[1]):
                    ax.plot(tr[:, k, 0], tr[:, k, 1], color=COLORS[c], lw=0.8, alpha=0.7)
                ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, color="black", zorder=3, label="noise")
                ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, color=COLORS[c], zorder=3, label="sample")
                ax.legend(loc="upper right", fontsize=7)
                ax.set_title(f"{LABELS[c]}: 16-step trajectories, straightness {r['straightness']:.3f}", fontsize=9)
            elif is_2d:
                ax.scatter(ref[:, 0], ref[:, 1], s=2, color="lightgray", label="held-out data")
                ax.scatter(x[:, 0], x[:, 1], s=2, color=COLORS[c], label="samples")
                ax.legend(loc="upper right", fontsize=7, markerscale=3)
                nfe = int(title.split()[1])
                ax.set_title(f"{LABELS[c]}: {title} (Euler), W2 {r['w2'][nfe]:.3f}", fontsize=9)
            else:
                ax.imshow(_image_grid(x, 8, 8), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                nfe = int(title.split()[1])
                ax.set_title(f"{LABELS[c]}: {title} (Euler), W2 {r['w2'][nfe]:.3f}", fontsize=9)
            if is_2d:
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_aspect("equal")

    from matplotlib.ticker import FormatStrFormatter

    bottom = gs[3, :].subgridspec(1, 2 if is_2d else 3, wspace=0.3)
    ax = fig.add_subplot(bottom[0])
    for c in COUPLINGS:
        ax.plot(NFES, [results[c]["w2"][k] for k in NFES], "o-", color=COLORS[c], label=LABELS[c])
    ax.axhline(w2_floor, color="black", ls=":", label="data floor (train vs held-out)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_xticks(NFES)
    ax.set_xticklabels([str(k) for k in NFES])
    ax.set_xlabel("NFE (Euler steps)")
    ax.set_ylabel("exact W2 to held-out data")
    ax.set_title("sample quality vs NFE", fontsize=10)
    ax.legend(fontsize=8)

    ax = fig.add_subplot(bottom[1])
    window = max(1, s["steps"] // 50)
    for c in ("independent", "ot"):
        st, val = _smooth(*results[c]["cost_curve"], window)
        ax.plot(st, val, color=COLORS[c], label=f"{LABELS[c]}: fresh minibatch pairs")
    loom = results["loom"]
    st, val = zip(*loom["dataset_cost"])
    ax.plot(st, val, color=COLORS["loom"], lw=2, label="LOOM-CFM: whole data set")
    if loom.get("global_optimum") is not None:
        ax.axhline(loom["global_optimum"], color=COLORS["loom"], ls="--", lw=1, label="global OT optimum (LOOM's noise)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, s["steps"])
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("mean pair cost ||x1 - x0||^2")
    ax.set_title("coupling cost over training", fontsize=10)
    ax.legend(fontsize=8)

    if not is_2d:
        ax = fig.add_subplot(bottom[2])
        ax.imshow(_image_grid(x_test, 8, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("held-out data", fontsize=10)

    fig.canvas.draw()  # apply the equal aspects, then put the title just above the top row
    top = max(a.get_position().y1 for a in fig.axes)
    fig.text(0.5, top + 0.025, f"Independent vs minibatch OT vs LOOM-CFM on {args.data}: same model, "
             f"{s['steps']} steps, batch {s['batch_size']}, seed {args.seed}", ha="center", fontsize=12)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    run(args)
    print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
