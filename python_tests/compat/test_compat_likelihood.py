"""ODESolver.compute_likelihood (loom_kernels.compat.flow_matching) against flow_matching's own, the exact
change of variables of a linear field, and a Jacobian trace by autograd."""

import math

import pytest
import torch

from loom_kernels.compat.flow_matching import ODESolver


class MLP(torch.nn.Module):
    def __init__(self, d=2):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + 1, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))

    def forward(self, x, t, **extras):
        tt = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0], 1)
        return self.net(torch.cat([x, tt], 1)) * (1 + extras.get("scale", 0.0))


def _normal(x):
    return -0.5 * (x**2).flatten(1).sum(1) - x[0].numel() / 2 * math.log(2 * math.pi)


def _theirs(model):
    fm = pytest.importorskip("flow_matching.solver")
    return fm.ODESolver(velocity_model=model)


CASES = [
    dict(step_size=0.125, method="euler"),
    dict(step_size=0.1, method="midpoint"),
    dict(step_size=None, method="dopri5", atol=1e-4, rtol=1e-4),
    dict(step_size=None, method="euler", time_grid=torch.tensor([1.0, 0.7, 0.2, 0.0]), return_intermediates=True),
    dict(step_size=0.1, method="heun3", scale=0.5),
]


@pytest.mark.parametrize("exact,dtype", [(True, torch.float64), (True, torch.float32), (False, torch.float32)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_flow_matching(case, exact, dtype):
    # (flow_matching's Hutchinson probe is float32 whatever x_1's dtype, so it only runs float32 data)
    torch.manual_seed(0)
    model = MLP().to(dtype)
    theirs, ours = _theirs(model), ODESolver(model)
    x_1 = torch.randn(8, 2, dtype=dtype)
    kw = dict(CASES[case])
    for seed in (1,) if exact else (1, 2):
        torch.manual_seed(seed)
        a = theirs.compute_likelihood(x_1, _normal, exact_divergence=exact, **kw)
        after = torch.rand(1)
        torch.manual_seed(seed)
        c = ours.compute_likelihood(x_1, _normal, exact_divergence=exact, **kw)
        assert torch.equal(torch.rand(1), after)  # the same use of torch's RNG (the Hutchinson probe)
        assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
        assert c[1].shape == (8,) and not c[1].requires_grad


def test_linear_field_exact_likelihood_and_gradients():
    """u = a x: x_0 = x_1 e^-a, log p_1(x_1) = log p_0(x_1 e^-a) - a D, d/da = |x_1|^2 e^-2a - D."""
    a = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
    solver = ODESolver(lambda x, t: a * x)
    x_1 = torch.randn(5, 3, dtype=torch.float64)
    for exact in (True, False):
        a.grad = None
        x0, logp = solver.compute_likelihood(
            x_1,
            _normal,
            step_size=None,
            method="dopri5",
            atol=1e-10,
            rtol=1e-10,
            exact_divergence=exact,
            enable_grad=True,
        )
        ref = _normal(x_1 * math.exp(-0.7)) - 0.7 * 3
        torch.testing.assert_close(x0, x_1 * math.exp(-0.7), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(logp, ref, rtol=1e-8, atol=1e-8)  # Hutchinson is exact for a multiple of I
        logp.sum().backward()
        grad = ((x_1**2).sum(1) * math.exp(-1.4) - 3).sum()
        torch.testing.assert_close(a.grad, grad, rtol=1e-6, atol=1e-6)


def test_exact_divergence_of_images_is_the_jacobian_trace():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    solver = ODESolver(lambda x, t: torch.tanh(conv(x)))
    x_1 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x0, logp = solver.compute_likelihood(
        x_1, lambda x: torch.zeros(x.shape[0], dtype=x.dtype), step_size=1.0, exact_divergence=True
    )
    # one Euler step backwards from t=1: log_det = -div u(x_1)
    jac = torch.autograd.functional.jacobian(lambda y: torch.tanh(conv(y)).flatten(1).sum(0), x_1)  # (32, 3, 2, 4, 4)
    trace = torch.stack([jac.flatten(2)[:, b].diagonal().sum() for b in range(3)])  # jac[i, b, i] summed over i
    torch.testing.assert_close(logp, -trace, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x0, x_1 - torch.tanh(conv(x_1)), rtol=1e-12, atol=1e-12)


def test_flow_matching_published_cases():
    class Dummy(torch.nn.Module):
        def forward(self, x, t, **extras):
            return (x * 0.0 + 1.0) * 3.0 * t**2

    x_1 = torch.tensor([[0.0, 0.0]])
    _, logp = ODESolver(Dummy()).compute_likelihood(x_1=x_1, log_p0=_normal, step_size=0.1)
    assert logp.shape == (1,)
    with pytest.raises(RuntimeError):
        logp.backward()  # no graph without enable_grad


def test_errors_name_the_problem():
    solver = ODESolver(lambda x, t: x.detach() * 0.5)
    with pytest.raises(RuntimeError, match=r"no autograd path to x .*torch.no_grad\(\)"):
        solver.compute_likelihood(torch.randn(4, 2), _normal, step_size=0.5)

    def no_grad_model(x, t):
        with torch.no_grad():
            return x * 2

    with pytest.raises(RuntimeError, match="differentiates velocity_model"):
        ODESolver(no_grad_model).compute_likelihood(torch.randn(4, 2), _normal, step_size=0.5, exact_divergence=True)
    ok = ODESolver(lambda x, t: -x)
    with pytest.raises(ValueError, match=r"time_grid must start at 1.0 and end at 0.0.*\[0.0, 1.0\]"):
        ok.compute_likelihood(torch.randn(4, 2), _normal, step_size=0.5, time_grid=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"x_1 must be a floating tensor of shape \(B, \*dims\)"):
        ok.compute_likelihood(torch.ones(4, dtype=torch.long), _normal, step_size=0.5)
    # a field that does not depend on x has divergence 0 (flow_matching's autograd call fails here)
    p = torch.nn.Parameter(torch.ones(2))
    _, logp = ODESolver(lambda x, t: p.expand(x.shape[0], 2)).compute_likelihood(
        torch.zeros(3, 2), _normal, step_size=0.5
    )
    torch.testing.assert_close(logp, _normal(-torch.ones(3, 2)))
