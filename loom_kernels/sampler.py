"""Fixed-step ODE samplers for flow-matching models: Euler, explicit midpoint, Heun.

Integrates dx/dt = model(x, t) from t0 (noise) to t1 (data) with exactly ``nfe`` model
evaluations. Methods (E. Hairer, S. P. Norsett, G. Wanner, "Solving Ordinary Differential
Equations I", sec. II.1):
- euler:    x' = x + h v(x, t)                                   (1 NFE per step, order 1)
- midpoint: x' = x + h v(x + h/2 v(x, t), t + h/2)               (2 NFE per step, order 2)
- heun:     x' = x + h/2 (v(x, t) + v(x + h v(x, t), t + h))     (2 NFE per step, order 2;
            the explicit trapezoidal rule, *not* the EDM variant (Karras et al. 2022) that skips
            the correction on the last step: every step, the last included, costs 2 NFE.)

CUDA: every state update is one fused Triton kernel (``_ode_update_kernel``), the loop never
synchronizes with the host, and repeated calls replay the whole loop as a CUDA graph. CPU: the
same updates in plain torch.
"""
from __future__ import annotations

import collections
import math
import operator
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ._triton import interpreting, tl, triton

__all__ = ["sample", "clear_graph_cache", "METHODS"]

#: model evaluations per step of each method
METHODS = {"euler": 1, "midpoint": 2, "heun": 2}

# Private switch: run the Triton update kernel on CPU tensors (needs TRITON_INTERPRET=1 set
# before triton is imported). Tests flip it to exercise the kernel without a GPU.
_TRITON_ON_CPU = False

# ---- the fused update kernel -----------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ode_update_kernel(
        x_ptr,  # [n] state, any float dtype
        v1_ptr,  # [n] velocity
        v2_ptr,  # [n] second velocity (read only when TWO)
        out_ptr,  # [n] new state, x's dtype; may alias x_ptr
        a,  # fp32 scalar: coefficient of v1
        b,  # fp32 scalar: coefficient of v2
        n,
        TWO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # out = x + (a*v1 + b*v2) in fp32, rounded once to the state's dtype. The velocities are
        # combined first: it keeps x + (h/2)(v + v) == x + h v exactly, as in the torch path.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        step = a * tl.load(v1_ptr + offs, mask=mask).to(tl.float32)
        if TWO:
            step += b * tl.load(v2_ptr + offs, mask=mask).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, (x + step).to(out_ptr.dtype.element_ty), mask=mask)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


def _use_triton(x: torch.Tensor) -> bool:
    # float64 states keep the torch path: Triton passes Python floats as fp32, which would round h.
    if triton is None or x.dtype not in _TRITON_DTYPES:
        return False
    if x.is_cuda:
        return True
    if _TRITON_ON_CPU:
        if not interpreting():
            raise RuntimeError(
                "loom_kernels.sampler._TRITON_ON_CPU needs TRITON_INTERPRET=1 set before triton "
                "is imported"
            )
        return True
    return False


def _update(x, v1, v2, a: float, b: float, out) -> None:
    """out = x + a*v1 (+ b*v2); `out` is contiguous and may be `x` itself (elementwise, safe)."""
    if out.numel() == 0:
        return
    if _use_triton(out):
        v1 = v1.contiguous()
        v2 = v1 if v2 is None else v2.contiguous()
        n = out.numel()
        _ode_update_kernel[(triton.cdiv(n, _BLOCK),)](
            x, v1, v2, out, float(a), float(b), n,
            TWO=v2 is not v1, BLOCK=_BLOCK, num_warps=4,
        )
        return
    if v2 is not None:  # velocities first, as in the kernel: x + (a v1 + b v2)
        v1 = torch.add(v1 * a, v2, alpha=b)
        a = 1.0
    torch.add(x, v1, alpha=a, out=out)


