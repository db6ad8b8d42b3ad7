"""A fresh run's start from another run's weights (``TrainConfig.init_from``, ``--init-from``): reflow's
usual start (the reflow model begins as the model that made the pairs)."""

from __future__ import annotations

import torch

from ..checkpoint import load_checkpoint
from .run import Run


def check_same_layers(model: torch.nn.Module, state: dict, path: str) -> None:
    """Raises a ValueError naming the first layer whose name or shape differs between ``model`` and ``state``."""
    mine = model.state_dict()
    for k, v in mine.items():
        if k not in state:
            raise ValueError(f"--init-from {path!r} has no layer {k!r} (the model has it, shape {tuple(v.shape)})")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"--init-from {path!r}: layer {k!r} has shape {tuple(state[k].shape)} there, {tuple(v.shape)} in "
                f"this model; build the model with the same architecture"
            )
    extra = [k for k in state if k not in mine]
    if extra:
        raise ValueError(f"--init-from {path!r} has layer {extra[0]!r} that this model lacks ({len(extra)} extra)")


def init_from(run: Run) -> None:
    """Loads ``cfg.init_from`` into the model and its EMA (and the optimizer's moments if asked)."""
    cfg, path = run.cfg, run.cfg.init_from
    ck = load_checkpoint(path, map_location=run.device)
    full = ck["format"] == "loom_kernels.checkpoint"
    if not full and (cfg.init_weights == "raw" or cfg.init_optimizer):
        what = "init_weights='raw'" if cfg.init_weights == "raw" else "init_optimizer"
        raise ValueError(f"{what} needs a checkpoint.pt (the raw weights and optimizer); {path!r} holds only the EMA")
    state = ck["model"] if not full or cfg.init_weights == "raw" else ck["ema"]
    check_same_layers(run.model, state, path)
    run.model.load_state_dict(state)
    run.ema.load_state_dict(state)
    if cfg.init_optimizer:
        # Adam's moments and step counts only: this run's LR, warm-up and weight decay stay in force.
        own = run.opt.state_dict()
        theirs = ck["optimizer"]
        sizes = [[len(g["params"]) for g in sd["param_groups"]] for sd in (theirs, own)]
        if sizes[0] != sizes[1]:
            raise ValueError(f"--init-from {path!r}: its optimizer holds other parameter groups than this model's")
        run.opt.load_state_dict({"state": theirs["state"], "param_groups": own["param_groups"]})
