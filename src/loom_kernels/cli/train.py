"""``python -m loom_kernels.train``: the training command line (the library is :mod:`loom_kernels.train`)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..cost import METRICS
from ..couplings.factory import COUPLINGS, make_coupling
from ..train import (
    CHECKPOINT,
    LOG,
    MODEL,
    NONFINITE,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    dist_info,
    resolve_device,
    train,
)
from . import _resume
from ._errors import CliError, HelpFormatter, add_debug, entry, option


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.train",
        description="Train a flow-matching velocity field with an independent, minibatch-OT or LOOM coupling. "
        "Writes DIR/checkpoint.pt (resume), DIR/model.pt (EMA weights, for "
        "`python -m loom_kernels.sample`) and DIR/log.csv. Runs under torchrun (DDP).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--data",
        default=None,
        help="8gaussians, moons, checkerboard, digits, PATH.npy (N, *shape) or "
        "PATH.npz with x (N, *shape) and optional integer labels y (N,); not with --coupling reflow",
    )
    p.add_argument(
        "--coupling",
        required=True,
        choices=COUPLINGS,
        help="fixed: fixed noise per item, never reassigned (the ablation)",
    )
    p.add_argument("--knn-k", type=int, default=16, help="knn: noise candidates per item")
    p.add_argument(
        "--knn-noise",
        default="randn",
        choices=("randn", "seeds"),
        help="knn: candidates from torch.randn, or from int64 seeds (gaussian_noise; the fused CPU pass)",
    )
    p.add_argument("--sd-epsilon", type=float, default=0.0, help="semidiscrete: entropic epsilon (0: hard cells)")
    p.add_argument(
        "--sd-fit-steps", type=int, default=20_000, help="semidiscrete: potential ascent steps before training, at most"
    )
    p.add_argument(
        "--sd-fit-tol", type=float, default=0.05, help="semidiscrete: stop the fit at this RMS cell-mass deviation"
    )
    p.add_argument("--sd-fit-batch", type=int, default=256, help="semidiscrete: noises per ascent step")
    p.add_argument("--sd-refresh-every", type=int, default=1, help="semidiscrete-seeded: epochs between table refills")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps (global)")
    p.add_argument("--batch-size", type=int, default=256, help="items per process per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (after the warm-up)")
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (<= 0 disables)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weights' moving average (model.pt)")
    p.add_argument("--sigma", type=float, default=0.0, help="std of the noise added to x_t")
    p.add_argument("--num-caches", "--caches", type=int, default=1, help="LOOM noise caches per data point")
    p.add_argument(
        "--metric",
        default="sqeuclidean",
        choices=METRICS,
        help="pair cost of the coupling (the LOOM-CFM code uses euclidean)",
    )
    p.add_argument("--flip", action="store_true", help="horizontal-flip augmentation (item i + N is item i flipped)")
    p.add_argument("--model", default="mlp", choices=("mlp", "unet"), help="velocity network")
    p.add_argument("--channels", type=int, default=64, help="UNet width of its first level")
    p.add_argument("--channel-mult", default="1,2", help="UNet width multipliers per level")
    p.add_argument("--conditional", action="store_true", help="class-conditional model (data with labels)")
    p.add_argument(
        "--label-dropout", type=float, default=0.1, help="with --conditional: labels dropped to the null label"
    )
    p.add_argument("--schedule", default="constant", choices=SCHEDULES, help="LR schedule after the warm-up")
    p.add_argument("--nonfinite", default="stop", choices=NONFINITE, help="what a NaN/inf loss does")
    p.add_argument(
        "--points",
        type=int,
        default=None,
        help="points drawn of a 2-D set (None: 4096) / rows kept of a file (None: all)",
    )
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction of digits / .npy data")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, weights, noise and times")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast dtype (CUDA only)")
    p.add_argument("--log-every", type=int, default=10, help="steps between rows of DIR/log.csv")
    p.add_argument("--ckpt-every", type=int, default=1000, help="0: only at the end")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        choices=("auto", "must"),
        help="continue from DIR/checkpoint.pt; with none there, 'auto' (plain --resume) starts a new run and says "
        "so, 'must' stops with an error",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--pairs", default=None, metavar="DIR", help="--coupling reflow: the pairs folder (its targets are the data)"
    )
    p.add_argument(
        "--t-dist",
        default="uniform",
        help="timesteps: uniform, beta(a,b), u_shaped or logit_normal(m,s) (loom_kernels.timesteps)",
    )
    p.add_argument("--init-from", default=None, metavar="PATH", help="start from this run's model.pt / checkpoint.pt")
    p.add_argument("--init-weights", default="ema", choices=("ema", "raw"), help="with --init-from: which weights")
    p.add_argument("--init-optimizer", action="store_true", help="with --init-from (a checkpoint.pt): its Adam moments")
    add_debug(p)
    return p


def _dataset(args, data_mod):
    """The training set of the CLI arguments (labelled with --conditional, flipped with --flip), and its classes."""
    if args.coupling == "reflow" or args.pairs is not None:
        if args.coupling != "reflow" or args.pairs is None or args.data is not None or args.flip:
            raise SystemExit("--pairs DIR goes with --coupling reflow (and replaces --data; no --flip)")
        from ..reflow import pairs_dataset

        ds = pairs_dataset(args.pairs)
        args.conditional = hasattr(ds, "labels")
        return ds, (ds.num_classes if args.conditional else None)
    if args.data is None:
        raise SystemExit("--data is required (or --coupling reflow --pairs DIR)")
    with option("--data", args.data):
        x, y = data_mod.load_labeled(args.data, "train", n=args.points, seed=args.seed, holdout=args.holdout)
    if args.conditional and y is None:
        raise SystemExit(f"--conditional needs labels: {args.data!r} has none (a .npz with 'y', or digits)")
    ds = data_mod.LabeledDataset(x, y) if args.conditional else data_mod.IndexedDataset(x)
    if args.flip:
        if x.ndim < 3:
            raise SystemExit(f"--flip needs images (N, C, H, W), got data of shape {tuple(x.shape)}")
        ds = data_mod.FlipDataset(ds)
    return ds, (ds.num_classes if args.conditional else None)


def _model(args, shape, num_classes):
    from ..models import MLPVelocity, UNet

    if args.model == "unet":
        if len(shape) != 3:
            raise SystemExit(f"--model unet needs images (C, H, W), got items of shape {shape}")
        try:
            mult = tuple(int(m) for m in args.channel_mult.split(","))
        except ValueError:
            raise CliError(
                f"--channel-mult must be integers separated by commas, e.g. 1,2,2, got {args.channel_mult!r}"
            ) from None
        with option("--model unet"):
            return UNet(shape, channels=args.channels, channel_mult=mult, num_classes=num_classes)
    if num_classes:
        raise SystemExit("--conditional needs --model unet (the MLP takes no labels)")
    with option("--model mlp"):
        return MLPVelocity(shape, hidden=args.hidden, depth=args.depth)


def _new_coupling_args(args, dataset) -> dict:
    """data/labels/options of the semidiscrete and knn couplings (nothing for the others)."""
    if args.coupling == "knn":
        return {"options": {"k": args.knn_k, "noise": args.knn_noise}}
    if not args.coupling.startswith("semidiscrete"):
        return {}
    if args.flip:
        raise SystemExit("--flip is not supported with the semidiscrete couplings (their cells are the stored items)")
    resuming = args.resume and os.path.exists(os.path.join(args.out, CHECKPOINT))
    opts = {
        "epsilon": args.sd_epsilon,
        "fit_steps": 0 if resuming else args.sd_fit_steps,  # a resumed run loads the fitted potential
        "fit_tol": args.sd_fit_tol,
        "fit_batch": args.sd_fit_batch,
        "refresh_every": args.sd_refresh_every,
        "progress": not args.no_progress,
    }
    return {"data": dataset.data, "labels": getattr(dataset, "labels", None), "options": opts}


@entry("python -m loom_kernels.train")
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .. import data as data_mod

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = str(resolve_device(args.device if not distributed or not use_cuda else "cuda", prefer_cuda=True))
    try:
        dataset, n_classes = _dataset(args, data_mod)
        world = torch.distributed.get_world_size() if distributed else 1
        if len(dataset) < world * args.batch_size:
            raise CliError(
                f"--batch-size {args.batch_size}: the training set has {len(dataset)} items, fewer than one global "
                f"batch ({args.batch_size} x {world} processes); lower --batch-size, or give more data (--points)"
            )
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = _model(args, dataset.shape, n_classes)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=args.warmup,
            schedule=args.schedule,
            grad_clip=args.grad_clip if args.grad_clip > 0 else None,
            ema_decay=args.ema_decay,
            sigma=args.sigma,
            seed=args.seed,
            precision=args.precision,
            label_dropout=args.label_dropout if n_classes else 0.0,
            nonfinite=args.nonfinite,
            device=device,
            out_dir=args.out,
            resume=args.resume is not None,
            log_every=args.log_every,
            ckpt_every=args.ckpt_every if args.ckpt_every < args.steps else 0,
            progress=not args.no_progress,
            t_dist=args.t_dist,
            init_from=args.init_from,
            init_weights=args.init_weights,
            init_optimizer=args.init_optimizer,
        )
        coupling = make_coupling(
            args.coupling,
            len(dataset),
            dataset.shape,
            num_caches=args.num_caches,
            seed=args.seed,
            device=device,
            metric=args.metric,
            process_group=torch.distributed.group.WORLD if distributed else None,
            pairs=args.pairs,
            **_new_coupling_args(args, dataset),
        )
        meta = {
            "model": model.spec,
            "data": args.data,
            "n": args.points,
            "holdout": args.holdout,
            "seed": args.seed,
            "coupling": args.coupling,
            "num_caches": args.num_caches,
            "flip": args.flip,
            "metric": args.metric,
            "pairs": args.pairs,
            "t_dist": args.t_dist,
        }
        ckpt = os.path.join(args.out, CHECKPOINT)
        if args.resume is None:
            _resume.refuse_overwrite(ckpt)
        else:
            cfg.resume = _resume.check(args, ckpt, meta, vars(cfg))
        res = train(model, dataset, coupling, cfg, metadata=meta)
        if dist_info()[0] == 0:
            last = res.history[-1] if res.history else {}
            print(
                f"trained {res.step} steps on {args.data or args.pairs} ({len(dataset)} items) with the "
                f"{args.coupling} coupling; final loss {last.get('loss', float('nan')):.4f}; wrote "
                f"{os.path.join(args.out, MODEL)} (EMA), {CHECKPOINT}, {LOG}"
            )
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
