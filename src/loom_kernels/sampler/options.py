"""``sample``'s grouped options: ``Guidance`` (classifier-free guidance) and ``Options`` (how the call
runs), and the keywords ``sample`` took before they were grouped, still accepted."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .graphs import GraphCache

__all__ = ["Guidance", "Options", "LEGACY", "resolve"]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance (Ho & Salimans 2022): ``v_null + scale (v_cond - v_null)``.

    Each evaluation calls the model once on ``[x; x]`` with labels ``[y; null_label]`` (other
    per-sample tensors of ``model_kwargs``, first dimension B, are repeated): scale = 1 is the plain
    conditional model, scale = 0 the unconditional one.

    Args:
        scale: the guidance scale w.
        null_label: the label meaning "no class" (default: ``model.null_label``, as ``models.UNet`` has).
        label_key: the key of the labels in ``model_kwargs`` (``"y"``, TorchCFM's name).
    """

    scale: float
    null_label: int | torch.Tensor | None = None
    label_key: str = "y"


@dataclass(frozen=True)
class Options:
    """How ``sample`` runs, apart from the ODE it solves.

    Args:
        signature: the model's calling convention, one of ``SIGNATURES``: "xt" (``model(x, t, **kw)``),
            "torchcfm" (``forward(t, x, y=...)``), "torchdiffeq" (``func(t, x)``, t 0-dim) or
            "flow_matching" (``model(x=x, t=t, **extras)``, t 0-dim).
        cuda_graph: CUDA tensors, fixed-step methods only. "auto" runs eagerly on the first call
            and captures the loop as a CUDA graph on the second call with the same (model, shape,
            dtype, device, nfe, method, grid, kwargs shapes and non-tensor values, guidance),
            replaying it from then on; a model that cannot be captured (host syncs, ...) falls back
            to eager with one warning. True captures on the first call and raises if capture
            fails; False never captures. Graphs read parameters by address, so in-place updates
            (optimizer steps, ``load_state_dict``) are seen; tensors in ``model_kwargs`` are static
            inputs, copied into the graph before each replay; a model whose Python-side behaviour
            changes between calls needs ``cuda_graph=False``. Ignored ("auto") or an error (True)
            on CPU tensors, under autocast and for dopri5.
        progress: show a tqdm bar over the steps; the loop then runs eagerly (no graph).
        max_nfe: dopri5 raises RuntimeError before exceeding it.
        info: optional dict, filled with ``"nfe"`` (evaluations made) and, for dopri5,
            ``"steps"`` (accepted) and ``"rejected"``.
        graph_cache: the :class:`GraphCache` that keeps this call's CUDA graph; None uses the
            default one (``clear_graph_cache()``).
        velocity_hook: optional callable, given every model output ``v`` (W, *dims) as the model
            returned it (under guidance the doubled batch, before the halves are combined), in call
            order; a hook makes the call eager (no CUDA graph). With :func:`quadrature`'s weights
            it gives the path's velocities, as ``metrics.straightness`` uses them.
    """

    signature: str = "xt"
    cuda_graph: bool | str = "auto"
    progress: bool = False
    max_nfe: int = 10_000
    info: dict | None = None
    graph_cache: GraphCache | None = None
    velocity_hook: Callable[[torch.Tensor], None] | None = None


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))
#: the keywords ``sample`` took before its options were grouped
LEGACY = ("t0", "t1", "null_label", "label_key") + _OPTION_NAMES


def resolve(guidance, options, legacy: dict) -> tuple:
    """``(guidance or None, options, t0 or None, t1 or None)`` from ``sample``'s grouped and legacy keywords."""
    unknown = sorted(set(legacy) - set(LEGACY))
    if unknown:
        raise TypeError(f"sample() got unexpected keyword arguments {unknown} (options: {list(LEGACY)})")
    if options is None:
        options = Options()
    elif not isinstance(options, Options):
        raise TypeError(f"options must be a loom_kernels.sampler.Options or None, got {type(options).__name__}")
    moved = {k: legacy[k] for k in _OPTION_NAMES if k in legacy}
    if moved:
        options = dataclasses.replace(options, **moved)
    labels = {k: legacy[k] for k in ("null_label", "label_key") if k in legacy}
    if isinstance(guidance, Guidance):
        if labels:
            raise TypeError(f"pass {sorted(labels)} inside Guidance(...), not beside it")
    elif guidance is not None:  # a scale: checked with the labels (field.check_kwargs)
        guidance = Guidance(guidance, **labels)
    return guidance, options, legacy.get("t0"), legacy.get("t1")
