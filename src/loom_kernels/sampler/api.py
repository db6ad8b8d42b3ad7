"""``sample``: the public entry of the sampler; checks its arguments once, then runs the fixed-step
loop (eagerly or as a CUDA graph) or dopri5."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .dopri5 import adaptive_grid, run_dopri5
from .field import Field, check_kwargs
from .fixed import ADAPTIVE, eval_mode, make_plan, run_eager
from .graphs import DEFAULT_CACHE, GraphCache, run_graphed

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
    t0: float = 0.0,
    t1: float = 1.0,
    time_grid: torch.Tensor | Sequence[float] | None = None,
    return_trajectory: bool = False,
    cuda_graph: bool | str = "auto",
    progress: bool = False,
    model_kwargs: dict | None = None,
    guidance: float | None = None,
    null_label: int | torch.Tensor | None = None,
    label_key: str = "y",
    signature: str = "xt",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_nfe: int = 10_000,
    info: dict | None = None,
    graph_cache: GraphCache | None = None,
    velocity_hook: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrates dx/dt = model(x, t) from t0 to t1: ``nfe`` evaluations (fixed step) or adaptively (dopri5).

    Args:
        model: the velocity field, called as ``SIGNATURES[signature]``; by default ``model(x, t, **kw)``
            with x of shape (W, *dims) and t of shape (W,) in x's dtype and device (W = B, or 2B
            under guidance); it must return x's shape. An ``nn.Module`` is put in eval mode for the
            call and every submodule's own mode is restored afterwards.
        x0: (B, *dims) floating tensor, the state at t0 (noise). Never modified.
        nfe: number of model evaluations: ``steps`` for euler, ``2 * steps`` for midpoint and heun
            (which need an even nfe); None for dopri5. Under guidance one evaluation is one model
            call on the doubled batch and counts as one NFE (the usual convention; the cost per
            call is that of a 2B batch).
        method: "euler" (order 1), "midpoint" (order 2), "heun" (order 2, the explicit
            trapezoidal rule: the last step also makes its correction, unlike EDM's Heun sampler)
            or "dopri5" (adaptive Dormand-Prince 5(4), steps chosen by ``rtol``/``atol`` with the RMS
            error norm over the whole batch, as torchdiffeq does; eager, one host read per step).
        t0, t1: the interval; t1 < t0 integrates backwards (data to noise).
        time_grid: optional 1-D tensor/sequence of strictly monotone times from t0 to t1 (checked
            to 1e-6): for fixed-step methods the ``steps + 1`` grid points, replacing the uniform
            grid; for dopri5 the output times (the trajectory's points), each hit exactly.
        return_trajectory: return the states at every grid point, (points, B, *dims), x0 first.
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
        model_kwargs: dict of keyword inputs passed to every model call (class labels, ...).
            Labels under ``label_key`` must be a (B,) integer tensor, within ``[0, model.num_classes)``
            when the model has ``num_classes`` (checked once per call, one host read).
        guidance: classifier-free guidance scale w, or None. Each evaluation calls the model once on
            ``[x; x]`` with labels ``[y; null_label]`` (other per-sample tensors of ``model_kwargs``,
            first dimension B, are repeated) and uses ``v_null + w (v_cond - v_null)``: w = 1 is
            the plain conditional model, w = 0 the unconditional one.
        null_label: the label meaning "no class" (default: ``model.null_label``, as ``models.UNet`` has).
        label_key: the key of the labels in ``model_kwargs`` (``"y"``, TorchCFM's name).
        signature: the model's calling convention, one of ``SIGNATURES``: "xt" (ours), "torchcfm"
            (``forward(t, x, y=...)``), "torchdiffeq" (``func(t, x)``, t 0-dim) or "flow_matching"
            (``model(x=x, t=t, **extras)``, t 0-dim).
        rtol, atol: dopri5's tolerances. max_nfe: dopri5 raises RuntimeError before exceeding it.
        info: optional dict, filled with ``"nfe"`` (evaluations made) and, for dopri5,
            ``"steps"`` (accepted) and ``"rejected"``.
        graph_cache: the :class:`GraphCache` that keeps this call's CUDA graph; None uses the
            default one (``clear_graph_cache()``).
        velocity_hook: optional callable, given every model output ``v`` (W, *dims) as the model
            returned it (under guidance the doubled batch, before the halves are combined), in call
            order; a hook makes the call eager (no CUDA graph). With :func:`quadrature`'s weights
            it gives the path's velocities, as ``metrics.straightness`` uses them.

    Returns:
        x1 of shape (B, *dims) in x0's dtype and device, or the trajectory (points, B, *dims).

    Runs under ``torch.no_grad()``; fixed-step methods make no host synchronization inside the
    loop. On CUDA each state update is one fused Triton kernel (fp32 accumulation; float64 states
    use torch ops).

    Example:
        >>> import torch
        >>> from loom_kernels.sampler import sample
        >>> x1 = sample(lambda x, t: -x, torch.ones(4, 2), nfe=8, method="heun")
        >>> x1.shape
        torch.Size([4, 2])
        >>> stats = {}
        >>> x1 = sample(lambda x, t: -x, torch.ones(4, 2), method="dopri5", rtol=1e-6, atol=1e-6, info=stats)
        >>> stats["nfe"] > 0
        True
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    check_x0(x0)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be a dict (filled with the evaluation count) or None, got {type(info).__name__}")
    _check_cuda_graph(cuda_graph, x0, progress, method, velocity_hook)
    kwargs = check_kwargs(model, x0, signature, model_kwargs, guidance, null_label, label_key)
    if guidance is not None and null_label is None:
        null_label = model.null_label
    field = Field(
        model,
        signature,
        kwargs,
        None if guidance is None else float(guidance),
        label_key,
        null_label,
        x0.shape[0],
        velocity_hook,
    )
    if isinstance(method, str) and method in ADAPTIVE:
        grid = adaptive_grid(nfe, t0, t1, time_grid, rtol, atol, max_nfe)
        with torch.no_grad(), eval_mode(model):
            field.prepare()
            out, used, steps, rejected = run_dopri5(field, x0, grid, return_trajectory, rtol, atol, max_nfe)
        if info is not None:
            info.update(nfe=used, steps=steps, rejected=rejected)
        return out
    plan = make_plan(method, nfe, t0, t1, time_grid)
    if info is not None:
        info.update(nfe=len(plan.weights))
    graphs = (
        x0.is_cuda
        and cuda_graph is not False
        and not progress
        and velocity_hook is None
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
                    cuda_graph,
                    DEFAULT_CACHE if graph_cache is None else graph_cache,
                )
            if out is not None:
                return out
        return run_eager(field, x0, plan, return_trajectory, progress)
