"""ODE samplers for flow-matching models: Euler, explicit midpoint, Heun (fixed step) and dopri5 (adaptive).

Integrates dx/dt = model(x, t) from t0 (noise) to t1 (data) with exactly ``nfe`` model
evaluations (fixed-step methods) or as many as the tolerances need (dopri5: the Dormand-Prince 5(4)
pair with FSAL and the usual step-size control, Hairer, Norsett, Wanner sec. II.4-5). The model is
called in one of four conventions (``SIGNATURES``), with optional keyword inputs (class labels, ...)
and classifier-free guidance (Ho & Salimans 2022) batched into one call per evaluation. Methods
(E. Hairer, S. P. Norsett, G. Wanner, "Solving Ordinary Differential Equations I", sec. II.1):
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
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ._triton import interpreting, tl, triton, use_kernel

__all__ = ["sample", "clear_graph_cache", "GraphCache", "METHODS", "SIGNATURES"]

#: model evaluations per step of each method
METHODS = {"euler": 1, "midpoint": 2, "heun": 2}
ADAPTIVE = ("dopri5",)

#: how the model is called (t_B: the time as a (B,) tensor; t_0d: as a 0-dim tensor)
SIGNATURES = {
    "xt": "model(x, t_B, **kw)",  # ours
    "torchcfm": "model(t_B, x, **kw)",  # TorchCFM's UNet: forward(t, x, y=None)
    "torchdiffeq": "model(t_0d, x, **kw)",  # torchdiffeq's func(t, y)
    "flow_matching": "model(x=x, t=t_0d, **kw)",  # flow_matching's ModelWrapper
}

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
    if not use_kernel(x.device):
        return False
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "loom_kernels._triton.KERNELS_ON_CPU needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def _update(x, v1, v2, a: float, b: float, out) -> None:
    """out = x + a*v1 (+ b*v2); `out` is contiguous and may be `x` itself (elementwise, safe)."""
    if out.numel() == 0:
        return
    if _use_triton(out):
        # TWO from the argument, not from identity: a model may return the same tensor for both stages
        two = v2 is not None
        v1 = v1.contiguous()
        v2 = v2.contiguous() if two else v1
        n = out.numel()
        _ode_update_kernel[(triton.cdiv(n, _BLOCK),)](
            x, v1, v2, out, float(a), float(b), n,
            TWO=two, BLOCK=_BLOCK, num_warps=4,
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


def _check_grid(grid: list, t0: float, t1: float) -> list:
    """A time grid's values: finite, strictly monotone from t0 to t1 (to 1e-6)."""
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
    return grid