# ---- the time grid -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    method: str
    grid: tuple  # steps + 1 floats (float64), t0 ... t1
    eval_times: tuple  # nfe floats: the time of each model evaluation, in call order
    weights: tuple  # nfe floats: quadrature weight of each evaluation (sum = t1 - t0)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1


def _check_real(name, value) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)  # ints, numpy scalars, 1-element tensors
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _make_plan(method, nfe, t0, t1, time_grid) -> _Plan:
    """Validates (method, nfe, t0, t1, time_grid) and lays out every evaluation."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(nfe, bool):
        raise TypeError("nfe must be an int, got bool")
    try:
        nfe = operator.index(nfe)
    except TypeError:
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}") from None
    stages = METHODS[method]
    if nfe < stages or nfe % stages:
        need = "a positive integer" if stages == 1 else f"a positive multiple of {stages}"
        raise ValueError(f"nfe must be {need} for method={method!r} ({stages} NFE per step), got {nfe}")
    steps = nfe // stages
    t0 = _check_real("t0", t0)
    t1 = _check_real("t1", t1)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    if time_grid is None:
        grid = [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]
        grid[-1] = t1
    else:
        # One host read, before the loop (a CUDA grid syncs here, never inside the loop).
        g = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
        if g.ndim != 1 or g.numel() != steps + 1:
            raise ValueError(
                f"time_grid must be 1-D with nfe/{stages} + 1 = {steps + 1} points for "
                f"method={method!r}, nfe={nfe}, got shape {tuple(g.shape)}"
            )
        grid = g.tolist()
        if not all(math.isfinite(t) for t in grid):
            raise ValueError("time_grid must be finite, got NaN or inf entries")
        sign = 1.0 if t1 > t0 else -1.0
        if any(sign * (b - a) <= 0 for a, b in zip(grid, grid[1:])):
            order = "increasing" if sign > 0 else "decreasing"
            raise ValueError(f"time_grid must be strictly {order} from t0={t0} to t1={t1}, got {grid}")
        for name, want, got in (("t0", t0, grid[0]), ("t1", t1, grid[-1])):
            if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
                raise ValueError(
                    f"time_grid must run from t0={t0} to t1={t1} (pass t0/t1 to match a grid on "
                    f"another interval), got time_grid[{0 if name == 't0' else -1}] = {got}"
                )
    hs = [b - a for a, b in zip(grid, grid[1:])]
    if method == "euler":
        times, weights = grid[:-1], hs
    elif method == "midpoint":
        times = [t for a, h in zip(grid, hs) for t in (a, a + 0.5 * h)]
        weights = [w for h in hs for w in (0.0, h)]
    else:  # heun
        times = [t for a, b in zip(grid, grid[1:]) for t in (a, b)]
        weights = [w for h in hs for w in (0.5 * h, 0.5 * h)]
    return _Plan(method, tuple(grid), tuple(times), tuple(weights))


# ---- the integration loop (shared by eager runs and graph capture) ------------------------------


@dataclass
class _Buffers:
    state: torch.Tensor  # (B, *d) running state when no trajectory is kept; else None
    traj: torch.Tensor  # (steps + 1, B, *d) or None
    stage: torch.Tensor  # (B, *d) intermediate point of two-stage methods, or None
    times: torch.Tensor  # (nfe, B) evaluation times in x's dtype

    @property
    def input(self) -> torch.Tensor:
        return self.traj[0] if self.traj is not None else self.state

    @property
    def output(self) -> torch.Tensor:
        return self.traj if self.traj is not None else self.state


def _alloc(x0: torch.Tensor, plan: _Plan, return_trajectory: bool) -> _Buffers:
    shape = tuple(x0.shape)
    opts = dict(dtype=x0.dtype, device=x0.device)
    traj = torch.empty((plan.steps + 1,) + shape, **opts) if return_trajectory else None
    state = None if return_trajectory else torch.empty(shape, **opts)
    stage = torch.empty(shape, **opts) if METHODS[plan.method] == 2 else None
    times = _eval_times(plan.eval_times, x0.dtype, x0.device)[:, None].expand(-1, shape[0]).contiguous()
    return _Buffers(state, traj, stage, times)


_TIMES: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()


def _eval_times(values: tuple, dtype, device) -> torch.Tensor:
    """(nfe,) evaluation times on `device`, cached: a host-to-device copy from pageable memory
    waits for the stream, so repeated calls must not pay it. Callers copy before handing it out."""
    key = (values, dtype, device)
    t = _TIMES.get(key)
    if t is None:
        t = torch.tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)
        _TIMES[key] = t
        while len(_TIMES) > 64:
            _TIMES.popitem(last=False)
    else:
        _TIMES.move_to_end(key)
    return t


def _velocity(model, x, t, hook=None):
    v = model(x, t)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"model(x, t) must return a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape or v.device != x.device or not v.is_floating_point():
        raise ValueError(
            f"model(x, t) must return a floating velocity shaped like x {tuple(x.shape)} on "
            f"{x.device}, got {tuple(v.shape)} {v.dtype} on {v.device}"
        )
    if hook is not None:
        hook(v)
    return v


def _loop(model, bufs: _Buffers, plan: _Plan, steps_iter=None, hook=None) -> None:
    """Runs every step, writing into `bufs`; launches only, never reads a value back."""
    x = bufs.input
    tt = bufs.times.unbind(0)  # all t views at once: indexing a tensor per call costs microseconds
    grid = plan.grid
    for k in steps_iter if steps_iter is not None else range(plan.steps):
        h = grid[k + 1] - grid[k]
        out = bufs.traj[k + 1] if bufs.traj is not None else x
        if plan.method == "euler":
            v = _velocity(model, x, tt[k], hook)
            _update(x, v, None, h, 0.0, out)
        elif plan.method == "midpoint":
            v1 = _velocity(model, x, tt[2 * k], hook)
            _update(x, v1, None, 0.5 * h, 0.0, bufs.stage)
            v2 = _velocity(model, bufs.stage, tt[2 * k + 1], hook)
            _update(x, v2, None, h, 0.0, out)
        else:  # heun
            v1 = _velocity(model, x, tt[2 * k], hook)
            _update(x, v1, None, h, 0.0, bufs.stage)
            v2 = _velocity(model, bufs.stage, tt[2 * k + 1], hook)
            _update(x, v1, v2, 0.5 * h, 0.5 * h, out)
        x = out


@contextmanager
def _eval_mode(model):
    """Puts an nn.Module in eval mode and restores every submodule's own flag afterwards."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in saved:
            if m.training != flag:  # nn.Module.__setattr__ is slow; most flags did not change
                m.training = flag


