"""The figures of the demo and the study (matplotlib, imported only when a figure is drawn), and
the image panels tiled by ``loom_kernels.visual.image_grid``."""

from __future__ import annotations

import numpy as np

from .._io import atomic_write
from .._optional import require
from ..visual import image_grid
from .common import COLORS, EVALS, STRAIGHTNESS_NFE, column_label
from .variants import ALL_VARIANTS, COUPLINGS, LABELS, NFES


def _smooth(steps, values, window):
    """Trailing mean over ``window`` points (fewer at the start, so the curve begins at the first step)."""
    values = np.asarray(values, dtype=np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - max(1, window))
    return np.asarray(steps), (csum[hi] - csum[lo]) / (hi - lo)


def _sample_panel(ax, key, x, c, r, first, ref, is_2d) -> None:
    """One sample panel: 2-D points over the held-out data, trajectories, or an image grid."""
    if key == "trajectories":
        tr = x.numpy()
        for k in range(tr.shape[1]):
            ax.plot(tr[:, k, 0], tr[:, k, 1], color=COLORS[c], lw=0.8, alpha=0.7)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, color="black", zorder=3, label="noise")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, color=COLORS[c], zorder=3, label="sample")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title(
            f"{LABELS[c]}: {STRAIGHTNESS_NFE}-step trajectories (seed {first['seed']}), "
            f"straightness {r['straightness']:.3f}",
            fontsize=9,
        )
        return
    if is_2d:
        ax.scatter(ref[:, 0], ref[:, 1], s=2, color="lightgray", label="held-out data")
        ax.scatter(x[:, 0], x[:, 1], s=2, color=COLORS[c], label="samples")
        ax.legend(loc="upper right", fontsize=7, markerscale=3)
    else:
        ax.imshow(image_grid(x, 8, 8), cmap="gray", vmin=0, vmax=1)
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
        ax.plot(
            st,
            val,
            color=COLORS["loom"],
            lw=1.5,
            alpha=0.8,
            label=f"LOOM-CFM: whole data set ({len(runs)} seeds)" if i == 0 else None,
        )
        opt = r["couplings"]["loom"].get("global_optimum")
        if opt is not None:
            ax.axhline(
                opt,
                color=COLORS["loom"],
                ls="--",
                lw=0.8,
                label="global OT optimum (LOOM's noise set)" if i == 0 else None,
            )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, s["steps"])
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("mean pair cost ||x1 - x0||^2")
    ax.set_title("coupling cost over training", fontsize=10)
    ax.legend(fontsize=8)


