"""loom_kernels.sinkhorn: the streamed solver (torch tiles and the Triton kernel under the
interpreter) against POT and a dense float64 reference, its bad-input errors and its memory bound."""

from __future__ import annotations

import math
import warnings

import ot
import pytest
import torch

from loom_kernels.sinkhorn import SinkhornWarning, _tiles, dense_plan, sinkhorn, sinkhorn_cost
from loom_kernels.sinkhorn.reference import sinkhorn_dense, sq_cost64

from kernel_paths import BACKENDS, BACKENDS_SLOW_TRITON, on


def _uniform(k):
    return torch.full((k,), 1.0 / k, dtype=torch.float64)


def _tv(p, q):
    """Total variation between two plans (both of mass ~1)."""
    return float((p.double() - q.double()).abs().sum())


def _case(name):
    g = torch.Generator().manual_seed(1)
    if name == "random":
        return torch.randn(60, 3, generator=g), torch.randn(45, 3, generator=g) + 0.5
    if name == "far_apart":  # the Gram identity would cancel badly without centring
        return torch.randn(50, 2, generator=g) + 1000.0, torch.randn(40, 2, generator=g) - 1000.0
    if name == "huge_scale":
        return torch.randn(50, 4, generator=g) * 1e4, torch.randn(50, 4, generator=g) * 1e4
    if name == "duplicates":
        x = torch.randn(10, 3, generator=g).repeat(5, 1)
        return x, x[torch.randperm(50, generator=g)[:33]].clone()
    if name == "wide_d":  # D spans two K-tiles of the kernel
        return torch.randn(40, 100, generator=g), torch.randn(70, 100, generator=g)
    if name == "one_point":
        return torch.randn(1, 3, generator=g), torch.randn(17, 3, generator=g)
    raise ValueError(name)


CASES = ["random", "far_apart", "huge_scale", "duplicates", "wide_d", "one_point"]


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("case", CASES)
def test_balanced_matches_pot(backend, case):
    x, y = _case(case)
    res = on(backend, sinkhorn, x, y, epsilon=0.05, tol=1e-6)
    assert res.converged and res.error <= 1e-6
    cost = sq_cost64(x, y)
    eps = float(res.epsilon)
    assert eps == pytest.approx(0.05 * float(cost.mean()), rel=1e-6)
    ref = ot.bregman.sinkhorn_log(_uniform(len(x)), _uniform(len(y)), cost, eps, stopThr=1e-12, numItermax=100000)
    plan = dense_plan(res, x.double(), y.double())
    assert _tv(plan, ref) < 2e-4, _tv(plan, ref)
    # the returned pair's marginals: columns exact, rows within the reported error (+ float32 noise)
    assert float((plan.sum(0) - 1 / len(y)).abs().sum()) < 2e-5
    assert float((plan.sum(1) - 1 / len(x)).abs().sum()) < float(res.error) + 2e-5


def test_small_epsilon_matches_the_dense_reference():
    """epsilon = 1e-2 of the mean cost (thousands of iterations: the torch path only)."""
    x, y = _case("random")
    res = sinkhorn(x, y, epsilon=1e-2, tol=1e-5, max_iter=20000)
    assert res.converged
    f, g, ref = sinkhorn_dense(sq_cost64(x, y), _uniform(60), _uniform(45), float(res.epsilon), tol=1e-6)
    assert _tv(dense_plan(res, x.double(), y.double()), ref) < 2e-4


def test_tiny_epsilon_keeps_its_marginals():
    """epsilon = 1e-3 of the mean cost: exponents in the thousands, float32 potentials; the
    returned pair's marginals, recomputed in float64, are what the result says."""
    x, y = _case("far_apart")
    res = sinkhorn(x, y, epsilon=1e-3, tol=1e-3, max_iter=20000)
    assert res.converged
    plan = dense_plan(res, x.double(), y.double())
    assert float((plan.sum(0) - 1 / 40).abs().sum()) < 1e-4
    assert float((plan.sum(1) - 1 / 50).abs().sum()) < 1e-3 + 1e-4


