"""``cond=`` on the TorchCFM compatibility layer: the exact plan sampler and the OT matchers (issue 21 item 6).

The reference is scipy's ``linear_sum_assignment`` on a float64 numpy cost ``|x1_k - x0_j|^2 + w ||c_k -
c_j||^2``, compared by total cost; the matchers' outputs are checked against the sampler's permutation.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from loom_kernels.compat.torchcfm.conditional_flow_matching import (
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
)
from loom_kernels.compat.torchcfm.loom import LoomConditionalFlowMatcher
from loom_kernels.compat.torchcfm.optimal_transport import OTPlanSampler
from loom_kernels.couplings import LoomCoupling

from harness import source_rows


def _ref(x1, x0, cond, w):
    a, b = x1.flatten(1).double().numpy(), x0.flatten(1).double().numpy()
    c = cond.double().reshape(len(cond), -1).numpy()
    return ((a[:, None] - b[None]) ** 2).sum(-1) + w * ((c[:, None] - c[None]) ** 2).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dc", [1, 8])
@pytest.mark.parametrize("w", [0.3, 4.0])
def test_sample_plan_cond_is_the_exact_penalised_permutation(dtype, dc, w):
    g = torch.Generator().manual_seed(dc)
    x0, x1 = torch.randn(40, 2, 3, generator=g, dtype=dtype), torch.randn(40, 2, 3, generator=g, dtype=dtype)
    cond = torch.randn(40, dc, generator=g) * 2
    out0, out1 = OTPlanSampler("exact", cond_weight=w).sample_plan(x0, x1, replace=False, cond=cond)
    assert out1 is x1
    perm = source_rows(out0, x0).numpy()
    cost = _ref(x1, x0, cond, w)
    r, c = linear_sum_assignment(cost)
    assert cost[np.arange(40), perm].sum() <= cost[r, c].sum() * (1 + 1e-6)
    plain = OTPlanSampler("exact").sample_plan(x0, x1, replace=False)[0]
    assert not torch.equal(out0, plain)  # the condition changed the plan


def test_sample_plan_cond_weight_zero_and_huge():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g)
    y = torch.randint(3, (30,), generator=g)
    values = torch.tensor([[0.5], [-1.25], [2.0]])
    plain = OTPlanSampler("exact").sample_plan(x0, x1, replace=False)[0]
    assert torch.equal(
        OTPlanSampler("exact", cond_weight=0.0).sample_plan(x0, x1, replace=False, cond=values[y])[0], plain
    )
    by_label = OTPlanSampler("exact").sample_plan(x0, x1, replace=False, labels=y)[0]
    huge = OTPlanSampler("exact", cond_weight=1e8).sample_plan(x0, x1, replace=False, cond=values[y])[0]
    assert torch.equal(huge, by_label) and not torch.equal(by_label, plain)


def test_sample_plan_cond_refusals():
    x0, x1 = torch.randn(6, 2), torch.randn(6, 2)
    with pytest.raises(ValueError, match="cond need replace=False"):
        OTPlanSampler("exact").sample_plan(x0, x1, cond=torch.randn(6))
    with pytest.raises(ValueError, match="cond need method='exact' and batches of the same size"):
        OTPlanSampler("exact").sample_plan(torch.randn(5, 2), x1, replace=False, cond=torch.randn(6))
    with pytest.raises(TypeError, match="cond must have a floating dtype"):
        OTPlanSampler("exact").sample_plan(x0, x1, replace=False, cond=torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="cond contains NaN or inf"):
        OTPlanSampler("exact").sample_plan(x0, x1, replace=False, cond=torch.full((6,), float("nan")))
    with pytest.raises(ValueError, match=r"cond must have shape \(b, Dc\) or \(b,\) with b = 6"):
        OTPlanSampler("exact").sample_plan(x0, x1, replace=False, cond=torch.randn(5))
    with pytest.raises(ValueError, match="cond_weight must be a finite float >= 0"):
        OTPlanSampler("exact", cond_weight=-0.5)
    with pytest.raises(ValueError, match="cond_weight must be a finite float >= 0"):
        ExactOptimalTransportConditionalFlowMatcher(cond_weight=float("nan"))


@pytest.mark.parametrize("matcher", ["exact", "sb"])
def test_matchers_pair_with_the_penalised_permutation(matcher):
    g = torch.Generator().manual_seed(3)
    x0, x1, cond = torch.randn(24, 5, generator=g), torch.randn(24, 5, generator=g), torch.randn(24, 2, generator=g)
    if matcher == "exact":
        fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0, cond_weight=3.0)
    else:
        fm = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5, cond_weight=3.0)
    x0p, _ = OTPlanSampler("exact", cond_weight=3.0).sample_plan(x0, x1, replace=False, cond=cond)
    t = torch.rand(24, generator=g)
    _, xt, ut, eps = fm.sample_location_and_conditional_flow(x0, x1, t=t, return_noise=True, cond=cond)
    sigma_t = fm.compute_sigma_t(t)[:, None] if matcher == "sb" else 0.0
    np.testing.assert_allclose(
        (xt - sigma_t * eps).numpy(), (t[:, None] * x1 + (1 - t[:, None]) * x0p).numpy(), rtol=1e-5, atol=1e-5
    )
    if matcher == "exact":
        np.testing.assert_allclose(ut.numpy(), (x1 - x0p).numpy(), rtol=1e-6, atol=1e-6)
    y0, y1 = torch.arange(24), torch.arange(24) + 100
    out = fm.guided_sample_location_and_conditional_flow(x0, x1, y0, y1, t=t, cond=cond)
    assert torch.equal(out[4], y1) and torch.equal(x0[out[3]], x0p)  # y0 follows x0, y1 keeps x1's order
    with pytest.raises(ValueError, match="cond need method='exact'"):
        SchrodingerBridgeConditionalFlowMatcher(sigma=0.5, ot_method="sinkhorn").sample_location_and_conditional_flow(
            x0, x1, cond=cond
        )


def test_loom_matcher_passes_cond_to_its_coupling():
    g = torch.Generator().manual_seed(4)
    data, cond = torch.randn(20, 3, generator=g), torch.randn(20, 2, generator=g)
    idx = torch.arange(10)
    fm = LoomConditionalFlowMatcher(20, (3,), sigma=0.0, cond_weight=2.0, seed=1)
    ref = LoomCoupling(20, (3,), cond_weight=2.0, seed=1)
    x0 = ref(data[idx], idx, cond=cond[idx])[0]
    t = torch.rand(10, generator=g)
    _, _, ut = fm.sample_location_and_conditional_flow(None, data[idx], t=t, indices=idx, cond=cond[idx])
    np.testing.assert_allclose(ut.numpy(), (data[idx] - x0).numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(fm.coupling.seeds, ref.seeds)
