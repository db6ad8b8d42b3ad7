"""KNNNoiseCoupling against brute force, and C2OT's condition options on MinibatchOTCoupling against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom_kernels.couplings import MinibatchOTCoupling
from loom_kernels.couplings.c2ot import adaptive_cond_weight, cond_pair_cost
from loom_kernels.couplings.knn import KNNNoiseCoupling

scipy_opt = pytest.importorskip("scipy.optimize")


@pytest.mark.parametrize(("b", "k"), [(1, 16), (7, 3), (5, 1)])
def test_knn_takes_the_nearest_candidate(b, k):
    x1, cand = torch.randn(b, 3, 4, 4), torch.randn(b * k, 3, 4, 4)
    x0, out1, perm = KNNNoiseCoupling(k)(x1, x0=cand, return_indices=True)
    d = (x1.double()[:, None] - cand.double().view(b, k, 3, 4, 4)).flatten(2).square().sum(2)  # the reference
    ref = d.argmin(1)
    assert torch.equal(perm, torch.arange(b) * k + ref)
    assert torch.equal(x0, cand[perm]) and out1 is x1


def test_knn_draws_and_lowers_the_cost():
    c = KNNNoiseCoupling(16, generator=torch.Generator().manual_seed(0))
    x0, _ = c(torch.randn(64, 8))
    assert x0.shape == (64, 8) and float(c.stats["post_cost"]) < float(c.stats["pre_cost"])


def test_knn_bad_input():
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            KNNNoiseCoupling(k)
    with pytest.raises(ValueError, match=r"x0 must be None \(drawn here\) or hold k\*b = 12"):
        KNNNoiseCoupling(4)(torch.randn(3, 2), x0=torch.randn(11, 2))


def _cost(x1, x0):
    return torch.cdist(x1.double(), x0.double()).square()


def test_cosine_condition_matches_scipy():
    x1, x0 = torch.randn(24, 3), torch.randn(24, 3)
    cond = torch.randn(24, 4)
    m = MinibatchOTCoupling(cond_metric="cosine", cond_weight=3.0)
    _, _, perm = m(x1, x0=x0, cond=cond, return_indices=True)
    c64 = cond.double()
    cos = (c64 / c64.norm(dim=1, keepdim=True)) @ (c64 / c64.norm(dim=1, keepdim=True)).T
    total = (_cost(x1, x0) + 3.0 * (1 - cos)).numpy()
    r, c = scipy_opt.linear_sum_assignment(total)
    np.testing.assert_allclose(total[np.arange(24), perm.numpy()].sum(), total[r, c].sum(), rtol=1e-5)


def test_adaptive_weight_hits_the_ratio_on_all_pairs():
    x1, x0, cond = torch.randn(20, 3), torch.randn(20, 3), torch.rand(20, 2)
    m = MinibatchOTCoupling(cond_weight="adaptive", cond_ratio=0.25)
    m(x1, x0=x0, cond=cond)
    w = float(m.stats["cond_weight"])
    pen = cond_pair_cost(cond.double(), cond.double())
    c = _cost(x1, x0)
    share = w * pen.mean() / (c.mean() + w * pen.mean())
    assert abs(float(share) - 0.25) < 1e-4
    assert adaptive_cond_weight(c, torch.zeros_like(pen), 0.5) == 0.0


def test_oversample_keeps_the_best_b_of_kb():
    x1 = torch.randn(16, 3)
    gen = torch.Generator().manual_seed(1)
    m = MinibatchOTCoupling(oversample=4, generator=gen)
    x0, _, perm = m(x1, return_indices=True)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x0, noise[perm])
    c = _cost(x1, noise).numpy()
    r, col = scipy_opt.linear_sum_assignment(c)  # rectangular: the best 16 of 64 columns
    np.testing.assert_allclose(c[np.arange(16), perm.numpy()].sum(), c[r, col].sum(), rtol=1e-5)
    lab = torch.arange(16) % 2
    _, _, perm = m(x1, labels=lab, return_indices=True)
    assert torch.equal(lab.repeat_interleave(4)[perm], lab)  # row i*k+j carries item i's label


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"cond_weight": "adaptive", "cond_ratio": 1.0}, "cond_ratio"),
        ({"cond_weight": "adaptive", "cond_ratio": -0.2}, "cond_ratio"),
        ({"cond_metric": "l1"}, "cond_metric"),
        ({"oversample": 0}, "oversample"),
        ({"cond_weight": "auto"}, "cond_weight"),
        ({"scope": "grouped", "oversample": 2}, "grouped"),
    ],
)
def test_c2ot_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MinibatchOTCoupling(**kw)


def test_torchcfm_layer_for_knn_and_semidiscrete():
    from loom_kernels.compat.torchcfm import KNNConditionalFlowMatcher, SemidiscreteConditionalFlowMatcher

    x1 = torch.randn(6, 3)
    cand = torch.randn(24, 3)
    t, xt, ut = KNNConditionalFlowMatcher(4).sample_location_and_conditional_flow(cand, x1, t=torch.zeros(6))
    d = (x1[:, None] - cand.view(6, 4, 3)).square().sum(2)
    torch.testing.assert_close(xt, cand.view(6, 4, 3)[torch.arange(6), d.argmin(1)])  # t = 0: the chosen noise
    data = torch.randn(30, 3)
    fm = SemidiscreteConditionalFlowMatcher(data, seed=0)
    idx = fm.draw(5)
    t, xt, ut = fm.sample_location_and_conditional_flow(None, data[idx], t=torch.ones(5), indices=idx)
    torch.testing.assert_close(xt, data[idx])  # t = 1: the data
    fm.load_state_dict(fm.state_dict())
