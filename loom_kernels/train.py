"""A thin flow-matching trainer with exact resume, DDP and any coupling; also ``python -m loom_kernels.train``.

Objective: conditional flow matching / rectified flow (Lipman et al., 2023; Liu et al., 2023):
``x_t = (1 - t) x0 + t x1`` with ``t ~ U[0, 1]``, regress ``model(x_t, t)`` on ``x1 - x0``. The pairs
``(x0, x1)`` come from a coupling: independent, minibatch OT (Tong et al., 2023; Pooladian et al., 2023)
or LOOM-CFM (Davtyan et al., ICLR 2025), all called as ``coupling(x1, indices=indices)``.

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)``; the checkpoint keeps
the epoch and the position inside it (the LOOM reference code restarted its epoch counter on resume,
which made its periodic resampling wipe the learned assignment), every RNG state of every rank, the
model, the EMA, the optimizer, the scheduler, the grad scaler and the coupling state. The model kept
for sampling is the EMA (the reference code saved the raw weights).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_write
from .checkpoint import _rng_state, _set_rng_state, atomic_save, load_checkpoint, save_model
from .checkpoint import load_model  # noqa: F401  (re-exported: its old import path)
from .data import IndexedDataset

CHECKPOINT = "checkpoint.pt"  # everything needed to resume
MODEL = "model.pt"  # the EMA weights and metadata, for sampling
LOG = "log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "pre_cost", "post_cost", "swaps", "lr")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Training settings. ``batch_size`` is per process; the global batch is ``world_size * batch_size``.

    Attributes:
        steps: optimizer steps in total (the global step; a resumed run stops at the same step).
        batch_size: items per process per step.
        lr: Adam learning rate after the linear warm-up of ``warmup`` steps.
        grad_clip: max gradient norm, or None to skip clipping.
        ema_decay: EMA decay of the parameters (ramped up as ``min(decay, (1+s)/(10+s))``).
        sigma: std of the Gaussian added to ``x_t`` (the LOOM code uses 1e-7; 0 disables).
        seed: seeds the data order, the global RNGs of a fresh run (offset by rank).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast (CUDA only; fp16 uses a grad scaler).
        device: where to train; default CUDA (the current device) when available, else CPU.
        out_dir: where ``checkpoint.pt``, ``model.pt`` and ``log.csv`` go; None keeps everything in memory.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        log_every: steps between logged rows (history and CSV).
        ckpt_every: steps between checkpoints (0: only at the end); needs ``out_dir``.
        progress: show a tqdm bar (rank 0 only).
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    sigma: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    device: str | None = None
    out_dir: str | None = None
    resume: bool = False
    log_every: int = 10
    ckpt_every: int = 0
    progress: bool = True

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")

        _int("steps", 1)
        _int("batch_size", 1)
        _int("warmup", 0)
        _int("log_every", 1)
        _int("ckpt_every", 0)
        _int("seed", 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not self.sigma >= 0:
            raise ValueError(f"TrainConfig.sigma must be >= 0, got {self.sigma!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.ckpt_every and self.out_dir is None:
            raise ValueError("TrainConfig.ckpt_every needs out_dir (where to write checkpoints), got out_dir=None")
        if self.resume and self.out_dir is None:
            raise ValueError("TrainConfig.resume needs out_dir (where the checkpoint is), got out_dir=None")


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw model, its EMA (use this one to sample), the logged rows."""

    model: nn.Module
    ema: nn.Module
    history: list = field(default_factory=list)
    step: int = 0
    out_dir: str | None = None


