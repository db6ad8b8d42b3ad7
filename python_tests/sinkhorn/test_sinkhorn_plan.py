"""loom_kernels.sinkhorn.draw_pairs / plan_sharpness: pairs drawn from the plan without forming
it (Gumbel-max over the streamed tiles) and the normalised entropy, against the dense plan."""

from __future__ import annotations

import pytest
import torch

from loom_kernels.sinkhorn import _tiles, dense_plan, draw_pairs, plan_sharpness, sinkhorn, sinkhorn_cost
from loom_kernels.sinkhorn.reference import normalised_entropy, sq_cost64

from kernel_paths import BACKENDS, BACKENDS_SLOW_TRITON, needs_interpreter, on


def _points(n=40, m=30, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(m, d, generator=g) + 0.3


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_draws_follow_the_plan_rows(backend):
    """B = 2000 copies of one 6 x 5 problem draw 2000 independent samples per row (each problem
    has its own key): frequencies within 5 sigma of P_ij / a_i."""
    x, y = _points(6, 5, 2)
    res = sinkhorn(x, y, epsilon=0.3, tol=1e-7)
    cond = (dense_plan(res, x.double(), y.double()) * 6).clamp(0, 1)  # rows of P / a_i
    B = 2000
    xb, yb = x.expand(B, -1, -1), y.expand(B, -1, -1)
    resb = sinkhorn(xb, yb, epsilon=0.3, tol=1e-7)
    cols = on(backend, draw_pairs, resb, xb, yb, seed=123)
    assert cols.shape == (B, 6) and cols.dtype == torch.int64
    freq = torch.nn.functional.one_hot(cols, 5).double().mean(0)  # (6, 5)
    sigma = (cond * (1 - cond) / B).sqrt()
    assert ((freq - cond).abs() <= 5 * sigma + 1e-3).all(), (freq, cond)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_and_seed_dependent(backend):
    x, y = _points()
    res = sinkhorn(x, y, epsilon=0.5)
    a = on(backend, draw_pairs, res, x, y, seed=7)
    assert torch.equal(a, on(backend, draw_pairs, res, x, y, seed=7))
    assert not torch.equal(a, on(backend, draw_pairs, res, x, y, seed=8))
    big = on(backend, draw_pairs, res, x, y, seed=2**63 + 5)  # any 64-bit pattern is a seed
    assert big.shape == (40,)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(
        on(backend, draw_pairs, res, x, y, seed=gen),
        on(backend, draw_pairs, res, x, y, seed=torch.Generator().manual_seed(3)),
    )


@needs_interpreter
def test_triton_and_torch_draw_the_same_pairs():
    """Same hash, same noise: the paths agree except at near-ties of the perturbed logits."""
    x, y = _points(120, 150, 5, seed=4)
    res = sinkhorn(x, y, epsilon=0.05)
    for seed in (0, 1, 99):
        a = on("torch", draw_pairs, res, x, y, seed=seed)
        b = on("triton", draw_pairs, res, x, y, seed=seed)
        assert (a == b).float().mean() >= 0.99, seed
    assert torch.equal(
        on("torch", draw_pairs, res, x, y, argmax=True), on("triton", draw_pairs, res, x, y, argmax=True)
    )


def test_tiling_does_not_change_the_draws(monkeypatch):
    x, y = _points(50, 70, 3)
    res = sinkhorn(x, y, epsilon=0.1)
    ref = draw_pairs(res, x, y, seed=11)
    monkeypatch.setattr(_tiles, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(_tiles, "_COLS", 16)
    assert torch.equal(draw_pairs(res, x, y, seed=11), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_is_the_dense_argmax(backend):
    x, y = _points(64, 48, 6)
    res = sinkhorn(x, y, epsilon=0.02, tol=1e-6)
    plan = dense_plan(res, x.double(), y.double())
    cols = on(backend, draw_pairs, res, x, y, argmax=True)
    # compared by value: a near-tie may pick either column
    best = plan.max(1).values
    assert (plan.gather(1, cols[:, None])[:, 0] >= best * (1 - 1e-4)).all()


def test_cost_matrix_draws_match_points():
    x, y = _points()
    res = sinkhorn(x, y, epsilon=0.2)
    cost = sq_cost64(x, y).float()
    cres = sinkhorn_cost(cost, epsilon=0.2)
    a = draw_pairs(res, x, y, seed=5)
    b = draw_pairs(cres, cost=cost, seed=5)
    assert (a == b).float().mean() >= 0.95


def test_draw_pairs_checks_its_inputs():
    x, y = _points()
    res = sinkhorn(x, y, epsilon=0.2)
    with pytest.raises(ValueError, match="result.f is"):
        draw_pairs(res, x[:10], y)
    with pytest.raises(ValueError, match="not both"):
        draw_pairs(res, x, y, cost=sq_cost64(x, y))
    with pytest.raises(TypeError, match="seed must be an int"):
        draw_pairs(res, x, y, seed=1.5)
    with pytest.raises(TypeError, match="result must be a SinkhornResult"):
        draw_pairs((res.f, res.g), x, y)


# ---- sharpness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.02, 0.05, 1.0])
def test_sharpness_matches_the_dense_plan(eps):
    x, y = _points(50, 50, 2)
    res = sinkhorn(x, y, epsilon=eps, tol=1e-6, max_iter=5000)
    got = float(plan_sharpness(res, x, y))
    assert got == pytest.approx(normalised_entropy(dense_plan(res, x.double(), y.double())), abs=1e-6)
    # uniform marginals, n = m: the paper's H(P) / log n - 1
    p = dense_plan(res, x.double(), y.double())
    h = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
    assert got == pytest.approx(h / torch.log(torch.tensor(50.0)).item() - 1, abs=1e-4)


def test_sharpness_limits_and_scale_invariance():
    x, y = _points(60, 60, 2)
    sharp = float(plan_sharpness(sinkhorn(x, y, epsilon=1e-4, tol=1e-3, max_iter=20000), x, y))
    blurred = float(plan_sharpness(sinkhorn(x, y, epsilon=1e3), x, y))
    assert 0 <= sharp < 0.05 and 0.99 < blurred <= 1.0 + 1e-9
    mid = plan_sharpness(sinkhorn(x, y, epsilon=0.05, tol=1e-6), x, y)
    scaled = plan_sharpness(sinkhorn(x * 1e3, y * 1e3, epsilon=0.05, tol=1e-6), x * 1e3, y * 1e3)
    assert float(mid) == pytest.approx(float(scaled), abs=1e-4)
    xb, yb = torch.stack([x, 2 * x]), torch.stack([y, 2 * y])
    both = plan_sharpness(sinkhorn(xb, yb, epsilon=0.05, tol=1e-6), xb, yb)
    assert both.shape == (2,) and torch.allclose(both, mid.expand(2), atol=1e-4)
