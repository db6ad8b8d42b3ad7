"""dopri5: the adaptive Dormand-Prince 5(4) pair with FSAL and the usual step-size control
(Hairer, Norsett, Wanner, "Solving Ordinary Differential Equations I", sec. II.4-5), eager, one host
read per step for the error norm (the RMS over the whole batch, as torchdiffeq does)."""

from __future__ import annotations

import math

import torch

from .field import check_real
from .fixed import ADAPTIVE, check_grid

__all__ = ["ADAPTIVE", "adaptive_grid", "run_dopri5"]

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


def run_dopri5(field, x0, grid, return_trajectory, rtol, atol, max_nfe) -> tuple:
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
            grow = 10.0 if ratio == 0.0 else 0.9 / ratio**0.2
            h = abs(hs) * min(10.0, max(grow, 1.0 if ratio <= 1.0 else 0.2))
        if traj is not None:
            traj.append(x.clone())
    out = torch.stack(traj) if traj is not None else x
    return out, f.nfe, steps, rejected


def adaptive_grid(nfe, t0, t1, time_grid, rtol, atol, max_nfe) -> list:
    if nfe is not None:
        raise ValueError(
            f"nfe must be None for method='dopri5' (it chooses its own steps; max_nfe bounds them), got {nfe!r}"
        )
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if check_real(name, tol) <= 0:
            raise ValueError(f"{name} must be positive, got {tol}")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 8:
        raise ValueError(
            f"max_nfe must be an int >= 8 (dopri5 needs 8 evaluations for its first step), got {max_nfe!r}"
        )
    t0, t1 = check_real("t0", t0), check_real("t1", t1)
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    if time_grid is None:
        return [t0, t1]
    g = torch.as_tensor(time_grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"time_grid must be 1-D with at least 2 points, got shape {tuple(g.shape)}")
    return check_grid(g.tolist(), t0, t1)