def _run_eager(model, x0, plan, return_trajectory, progress=False, hook=None) -> torch.Tensor:
    bufs = _alloc(x0, plan, return_trajectory)
    bufs.input.copy_(x0)
    steps_iter = None
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(range(plan.steps), desc=f"sample ({plan.method}, nfe={len(plan.weights)})")
    _loop(model, bufs, plan, steps_iter, hook)
    return bufs.output


# ---- CUDA graphs -------------------------------------------------------------------------------


@dataclass
class _Graphed:
    graph: object  # torch.cuda.CUDAGraph
    bufs: _Buffers
    model_ref: object  # weakref to the model: a recycled id() must not hit the cache


_GRAPHS: "collections.OrderedDict[tuple, _Graphed]" = collections.OrderedDict()
_SEEN: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
_FAILED: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
_MAX_GRAPHS = 4  # each graph pins its memory pool (the loop's peak activations)
_MAX_KEYS = 256
_warned_capture = False


def clear_graph_cache() -> None:
    """Drops every captured CUDA graph (and the GPU memory it holds).

    Call it after rebinding tensors that a plain-function model closes over; ``nn.Module``
    parameters changed in place (optimizer steps, ``load_state_dict``, EMA ``copy_``) need nothing.

    Example::

        loom_kernels.sampler.clear_graph_cache()
    """
    _GRAPHS.clear()
    _SEEN.clear()
    _FAILED.clear()


