"""C2OT's condition options (issue 32 item 3) on Sinkhorn and LOOM: cosine cost against float64 references
(POT's plan, scipy's assignment), the adaptive weight against its ratio formula, Sinkhorn's oversampling
against POT's rectangular plan, LOOM's adaptive weight frozen at its first call (state_dict, save/load,
equal to the fixed weight it froze), bad arguments refused by name, and the factory's routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom_kernels.couplings import LoomCoupling, SinkhornCoupling
from loom_kernels.couplings.c2ot import cond_pair_cost
from loom_kernels.couplings.factory import make_coupling
from loom_kernels.noise import gaussian_noise

ot = pytest.importorskip("ot")
scipy_opt = pytest.importorskip("scipy.optimize")


def _gen(s):
    return torch.Generator().manual_seed(s)


def _cos_cost(a, b):
    """float64 brute force: 1 - cos, a zero row with similarity 1 to a zero row and 0 to any other."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a @ b.T) / (na[:, None] * nb[None, :]).clamp_min(1e-300)
    both = (na[:, None] == 0) & (nb[None, :] == 0)
    return 1.0 - torch.where(both, torch.ones_like(cos), cos)


def _sq(a, b):
    return torch.cdist(a.double().flatten(1), b.double().flatten(1)) ** 2


def _pot_argmax(M, a=None, b=None):
    n, m = M.shape
    a = ot.unif(n) if a is None else a
    b = ot.unif(m) if b is None else b
    eps = 0.1 * float(M.mean())
    P = ot.bregman.sinkhorn_log(a, b, M.numpy(), eps, stopThr=1e-12, numItermax=100000)
    return torch.from_numpy(P).argmax(1), eps


def test_cosine_cost_of_zero_rows_and_scale_invariance():
    c = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [-6.0, -8.0]], dtype=torch.float64)
    pen = cond_pair_cost(c, c, "cosine")
    torch.testing.assert_close(pen, _cos_cost(c, c))
    assert float(pen[0, 2]) == 0.0 and float(pen[0, 1]) == 1.0 and abs(float(pen[1, 3]) - 2.0) < 1e-12
    torch.testing.assert_close(cond_pair_cost(c * 1e6, c, "cosine"), pen)


