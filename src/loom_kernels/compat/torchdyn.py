"""torchdyn's ``NeuralODE`` for inference (Poli et al., "TorchDyn: a neural differential equations library",
2020), on loom_kernels' sampler: TorchCFM's examples sample without torchdyn.

``from torchdyn.core import NeuralODE`` becomes ``from loom_kernels.compat.torchdyn import NeuralODE``:
``NeuralODE(vector_field, solver, sensitivity=..., atol=, rtol=)``, ``forward(x, t_span) -> (t_eval,
trajectory)`` and ``trajectory(x, t_span) -> (len(t_span), *x.shape)`` as torchdyn 1.0's. The vector
field is called as torchdyn calls it: ``vf(t, x, args={})`` when its ``forward`` (or the callable)
has an argument named ``t`` (``vf(t, x)`` when it takes no ``args``), else ``vf(x)``; ``t`` is a 0-dim
tensor. The mode of an ``nn.Module`` is left alone, as torchdyn does (call ``.eval()`` yourself).

Solvers, all our sampler's (fused updates, CUDA graphs on repeated calls): "euler", "midpoint",
"rk4" (classical Runge-Kutta, stages at ``t, t + h/2, t + h/2, t + h``; torchdyn 1.0.6 evaluates
them at ``t, t, t + h/2, t + h/2``: equal results for fields that do not depend on t, ours is the
4th-order method for those that do) and "dopri5" (adaptive Dormand-Prince 5(4), output times hit
exactly; its step controller is torchdiffeq's, not torchdyn's, so adaptive results agree to the
tolerances, not to rounding).
Fixed-step solvers step through ``t_span`` itself, one step per interval, as torchdyn does.

Out of scope: training through the ODE. Any ``sensitivity`` is accepted for inference; a backward
pass through the result raises an error saying so (use torchdyn or ``torchdiffeq.odeint_adjoint``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..sampler import METHODS, Options, sample
from .torchcfm.utils import torch_wrapper

__all__ = ["NeuralODE", "torch_wrapper"]

#: our name for each solver, and where it runs
SOLVERS = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4", "rk-4": "rk4", "dopri5": "dopri5"}
SENSITIVITIES = ("autograd", "adjoint", "interpolated_adjoint")
_NO_TRAINING = (
    "loom_kernels.compat.torchdyn.NeuralODE is for inference: training through the ODE (sensitivity={!r}) is out "
    "of scope. Sample under torch.no_grad(), or train through the solver with torchdyn's NeuralODE or "
    "torchdiffeq.odeint_adjoint"
)


def _call_style(vector_field) -> str:
    """torchdyn's rule (``standardize_vf_call_signature``): "t_x_args", "t_x" or "x"."""
    fn = vector_field.forward if isinstance(vector_field, torch.nn.Module) else vector_field
    try:
        spec = inspect.getfullargspec(fn)
    except TypeError:
        return "t_x"
    if "t" not in spec.args:
        return "x"
    return "t_x_args" if ("args" in spec.args or "args" in spec.kwonlyargs or spec.varkw) else "t_x"


def _field(vector_field, style: str):
    """The vector field in the sampler's "torchdiffeq" convention ``f(t_0d, x)``; not an nn.Module, so the
    sampler leaves the model's train/eval mode alone (torchdyn never changes it)."""
    if style == "x":
        return lambda t, x: vector_field(x)
    if style == "t_x_args":
        return lambda t, x: vector_field(t, x, args={})
    return lambda t, x: vector_field(t, x)


class _NoBackward(torch.autograd.Function):
    """Passes the solution through; its backward raises the out-of-scope error instead of a silent zero."""

    @staticmethod
    def forward(ctx, sensitivity, sol, *anchors):
        ctx.sensitivity = sensitivity
        return sol.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_TRAINING.format(ctx.sensitivity))


