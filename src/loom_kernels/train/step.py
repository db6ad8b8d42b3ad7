"""One optimizer step: the next batch, the coupling, the flow-matching loss, the guard against a
non-finite loss or gradient (before the optimizer sees it), the update and the EMA; and the logged row."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..couplings.base import call_coupling
from ..couplings.semidiscrete import SemidiscreteCoupling
from ..timesteps import timestep_dist
from .batches import epoch_order, fetch
from .log import stat
from .run import Run, ema_update


def next_batch(run: Run):
    """The next (indices, x1, labels) of this rank, advancing the epoch when it is used up."""
    b, global_batch = run.cfg.batch_size, run.world * run.cfg.batch_size
    if run.order is None or run.seen + global_batch > run.steps_per_epoch * global_batch:
        if run.order is not None:
            run.epoch, run.seen = run.epoch + 1, 0
        run.order = epoch_order(len(run.dataset), run.cfg.seed, run.epoch)
    idx = run.order[run.seen + run.rank * b : run.seen + (run.rank + 1) * b]
    if isinstance(run.coupling, SemidiscreteCoupling):  # fresh noise chooses the items (SD-FM's loader)
        idx = run.coupling.draw(b, part=(run.rank, run.world))
    run.seen += global_batch
    x1, y = fetch(run.dataset, idx)
    return idx, x1.to(run.device, non_blocking=True), (None if y is None else y.to(run.device))


def _model_labels(run: Run, y):
    if y is None or run.cfg.label_dropout == 0:
        return y
    null = getattr(run.model, "null_label", None)
    if not isinstance(null, int):
        raise ValueError("label_dropout needs a model with an integer .null_label (e.g. models.UNet(num_classes=...))")
    drop = torch.rand(y.shape, device=y.device) < run.cfg.label_dropout
    return torch.where(drop, torch.full_like(y, null), y)


def _loss(run: Run):
    """The flow-matching loss of the next batch (a 0-dim float32 tensor)."""
    cfg = run.cfg
    idx, x1, y = next_batch(run)
    # CPU indices: every coupling accepts them (LoomCoupling's table may live on either side).
    draw = timestep_dist(cfg.t_dist).sample
    if run.coupling.accepts_t:  # t first, for the coupling; otherwise the order (and streams) of old runs
        t = draw(x1.shape[0], device=run.device)
        x0, x1 = call_coupling(run.coupling, x1, idx, labels=y, t=t)
    else:
        x0, x1 = run.coupling(x1, indices=idx, labels=y)
        t = draw(x1.shape[0], device=run.device)
    tb = t.view(-1, *([1] * (x1.ndim - 1)))
    xt = (1 - tb) * x0 + tb * x1
    if cfg.sigma > 0:
        xt = xt + cfg.sigma * torch.randn_like(xt)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    kw = {} if y is None else {"y": _model_labels(run, y)}
    with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
        v = run.net(xt, t, **kw)
    return F.mse_loss(v.float(), (x1 - x0).float())


def _grad_norm(run: Run) -> torch.Tensor:
    """The 2-norm of all gradients, as ``clip_grad_norm_`` computes it (0-dim tensor, no host read)."""
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    return nn.utils.get_total_norm(grads, 2.0, False, None)


def step(run: Run):
    """One optimizer step; returns (loss tensor, lr used).

    A non-finite loss or gradient norm stops or skips the step (``cfg.nonfinite``) before the
    optimizer, the EMA or a checkpoint sees it: a finite loss can still carry a NaN gradient (a model
    computing ``0 * sqrt(p)`` at p = 0), which clipping and Adam would spread into every weight. Under
    fp16 the grad scaler already skips non-finite gradients (and lowers its scale), so only the loss
    is checked there.
    """
    cfg = run.cfg
    # The forward pass updates BatchNorm's running statistics before the loss is checked: a skipped
    # step must leave them as they were (NaN there would reach the EMA and refuse every checkpoint).
    buffers = [b.detach().clone() for b in run.model.buffers()] if cfg.nonfinite == "skip" else None
    loss = _loss(run)
    lr = run.opt.param_groups[0]["lr"]  # the rate this step uses (sched.step() moves to the next)
    run.opt.zero_grad(set_to_none=True)
    guard_grads = not run.scaler.is_enabled()
    norm = None
    if guard_grads:  # backward first: the gradient's check shares the loss's one host read
        loss.backward()
        norm = _grad_norm(run)
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm)])
    else:
        bad = torch.stack([~torch.isfinite(loss.detach()), torch.zeros((), dtype=torch.bool, device=loss.device)])
    bad_loss, bad_grad, scaler_stuck, run.terminate = _agree(run, bad, run.sigterm["set"])
    finite = not (bad_loss or bad_grad)
    if not finite and cfg.nonfinite == "stop":
        _stop(run, loss, norm, bad_loss)
    if scaler_stuck and cfg.nonfinite == "stop":
        _stop_scaler(run)
    if finite:
        if not guard_grads:
            run.scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                run.scaler.unscale_(run.opt)
                nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        elif cfg.grad_clip is not None:  # clip_grad_norm_ is exactly this norm, then this scaling
            nn.utils.clip_grads_with_norm_(run.model.parameters(), cfg.grad_clip, norm, None)
        before = _scale(run)
        run.scaler.step(run.opt)
        run.scaler.update()
        _count_scaler_skips(run, before)
    else:
        run.skipped += 1
        if buffers is not None:
            with torch.no_grad():
                for b, saved in zip(run.model.buffers(), buffers):
                    b.copy_(saved)
    run.sched.step()
    run.step += 1
    if finite:
        ema_update(run.ema, run.model, min(cfg.ema_decay, (1 + run.step) / (10 + run.step)))
    return loss.detach(), lr


# fp16: this many optimizer steps in a row skipped by the grad scaler is a persistent NaN/inf gradient,
# not an overflow it can back off from (64 halvings take the default scale 2**16 down to 2**-48).
SCALER_STUCK = 64


def _scale(run: Run):
    """The grad scaler's scale tensor (a copy, on the device), or None without a scaler."""
    scale = getattr(run.scaler, "_scale", None) if run.scaler.is_enabled() else None
    return None if scale is None else scale.detach().clone()


