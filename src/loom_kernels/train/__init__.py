"""A thin flow-matching trainer with exact resume, DDP and any coupling; also ``python -m loom_kernels.train``.

Objective: conditional flow matching / rectified flow (Lipman et al., 2023; Liu et al., 2023):
``x_t = (1 - t) x0 + t x1`` with ``t ~ U[0, 1]`` (or ``TrainConfig.t_dist``, see ``loom_kernels.timesteps``),
regress ``model(x_t, t)`` on ``x1 - x0``. The pairs ``(x0, x1)`` come from a coupling: independent,
minibatch OT (Tong et al., 2023; Pooladian et al., 2023) or LOOM-CFM (Davtyan et al., ICLR 2025), all
called as ``coupling(x1, indices=indices)`` (and ``labels=y`` for labelled data). Class-conditional models
are called as ``model(x_t, t, y=y)`` with labels dropped to ``model.null_label`` at rate ``label_dropout``
(classifier-free guidance).

The loop reads as restore, step, log, checkpoint (one function each, on a ``Run`` holding the state).
A non-finite loss or gradient norm stops the run before the optimizer sees it and before anything is
written (or skips the update, ``nonfinite="skip"``); a checkpoint is never written from non-finite
weights; SIGTERM saves a checkpoint, then exits; a resume with other settings refuses (data, batch
size, seed, precision) or states every setting it overrides.

Exact resume: the data order of epoch ``e`` is a pure function of ``(seed, e)``; the checkpoint keeps
the epoch and the position inside it (the LOOM reference code restarted its epoch counter on resume,
which made its periodic resampling wipe the learned assignment), every RNG state of every rank, the
model, the EMA, the optimizer, the scheduler, the grad scaler and the coupling state. The model kept
for sampling is the EMA (the reference code saved the raw weights).

The package: ``config`` (settings, result, schedule), ``batches`` (device, rank, data order),
``log`` (log.csv), ``run`` (the run's state: build, restore, save), ``step`` (one optimizer step),
``loop`` (the loop and :func:`train`), ``init`` (a fresh run from another run's weights,
``TrainConfig.init_from``); the command line is :mod:`loom_kernels.cli.train`.
"""

from __future__ import annotations

from .._device import resolve_device
from ..checkpoint import load_checkpoint, load_model, save_model
from ..couplings.factory import make_coupling
from .batches import dist_info
from .config import (
    CHECKPOINT,
    FIXED_ON_RESUME,
    LOG,
    LOG_COLUMNS,
    MODEL,
    NONFINITE,
    OVERRIDABLE_ON_RESUME,
    PRECISIONS,
    SCHEDULES,
    Schedule,
    TrainConfig,
    TrainResult,
)
from .loop import train

_Schedule = _Warmup = Schedule  # the names older checkpoints may have pickled

__all__ = [
    "train",
    "TrainConfig",
    "TrainResult",
    "make_coupling",
    "resolve_device",
    "dist_info",
    "load_model",
    "save_model",
    "load_checkpoint",
    "CHECKPOINT",
    "MODEL",
    "LOG",
    "LOG_COLUMNS",
    "PRECISIONS",
    "SCHEDULES",
    "NONFINITE",
    "FIXED_ON_RESUME",
    "OVERRIDABLE_ON_RESUME",
    "Schedule",
]
