"""flow_matching's ``ODESolver`` contract (facebookresearch/flow_matching, ``flow_matching.solver``) on our sampler.

``compute_likelihood`` is flow_matching's (Chen et al. 2018's instantaneous change of variables,
integrated from t = 1 to 0 by torchdiffeq with flow_matching's dynamics and RNG use; the divergence
exact or Hutchinson's estimator with one fixed Rademacher probe), so results equal flow_matching's.

``ODESolver(velocity_model).sample(x_init, step_size, method="euler", atol, rtol, time_grid,
return_intermediates=False, enable_grad=False, **model_extras)`` behaves as flow_matching's: the model
is called as ``velocity_model(x=x, t=t, **model_extras)`` with ``t`` a 0-dim tensor, the fixed-step
grid is torchdiffeq's (``step_size`` from ``time_grid[0]`` to ``time_grid[-1]``, the last step
shortened; ``step_size=None`` steps through ``time_grid`` itself), intermediates are the states at
``time_grid``'s points (linearly interpolated between steps, as torchdiffeq does). Euler and
midpoint without gradients run on ``loom_kernels.sampler.sample`` (fused updates, CUDA graphs);
everything else (other methods, ``enable_grad=True``) is handed to ``torchdiffeq.odeint`` exactly as
flow_matching does.

One difference: ``sample`` puts an ``nn.Module`` in eval mode for the call (and restores it);
flow_matching leaves the mode alone, so call ``.eval()`` first for identical results with dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..sampler import METHODS, Options
from ..sampler import sample as _sample

__all__ = ["ODESolver"]

#: methods run on our sampler (the fixed-step methods torchdiffeq and our sampler define identically)
FUSED = ("euler", "midpoint")


def _step_grid(time_grid: torch.Tensor, step_size: float) -> torch.Tensor:
    """torchdiffeq's grid for ``options={"step_size": h}``, reversed intervals included."""
    sign = -1.0 if time_grid.numel() > 1 and bool(time_grid[0] > time_grid[1]) else 1.0
    t = sign * time_grid
    start, end = t[0], t[-1]
    n = torch.ceil((end - start) / step_size + 1).item()
    grid = torch.arange(0, n, dtype=t.dtype, device=t.device) * step_size + start
    grid[-1] = end
    return sign * grid


def _interp(traj: torch.Tensor, grid: list, times: list) -> torch.Tensor:
    """States at ``times`` from states at ``grid`` (monotone), linearly interpolated as torchdiffeq does."""
    sign = 1.0 if grid[-1] > grid[0] else -1.0
    out, j = [traj[0]], 1
    for k in range(len(grid) - 1):
        a, b = grid[k], grid[k + 1]
        while j < len(times) and sign * (b - times[j]) >= 0:
            t = times[j]
            if t == a:
                out.append(traj[k])
            elif t == b:
                out.append(traj[k + 1])
            else:
                out.append(traj[k] + (t - a) / (b - a) * (traj[k + 1] - traj[k]))
            j += 1
    return torch.stack(out)