@pytest.mark.parametrize("w", [0.5, 4.0])
def test_sinkhorn_cosine_is_the_argmax_of_pots_plan(w):
    g = _gen(1)
    x1, x0 = torch.randn(36, 3, generator=g, dtype=torch.float64), torch.randn(36, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(36, 4, generator=g, dtype=torch.float64) * 5
    cond[[3, 7]] = 0.0  # zero conditions: equal to each other, unlike every other
    M = _sq(x1, x0) + w * _cos_cost(cond, cond)
    ref, eps = _pot_argmax(M)
    c = SinkhornCoupling(
        eps, relative=False, argmax=True, tol=1e-9, max_iter=100000, cond_weight=w, cond_metric="cosine"
    )
    _, _, idx = c(x1, x0=x0, cond=cond, return_indices=True)
    assert torch.equal(idx, ref)
    assert float(c.stats["cond_weight"]) == w


@pytest.mark.parametrize(("metric", "ratio"), [("sqeuclidean", 0.2), ("cosine", 0.7)])
def test_sinkhorn_adaptive_weight_hits_the_ratio(metric, ratio):
    g = _gen(2)
    x1, cond = torch.randn(40, 5, generator=g) * 3, torch.randn(40, 2, generator=g) + 1
    c = SinkhornCoupling(
        0.1, cond_weight="adaptive", cond_metric=metric, cond_ratio=ratio, oversample=3, generator=_gen(5)
    )
    c(x1, cond=cond)
    w = float(c.stats["cond_weight"])
    noise = torch.randn(120, 5, generator=_gen(5))  # the coupling's draw: 3 rows per item, row i*3+j item i's
    cost = _sq(x1, noise)
    pen = cond_pair_cost(cond.double(), cond.double().repeat_interleave(3, 0), metric)
    share = w * pen.mean() / (cost.mean() + w * pen.mean())
    assert abs(float(share) - ratio) < 1e-5
    big = SinkhornCoupling(
        0.1, cond_weight="adaptive", cond_metric=metric, cond_ratio=ratio, oversample=3, generator=_gen(5)
    )
    big(x1 * 10, cond=cond)  # per call: the weight follows the data's scale
    assert float(big.stats["cond_weight"]) > 50 * w


def test_sinkhorn_oversample_is_the_rectangular_plan_and_keeps_labels():
    b, k = 12, 4
    g = _gen(3)
    x1, cond = torch.randn(b, 2, generator=g, dtype=torch.float64), torch.randn(b, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(b * k, 2, generator=_gen(9), dtype=torch.float64)
    M = _sq(x1, noise) + 0.7 * _sq(cond, cond.repeat_interleave(k, 0))
    ref, eps = _pot_argmax(M)
    c = SinkhornCoupling(
        eps, relative=False, argmax=True, tol=1e-9, max_iter=100000, cond_weight=0.7, oversample=k, generator=_gen(9)
    )
    out, _, idx = c(x1, cond=cond, return_indices=True)
    assert torch.equal(idx, ref) and torch.equal(out, noise[idx])
    lab = torch.arange(b) % 3
    for seed in range(3):
        _, _, idx = SinkhornCoupling(0.05, oversample=k, generator=_gen(seed))(x1, labels=lab, return_indices=True)
        assert torch.equal(lab[idx // k], lab)  # row i*k+j carries item i's label


def test_sinkhorn_given_rectangular_noise_is_pots_rectangular_plan():
    """``x0`` of ``m > b`` rows (allowed by the protocol): rows of mass ``1/b``, columns ``1/m`` (refused before
    issue 32: the rows were given mass ``1/m``, an unbalanced problem)."""
    g = _gen(12)
    x1, x0 = torch.randn(10, 2, generator=g, dtype=torch.float64), torch.randn(25, 2, generator=g, dtype=torch.float64)
    ref, eps = _pot_argmax(_sq(x1, x0))
    _, _, idx = SinkhornCoupling(eps, relative=False, argmax=True, tol=1e-9, max_iter=100000)(
        x1, x0=x0, return_indices=True
    )
    assert torch.equal(idx, ref)


# ---- LOOM ------------------------------------------------------------------------------------------------------

P, SHAPE = 48, (2, 3)


def _data(dc=2, seed=0):
    g = _gen(seed)
    return torch.randn(P, *SHAPE, generator=g), torch.randn(P, dc, generator=g)


def _held(c, idx):
    return gaussian_noise(c.seeds[idx, 0].clone(), SHAPE, device="cpu", dtype=torch.float32)


def _table_cost(c, data):
    noise = gaussian_noise(c.seeds[:, 0], SHAPE, device="cpu", dtype=torch.float32)
    return float(((data.double() - noise.double()) ** 2).flatten(1).sum())


@pytest.mark.parametrize("kw", [{}, {"scope": "grouped", "group_size": 20}, {"table": "sharded"}])
def test_loom_cosine_step_is_scipy_optimal_and_monotone(kw):
    data, cond = _data(3, seed=1)
    w = 1.5
    c = LoomCoupling(P, SHAPE, seed=2, cond_weight=w, cond_metric="cosine", **kw)
    g = _gen(4)
    before = _table_cost(c, data)
    for _ in range(4):
        idx = torch.randperm(P, generator=g)[:20]
        held = _held(c, idx)
        x0, _, perm = c(data[idx], idx, cond=cond[idx], return_indices=True)
        assert torch.equal(x0, held[perm])
        cost = (_sq(data[idx], held) + w * _cos_cost(cond[idx], cond[idx])).numpy()
        r, col = scipy_opt.linear_sum_assignment(cost)
        got = cost[np.arange(20), perm.numpy()].sum()
        assert got <= cost[r, col].sum() + 2e-5 * abs(cost[r, col].sum())  # grouped: one group, the batch
        after = _table_cost(c, data)
        assert after <= before + 1e-9 * before
        before = after


def test_loom_adaptive_weight_is_the_first_batch_formula_then_frozen():
    data, cond = _data()
    ratio = 0.3
    c = LoomCoupling(P, SHAPE, seed=3, cond_weight="adaptive", cond_ratio=ratio)
    g = _gen(5)
    idx = torch.randperm(P, generator=g)[:24]
    held = _held(c, idx)
    c(data[idx], idx, cond=cond[idx])
    w0 = float(c.stats["cond_weight"])
    cost, pen = _sq(data[idx], held), _sq(cond[idx], cond[idx])
    share = w0 * pen.mean() / (cost.mean() + w0 * pen.mean())  # over every independent pair of the batch
    assert abs(float(share) - ratio) < 1e-6
    assert c.state_dict()["cond_weight_frozen"] == w0
    for scale in (10.0, 0.01):  # another scale: minibatch OT's weight would follow it, LOOM's does not
        idx = torch.randperm(P, generator=g)[:24]
        c(data[idx] * scale, idx, cond=cond[idx] * scale)
        assert float(c.stats["cond_weight"]) == w0


@pytest.mark.parametrize("kw", [{}, {"scope": "local"}, {"scope": "grouped", "group_size": 7}, {"num_caches": 2}])
def test_loom_adaptive_equals_the_fixed_weight_it_froze(kw):
    """After the first call the adaptive coupling IS the fixed-weight coupling at the frozen weight: tables
    equal bit for bit over calls whose batches would each give another weight; each call's table cost
    drops by at least the frozen weight times the condition cost paid."""
    data, cond = _data(2, seed=6)
    a = LoomCoupling(P, SHAPE, seed=4, cond_weight="adaptive", cond_ratio=0.6, **kw)
    g = _gen(7)
    batches = [torch.randperm(P, generator=g)[:16] for _ in range(6)]
    a(data[batches[0]], batches[0], cond=cond[batches[0]])
    w0 = float(a.stats["cond_weight"])
    f = LoomCoupling(P, SHAPE, seed=4, cond_weight=w0, **kw)
    f(data[batches[0]], batches[0], cond=cond[batches[0]])
    assert torch.equal(a.seeds, f.seeds)
    before = _table_cost(a, data)
    for idx in batches[1:]:
        a_x0, _, perm = a(data[idx], idx, cond=cond[idx], return_indices=True)
        f_x0 = f(data[idx], idx, cond=cond[idx])[0]
        assert torch.equal(a.seeds, f.seeds) and torch.equal(a_x0, f_x0)
        assert float(a.stats["cond_weight"]) == w0
        if kw.get("num_caches", 1) == 1:
            paid = float(w0 * ((cond[idx] - cond[idx][perm]).double() ** 2).sum())
            after = _table_cost(a, data)
            assert after <= before - paid + 1e-6 * before, (before, after, paid)
            before = after


def test_loom_adaptive_weight_survives_state_dict_and_save_load(tmp_path):
    data, cond = _data()
    kw = dict(cond_weight="adaptive", cond_ratio=0.4, cond_metric="cosine")
    c = LoomCoupling(P, SHAPE, seed=5, **kw)
    idx = torch.arange(20)
    c(data[idx], idx, cond=cond[idx])
    w0 = c.state_dict()["cond_weight_frozen"]
    d = LoomCoupling(P, SHAPE, seed=5, **kw)
    d.load_state_dict(c.state_dict())
    d(data[idx] * 7, idx, cond=cond[idx])
    assert float(d.stats["cond_weight"]) == w0
    c.save(tmp_path / "c.pt")
    e = LoomCoupling.load(tmp_path / "c.pt", mmap_path=None)
    assert (e.cond_weight, e.cond_metric, e.cond_ratio) == ("adaptive", "cosine", 0.4)
    assert e.state_dict()["cond_weight_frozen"] == w0
    with pytest.raises(ValueError, match="cond_ratio=0.4.*cond_ratio=0.5"):  # another ratio: refused, explained
        LoomCoupling.load(tmp_path / "c.pt", mmap_path=None, cond_ratio=0.5)
    with pytest.raises(ValueError, match="frozen"):
        LoomCoupling(P, SHAPE, seed=5, cond_weight="adaptive", cond_ratio=0.4).load_state_dict(c.state_dict())
    fixed = LoomCoupling.load(tmp_path / "c.pt", mmap_path=None, cond_weight=2.0)  # a number rules
    fixed(data[idx], idx, cond=cond[idx])
    assert float(fixed.stats["cond_weight"]) == 2.0
    # a sharded table's manifest carries it too
    s = LoomCoupling(P, SHAPE, seed=5, table="sharded", **kw)
    s.load_state_dict(c.state_dict())
    s.save(tmp_path / "s.pt")
    assert LoomCoupling.load(tmp_path / "s.pt", mmap_path=None).state_dict()["cond_weight_frozen"] == w0


def test_loom_adaptive_waits_for_conditions_that_differ():
    data, cond = _data()
    c = LoomCoupling(P, SHAPE, seed=6, cond_weight="adaptive")
    idx = torch.arange(16)
    c(data[idx], idx)  # no condition: nothing set
    c(data[idx], idx, cond=torch.ones(16, 2))  # every condition equal: weight 0 for this call, nothing set
    assert float(c.stats["cond_weight"]) == 0.0 and c.state_dict()["cond_weight_frozen"] is None
    c(data[idx], idx, cond=cond[idx])
    assert float(c.stats["cond_weight"]) > 0 and c.state_dict()["cond_weight_frozen"] == float(c.stats["cond_weight"])
    with pytest.raises(ValueError, match="contains NaN"):  # a refused call freezes nothing new
        LoomCoupling(P, SHAPE, cond_weight="adaptive")(data[idx] * float("nan"), idx, cond=cond[idx])


@pytest.mark.parametrize(
    ("cls", "kw", "match"),
    [
        (LoomCoupling, {"oversample": 2}, "oversample must be 1 here.*seeds"),
        (LoomCoupling, {"oversample": 0}, "oversample must be an int >= 1"),
        (LoomCoupling, {"cond_weight": "adaptive", "cond_ratio": 1.0}, "cond_ratio"),
        (LoomCoupling, {"cond_ratio": 0}, "cond_ratio"),
        (LoomCoupling, {"cond_metric": "l1"}, "cond_metric"),
        (LoomCoupling, {"cond_weight": "auto"}, "cond_weight"),
        (SinkhornCoupling, {"oversample": 0}, "oversample"),
        (SinkhornCoupling, {"oversample": 1.5}, "oversample"),
        (SinkhornCoupling, {"cond_ratio": 1.2}, "cond_ratio"),
        (SinkhornCoupling, {"cond_metric": "cos"}, "cond_metric"),
        (SinkhornCoupling, {"scope": "grouped", "oversample": 2}, "oversample must be 1 here.*grouped"),
    ],
)
def test_bad_c2ot_arguments_are_named(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(P, SHAPE, **kw) if cls is LoomCoupling else cls(**kw)


def test_factory_routes_the_c2ot_options():
    opts = {"cond_weight": "adaptive", "cond_metric": "cosine", "cond_ratio": 0.2, "oversample": 3}
    for name in ("ot", "sinkhorn"):
        c = make_coupling(name, options=opts)
        assert (c.cond_weight, c.cond_metric, c.cond_ratio, c.oversample) == ("adaptive", "cosine", 0.2, 3)
    loom = make_coupling("loom", P, SHAPE, options={"cond_weight": "adaptive", "cond_ratio": 0.2})
    assert (loom.cond_weight, loom.cond_ratio) == ("adaptive", 0.2)
    with pytest.raises(ValueError, match=r"options for coupling 'loom' may hold only .* got \['oversample'\]"):
        make_coupling("loom", P, SHAPE, options=opts)
    with pytest.raises(ValueError, match="cond_ratio"):
        make_coupling("ot", options={"cond_ratio": 2.0})


def test_torchcfm_ot_plan_sampler_takes_the_c2ot_options():
    from loom_kernels.compat.torchcfm import ExactOptimalTransportConditionalFlowMatcher, OTPlanSampler

    g = _gen(11)
    x0, x1, cond = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g), torch.randn(20, 4, generator=g)
    out, _ = OTPlanSampler("exact", cond_weight=2.5, cond_metric="cosine").sample_plan(x0, x1, replace=False, cond=cond)
    perm = _rows_of(out, x0)
    cost = (_sq(x1, x0) + 2.5 * _cos_cost(cond, cond)).numpy()
    r, col = scipy_opt.linear_sum_assignment(cost)
    assert cost[np.arange(20), perm.numpy()].sum() <= cost[r, col].sum() + 1e-5 * abs(cost[r, col].sum())
    fm = ExactOptimalTransportConditionalFlowMatcher(cond_weight="adaptive", cond_ratio=0.999999)
    t, xt, _ = fm.sample_location_and_conditional_flow(x0, x1, t=torch.zeros(20), cond=cond)
    assert torch.equal(xt, x0)  # the condition all but the whole cost: each item keeps the noise of its condition
    with pytest.raises(ValueError, match="cond_ratio"):
        OTPlanSampler("exact", cond_weight="adaptive", cond_ratio=1.0)


def _rows_of(out, src):
    eq = (out[:, None] == src[None]).all(-1)
    assert (eq.sum(1) == 1).all()
    return eq.double().argmax(1)
