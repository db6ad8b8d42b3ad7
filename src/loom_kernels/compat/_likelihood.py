"""flow_matching's ``ODESolver.compute_likelihood`` (the instantaneous change of variables, Chen et al.,
"Neural Ordinary Differential Equations", NeurIPS 2018; Hutchinson's trace estimator, Grathwohl et al.,
FFJORD, ICLR 2019), with flow_matching's dynamics, solver calls and RNG use, so the values equal its own.

Differences: a model whose output has no autograd path to x raises a RuntimeError that says so
(flow_matching fails inside autograd); a field that ignores x has divergence 0 (flow_matching fails);
the exact divergence is taken over the flattened dimensions (equal to flow_matching's for (B, D)
data). Gradients follow flow_matching's main branch: with ``enable_grad`` the graph runs through the
dynamics and the divergence; without it nothing is tracked.
"""

from __future__ import annotations

import torch

_NOT_DIFFERENTIABLE = (
    "compute_likelihood differentiates velocity_model(x=x, t=t) with respect to x, but its output has no autograd "
    "path to x (requires_grad is False): the model runs under torch.no_grad(), detaches its output, or computes "
    "outside torch. Make the velocity differentiable in x"
)


def _grad(out: torch.Tensor, x: torch.Tensor, create_graph: bool, retain_graph: bool = False) -> torch.Tensor:
    """d<out, 1>/dx; zeros where out does not depend on x."""
    (g,) = torch.autograd.grad(
        out,
        x,
        grad_outputs=torch.ones_like(out).detach(),
        create_graph=create_graph,
        retain_graph=retain_graph or create_graph,
        allow_unused=True,
    )
    return torch.zeros_like(x) if g is None else g


def _divergence(ut, xt, z, enable_grad: bool) -> torch.Tensor:
    if z is None:  # exact: the trace of du/dx, one backward pass per dimension, summed in flow_matching's order
        flat_u, div = ut.flatten(1), 0
        for i in range(flat_u.shape[1]):
            g = _grad(flat_u[:, i], xt, create_graph=enable_grad, retain_graph=True).flatten(1)[:, i]
            div += g
        return div
    ut_dot_z = torch.einsum("ij,ij->i", ut.flatten(start_dim=1), z.flatten(start_dim=1))
    grad_ut_dot_z = _grad(ut_dot_z, xt, create_graph=enable_grad)
    return torch.einsum("ij,ij->i", grad_ut_dot_z.flatten(start_dim=1), z.flatten(start_dim=1))


def compute_likelihood(
    velocity_model,
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
    extras,
):
    """The body of :meth:`loom_kernels.compat.flow_matching.ODESolver.compute_likelihood` (see there)."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ImportError(
            "compute_likelihood is solved by torchdiffeq, which is not installed: pip install torchdiffeq"
        ) from None
    if not isinstance(x_1, torch.Tensor) or not x_1.is_floating_point() or x_1.dim() < 2:
        got = f"{tuple(x_1.shape)} {x_1.dtype}" if isinstance(x_1, torch.Tensor) else type(x_1).__name__
        raise TypeError(f"x_1 must be a floating tensor of shape (B, *dims), got {got}")
    time_grid = torch.tensor([1.0, 0.0]) if time_grid is None else torch.as_tensor(time_grid)
    if time_grid.dim() != 1 or time_grid.numel() < 2 or not (time_grid[0] == 1.0 and time_grid[-1] == 0.0):
        raise ValueError(
            f"time_grid must start at 1.0 and end at 0.0 (the likelihood integrates from the data "
            f"at t=1 to the source at t=0), got {time_grid.tolist()}"
        )
    time_grid = time_grid.to(x_1.device)
    # flow_matching's draw: one Rademacher probe per call, fixed over the solve (here in x_1's dtype, so
    # float64 data works; flow_matching's float32 probe fails there)
    z = None if exact_divergence else ((torch.randn_like(x_1).to(x_1.device) < 0) * 2.0 - 1.0).to(x_1.dtype)

    def dynamics(t, states):
        xt = states[0]
        with torch.set_grad_enabled(True):
            xt.requires_grad_()
            ut = velocity_model(x=xt, t=t, **extras)
            if not isinstance(ut, torch.Tensor) or not ut.requires_grad:
                raise RuntimeError(_NOT_DIFFERENTIABLE)
            div = _divergence(ut, xt, z, enable_grad)
        if not enable_grad:
            ut, div = ut.detach(), div.detach()
        return ut, div

    y_init = (x_1, torch.zeros(x_1.shape[0], device=x_1.device))
    opts = {"step_size": step_size} if step_size is not None else {}
    with torch.set_grad_enabled(enable_grad):
        sol, log_det = odeint(dynamics, y_init, time_grid, method=method, options=opts, atol=atol, rtol=rtol)
    source_log_p = log_p0(sol[-1])
    return (sol if return_intermediates else sol[-1]), source_log_p + log_det[-1]
