"""loom_kernels.metrics: W2 against scipy, coupling cost against numpy, straightness against
closed forms (0 for straight flows, the arc formula for a rotation)."""

import math

import numpy as np
import pytest
import torch

from loom_kernels.metrics import coupling_cost, fid_from_features, straightness, w2
from loom_kernels.sampler import METHODS
from loom_kernels.testing import w2_reference

from harness import CountingModel

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
    assert got == pytest.approx(want, rel={"euler": 2e-2, "midpoint": 1e-4, "heun": 5e-4, "rk4": 1e-4}[method])
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


@pytest.mark.cuda(triton_only=True)
def test_straightness_cuda_matches_cpu():
    rot = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731
    x0 = torch.randn(64, 2)
    assert straightness(rot, x0.cuda(), 8, method="midpoint") == pytest.approx(
        straightness(rot, x0, 8, method="midpoint"), rel=1e-5
    )


# ---- fid_from_features ------------------------------------------------------------------------------


def _fid_scipy(a, b):
    """The textbook FID formula (pytorch-fid's) with scipy.linalg.sqrtm, in float64."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    assert np.abs(np.imag(covmean)).max() < 1e-6 * np.abs(covmean).max()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("n,m,d", [(400, 400, 2), (500, 300, 16), (2000, 1500, 64)])
def test_fid_matches_scipy_sqrtm(n, m, d):
    rng = np.random.default_rng(n + d)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    real = rng.standard_normal((n, d)) @ mix + 0.3
    fake = rng.standard_normal((m, d)) @ (mix + 0.2 * rng.standard_normal((d, d)) / np.sqrt(d)) * 1.3
    ref = _fid_scipy(real, fake)
    assert ref > 0.1
    assert fid_from_features(real, fake) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert fid_from_features(torch.from_numpy(real), torch.from_numpy(fake)) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # float32 features are promoted to float64 before any arithmetic
    r32, f32 = real.astype(np.float32), fake.astype(np.float32)
    assert fid_from_features(r32, f32) == pytest.approx(
        _fid_scipy(r32.astype(np.float64), f32.astype(np.float64)), rel=1e-9, abs=1e-9
    )


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 10))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(f, f[::-1].copy()) == pytest.approx(0.0, abs=1e-9)  # row order is irrelevant
    c = rng.standard_normal(10)
    assert fid_from_features(f, f + c) == pytest.approx(float(c @ c), rel=1e-9)  # a shift moves only the mean
    # scaling centred features by s: tr(S) + s^2 tr(S) - 2 s tr(S) = (1 - s)^2 tr(S)
    f = f - f.mean(0)
    tr = np.trace(np.cov(f, rowvar=False))
    assert fid_from_features(f, 3.0 * f) == pytest.approx(4.0 * tr, rel=1e-9)
    assert fid_from_features(f, 2.0 * f) == pytest.approx(fid_from_features(2.0 * f, f), rel=1e-12)  # symmetric


def test_fid_rank_deficient_covariances():
    # N <= D: singular covariances (45 zero eigenvalues). The square root of each zero eigenvalue's
    # rounding (~1e-16 * |S|) adds ~1e-8 * |S|^(1/2): the attainable accuracy here is ~sqrt(eps), not eps.
    rng = np.random.default_rng(1)
    f = rng.standard_normal((20, 64))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-5)
    c = np.full(64, 0.5)
    assert fid_from_features(f, f + c) == pytest.approx(16.0, abs=1e-5)
    assert fid_from_features(f, 2 * f) > 1.0  # a real difference is still seen


def test_fid_errors():
    with pytest.raises(ValueError, match=r"same dimension D.*\(10, 4\).*\(10, 5\)"):
        fid_from_features(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"real_feats must have shape \(N, D\) with N >= 2"):
        fid_from_features(np.zeros((1, 4)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"fake_feats must have shape \(N, D\)"):
        fid_from_features(np.zeros((10, 4)), np.zeros((10, 4, 1)))
    with pytest.raises(ValueError, match="finite"):
        fid_from_features(np.full((10, 4), np.nan), np.zeros((10, 4)))
    with pytest.raises(TypeError, match="real-valued"):
        fid_from_features(np.zeros((10, 4), dtype=bool), np.zeros((10, 4)))


@pytest.mark.cuda
def test_fid_cuda_matches_cpu():
    f, g = torch.randn(500, 32, dtype=torch.float64), torch.randn(400, 32, dtype=torch.float64) * 1.5
    assert fid_from_features(f.cuda(), g.cuda()) == pytest.approx(fid_from_features(f, g), rel=1e-9)