def _graph_key(model, x0, plan, return_trajectory):
    try:
        weakref.ref(model)
    except TypeError:
        return None  # cannot tell a recycled id() from the same model: never cache
    tensors = ()
    if isinstance(model, torch.nn.Module):
        # Rebinding a parameter/buffer to a new tensor moves its address: a graph would read the old one.
        tensors = tuple(
            (p.data_ptr(), p.dtype, tuple(p.shape))
            for p in list(model.parameters()) + list(model.buffers())
        )
    autocast = torch.is_autocast_enabled()
    return (id(model), tensors, tuple(x0.shape), x0.dtype, x0.device, plan, return_trajectory, autocast)


def _drop_graph(key, ref):
    entry = _GRAPHS.get(key)
    if entry is not None and entry.model_ref is ref:
        del _GRAPHS[key]


def _remember(table, key, limit):
    table[key] = None
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _capture(model, x0, plan, return_trajectory):
    """Warms up on a side stream (its result answers this call), then captures the loop.

    Returns (result, _Graphed or None, exception or None).
    """
    device = x0.device
    bufs = _alloc(x0, plan, return_trajectory)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm-up off the default stream, as the CUDA-graph docs ask
        bufs.input.copy_(x0)
        _loop(model, bufs, plan)
    current.wait_stream(side)
    result = bufs.output.clone()  # on the current stream: the capture below overwrites nothing
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            _loop(model, bufs, plan)
    except Exception as exc:  # the model is not capturable (host syncs, CPU tensors, ...)
        # torch.cuda.graph leaves the capture stream current when capture_end raises.
        torch.cuda.set_stream(current)
        try:
            graph.reset()
        except Exception:
            pass
        return result, None, exc
    return result, _Graphed(graph, bufs, weakref.ref(model)), None


