"""MixedCoupling and TimestepMixedCoupling (issue 31): choice frequencies against the formulas, LOOM's
guarantees for the items it serves, the protocol's keywords, bad input."""

import numpy as np
import pytest
import torch
from scipy import stats

from loom_kernels.couplings import Coupling, IndependentCoupling, LoomCoupling, MinibatchOTCoupling
from loom_kernels.couplings.base import call_coupling
from loom_kernels.couplings.mixed import MixedCoupling, TimestepMixedCoupling, mix_probability


class Tag(Coupling):
    """x0 = value everywhere; records the calls it got."""

    def __init__(self, value, takes_t=False):
        self.value, self.calls, self.accepts_t = value, [], takes_t
        self.stats = {}

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False, **kw):
        self.calls.append({"b": len(x1), "indices": indices, "labels": labels, "t": kw.get("t")})
        self.stats = {"pre_cost": torch.tensor(float(self.value)), "post_cost": torch.tensor(0.0), "swaps": 2}
        x0 = torch.full_like(x1, self.value)
        return (x0, x1, torch.arange(len(x1))) if return_indices else (x0, x1)


def _reference_p(t, power):
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.clip(np.nan_to_num(power * t ** (power - 1) - (power - 1) * t**power, nan=1.0), 0, 1)


def test_mixed_chooses_first_with_probability_p():
    c = MixedCoupling(Tag(0), Tag(1), p=0.3, generator=torch.Generator().manual_seed(0))
    firsts = sum(int(c(torch.zeros(2, 2))[0][0, 0] == 0) for _ in range(2000))
    assert stats.binomtest(firsts, 2000, 0.3).pvalue > 1e-3
    assert stats.binomtest(firsts, 2000, 0.4).pvalue < 1e-3  # a wrong p is detected
    assert c.stats["first"] in (0, 1) and "pre_cost" in c.stats


@pytest.mark.parametrize("p,value", [(0.0, 1), (1.0, 0)])
def test_mixed_edges(p, value):
    c = MixedCoupling(Tag(0), Tag(1), p=p)
    assert all(float(c(torch.zeros(3, 2))[0][0, 0]) == value for _ in range(50))


def test_mixed_passes_the_keywords_to_the_chosen_part():
    first, second = Tag(0, takes_t=True), Tag(1)
    c = MixedCoupling(first, second, p=1.0)
    t, y = torch.rand(4), torch.zeros(4, dtype=torch.long)
    assert call_coupling(c, torch.zeros(4, 2), torch.arange(4), t=t, labels=y)[0].shape == (4, 2)
    assert first.calls[0]["t"] is t and first.calls[0]["labels"] is y
    c = MixedCoupling(first, second, p=0.0)
    call_coupling(c, torch.zeros(4, 2), torch.arange(4), t=t)
    assert second.calls[0]["t"] is None  # a part that takes no t gets none


def test_mix_probability_is_the_issue_formula():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for power in (0.5, 1.0, 1.5, 2.0, 4.0):
        np.testing.assert_allclose(mix_probability(t, power).numpy(), _reference_p(t.numpy(), power), atol=1e-12)
    assert float(mix_probability(torch.tensor([0.0]), 0.5)) == 1.0  # the pole at t = 0 is clipped


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 0.5])
def test_timestep_mixed_chooses_first_per_item_with_p_of_t(power):
    c = TimestepMixedCoupling(Tag(0), Tag(1), power=power, generator=torch.Generator().manual_seed(1))
    for tv in (0.1, 0.5, 0.9):
        x0, _ = c(torch.zeros(4000, 2), t=torch.full((4000,), tv))
        firsts = int((x0[:, 0] == 0).sum())
        want = float(_reference_p(tv, power))
        if want in (0.0, 1.0):
            assert firsts == round(4000 * want)
        else:
            assert stats.binomtest(firsts, 4000, want).pvalue > 1e-4, (power, tv, firsts / 4000, want)
        assert float(c.stats["first"]) == pytest.approx(firsts / 4000)


