"""loom_kernels.compat.flow_matching.ODESolver against flow_matching's own ODESolver (same model, same
x_init): euler and midpoint, with and without intermediates, step_size or time_grid, forwards and
backwards; other methods and enable_grad go through torchdiffeq as flow_matching does."""

import pytest
import torch

from loom_kernels.compat import flow_matching as compat

fm_solver = pytest.importorskip("flow_matching.solver")


class Wrapped(torch.nn.Module):
    """A flow_matching-style model: forward(x, t, **extras) with t a 0-dim tensor."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
        self.ts = []

    def forward(self, x, t, scale=1.0):
        self.ts.append(t.shape)
        return scale * self.net(torch.cat([x, t.expand(x.shape[0], 1).to(x.dtype)], 1))


CASES = [
    dict(step_size=0.125),
    dict(step_size=0.1),  # the last step is shortened (0.1 does not divide 1)
    dict(step_size=None, time_grid=torch.tensor([0.0, 0.1, 0.45, 0.8, 1.0])),
    dict(step_size=0.1, time_grid=torch.tensor([0.0, 0.33, 0.5, 1.0])),  # intermediates interpolated
    dict(step_size=0.2, time_grid=torch.tensor([1.0, 0.0])),  # backwards
    dict(step_size=None, time_grid=torch.tensor([1.0, 0.6, 0.0])),
]


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("intermediates", [False, True])
def test_matches_flow_matching(method, case, intermediates):
    model = Wrapped().eval()
    x = torch.randn(33, 3)
    kw = dict(CASES[case], method=method, return_intermediates=intermediates, scale=0.5)
    want = fm_solver.ODESolver(model).sample(x, **kw)
    model.ts.clear()
    got = compat.ODESolver(model).sample(x, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.ts and all(s == () for s in model.ts)  # t is a 0-dim tensor, as flow_matching passes it


def test_fused_path_uses_our_sampler(monkeypatch):
    calls = []
    real = compat._sample
    monkeypatch.setattr(compat, "_sample", lambda *a, **k: calls.append(k["method"]) or real(*a, **k))
    compat.ODESolver(Wrapped().eval()).sample(torch.randn(4, 3), 0.25, method="midpoint")
    assert calls == ["midpoint"]


def test_other_methods_and_gradients_match_flow_matching():
    pytest.importorskip("torchdiffeq")
    model = Wrapped().eval()
    x = torch.randn(8, 3)
    for kw in (dict(step_size=None, method="dopri5", atol=1e-6, rtol=1e-6), dict(step_size=0.25, method="rk4")):
        torch.testing.assert_close(
            compat.ODESolver(model).sample(x, **kw), fm_solver.ODESolver(model).sample(x, **kw), rtol=0, atol=0
        )
    xg = x.clone().requires_grad_(True)
    out = compat.ODESolver(model).sample(xg, 0.25, method="euler", enable_grad=True)
    out.sum().backward()  # gradients flow only when asked
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert not compat.ODESolver(model).sample(xg, 0.25, method="euler").requires_grad


def test_errors():
    solver = compat.ODESolver(Wrapped())
    with pytest.raises(TypeError, match="velocity_model must be callable"):
        compat.ODESolver(3)
    with pytest.raises(ValueError, match="step_size must be a positive number or None"):
        solver.sample(torch.randn(2, 3), -0.1)
    with pytest.raises(ValueError, match="time_grid must be 1-D with at least 2 points"):
        solver.sample(torch.randn(2, 3), 0.1, time_grid=torch.tensor([0.0]))
    with pytest.raises(TypeError, match="x_init must be a torch.Tensor"):
        solver.sample([1.0], 0.1)