def test_float64_is_tight():
    x, y = (t.double() for t in _case("random"))
    res = sinkhorn(x, y, epsilon=0.02, tol=1e-12, max_iter=100000)
    assert res.f.dtype == torch.float64
    f, g, ref = sinkhorn_dense(sq_cost64(x, y), _uniform(60), _uniform(45), float(res.epsilon))
    assert _tv(dense_plan(res, x, y), ref) < 1e-9
    # the potentials themselves, up to the constant shift that leaves the plan unchanged
    shift = float((res.f - f).mean())
    torch.testing.assert_close(res.f - shift, f, atol=1e-8 * float(res.epsilon), rtol=0)
    torch.testing.assert_close(res.g + shift, g, atol=1e-8 * float(res.epsilon), rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_and_zero_weights(backend):
    x, y = _case("random")
    a = torch.rand(60, dtype=torch.float64) + 0.1
    a[[3, 17]] = 0.0
    a /= a.sum()
    b = torch.rand(45, dtype=torch.float64)
    b /= b.sum()
    res = on(backend, sinkhorn, x, y, a.float(), b.float(), epsilon=0.05, tol=1e-6)
    assert torch.isneginf(res.f[[3, 17]]).all() and torch.isfinite(res.g).all()
    keep = a > 0
    ref = ot.bregman.sinkhorn_log(
        a[keep], b, sq_cost64(x[keep], y), float(res.epsilon), stopThr=1e-12, numItermax=100000
    )
    plan = dense_plan(res, x.double(), y.double())
    assert float(plan[~keep].abs().max()) == 0.0
    assert _tv(plan[keep], ref) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_unbalanced_matches_pot(backend, tau):
    x, y = _case("random")
    a, b = _uniform(60), _uniform(45) * 2.0  # different masses: only an unbalanced problem takes them
    res = on(backend, sinkhorn, x, y, a.float(), b.float(), epsilon=0.05, tau=tau, tol=1e-6, max_iter=5000)
    assert res.converged
    cost = sq_cost64(x, y)
    assert float(res.tau) == pytest.approx(tau * float(cost.mean()), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" overwrites c
        ref = ot.unbalanced.sinkhorn_unbalanced(
            a,
            b,
            cost,
            float(res.epsilon),
            float(res.tau),
            reg_type="entropy",
            method="sinkhorn_stabilized",
            stopThr=1e-13,
            numItermax=200000,
        )
    plan = dense_plan(res, x.double(), y.double())
    assert _tv(plan, ref) < 2e-4 * float(ref.sum())


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_scale_and_translation_invariant(backend):
    x, y = _case("random")
    base = dense_plan(on(backend, sinkhorn, x, y, epsilon=0.03, tol=1e-7), x.double(), y.double())
    for s, t in [(1e-3, 0.0), (250.0, 300.0)]:
        xs, ys = x * s + t, y * s + t
        plan = dense_plan(on(backend, sinkhorn, xs, ys, epsilon=0.03, tol=1e-7), xs.double(), ys.double())
        assert _tv(plan, base) < 2e-4, (s, t)


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_batch_equals_per_problem(backend):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 30, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    y = torch.randn(3, 25, 5, generator=g)
    res = on(backend, sinkhorn, x, y, epsilon=0.05, tol=1e-7)
    assert res.f.shape == (3, 30) and res.g.shape == (3, 25) and res.epsilon.shape == (3,) and res.error.shape == (3,)
    plans = dense_plan(res, x.double(), y.double())
    for i in range(3):
        one = on(backend, sinkhorn, x[i], y[i], epsilon=0.05, tol=1e-7)
        assert float(one.epsilon) == pytest.approx(float(res.epsilon[i]))
        assert _tv(plans[i], dense_plan(one, x[i].double(), y[i].double())) < 2e-5


def test_cost_matrix_path_and_no_scaling_agree():
    x, y = _case("random")
    cost = sq_cost64(x, y)
    pts = dense_plan(sinkhorn(x, y, epsilon=0.05, tol=1e-7), x.double(), y.double())
    res = sinkhorn_cost(cost.float(), epsilon=0.05, tol=1e-7)
    assert _tv(dense_plan(res, cost=cost), pts) < 2e-5
    direct = sinkhorn(x, y, epsilon=0.05, tol=1e-7, eps_scaling=None)
    assert _tv(dense_plan(direct, x.double(), y.double()), pts) < 2e-5


def test_epsilon_scaling_reaches_the_same_plan():
    x, y = torch.randn(200, 2), torch.randn(200, 2)
    scaled = sinkhorn(x, y, epsilon=5e-3, tol=1e-5, max_iter=50000, eps_scaling=0.5)
    plain = sinkhorn(x, y, epsilon=5e-3, tol=1e-5, max_iter=50000)
    assert scaled.converged and plain.converged
    assert _tv(dense_plan(scaled, x.double(), y.double()), dense_plan(plain, x.double(), y.double())) < 5e-4


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epsilon": 0.0}, "epsilon must be a positive number"),
        ({"epsilon": -1.0}, "epsilon must be a positive number"),
        ({"epsilon": math.nan}, "epsilon must be a positive number"),
        ({"tau": 0.0}, "tau must be a positive number"),
        ({"tau": math.nan}, "tau must be a positive number"),
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"max_iter": 0}, "max_iter must be a positive int"),
        ({"eps_scaling": 1.0}, r"eps_scaling must be in \(0, 1\)"),
    ],
)
def test_bad_parameters(kw, match):
    x, y = _case("random")
    with pytest.raises(ValueError, match=match):
        sinkhorn(x, y, **kw)