class NeuralODE(torch.nn.Module):
    """torchdyn's ``NeuralODE`` for sampling: ``trajectory(x, t_span)`` integrates dx/dt = vector_field(t, x).

    Args:
        vector_field: an ``nn.Module`` or callable, called as torchdyn calls it (module docstring).
        solver: "euler", "midpoint", "rk4" or "dopri5" (torchdyn's default "tsit5" is not available:
            "dopri5" is the same order).
        order: 1 (higher-order systems are not supported).
        atol, rtol: dopri5's tolerances (torchdyn's defaults, 1e-3); ignored by fixed-step solvers.
        sensitivity: "autograd", "adjoint" or "interpolated_adjoint", accepted for inference only.
        return_t_eval: ``forward`` returns ``(t_eval, sol)`` (default) or ``sol``.

    Other torchdyn arguments are accepted at their defaults and refused otherwise.

    Shapes: ``x (b, *dims)``, ``t_span (T,)`` strictly monotone (descending integrates backwards);
    ``trajectory`` returns ``(T, b, *dims)`` in x's dtype and device, ``x`` first.

    Example::

        node = NeuralODE(torch_wrapper(model), solver="euler", sensitivity="adjoint")
        with torch.no_grad():
            traj = node.trajectory(torch.randn(64, 2), t_span=torch.linspace(0, 1, 100))  # (100, 64, 2)
    """

    def __init__(
        self,
        vector_field: torch.nn.Module | Callable,
        solver: str = "tsit5",
        order: int = 1,
        atol: float = 1e-3,
        rtol: float = 1e-3,
        sensitivity: str = "autograd",
        solver_adjoint=None,
        atol_adjoint: float = 1e-4,
        rtol_adjoint: float = 1e-4,
        interpolator=None,
        integral_loss=None,
        seminorm: bool = False,
        return_t_eval: bool = True,
        optimizable_params=(),
    ) -> None:
        super().__init__()
        if not callable(vector_field):
            raise TypeError(f"vector_field must be an nn.Module or a callable, got {type(vector_field).__name__}")
        if not isinstance(solver, str) or solver not in SOLVERS:
            hint = " (torchdyn's default; 'dopri5' is the same order)" if solver == "tsit5" else ""
            raise ValueError(f"solver must be one of {sorted(set(SOLVERS))}, got {solver!r}{hint}")
        if sensitivity not in SENSITIVITIES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
        unsupported = {
            "order": (order, 1),
            "interpolator": (interpolator, None),
            "integral_loss": (integral_loss, None),
            "seminorm": (seminorm, False),
            "optimizable_params": (tuple(optimizable_params), ()),
        }
        for name, (value, default) in unsupported.items():
            if value != default:
                raise NotImplementedError(
                    f"NeuralODE({name}={value!r}) is not supported by "
                    "loom_kernels.compat.torchdyn (inference of first-order ODEs only); "
                    "use torchdyn for it"
                )
        for name, value in (("atol", atol), ("rtol", rtol)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.vf = vector_field  # registered as a submodule when it is one, as torchdyn's
        self.solver, self.order, self.atol, self.rtol = SOLVERS[solver], order, atol, rtol
        self.sensitivity, self.solver_adjoint = sensitivity, solver_adjoint
        self.atol_adjoint, self.rtol_adjoint = atol_adjoint, rtol_adjoint
        self.return_t_eval, self.t_span = return_t_eval, None
        self._field = _field(vector_field, _call_style(vector_field))

    def _check(self, x, t_span) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = getattr(x, "dtype", type(x).__name__)
            raise TypeError(f"x must be a floating torch.Tensor (b, *dims), got {got}")
        if t_span is None:
            t_span = self.t_span if self.t_span is not None else torch.linspace(0, 1, 2)
        t_span = torch.as_tensor(t_span)
        if t_span.ndim != 1 or t_span.numel() < 2 or not t_span.is_floating_point():
            raise ValueError(
                f"t_span must be a 1-D floating tensor of at least 2 times, got shape "
                f"{tuple(t_span.shape)} ({t_span.dtype})"
            )
        steps = t_span[1:] - t_span[:-1]
        if not (bool((steps > 0).all()) or bool((steps < 0).all())):
            raise ValueError("t_span must be strictly increasing or strictly decreasing")
        return t_span.to(x.device)

    def _solve(self, x: torch.Tensor, t_span: torch.Tensor) -> torch.Tensor:
        grid = t_span.double().cpu().tolist()
        # Fixed-step solvers: one step per interval of t_span, as torchdyn steps.
        nfe = None if self.solver == "dopri5" else (len(grid) - 1) * METHODS[self.solver]
        return sample(
            self._field,
            x,
            nfe,
            method=self.solver,
            time_grid=grid,
            atol=self.atol,
            rtol=self.rtol,
            return_trajectory=True,
            options=Options(signature="torchdiffeq"),
        )

    def trajectory(self, x: torch.Tensor, t_span: torch.Tensor) -> torch.Tensor:
        """The states at every time of ``t_span``: ``(len(t_span), *x.shape)``, ``x`` first."""
        t_span = self._check(x, t_span)
        params = [p for p in self.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (x.requires_grad or params):
            with torch.no_grad():
                sol = self._solve(x, t_span)
            anchors = [a for a in (x, *params) if a.requires_grad]
            return _NoBackward.apply(self.sensitivity, sol, *anchors)
        with torch.no_grad():
            return self._solve(x, t_span)

    def forward(self, x: torch.Tensor, t_span: torch.Tensor | None = None, save_at=(), args=None):
        """torchdyn's ``forward``: ``(t_eval, sol)`` (``sol`` only with ``return_t_eval=False``)."""
        if len(save_at):
            raise NotImplementedError("save_at is not supported: pass the times you want as t_span")
        sol = self.trajectory(x, t_span)
        t_eval = self._check(x, t_span)
        return (t_eval, sol) if self.return_t_eval else sol

    def __repr__(self):
        return (
            f"NeuralODE(solver={self.solver!r}, sensitivity={self.sensitivity!r}, atol={self.atol}, rtol={self.rtol})"
        )