def test_timestep_mixed_splits_the_batch_and_puts_it_back():
    first, second = Tag(0, takes_t=True), Tag(1)
    c = TimestepMixedCoupling(first, second, power=2.0, generator=torch.Generator().manual_seed(2))
    x1 = torch.arange(40.0).view(20, 2)
    t = torch.linspace(0, 1, 20)
    idx = torch.arange(100, 120)
    y = torch.arange(20) % 3
    x0, x1b, perm = c(x1, idx, t=t, labels=y, return_indices=True)
    assert torch.equal(x1b, x1) and torch.equal(perm, torch.arange(20))
    served = x0[:, 0] == 0
    got1 = first.calls[0]
    assert torch.equal(got1["indices"], idx[served]) and torch.equal(got1["t"], t[served])
    assert torch.equal(got1["labels"], y[served]) and torch.equal(second.calls[0]["indices"], idx[~served])
    assert second.calls[0]["t"] is None
    n1 = int(served.sum())
    assert float(c.stats["pre_cost"]) == pytest.approx((20 - n1) / 20)  # tags 0 and 1 weighted by count
    assert int(c.stats["swaps"]) == 4


def test_a_part_serving_no_item_is_not_called():
    first, second = Tag(0), Tag(1)
    TimestepMixedCoupling(first, second, power=2.0)(torch.zeros(5, 2), t=torch.zeros(5))  # p(0) = 0
    assert first.calls == [] and second.calls[0]["b"] == 5


def test_permutations_are_mapped_to_batch_positions():
    g = torch.Generator().manual_seed(3)
    c = TimestepMixedCoupling(MinibatchOTCoupling(), MinibatchOTCoupling(), power=2.0, generator=g)
    x1, x0 = torch.randn(32, 2), torch.randn(32, 2)
    x0o, _, perm = c(x1, x0=x0, t=torch.rand(32), return_indices=True)
    assert sorted(perm.tolist()) == list(range(32))
    assert torch.equal(x0o, x0[perm])


def test_loom_part_keeps_its_guarantees_for_the_items_it_serves():
    n = 64
    loom, twin = LoomCoupling(n, (2,), seed=0), LoomCoupling(n, (2,), seed=0)
    before = loom.seeds.clone()
    c = TimestepMixedCoupling(loom, IndependentCoupling(), power=2.0, generator=torch.Generator().manual_seed(4))
    x1 = torch.randn(n, 2)
    idx = torch.arange(n)
    t = torch.rand(n)
    x0, _ = c(x1, idx, t=t)
    # The same generator draw decides which items LOOM served; rerun the twin on exactly those.
    served = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) < mix_probability(t, 2.0)
    assert 0 < int(served.sum()) < n
    assert float(c.stats["first"]) == pytest.approx(float(served.double().mean()))
    x0_twin, _ = twin(x1[served], idx[served])
    assert torch.equal(x0[served], x0_twin)  # exactly what LOOM alone gives on those items
    assert torch.equal(loom.seeds, twin.seeds)
    assert torch.equal(loom.seeds[~served], before[~served])  # the others' seeds are untouched
    assert float(loom.stats["post_cost"]) <= float(loom.stats["pre_cost"]) + 1e-9


def test_state_dict_round_trip():
    loom = LoomCoupling(16, (2,), seed=0)
    c = MixedCoupling(loom, IndependentCoupling(), p=0.5)
    loom(torch.randn(16, 2), torch.arange(16))
    st = c.state_dict()
    fresh = LoomCoupling(16, (2,), seed=0)
    assert not torch.equal(fresh.seeds, loom.seeds)
    MixedCoupling(fresh, IndependentCoupling(), p=0.5).load_state_dict(st)
    assert torch.equal(fresh.seeds, loom.seeds)
    with pytest.raises(ValueError, match="has no state to load"):
        MixedCoupling(IndependentCoupling(), IndependentCoupling(), p=0.5).load_state_dict({"first": {"a": 1}})


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", True])
def test_p_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="p must be a probability in"):
        MixedCoupling(Tag(0), Tag(1), p=p)


@pytest.mark.parametrize("power", [0, -1.0, float("nan"), None])
def test_power_must_be_positive(power):
    with pytest.raises(ValueError, match="power must be a number > 0"):
        TimestepMixedCoupling(Tag(0), Tag(1), power=power)


def test_timestep_mixed_bad_calls():
    c = TimestepMixedCoupling(Tag(0), Tag(1), power=2.0)
    with pytest.raises(ValueError, match="needs the batch's timesteps"):
        c(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"t must be a floating tensor of shape \(b,\) = \(3,\)"):
        c(torch.zeros(3, 2), t=torch.rand(4))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        c(torch.zeros(3, 2), t=torch.tensor([0.0, 0.5, 1.5]))
    with pytest.raises(TypeError, match="first must be a coupling"):
        MixedCoupling(3, Tag(1), p=0.5)
    with pytest.raises(TypeError, match="generator must be a CPU torch.Generator"):
        MixedCoupling(Tag(0), Tag(1), p=0.5, generator=3)