class _Warmup:
    """Linear warm-up factor for LambdaLR; an object (not a lambda) so its state is checkpointable."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, (step + 1) / self.warmup)


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device with an explicit CUDA index; None picks the current CUDA device or the CPU.

    An explicit index matters: ``LoomCoupling(device=...)`` must equal the data's device exactly.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # A pure function of (seed, epoch): the same on every rank and after any resume.
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def _fetch(dataset, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(dataset, IndexedDataset):  # one gather instead of b item calls
        return dataset.data[idx]
    xs = []
    for i in idx.tolist():
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"dataset items must be (index, x) pairs, got {type(item).__name__} for item {i}")
        j, x = item
        if int(j) != i:
            raise ValueError(f"dataset item {i} returned index {int(j)}: items must be (index, x) with index == i")
        xs.append(torch.as_tensor(x))
    return torch.stack(xs)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _stat(stats, key):
    if not stats or key not in stats:
        return float("nan")
    v = stats[key]
    return float(v.item() if isinstance(v, torch.Tensor) else v)


class _CsvLog:
    """Appends rows to ``log.csv``; on resume drops rows past the checkpoint (written after it, then lost)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]

            def write(f):
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                w.writeheader()
                w.writerows(rows)

            atomic_write(path, write, mode="w")
            self.f = open(path, "a", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS)
        else:
            self.f = open(path, "w", newline="")
            self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS)
            self.w.writeheader()
            self.f.flush()

    def write(self, row: dict) -> None:
        self.w.writerow({k: row[k] for k in LOG_COLUMNS})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def train(model: nn.Module, dataset, coupling, config: TrainConfig | None = None, *, callback=None,
          callback_every: int = 0, metadata: dict | None = None) -> TrainResult:
    """Trains ``model(x, t)`` by flow matching on pairs drawn by ``coupling``.

    Args:
        model: any module mapping ``x`` ``(B, *shape)`` and ``t`` ``(B,)`` to a velocity ``(B, *shape)``.
            It is moved to the training device; under ``torch.distributed`` it is wrapped in DDP
            (build it identically on every rank).
        dataset: finite, ``len(dataset) = N``; item ``i`` is ``(i, x_i)`` (see ``data.IndexedDataset``).
        coupling: ``IndependentCoupling``, ``MinibatchOTCoupling`` or ``LoomCoupling`` (or anything
            with ``coupling(x1, indices=indices) -> (x0, x1)``); its ``stats`` and ``state_dict`` are
            logged and checkpointed when present. Under DDP give a ``LoomCoupling`` the process group
            so it couples the global batch.
        config: :class:`TrainConfig`.
        callback: called as ``callback(step, model=..., ema=..., coupling=...)`` every
            ``callback_every`` steps (on every rank), e.g. to measure a dataset-wide cost.
        metadata: a picklable dict stored in checkpoints and ``model.pt`` (the CLI puts the model spec there).

    Returns:
        :class:`TrainResult` with the raw model, the EMA model and the logged rows.

    Example:
        >>> from loom_kernels import data, models
        >>> from loom_kernels.coupling import IndependentCoupling
        >>> ds = data.IndexedDataset(data.load("moons", n=512))
        >>> res = train(models.MLPVelocity((2,), hidden=32), ds, IndependentCoupling(),
        ...             TrainConfig(steps=20, batch_size=64, progress=False))
        >>> res.step
        20
    """
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(coupling):
        raise TypeError(f"coupling must be callable as coupling(x1, indices=...), got {type(coupling).__name__}")
    if callback_every < 0 or (callback is not None and callback_every == 0):
        raise ValueError(f"callback_every must be a positive integer when a callback is given, got {callback_every}")
    rank, world = _dist()
    device = resolve_device(cfg.device)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision={cfg.precision!r} (autocast) needs a CUDA device, got device {device}")
    n = len(dataset)
    b = cfg.batch_size
    global_batch = world * b
    if n < global_batch:
        raise ValueError(
            f"the data set has {n} items, fewer than one global batch of {global_batch} "
            f"(batch_size={b} x world_size={world})")
    steps_per_epoch = n // global_batch  # the ragged tail of each epoch is dropped

    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Warmup(cfg.warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    step, epoch, seen = 0, 0, 0  # seen: items of the current epoch already consumed (global)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT) if cfg.out_dir else None
    resumed = False
    if cfg.out_dir and os.path.exists(ckpt_path):
        if not cfg.resume:
            raise FileExistsError(
                f"{ckpt_path} exists: pass resume=True (--resume) to continue it, or choose another out_dir")
        ck = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ck.get("coupling") is not None:
            if not hasattr(coupling, "load_state_dict"):
                raise TypeError(f"the checkpoint holds a coupling state but {type(coupling).__name__} has no load_state_dict")
            coupling.load_state_dict(ck["coupling"])
        step, epoch, seen = ck["step"], ck["epoch"], ck["seen"]
        if ck["world_size"] == world:
            _set_rng_state(ck["rng"][rank], device)
        else:
            warnings.warn(f"resuming with world size {world} from a run with {ck['world_size']}: "
                          "the data order is kept, the random streams are reseeded", stacklevel=2)
            torch.manual_seed(cfg.seed + 7919 * rank + 104729 * step)
        resumed = True
    else:
        # Distinct streams per rank: t and the independent noise must differ across ranks.
        torch.manual_seed(cfg.seed + 7919 * rank)
        np.random.seed((cfg.seed + 7919 * rank) % 2**32)
        random.seed(cfg.seed + 7919 * rank)

    log = None
    if rank == 0 and cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = _CsvLog(os.path.join(cfg.out_dir, LOG), step if resumed else None)

    def state():
        rngs = [None] * world
        mine = _rng_state(device)
        if world > 1:
            torch.distributed.all_gather_object(rngs, mine)
        else:
            rngs[0] = mine
        return {
            "format": "loom_kernels.checkpoint", "version": 1,
            "step": step, "epoch": epoch, "seen": seen, "world_size": world,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "coupling": coupling.state_dict() if hasattr(coupling, "state_dict") else None,
            "coupling_class": type(coupling).__name__,
            "rng": rngs, "config": dataclasses.asdict(cfg), "metadata": metadata or {},
        }

    def save_checkpoint():
        st = state()  # collective under DDP: every rank enters
        if rank == 0:
            atomic_save(st, ckpt_path)
            save_model(os.path.join(cfg.out_dir, MODEL), ema, metadata=metadata, step=step)
        if world > 1:
            torch.distributed.barrier()

    history = []
    order = _epoch_order(n, cfg.seed, epoch)
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train[{type(coupling).__name__}]", dynamic_ncols=True)
    model.train()
    try:
        while step < cfg.steps:
            if seen + global_batch > steps_per_epoch * global_batch:
                epoch, seen = epoch + 1, 0
                order = _epoch_order(n, cfg.seed, epoch)
            idx = order[seen + rank * b: seen + (rank + 1) * b]
            seen += global_batch
            x1 = _fetch(dataset, idx).to(device, non_blocking=True)
            # CPU indices: every coupling accepts them (LoomCoupling's table may live on either side).
            x0, x1 = coupling(x1, indices=idx)
            t = torch.rand(b, device=device)
            tb = t.view(-1, *([1] * (x1.ndim - 1)))
            xt = (1 - tb) * x0 + tb * x1
            if cfg.sigma > 0:
                xt = xt + cfg.sigma * torch.randn_like(xt)
            with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
                v = net(xt, t)
            loss = F.mse_loss(v.float(), (x1 - x0).float())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]  # the rate this step used (sched.step() moves to the next)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))

            if step % cfg.log_every == 0 or step == cfg.steps:
                lv = loss.detach()
                if world > 1:
                    torch.distributed.all_reduce(lv)
                    lv = lv / world
                stats = getattr(coupling, "stats", None)
                row = {"step": step, "epoch": epoch, "loss": float(lv),
                       "pre_cost": _stat(stats, "pre_cost"), "post_cost": _stat(stats, "post_cost"),
                       "swaps": _stat(stats, "swaps"), "lr": lr}
                history.append(row)
                if log is not None:
                    log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if callback is not None and step % callback_every == 0:
                callback(step, model=model, ema=ema, coupling=coupling)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save_checkpoint()
        if cfg.out_dir:
            save_checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return TrainResult(model=model, ema=ema, history=history, step=step, out_dir=cfg.out_dir)