def _run_graphed(model, x0, plan, return_trajectory, cuda_graph):
    """CUDA-graph path; returns None when the caller should run eagerly instead."""
    global _warned_capture
    key = _graph_key(model, x0, plan, return_trajectory)
    if key is not None:
        entry = _GRAPHS.get(key)
        if entry is not None and entry.model_ref() is model:
            _GRAPHS.move_to_end(key)
            entry.bufs.input.copy_(x0)
            entry.graph.replay()
            return entry.bufs.output.clone()
        if entry is not None:  # the model it was captured for is gone
            del _GRAPHS[key]
    if cuda_graph == "auto":
        if key is None or key in _FAILED:
            return None
        if key not in _SEEN:  # capture on the second call with the same key: one-off calls stay eager
            _remember(_SEEN, key, _MAX_KEYS)
            return None
    result, entry, exc = _capture(model, x0, plan, return_trajectory)
    if exc is not None:
        if cuda_graph is True:
            raise RuntimeError(
                "cuda_graph=True but the sampling loop could not be captured as a CUDA graph "
                f"(the model is not capturable: {type(exc).__name__}: {exc}); pass cuda_graph='auto' "
                "or False to run eagerly"
            ) from exc
        if key is not None:
            _remember(_FAILED, key, _MAX_KEYS)
        if not _warned_capture:
            _warned_capture = True
            warnings.warn(
                f"loom_kernels.sampler: CUDA-graph capture failed ({type(exc).__name__}: {exc}); "
                "sampling eagerly for this model (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
        return result
    if key is not None:
        # Free the graph's memory pool as soon as its model is garbage-collected.
        entry.model_ref = weakref.ref(model, lambda ref, k=key: _drop_graph(k, ref))
        _GRAPHS[key] = entry
        _GRAPHS.move_to_end(key)
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    return result


# ---- public API --------------------------------------------------------------------------------


def _check_x0(x0):
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (B, *dims), got {type(x0).__name__}")
    if x0.ndim < 1:
        raise ValueError("x0 must have shape (B, *dims), got a 0-d tensor")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")


def sample(
    model,
    x0,
    nfe,
    *,
    method="euler",
    t0=0.0,
    t1=1.0,
    time_grid=None,
    return_trajectory=False,
    cuda_graph="auto",
    progress=False,
):
    """Integrates dx/dt = model(x, t) from t0 to t1 with exactly ``nfe`` model evaluations.

    Args:
        model: callable ``model(x, t) -> v`` with x of shape (B, *dims) and t of shape (B,) in x's
            dtype and device; v must have x's shape. An ``nn.Module`` is put in eval mode for the
            call and every submodule's own mode is restored afterwards.
        x0: (B, *dims) floating tensor, the state at t0 (noise). Never modified.
        nfe: number of model evaluations: ``steps`` for euler, ``2 * steps`` for midpoint and heun
            (which need an even nfe).
        method: "euler" (order 1), "midpoint" (order 2) or "heun" (order 2, the explicit
            trapezoidal rule: the last step also makes its correction, unlike EDM's Heun sampler).
        t0, t1: the interval; t1 < t0 integrates backwards (data to noise).
        time_grid: optional 1-D tensor/sequence of ``steps + 1`` strictly monotone times from t0
            to t1 (checked to 1e-6) replacing the uniform grid; its values are used as given.
        return_trajectory: return the states at every grid point, (steps + 1, B, *dims), x0 first.
        cuda_graph: CUDA tensors only. "auto" runs eagerly on the first call and captures the
            loop as a CUDA graph on the second call with the same (model, shape, dtype, device,
            nfe, method, grid), replaying it from then on; a model that cannot be captured (host
            syncs, ...) falls back to eager with one warning. True captures on the first call and
            raises if capture fails; False never captures. Graphs read parameters by address, so
            in-place updates (optimizer steps, ``load_state_dict``) are seen; a model whose
            Python-side behaviour changes between calls needs ``cuda_graph=False``. Ignored
            ("auto") or an error (True) on CPU tensors and under autocast.
        progress: show a tqdm bar over the steps; the loop then runs eagerly (no graph).

    Returns:
        x1 of shape (B, *dims) in x0's dtype and device, or the trajectory (steps + 1, B, *dims).

    Runs under ``torch.no_grad()``; makes no host synchronization inside the loop. On CUDA each
    state update is one fused Triton kernel (fp32 accumulation; float64 states use torch ops).

    Example:
        >>> import torch
        >>> from loom_kernels.sampler import sample
        >>> x1 = sample(lambda x, t: -x, torch.ones(4, 2), nfe=8, method="heun")
        >>> x1.shape
        torch.Size([4, 2])
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    _check_x0(x0)
    plan = _make_plan(method, nfe, t0, t1, time_grid)
    if not (isinstance(cuda_graph, str) and cuda_graph == "auto" or cuda_graph is True or cuda_graph is False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is True:
        if not x0.is_cuda:
            raise ValueError(f"cuda_graph=True needs x0 on a CUDA device, got x0 on {x0.device}")
        if progress:
            raise ValueError("progress=True runs eagerly; it cannot be combined with cuda_graph=True")
        if torch.is_autocast_enabled():
            raise ValueError(
                "cuda_graph=True cannot capture inside an autocast region (its weight cache would "
                "outlive the capture); convert the model's dtype instead or pass cuda_graph='auto'"
            )
    graphs = x0.is_cuda and cuda_graph is not False and not progress and not torch.is_autocast_enabled()
    with torch.no_grad(), _eval_mode(model):
        if graphs:
            with torch.cuda.device(x0.device):
                out = _run_graphed(model, x0, plan, return_trajectory, cuda_graph)
            if out is not None:
                return out
        return _run_eager(model, x0, plan, return_trajectory, progress)
