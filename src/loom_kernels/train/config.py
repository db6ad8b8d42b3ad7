"""The trainer's settings (``TrainConfig``), its result (``TrainResult``), file names and the LR schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import nn

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
OVERRIDABLE_ON_RESUME = (
    "steps",
    "lr",
    "warmup",
    "schedule",
    "weight_decay",
    "grad_clip",
    "ema_decay",
    "sigma",
    "label_dropout",
    "log_every",
    "ckpt_every",
    "nonfinite",
    "t_dist",
)
INIT_WEIGHTS = ("ema", "raw")


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
        nonfinite: a NaN/inf loss or gradient norm ``"stop"``s the run before the optimizer step
            (raises; nothing is written, the last checkpoint stays) or is ``"skip"``ped (no update;
            counted in ``TrainResult.skipped``). Either way one host read per step (fp16: the grad
            scaler skips non-finite gradients itself; the loss is checked). A checkpoint is never
            written from non-finite weights.
        seed: seeds the data order, the global RNGs of a fresh run (offset by rank).
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast (CUDA only; fp16 uses a grad scaler).
        device: where to train; default CUDA (the current device) when available, else CPU.
        out_dir: where ``checkpoint.pt``, ``model.pt`` and ``log.csv`` go; None keeps everything in memory.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        log_every: steps between logged rows (history and CSV).
        ckpt_every: steps between checkpoints (0: only at the end); needs ``out_dir``.
        progress: show a tqdm bar (rank 0 only).
        t_dist: the timestep distribution (``loom_kernels.timesteps``): ``"uniform"``, ``"beta(a, b)"``,
            ``"u_shaped"`` or ``"logit_normal(m, s)"``. The drawn ``t`` reaches couplings that take it
            (``TimestepMixedCoupling``).
        init_from: a fresh run starts from this ``model.pt``/``checkpoint.pt``'s weights (ignored on resume):
            ``init_weights`` ``"ema"`` (default) or ``"raw"`` (needs ``checkpoint.pt``) go into the model and
            its EMA; ``init_optimizer`` also loads the Adam moments (``checkpoint.pt``; the LR settings stay
            this run's). Every layer must match (a mismatch names it).
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
    t_dist: str = "uniform"
    init_from: str | None = None
    init_weights: str = "ema"
    init_optimizer: bool = False

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")

        for name, lo in (
            ("steps", 1),
            ("batch_size", 1),
            ("warmup", 0),
            ("log_every", 1),
            ("ckpt_every", 0),
            ("seed", 0),
        ):
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
        from ..timesteps import timestep_dist

        timestep_dist(self.t_dist, arg="TrainConfig.t_dist")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"TrainConfig.init_weights must be one of {INIT_WEIGHTS}, got {self.init_weights!r}")
        if (self.init_optimizer or self.init_weights != "ema") and self.init_from is None:
            raise ValueError("TrainConfig.init_weights / init_optimizer need init_from (the run to start from)")
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
    skipped: int = 0  # steps whose non-finite loss or gradient was skipped (nonfinite="skip")


class Schedule:
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
