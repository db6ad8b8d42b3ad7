"""C2OT's own weight rule, ``cond_weight="c2ot"`` (``couplings.c2ot.c2ot_search_weight``): against a bisection of
its definition (C2OT's ``search_for_w``: the largest w with ``mean_ij [cost_ij + w pen_ij <= own_i] >= r``) on
fresh random inputs, square and oversampled, its edge cases, and every coupling that takes it reporting in
``stats["cond_weight"]`` the function's value on its batch (LOOM's frozen at the first call)."""

from __future__ import annotations

import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling, SemidiscreteCoupling, SinkhornCoupling
from loom_kernels.couplings.c2ot import C2OT_WEIGHT_CAP, adaptive_cond_weight, c2ot_search_weight, cond_pair_cost
from loom_kernels.couplings.factory import make_coupling
from loom_kernels.noise import gaussian_noise


def _gen(s):
    return torch.Generator().manual_seed(s)


def _sq(a, b):
    """float64 brute force ``|a_i - b_j|^2`` (no matmul expansion)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a[:, None] - b[None]).square().sum(-1)


def _frac(cost, pen, own, w):
    return float((cost + w * pen <= own[:, None]).double().mean())


def _bisect(cost, pen, own, r):
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _frac(cost, pen, own, mid) >= r else (lo, mid)
    return lo


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("k", "metric"), [(1, "sqeuclidean"), (3, "sqeuclidean"), (2, "cosine")])
def test_the_rule_is_the_largest_weight_reaching_r(seed, k, metric):
    """Against the definition (the fraction at w is >= r, just above w it is < r) and a bisection of it."""
    g = _gen(seed)
    n = 40
    x1, x0 = torch.randn(n, 2, generator=g) * 3, torch.randn(k * n, 2, generator=g)
    c = torch.randn(n, 3, generator=g)
    cols = c.double().repeat_interleave(k, 0)
    cost, pen = _sq(x1, x0), cond_pair_cost(c.double(), cols, metric)
    # the definition in exact arithmetic: an item's own condition costs 0 (the cosine's 1 - u.u may be 2e-16)
    exact = pen.masked_fill((c.double()[:, None] == cols[None]).all(-1), 0.0)
    own = cost[torch.arange(n), torch.arange(n) * k]  # item i's independent pair: its first row
    for r in (0.05, 0.2, 0.35):
        w = c2ot_search_weight(cost, pen, r, own)
        assert 0 < w < C2OT_WEIGHT_CAP
        assert _frac(cost, exact, own, w) >= r > _frac(cost, exact, own, w * (1 + 1e-9) + 1e-12)
        assert w == pytest.approx(_bisect(cost, exact, own, r), rel=1e-6)
    if k == 1:  # own=None: the diagonal
        assert c2ot_search_weight(cost, pen, 0.05) == c2ot_search_weight(cost, pen, 0.05, cost.diagonal())


def test_edge_cases_zero_and_the_cap():
    g = _gen(3)
    x1, c = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    pen = cond_pair_cost(c.double(), c.double())
    # the data is its own noise: only the 50 own pairs are free, 1/50 < r at w = 0 already
    assert c2ot_search_weight(_sq(x1, x1), pen, 0.05) == 0.0
    # every condition equal: no pair's fraction moves with w; C2OT's cap when the free pairs reach r, else 0
    x0 = torch.randn(50, 2, generator=g)
    zero = torch.zeros(50, 50, dtype=torch.float64)
    assert c2ot_search_weight(_sq(x1, x0), zero, 0.05) == C2OT_WEIGHT_CAP == 1e8
    assert c2ot_search_weight(_sq(x1, x1), zero, 0.05) == 0.0
    # a batch so small that its own pairs alone are r: the cap
    assert c2ot_search_weight(_sq(x1[:10], x1[:10]), pen[:10, :10], 0.1) == C2OT_WEIGHT_CAP


def test_minibatch_ot_uses_the_rule_per_batch_square_cosine_and_oversampled():
    g = _gen(4)
    x1, x0, c = (torch.randn(32, 3, generator=g, dtype=torch.float64) for _ in range(3))
    for metric in ("sqeuclidean", "cosine"):
        m = MinibatchOTCoupling(cond_weight="c2ot", cond_metric=metric)
        assert m.cond_ratio == 0.05
        m(x1, x0=x0, cond=c)
        ref = c2ot_search_weight(_sq(x1, x0), cond_pair_cost(c, c, metric), 0.05)
        assert float(m.stats["cond_weight"]) == pytest.approx(ref, rel=1e-6)  # its cost: float32
        m2 = MinibatchOTCoupling(cond_weight=ref, cond_metric=metric)  # the same plan as the fixed weight
        assert torch.equal(m(x1, x0=x0, cond=c)[0], m2(x1, x0=x0, cond=c)[0])
    k = 3  # oversampled: item i's own pair is its first row i*k
    m = MinibatchOTCoupling(cond_weight="c2ot", cond_ratio=0.2, oversample=k, generator=_gen(9))
    m(x1, cond=c)
    noise = torch.randn(k * 32, 3, generator=_gen(9), dtype=torch.float64)
    cost = _sq(x1, noise)
    own = cost[torch.arange(32), torch.arange(32) * k]
    ref = c2ot_search_weight(cost, cond_pair_cost(c, c.repeat_interleave(k, 0)), 0.2, own)
    assert float(m.stats["cond_weight"]) == pytest.approx(ref, rel=1e-6)


def test_sinkhorn_uses_the_rule_per_call():
    g = _gen(5)
    x1, x0, c = (torch.randn(24, 2, generator=g) for _ in range(3))
    s = SinkhornCoupling(0.1, cond_weight="c2ot", cond_ratio=0.1, generator=_gen(1))
    for scale in (1.0, 10.0):  # per call: it follows the batch
        s(x1 * scale, x0=x0 * scale, cond=c)
        ref = c2ot_search_weight(_sq(x1 * scale, x0 * scale), cond_pair_cost(c.double(), c.double()), 0.1)
        assert float(s.stats["cond_weight"]) == pytest.approx(ref, rel=1e-6)
    k = 2
    s = SinkhornCoupling(0.1, cond_weight="c2ot", cond_metric="cosine", oversample=k, generator=_gen(2))
    s(x1, cond=c)
    noise = torch.randn(k * 24, 2, generator=_gen(2))
    cost = _sq(x1, noise)
    own = cost[torch.arange(24), torch.arange(24) * k]
    ref = c2ot_search_weight(cost, cond_pair_cost(c.double(), c.double().repeat_interleave(k, 0), "cosine"), 0.05, own)
    assert float(s.stats["cond_weight"]) == pytest.approx(ref, rel=1e-6)


P, SHAPE = 48, (2, 3)


def test_loom_freezes_the_rule_at_its_first_call_with_differing_conditions(tmp_path):
    g = _gen(6)
    data, cond = torch.randn(P, *SHAPE, generator=g), torch.randn(P, 2, generator=g)
    c = LoomCoupling(P, SHAPE, seed=3, cond_weight="c2ot", cond_ratio=0.1)
    idx = torch.arange(24)
    c(data[idx], idx, cond=torch.ones(24, 2))  # every condition equal: nothing frozen, weight 0 used
    assert float(c.stats["cond_weight"]) == 0.0 and c.state_dict()["cond_weight_frozen"] is None
    idx = torch.randperm(P, generator=g)[:24]
    held = gaussian_noise(c.seeds[idx, 0].clone(), SHAPE, device="cpu", dtype=torch.float32)
    c(data[idx], idx, cond=cond[idx])
    ref = c2ot_search_weight(_sq(data[idx], held), cond_pair_cost(cond[idx].double(), cond[idx].double()), 0.1)
    w0 = float(c.stats["cond_weight"])
    assert w0 == pytest.approx(ref, rel=1e-5) and c.state_dict()["cond_weight_frozen"] == w0
    for scale in (10.0, 0.01):
        idx = torch.randperm(P, generator=g)[:24]
        c(data[idx] * scale, idx, cond=cond[idx] * scale)
        assert float(c.stats["cond_weight"]) == w0
    d = LoomCoupling(P, SHAPE, seed=3, cond_weight="adaptive", cond_ratio=0.1)  # another rule's checkpoint
    with pytest.raises(ValueError, match="'c2ot' cond_weight.*cond_weight='adaptive'"):
        d.load_state_dict(c.state_dict())
    e = LoomCoupling(P, SHAPE, seed=3, cond_weight="c2ot", cond_ratio=0.1)
    e.load_state_dict(c.state_dict())
    assert e.state_dict()["cond_weight_frozen"] == w0
    c.save(tmp_path / "c.pt")
    f = LoomCoupling.load(tmp_path / "c.pt", mmap_path=None)
    assert (f.cond_weight, f.cond_ratio, f.state_dict()["cond_weight_frozen"]) == ("c2ot", 0.1, w0)


def test_torchcfm_sampler_takes_the_rule():
    from loom_kernels.compat.torchcfm import OTPlanSampler

    g = _gen(7)
    x0, x1, c = (torch.randn(30, 3, generator=g) for _ in range(3))
    w = c2ot_search_weight(_sq(x1, x0), cond_pair_cost(c.double(), c.double()), 0.05)
    got = OTPlanSampler("exact", cond_weight="c2ot").sample_plan(x0, x1, replace=False, cond=c)[0]
    want = OTPlanSampler("exact", cond_weight=w).sample_plan(x0, x1, replace=False, cond=c)[0]
    assert torch.equal(got, want)


def test_defaults_factory_and_bad_arguments():
    assert MinibatchOTCoupling(cond_weight="adaptive").cond_ratio == 0.5  # the share rule's default, as before
    assert MinibatchOTCoupling(cond_weight=2.0).cond_ratio == 0.5
    assert SinkhornCoupling(cond_weight="c2ot").cond_ratio == 0.05
    assert LoomCoupling(P, SHAPE, cond_weight="c2ot").cond_ratio == 0.05
    for name in ("ot", "sinkhorn"):
        cp = make_coupling(name, options={"cond_weight": "c2ot"})
        assert (cp.cond_weight, cp.cond_ratio) == ("c2ot", 0.05)
    assert make_coupling("loom", P, SHAPE, options={"cond_weight": "c2ot", "cond_ratio": 0.2}).cond_ratio == 0.2
    for bad in (0, 1.0, 1.5, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="cond_ratio"):
            MinibatchOTCoupling(cond_weight="c2ot", cond_ratio=bad)
    with pytest.raises(ValueError, match="cond_ratio"):
        make_coupling("sinkhorn", options={"cond_weight": "c2ot", "cond_ratio": -0.1})
    with pytest.raises(ValueError, match="cond_weight must be a finite float >= 0 or one of"):
        SinkhornCoupling(cond_weight="C2OT")
    with pytest.raises(ValueError, match="'grouped'.*'c2ot'"):
        MinibatchOTCoupling(cond_weight="c2ot", scope="grouped")
    with pytest.raises(ValueError, match="cond_weight='c2ot' is refused by SemidiscreteCoupling"):
        SemidiscreteCoupling(torch.randn(20, 2), cond=torch.randn(20, 1), cond_weight="c2ot")


def test_adaptive_is_unchanged():
    """The share rule's weight with the default ratio is ``adaptive_cond_weight(..., 0.5)`` as before."""
    g = _gen(8)
    x1, x0, c = (torch.randn(20, 3, generator=g, dtype=torch.float64) for _ in range(3))
    m = MinibatchOTCoupling(cond_weight="adaptive")
    m(x1, x0=x0, cond=c)
    pen = cond_pair_cost(c, c)
    assert float(m.stats["cond_weight"]) == pytest.approx(adaptive_cond_weight(_sq(x1, x0), pen, 0.5), rel=1e-6)
