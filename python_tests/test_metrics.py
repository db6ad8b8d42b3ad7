"""loom_kernels.metrics: W2 against scipy, coupling cost against numpy, straightness against
closed forms (0 for straight flows, the arc formula for a rotation)."""
import math

import numpy as np
import pytest
import torch

from loom_kernels.metrics import coupling_cost, straightness, w2
from loom_kernels.sampler import METHODS
from loom_kernels.testing import CountingModel, w2_reference

ALL = sorted(METHODS)

# ---- w2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,shape", [(1, (2,)), (7, (3,)), (64, (2,)), (40, (1, 3, 3))])
def test_w2_matches_scipy(n, shape):
    x = torch.randn(n, *shape)
    y = torch.randn(n, *shape) * 2 + 0.5
    ref = w2_reference(x.numpy(), y.numpy())
    assert w2(x, y) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert w2(x.numpy(), y.numpy()) == pytest.approx(ref, rel=1e-12, abs=1e-12)  # arrays too
    assert w2(x.double(), y.double()) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_w2_ties_and_integer_points():
    # many equal-cost matchings: only the optimal value is defined
    x = torch.randint(0, 3, (60, 2))
    y = torch.randint(0, 3, (60, 2))
    assert w2(x, y) == pytest.approx(w2_reference(x.numpy(), y.numpy()), rel=1e-12, abs=1e-12)
    dup = torch.zeros(20, 2)
    assert w2(dup, dup + 1) == pytest.approx(math.sqrt(2), rel=1e-14)


def test_w2_identity_permutation_symmetry_translation():
    x = torch.randn(100, 3)
    assert w2(x, x) == 0.0
    assert w2(x, x[torch.randperm(100)]) == 0.0
    y = torch.randn(100, 3)
    assert w2(x, y) == pytest.approx(w2(y, x), rel=1e-12)
    # a translation is matched by the identity: W2 = |c| exactly
    c = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    assert w2(x.double(), x.double() + c) == pytest.approx(float(c.norm()), rel=1e-12)


def test_w2_large_range():
    x = torch.randn(30, 2, dtype=torch.float64) * 1e6
    y = x + torch.randn(30, 2, dtype=torch.float64) * 1e-3
    assert w2(x, y) == pytest.approx(w2_reference(x.numpy(), y.numpy()), rel=1e-9)


def test_w2_errors():
    with pytest.raises(ValueError, match=r"same shape.*\(5, 2\) and \(6, 2\)"):
        w2(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"same shape.*\(5, 2\) and \(5, 3\)"):
        w2(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        w2(torch.tensor([[0.0], [float("nan")]]), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="NaN or inf"):
        w2(torch.zeros(2, 1), torch.tensor([[0.0], [float("inf")]]))
    with pytest.raises(ValueError, match="at least one point"):
        w2(torch.zeros(0, 2), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="0-d"):
        w2(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(TypeError, match="real-valued"):
        w2(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool))


# ---- coupling_cost -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2), (50, 3), (8, 1, 4, 4)])
def test_coupling_cost_matches_numpy(shape):
    a = torch.randn(*shape)
    b = torch.randn(*shape)
    ref = np.square(a.double().numpy().reshape(shape[0], -1) - b.double().numpy().reshape(shape[0], -1)).sum(1).mean()
    assert coupling_cost(a, b) == pytest.approx(ref, rel=1e-12)
    assert coupling_cost(a.numpy(), b.numpy()) == pytest.approx(ref, rel=1e-12)
    assert coupling_cost(a, a) == 0.0


def test_coupling_cost_errors():
    with pytest.raises(ValueError, match="same shape"):
        coupling_cost(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least one pair"):
        coupling_cost(torch.zeros(0, 2), torch.zeros(0, 2))


# ---- straightness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_straightness_zero_for_straight_flows(method):
    x0 = torch.randn(32, 2)
    assert straightness(lambda x, t: torch.full_like(x, 0.7), x0, 4, method=method) == 0.0
    # the straight field of a known coupling: v = x1 - x0 for each sample
    x1 = torch.randn(32, 2)
    assert straightness(lambda x, t: x1 - x0, x0, 8, method=method) < 1e-24


@pytest.mark.parametrize("method", ALL)
def test_straightness_rotation_closed_form(method):
    # v = J x rotates at unit speed: the path is an arc of 1 rad, |v| = |x0|, chord 2|x0| sin(1/2),
    # so S = |x0|^2 - |chord|^2 = |x0|^2 (1 - 4 sin^2(1/2)).
    x0 = torch.randn(64, 2, dtype=torch.float64)
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    want = float(x0.square().sum(1).mean()) * (1 - 4 * math.sin(0.5) ** 2)
    got = straightness(rot, x0, 256, method=method)
    # O(h) for euler, O(h^2) otherwise (heun's predictor point is off the path by O(h^2))
    assert got == pytest.approx(want, rel={"euler": 2e-2, "midpoint": 1e-4, "heun": 5e-4}[method])
    assert got > 0.1


def test_straightness_curved_positive_and_exact_nfe():
    model = CountingModel(lambda x, t: -x * (1 + 3 * t[:, None]))
    x0 = torch.randn(16, 3)
    s = straightness(model, x0, 6, method="heun")
    assert s > 1e-2 and model.calls == 6


def test_straightness_restores_mode_and_checks_args():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net.train()
    seen = []

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            seen.append(self.training)
            return self.net(x)

    m = M().train()
    straightness(m, torch.randn(4, 2), 2)
    assert seen == [False, False] and m.training and net.training
    with pytest.raises(ValueError, match="multiple of 2"):
        straightness(m, torch.randn(4, 2), 3, method="midpoint")
    with pytest.raises(ValueError, match="at least one sample"):
        straightness(m, torch.zeros(0, 2), 2)


# ---- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_w2_cuda_matches_cpu():
    x = torch.randn(300, 3)
    y = torch.randn(300, 3)
    assert w2(x.cuda(), y.cuda()) == pytest.approx(w2(x, y), rel=1e-9)
    with pytest.raises(ValueError, match="same device"):
        w2(x.cuda(), y)


@pytest.mark.cuda
def test_straightness_cuda_matches_cpu():
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    x0 = torch.randn(64, 2)
    assert straightness(rot, x0.cuda(), 8, method="midpoint") == pytest.approx(
        straightness(rot, x0, 8, method="midpoint"), rel=1e-5
    )
