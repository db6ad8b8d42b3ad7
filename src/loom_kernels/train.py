"""A thin flow-matching trainer with exact resume, DDP and any coupling; also ``python -m loom_kernels.train``.

Objective: conditional flow matching / rectified flow (Lipman et al., 2023; Liu et al., 2023):
``x_t = (1 - t) x0 + t x1`` with ``t ~ U[0, 1]``, regress ``model(x_t, t)`` on ``x1 - x0``. The pairs
``(x0, x1)`` come from a coupling: independent, minibatch OT (Tong et al., 2023; Pooladian et al., 2023)
or LOOM-CFM (Davtyan et al., ICLR 2025), all called as ``coupling(x1, indices=indices)`` (and
``labels=y`` for labelled data). Class-conditional models are called as ``model(x_t, t, y=y)`` with
labels dropped to ``model.null_label`` at rate ``label_dropout`` (classifier-free guidance).

The loop reads as restore, step, log, checkpoint (one function each, on a ``_Run`` holding the state).
A non-finite loss stops the run before anything is written (or skips the update, ``nonfinite="skip"``);
SIGTERM saves a checkpoint, then exits; a resume with other settings refuses (data, batch size, seed,
precision) or states every setting it overrides.

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)``; the checkpoint keeps
the epoch and the position inside it (the LOOM reference code restarted its epoch counter on resume,
which made its periodic resampling wipe the learned assignment), every RNG state of every rank, the
model, the EMA, the optimizer, the scheduler, the grad scaler and the coupling state. The model kept
for sampling is the EMA (the reference code saved the raw weights).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import math
import os
import random
import signal
import sys
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._device import resolve_device as _resolve_device
from ._io import atomic_write
from .checkpoint import (
    _rng_state,
    _set_rng_state,
    atomic_save,
    load_checkpoint,
    load_model,  # noqa: F401  (re-exported: its old import path)
    save_model,
)
from .couplings import Coupling
from .data import IndexedDataset

CHECKPOINT = "checkpoint.pt"  # everything needed to resume
MODEL = "model.pt"  # the EMA weights and metadata, for sampling
LOG = "log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "pre_cost", "post_cost", "swaps", "lr")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine")
NONFINITE = ("stop", "skip")
# A resume refuses a change of these (they define the data order or the numerics) ...
FIXED_ON_RESUME = ("batch_size", "seed", "precision")
# ... and applies these, stating each change.
OVERRIDABLE_ON_RESUME = ("steps", "lr", "warmup", "schedule", "weight_decay", "grad_clip", "ema_decay", "sigma",
                         "label_dropout", "log_every", "ckpt_every", "nonfinite")


@dataclass
class TrainConfig:
    """Training settings. ``batch_size`` is per process; the global batch is ``world_size * batch_size``.

    Attributes:
        steps: optimizer steps in total (the global step; a resumed run stops at the same step).
        batch_size: items per process per step.
        lr: Adam learning rate after the linear warm-up of ``warmup`` steps.
        schedule: after warm-up, ``"constant"`` or ``"cosine"`` (decays to 0 at ``steps``).
        grad_clip: max gradient norm, or None to skip clipping.
        ema_decay: EMA decay of the parameters (ramped up as ``min(decay, (1+s)/(10+s))``).
        sigma: std of the Gaussian added to ``x_t`` (the LOOM code uses 1e-7; 0 disables).
        label_dropout: labelled data only: the fraction of labels replaced by ``model.null_label``
            (trains the unconditional model that classifier-free guidance needs).
        nonfinite: a NaN/inf loss ``"stop"``s the run (raises; nothing is written, the last
            checkpoint stays) or is ``"skip"``ped (no update; counted in ``TrainResult.skipped``).
            Either way one host read of the loss per step.
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
    schedule: str = "constant"
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    sigma: float = 0.0
    label_dropout: float = 0.0
    nonfinite: str = "stop"
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

        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("log_every", 1), ("ckpt_every", 0),
                         ("seed", 0)):
            _int(name, lo)
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
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"TrainConfig.label_dropout must be in [0, 1), got {self.label_dropout!r}")
        for name, allowed in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("nonfinite", NONFINITE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
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
    skipped: int = 0  # steps whose non-finite loss was skipped (nonfinite="skip")


class _Schedule:
    """LR factor for LambdaLR: linear warm-up, then constant or cosine to 0 at ``steps``; an object
    (not a lambda) so its state is checkpointable."""

    def __init__(self, warmup: int, steps: int = 1, kind: str = "constant"):
        self.warmup, self.steps, self.kind = warmup, steps, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant" or self.steps <= self.warmup:
            return 1.0
        done = min(1.0, (step - self.warmup) / (self.steps - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * done))


_Warmup = _Schedule  # old checkpoints pickled the warm-up under this name


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device with an explicit CUDA index; None picks the current CUDA device or the CPU.

    An explicit index matters: ``LoomCoupling(device=...)`` must equal the data's device exactly.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    return _resolve_device(device, prefer_cuda=True)


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # A pure function of (seed, epoch): the same on every rank and after any resume.
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g)