def test_bad_points_and_marginals():
    x, y = _case("random")
    for bad, name in [(float("nan"), "x"), (float("inf"), "x")]:
        xb = x.clone()
        xb[3, 1] = bad
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            sinkhorn(xb, y)
    yb = y.clone()
    yb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="y must be finite"):
        sinkhorn(x, yb)
    with pytest.raises(ValueError, match="same total mass"):
        sinkhorn(x, y, torch.full((60,), 1 / 60), torch.full((45,), 2 / 45))
    with pytest.raises(ValueError, match="a must be non-negative"):
        sinkhorn(x, y, -torch.full((60,), 1 / 60))
    with pytest.raises(ValueError, match=r"b must have shape \(45,\)"):
        sinkhorn(x, y, None, torch.full((44,), 1 / 44))
    with pytest.raises(ValueError, match="same batch size and D"):
        sinkhorn(x, y[:, :2])
    with pytest.raises(ValueError, match="at least one point"):
        sinkhorn(x[:0], y)
    with pytest.raises(ValueError, match="cost must be finite"):
        sinkhorn_cost(torch.tensor([[0.0, float("inf")], [1.0, 0.0]]))


def test_not_converging_warns_with_the_error_reached():
    x, y = _case("random")
    with pytest.warns(SinkhornWarning, match=r"max_iter=3 with marginal error [0-9.e-]+ > tol=1e-09"):
        res = sinkhorn(x, y, epsilon=1e-3, tol=1e-9, max_iter=3)
    assert not res.converged and res.iterations == 3 and float(res.error) > 1e-9
    # the error reported is that of the potentials returned
    plan = dense_plan(res, x.double(), y.double())
    assert float((plan.sum(1) - 1 / 60).abs().sum()) == pytest.approx(float(res.error), rel=1e-3)


# ---- memory: nothing of size n * m is ever allocated --------------------------------------------


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (bytes) any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_memory_is_bounded_by_the_tile(backend, monkeypatch):
    """n = m = 700 (490,000 cost entries) with 4,096-number tiles: no tensor beyond one tile or
    the (B, n + m) vectors; the same solve with the default tile gives the same potentials."""
    monkeypatch.setattr(_tiles, "TILE_ELEMENTS", 4096)
    x, y = torch.randn(700, 8), torch.randn(700, 8)
    with _Largest() as mode:
        res = on(backend, sinkhorn, x, y, epsilon=0.1, tol=1e-4)
    assert res.converged
    # bytes: one float32 tile, or a copy of the (700, 8) float32 points (the interpreter's own)
    assert mode.largest <= max(4096, 700 * 8) * 4, mode.largest
    monkeypatch.setattr(_tiles, "TILE_ELEMENTS", 1 << 20)
    ref = on(backend, sinkhorn, x, y, epsilon=0.1, tol=1e-4)
    torch.testing.assert_close(res.f, ref.f, atol=1e-4 * float(res.epsilon), rtol=0)


