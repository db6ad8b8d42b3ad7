"""The image experiments' figures (matplotlib, imported only when drawing)."""

from __future__ import annotations

import numpy as np

from ..._io import atomic_write


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _gap(cost: float, opt: float) -> float:
    return 100.0 * (cost / opt - 1.0)


def p0_figure(records: list, path: str, labels: dict, order: tuple, loom_batch: int) -> None:
    """Left: % above the optimum per epoch (mean, min-max band over seeds), one panel per N.
    Right: the bias of minibatch OT against its batch size (epoch mean), with LOOM's last epoch.

    ``labels``/``order``: P0's variant names and their order; ``loom_batch``: LOOM's batch size."""
    plt = _plt()
    recs = [r for r in records if "skipped" not in r]
    ns = sorted({r["n"] for r in recs})
    fig, axes = plt.subplots(1, len(ns) + 1, figsize=(6 * (len(ns) + 1), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    variants = sorted({r["variant"] for r in recs}, key=lambda v: order.index(v) if v in order else 99)
    for ax, n in zip(axes[0], ns):
        for i, v in enumerate(variants):
            rs = [r for r in recs if r["n"] == n and r["variant"] == v]
            if not rs:
                continue
            g = np.array([[_gap(c, r["opt_fresh"]) for c in r["epoch_cost"]] for r in rs])
            e = np.arange(1, g.shape[1] + 1)
            ax.plot(e, g.mean(0), "-o" if g.shape[1] < 12 else "-", ms=3, color=cmap(i % 10), label=labels[v])
            ax.fill_between(e, g.min(0), g.max(0), color=cmap(i % 10), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("% above the exact optimum (fresh noise)")
        ax.set_title(f"N = {n} images vs N(0, I): cost of the pairs per epoch", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for j, n in enumerate(ns):
        bs, means, lo, hi = [], [], [], []
        for v in variants:
            if not v.startswith("ot"):
                continue
            rs = [r for r in recs if r["n"] == n and r["variant"] == v]
            g = [_gap(float(np.mean(r["epoch_cost"])), r["opt_fresh"]) for r in rs]
            if g:
                bs.append(rs[0]["batch"])
                means.append(np.mean(g))
                lo.append(np.mean(g) - min(g))
                hi.append(max(g) - np.mean(g))
        if bs:
            ax.errorbar(bs, means, yerr=[lo, hi], fmt="o-", capsize=3, color=cmap(j), label=f"minibatch OT, N={n}")
        ind = [
            _gap(float(np.mean(r["epoch_cost"])), r["opt_fresh"])
            for r in recs
            if r["n"] == n and r["variant"] == "independent"
        ]
        if ind:
            ax.axhline(np.mean(ind), color=cmap(j), ls="--", lw=1, label=f"independent, N={n}")
        for v, m in (("loom1", "s"), ("loom4", "^"), ("loom16", "v")):
            g = [_gap(r["epoch_cost"][-1], r["opt_fresh"]) for r in recs if r["n"] == n and r["variant"] == v]
            if g:
                ax.plot([loom_batch], [np.mean(g)], m, color=cmap(j), label=f"{labels[v]}, N={n}, last epoch")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size b")
    ax.set_ylabel("% above the exact optimum")
    ax.set_title("coupling bias vs batch size (mean over epochs and seeds, bars min-max)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def training_figure(part: str, records: list, base: dict, cols: list, path: str, labels: dict) -> None:
    """FD-LeNet and pixel W2 against NFE per coupling (mean over seeds, bars min-max; Euler solid,
    midpoint dashed, dopri5 dotted), and a sample grid per coupling at Euler NFE 1/2/4 (first seed)."""
    import os

    import torch

    from ...visual import image_grid
    from ..common import EVALS

    plt = _plt()
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, floor in ((axes[0], "fd", base["fd"]), (axes[1], "w2", base["w2"])):
        for i, v in enumerate(variants):
            rs = [r for r in records if r["variant"] == v]
            for method, ls in (("euler", "-"), ("midpoint", "--")):
                ks = [k for m, k in EVALS if m == method and f"{m}{k}" in cols]
                vals = np.array([[r[key][f"{method}{k}"] for k in ks] for r in rs])
                if not ks:
                    continue
                m = vals.mean(0)
                label = f"{labels[v]}" if method == "euler" else None
                err = [m - vals.min(0), vals.max(0) - m]
                ax.errorbar(ks, m, yerr=err, fmt="o" + ls, ms=3, capsize=3, color=cmap(i % 10), label=label)
            if "dopri5" in cols:
                ax.axhline(np.mean([r[key]["dopri5"] for r in rs]), color=cmap(i % 10), ls=":", lw=1)
        ax.axhline(floor, color="black", ls=":", lw=1.5, label="floor: train vs test")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE (Euler solid, midpoint dashed, dopri5 dotted)")
        ax.set_ylabel("FD-LeNet (not FID)" if key == "fd" else "exact pixel W2 (subset)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{part}: sample quality vs NFE, mean over seeds, bars min-max", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    ckpt = os.path.join(os.path.dirname(path), part, "ckpt")
    grids = []
    for v in variants:
        seed = min(r["seed"] for r in records if r["variant"] == v)
        f = os.path.join(ckpt, f"{v}_seed{seed}", "samples.pt")
        if os.path.exists(f):
            grids.append((v, torch.load(f, weights_only=True)))
    if not grids:
        return
    shown = [c for c in ("euler1", "euler2", "euler4") if c in grids[0][1]]
    fig, axes = plt.subplots(len(grids), len(shown), figsize=(2.6 * len(shown), 2.7 * len(grids)), squeeze=False)
    for row, (v, smp) in zip(axes, grids):
        for ax, c in zip(row, shown):
            ax.imshow(image_grid(smp[c].float(), 6, 6), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{labels[v]}, Euler NFE {c[5:]}", fontsize=8)
    fig.tight_layout()
    _save(fig, path[:-4] + "_samples.png")


def p3_2d_figure(records: list, rows: list, path: str, variants: dict, labels: dict, conditions: dict) -> None:
    """C2OT's Fig. 1 layout: one column per coupling (grouped by condition), rows one Euler step and dopri5;
    the first seed's samples coloured by their condition, the W2² mean ± sd over seeds below each panel."""
    plt = _plt()
    names = [v for v in variants if any(r["variant"] == v for r in records)]
    if not names:
        return
    first = {v: min((r for r in records if r["variant"] == v), key=lambda r: r["seed"]) for v in names}
    stat = {r["variant"]: r for r in rows}
    floor = stat.get("floor")
    fig, axes = plt.subplots(2, len(names), figsize=(2.3 * len(names), 5.2), squeeze=False)
    for j, v in enumerate(names):
        rec, cond = first[v], variants[v][0]
        c = rec["fig_cond"]
        for i, m in enumerate(("euler1", "dopri5")):
            ax = axes[i][j]
            x = np.asarray(rec[f"fig_{m}"])
            if c is None:
                ax.scatter(x[:, 0], x[:, 1], s=1.5, color="#B2182B")
            elif cond == "cls":
                ax.scatter(x[:, 0], x[:, 1], s=1.5, c=np.asarray(c) > 0, cmap="coolwarm", vmin=0, vmax=1)
            else:
                ax.scatter(x[:, 0], x[:, 1], s=1.5, c=c, cmap="viridis")
            ax.set_xlim(-7, 7)
            ax.set_ylim(-7, 7)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            s = stat[v][m]
            ax.set_xlabel(f"W2² {s['mean']:.3f} ± {s['sd']:.3f}", fontsize=8)
            if i == 0:
                ax.set_title(f"{conditions[cond]}\n{labels[v]}", fontsize=7)
            if j == 0:
                ax.set_ylabel("one Euler step" if m == "euler1" else "dopri5", fontsize=9)
    title = "8gaussians -> moons (C2OT's Fig. 1): samples of the first seed coloured by condition; W2² over seeds"
    if floor:
        title += f" (floor, two draws of the target: {floor['euler1']['mean']:.3f})"
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
