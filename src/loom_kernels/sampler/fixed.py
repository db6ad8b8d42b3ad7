"""The fixed-step run: the time grid and quadrature weights of a method (``methods.py``), and the
integration loop shared by eager runs and CUDA-graph capture (launches only: it never reads a value
back to the host)."""

from __future__ import annotations

import collections
import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .field import Field, check_real
from .methods import METHODS, REGISTRY

__all__ = ["METHODS", "Plan", "make_plan", "quadrature", "run_eager", "eval_mode"]

ADAPTIVE = ("dopri5",)  # methods that choose their own steps (dopri5.py)


@dataclass(frozen=True)
class Plan:
    method: str
    grid: tuple  # steps + 1 floats (float64), t0 ... t1
    eval_times: tuple  # nfe floats: the time of each model evaluation, in call order
    weights: tuple  # nfe floats: quadrature weight of each evaluation (sum = t1 - t0)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1


def check_grid(grid: list, t0: float, t1: float) -> list:
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


def interval(t0, t1, time_grid, adaptive: bool) -> tuple:
    """``(t0, t1, time_grid)`` for the runs from ``sample``'s arguments.

    Legacy ``t0``/``t1`` (either given) keep their meaning: the interval, default 0 and 1, that a
    ``time_grid`` must match. Otherwise the interval is ``time_grid``'s ends (default ``(0, 1)``),
    and a two-point grid of a fixed-step method is that interval alone (uniform steps)."""
    if t0 is not None or t1 is not None:
        return 0.0 if t0 is None else t0, 1.0 if t1 is None else t1, time_grid
    if time_grid is None:
        return 0.0, 1.0, None
    # One host read, before the loop (a CUDA grid syncs here, never inside the loop).
    g = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"time_grid must be 1-D with at least 2 points, got shape {tuple(g.shape)}")
    values = g.tolist()
    if values[0] == values[-1]:
        raise ValueError(f"time_grid's first and last times must differ, got {values}")
    check_grid(values, values[0], values[-1])
    return values[0], values[-1], None if len(values) == 2 and not adaptive else time_grid


def make_plan(method, nfe, t0, t1, time_grid) -> Plan:
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
    t0 = check_real("t0", t0)
    t1 = check_real("t1", t1)
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
        grid = check_grid(g.tolist(), t0, t1)
    m = REGISTRY[method]
    times = [_at(a, b, o) for a, b in zip(grid, grid[1:]) for o in m.offsets]
    weights = [_scaled(f, b - a) for a, b in zip(grid, grid[1:]) for f in m.fractions]
    return Plan(method, tuple(grid), tuple(times), tuple(weights))


def _at(a: float, b: float, offset: float) -> float:
    # The step's ends exactly (a + (b - a) need not round to b).
    return a if offset == 0.0 else b if offset == 1.0 else a + offset * (b - a)


def _scaled(fraction: float, h: float) -> float:
    return 0.0 if fraction == 0.0 else h if fraction == 1.0 else fraction * h


def quadrature(method: str, nfe: int, t0: float = 0.0, t1: float = 1.0, time_grid=None) -> tuple:
    """The evaluation times and quadrature weights of a fixed-step method: ``(times, weights)``.

    ``weights[k]`` is the weight of the k-th model evaluation in the method's update, so that
    ``sum_k weights[k] * v_k == x1 - x0`` for the velocities a ``velocity_hook`` receives
    (``sample(..., velocity_hook=...)``); the weights sum to ``t1 - t0``. Both are tuples of
    ``nfe`` floats, in call order. Arguments as in :func:`sample`.

    Example:
        >>> quadrature("heun", 4)
        ((0.0, 0.5, 0.5, 1.0), (0.25, 0.25, 0.25, 0.25))
    """
    plan = make_plan(method, nfe, t0, t1, time_grid)
    return plan.eval_times, plan.weights


@dataclass
class Buffers:
    state: torch.Tensor  # (B, *d) running state when no trajectory is kept; else None
    traj: torch.Tensor  # (steps + 1, B, *d) or None
    scratch: list  # the method's scratch buffers, each (B, *d)
    times: torch.Tensor  # (nfe, W) evaluation times in x's dtype, W = rows per model call
    times_0d: torch.Tensor  # (nfe,) the same times, handed out as 0-dim views
    kwargs: dict  # keyword inputs of the model (static copies when graphed)

    @property
    def input(self) -> torch.Tensor:
        return self.traj[0] if self.traj is not None else self.state

    @property
    def output(self) -> torch.Tensor:
        return self.traj if self.traj is not None else self.state


def alloc(
    x0: torch.Tensor, plan: Plan, return_trajectory: bool, kwargs: dict, width: int, static: bool = False
) -> Buffers:
    shape = tuple(x0.shape)
    opts = dict(dtype=x0.dtype, device=x0.device)
    traj = torch.empty((plan.steps + 1,) + shape, **opts) if return_trajectory else None
    state = None if return_trajectory else torch.empty(shape, **opts)
    scratch = [torch.empty(shape, **opts) for _ in range(REGISTRY[plan.method].scratch)]
    t = _eval_times(plan.eval_times, x0.dtype, x0.device)
    times = t[:, None].expand(-1, width).contiguous()
    if static:  # a graph reads its inputs by address: copies it owns, refreshed before each replay
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return Buffers(state, traj, scratch, times, t.clone(), kwargs)


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


def loop(field: Field, bufs: Buffers, plan: Plan, steps_iter=None) -> None:
    """Runs every step, writing into `bufs`; launches only, never reads a value back."""
    field.kwargs = bufs.kwargs
    field.prepare()
    x = bufs.input
    tt = bufs.times.unbind(0)  # all t views at once: indexing a tensor per call costs microseconds
    t0d = bufs.times_0d.unbind(0)
    grid = plan.grid
    method = REGISTRY[plan.method]
    first = 0  # index of the step's first evaluation

    def v(y, i):
        return field(y, tt[first + i], t0d[first + i])

    for k in steps_iter if steps_iter is not None else range(plan.steps):
        first = k * method.stages
        out = bufs.traj[k + 1] if bufs.traj is not None else x
        method.step(v, x, grid[k + 1] - grid[k], bufs.scratch, out)
        x = out


@contextmanager
def eval_mode(model):
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


def run_eager(field, x0, plan, return_trajectory, progress=False) -> torch.Tensor:
    bufs = alloc(x0, plan, return_trajectory, field.kwargs, field.width)
    bufs.input.copy_(x0)
    steps_iter = None
    if progress:
        from .._optional import require

        tqdm = require("tqdm.auto", "sample(progress=True)").tqdm
        steps_iter = tqdm(range(plan.steps), desc=f"sample ({plan.method}, nfe={len(plan.weights)})")
    loop(field, bufs, plan, steps_iter)
    return bufs.output