def _fetch(dataset, idx: torch.Tensor):
    """``(x (b, *shape), y (b,) or None)`` of items ``idx``; datasets with ``batch()`` gather at once."""
    if hasattr(dataset, "batch") and isinstance(dataset, torch.utils.data.Dataset):
        return dataset.batch(idx)
    xs, ys = [], []
    for i in idx.tolist():
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) in (2, 3)):
            raise ValueError(f"dataset items must be (index, x) pairs or (index, x, y) triples, got "
                             f"{type(item).__name__} for item {i}")
        if int(item[0]) != i:
            raise ValueError(
                f"dataset item {i} returned index {int(item[0])}: items must be (index, x) with index == i")
        xs.append(torch.as_tensor(item[1]))
        if len(item) == 3:
            ys.append(torch.as_tensor(item[2]))
    if ys and len(ys) != len(xs):
        raise ValueError("dataset items must all be (index, x) or all (index, x, y)")
    return torch.stack(xs), (torch.stack(ys).long() if ys else None)


def _fingerprint(dataset) -> str:
    """Identifies the data set in checkpoints: its length and a hash of its contents (or of three items)."""
    h = hashlib.sha1(str(len(dataset)).encode())
    base = getattr(dataset, "base", dataset)
    h.update(type(dataset).__name__.encode())
    if isinstance(base, IndexedDataset):
        tensors = [base.data] + ([base.labels] if hasattr(base, "labels") else [])
    else:
        n = len(dataset)
        tensors = [torch.as_tensor(dataset[i][1]) for i in sorted({0, n // 2, n - 1})]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class _CallableCoupling(Coupling):
    """A plain callable ``fn(x1, indices=...)`` (labels only when given) seen through the protocol.

    It has no stats and no state."""

    def __init__(self, fn):
        self.fn, self.stats = fn, {}

    def __call__(self, x1, *, indices=None, labels=None):
        return self.fn(x1, indices=indices) if labels is None else self.fn(x1, indices=indices, labels=labels)


def _as_coupling(coupling) -> Coupling:
    """The coupling as a :class:`~loom_kernels.couplings.Coupling` (plain callables wrapped once)."""
    if isinstance(coupling, Coupling):
        return coupling
    if callable(coupling):
        return _CallableCoupling(coupling)
    raise TypeError(f"coupling must be a loom_kernels.couplings.Coupling (or a callable coupling(x1, indices=...)), "
                    f"got {type(coupling).__name__}")


def _stat(stats, key):
    if not stats or key not in stats:
        return float("nan")
    v = stats[key]
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _read_log(path: str, resume_step: int) -> list:
    """Rows of ``log.csv`` up to the checkpoint's step; a torn last row (a kill mid-write) is dropped with a warning."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for k, r in enumerate(rows):
        try:
            step = int(r["step"])
            [float(r[c]) for c in LOG_COLUMNS[1:]]
        except (TypeError, ValueError, KeyError):
            if k == len(rows) - 1:
                warnings.warn(f"{path}: dropping its torn last row {k + 2} ({r}): the run was killed while "
                              "writing it", RuntimeWarning, stacklevel=4)
                break
            raise ValueError(f"{path}: row {k + 2} is not a log row of columns {LOG_COLUMNS} (got {r}); "
                             "fix or delete the file to resume") from None
        if step <= resume_step:
            kept.append(r)
    return kept


class _CsvLog:
    """Appends rows to ``log.csv``; on resume drops rows past the checkpoint (written after it, then lost)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            rows = _read_log(path, resume_step)

            def write(f):
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                w.writeheader()
                w.writerows(rows)

            atomic_write(path, write, mode="w")
            self.f = open(path, "a", newline="")
        else:
            self.f = open(path, "w", newline="")
            csv.DictWriter(self.f, fieldnames=LOG_COLUMNS).writeheader()
            self.f.flush()
        self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS)

    def write(self, row: dict) -> None:
        self.w.writerow({k: row[k] for k in LOG_COLUMNS})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ---- the run: its state, and restore / step / log / checkpoint ----------------------------------------


@dataclass
class _Run:
    """Everything one training run holds; the loop's functions read and advance it."""

    cfg: TrainConfig
    model: nn.Module
    ema: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    coupling: Coupling  # the protocol view of user_coupling (the same object unless it was a plain callable)
    user_coupling: object
    dataset: object
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    device: torch.device
    rank: int
    world: int
    metadata: dict
    fingerprint: str
    step: int = 0
    epoch: int = 0
    seen: int = 0  # items of the current epoch already consumed (global)
    order: torch.Tensor | None = None
    history: list = field(default_factory=list)
    skipped: int = 0
    log: _CsvLog | None = None
    sigterm: dict = field(default_factory=lambda: {"set": False})  # this rank's flag (the signal handler sets it)
    terminate: bool = False  # every rank agreed to save and exit after this step

    @property
    def ckpt_path(self) -> str | None:
        return os.path.join(self.cfg.out_dir, CHECKPOINT) if self.cfg.out_dir else None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.world * self.cfg.batch_size)  # the ragged tail is dropped


def _build(model, dataset, coupling, cfg, metadata) -> _Run:
    proto = _as_coupling(coupling)
    rank, world = _dist()
    device = resolve_device(cfg.device)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision={cfg.precision!r} (autocast) needs a CUDA device, got device {device}")
    n, global_batch = len(dataset), world * cfg.batch_size
    if n < global_batch:
        raise ValueError(f"the data set has {n} items, fewer than one global batch of {global_batch} "
                         f"(batch_size={cfg.batch_size} x world_size={world})")
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Schedule(cfg.warmup, cfg.steps, cfg.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    return _Run(cfg, model, ema, net, proto, coupling, dataset, opt, sched, scaler, device, rank, world,
                metadata or {}, _fingerprint(dataset))


def _check_resume(run: _Run, ck: dict) -> None:
    """Refuses a resume whose data or fixed settings differ from the checkpoint's; states every override."""
    path, old = run.ckpt_path, ck.get("config", {})
    if ck.get("data") is not None and ck["data"] != run.fingerprint:
        raise ValueError(f"{path} was trained on another data set (length or contents differ: {ck['data'][:12]} vs "
                         f"{run.fingerprint[:12]}); resume with the same --data/--points/--holdout/--flip, or use "
                         "another out_dir")
    fixed = [f"{k}: {old[k]!r} -> {getattr(run.cfg, k)!r}" for k in FIXED_ON_RESUME
             if k in old and old[k] != getattr(run.cfg, k)]
    if fixed:
        raise ValueError(f"{path} cannot be resumed with other settings of {', '.join(fixed)} (they fix the data "
                         "order or the numerics); resume with the checkpoint's values, or use another out_dir")
    changed = [f"{k}: {old[k]!r} -> {getattr(run.cfg, k)!r}" for k in OVERRIDABLE_ON_RESUME
               if k in old and old[k] != getattr(run.cfg, k)]
    if changed:
        warnings.warn(f"resuming {path} with new settings (they apply from step {ck['step']} on): "
                      + "; ".join(changed), UserWarning, stacklevel=3)


def _apply_overrides(run: _Run) -> None:
    """The config's optimizer settings over the restored optimizer/scheduler state (a resume's overrides)."""
    cfg = run.cfg
    run.sched.lr_lambdas[0] = _Schedule(cfg.warmup, cfg.steps, cfg.schedule)
    run.sched.base_lrs = [cfg.lr for _ in run.opt.param_groups]
    for g in run.opt.param_groups:
        g["initial_lr"], g["weight_decay"] = cfg.lr, cfg.weight_decay
        g["lr"] = cfg.lr * run.sched.lr_lambdas[0](run.sched.last_epoch)


def _restore(run: _Run) -> bool:
    """Loads ``checkpoint.pt`` into the run if it exists (and resume is on); else seeds a fresh run."""
    cfg, path = run.cfg, run.ckpt_path
    if not (path and os.path.exists(path)):
        # Distinct streams per rank: t and the independent noise must differ across ranks.
        s = cfg.seed + 7919 * run.rank
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        return False
    if not cfg.resume:
        raise FileExistsError(f"{path} exists: pass resume=True (--resume) to continue it, or choose another out_dir")
    ck = load_checkpoint(path, map_location=run.device)
    _check_resume(run, ck)
    run.model.load_state_dict(ck["model"])
    run.ema.load_state_dict(ck["ema"])
    run.opt.load_state_dict(ck["optimizer"])
    run.sched.load_state_dict(ck["scheduler"])
    run.scaler.load_state_dict(ck["scaler"])
    _apply_overrides(run)
    if ck.get("coupling") is not None:  # None: written before every coupling had a state_dict
        run.coupling.load_state_dict(ck["coupling"])
    run.step, run.epoch, run.seen = ck["step"], ck["epoch"], ck["seen"]
    if ck["world_size"] == run.world:
        _set_rng_state(ck["rng"][run.rank], run.device)
    else:
        warnings.warn(f"resuming with world size {run.world} from a run with {ck['world_size']}: "
                      "the data order is kept, the random streams are reseeded", stacklevel=3)
        torch.manual_seed(cfg.seed + 7919 * run.rank + 104729 * run.step)
    return True


def _next_batch(run: _Run):
    """The next (indices, x1, labels) of this rank, advancing the epoch when it is used up."""
    b, global_batch = run.cfg.batch_size, run.world * run.cfg.batch_size
    if run.order is None or run.seen + global_batch > run.steps_per_epoch * global_batch:
        if run.order is not None:
            run.epoch, run.seen = run.epoch + 1, 0
        run.order = _epoch_order(len(run.dataset), run.cfg.seed, run.epoch)
    idx = run.order[run.seen + run.rank * b: run.seen + (run.rank + 1) * b]
    run.seen += global_batch
    x1, y = _fetch(run.dataset, idx)
    return idx, x1.to(run.device, non_blocking=True), (None if y is None else y.to(run.device))


def _model_labels(run: _Run, y):
    if y is None or run.cfg.label_dropout == 0:
        return y
    null = getattr(run.model, "null_label", None)
    if not isinstance(null, int):
        raise ValueError("label_dropout needs a model with an integer .null_label (e.g. models.UNet(num_classes=...))")
    drop = torch.rand(y.shape, device=y.device) < run.cfg.label_dropout
    return torch.where(drop, torch.full_like(y, null), y)


def _step(run: _Run):
    """One optimizer step; returns (loss tensor, lr used); a non-finite loss stops or skips (config)."""
    cfg = run.cfg
    idx, x1, y = _next_batch(run)
    # CPU indices: every coupling accepts them (LoomCoupling's table may live on either side).
    x0, x1 = run.coupling(x1, indices=idx, labels=y)
    t = torch.rand(x1.shape[0], device=run.device)
    tb = t.view(-1, *([1] * (x1.ndim - 1)))
    xt = (1 - tb) * x0 + tb * x1
    if cfg.sigma > 0:
        xt = xt + cfg.sigma * torch.randn_like(xt)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    kw = {} if y is None else {"y": _model_labels(run, y)}
    with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
        v = run.net(xt, t, **kw)
    loss = F.mse_loss(v.float(), (x1 - x0).float())
    lr = run.opt.param_groups[0]["lr"]  # the rate this step uses (sched.step() moves to the next)
    run.opt.zero_grad(set_to_none=True)
    finite, run.terminate = _agree(run, torch.isfinite(loss.detach()), run.sigterm["set"])
    if not finite and cfg.nonfinite == "stop":
        where = "" if run.world == 1 else " on another rank" if loss.isfinite() else f" on rank {run.rank}"
        raise FloatingPointError(
            f"non-finite loss ({float(loss.detach())}{where}) at step {run.step + 1}: "
            "training stopped without writing a checkpoint"
            + (f" (the last good one is {run.ckpt_path})" if run.ckpt_path and os.path.exists(run.ckpt_path) else "")
            + "; lower --lr, or pass nonfinite='skip' to skip such steps")
    if finite:
        run.scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            run.scaler.unscale_(run.opt)
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.skipped += 1
    run.sched.step()
    run.step += 1
    if finite:
        _ema_update(run.ema, run.model, min(cfg.ema_decay, (1 + run.step) / (10 + run.step)))
    return loss.detach(), lr


def _agree(run: _Run, finite: torch.Tensor, sigterm: bool) -> tuple[bool, bool]:
    """(the loss is finite on every rank, some rank got SIGTERM): the step's one host read.

    Under DDP one 2-element all-reduce first, so that all ranks skip, stop or save and exit at the same
    step: a rank acting alone would leave the others waiting in DDP's backward or in the collective save.
    """
    if run.world == 1:
        return bool(finite), sigterm
    term = torch.tensor(int(sigterm), dtype=torch.int32, device=finite.device)
    flags = torch.stack([(~finite).to(torch.int32), term])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad, term = flags.tolist()
    return not bad, bool(term)


def _log(run: _Run, loss, lr, bar) -> None:
    if run.world > 1:
        torch.distributed.all_reduce(loss)
        loss = loss / run.world
    stats = run.coupling.stats
    row = {"step": run.step, "epoch": run.epoch, "loss": float(loss), "pre_cost": _stat(stats, "pre_cost"),
           "post_cost": _stat(stats, "post_cost"), "swaps": _stat(stats, "swaps"), "lr": lr}
    run.history.append(row)
    if run.log is not None:
        run.log.write(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)


def _state(run: _Run) -> dict:
    rngs = [None] * run.world
    mine = _rng_state(run.device)
    if run.world > 1:
        torch.distributed.all_gather_object(rngs, mine)
    else:
        rngs[0] = mine
    return {
        "format": "loom_kernels.checkpoint", "version": 2,  # 2: carries a checksum (checkpoint.atomic_save)
        "step": run.step, "epoch": run.epoch, "seen": run.seen, "world_size": run.world,
        "model": run.model.state_dict(), "ema": run.ema.state_dict(),
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
        "coupling": run.coupling.state_dict(),
        "coupling_class": type(run.user_coupling).__name__, "data": run.fingerprint,
        "rng": rngs, "config": dataclasses.asdict(run.cfg), "metadata": run.metadata,
    }


def _save(run: _Run) -> None:
    st = _state(run)  # collective under DDP: every rank enters
    if run.rank == 0:
        atomic_save(st, run.ckpt_path)
        save_model(os.path.join(run.cfg.out_dir, MODEL), run.ema, metadata=run.metadata, step=run.step)
    if run.world > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def _sigterm_flag():
    """Turns SIGTERM (what schedulers send before a kill) into a flag.

    The ranks agree on it at each step (``_agree``)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["set"] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _loop(run: _Run, callback, callback_every) -> None:
    cfg = run.cfg
    bar = None
    if run.rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train[{type(run.user_coupling).__name__}]",
                   dynamic_ncols=True)
    run.model.train()
    try:
        with _sigterm_flag() as run.sigterm:
            while run.step < cfg.steps:
                loss, lr = _step(run)
                if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                    _log(run, loss, lr, bar)
                if bar is not None:
                    bar.update(1)
                if callback is not None and run.step % callback_every == 0:
                    callback(run.step, model=run.model, ema=run.ema, coupling=run.user_coupling)
                if run.terminate:
                    if cfg.out_dir:
                        _save(run)
                    raise SystemExit(f"SIGTERM at step {run.step}: saved {run.ckpt_path}; exiting"
                                     if cfg.out_dir else f"SIGTERM at step {run.step}: exiting (no out_dir)")
                if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
                    _save(run)
            if cfg.out_dir:
                _save(run)
    finally:
        if bar is not None:
            bar.close()


def train(model: nn.Module, dataset, coupling, config: TrainConfig | None = None, *, callback=None,
          callback_every: int = 0, metadata: dict | None = None) -> TrainResult:
    """Trains ``model(x, t)`` (or ``model(x, t, y=y)`` on labelled data) by flow matching on ``coupling``'s pairs.

    Args:
        model: any module mapping ``x`` ``(B, *shape)`` and ``t`` ``(B,)`` (and labels ``y`` ``(B,)``
            for labelled data) to a velocity ``(B, *shape)``. It is moved to the training device;
            under ``torch.distributed`` it is wrapped in DDP (build it identically on every rank).
        dataset: finite, ``len(dataset) = N``; item ``i`` is ``(i, x_i)`` or ``(i, x_i, y_i)`` (see
            ``data.IndexedDataset``, ``data.LabeledDataset``, ``data.FlipDataset``).
        coupling: a :class:`~loom_kernels.couplings.Coupling`, called as ``coupling(x1, indices=idx,
            labels=y) -> (x0, x1)`` (``labels=None`` for unlabelled data); its ``stats`` are logged and
            its ``state_dict`` is checkpointed. A plain callable ``fn(x1, indices=...)`` (``labels=``
            only for labelled data) also works: it logs no stats and keeps no state. Under DDP give a
            ``LoomCoupling`` the process group so it couples the global batch.
        config: :class:`TrainConfig`.
        callback: called as ``callback(step, model=..., ema=..., coupling=...)`` every
            ``callback_every`` steps (on every rank), e.g. to measure a dataset-wide cost.
        metadata: a picklable dict stored in checkpoints and ``model.pt`` (the CLI puts the model spec there).

    Returns:
        :class:`TrainResult` with the raw model, the EMA model and the logged rows.

    Example:
        >>> from loom_kernels import data, models
        >>> from loom_kernels.couplings import IndependentCoupling
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
    if callback_every < 0 or (callback is not None and callback_every == 0):
        raise ValueError(f"callback_every must be a positive integer when a callback is given, got {callback_every}")
    run = _build(model, dataset, coupling, cfg, metadata)
    resumed = _restore(run)
    if run.rank == 0 and cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        run.log = _CsvLog(os.path.join(cfg.out_dir, LOG), run.step if resumed else None)
    if resumed:
        run.order = _epoch_order(len(dataset), cfg.seed, run.epoch)
    try:
        _loop(run, callback, callback_every)
    finally:
        if run.log is not None:
            run.log.close()
    if run.skipped:
        warnings.warn(f"{run.skipped} of the steps had a non-finite loss and were skipped", RuntimeWarning,
                      stacklevel=2)
    return TrainResult(model=run.model, ema=run.ema, history=run.history, step=run.step, out_dir=cfg.out_dir,
                       skipped=run.skipped)


# ---- command line ----------------------------------------------------------------------------------


def make_coupling(name: str, num_points: int, shape, *, num_caches: int = 1, seed: int = 0, device=None,
                  process_group=None, metric: str = "sqeuclidean"):
    """The coupling named ``"independent"``, ``"ot"`` or ``"loom"`` (the CLI and the demo use this).

    ``metric``: the pair cost, ``"sqeuclidean"`` (default) or ``"euclidean"`` (the LOOM-CFM code's).
    With flips, ``num_points`` is ``2 * len(data)`` (each view keeps its own noise).
    """
    from .couplings import IndependentCoupling, LoomCoupling, MinibatchOTCoupling

    if name == "independent":
        return IndependentCoupling(metric=metric)
    if name == "ot":
        return MinibatchOTCoupling(metric=metric)
    if name == "loom":
        return LoomCoupling(num_points, tuple(shape), num_caches=num_caches, seed=seed, device=device,
                            process_group=process_group, metric=metric)
    raise ValueError(f"coupling must be one of ('independent', 'ot', 'loom'), got {name!r}")


if __name__ == "__main__":  # python -m loom_kernels.train: the command line lives in cli/train.py
    from .cli.train import main

    sys.exit(main())
