"""``python -m loom_kernels.reflow generate``: reflow pairs from a trained model (``generate_pairs``)."""

from __future__ import annotations

import argparse

import numpy as np

from .generate import METHODS, generate_pairs
from .store import DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loom_kernels.reflow", description="Reflow pairs stored as noise seeds.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        help="sample N pairs from a model into a pairs folder (rerun the same command to resume)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("--model", required=True, help="model.pt or checkpoint.pt of a run (its EMA weights)")
    g.add_argument("--num", type=int, required=True, help="pairs to generate")
    g.add_argument("--method", default="euler", choices=METHODS)
    g.add_argument("--nfe", type=int, default=None, help="model evaluations per sample (fixed-step methods)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (conditional models)")
    g.add_argument(
        "--labels", default=None, help="conditional models: 'balanced' (class i %% C) or PATH.npy of (N,) integers"
    )
    g.add_argument("--out", required=True, metavar="DIR", help="the pairs folder")
    g.add_argument("--seed", type=int, default=0, help="the noise seeds are derived from it (all distinct)")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="how targets are stored")
    g.add_argument("--batch-size", type=int, default=256, help="pairs per sampler call (and per committed block)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--durability", default="crash", choices=("crash", "power"), help="power: fsync each batch (power loss)"
    )
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    labels = args.labels
    if labels is not None and labels != "balanced":
        try:
            labels = np.load(labels, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--labels {args.labels!r}: not 'balanced' nor a readable .npy file ({exc})") from None
    try:
        pf = generate_pairs(
            args.model,
            args.num,
            args.method,
            args.nfe,
            args.out,
            guidance=args.guidance,
            labels=labels,
            seed=args.seed,
            dtype=args.dtype,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
            durability=args.durability,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {pf.count} pairs to {pf.path} ({pf.dtype.name} targets of shape {pf.shape} + int64 seeds)")
    return 0
