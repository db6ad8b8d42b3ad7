"""P1-P4, the parts that train a flow model (a small UNet) on images and measure its samples.

- P1: MNIST 14x14, every coupling of ``P1_VARIANTS`` with the same budget, ``--seeds`` seeds;
- P2: one reflow round from the LOOM and the minibatch-OT models (needs ``loom_kernels.reflow``);
- P3: class-conditional MNIST-14 with classifier-free guidance: minibatch OT with ``labels=`` (pairs
  only within a class) vs plain minibatch OT vs independent;
- P4: the animal silhouettes (28x28), one seed: minibatch OT, LOOM 4 caches, semidiscrete.

Each run trains through ``loom_kernels.train.train`` with a checkpoint in ``OUT/PART/ckpt/RUN/`` (so an
interrupted run resumes there) and writes ``OUT/PART/runs/RUN.json`` when measured.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from .runs import claim_run, load_record, markdown_table, run_path, save_record, write_csv, write_text

P1_VARIANTS = ("independent", "ot", "fixed", "loom1", "loom4", "converged", "sinkhorn", "semidiscrete")
P2_VARIANTS = ("reflow_loom4", "reflow_ot")
P3_VARIANTS = ("ot_labels", "ot", "independent")
P4_VARIANTS = ("ot", "loom4", "semidiscrete")
LABELS = {
    "independent": "independent",
    "ot": "minibatch OT",
    "fixed": "fixed noise",
    "loom1": "LOOM 1 cache",
    "loom4": "LOOM 4 caches",
    "converged": "LOOM pre-converged",
    "sinkhorn": "Sinkhorn (eps 0.05 rel.)",
    "semidiscrete": "semidiscrete",
    "ot_labels": "minibatch OT, labels=",
    "reflow_loom4": "reflow of LOOM 4",
    "reflow_ot": "reflow of minibatch OT",
}

FULL = dict(size=14, steps=6000, batch_size=128, lr=2e-3, channels=24, n_train=None, n_test=None,
            n_eval=5000, n_w2=1000, n_mem=1000, cls_steps=2000, ckpt_every=500, guidance=2.0, dopri5=True,
            sd_fit_steps=None, reflow_nfe=16, n_pairs=None, dopri5_tol=1e-5, p4_size=None)  # fmt: skip
# What two CPU cores can run in the issue's ~4 hours (FULL: ~13 core-hours at 0.11-0.22 s per step): a
# sixth of the steps (1,000: 2.6 epochs of MNIST, an undertrained model compared at equal budget), a
# fifth of the samples, a looser adaptive reference, 10,000 reflow pairs at midpoint NFE 8, and the
# silhouettes at 14x14 (28x28 costs 4x per step); the semidiscrete potential fitted for 5,000 steps.
# Everything else (data, model, schedule, seeds) is FULL's.
REDUCED = dict(FULL, steps=1000, n_eval=1000, n_w2=500, n_mem=500, ckpt_every=250, dopri5_tol=1e-3,
               n_pairs=10_000, reflow_nfe=8, p4_size=14, sd_fit_steps=5000)  # fmt: skip
TINY = dict(size=14, steps=4, batch_size=16, lr=2e-3, channels=8, n_train=256, n_test=128,
            n_eval=64, n_w2=32, n_mem=32, cls_steps=20, ckpt_every=2, guidance=2.0, dopri5=False,
            sd_fit_steps=20, reflow_nfe=2, n_pairs=None, dopri5_tol=1e-5, p4_size=14)  # fmt: skip
PROTOCOLS = {"full": FULL, "reduced": REDUCED}


def settings(part: str, args) -> dict:
    s = dict(TINY if args.tiny else PROTOCOLS[args.protocol])
    if part == "p4":
        s["size"] = s["p4_size"]  # None: the silhouettes at their 28x28 (P4 is one seed)
    for key, flag in (("steps", "steps"), ("batch_size", "batch_size"), ("n_eval", "n_eval")):
        if getattr(args, flag) is not None:
            s[key] = getattr(args, flag)
    return s


def make_coupling_for(variant: str, n: int, shape, seed: int, x, fit_steps=None):
    """The coupling of a training variant, or a string saying why it is not available here."""
    from ...couplings import SinkhornCoupling
    from ...couplings.factory import make_coupling

    if variant in ("independent", "ot", "fixed", "ot_labels"):
        return make_coupling("ot" if variant == "ot_labels" else variant, n, shape, seed=seed)
    if variant == "sinkhorn":
        return SinkhornCoupling(0.05, generator=torch.Generator().manual_seed(seed + 777))
    if variant.startswith("loom") or variant == "converged":
        return make_coupling("loom", n, shape, num_caches=1 if variant == "converged" else int(variant[4:]), seed=seed)
    if variant.startswith("reflow_"):
        return make_coupling("reflow", pairs=x)  # x: the pairs folder (run_one's P2 branch)
    if variant == "semidiscrete":
        from .p0 import make

        return make("semidiscrete_fresh", n, shape, seed, x, fit_steps)
    return f"unknown variant {variant!r}"


def _data(part: str, args, s: dict):
    from .data import load_images

    name = args.data or ("animals" if part == "p4" else "mnist")
    x_tr, y_tr = load_images(name, "train", size=s["size"], n=s["n_train"], seed=0)
    x_te, y_te = load_images(name, "test", size=s["size"], n=s["n_test"], seed=0)
    return name, x_tr, y_tr, x_te, y_te


def run_one(part: str, variant: str, seed: int, s: dict, data, clf, out: str) -> dict:
    """Trains (resuming from its checkpoint) and evaluates one (part, variant, seed)."""
    from ...data import IndexedDataset, LabeledDataset
    from ...models import UNet
    from ...noise import gaussian_noise
    from ...train import TrainConfig, train
    from .evaluate import evaluate

    name, x_tr, y_tr, x_te, y_te = data
    n, shape = len(x_tr), tuple(x_tr.shape[1:])
    rec = {"part": part, "data": name, "variant": variant, "seed": seed, "n_train": n, **s}
    ds = None
    if part == "p2":  # train on the teacher's pairs (noise seed -> its ODE solution), as many as the data
        pairs, why = reflow_pairs(variant, seed, s, n, out)
        if pairs is None:
            return {**rec, "skipped": why}
        from ...reflow import pairs_dataset

        rec["pairs"], ds = pairs, pairs_dataset(pairs)
    coupling = make_coupling_for(variant, n, shape, seed, rec.get("pairs", x_tr), s["sd_fit_steps"])
    if isinstance(coupling, str):
        return {**rec, "skipped": coupling}
    conditional = part == "p3"
    t0 = time.perf_counter()
    if variant == "converged":
        from ..variants import converge

        rec["converge_curve"] = converge(coupling, x_tr, s["batch_size"], seed)
    rec["converge_seconds"] = time.perf_counter() - t0
    torch.manual_seed(seed)  # the same initial weights for every variant of a seed
    model = UNet(shape, channels=s["channels"], channel_mult=(1, 2), num_classes=10 if conditional else None)
    rec["params"] = sum(p.numel() for p in model.parameters())
    ckpt = os.path.join(out, part, "ckpt", f"{variant}_seed{seed}")
    cfg = TrainConfig(
        steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], warmup=min(200, s["steps"] // 10),
        ema_decay=0.999, seed=seed, device="cpu", out_dir=ckpt, resume=True, ckpt_every=s["ckpt_every"],
        log_every=max(1, s["steps"] // 200), progress=True, label_dropout=0.1 if conditional else 0.0,
    )  # fmt: skip
    ds = ds or (LabeledDataset(x_tr, y_tr) if conditional else IndexedDataset(x_tr))
    t1 = time.perf_counter()
    arm = _ignore_labels(coupling) if conditional and variant != "ot_labels" else coupling
    res = train(model, ds, arm, cfg, metadata={"model": model.spec})
    rec["train_seconds"] = time.perf_counter() - t1
    hist = res.history
    rec["final_loss"] = float(np.mean([h["loss"] for h in hist[-max(1, len(hist) // 10) :]])) if hist else None
    x0_train = None
    if getattr(coupling, "seeds", None) is not None and coupling.seeds.dim() == 2:  # a seed table (N, K)
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: s["n_mem"]]
        x0_train = gaussian_noise(coupling.seeds[rows, 0], shape)
    cond = None
    if conditional:
        cond = (torch.arange(s["n_eval"]) % 10, s["guidance"])
    t2 = time.perf_counter()
    metrics, samples = evaluate(res.ema.eval(), clf, x_tr, x_te, y_te, s, seed, x0_train=x0_train, cond=cond)
    rec.update(metrics)
    rec["eval_seconds"] = time.perf_counter() - t2
    torch.save({k: v.half() for k, v in samples.items()}, os.path.join(ckpt, "samples.pt"))
    return rec


def reflow_pairs(variant: str, seed: int, s: dict, n: int, out: str):
    """The pairs folder of P2's ``variant`` ('reflow_loom4': from P1's LOOM 4 model of this seed), generated
    (resumably) with the teacher's midpoint NFE ``s['reflow_nfe']``: ``(folder, None)``, or ``(None, why)``."""
    src = variant[len("reflow_") :]
    model = os.path.join(out, "p1", "ckpt", f"{src}_seed{seed}", "model.pt")
    if not os.path.exists(model) or load_record(run_path(out, "p1", src, f"seed{seed}")) is None:
        return None, f"not available: P1's {src} run of seed {seed} is not finished (run p1 first)"
    from ...checkpoint import load_model
    from ...models import UNet
    from ...reflow import generate_pairs

    shape = (1, s["size"], s["size"]) if s["size"] else (1, 28, 28)
    teacher = load_model(model, model=UNet(shape, channels=s["channels"], channel_mult=(1, 2))).eval()
    folder = os.path.join(out, "p2", "pairs", f"{src}_seed{seed}")
    num = min(n, s["n_pairs"] or n)
    generate_pairs(teacher, num, "midpoint", s["reflow_nfe"], folder, seed=10_000 + seed, shape=shape, progress=True)
    return folder, None


