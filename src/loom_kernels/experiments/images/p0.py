"""P0, the coupling alone (no network): the transport cost a coupling hands to training, epoch by epoch,
against the exact dataset-wide optimum.

N images against N(0, I) noise of the same shape. One epoch is one pass over a seeded permutation of the
data in minibatches of ``b``; its cost is the mean squared distance of the pairs the coupling returned
over the epoch (what a trainer would regress on). Couplings with fresh noise (independent, minibatch OT
at several ``b``, Sinkhorn) draw the same noise and permutation in the same epoch of the same seed, so
their epoch-1 costs are on one noise realisation; the reference is the exact assignment (our solver,
``loom_kernels.assign``) between the data and the seed's epoch-1 noise. LOOM couplings keep a seed table:
their epoch cost falls as the table converges; the optimum of their own noise set (data repeated K
times vs N*K noises) is solved where N*K <= ``max_opt`` (a dense (NK)^2 problem).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .runs import available_couplings, load_record, markdown_table, progress, run_path, save_record, write_csv

FRESH = ("independent", "ot32", "ot128", "ot512", "sinkhorn128")
LOOMS = ("loom1", "loom4", "loom16")
SEMIDISCRETE = ("semidiscrete_fresh", "semidiscrete_seeded")
VARIANTS = FRESH + LOOMS + SEMIDISCRETE
LOOM_BATCH = 128
SINKHORN_EPS = 0.05  # relative to the mean cost (SinkhornCoupling's default)

LABELS = {
    "independent": "independent",
    **{f"ot{b}": f"minibatch OT b={b}" for b in (32, 128, 512)},
    "sinkhorn128": f"Sinkhorn b=128, eps {SINKHORN_EPS} (rel.)",
    **{f"loom{k}": f"LOOM {k} cache{'s' * (k > 1)} (b={LOOM_BATCH})" for k in (1, 4, 16)},
    "semidiscrete_fresh": "semidiscrete, fresh noise",
    "semidiscrete_seeded": "semidiscrete, seeded noise",
}


def batch_of(variant: str) -> int:
    for prefix in ("ot", "sinkhorn"):
        if variant.startswith(prefix) and variant[len(prefix) :].isdigit():
            return int(variant[len(prefix) :])
    return LOOM_BATCH


def epoch_noise(n: int, shape, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (noise (n, *shape), permutation (n,)) of one epoch of one seed: shared by every fresh coupling."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randn(n, *shape, generator=g), torch.randperm(n, generator=g)


def exact_cost(x: torch.Tensor, z: torch.Tensor) -> float:
    """Mean squared distance of the exact optimal assignment between the rows of ``x`` and ``z``."""
    from ...assign import assign
    from ...cost import pairwise_cost

    c = pairwise_cost(x.flatten(1), z.flatten(1))
    col = assign(c)
    return float(c.gather(1, col[:, None]).double().mean())


def make(variant: str, n: int, shape, seed: int, x: torch.Tensor, fit_steps: int | None = None):
    """The coupling of ``variant``, or a string saying why it is not available in this checkout
    (``fit_steps``: the semidiscrete potential's, None for its default)."""
    from ...couplings import SinkhornCoupling
    from ...couplings.factory import make_coupling

    if variant == "independent":
        return make_coupling("independent")
    if variant.startswith("ot"):
        return make_coupling("ot")
    if variant.startswith("sinkhorn"):
        return SinkhornCoupling(SINKHORN_EPS, generator=torch.Generator().manual_seed(seed + 777))
    if variant.startswith("loom"):
        return make_coupling("loom", n, shape, num_caches=int(variant[4:]), seed=seed)
    name = "semidiscrete-seeded" if variant.endswith("seeded") else "semidiscrete"
    if name not in available_couplings():
        return f"not available: make_coupling has no {name!r} in this checkout"
    try:  # issue 32's signature: the data set to fit the potential on, options
        opts = {"progress": False} | ({} if fit_steps is None else {"fit_steps": fit_steps})
        return make_coupling(name, n, shape, seed=seed, data=x, options=opts)
    except (TypeError, ValueError) as e:
        return f"not available: make_coupling({name!r}, ...) refused the P0 arguments ({e})"


def _pair_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    return float((x1.flatten(1).double() - x0.flatten(1).double()).square().sum(1).sum())


def run_one(x, variant: str, seed: int, epochs: int, opt: float, max_opt: int, fit_steps: int | None = None) -> dict:
    """One (variant, seed): the epoch costs (and LOOM's table cost per epoch)."""
    from ...metrics import dataset_cost, global_optimum

    n, shape = len(x), tuple(x.shape[1:])
    t_make = time.perf_counter()
    c = make(variant, n, shape, seed, x, fit_steps)
    rec = {"variant": variant, "seed": seed, "n": n, "epochs": epochs, "batch": batch_of(variant), "opt_fresh": opt}
    if isinstance(c, str):
        return {**rec, "skipped": c}
    rec["build_seconds"] = time.perf_counter() - t_make  # the semidiscrete potential's fit is in here
    b, table = min(batch_of(variant), n), getattr(c, "seeds", None)
    t0 = time.perf_counter()
    costs, table_costs = [], []
    if table is not None:
        table_costs.append(dataset_cost(c, x))
    for e in range(epochs):
        z, perm = epoch_noise(n, shape, seed, e)
        total = 0.0
        chooses = hasattr(c, "draw")  # fresh semidiscrete: the coupling picks each batch's data points
        for idx in [c.draw(b) for _ in range(n // b)] if chooses else perm.split(b):
            if chooses or table is not None or variant.startswith("semidiscrete"):
                x0, x1 = c(x[idx], idx)[:2]
            else:
                x0, x1 = c(x[idx], x0=z[idx])[:2]
            total += _pair_cost(x0, x1)
        costs.append(total / (b * (n // b) if chooses else n))
        if table is not None:
            table_costs.append(dataset_cost(c, x))
    rec["seconds"] = time.perf_counter() - t0
    rec["epoch_cost"] = costs
    if table is not None:
        rec["table_cost"] = table_costs
        t1 = time.perf_counter()
        rec["opt_table"] = global_optimum(c.seeds, x, max_opt)
        rec["opt_table_seconds"] = time.perf_counter() - t1 if rec["opt_table"] is not None else None
    return rec


def optimum(x: torch.Tensor, seed: int, out: str) -> dict:
    """The exact optimum of the seed's epoch-1 noise (cached in its own record, as the runs)."""
    path = run_path(out, "p0", "opt", len(x), f"seed{seed}")
    rec = load_record(path)
    if rec is None:
        z, _ = epoch_noise(len(x), tuple(x.shape[1:]), seed, 0)
        t0 = time.perf_counter()
        rec = {"n": len(x), "seed": seed, "opt": exact_cost(x, z), "independent": _pair_cost(z, x) / len(x)}
        rec["seconds"] = time.perf_counter() - t0
        save_record(path, rec)
    return rec


def run(x, out: str, *, variants=VARIANTS, seeds: int = 3, epochs: int = 30, max_opt: int = 10_000, fit_steps=None):
    """P0 for data ``x`` (N, C, H, W); resumes from ``out/p0/runs``; returns the records."""
    n = len(x)
    records = []
    tasks = [(v, s) for s in range(seeds) for v in variants]
    bar = progress(tasks, desc=f"P0 N={n}")
    for v, s in bar:
        path = run_path(out, "p0", n, v, f"seed{s}")
        rec = load_record(path)
        if rec is None:
            opt = optimum(x, s, out)
            rec = run_one(x, v, s, epochs, opt["opt"], max_opt, fit_steps)
            rec["opt_seconds"] = opt["seconds"]
            if "skipped" not in rec:  # a coupling missing now runs once it lands
                save_record(path, rec)
        records.append(rec)
    return records


def gap(cost: float, opt: float) -> float:
    """Relative excess over the optimum, in percent."""
    return 100.0 * (cost / opt - 1.0)


def summarize(records: list) -> list:
    """One row per (N, variant): gap to the fresh-noise optimum at epoch 1 and the last epoch, mean ± sd."""
    from ..common import spread

    rows = []
    order = {v: i for i, v in enumerate(VARIANTS)}
    keys = sorted({(r["n"], r["variant"]) for r in records}, key=lambda k: (k[0], order.get(k[1], len(order))))
    for key in keys:
        rs = [r for r in records if (r["n"], r["variant"]) == key]
        if "skipped" in rs[0]:
            rows.append({"n": key[0], "variant": key[1], "skipped": rs[0]["skipped"]})
            continue
        row = {"n": key[0], "variant": key[1], "label": LABELS[key[1]], "seeds": len(rs), "epochs": rs[0]["epochs"]}
        row["gap_first"] = spread(gap(r["epoch_cost"][0], r["opt_fresh"]) for r in rs)
        row["gap_last"] = spread(gap(r["epoch_cost"][-1], r["opt_fresh"]) for r in rs)
        row["gap_mean"] = spread(gap(float(np.mean(r["epoch_cost"])), r["opt_fresh"]) for r in rs)
        row["opt_fresh"] = spread(r["opt_fresh"] for r in rs)
        if rs[0].get("opt_table") is not None:
            row["gap_table_own"] = spread(gap(r["table_cost"][-1], r["opt_table"]) for r in rs)
        row["seconds"] = spread(r["seconds"] for r in rs)
        rows.append(row)
    return rows


def _f(sp, d=2):
    return "-" if sp is None else f"{sp['mean']:.{d}f} ± {sp['sd']:.{d}f}"


def markdown(rows: list) -> str:
    head = (
        "N",
        "coupling",
        "seeds",
        "epoch 1: % above optimum",
        "last epoch",
        "mean over epochs",
        "LOOM table vs its own optimum, %",
        "optimum (mean cost per pair)",
        "s per run",
    )
    body = []
    for r in rows:
        if "skipped" in r:
            body.append((r["n"], LABELS[r["variant"]], "-", r["skipped"], "", "", "", "", ""))
            continue
        body.append(
            (
                r["n"],
                r["label"],
                r["seeds"],
                _f(r["gap_first"]),
                _f(r["gap_last"]),
                _f(r["gap_mean"]),
                _f(r.get("gap_table_own"), 3),
                _f(r["opt_fresh"], 1),
                _f(r["seconds"], 1),
            )
        )
    epochs = max((r.get("epochs", 0) for r in rows), default=0)
    return (
        f"P0: mean squared distance of the pairs a coupling hands out in an epoch, in % above the exact optimum "
        f"between the data and the seed's epoch-1 noise (mean ± sd over seeds, {epochs} epochs). Fresh-noise "
        f"couplings meet that optimum's own noise in epoch 1 only; later epochs draw new noise, whose optimum "
        f"differs by about ±0.1%. The fresh semidiscrete coupling picks its own data points for each batch (an "
        f"epoch is N/b draws, not a pass over each image once), so it is not held to the N-point optimum and can "
        f"fall below it.\n\n" + markdown_table(head, body)
    )


def write_outputs(records: list, out: str, tag: str = "") -> str:
    import os

    rows = summarize(records)
    flat = []
    for r in records:
        if "skipped" in r:
            continue
        flat.append(
            {
                "n": r["n"],
                "variant": r["variant"],
                "seed": r["seed"],
                "batch": r["batch"],
                "epochs": r["epochs"],
                "opt_fresh": r["opt_fresh"],
                "opt_table": r.get("opt_table"),
                "cost_epoch1": r["epoch_cost"][0],
                "cost_last": r["epoch_cost"][-1],
                "gap_epoch1_pct": gap(r["epoch_cost"][0], r["opt_fresh"]),
                "gap_last_pct": gap(r["epoch_cost"][-1], r["opt_fresh"]),
                "seconds": r["seconds"],
            }
        )
    write_csv(os.path.join(out, f"p0{tag}.csv"), flat)
    md = markdown(rows)
    from .runs import write_text

    write_text(os.path.join(out, f"p0{tag}.md"), md)
    from .figures import p0_figure

    p0_figure(records, os.path.join(out, f"p0{tag}.png"), LABELS, VARIANTS, LOOM_BATCH)
    return md