def demo_figure(path, args, s, runs, agg, dopri5) -> None:
    matplotlib = require("matplotlib", "the demo's figure")
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
        panels = [
            ("euler1", r["samples"]["euler1"]),
            ("euler2", r["samples"]["euler2"]),
            ("trajectories" if is_2d else "euler8", r["trajectory"] if is_2d else r["samples"]["euler8"]),
        ]
        for col, (key, x) in enumerate(panels):
            ax = fig.add_subplot(gs[row, 2 * col : 2 * col + 2])
            _sample_panel(ax, key, x, c, r, first, ref, is_2d)
            if is_2d:
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
                ax.set_aspect("equal")

    bottom = gs[3, :].subgridspec(1, 2 if is_2d else 3, wspace=0.3)
    w2_panel(
        fig.add_subplot(bottom[0]),
        {LABELS[c]: agg["couplings"][c]["w2"] for c in COUPLINGS},
        {LABELS[c]: COLORS[c] for c in COUPLINGS},
        agg["w2_floor"],
        len(runs),
    )
    _cost_panel(fig.add_subplot(bottom[1]), s, runs)
    if not is_2d:
        ax = fig.add_subplot(bottom[2])
        ax.imshow(image_grid(x_test, 8, 8), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("held-out data", fontsize=10)

    fig.canvas.draw()  # apply the equal aspects, then put the title just above the top row
    top = max(a.get_position().y1 for a in fig.axes)
    fig.text(
        0.5,
        top + 0.025,
        f"Independent vs minibatch OT vs LOOM-CFM on {args.data}: same model, "
        f"{s['steps']} steps, batch {s['batch_size']}, {len(runs)} seeds (samples: seed {first['seed']})",
        ha="center",
        fontsize=12,
    )
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
            ax.errorbar(
                nfes, mean, yerr=err, fmt="o" + ls, ms=4, capsize=3, color=colors[label], label=f"{label} ({method})"
            )
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


def _study_w2_panel(ax, summary, data, color, labels, nfes) -> None:
    for s in (x for x in summary if x["data"] == data):
        v = s["variant"]
        for key, ls in (("w2_fresh", "-"), ("w2_train", "--")):
            if f"{key}_nfe1" not in s:
                continue
            sp = [s[f"{key}_nfe{k}"] for k in nfes]
            mean = np.array([x["mean"] for x in sp])
            err = np.array([[x["mean"] - x["min"] for x in sp], [x["max"] - x["mean"] for x in sp]])
            ax.errorbar(
                nfes,
                mean,
                yerr=err,
                fmt="o" + ls,
                ms=3,
                capsize=2,
                color=color[v],
                label=labels[v] if key == "w2_fresh" else None,
            )
    floor = next(x for x in summary if x["data"] == data)["w2_floor"]["mean"]
    ax.axhline(floor, color="black", ls=":", label="data floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(k) for k in nfes])
    ax.set_xlabel("Euler NFE")
    ax.set_ylabel("exact W2 to held-out data")
    ax.set_title(f"{data}: fresh noise (solid) vs training noise (dashed); mean, min-max over seeds", fontsize=9)
    ax.legend(fontsize=7)


def _study_cost_panel(ax, records, data, variants, color, labels) -> None:
    for v in variants:
        rs = [r for r in records if r["data"] == data and r["variant"] == v]
        for i, r in enumerate(rs):
            curve = r["dataset_cost_curve"] or r["minibatch_cost_curve"]
            if not curve:
                continue
            st, val = zip(*curve)
            ax.plot(
                np.maximum(st, 0.5),
                val,
                color=color[v],
                lw=1,
                alpha=0.8,
                ls="-" if r["dataset_cost_curve"] else "--",
                label=labels[v] if i == 0 else None,
            )
        opt = [r.get("global_optimum") for r in rs if r.get("global_optimum") is not None]
        if v == "loom1" and opt:
            ax.axhline(float(np.mean(opt)), color=color[v], ls=":", lw=1, label="global optimum (1 cache)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean pair cost")
    ax.set_title(f"{data}: dataset-wide cost of the seed table (solid), minibatch pairs (dashed)", fontsize=9)
    ax.legend(fontsize=7)


def _memorisation_panel(ax, records, datasets, k, cmap) -> None:
    """The gap between fresh- and training-noise W2 against the total number of noise samples."""
    for i, data in enumerate(datasets):
        pts = [
            (r["noise_total"], r["w2_fresh"][k] - r["w2_train"][k])
            for r in records
            if r["data"] == data and r["variant"].startswith("loom")
        ]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, color=cmap(i), s=14, label=data)
            xs = sorted(set(x))
            ax.plot(xs, [np.mean([b for a, b in pts if a == v]) for v in xs], color=cmap(i), lw=1)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("noise samples = caches x points (LOOM 1, 4, 16, 64 caches)")
    ax.set_ylabel(f"W2 fresh - W2 training noise, Euler NFE {k}")
    ax.set_title(f"memorisation of the noise set (NFE {k}): 0 = generalises to fresh noise", fontsize=9)
    ax.legend(fontsize=7)


def study_figure(records: list, summary: list, path: str) -> None:
    """Per data set: W2 vs NFE (fresh solid, training noise dashed), the cost curves; and the memorisation gap."""
    matplotlib = require("matplotlib", "the study's figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["data"] for r in records))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    cmap = plt.get_cmap("tab10")
    # One colour per variant in this figure (tab10 past its 10th index repeats its last colour).
    shown = [v for v in ALL_VARIANTS if v in variants]
    palette = cmap if len(shown) <= 10 else plt.get_cmap("tab20")
    color = {v: palette(i) for i, v in enumerate(shown)}
    fig, axes = plt.subplots(len(datasets) + 1, 2, figsize=(14, 4.2 * (len(datasets) + 1)), squeeze=False)
    for row, data in enumerate(datasets):
        _study_w2_panel(axes[row, 0], summary, data, color, LABELS, NFES)
        _study_cost_panel(axes[row, 1], records, data, variants, color, LABELS)
    for col, k in enumerate((1, 8)):
        _memorisation_panel(axes[-1, col], records, datasets, k, cmap)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), mode="wb")
    plt.close(fig)