def _ignore_labels(inner):
    """P3's arms without ``labels=``: the model sees the labels, the coupling pairs across classes."""
    from ...couplings.base import Coupling

    class IgnoreLabels(Coupling):
        stats = property(lambda self: inner.stats)

        def __call__(self, x1, indices=None, *, x0=None, labels=None):  # noqa: ARG002 - labels: the model's only
            return inner(x1, indices, x0=x0)

        def state_dict(self):
            return inner.state_dict()

        def load_state_dict(self, state):
            inner.load_state_dict(state)

    return IgnoreLabels()


def main(part: str, args) -> list:
    """Runs ``part`` (resuming), writes its CSV / Markdown / figure into ``args.out``; returns the records."""
    from .evaluate import accuracy, classifier, floor

    if part == "p2":
        try:
            import loom_kernels.reflow  # noqa: F401
        except ImportError:
            msg = "P2 not available: loom_kernels.reflow (the reflow pairs of issue 31) is not in this checkout"
            print(msg)
            write_text(os.path.join(args.out, f"p2{args.tag}.md"), msg + "\n")
            return []
    s = settings(part, args)
    default = {"p1": P1_VARIANTS, "p2": P2_VARIANTS, "p3": P3_VARIANTS, "p4": P4_VARIANTS}[part]
    variants = args.variants or (
        ("independent", "ot", "loom4", "semidiscrete") if args.tiny and part == "p1" else default
    )
    bad = [v for v in variants if v not in LABELS]
    if bad:
        raise SystemExit(f"--variants for {part} must be among {tuple(LABELS)}, got {bad}")
    seeds = 1 if part == "p4" else args.seeds
    data = _data(part, args, s)
    name, x_tr, y_tr, x_te, y_te = data
    if y_tr is None:
        raise SystemExit(f"{part} needs labels (FD-LeNet, coverage): data {name!r} has none")
    clf, info = classifier(x_tr, y_tr, os.path.join(args.out, part, "classifier.pt"), steps=s["cls_steps"])
    base = {"classifier_test_accuracy": accuracy(clf, x_te, y_te), **floor(clf, x_tr, x_te, s["n_eval"], s["n_w2"], 0)}
    print(f"{part}: LeNet test accuracy {base['classifier_test_accuracy']:.3f}, floor FD {base['fd']:.3f}", flush=True)
    records = []
    for seed in range(seeds):
        for v in variants:
            path = run_path(args.out, part, v, f"seed{seed}")
            rec = load_record(path)
            if rec is None:
                with claim_run(path) as mine:  # two processes on one --out share the runs
                    rec = load_record(path)  # finished by the other process meanwhile
                    if rec is None and not mine:
                        rec = {"variant": v, "seed": seed, "skipped": "running in another process"}
                    elif rec is None:
                        rec = run_one(part, v, seed, s, data, clf, args.out)
                        if "skipped" not in rec:  # a coupling missing now runs once it lands
                            save_record(path, rec)
                print(f"{part} {v} seed {seed}: {_brief(rec)}", flush=True)
            records.append(rec)
    write_outputs(part, records, base, args.out, args.tag)
    return records