def _count_scaler_skips(run: Run, before) -> None:
    """Counts the scaler's consecutive skipped steps on the device (it lowers its scale exactly when it
    skips); the count joins the next step's one host read (``_agree``)."""
    after = _scale(run)
    if before is None or after is None:
        return
    lowered = (after < before).to(torch.int32).reshape(())
    run.scaler_skips = (run.scaler_skips + lowered) * lowered


def _stop_scaler(run: Run):
    raise FloatingPointError(
        f"the fp16 grad scaler skipped the last {SCALER_STUCK} optimizer steps in a row (step {run.step}): the "
        "gradient is non-finite at every scale, so training made no progress; training stopped without writing a "
        "checkpoint"
        + (f" (the last good one is {run.ckpt_path})" if run.ckpt_path and os.path.exists(run.ckpt_path) else "")
        + "; lower --lr, train in bf16/fp32, or pass nonfinite='skip' to keep going"
    )


def _stop(run: Run, loss, norm, bad_loss: bool):
    """Raises the non-finite stop: nothing of this step was applied and no checkpoint written."""
    mine_bad = not bool(torch.isfinite(loss)) if bad_loss else norm is not None and not bool(torch.isfinite(norm))
    where = "" if run.world == 1 else f" on rank {run.rank}" if mine_bad else " on another rank"
    what = (
        f"non-finite loss ({float(loss.detach())}{where})"
        if bad_loss
        else f"non-finite gradient norm ({float(norm) if norm is not None else 'nan'}{where}; loss "
        f"{float(loss.detach()):.6g})"
    )
    raise FloatingPointError(
        f"{what} at step {run.step + 1}: training stopped before the optimizer step, without writing a checkpoint"
        + (f" (the last good one is {run.ckpt_path})" if run.ckpt_path and os.path.exists(run.ckpt_path) else "")
        + "; lower --lr, or pass nonfinite='skip' to skip such steps"
    )


def _agree(run: Run, bad: torch.Tensor, sigterm: bool) -> tuple[bool, bool, bool, bool]:
    """(the loss is non-finite on some rank, the gradient norm is, the fp16 scaler is stuck on some rank,
    some rank got SIGTERM): the step's one host read.

    Under DDP one 3-element all-reduce first, so that all ranks skip, stop or save and exit at the same
    step: a rank acting alone would leave the others waiting in DDP's backward or in the collective save.
    """
    stuck = torch.as_tensor(run.scaler_skips, device=bad.device).reshape(1) >= SCALER_STUCK
    flags = torch.cat(
        [
            bad.to(torch.int32),
            stuck.to(torch.int32),
            torch.tensor([int(sigterm)], dtype=torch.int32, device=bad.device),
        ]
    )
    if run.world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad_loss, bad_grad, stuck, term = flags.tolist()
    return bool(bad_loss), bool(bad_grad), bool(stuck), bool(term)


def log_row(run: Run, loss, lr, bar) -> None:
    if run.world > 1:
        torch.distributed.all_reduce(loss)
        loss = loss / run.world
    stats = run.coupling.stats
    row = {
        "step": run.step,
        "epoch": run.epoch,
        "loss": float(loss),
        "pre_cost": stat(stats, "pre_cost"),
        "post_cost": stat(stats, "post_cost"),
        "swaps": stat(stats, "swaps"),
        "lr": lr,
    }
    run.history.append(row)
    if run.log is not None:
        run.log.write(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