# ---- command line ----------------------------------------------------------------------------------


def make_coupling(name: str, num_points: int, shape, *, num_caches: int = 1, seed: int = 0, device=None,
                  process_group=None):
    """The coupling named ``"independent"``, ``"ot"`` or ``"loom"`` (the CLI and the demo use this)."""
    from .coupling import IndependentCoupling, LoomCoupling, MinibatchOTCoupling

    if name == "independent":
        return IndependentCoupling()
    if name == "ot":
        return MinibatchOTCoupling()
    if name == "loom":
        return LoomCoupling(num_points, tuple(shape), num_caches=num_caches, seed=seed, device=device,
                            process_group=process_group)
    raise ValueError(f"coupling must be one of ('independent', 'ot', 'loom'), got {name!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.train",
        description="Train a flow-matching velocity field with an independent, minibatch-OT or LOOM coupling. "
                    "Writes DIR/checkpoint.pt (resume), DIR/model.pt (EMA weights, for "
                    "`python -m loom_kernels.sample`) and DIR/log.csv. Runs under torchrun (DDP).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="8gaussians, moons, checkerboard, digits, or PATH.npy of shape (N, *shape)")
    p.add_argument("--coupling", required=True, choices=("independent", "ot", "loom"))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps (global)")
    p.add_argument("--batch-size", type=int, default=256, help="items per process per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear LR warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (<= 0 disables)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--sigma", type=float, default=0.0, help="std of the noise added to x_t")
    p.add_argument("--num-caches", type=int, default=1, help="LOOM noise caches per data point")
    p.add_argument("--points", type=int, default=None, help="points of a 2-D set (default 4096) / rows kept otherwise")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction of digits / .npy data")
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="autocast dtype (CUDA only)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=1000, help="0: only at the end")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import data as data_mod
    from .models import MLPVelocity

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = str(resolve_device(args.device if not distributed or not use_cuda else "cuda"))
    try:
        x = data_mod.load(args.data, "train", n=args.points, seed=args.seed, holdout=args.holdout)
        dataset = data_mod.IndexedDataset(x)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = MLPVelocity(dataset.shape, hidden=args.hidden, depth=args.depth)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                          grad_clip=args.grad_clip if args.grad_clip > 0 else None, ema_decay=args.ema_decay,
                          sigma=args.sigma, seed=args.seed, precision=args.precision, device=device,
                          out_dir=args.out, resume=args.resume, log_every=args.log_every,
                          ckpt_every=args.ckpt_every if args.ckpt_every < args.steps else 0,
                          progress=not args.no_progress)
        coupling = make_coupling(args.coupling, len(dataset), dataset.shape, num_caches=args.num_caches,
                                 seed=args.seed, device=device,
                                 process_group=torch.distributed.group.WORLD if distributed else None)
        meta = {"model": model.spec, "data": args.data, "n": args.points, "holdout": args.holdout, "seed": args.seed,
                "coupling": args.coupling, "num_caches": args.num_caches}
        res = train(model, dataset, coupling, cfg, metadata=meta)
        if _dist()[0] == 0:
            last = res.history[-1] if res.history else {}
            print(f"trained {res.step} steps on {args.data} ({len(dataset)} items) with the {args.coupling} "
                  f"coupling; final loss {last.get('loss', float('nan')):.4f}; wrote "
                  f"{os.path.join(args.out, MODEL)} (EMA), {CHECKPOINT}, {LOG}")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