def _brief(rec: dict) -> str:
    if "skipped" in rec:
        return rec["skipped"]
    fd = rec["fd"]["euler1"]
    return f"FD-LeNet euler1 {fd:.2f}, train {rec['train_seconds']:.0f} s, eval {rec['eval_seconds']:.0f} s"


def seed_chain(rk: dict, per_seed: list) -> str:
    """The couplings in mean order joined by ``<`` where the next is worse on every seed, else ``~``."""
    names = sorted(rk["orders"][0], key=lambda v: sum(s[v] for s in per_seed))
    out = LABELS[names[0]]
    for a, b in zip(names, names[1:]):
        out += (" < " if rk["below"][f"{a}<{b}"] == rk["seeds"] else " ~ ") + LABELS[b]
    return out


def write_outputs(part: str, records: list, base: dict, out: str, tag: str = "") -> str:
    from ..common import COLUMNS, column_label, ranking, spread

    done = [r for r in records if "skipped" not in r]
    cols = [c for c in COLUMNS if done and c in done[0]["fd"]]
    rows = []
    for r in done:
        row = {k: r[k] for k in ("variant", "seed", "steps", "batch_size", "train_seconds", "eval_seconds")}
        row.update({f"fd_{c}": r["fd"][c] for c in cols} | {f"w2_{c}": r["w2"][c] for c in cols})
        row.update({k: r.get(k) for k in ("straightness", "nn_dist_fresh", "nn_dist_train_noise", "nn_dist_test")})
        row["min_share_euler8"] = r["coverage"].get("euler8", {}).get("min_share_x_classes")
        rows.append(row)
    write_csv(os.path.join(out, f"{part}{tag}.csv"), rows)
    variants = list(dict.fromkeys(r["variant"] for r in done))
    by = {v: [r for r in done if r["variant"] == v] for v in variants}
    fmt = lambda vals, d=2: "-" if not vals else (lambda sp: f"{sp['mean']:.{d}f} ± {sp['sd']:.{d}f}")(spread(vals))  # noqa: E731
    head = ["coupling", "seeds"] + [f"FD-LeNet {column_label(c)}" for c in cols] + ["W2 Euler NFE 1", "straightness"]
    head += ["NN dist. fresh noise", "NN dist. training noise", "min class share x10 (Euler 8)"]
    conditional = any(r.get("label_agreement") for r in done)
    if conditional:
        head.append("label agreement (Euler 8)")
    body = []
    for v in variants:
        rs = by[v]
        body.append(
            [LABELS[v], len(rs)] + [fmt([r["fd"][c] for r in rs]) for c in cols]
            + [fmt([r["w2"]["euler1"] for r in rs]), fmt([r["straightness"] for r in rs if "straightness" in r], 3)]
            + [fmt([r["nn_dist_fresh"] for r in rs])]
            + [fmt([r["nn_dist_train_noise"] for r in rs if "nn_dist_train_noise" in r])]
            + [fmt([r["coverage"]["euler8"]["min_share_x_classes"] for r in rs if "euler8" in r["coverage"]])]
        )  # fmt: skip
        if conditional:
            body[-1].append(fmt([r["label_agreement"]["euler8"] for r in rs if r.get("label_agreement")], 3))
    skipped = {r["variant"]: r["skipped"] for r in records if "skipped" in r and r["variant"] not in by}
    md = (
        f"{part}: mean ± sd over seeds; floor FD-LeNet(train vs test) {base['fd']:.3f}, W2 floor {base['w2']:.3f}, "
        f"LeNet test accuracy {base['classifier_test_accuracy']:.3f}; NN dist.: a sample's pixel distance to its "
        f"nearest training image (held-out images: {fmt([r['nn_dist_test'] for r in done])})\n\n"
        + markdown_table(head, body)
    )
    seeds = {r["seed"] for r in done}
    full = [v for v in variants if {r["seed"] for r in by[v]} == seeds]
    if len(seeds) > 1 and len(full) > 1:
        md += f"\nFD-LeNet, couplings by mean (best first); `<`: lower on all {len(seeds)} seeds, `~`: not on all\n\n"
        for c in cols:
            per_seed = [{v: next(r["fd"][c] for r in by[v] if r["seed"] == k) for v in full} for k in sorted(seeds)]
            md += f"- {column_label(c)}: {seed_chain(ranking(per_seed, names=full), per_seed)}\n"
    for v, why in skipped.items():
        md += f"\n{LABELS[v]}: {why}\n"
    write_text(os.path.join(out, f"{part}{tag}.md"), md)
    if done:
        from .figures import training_figure

        training_figure(part, done, base, cols, os.path.join(out, f"{part}{tag}.png"), LABELS)
    print(md)
    return md
