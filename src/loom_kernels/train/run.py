"""One training run's state (``Run``): building it, restoring it from a checkpoint (with the resume
checks), and saving it (never from non-finite weights)."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._device import resolve_device
from ..checkpoint import atomic_save, check_fields, load_checkpoint, restore_rng_state, rng_state, save_model
from ..couplings import Coupling
from .batches import dist_info, fingerprint
from .config import CHECKPOINT, FIXED_ON_RESUME, MODEL, OVERRIDABLE_ON_RESUME, Schedule, TrainConfig
from .log import CsvLog


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class _CallableCoupling(Coupling):
    """A plain callable ``fn(x1, indices=...)`` (``labels``, ``cond`` and ``return_indices`` only when given)
    seen through the protocol.

    It has no stats and no state."""

    def __init__(self, fn):
        self.fn, self.stats = fn, {}

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False):
        if x0 is not None:
            raise ValueError("a plain callable coupling draws its own noise: x0 must be None")
        kwargs = {k: v for k, v in (("labels", labels), ("cond", cond)) if v is not None}
        if return_indices is not False:  # passed on as given: the callable checks it
            kwargs["return_indices"] = return_indices
        return self.fn(x1, indices=indices, **kwargs)


def as_coupling(coupling) -> Coupling:
    """The coupling as a :class:`~loom_kernels.couplings.Coupling` (plain callables wrapped once)."""
    if isinstance(coupling, Coupling):
        return coupling
    if callable(coupling):
        return _CallableCoupling(coupling)
    raise TypeError(
        f"coupling must be a loom_kernels.couplings.Coupling (or a callable coupling(x1, indices=...)), "
        f"got {type(coupling).__name__}"
    )


@dataclass
class Run:
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
    scaler_skips: object = 0  # fp16: the grad scaler's consecutive skipped steps (a device tensor once counted)
    log: CsvLog | None = None
    sigterm: dict = field(default_factory=lambda: {"set": False})  # this rank's flag (the signal handler sets it)
    terminate: bool = False  # every rank agreed to save and exit after this step

    @property
    def ckpt_path(self) -> str | None:
        return os.path.join(self.cfg.out_dir, CHECKPOINT) if self.cfg.out_dir else None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.world * self.cfg.batch_size)  # the ragged tail is dropped


def build(model, dataset, coupling, cfg, metadata) -> Run:
    proto = as_coupling(coupling)
    rank, world = dist_info()
    device = resolve_device(cfg.device, prefer_cuda=True)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ValueError(f"precision={cfg.precision!r} (autocast) needs a CUDA device, got device {device}")
    n, global_batch = len(dataset), world * cfg.batch_size
    if n < global_batch:
        raise ValueError(
            f"the data set has {n} items, fewer than one global batch of {global_batch} "
            f"(batch_size={cfg.batch_size} x world_size={world})"
        )
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Schedule(cfg.warmup, cfg.steps, cfg.schedule))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    return Run(
        cfg,
        model,
        ema,
        net,
        proto,
        coupling,
        dataset,
        opt,
        sched,
        scaler,
        device,
        rank,
        world,
        metadata or {},
        fingerprint(dataset),
    )


def _check_resume(run: Run, ck: dict) -> None:
    """Refuses a resume whose data or fixed settings differ from the checkpoint's; states every override."""
    path, old = run.ckpt_path, ck.get("config", {})
    if ck.get("data") is not None and ck["data"] != run.fingerprint:
        raise ValueError(
            f"{path} was trained on another data set (length or contents differ: {ck['data'][:12]} vs "
            f"{run.fingerprint[:12]}); resume with the same --data/--points/--holdout/--flip, or use "
            "another out_dir"
        )
    fixed = [
        f"{k}: {old[k]!r} -> {getattr(run.cfg, k)!r}"
        for k in FIXED_ON_RESUME
        if k in old and old[k] != getattr(run.cfg, k)
    ]
    if fixed:
        raise ValueError(
            f"{path} cannot be resumed with other settings of {', '.join(fixed)} (they fix the data "
            "order or the numerics); resume with the checkpoint's values, or use another out_dir"
        )
    changed = [
        f"{k}: {old[k]!r} -> {getattr(run.cfg, k)!r}"
        for k in OVERRIDABLE_ON_RESUME
        if k in old and old[k] != getattr(run.cfg, k)
    ]
    if changed:
        warnings.warn(
            f"resuming {path} with new settings (they apply from step {ck['step']} on): " + "; ".join(changed),
            UserWarning,
            stacklevel=3,
        )


def _apply_overrides(run: Run) -> None:
    """The config's optimizer settings over the restored optimizer/scheduler state (a resume's overrides)."""
    cfg = run.cfg
    run.sched.lr_lambdas[0] = Schedule(cfg.warmup, cfg.steps, cfg.schedule)
    run.sched.base_lrs = [cfg.lr for _ in run.opt.param_groups]
    for g in run.opt.param_groups:
        g["initial_lr"], g["weight_decay"] = cfg.lr, cfg.weight_decay
        g["lr"] = cfg.lr * run.sched.lr_lambdas[0](run.sched.last_epoch)


def restore(run: Run) -> bool:
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
    check_fields(ck, path, complete=True)
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
        restore_rng_state(ck["rng"][run.rank], run.device)
    else:
        warnings.warn(
            f"resuming with world size {run.world} from a run with {ck['world_size']}: "
            "the data order is kept, the random streams are reseeded",
            stacklevel=3,
        )
        torch.manual_seed(cfg.seed + 7919 * run.rank + 104729 * run.step)
    return True


def state(run: Run) -> dict:
    rngs = [None] * run.world
    mine = rng_state(run.device)
    if run.world > 1:
        torch.distributed.all_gather_object(rngs, mine)
    else:
        rngs[0] = mine
    return {
        "format": "loom_kernels.checkpoint",
        "version": 2,  # 2: carries a checksum (checkpoint.atomic_save)
        "step": run.step,
        "epoch": run.epoch,
        "seen": run.seen,
        "world_size": run.world,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "coupling": run.coupling.state_dict(),
        "coupling_class": type(run.user_coupling).__name__,
        "data": run.fingerprint,
        "rng": rngs,
        "config": dataclasses.asdict(run.cfg),
        "metadata": run.metadata,
    }


def _check_finite_weights(run: Run) -> None:
    """Refuses to checkpoint non-finite weights (model or EMA): the file on disk stays the last good one.

    One host read per checkpoint. Every rank holds the same weights, so every rank raises alike."""
    tensors = [t for m in (run.model, run.ema) for t in m.state_dict().values() if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        last = (
            f"; the last good checkpoint is {run.ckpt_path}"
            if run.ckpt_path and os.path.exists(run.ckpt_path)
            else "; no checkpoint was written before"
        )
        raise FloatingPointError(f"the weights are not finite at step {run.step}: checkpoint not written{last}")


def save(run: Run) -> None:
    _check_finite_weights(run)
    st = state(run)  # collective under DDP: every rank enters
    if run.rank == 0:
        atomic_save(st, run.ckpt_path)
        save_model(os.path.join(run.cfg.out_dir, MODEL), run.ema, metadata=run.metadata, step=run.step)
    if run.world > 1:
        torch.distributed.barrier()