def _make_plan(method, nfe, t0, t1, time_grid) -> _Plan:
    """Validates (method, nfe, t0, t1, time_grid) and lays out every evaluation."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS) + list(ADAPTIVE)}, got {method!r}")
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
        grid = _check_grid(g.tolist(), t0, t1)
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


# ---- the velocity field: calling convention, keyword inputs, guidance ---------------------------


class _Field:
    """One model evaluation as the sampler sees it: ``field(x, k) -> v`` at the k-th evaluation time.

    Holds the calling convention, the keyword inputs and classifier-free guidance, so that eager
    runs, graph capture and dopri5 share one code path. With guidance the batch is doubled once per
    evaluation, ``[x; x]`` with labels ``[y; null]``, and the two halves are combined as
    ``v_null + w (v_cond - v_null)``: one batched call, counted as one NFE.
    """

    def __init__(self, model, signature, kwargs, guidance, label_key, null_label, batch):
        self.model = model
        self.signature = signature
        self.kwargs = kwargs  # the caller's tensors (eager) or the graph's static copies
        self.guidance = guidance
        self.label_key = label_key
        self.null_label = null_label
        self.batch = batch
        self.call_kwargs = kwargs

    @property
    def width(self) -> int:
        """Rows per model call: the batch, doubled under guidance."""
        return 2 * self.batch if self.guidance is not None else self.batch

    def prepare(self) -> None:
        """Builds the kwargs of every call once (inside a graph capture: captured with the loop)."""
        if self.guidance is None:
            self.call_kwargs = self.kwargs
            return
        out = {}
        for k, v in self.kwargs.items():
            if k == self.label_key:
                v = torch.cat([v, torch.full_like(v, self.null_label)])
            elif isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == self.batch:
                v = torch.cat([v, v])  # per-sample inputs go with both halves
            out[k] = v
        self.call_kwargs = out

    def __call__(self, x, t_b, t_0d, hook=None):
        if self.guidance is not None:
            x = torch.cat([x, x])
        sig, kw, m = self.signature, self.call_kwargs, self.model
        try:
            if sig == "xt":
                v = m(x, t_b, **kw)
            elif sig == "torchcfm":
                v = m(t_b, x, **kw)
            elif sig == "torchdiffeq":
                v = m(t_0d, x, **kw)
            else:
                v = m(x=x, t=t_0d, **kw)
        except TypeError as exc:  # most often a convention or keyword the model does not take
            raise TypeError(
                f"calling the model as {SIGNATURES[sig]} with model_kwargs {sorted(kw)} raised TypeError: "
                f"{exc} (signature= picks the convention, one of {sorted(SIGNATURES)}; model_kwargs "
                "must be keywords the model accepts)") from exc
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"the model ({SIGNATURES[sig]}) must return a torch.Tensor, got {type(v).__name__}")
        if v.shape != x.shape or v.device != x.device or not v.is_floating_point():
            raise ValueError(
                f"the model ({SIGNATURES[sig]}) must return a floating velocity shaped like x "
                f"{tuple(x.shape)} on {x.device}, got {tuple(v.shape)} {v.dtype} on {v.device}"
            )
        if hook is not None:
            hook(v)
        if self.guidance is not None:
            cond, null = v.chunk(2)
            v = torch.lerp(null, cond, self.guidance)
        return v


# ---- the integration loop (shared by eager runs and graph capture) ------------------------------


@dataclass
class _Buffers:
    state: torch.Tensor  # (B, *d) running state when no trajectory is kept; else None
    traj: torch.Tensor  # (steps + 1, B, *d) or None
    stage: torch.Tensor  # (B, *d) intermediate point of two-stage methods, or None
    times: torch.Tensor  # (nfe, W) evaluation times in x's dtype, W = rows per model call
    times_0d: torch.Tensor  # (nfe,) the same times, handed out as 0-dim views
    kwargs: dict  # keyword inputs of the model (static copies when graphed)

    @property
    def input(self) -> torch.Tensor:
        return self.traj[0] if self.traj is not None else self.state

    @property
    def output(self) -> torch.Tensor:
        return self.traj if self.traj is not None else self.state


def _alloc(x0: torch.Tensor, plan: _Plan, return_trajectory: bool, kwargs: dict, width: int,
           static: bool = False) -> _Buffers:
    shape = tuple(x0.shape)
    opts = dict(dtype=x0.dtype, device=x0.device)
    traj = torch.empty((plan.steps + 1,) + shape, **opts) if return_trajectory else None
    state = None if return_trajectory else torch.empty(shape, **opts)
    stage = torch.empty(shape, **opts) if METHODS[plan.method] == 2 else None
    t = _eval_times(plan.eval_times, x0.dtype, x0.device)
    times = t[:, None].expand(-1, width).contiguous()
    if static:  # a graph reads its inputs by address: copies it owns, refreshed before each replay
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return _Buffers(state, traj, stage, times, t.clone(), kwargs)


_TIMES: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()


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


def _loop(field: _Field, bufs: _Buffers, plan: _Plan, steps_iter=None, hook=None) -> None:
    """Runs every step, writing into `bufs`; launches only, never reads a value back."""
    field.kwargs = bufs.kwargs
    field.prepare()
    x = bufs.input
    tt = bufs.times.unbind(0)  # all t views at once: indexing a tensor per call costs microseconds
    t0d = bufs.times_0d.unbind(0)
    grid = plan.grid

    def v(y, i):
        return field(y, tt[i], t0d[i], hook)

    for k in steps_iter if steps_iter is not None else range(plan.steps):
        h = grid[k + 1] - grid[k]
        out = bufs.traj[k + 1] if bufs.traj is not None else x
        if plan.method == "euler":
            _update(x, v(x, k), None, h, 0.0, out)
        elif plan.method == "midpoint":
            _update(x, v(x, 2 * k), None, 0.5 * h, 0.0, bufs.stage)
            _update(x, v(bufs.stage, 2 * k + 1), None, h, 0.0, out)
        else:  # heun
            v1 = v(x, 2 * k)
            _update(x, v1, None, h, 0.0, bufs.stage)
            _update(x, v1, v(bufs.stage, 2 * k + 1), 0.5 * h, 0.5 * h, out)
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


def _run_eager(field, x0, plan, return_trajectory, progress=False, hook=None) -> torch.Tensor:
    if not isinstance(field, _Field):  # a plain model(x, t) (metrics.py calls it so)
        field = _Field(field, "xt", {}, None, None, None, x0.shape[0])
    bufs = _alloc(x0, plan, return_trajectory, field.kwargs, field.width)
    bufs.input.copy_(x0)
    steps_iter = None
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(range(plan.steps), desc=f"sample ({plan.method}, nfe={len(plan.weights)})")
    _loop(field, bufs, plan, steps_iter, hook)
    return bufs.output

# ---- CUDA graphs -------------------------------------------------------------------------------


@dataclass
class _Graphed:
    graph: object  # torch.cuda.CUDAGraph
    bufs: _Buffers
    model_ref: object  # weakref to the model: a recycled id() must not hit the cache


class GraphCache:
    """The CUDA graphs ``sample`` captured, with the keys it has seen once and those that failed.

    ``sample`` uses one default cache (``clear_graph_cache()`` empties it); pass your own as
    ``sample(..., graph_cache=GraphCache())`` to tie the graphs, and the GPU memory each one pins,
    to a component's lifetime. Each graph is dropped when its model is garbage-collected; at most
    ``max_graphs`` are kept (least recently used first out).

    Example::

        cache = GraphCache(max_graphs=2)
        x1 = sample(model, x0, 8, graph_cache=cache)
        cache.clear()
    """

    def __init__(self, max_graphs: int = 4, max_keys: int = 256):
        self.max_graphs = max_graphs  # each graph pins its memory pool (the loop's peak activations)
        self.max_keys = max_keys
        self.graphs: collections.OrderedDict[tuple, _Graphed] = collections.OrderedDict()
        self.seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.failed: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.warned = False  # the capture-failure warning is given once per cache

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self) -> None:
        """Drops every captured graph (and the GPU memory it holds)."""
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()

    def lookup(self, key, model):
        """The live graph for ``key`` captured for ``model``, or None (a stale one is dropped)."""
        entry = self.graphs.get(key)
        if entry is None:
            return None
        if entry.model_ref() is not model:  # the model it was captured for is gone
            del self.graphs[key]
            return None
        self.graphs.move_to_end(key)
        return entry

    def store(self, key, entry: _Graphed, model) -> None:
        # Free the graph's memory pool as soon as its model is garbage-collected.
        entry.model_ref = weakref.ref(model, lambda ref, k=key: self._drop(k, ref))
        self.graphs[key] = entry
        self.graphs.move_to_end(key)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def first_sight(self, key) -> bool:
        """True the first time ``key`` is seen (``cuda_graph="auto"`` captures on the second call)."""
        if key in self.seen:
            return False
        self._remember(self.seen, key)
        return True

    def mark_failed(self, key) -> None:
        self._remember(self.failed, key)

    def _drop(self, key, ref) -> None:
        entry = self.graphs.get(key)
        if entry is not None and entry.model_ref is ref:
            del self.graphs[key]

    def _remember(self, table, key) -> None:
        table[key] = None
        table.move_to_end(key)
        while len(table) > self.max_keys:
            table.popitem(last=False)


_DEFAULT_CACHE = GraphCache()


def clear_graph_cache() -> None:
    """Drops every CUDA graph in the default cache (and the GPU memory it holds).

    Call it after rebinding tensors that a plain-function model closes over; ``nn.Module``
    parameters changed in place (optimizer steps, ``load_state_dict``, EMA ``copy_``) need nothing.

    Example::

        loom_kernels.sampler.clear_graph_cache()
    """
    _DEFAULT_CACHE.clear()


def _kwargs_key(kwargs: dict):
    """What a graph depends on in the kwargs: tensors by (shape, dtype, device) (their values are
    static inputs, copied in before each replay), anything else by value; None when a value is not
    hashable (never cached)."""
    items = []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, torch.Tensor):
            items.append((k, "tensor", tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
            except TypeError:
                return None
            items.append((k, "value", type(v), v))
    return tuple(items)


def _graph_key(field: _Field, x0, plan, return_trajectory):
    model = field.model
    try:
        weakref.ref(model)
    except TypeError:
        return None  # cannot tell a recycled id() from the same model: never cache
    kw = _kwargs_key(field.kwargs)
    if kw is None:
        return None
    tensors = ()
    if isinstance(model, torch.nn.Module):
        # Rebinding a parameter/buffer to a new tensor moves its address: a graph would read the old one.
        tensors = tuple(
            (p.data_ptr(), p.dtype, tuple(p.shape))
            for p in list(model.parameters()) + list(model.buffers())
        )
    autocast = torch.is_autocast_enabled()
    call = (field.signature, kw, field.guidance, field.label_key, field.null_label)
    return (id(model), tensors, tuple(x0.shape), x0.dtype, x0.device, plan, return_trajectory, autocast, call)


def _load_inputs(bufs: _Buffers, x0, kwargs) -> None:
    """Copies this call's inputs into a graph's static buffers (x0 and every kwargs tensor)."""
    bufs.input.copy_(x0)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            bufs.kwargs[k].copy_(v)


def _capture(field, x0, plan, return_trajectory):
    """Warms up on a side stream (its result answers this call), then captures the loop.

    Returns (result, _Graphed or None, exception or None).
    """
    device = x0.device
    kwargs = field.kwargs
    bufs = _alloc(x0, plan, return_trajectory, kwargs, field.width, static=True)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm-up off the default stream, as the CUDA-graph docs ask
        _load_inputs(bufs, x0, kwargs)
        _loop(field, bufs, plan)
    current.wait_stream(side)
    result = bufs.output.clone()  # on the current stream: the capture below overwrites nothing
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            _loop(field, bufs, plan)
    except Exception as exc:  # the model is not capturable (host syncs, CPU tensors, ...)
        # torch.cuda.graph leaves the capture stream current when capture_end raises.
        torch.cuda.set_stream(current)
        try:
            graph.reset()
        except Exception:
            pass
        return result, None, exc
    return result, _Graphed(graph, bufs, weakref.ref(field.model)), None


def _run_graphed(field, x0, plan, return_trajectory, cuda_graph, cache: GraphCache):
    """CUDA-graph path; returns None when the caller should run eagerly instead."""
    model = field.model
    key = _graph_key(field, x0, plan, return_trajectory)
    if key is not None:
        entry = cache.lookup(key, model)
        if entry is not None:
            _load_inputs(entry.bufs, x0, field.kwargs)
            entry.graph.replay()
            return entry.bufs.output.clone()
    if cuda_graph == "auto":
        if key is None or key in cache.failed:
            return None
        if cache.first_sight(key):  # capture on the second call with the same key: one-off calls stay eager
            return None
    result, entry, exc = _capture(field, x0, plan, return_trajectory)
    if exc is not None:
        if cuda_graph is True:
            raise RuntimeError(
                "cuda_graph=True but the sampling loop could not be captured as a CUDA graph "
                f"(the model is not capturable: {type(exc).__name__}: {exc}); pass cuda_graph='auto' "
                "or False to run eagerly"
            ) from exc
        if key is not None:
            cache.mark_failed(key)
        if not cache.warned:
            cache.warned = True
            warnings.warn(
                f"loom_kernels.sampler: CUDA-graph capture failed ({type(exc).__name__}: {exc}); "
                "sampling eagerly for this model (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
        return result
    if key is not None:
        cache.store(key, entry, model)
    return result


# ---- dopri5: the adaptive Dormand-Prince 5(4) pair ----------------------------------------------

_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights (FSAL)
)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b - e for b, e in zip(_DP_A[6] + (0.0,), _DP_B4))  # 5th minus 4th order: the error


class _Counter:
    """Evaluates the field at a host-side time and counts evaluations against max_nfe."""

    def __init__(self, field, x0, max_nfe):
        self.field, self.max_nfe, self.nfe = field, max_nfe, 0
        self.dtype, self.device, self.width = x0.dtype, x0.device, field.width

    def __call__(self, t: float, x):
        t0d = torch.tensor(t, dtype=self.dtype, device=self.device)
        self.nfe += 1
        return self.field(x, t0d.expand(self.width), t0d)

    def need(self, n: int, t: float, t1: float) -> None:
        if self.nfe + n > self.max_nfe:
            raise RuntimeError(
                f"dopri5 would exceed max_nfe={self.max_nfe} model evaluations (used {self.nfe}, reached "
                f"t={t:.6g} of t1={t1:.6g}); loosen rtol/atol, raise max_nfe, or use a fixed-step method"
            )


def _rms(x) -> float:
    return float(x.float().pow(2).mean().sqrt()) if x.numel() else 0.0


def _initial_step(f, t0, x, v, direction, rtol, atol) -> float:
    # Hairer, Norsett, Wanner, sec. II.4 ("Starting step size"), as torchdiffeq does.
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(v / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    v1 = f(t0 + direction * h0, x + direction * h0 * v)
    d2 = _rms((v1 - v) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    return min(100 * h0, h1)


def _dopri5_step(f, t, x, v, h):
    """One trial step of signed size h from (t, x) with v = f(t, x): (x_new, v_new, error estimate)."""
    ks = [v]
    for i in range(1, 7):
        xi = x + h * sum(a * k for a, k in zip(_DP_A[i], ks) if a != 0.0)
        ks.append(f(t + _DP_C[i] * h, xi))
        if i == 6:
            x_new = xi  # row 6 of A is the 5th-order solution (first same as last)
    err = h * sum(e * k for e, k in zip(_DP_E, ks) if e != 0.0)
    return x_new, ks[6], err


def _run_dopri5(field, x0, grid, return_trajectory, rtol, atol, max_nfe) -> tuple:
    """Integrates through every point of `grid` (floats), hitting each exactly; (out, nfe, steps, rejected)."""
    f = _Counter(field, x0, max_nfe)
    direction = 1.0 if grid[-1] > grid[0] else -1.0
    x, t = x0.clone(), grid[0]
    traj = [x0.clone()] if return_trajectory else None
    steps = rejected = 0
    f.need(2, t, grid[-1])
    v = f(t, x)
    h = _initial_step(f, t, x, v, direction, rtol, atol)
    for target in grid[1:]:
        while direction * (target - t) > 0:
            f.need(6, t, grid[-1])
            last = h >= abs(target - t) * (1 - 1e-12)
            hs = direction * abs(target - t) if last else direction * h
            x_new, v_new, err = _dopri5_step(f, t, x, v, hs)
            ratio = _rms(err / (atol + rtol * torch.maximum(x.abs(), x_new.abs())))
            if not math.isfinite(ratio):
                raise FloatingPointError(f"dopri5: the model returned NaN or inf near t={t:.6g}")
            if ratio <= 1.0:
                t, x, v, steps = (target if last else t + hs), x_new, v_new, steps + 1
            else:
                rejected += 1
            # Step-size control (safety 0.9, growth in [0.2, 10], no shrinking after an accepted step).
            grow = 10.0 if ratio == 0.0 else 0.9 / ratio ** 0.2
            h = abs(hs) * min(10.0, max(grow, 1.0 if ratio <= 1.0 else 0.2))
        if traj is not None:
            traj.append(x.clone())
    out = torch.stack(traj) if traj is not None else x
    return out, f.nfe, steps, rejected


# ---- public API --------------------------------------------------------------------------------


def _check_x0(x0):
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (B, *dims), got {type(x0).__name__}")
    if x0.ndim < 1:
        raise ValueError("x0 must have shape (B, *dims), got a 0-d tensor")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating tensor, got {x0.dtype}")


def _check_kwargs(model, x0, signature, model_kwargs, guidance, null_label, label_key) -> dict:
    """Validates the calling convention, the keyword inputs and guidance; returns the kwargs dict."""
    if not isinstance(signature, str) or signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {sorted(SIGNATURES)}, got {signature!r}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict with str keys, got {type(model_kwargs).__name__}")
    for k, v in model_kwargs.items():
        if isinstance(v, torch.Tensor) and v.device != x0.device:
            raise ValueError(f"model_kwargs[{k!r}] must be on x0's device {x0.device}, got {v.device}")
    reserved = {"xt": (), "torchcfm": (), "torchdiffeq": (), "flow_matching": ("x", "t")}[signature]
    clash = [k for k in reserved if k in model_kwargs]
    if clash:
        raise ValueError(f"model_kwargs must not contain {clash}: signature={signature!r} passes them itself")
    labels = model_kwargs.get(label_key)
    if isinstance(labels, torch.Tensor):
        _check_labels(model, labels, x0.shape[0], label_key)
    if guidance is not None:
        _check_real("guidance", guidance)
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"guidance needs the class labels as model_kwargs[{label_key!r}] (a (B,) integer tensor; "
                f"label_key= names another key), got model_kwargs keys {sorted(model_kwargs)}")
        if null_label is None:
            null_label = getattr(model, "null_label", None)
        if isinstance(null_label, bool) or not isinstance(null_label, int):
            raise ValueError(
                "guidance needs null_label= (the label the model was trained with for 'no class'; "
                f"models.UNet exposes it as .null_label), got {null_label!r}")
    return model_kwargs


def _check_labels(model, labels, batch, label_key) -> None:
    if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"model_kwargs[{label_key!r}] (class labels) must be an integer tensor, got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(f"model_kwargs[{label_key!r}] (class labels) must have shape ({batch},) like x0's "
                         f"batch, got {tuple(labels.shape)}")
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())  # one host read per call, before the loop
        if lo < 0 or hi >= n:
            raise ValueError(f"model_kwargs[{label_key!r}] holds labels in [{lo}, {hi}], outside the model's "
                             f"{n} classes [0, {n - 1}]")


def _check_cuda_graph(cuda_graph, x0, progress, method) -> None:
    if not (isinstance(cuda_graph, str) and cuda_graph == "auto" or cuda_graph is True or cuda_graph is False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is not True:
        return
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


def _adaptive_grid(nfe, t0, t1, time_grid, rtol, atol, max_nfe) -> list:
    if nfe is not None:
        raise ValueError(f"nfe must be None for method='dopri5' (it chooses its own steps; max_nfe bounds "
                         f"them), got {nfe!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if _check_real(name, tol) <= 0:
            raise ValueError(f"{name} must be positive, got {tol}")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 8:
        raise ValueError(f"max_nfe must be an int >= 8 (dopri5 needs 8 evaluations for its first step), "
                         f"got {max_nfe!r}")
    t0, t1 = _check_real("t0", t0), _check_real("t1", t1)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    if time_grid is None:
        return [t0, t1]
    g = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"time_grid must be 1-D with at least 2 points, got shape {tuple(g.shape)}")
    return _check_grid(g.tolist(), t0, t1)


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
    _check_x0(x0)
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"info must be a dict (filled with the evaluation count) or None, got {type(info).__name__}")
    _check_cuda_graph(cuda_graph, x0, progress, method)
    kwargs = _check_kwargs(model, x0, signature, model_kwargs, guidance, null_label, label_key)
    if guidance is not None and null_label is None:
        null_label = model.null_label
    field = _Field(model, signature, kwargs, None if guidance is None else float(guidance), label_key,
                   null_label, x0.shape[0])
    if isinstance(method, str) and method in ADAPTIVE:
        grid = _adaptive_grid(nfe, t0, t1, time_grid, rtol, atol, max_nfe)
        with torch.no_grad(), _eval_mode(model):
            field.prepare()
            out, used, steps, rejected = _run_dopri5(field, x0, grid, return_trajectory, rtol, atol, max_nfe)
        if info is not None:
            info.update(nfe=used, steps=steps, rejected=rejected)
        return out
    plan = _make_plan(method, nfe, t0, t1, time_grid)
    if info is not None:
        info.update(nfe=len(plan.weights))
    graphs = x0.is_cuda and cuda_graph is not False and not progress and not torch.is_autocast_enabled()
    with torch.no_grad(), _eval_mode(model):
        if graphs:
            with torch.cuda.device(x0.device):
                out = _run_graphed(field, x0, plan, return_trajectory, cuda_graph,
                                   _DEFAULT_CACHE if graph_cache is None else graph_cache)
            if out is not None:
                return out
        return _run_eager(field, x0, plan, return_trajectory, progress)
