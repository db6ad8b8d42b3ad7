"""P3, 2-D: C2OT's 8gaussians -> moons figure (Cheng, Schwing, ICCV 2025, Fig. 1; their ``moons.py``).

The setting, as in their code: the source is 8 Gaussians (centres on a circle of radius 5, covariance
``sqrt(0.1) I``), not N(0, I); the target is torchdyn's moons (``noise=0.2``: one uniform shift in [0, 0.2) on
both coordinates) scaled ``x * 3 - 1``; the condition is none, the moon (discrete; the network sees +-1) or the
target's x-coordinate (continuous). Each draw of ``OT_BATCH`` pairs is coupled at once and then trained on
in minibatches of ``batch``; their network (an MLP of width 128, 3 residual GELU blocks, condition and time
added after a linear embedding), Adam 3e-4, 20,000 steps. The score is their "W2": POT's ``emd2`` on the
squared distance, i.e. the squared 2-Wasserstein distance, between 10,000 samples generated from fresh
source points (with the test points' conditions) and those test points, at one Euler step and with dopri5
(rtol = atol = 1e-4).

Couplings: ``fm`` independent pairs (the source batch as drawn), ``ot`` minibatch OT that ignores the
condition, ``labels`` minibatch OT with ``labels=`` (C2OT's discrete case: their weight 1e6 is "infinity"),
``adaptive`` minibatch OT with ``cond=`` and ``cond_weight="adaptive"`` (our rule: the condition is the
fraction ``cond_ratio`` = 0.5 of the mean pair cost), ``rsearch`` minibatch OT with ``cond=`` and, per batch,
the weight of C2OT's own rule (the weight at which a fraction r = 0.05 of all pairs costs no more than the
data item's independent pair; ``c2ot_r_weight``), passed as a float ``cond_weight``. Our moons draw positions
on the arcs at random where torchdyn takes an ordered grid: their FM minibatches are ordered runs of one moon.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from torch import nn

from ..common import fmt, ranking, spread
from .runs import claim_run, load_record, markdown_table, run_path, save_record, write_csv, write_text

PART = "p3_2d"
OT_BATCH_PER_BATCH = 4  # C2OT: an OT batch of 1024 serves 4 network batches of 256
R_TARGET = 0.05  # C2OT's default r for the continuous condition
COND_RATIO = 0.5  # our adaptive rule's share (MinibatchOTCoupling's default)
TOL = 1e-4  # C2OT's dopri5 tolerances
# name: (condition, coupling); the figure's columns in this order (C2OT's Fig. 1 plus our two C2OT rules)
VARIANTS = {
    "unc_fm": ("unc", "fm"),
    "unc_ot": ("unc", "ot"),
    "cls_fm": ("cls", "fm"),
    "cls_ot": ("cls", "ot"),
    "cls_labels": ("cls", "labels"),
    "x_fm": ("x", "fm"),
    "x_ot": ("x", "ot"),
    "x_adaptive": ("x", "adaptive"),
    "x_rsearch": ("x", "rsearch"),
}
LABELS = {
    "unc_fm": "FM",
    "unc_ot": "OT",
    "cls_fm": "FM",
    "cls_ot": "OT",
    "cls_labels": "OT, labels= (C2OT)",
    "x_fm": "FM",
    "x_ot": "OT",
    "x_adaptive": 'OT, cond=, "adaptive"',
    "x_rsearch": "OT, cond=, C2OT's r=0.05",
}
CONDITIONS = {"unc": "unconditional", "cls": "discrete: the moon", "x": "continuous: target x"}


def source(n: int, gen: torch.Generator) -> torch.Tensor:
    """C2OT's 8gaussians: centres ``5 (cos, sin)(k pi / 4)``, covariance ``sqrt(0.1) I`` (std 0.1 ** 0.25)."""
    k = torch.randint(8, (n,), generator=gen).double() * (math.pi / 4)
    centres = 5.0 * torch.stack([k.cos(), k.sin()], 1)
    return (centres + 0.1**0.25 * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()


def target(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """C2OT's moons ``(x (n, 2), moon (n,) int64)``: half on each moon, uniform along the arc, plus one shift
    ``U[0, 0.2)`` added to both coordinates (torchdyn's ``noise``), then ``x * 3 - 1``; rows shuffled."""
    moon = (torch.arange(n) >= n // 2).long()[torch.randperm(n, generator=gen)]
    a = math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    outer = torch.stack([a.cos(), a.sin()], 1)
    inner = torch.stack([1.0 - a.cos(), 0.5 - a.sin()], 1)
    x = torch.where(moon[:, None].bool(), inner, outer) + 0.2 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return (3.0 * x - 1.0).float(), moon


def condition(kind: str, x1: torch.Tensor, moon: torch.Tensor) -> torch.Tensor | None:
    """The network's condition ``(n, 1)``: None, the moon as -1/+1, or the x-coordinate."""
    if kind == "cls":
        return moon[:, None].float() * 2.0 - 1.0
    return x1[:, :1].clone() if kind == "x" else None


class Net2D(nn.Module):
    """C2OT's toy network: linear embeddings of x, t (and the condition) summed, residual GELU MLP blocks."""

    def __init__(self, cond: bool, dim: int = 128, depth: int = 3):
        super().__init__()
        self.inp, self.temb = nn.Linear(2, dim), nn.Linear(1, dim)
        self.cemb = nn.Linear(1, dim) if cond else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(depth)
        )
        self.out = nn.Linear(dim, 2)

    def forward(self, x, t, c=None):
        h = self.inp(x) + self.temb(t.reshape(-1, 1).to(x.dtype))
        if self.cemb is not None:
            h = h + self.cemb(c)
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


def c2ot_r_weight(x0: torch.Tensor, x1: torch.Tensor, c: torch.Tensor, r: float = R_TARGET) -> float:
    """C2OT's adaptive weight, solved exactly: the largest ``w`` with ``mean_ij [M_ij + w C_ij <= M_jj] >= r``
    (``couplings.c2ot.c2ot_search_weight``, the library's ``cond_weight="c2ot"``), on this experiment's
    ``M_ij = ||x0_i - x1_j||^2`` and ``C_ij = ||c_i - c_j||^2`` (``torch.cdist`` in float64, and only ``C_ij = 0``
    as equal conditions, ``zero=0``: as its records were computed)."""
    from ...couplings.c2ot import c2ot_search_weight

    m = torch.cdist(x0.double(), x1.double()).square()
    cc = torch.cdist(c.double(), c.double()).square()
    return c2ot_search_weight(
        m.T, cc.T, r, zero=0.0
    )  # rows: items (the library's orientation); their own pairs: the diagonal


def couple(kind: str, x0, x1, moon, c) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None]:
    """One OT batch paired by coupling ``kind``: ``(x0, x1, c, weight)`` with rows matched."""
    from ...couplings import IndependentCoupling, MinibatchOTCoupling

    if kind == "fm":
        x0, x1 = IndependentCoupling()(x1, x0=x0)
        return x0, x1, c, None
    if kind == "ot":
        return *MinibatchOTCoupling()(x1, x0=x0), c, None
    if kind == "labels":
        return *MinibatchOTCoupling()(x1, x0=x0, labels=moon), c, None
    w = "adaptive" if kind == "adaptive" else c2ot_r_weight(x0, x1, c)
    cp = MinibatchOTCoupling(cond_weight=w, cond_ratio=COND_RATIO)
    x0, x1 = cp(x1, x0=x0, cond=c)
    return x0, x1, c, float(cp.stats.get("cond_weight", w if w != "adaptive" else 0.0))


def sample(model, x0, c, method: str) -> tuple[torch.Tensor, int]:
    from ...sampler import sample as integrate

    kw = {} if c is None else {"model_kwargs": {"c": c}}
    if method == "euler1":
        return integrate(model, x0, 1, method="euler", **kw), 1
    info = {}
    x1 = integrate(model, x0, method="dopri5", rtol=TOL, atol=TOL, info=info, **kw)
    return x1, int(info["nfe"])


def run_one(variant: str, seed: int, steps: int, batch: int, n_eval: int, n_fig: int) -> dict:
    from ...metrics import w2

    cond_kind, kind = VARIANTS[variant]
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the same initial weights for every coupling of a seed
    model = Net2D(cond_kind != "unc")
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(seed)  # the same data stream for every coupling of a seed
    ot_batch, step, weights, losses = batch * OT_BATCH_PER_BATCH, 0, [], []
    while step < steps:
        x1, moon = target(ot_batch, gen)
        x0, x1, c, w = couple(kind, source(ot_batch, gen), x1, moon, condition(cond_kind, x1, moon))
        if w is not None:
            weights.append(w)
        for i in range(0, ot_batch, batch):
            if step >= steps:
                break
            sl = slice(i, i + batch)
            t = torch.rand(len(x0[sl]), generator=gen)
            xt = (1 - t[:, None]) * x0[sl] + t[:, None] * x1[sl]
            v = model(xt, t, None if c is None else c[sl])
            loss = (v - (x1[sl] - x0[sl])).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    train_s = time.perf_counter() - t0
    test = torch.Generator().manual_seed(10_000 + seed)
    x1, moon = target(n_eval, test)
    c, x0 = condition(cond_kind, x1, moon), source(n_eval, test)
    rec = {"variant": variant, "seed": seed, "steps": steps, "batch": batch, "ot_batch": ot_batch, "n_eval": n_eval}
    with torch.no_grad():
        for method in ("euler1", "dopri5"):
            gen_x, nfe = sample(model, x0, c, method)
            rec[f"w2sq_{method}"] = w2(gen_x, x1) ** 2
            rec[f"nfe_{method}"] = nfe
            rec[f"fig_{method}"] = gen_x[:n_fig].tolist()
    rec["fig_cond"] = None if c is None else c[:n_fig, 0].tolist()
    rec["w2sq_floor"] = w2(target(n_eval, test)[0], x1) ** 2  # two draws of the target: the sample-size floor
    rec["cond_weight_mean"] = float(np.mean(weights)) if weights else None
    rec["loss_last"] = float(np.mean(losses[-100:]))
    rec["train_seconds"], rec["seconds"] = train_s, time.perf_counter() - t0
    return rec


def run(out: str, *, variants=tuple(VARIANTS), seeds: int = 3, steps: int = 20_000, batch: int = 256,
        n_eval: int = 10_000, n_fig: int = 1000) -> list:  # fmt: skip
    """Every (variant, seed) run, resumable: a finished run's record is read back, one held by another
    process is left to it (and missing from the list)."""
    records = []
    for seed in range(seeds):
        for v in variants:
            path = run_path(out, PART, v, f"s{seed}")
            rec = load_record(path)
            if rec is None:
                with claim_run(path) as mine:
                    rec = load_record(path)  # finished while we waited for the claim
                    if rec is None and mine:
                        rec = run_one(v, seed, steps, batch, n_eval, n_fig)
                        save_record(path, rec)
                        print(f"{PART} {v} seed {seed}: W2^2 euler1 {rec['w2sq_euler1']:.3f} "
                              f"dopri5 {rec['w2sq_dopri5']:.3f} ({rec['seconds']:.0f} s)", flush=True)  # fmt: skip
            if rec is not None:
                records.append(rec)
    return records


def summarize(records: list) -> tuple[list, dict]:
    """Rows per variant (mean ± sd over seeds) and, per condition and sampler, the order that holds on
    every seed (None where the seeds disagree)."""
    rows, ranks = [], {}
    for v in VARIANTS:
        rs = [r for r in records if r["variant"] == v]
        if rs:
            ws = [r["cond_weight_mean"] for r in rs if r["cond_weight_mean"] is not None]
            rows.append({
                "variant": v, "seeds": len(rs),
                "euler1": spread(r["w2sq_euler1"] for r in rs), "dopri5": spread(r["w2sq_dopri5"] for r in rs),
                "nfe": spread(r["nfe_dopri5"] for r in rs), "weight": spread(ws) if ws else None,
            })  # fmt: skip
    for cond in CONDITIONS:
        names = [v for v in VARIANTS if VARIANTS[v][0] == cond]
        seeds = sorted({r["seed"] for r in records})
        per = {s: {r["variant"]: r for r in records if r["seed"] == s and r["variant"] in names} for s in seeds}
        per = [p for p in per.values() if len(p) == len(names)]
        if len(names) > 1 and per:
            for m in ("euler1", "dopri5"):
                ranks[(cond, m)] = ranking([{v: p[v][f"w2sq_{m}"] for v in names} for p in per], names)
    floor = {r["seed"]: r["w2sq_floor"] for r in records}
    if floor:
        rows.append({"variant": "floor", "seeds": len(floor), "euler1": spread(floor.values())})
    return rows, ranks


def markdown(rows: list, ranks: dict) -> str:
    head = ["condition", "coupling", "W2² Euler 1 step", "W2² dopri5", "dopri5 NFE", "cond weight", "seeds"]
    body = [
        [CONDITIONS[VARIANTS[r["variant"]][0]], LABELS[r["variant"]], fmt(r["euler1"], 3, " ± "),
         fmt(r["dopri5"], 3, " ± "), fmt(r["nfe"], 0, " ± "), fmt(r["weight"], 2, " ± "), r["seeds"]]
        for r in rows if r["variant"] != "floor"
    ]  # fmt: skip
    body += [["floor", "two draws of the target", fmt(r["euler1"], 3, " ± "), "", "", "", r["seeds"]]
             for r in rows if r["variant"] == "floor"]  # fmt: skip
    lines = []
    for (cond, m), rk in ranks.items():
        if rk["order"]:
            order = " < ".join(LABELS[v] for v in rk["order"])
        else:
            pairs = [k.split("<") for k, n in rk["below"].items() if n == rk["seeds"]]
            order = "no full order; on every seed: " + (
                "; ".join(f"{LABELS[a]} < {LABELS[b]}" for a, b in pairs) if pairs else "no pair either"
            )
        lines.append(f"- {CONDITIONS[cond]}, {'one Euler step' if m == 'euler1' else 'dopri5'}: {order}")
    return (
        "P3, 2-D (C2OT's Fig. 1): 8gaussians -> moons; squared 2-Wasserstein distance (C2OT's 'W2': exact, "
        "squared Euclidean cost) between generated samples and test points, mean ± sd over seeds; "
        "'cond weight': the mean weight the coupling used per batch; 'floor': W2² between two independent "
        "draws of the target of the evaluation's size (what a perfect model scores).\n\n"
        + markdown_table(head, body)
        + "\nOrder (lower W2² first) where it holds on every seed:\n\n"
        + ("\n".join(lines) or "- (fewer than two couplings of one condition)")
        + "\n"
    )


def write_outputs(records: list, out: str, tag: str = "") -> str:
    rows, ranks = summarize(records)
    cols = ["variant", "seed", "steps", "batch", "ot_batch", "n_eval", "w2sq_euler1", "w2sq_dopri5", "w2sq_floor",
            "nfe_dopri5",
            "cond_weight_mean", "loss_last", "train_seconds", "seconds"]  # fmt: skip
    write_csv(os.path.join(out, f"{PART}{tag}.csv"), records, cols)
    md = markdown(rows, ranks)
    write_text(os.path.join(out, f"{PART}{tag}.md"), md)
    from .figures import p3_2d_figure

    p3_2d_figure(records, rows, os.path.join(out, f"{PART}{tag}.png"), VARIANTS, LABELS, CONDITIONS)
    return md
