"""Continuous conditions ``cond=`` and ``return_indices`` on every coupling, single process (issue 21 item 6).

The reference is scipy's ``linear_sum_assignment`` on a float64 numpy cost ``metric(x1_i, x0_j) + w *
||c_i - c_j||^2`` (+inf across labels); assignments are compared by total cost (ties make several optima).
The distributed half (gloo ranks) is in ``test_coupling_cond_distributed.py``.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from loom_kernels.couplings import (
    IndependentCoupling,
    LoomCoupling,
    MinibatchOTCoupling,
    PrefetchCoupling,
    SinkhornCoupling,
)
from loom_kernels.couplings.base import check_cond
from loom_kernels.couplings.scopes.solve import COND_PENALTY_CAP, add_cond_cost, cond_cost
from loom_kernels.noise import gaussian_noise


def ref_cost(x1, x0, cond, w, metric="sqeuclidean", labels=None):
    """float64 numpy: ``metric(x1_i, x0_j) + w ||c_i - c_j||^2``, +inf across labels."""
    a, b = x1.reshape(len(x1), -1).double().numpy(), x0.reshape(len(x0), -1).double().numpy()
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    cost = np.sqrt(d) if metric == "euclidean" else d
    if cond is not None:
        c = cond.double().reshape(len(cond), -1).numpy()
        cost = cost + w * ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    if labels is not None:
        y = labels.numpy()
        cost = np.where(y[:, None] == y[None, :], cost, np.inf)
    return cost


def ref_optimum(cost):
    r, c = linear_sum_assignment(cost)
    return cost[r, c].sum()


def assert_optimal(cost, perm, rtol=2e-5):
    perm = perm.cpu().numpy()
    assert sorted(perm.tolist()) == list(range(len(perm))), "perm is not a permutation"
    got, best = cost[np.arange(len(perm)), perm].sum(), ref_optimum(cost)
    assert got <= best + rtol * max(1.0, abs(best)), (got, best)


def _conds(kind, b, dc, g):
    if kind == "random":
        return torch.randn(b, dc, generator=g)
    if kind == "ties":  # a few distinct values: many equal conditions, many equal penalties
        return torch.randint(3, (b, dc), generator=g).float() * 0.5
    if kind == "offset":  # a large common offset and small differences: float64 keeps them
        return 1e4 + 1e-2 * torch.randn(b, dc, generator=g, dtype=torch.float64)
    if kind == "dominant":  # the penalty dwarfs the data cost
        return 30 * torch.randn(b, dc, generator=g)
    raise AssertionError(kind)


# ---- the cost term (common.py) ------------------------------------------------------------------------------


@pytest.mark.parametrize("dc", [1, 5, 64])
def test_cond_cost_equals_float64_reference_and_is_zero_on_equal_conditions(dc):
    g = torch.Generator().manual_seed(dc)
    c = check_cond(torch.randn(40, dc, generator=g) * 3, 40, torch.device("cpu"))
    c[7] = c[3]
    pen = cond_cost(c, c, 2.5)
    ref = 2.5 * ((c[:, None] - c[None]) ** 2).sum(-1)
    assert pen.dtype == torch.float64 and pen.shape == (40, 40)
    np.testing.assert_allclose(pen.double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-9)
    assert float(pen.diagonal().abs().max()) < 1e-9 and float(pen[7, 3]) < 1e-9
    huge = cond_cost(c, c, 1e300)  # capped: the cost stays finite
    assert bool(torch.isfinite(huge).all()) and float(huge.max()) == pytest.approx(COND_PENALTY_CAP, rel=1e-6)
    cost = torch.rand(40, 40)
    assert add_cond_cost(cost, c, c, 0.0) is cost and add_cond_cost(cost, None, None, 1.0) is cost


# ---- MinibatchOTCoupling against scipy ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "local", "grouped"])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "ties", "offset", "dominant"])
@pytest.mark.parametrize("dc", [1, 3, 64])
def test_minibatch_cond_is_optimal_for_the_penalised_cost(scope, metric, kind, dc):
    g = torch.Generator().manual_seed(11 * dc + len(kind))
    b, w = 48, 0.7
    x1, x0 = torch.randn(b, 2, 3, generator=g), torch.randn(b, 2, 3, generator=g)
    if kind == "ties":  # adversarial: duplicated data rows too
        x1[b // 2 :] = x1[: b // 2]
    cond = _conds(kind, b, dc, g)
    c = MinibatchOTCoupling(metric, scope=scope, group_size=b, cond_weight=w)
    out, _, perm = c(x1, x0=x0, cond=cond, return_indices=True)
    assert torch.equal(out, x0[perm])
    cost = ref_cost(x1, x0, cond, w, metric)
    assert_optimal(cost, perm)
    # stats include the penalty (float32 cost, float64 sums)
    assert float(c.stats["post_cost"]) == pytest.approx(cost[np.arange(b), perm.numpy()].mean(), rel=1e-4, abs=1e-4)
    assert float(c.stats["pre_cost"]) == pytest.approx(np.trace(cost) / b, rel=1e-4, abs=1e-4)


def test_minibatch_cond_1d_is_dc_1_and_any_float_dtype():
    g = torch.Generator().manual_seed(0)
    x1, x0, cond = torch.randn(32, 4, generator=g), torch.randn(32, 4, generator=g), torch.randn(32, generator=g)
    c = MinibatchOTCoupling(cond_weight=3.0)
    a = c(x1, x0=x0, cond=cond)[0]
    assert torch.equal(a, c(x1, x0=x0, cond=cond[:, None])[0])
    assert torch.equal(a, c(x1, x0=x0, cond=cond.double()[:, None])[0])
    assert_optimal(ref_cost(x1, x0, cond, 3.0), c(x1, x0=x0, cond=cond.half().float(), return_indices=True)[2])


@pytest.mark.parametrize("scope", ["global", "grouped"])
def test_minibatch_labels_forbid_and_cond_penalises(scope):
    g = torch.Generator().manual_seed(5)
    b = 40
    x1, x0 = torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g)
    y, cond = torch.randint(3, (b,), generator=g), torch.randn(b, 2, generator=g)
    out, _, perm = MinibatchOTCoupling(scope=scope, group_size=b, cond_weight=2.0)(
        x1, x0=x0, labels=y, cond=cond, return_indices=True
    )
    assert torch.equal(y[perm], y), "a noise crossed its class"
    assert_optimal(ref_cost(x1, x0, cond, 2.0, labels=y), perm)


@pytest.mark.parametrize("scope", ["global", "local", "grouped"])
def test_minibatch_weight_zero_is_the_unconditioned_coupling_bit_for_bit(scope):
    g = torch.Generator().manual_seed(2)
    x1, x0, cond = torch.randn(64, 6, generator=g), torch.randn(64, 6, generator=g), torch.randn(64, 4, generator=g)
    a = MinibatchOTCoupling(scope=scope, group_size=20, cond_weight=0.0)
    b = MinibatchOTCoupling(scope=scope, group_size=20)
    for _ in range(2):
        xa, xb = a(x1, x0=x0, cond=cond)[0], b(x1, x0=x0)[0]
        assert torch.equal(xa, xb)
        assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)
    # and the weight matters when it is not zero (the test can fail)
    assert not torch.equal(MinibatchOTCoupling(cond_weight=5.0)(x1, x0=x0, cond=cond)[0], xb)


@pytest.mark.parametrize("scope", ["global", "grouped"])
def test_minibatch_huge_weight_equals_labels(scope):
    g = torch.Generator().manual_seed(9)
    b = 60
    x1, x0 = torch.randn(b, 5, generator=g), torch.randn(b, 5, generator=g)
    values = torch.tensor([[0.3, -1.1], [1.7, 0.2], [-2.2, 0.9]])  # 3 distinct continuous conditions
    y = torch.randint(3, (b,), generator=g)
    by_cond = MinibatchOTCoupling(scope=scope, group_size=25, cond_weight=1e8)(x1, x0=x0, cond=values[y])[0]
    by_label = MinibatchOTCoupling(scope=scope, group_size=25)(x1, x0=x0, labels=y)[0]
    assert torch.equal(by_cond, by_label)
    assert not torch.equal(by_label, MinibatchOTCoupling(scope=scope, group_size=25)(x1, x0=x0)[0])


def test_minibatch_return_indices_rectangular_and_drawn_noise():
    g = torch.Generator().manual_seed(4)
    x1, x0 = torch.randn(10, 3, generator=g), torch.randn(25, 3, generator=g)
    out, x1_out, perm = MinibatchOTCoupling()(x1, x0=x0, return_indices=True)
    assert x1_out is x1 and perm.dtype == torch.int64 and torch.equal(out, x0[perm])
    assert len(set(perm.tolist())) == 10 and int(perm.max()) < 25
    c = MinibatchOTCoupling(generator=torch.Generator().manual_seed(1))
    drawn = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    out, _, perm = c(x1, return_indices=True)
    assert torch.equal(out, drawn[perm])
    empty = MinibatchOTCoupling()(x1[:0], return_indices=True)
    assert empty[0].shape == (0, 3) and empty[2].shape == (0,)


# ---- LoomCoupling ----------------------------------------------------------------------------------------------

P, SHAPE = 60, (2, 3)
LOOMS = {
    "global": dict(),
    "local": dict(scope="local"),
    "grouped": dict(scope="grouped", group_size=7),
    "sharded": dict(table="sharded"),
    "grouped-sharded": dict(scope="grouped", group_size=7, table="sharded"),
    "mmap": dict(mmap="t.npy"),
}


def _loom(kind, tmp_path, **kw):
    args = dict(LOOMS[kind])
    if "mmap" in args:
        args = {"mmap_path": tmp_path / f"{kw.pop('tag', 'a')}{args.pop('mmap')}", "overwrite": True}
    kw.pop("tag", None)
    return LoomCoupling(P, SHAPE, seed=3, **args, **kw)


def _dataset(dc=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, *SHAPE, generator=g), torch.randn(P, dc, generator=g), torch.randint(3, (P,), generator=g)


def _noise_of(seeds):
    return gaussian_noise(seeds, SHAPE, device="cpu", dtype=torch.float32)


def _table_cost(c, data):
    """The dataset-wide cost sum_{i,k} |x1_i - noise(seeds[i, k])|^2 in float64."""
    seeds = c.seeds
    tot = 0.0
    for k in range(seeds.shape[1]):
        tot += float(((data.double() - _noise_of(seeds[:, k]).double()) ** 2).flatten(1).sum(1).sum())
    return tot


@pytest.mark.parametrize("kind", sorted(LOOMS))
def test_loom_weight_zero_is_the_unconditioned_coupling_bit_for_bit(kind, tmp_path):
    data, cond, _ = _dataset()
    a = _loom(kind, tmp_path, cond_weight=0.0, num_caches=2, tag="a")
    b = _loom(kind, tmp_path, num_caches=2, tag="b")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randperm(P, generator=g)[:16]
        xa, xb = a(data[idx], idx, cond=cond[idx])[0], b(data[idx], idx)[0]
        assert torch.equal(xa, xb) and torch.equal(a.seeds, b.seeds)
        assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)


@pytest.mark.parametrize("kind", sorted(LOOMS))
def test_loom_huge_weight_equals_labels(kind, tmp_path):
    data, _, y = _dataset()
    values = torch.tensor([[0.25], [-1.5], [2.75]])
    a = _loom(kind, tmp_path, cond_weight=1e9, tag="a")
    b = _loom(kind, tmp_path, tag="b")
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        idx = torch.randperm(P, generator=g)[:20]
        xa, xb = a(data[idx], idx, cond=values[y[idx]])[0], b(data[idx], idx, labels=y[idx])[0]
        assert torch.equal(xa, xb) and torch.equal(a.seeds, b.seeds)


@pytest.mark.parametrize("kind", ["global", "local", "sharded", "mmap"])
@pytest.mark.parametrize("dc", [1, 16])
def test_loom_cond_step_is_optimal_monotone_and_conserves_seeds(kind, dc, tmp_path):
    """Each call: the matching is scipy-optimal for the penalised cost; the table's total cost drops by at
    least the penalty paid (so it never increases); the set of seeds never changes."""
    data, cond, _ = _dataset(dc, seed=dc)
    w = 0.8
    c = _loom(kind, tmp_path, cond_weight=w)
    initial = torch.sort(c.seeds.flatten()).values.clone()
    g = torch.Generator().manual_seed(3)
    before = _table_cost(c, data)
    for _ in range(6):
        idx = torch.randperm(P, generator=g)[:24]
        held = _noise_of(c.seeds[idx, 0].clone())
        x0, _, perm = c(data[idx], idx, cond=cond[idx], return_indices=True)
        assert torch.equal(x0, held[perm]), "perm applied to the noise held before does not give x0"
        cost = ref_cost(data[idx], held, cond[idx], w)
        assert_optimal(cost, perm)
        paid = float(w * ((cond[idx] - cond[idx][perm]).double() ** 2).sum())
        after = _table_cost(c, data)
        assert after <= before - paid + 1e-6 * before, (before, after, paid)
        assert float(c.stats["post_cost"]) <= float(c.stats["pre_cost"])
        before = after
    assert torch.equal(torch.sort(c.seeds.flatten()).values, initial), "seeds not conserved"


@pytest.mark.parametrize("kind", ["global", "grouped", "local"])
def test_loom_labels_and_cond_with_several_caches(kind, tmp_path):
    data, cond, y = _dataset(3, seed=7)
    c = _loom(kind, tmp_path, num_caches=3, cond_weight=0.5)
    initial = {k: torch.sort(c.seeds[y == k].flatten()).values.clone() for k in range(3)}
    g = torch.Generator().manual_seed(4)
    before = _table_cost(c, data)
    for _ in range(5):
        idx = torch.randperm(P, generator=g)[:30]
        c(data[idx], idx, labels=y[idx], cond=cond[idx])
        after = _table_cost(c, data)
        assert after <= before * (1 + 1e-7)
        before = after
    for k in range(3):  # labels forbid: each class keeps its seeds
        assert torch.equal(torch.sort(c.seeds[y == k].flatten()).values, initial[k])


def test_loom_grouped_return_indices_and_checkpoint_keeps_the_weight(tmp_path):
    data, cond, _ = _dataset()
    c = _loom("grouped", tmp_path, cond_weight=0.25)
    idx = torch.randperm(P, generator=torch.Generator().manual_seed(5))[:21]
    held = _noise_of(c.seeds[idx, 0].clone())
    x0, _, perm = c(data[idx], idx, cond=cond[idx], return_indices=True)
    assert torch.equal(x0, held[perm]) and sorted(perm.tolist()) == list(range(21))
    c.save(tmp_path / "c.pt")
    d = LoomCoupling.load(tmp_path / "c.pt")
    assert d.cond_weight == 0.25 and LoomCoupling.load(tmp_path / "c.pt", cond_weight=2.0).cond_weight == 2.0
    assert "cond_weight=0.25" in repr(d)


# ---- IndependentCoupling, PrefetchCoupling ----------------------------------------------------------------------


def test_independent_checks_cond_and_returns_the_identity():
    x1, x0 = torch.randn(8, 3), torch.randn(8, 3)
    out, _, perm = IndependentCoupling(cond_weight=2.0)(x1, x0=x0, cond=torch.rand(8, 2), return_indices=True)
    assert out is x0 and torch.equal(perm, torch.arange(8))
    with pytest.raises(TypeError, match="cond must have a floating dtype"):
        IndependentCoupling()(x1, cond=torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="cond_weight must be a finite float >= 0"):
        IndependentCoupling(cond_weight=-1.0)


@pytest.mark.parametrize("inner", ["minibatch", "loom"])
def test_prefetch_passes_cond_and_return_indices_through(inner):
    data, cond, _ = _dataset()
    idx = torch.arange(12)

    def make():
        if inner == "loom":
            return LoomCoupling(P, SHAPE, seed=3, cond_weight=2.0)
        return MinibatchOTCoupling(generator=torch.Generator().manual_seed(0), cond_weight=2.0)

    direct = make()(data[idx], idx, cond=cond[idx], return_indices=True)
    with PrefetchCoupling(make()) as pre:
        got = pre(data[idx], idx, cond=cond[idx], return_indices=True)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, direct))
        fut = pre.submit(data[idx + 12], idx + 12, cond=cond[idx + 12])
        assert len(fut.result()) == 2


# ---- bad input: a clear error naming the argument, the table unchanged ------------------------------------------

BAD_CONDS = [
    (lambda b: torch.randn(b + 1, 2), ValueError, r"cond must have shape \(b, Dc\) or \(b,\) with b = 12"),
    (lambda b: torch.randn(b, 2, 1), ValueError, r"cond must have shape \(b, Dc\)"),
    (lambda b: torch.ones(b, 2, dtype=torch.int32), TypeError, "cond must have a floating dtype"),
    (lambda b: torch.ones(b, dtype=torch.bool), TypeError, "cond must have a floating dtype"),
    (lambda b: torch.ones(b, 2, device="meta"), ValueError, "cond must be on x1's device cpu, got meta"),
    (lambda b: torch.full((b, 2), float("nan")), ValueError, "cond contains NaN or inf"),
    (lambda b: torch.tensor([float("inf")] + [0.0] * (b - 1)), ValueError, "cond contains NaN or inf"),
    (lambda b: [[0.0]] * b, TypeError, "cond must be a floating torch.Tensor"),
]


@pytest.mark.parametrize("case", range(len(BAD_CONDS)))
@pytest.mark.parametrize("kind", ["global", "grouped", "sharded", "mmap"])
def test_bad_cond_is_refused_and_the_table_unchanged(case, kind, tmp_path):
    make, exc, msg = BAD_CONDS[case]
    data, _, _ = _dataset()
    c = _loom(kind, tmp_path, num_caches=2)
    seeds, gen = c.seeds.clone(), c._gen.get_state().clone()
    idx = torch.arange(12)
    with pytest.raises(exc, match=msg):
        c(data[idx], idx, cond=make(12))
    assert torch.equal(c.seeds, seeds) and torch.equal(c._gen.get_state(), gen)
    if kind == "mmap":
        c.flush()
        assert torch.equal(torch.from_numpy(np.load(tmp_path / "at.npy")), seeds)
    c(data[idx], idx, cond=torch.randn(12, 2))  # still works
    assert not torch.equal(c.seeds, seeds)


@pytest.mark.parametrize("case", range(len(BAD_CONDS)))
@pytest.mark.parametrize("cls", [MinibatchOTCoupling, IndependentCoupling])
def test_bad_cond_refused_by_minibatch_and_independent(case, cls):
    make, exc, msg = BAD_CONDS[case]
    with pytest.raises(exc, match=msg):
        cls()(torch.randn(12, 3), cond=make(12))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), True, "1", None])
@pytest.mark.parametrize("cls", ["loom", "minibatch", "independent"])
def test_bad_cond_weight(weight, cls):
    make = {
        "loom": lambda: LoomCoupling(P, SHAPE, cond_weight=weight),
        "minibatch": lambda: MinibatchOTCoupling(cond_weight=weight),
        "independent": lambda: IndependentCoupling(cond_weight=weight),
    }[cls]
    with pytest.raises(ValueError, match="cond_weight must be a finite float >= 0"):
        make()


def test_cond_needs_one_noise_row_per_item_and_return_indices_a_bool():
    with pytest.raises(ValueError, match="cond needs x0 with exactly b = 4 rows"):
        MinibatchOTCoupling()(torch.randn(4, 2), x0=torch.randn(6, 2), cond=torch.randn(4))
    for c in (MinibatchOTCoupling(), IndependentCoupling()):
        with pytest.raises(TypeError, match="return_indices must be True or False"):
            c(torch.randn(4, 2), return_indices=torch.tensor(1))
    loom = LoomCoupling(P, SHAPE)
    seeds = loom.seeds.clone()
    with pytest.raises(TypeError, match="return_indices must be True or False"):
        loom(torch.randn(4, *SHAPE), torch.arange(4), return_indices="yes")
    assert torch.equal(loom.seeds, seeds)


@pytest.mark.parametrize(
    "make, dtype",
    [
        (lambda: MinibatchOTCoupling(), torch.float64),
        (lambda: LoomCoupling(16, (4,), cond_weight=1e300), torch.float64),
        (lambda: SinkhornCoupling(cond_weight=1e38), torch.float32),
    ],
)
def test_a_condition_term_that_overflows_is_refused_naming_cond(make, dtype):
    # #34 item 7: a cond of 1e200 made minibatch OT's float64 penalty inf - inf = NaN, refused as "x1 contains
    # NaN or inf"; a cond_weight of 1e38 made the Sinkhorn coupling draw one noise row for all items.
    c = make()
    x = torch.randn(16, 4)
    big = torch.full((16, 1), 1e200 if dtype == torch.float64 else 1.0, dtype=torch.float64)
    big[::2] *= -1
    before = {k: v.clone() for k, v in c.state_dict().items() if isinstance(v, torch.Tensor)}
    kw = {"indices": torch.arange(16)} if isinstance(c, LoomCoupling) else {}
    with pytest.raises(ValueError, match=r"cond holds values so large that its cost term overflows .*cond_weight"):
        c(x, cond=big if dtype == torch.float64 else big.float() * 4, **kw)
    after = c.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the refused call changed nothing


def test_sinkhorn_coupling_names_x1_when_its_costs_overflow_float32():
    with pytest.raises(ValueError, match=r"x1 holds values so large .* overflows float32 .*float64 data"):
        SinkhornCoupling()(torch.randn(16, 4) * 1e19)
    x0, x1 = SinkhornCoupling()(torch.randn(16, 4).double() * 1e19)  # float64 data holds them
    assert torch.isfinite(x0).all()