@pytest.mark.parametrize("scale", [1e19, 3e18])
def test_points_whose_costs_overflow_float32_are_refused(scale):
    # #34 item 7: a float32 cost past ~1e38 made every (g - C) / eps inf - inf; the solver ran to max_iter and
    # drew one column for every row, its only sign a max_iter warning. Now refused, naming the inputs.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g) * scale, torch.randn(32, 4, generator=g)
    with pytest.raises(ValueError, match=r"x and y hold values so large .* overflow float32 .*float64"):
        sinkhorn(x, y)
    res = sinkhorn(x.double(), y.double(), max_iter=50)  # float64 holds them
    assert torch.isfinite(res.f).all()


def test_a_cost_that_overflows_float32_is_refused():
    cost = torch.rand(8, 8, dtype=torch.float64) * 1e39
    with pytest.raises(ValueError, match=r"cost must be finite"):
        sinkhorn_cost(cost.float())  # inf after the cast
    with pytest.raises(ValueError, match=r"cost hold entries so large that they overflow float32 .*float64"):
        sinkhorn_cost(cost.float().clamp_max(1e38))
    sinkhorn_cost(cost * 1e-36)  # a float64 cost is solved in float64


# ---- the streamed Triton kernel on a GPU, against float64 references and the CPU (torch tile) path -------


def _logits64(x, y, u, scale):
    return u.double()[:, None, :] + scale.double()[:, None, None] * torch.einsum("bnd,bmd->bnm", x.double(), y.double())


def _kernel_inputs(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 300, d, generator=g)
    y = torch.randn(2, 517, d, generator=g)  # m spans several column tiles, not a multiple of any
    u = torch.randn(2, 517, generator=g)
    u[0, ::7] = -math.inf  # zero-weight columns
    scale = torch.tensor([0.5, 2.0 / d])
    return x, y, u, scale


def _clear_winners(logits, margin=1e-3):
    """Rows whose best logit leads the second by more than ``margin`` (float32 cannot order nearer ones)."""
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > margin


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("d", [3, 100])
def test_cuda_stream_kernel_lse_and_argmax_match_float64(d):
    from loom_kernels.sinkhorn import _kernels

    x, y, u, scale = _kernel_inputs(d)
    ref = _logits64(x, y, u, scale)
    dev = [t.cuda() for t in (x, y, u, scale)]
    got = _kernels.lse(*dev).cpu()
    torch.testing.assert_close(got.double(), torch.logsumexp(ref, -1), rtol=1e-5, atol=1e-3)
    idx = _kernels.argmax(*dev).cpu()
    clear = _clear_winners(ref)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], ref.argmax(-1)[clear])
    # Gumbel-max: the same integer noise as _tiles.gumbel (the CPU path's) on every tile
    ki, kj = _tiles.row_keys(7, 2, 300, "cpu"), _tiles.col_keys(517, "cpu")
    noisy = ref + _tiles.gumbel(ki, kj).double()
    idx = _kernels.argmax(*dev, ki.cuda(), kj.cuda()).cpu()
    clear = _clear_winners(noisy)
    assert torch.equal(idx[clear], noisy.argmax(-1)[clear])


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("case", CASES)
def test_cuda_solver_matches_the_cpu_path(case):
    """``sinkhorn`` on CUDA tensors (the Triton kernel) reaches the plan of the CPU torch-tile path."""
    x, y = _case(case)
    cpu = on("torch", sinkhorn, x, y, epsilon=0.05, tol=1e-6)
    gpu = sinkhorn(x.cuda(), y.cuda(), epsilon=0.05, tol=1e-6)
    assert gpu.converged and gpu.f.is_cuda and float(gpu.error.max()) <= 1e-6
    torch.testing.assert_close(gpu.epsilon.cpu(), cpu.epsilon, rtol=1e-6, atol=0)
    plan_gpu = dense_plan(gpu, x.cuda().double(), y.cuda().double()).cpu()
    plan_cpu = dense_plan(cpu, x.double(), y.double())
    assert _tv(plan_gpu, plan_cpu) < 2e-4, _tv(plan_gpu, plan_cpu)
