"""``python -m loom_kernels.experiments.images PART [options]``: the image experiments, resumable per run.

Parts: ``p0`` (the coupling alone), ``p1`` (training on MNIST-14), ``p2`` (reflow), ``p3_2d`` (C2OT's 2-D
figure: 8gaussians -> moons, conditional), ``p3`` (conditional), ``p4`` (animal silhouettes), ``all``.
``--tiny`` shrinks everything to a smoke run (< 60 s on 2 cores); ``--data`` replaces the data set by a
user's (.npy/.npz/.pkl.gz, an image folder). Every run writes ``OUT/PART/runs/*.json`` atomically; a rerun
skips finished runs, and an interrupted training run resumes from its checkpoint in ``OUT/PART/ckpt/``.
"""

from __future__ import annotations

import argparse
import sys
import time

PARTS = ("p0", "p1", "p2", "p3_2d", "p3", "p4")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.experiments.images",
        description="Couplings on real images (MNIST, animal silhouettes): P0 coupling cost vs the exact optimum, "
        "P1 training and sample quality, P2 reflow, P3_2D C2OT's 8gaussians -> moons figure, P3 conditional, "
        "P4 a second data set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("part", choices=PARTS + ("all",))
    p.add_argument("--out", default="loom_images", help="output folder (runs, tables, figures)")
    p.add_argument("--tiny", action="store_true", help="a smoke run: tiny sizes, seconds")
    p.add_argument(
        "--protocol", choices=("full", "reduced"), default="full",
        help="P1-P4's sizes: the issue's (6,000 steps, 5,000 samples) or what 2 CPU cores run in ~4 h "
        "(1,000 steps, 1,000 samples; docs/evidence.md says what else)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--data", default=None, help="a user's images instead of MNIST (.npy/.npz/.pkl.gz or a folder)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="P0: data sizes N (default 4096 10000)")
    p.add_argument("--epochs", type=int, default=None, help="P0: epochs per run (default 30)")
    p.add_argument("--variants", nargs="+", default=None, help="the couplings to run (default: the part's set)")
    p.add_argument("--steps", type=int, default=None, help="P1-P4: optimizer steps per run (default 6000; p3_2d 20000)")
    p.add_argument("--batch-size", type=int, default=None, help="P1-P4: minibatch size (default 128; p3_2d 256)")
    p.add_argument(
        "--n-eval", type=int, default=None,
        help="P1-P4: generated samples per evaluation (default 5000; p3_2d 10000)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--tag", default="", help="suffix of the table/figure names (e.g. _reduced)")
    return p


def _positive(args) -> None:
    for k in ("seeds", "epochs", "steps", "batch_size", "n_eval", "threads"):
        v = getattr(args, k)
        if v is not None and v <= 0:
            raise SystemExit(f"--{k.replace('_', '-')} must be positive, got {v}")
    for v in args.n or ():
        if v <= 1:
            raise SystemExit(f"--n must be > 1, got {v}")


def run_p0(args) -> None:
    from . import p0
    from .data import load_images

    ns = args.n or ([64] if args.tiny else [4096, 10_000])
    epochs = args.epochs or (2 if args.tiny else 30)
    variants = args.variants or (
        ("independent", "ot32", "loom1", "loom4", "semidiscrete_fresh") if args.tiny else p0.VARIANTS
    )
    bad = [v for v in variants if v not in p0.VARIANTS]
    if bad:
        raise SystemExit(f"--variants for p0 must be among {p0.VARIANTS}, got {bad}")
    size = 14 if args.tiny and args.data is None else None
    records = []
    for n in ns:
        t0 = time.perf_counter()
        x, _ = load_images(args.data or "mnist", "train", size=size, n=n, seed=0)
        if len(x) < n:
            raise SystemExit(f"--n {n} is more than the {len(x)} training images of {args.data or 'mnist'}")
        fit = 20 if args.tiny else None  # the semidiscrete potential's fit steps (None: its default)
        records += p0.run(x, args.out, variants=variants, seeds=args.seeds, epochs=epochs, fit_steps=fit)
        print(f"P0 N={n}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(p0.write_outputs(records, args.out, args.tag))


def run_p3_2d(args) -> None:
    """C2OT's 2-D figure at C2OT's sizes (20,000 steps, W2 on 10,000 samples), or with ``--protocol reduced``
    3,000 steps and 3,000 samples (the exact W2 grows ~cubically); docs/evidence.md's run: ``--steps 1500``,
    27 runs in 40 min on a shared 2-core CPU."""
    from . import p3_2d

    variants = args.variants or tuple(p3_2d.VARIANTS)
    bad = [v for v in variants if v not in p3_2d.VARIANTS]
    if bad:
        raise SystemExit(f"--variants for p3_2d must be among {tuple(p3_2d.VARIANTS)}, got {bad}")
    size = {"steps": 20_000, "n_eval": 10_000} if args.protocol == "full" else {"steps": 3000, "n_eval": 3000}
    if args.tiny:
        variants = args.variants or ("unc_fm", "cls_labels", "x_adaptive", "x_rsearch")
        size = {"steps": 16, "batch": 32, "n_eval": 96, "n_fig": 32}
    records = p3_2d.run(
        args.out,
        variants=variants,
        seeds=args.seeds,
        steps=args.steps or size["steps"],
        batch=args.batch_size or size.get("batch", 256),
        n_eval=args.n_eval or size["n_eval"],
        n_fig=size.get("n_fig", 1000),
    )
    print(p3_2d.write_outputs(records, args.out, args.tag))


def run_training_part(part: str, args) -> None:
    from . import train_parts

    train_parts.main(part, args)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _positive(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    parts = PARTS if args.part == "all" else (args.part,)
    for part in parts:
        t0 = time.perf_counter()
        if part == "p0":
            run_p0(args)
        elif part == "p3_2d":
            run_p3_2d(args)
        else:
            run_training_part(part, args)
        print(f"{part}: wall time {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
