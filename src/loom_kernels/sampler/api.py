"""``sample``: the public entry of the sampler; checks its arguments once, then runs the fixed-step
loop (eagerly or as a CUDA graph) or dopri5."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .dopri5 import adaptive_grid, run_dopri5
from .field import Field, check_kwargs
from .fixed import ADAPTIVE, eval_mode, interval, make_plan, run_eager
from .graphs import DEFAULT_CACHE, run_graphed
from .options import Guidance, Options, resolve

__all__ = ["sample", "check_x0"]


def check_x0(x0):
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (B, *dims), got {type(x0).__name__}")
    if x0.ndim < 1:
        raise ValueError("x0 must have shape (B, *dims), got a 0-d tensor")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")


def _check_cuda_graph(cuda_graph, x0, progress, method, velocity_hook) -> None:
    if not (isinstance(cuda_graph, str) and cuda_graph == "auto" or cuda_graph is True or cuda_graph is False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if velocity_hook is not None and not callable(velocity_hook):
        raise TypeError(
            f"velocity_hook must be callable as velocity_hook(v) or None, got {type(velocity_hook).__name__}"
        )
    if cuda_graph is not True:
        return
    if velocity_hook is not None:
        raise ValueError(
            "velocity_hook= runs eagerly (a graph would call it only at capture); it cannot be "
            "combined with cuda_graph=True"
        )
    if not x0.is_cuda:
        raise ValueError(f"cuda_graph=True needs x0 on a CUDA device, got x0 on {x0.device}")
    if progress:
        raise ValueError("progress=True runs eagerly; it cannot be combined with cuda_graph=True")
    if method in ADAPTIVE:
        raise ValueError(f"method={method!r} chooses its steps on the host; it cannot run as a CUDA graph")
    if torch.is_autocast_enabled():
        raise ValueError(
            "cuda_graph=True cannot capture inside an autocast region (its weight cache would "
            "outlive the capture); convert the model's dtype instead or pass cuda_graph='auto'"
        )


def sample(
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    nfe: int | None = None,
    *,
    method: str = "euler",
    time_grid: torch.Tensor | Sequence[float] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
    guidance: float | Guidance | None = None,
    options: Options | None = None,
    **legacy,
) -> torch.Tensor:
    """Integrates dx/dt = model(x, t) over ``time_grid``: ``nfe`` evaluations (fixed step) or adaptively (dopri5).

    The arguments follow flow_matching's ``ODESolver.sample`` (``x_init``, ``step_size``, ``method``,
    ``atol``, ``rtol``, ``time_grid``, ``return_intermediates``, ``**model_extras``), with ``nfe`` for
    the step size, plus ``guidance`` and ``options``.

    Args:
        model: the velocity field, called as ``SIGNATURES[options.signature]``; by default
            ``model(x, t, **kw)`` with x of shape (W, *dims) and t of shape (W,) in x's dtype and
            device (W = B, or 2B under guidance); it must return x's shape. An ``nn.Module`` is put
            in eval mode for the call and every submodule's own mode is restored afterwards.
        x0: (B, *dims) floating tensor, the state at the start of ``time_grid`` (noise). Never modified.
        nfe: number of model evaluations: ``steps`` for euler, ``2 * steps`` for midpoint and heun,
            ``4 * steps`` for rk4; None for dopri5. Under guidance one evaluation is one model
            call on the doubled batch and counts as one NFE (the usual convention; the cost per
            call is that of a 2B batch).
        method: one of ``METHODS`` ("euler" order 1, "midpoint" and "heun" order 2 (heun is the
            explicit trapezoidal rule: the last step also makes its correction, unlike EDM's Heun
            sampler), "rk4" order 4) or "dopri5" (adaptive Dormand-Prince 5(4), steps chosen by
            ``rtol``/``atol`` with the RMS error norm over the whole batch, as torchdiffeq does;
            eager, one host read per step).
        time_grid: 1-D tensor/sequence of strictly monotone times, default ``(0.0, 1.0)``; a
            descending grid integrates backwards (data to noise). Two points are the interval,
            split into uniform steps; for fixed-step methods it may instead hold the ``steps + 1``
            grid points; for dopri5 its points are the output times (the trajectory's), each hit
            exactly.
        atol, rtol: dopri5's tolerances.
        return_trajectory: return the states at every grid point, (points, B, *dims), x0 first.
        model_kwargs: dict of keyword inputs passed to every model call (class labels, ...).
            Under guidance the labels (``model_kwargs[guidance.label_key]``) must be a (B,) integer
            tensor, within ``[0, model.num_classes)`` when the model has ``num_classes`` (checked
            once per call, one host read).
        guidance: classifier-free guidance: a scale w or a :class:`Guidance` (scale, null label,
            label key); None for none.
        options: an :class:`Options`: the model's calling convention, CUDA graphs, progress bar,
            dopri5's evaluation budget, the ``info`` dict, the graph cache, a velocity hook.
        **legacy: the keywords written before the grouping, still accepted: ``t0``, ``t1`` (the
            interval; a ``time_grid`` must then run from t0 to t1, checked to 1e-6),
            ``null_label``, ``label_key`` (of a numeric ``guidance``) and every field of ``Options``.

    Returns:
        x1 of shape (B, *dims) in x0's dtype and device, or the trajectory (points, B, *dims).

    Runs under ``torch.no_grad()``; fixed-step methods make no host synchronization inside the
    loop. On CUDA each state update is one fused Triton kernel (fp32 accumulation; float64 states
    use torch ops).

    Example:
        >>> import torch
        >>> from loom_kernels.sampler import Options, sample
        >>> x1 = sample(lambda x, t: -x, torch.ones(4, 2), nfe=8, method="heun")
        >>> x1.shape
        torch.Size([4, 2])
        >>> stats = {}
        >>> x1 = sample(lambda x, t: -x, torch.ones(4, 2), method="dopri5", atol=1e-6, options=Options(info=stats))
        >>> stats["nfe"] > 0
        True
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    check_x0(x0)
    guidance, opts, t0, t1 = resolve(guidance, options, legacy)
    if opts.info is not None and not isinstance(opts.info, dict):
        raise TypeError(
            f"info must be a dict (filled with the evaluation count) or None, got {type(opts.info).__name__}"
        )
    _check_cuda_graph(opts.cuda_graph, x0, opts.progress, method, opts.velocity_hook)
    scale = None if guidance is None else guidance.scale
    null_label = None if guidance is None else guidance.null_label
    label_key = "y" if guidance is None else guidance.label_key
    kwargs = check_kwargs(model, x0, opts.signature, model_kwargs, scale, null_label, label_key)
    if guidance is not None and null_label is None:
        null_label = model.null_label
    field = Field(
        model,
        opts.signature,
        kwargs,
        None if scale is None else float(scale),
        label_key,
        null_label,
        x0.shape[0],
        opts.velocity_hook,
    )
    adaptive = isinstance(method, str) and method in ADAPTIVE
    t0, t1, time_grid = interval(t0, t1, time_grid, adaptive)
    info = opts.info
    if adaptive:
        grid = adaptive_grid(nfe, t0, t1, time_grid, rtol, atol, opts.max_nfe)
        with torch.no_grad(), eval_mode(model):
            field.prepare()
            out, used, steps, rejected = run_dopri5(field, x0, grid, return_trajectory, rtol, atol, opts.max_nfe)
        if info is not None:
            info.update(nfe=used, steps=steps, rejected=rejected)
        return out
    plan = make_plan(method, nfe, t0, t1, time_grid)
    if info is not None:
        info.update(nfe=len(plan.weights))
    graphs = (
        x0.is_cuda
        and opts.cuda_graph is not False
        and not opts.progress
        and opts.velocity_hook is None
        and not torch.is_autocast_enabled()
    )
    with torch.no_grad(), eval_mode(model):
        if graphs:
            with torch.cuda.device(x0.device):
                out = run_graphed(
                    field,
                    x0,
                    plan,
                    return_trajectory,
                    opts.cuda_graph,
                    DEFAULT_CACHE if opts.graph_cache is None else opts.graph_cache,
                )
            if out is not None:
                return out
        return run_eager(field, x0, plan, return_trajectory, opts.progress)
