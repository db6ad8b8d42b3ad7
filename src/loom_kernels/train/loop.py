"""The loop (restore, step, log, checkpoint) and :func:`train`, the trainer's entry."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import warnings

import torch
from torch import nn

from .batches import epoch_order
from .config import LOG, TrainConfig, TrainResult
from .lock import RunDirInUseError, lock_run_dir, unlock_run_dir
from .log import CsvLog
from .run import Run, build, restore, save
from .step import log_row, step


@contextlib.contextmanager
def sigterm_flag():
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


def loop(run: Run, callback, callback_every) -> None:
    cfg = run.cfg
    bar = None
    if run.rank == 0 and cfg.progress:
        from .._optional import require

        tqdm = require("tqdm.auto", "the training progress bar (or --no-progress / progress=False)").tqdm
        bar = tqdm(
            total=cfg.steps, initial=run.step, desc=f"train[{type(run.user_coupling).__name__}]", dynamic_ncols=True
        )
    run.model.train()
    try:
        with sigterm_flag() as run.sigterm:
            while run.step < cfg.steps:
                loss, lr = step(run)
                if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                    log_row(run, loss, lr, bar)
                if bar is not None:
                    bar.update(1)
                if callback is not None and run.step % callback_every == 0:
                    callback(run.step, model=run.model, ema=run.ema, coupling=run.user_coupling)
                if run.terminate:
                    if cfg.out_dir:
                        save(run)
                    raise SystemExit(
                        f"SIGTERM at step {run.step}: saved {run.ckpt_path}; exiting"
                        if cfg.out_dir
                        else f"SIGTERM at step {run.step}: exiting (no out_dir)"
                    )
                if cfg.ckpt_every and run.step % cfg.ckpt_every == 0 and run.step < cfg.steps:
                    save(run)
            if cfg.out_dir:
                save(run)
    finally:
        if bar is not None:
            bar.close()


def _lock_out_dir(run: Run) -> int | None:
    """Rank 0 locks ``out_dir`` (the only rank that writes there); every rank raises if it is held."""
    if not run.cfg.out_dir:
        return None
    fd, err = None, None
    if run.rank == 0:
        try:
            fd = lock_run_dir(run.cfg.out_dir)
        except RunDirInUseError as e:
            err = e
    if run.world > 1:
        held = torch.tensor([int(err is not None)], device=run.device)
        torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        if held.item() and err is None:
            raise RunDirInUseError(f"{run.cfg.out_dir!r} is in use by another trainer (rank 0 found it locked)")
    if err is not None:
        raise err
    return fd


def train(
    model: nn.Module,
    dataset,
    coupling,
    config: TrainConfig | None = None,
    *,
    callback=None,
    callback_every: int = 0,
    metadata: dict | None = None,
) -> TrainResult:
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
    run = build(model, dataset, coupling, cfg, metadata)
    lock = _lock_out_dir(run)  # before the checkpoint is read: a second trainer must not resume it too
    try:
        resumed = restore(run)
        if cfg.init_from is not None and not resumed:
            from .init import init_from

            init_from(run)
        if run.rank == 0 and cfg.out_dir:
            os.makedirs(cfg.out_dir, exist_ok=True)
            run.log = CsvLog(os.path.join(cfg.out_dir, LOG), run.step if resumed else None)
        if resumed:
            run.order = epoch_order(len(dataset), cfg.seed, run.epoch)
        try:
            loop(run, callback, callback_every)
        except BaseException:
            if run.log is not None:
                run.log.close(quiet=True)  # the first error is the one to see, not one from closing
            raise
        if run.log is not None:
            run.log.close()
    finally:
        unlock_run_dir(lock)
    if run.skipped:
        warnings.warn(
            f"{run.skipped} of the steps had a non-finite loss or gradient and were skipped",
            RuntimeWarning,
            stacklevel=2,
        )
    return TrainResult(
        model=run.model, ema=run.ema, history=run.history, step=run.step, out_dir=cfg.out_dir, skipped=run.skipped
    )