class ODESolver:
    """Drop-in for ``flow_matching.solver.ODESolver`` (its ``sample`` method).

    Args:
        velocity_model: called as ``velocity_model(x=x, t=t, **model_extras)`` (a flow_matching
            ``ModelWrapper`` or any callable with that convention); t is a 0-dim tensor.

    Example:
        >>> import torch
        >>> solver = ODESolver(lambda x, t: -x)
        >>> solver.sample(torch.ones(4, 2), step_size=0.125, method="midpoint").shape
        torch.Size([4, 2])
    """

    def __init__(self, velocity_model: Callable[..., torch.Tensor]) -> None:
        if not callable(velocity_model):
            raise TypeError(
                f"velocity_model must be callable as velocity_model(x=x, t=t), got {type(velocity_model).__name__}"
            )
        self.velocity_model = velocity_model

    def sample(
        self,
        x_init: torch.Tensor,
        step_size: float | None,
        method: str = "euler",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        time_grid: torch.Tensor | None = None,
        return_intermediates: bool = False,
        enable_grad: bool = False,
        **model_extras,
    ) -> torch.Tensor:
        """Solves dx/dt = velocity_model(x=x, t=t, **model_extras) over ``time_grid``.

        Args:
            x_init: (B, *dims) initial state. step_size: fixed step, or None (step through
                ``time_grid``; required for adaptive methods). method: "euler", "midpoint" (our
                sampler) or any torchdiffeq method. atol, rtol: adaptive methods' tolerances.
            time_grid: 1-D tensor, default ``[0, 1]``; descending integrates backwards.
            return_intermediates: return (len(time_grid), B, *dims), the states at time_grid.
            enable_grad: track gradients (then torchdiffeq runs every method).
            **model_extras: keyword inputs of every model call.

        Returns:
            The state at ``time_grid[-1]``, or the states at every point of ``time_grid``.
        """
        if time_grid is None:
            time_grid = torch.tensor([0.0, 1.0])
        if not isinstance(x_init, torch.Tensor):
            raise TypeError(f"x_init must be a torch.Tensor of shape (B, *dims), got {type(x_init).__name__}")
        time_grid = torch.as_tensor(time_grid).to(x_init.device)
        if time_grid.ndim != 1 or time_grid.numel() < 2:
            raise ValueError(f"time_grid must be 1-D with at least 2 points, got shape {tuple(time_grid.shape)}")
        if method in FUSED and not enable_grad:
            return self._fused(x_init, step_size, method, time_grid, return_intermediates, model_extras)
        return self._torchdiffeq(
            x_init, step_size, method, atol, rtol, time_grid, return_intermediates, enable_grad, model_extras
        )

    def compute_likelihood(
        self,
        x_1: torch.Tensor,
        log_p0: Callable[[torch.Tensor], torch.Tensor],
        step_size: float | None,
        method: str = "euler",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        time_grid: torch.Tensor | None = None,
        return_intermediates: bool = False,
        exact_divergence: bool = False,
        enable_grad: bool = False,
        **model_extras,
    ):
        """log p_1(x_1) = log p0(x_0) + int_1^0 div u_t(x_t) dt, solving the ODE from x_1 at t=1 back to t=0.

        Args:
            x_1: (B, *dims) target samples. log_p0: the source log-density, ``(B, *dims) -> (B,)``.
            step_size, method, atol, rtol: as :meth:`sample` (torchdiffeq runs every method here: the
                divergence needs autograd through the model).
            time_grid: 1-D, from 1.0 to 0.0 (default ``[1.0, 0.0]``); ValueError otherwise.
            return_intermediates: return the states at every point of ``time_grid`` instead of x_0.
            exact_divergence: the trace of the Jacobian (one backward pass per dimension), or False:
                Hutchinson's estimator ``z^T (du/dx) z`` with one Rademacher ``z`` drawn once per call
                from torch's global RNG (``torch.randn_like(x_1) < 0``, as flow_matching draws it).
            enable_grad: keep the graph through the solve (gradients with respect to ``x_1`` and the
                model's parameters).
            **model_extras: keyword inputs of every model call.

        Returns:
            ``(x_0, log_p1)``: x_0 (B, *dims) (or (len(time_grid), B, *dims)) and log_p1 (B,).

        Raises:
            RuntimeError: the model's output is not differentiable with respect to x (it runs under
                ``torch.no_grad()``, detaches, or leaves torch).

        Example:
            >>> import torch
            >>> solver = ODESolver(lambda x, t: -x)
            >>> normal = lambda x: -0.5 * (x ** 2).sum(1) - x.shape[1] / 2 * math.log(2 * math.pi)
            >>> x0, logp = solver.compute_likelihood(torch.zeros(3, 2), normal, step_size=0.01, exact_divergence=True)
            >>> logp.shape
            torch.Size([3])
        """
        from ._likelihood import compute_likelihood

        return compute_likelihood(
            self.velocity_model,
            x_1,
            log_p0,
            step_size,
            method,
            atol,
            rtol,
            time_grid,
            return_intermediates,
            exact_divergence,
            enable_grad,
            model_extras,
        )

    def _fused(self, x_init, step_size, method, time_grid, return_intermediates, extras):
        if step_size is not None and not (
            isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0
        ):
            raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
        grid_t = time_grid if step_size is None else _step_grid(time_grid, step_size)
        grid = grid_t.double().cpu().tolist()
        steps = len(grid) - 1
        out = _sample(
            self.velocity_model,
            x_init,
            steps * METHODS[method],
            method=method,
            time_grid=grid,
            return_trajectory=return_intermediates,
            model_kwargs=extras,
            options=Options(signature="flow_matching"),
        )
        if not return_intermediates or step_size is None:
            return out
        return _interp(out, grid, time_grid.double().cpu().tolist())

    def _torchdiffeq(self, x_init, step_size, method, atol, rtol, time_grid, return_intermediates, enable_grad, extras):
        try:
            from torchdiffeq import odeint
        except ImportError:
            raise ImportError(
                f"method={method!r} (or enable_grad=True) is solved by torchdiffeq, which is not "
                "installed: pip install torchdiffeq, or use method='euler'/'midpoint'"
            ) from None

        def ode_func(t, x):
            return self.velocity_model(x=x, t=t, **extras)

        opts = {"step_size": step_size} if step_size is not None else {}
        with torch.set_grad_enabled(enable_grad):
            sol = odeint(ode_func, x_init, time_grid, method=method, options=opts, atol=atol, rtol=rtol)
        return sol if return_intermediates else sol[-1]
