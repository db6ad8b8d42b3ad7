"""Every TorchCFM flow matcher in loom_kernels.compat.torchcfm against the real torchcfm (seeded, bit-identical).

Also: the package's import paths (torchcfm's module names), ``sample_plan_with_scipy``, POT's entropic
plans on the torch backend, the device draw, and the label checks of issue #23 item 10.
"""

import math
import os

import numpy as np
import pytest
import torch

import loom_kernels.compat.torchcfm as compat
from loom_kernels.compat.torchcfm import _plans
from loom_kernels.compat.torchcfm.conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
)
from loom_kernels.compat.torchcfm.optimal_transport import OTPlanSampler

from harness import noise_data_pair

MATCHERS = {
    "ConditionalFlowMatcher": {"sigma": 0.1},
    "ExactOptimalTransportConditionalFlowMatcher": {"sigma": 0.0},
    "TargetConditionalFlowMatcher": {"sigma": 0.05},
    "VariancePreservingConditionalFlowMatcher": {"sigma": 0.2},
    "SchrodingerBridgeConditionalFlowMatcher": {"sigma": 0.5},
    "SchrodingerBridgeConditionalFlowMatcher-sinkhorn": {"sigma": 1.5, "ot_method": "sinkhorn"},
}


def _tcfm():
    pytest.importorskip("ot")
    return pytest.importorskip("torchcfm.conditional_flow_matching")


def _make(mod, key):
    return getattr(mod, key.split("-")[0])(**MATCHERS[key])


def _run(fm, method, x0, x1, seed, **kw):
    torch.manual_seed(seed)
    np.random.seed(seed)
    out = getattr(fm, method)(x0, x1, **kw)
    return out, (torch.rand(2), np.random.rand(2))  # the RNG states after the call, as numbers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [(2,), (3, 4, 5)])
@pytest.mark.parametrize("key", list(MATCHERS))
def test_matcher_bit_identical_to_torchcfm(key, dims, dtype):
    tcfm = _tcfm()
    ours, theirs = _make(compat, key), _make(tcfm, key)
    x0, x1 = noise_data_pair(64, dims, 3, dtype)
    for seed, t in ((0, None), (1, torch.rand(64, dtype=dtype))):
        for return_noise in (False, True):
            a, ra = _run(theirs, "sample_location_and_conditional_flow", x0, x1, seed, t=t, return_noise=return_noise)
            c, rc = _run(ours, "sample_location_and_conditional_flow", x0, x1, seed, t=t, return_noise=return_noise)
            assert len(a) == len(c)
            for u, v in zip(a, c):
                assert u.dtype == v.dtype and torch.equal(u, v)
            assert torch.equal(ra[0], rc[0]) and np.array_equal(ra[1], rc[1])  # the same RNG use
    t = torch.rand(64, dtype=dtype)
    assert torch.equal(torch.as_tensor(ours.compute_sigma_t(t)), torch.as_tensor(theirs.compute_sigma_t(t)))
    assert torch.equal(torch.as_tensor(ours.compute_lambda(t)), torch.as_tensor(theirs.compute_lambda(t)))
    xt = torch.randn_like(x0)
    for name in ("compute_mu_t",):
        assert torch.equal(getattr(ours, name)(x0, x1, t), getattr(theirs, name)(x0, x1, t))
    assert torch.equal(ours.compute_conditional_flow(x0, x1, t, xt), theirs.compute_conditional_flow(x0, x1, t, xt))
    eps = torch.randn_like(x0)
    assert torch.equal(ours.sample_xt(x0, x1, t, eps), theirs.sample_xt(x0, x1, t, eps))


def _closed_forms(name, sigma, x0, x1, t):
    """``(mu_t, sigma_t, u_t(eps))`` of each path, written from the papers (float64, ``t`` padded)."""
    pi2 = math.pi / 2
    if name in ("ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher"):
        return t * x1 + (1 - t) * x0, sigma + 0 * t, lambda eps: x1 - x0
    if name == "TargetConditionalFlowMatcher":  # Lipman et al.
        return t * x1, 1 - (1 - sigma) * t, lambda eps: x1 - (1 - sigma) * eps
    if name == "VariancePreservingConditionalFlowMatcher":  # Albergo et al.
        mu = torch.cos(pi2 * t) * x0 + torch.sin(pi2 * t) * x1
        return mu, sigma + 0 * t, lambda eps: pi2 * (torch.cos(pi2 * t) * x1 - torch.sin(pi2 * t) * x0)
    assert name == "SchrodingerBridgeConditionalFlowMatcher"  # Tong et al.: sigma_t' = sigma (1-2t) / (2 sqrt(t(1-t)))
    st = sigma * torch.sqrt(t * (1 - t))
    return t * x1 + (1 - t) * x0, st, lambda eps: sigma * (1 - 2 * t) / (2 * torch.sqrt(t * (1 - t))) * eps + x1 - x0


@pytest.mark.parametrize("key", [k for k in MATCHERS if "sinkhorn" not in k])
def test_matcher_paths_equal_their_closed_forms(key):
    """Without torchcfm: every matcher's ``mu_t``, ``sigma_t`` and ``u_t`` against the formulas, and ``u_t``
    against the time derivative of ``x_t = mu_t + sigma_t eps`` (central differences, float64)."""
    name, sigma = key.split("-")[0], MATCHERS[key]["sigma"] or 0.3  # a zero sigma would hide sigma_t
    fm = getattr(compat, name)(sigma=sigma)
    g = torch.Generator().manual_seed(3)
    x0, x1, eps = (torch.randn(32, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.8 + 0.1
    tp = t.view(-1, 1, 1)
    mu, st, ut = _closed_forms(name, sigma, x0, x1, tp)
    torch.testing.assert_close(fm.compute_mu_t(x0, x1, t), mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.as_tensor(fm.compute_sigma_t(t), dtype=torch.float64).view(-1, 1, 1).expand_as(st),
        st,
        rtol=1e-12,
        atol=1e-12,
    )
    xt = fm.sample_xt(x0, x1, t, eps)
    torch.testing.assert_close(xt, mu + st * eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fm.compute_conditional_flow(x0, x1, t, xt), ut(eps), rtol=1e-6, atol=1e-6)
    h = 1e-6
    deriv = (fm.sample_xt(x0, x1, t + h, eps) - fm.sample_xt(x0, x1, t - h, eps)) / (2 * h)
    torch.testing.assert_close(fm.compute_conditional_flow(x0, x1, t, xt), deriv, rtol=1e-5, atol=1e-5)
    if "Exact" not in name and "Schrodinger" not in name:  # the whole draw (the OT matchers re-pair first)
        torch.manual_seed(0)
        tt, xs, us, noise = fm.sample_location_and_conditional_flow(x0, x1, t=t, return_noise=True)
        mu, st, ut = _closed_forms(name, sigma, x0, x1, tp)
        torch.testing.assert_close(xs, mu + st * noise, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(us, ut(noise), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("key", [k for k in MATCHERS if "Exact" in k or "Schrodinger" in k])
def test_guided_matches_torchcfm(key):
    tcfm = _tcfm()
    ours, theirs = _make(compat, key), _make(tcfm, key)
    x0, x1 = noise_data_pair(48, (3,), 5)
    y0, y1 = torch.randint(10, (48, 1)), torch.randint(10, (48,))
    for return_noise in (False, True):
        a, _ = _run(
            theirs, "guided_sample_location_and_conditional_flow", x0, x1, 2, y0=y0, y1=y1, return_noise=return_noise
        )
        c, _ = _run(
            ours, "guided_sample_location_and_conditional_flow", x0, x1, 2, y0=y0, y1=y1, return_noise=return_noise
        )
        assert len(a) == len(c) == 5 + return_noise
        assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_schrodinger_bridge_constructor_contract():
    with pytest.raises(ValueError, match="Sigma must be strictly positive, got 0"):
        SchrodingerBridgeConditionalFlowMatcher(sigma=0)
    with pytest.raises(ValueError, match="strictly positive"):
        SchrodingerBridgeConditionalFlowMatcher(sigma=-1.0)
    with pytest.warns(UserWarning, match="Small sigma"):
        SchrodingerBridgeConditionalFlowMatcher(sigma=5e-4)
    fm = SchrodingerBridgeConditionalFlowMatcher(sigma=0.7, ot_method="sinkhorn")
    assert fm.ot_method == "sinkhorn" and fm.ot_sampler.method == "sinkhorn"
    assert fm.ot_sampler.reg == 2 * 0.7**2
    assert SchrodingerBridgeConditionalFlowMatcher().sigma == 1.0
    assert SchrodingerBridgeConditionalFlowMatcher().ot_sampler.method == "exact"


def test_subclass_mu_is_not_modified_in_place():
    """sample_xt adds into mu_t only for our own compute_mu_t: a subclass may return a shared tensor."""
    shared = torch.ones(4, 2)

    class Fixed(ConditionalFlowMatcher):
        def compute_mu_t(self, x0, x1, t):
            return shared

    xt = Fixed(sigma=1.0).sample_xt(torch.zeros(4, 2), torch.zeros(4, 2), torch.rand(4), torch.ones(4, 2))
    assert torch.equal(shared, torch.ones(4, 2)) and torch.equal(xt, torch.full((4, 2), 2.0))


def test_autograd_through_the_matchers():
    for cls in (
        ConditionalFlowMatcher,
        TargetConditionalFlowMatcher,
        VariancePreservingConditionalFlowMatcher,
        SchrodingerBridgeConditionalFlowMatcher,
    ):
        x0, x1 = (torch.randn(8, 3, requires_grad=True) for _ in range(2))
        t = torch.rand(8, requires_grad=True)
        _, xt, ut = cls(sigma=0.3).sample_location_and_conditional_flow(x0, x1, t=t.clamp(0.01, 0.99))
        (xt.sum() + ut.sum()).backward()
        assert x1.grad is not None and t.grad is not None
        assert (x0.grad is None) == (cls is TargetConditionalFlowMatcher)  # Lipman's path does not use x0


def test_import_paths_are_torchcfms():
    import loom_kernels.compat.torchcfm.conditional_flow_matching as cfm
    import loom_kernels.compat.torchcfm.optimal_transport as ot_mod
    import loom_kernels.compat.torchcfm.utils as utils

    for name in (
        "ConditionalFlowMatcher",
        "ExactOptimalTransportConditionalFlowMatcher",
        "TargetConditionalFlowMatcher",
        "SchrodingerBridgeConditionalFlowMatcher",
        "VariancePreservingConditionalFlowMatcher",
        "pad_t_like_x",
    ):
        assert getattr(compat, name) is getattr(cfm, name)
    assert compat.OTPlanSampler is ot_mod.OTPlanSampler and compat.wasserstein is ot_mod.wasserstein
    assert compat.torch_wrapper is utils.torch_wrapper


def test_torch_wrapper_matches_torchcfm():
    try:
        import torchcfm.utils as tutils  # imports torchdyn and matplotlib
    except ImportError as exc:
        if os.environ.get("LOOM_REQUIRE_TORCHDYN") == "1":  # .ci/run's torchdyn step: a skip would hide it
            pytest.fail(f"LOOM_REQUIRE_TORCHDYN=1 but torchcfm.utils is not importable: {exc}")
        pytest.skip(f"torchcfm.utils is not importable: {exc}")
    net = torch.nn.Linear(3, 2)
    x, t = torch.randn(5, 2), torch.tensor(0.3)
    assert torch.equal(compat.torch_wrapper(net)(t, x), tutils.torch_wrapper(net)(t, x))


# ---- sample_plan_with_scipy -------------------------------------------------------------------------------


@pytest.mark.parametrize("b0,b1,dims", [(64, 64, (2,)), (32, 32, (3, 4, 4)), (20, 30, (5,)), (1, 1, (3,))])
def test_sample_plan_with_scipy_equals_torchcfms_formula(b0, b1, dims):
    from scipy.optimize import linear_sum_assignment

    x0, x1 = noise_data_pair(max(b0, b1), dims, 9)
    x0, x1 = x0[:b0], x1[:b1]
    f0, f1 = x0.reshape(b0, -1), x1.reshape(b1, -1)
    _, j = linear_sum_assignment((torch.cdist(f0, f1) ** 2).numpy())  # TorchCFM's code, verbatim
    a0, a1 = OTPlanSampler("exact").sample_plan_with_scipy(x0, x1)
    assert torch.equal(a0, f0) and torch.equal(a1, f1[j])


# ---- POT's entropic plans stay on the device --------------------------------------------------------------


# partial: POT's partial solver takes ~10 s idle here; in the slow run (CI step 6)
@pytest.mark.parametrize("method", ["sinkhorn", "unbalanced", pytest.param("partial", marks=pytest.mark.slow)])
def test_entropic_plan_on_torch_backend_equals_pot(method, monkeypatch):
    """The path off the host (run here on CPU tensors): POT gets torch tensors, no numpy copy."""
    ot = pytest.importorskip("ot")
    x0, x1 = noise_data_pair(40, (3,), 1)
    seen = []
    real = ot.sinkhorn

    def spy(a, b, M, **kw):
        seen.append((type(a), type(b), type(M)))
        return real(a, b, M, **kw)

    monkeypatch.setattr(ot, "sinkhorn", spy)
    p = _plans.entropic_plan_torch(method, x0, x1, reg=0.5, reg_m=1.0, normalize_cost=False)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float64 and p.device == x0.device
    if method == "sinkhorn":
        assert seen == [(torch.Tensor, torch.Tensor, torch.Tensor)]
    M = (torch.cdist(x0, x1) ** 2).double().numpy()
    ref = {
        "sinkhorn": lambda: real(ot.unif(40), ot.unif(40), M, reg=0.5),
        "unbalanced": lambda: ot.unbalanced.sinkhorn_knopp_unbalanced(ot.unif(40), ot.unif(40), M, reg=0.5, reg_m=1.0),
        "partial": lambda: ot.partial.entropic_partial_wasserstein(ot.unif(40), ot.unif(40), M, reg=0.5),
    }[method]()
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-9, atol=1e-15)
    # and TorchCFM's host call (float32 cost) agrees to rounding, so seeded draws match
    host = _plans.entropic_plan(method, x0, x1, reg=0.5, reg_m=1.0, normalize_cost=False)
    assert isinstance(host, np.ndarray)
    np.testing.assert_allclose(p.numpy(), host, rtol=1e-5, atol=1e-12)


def test_device_plans_draw_like_torchcfm():
    """The off-host path (torch-backend plan, drawn with numpy's uniforms) gives TorchCFM's seeded pairs."""
    tcfm_ot = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = noise_data_pair(32, (3,), 4)
    theirs = tcfm_ot.OTPlanSampler("sinkhorn", reg=0.5)
    for seed in (0, 1, 2):
        np.random.seed(seed)
        a0, a1 = theirs.sample_plan(x0, x1)
        after = np.random.rand(2)
        np.random.seed(seed)
        pi = _plans.entropic_plan_torch("sinkhorn", x0, x1, reg=0.5, reg_m=1.0, normalize_cost=False)
        i, j = _plans.draw_on_device(pi, 32)
        assert torch.equal(a0, x0[i]) and torch.equal(a1, x1[j])
        assert np.array_equal(np.random.rand(2), after)


@pytest.mark.parametrize("seed", range(5))
def test_device_draw_equals_numpys_choice(seed):
    """The draw used off the host gives np.random.choice's pairs and leaves numpy's RNG where it leaves it."""
    rng = np.random.default_rng(seed)
    pi = rng.random((37, 23)) ** 4
    pi[rng.random(pi.shape) < 0.3] = 0.0
    np.random.seed(seed)
    i, j = OTPlanSampler("exact").sample_map(pi, 37, replace=True)
    after = np.random.rand(2)
    np.random.seed(seed)
    di, dj = _plans.draw_on_device(torch.from_numpy(pi), 37)
    assert np.array_equal(di.numpy(), i) and np.array_equal(dj.numpy(), j)
    assert np.array_equal(np.random.rand(2), after)


# ---- issue #23 item 10: labels must line up; an empty batch is not an error ----------------------------------


def test_label_lengths_are_checked():
    x0, x1 = noise_data_pair(16, (2,), 0)
    s = OTPlanSampler("exact")
    y = torch.arange(16)
    with pytest.raises(ValueError, match=r"y0 must have one label per row of x0: length 16, got shape \(17,\)"):
        s.sample_plan_with_labels(x0, x1, torch.arange(17), y)
    with pytest.raises(ValueError, match=r"y1 must have one label per row of x1: length 16, got shape \(15,\)"):
        s.sample_plan_with_labels(x0, x1, y, torch.arange(15))
    with pytest.raises(ValueError, match="y1 must have one label per row of x1"):
        s.sample_plan_with_labels(x0, x1, y, torch.arange(17), replace=False)
    fm = ExactOptimalTransportConditionalFlowMatcher()
    with pytest.raises(ValueError, match="y0 must have one label per row of x0"):
        fm.guided_sample_location_and_conditional_flow(x0, x1, y0=torch.arange(17), y1=y)
    with pytest.raises(ValueError, match="y0 must have one label per row of x0"):
        SchrodingerBridgeConditionalFlowMatcher().guided_sample_location_and_conditional_flow(
            x0, x1, y0=torch.arange(15), y1=y
        )
    s.sample_plan_with_labels(x0, x1, y[:, None], y)  # (b, 1) labels, as TorchCFM's tests use, are fine


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_empty_batch_draws_nothing(method):
    pytest.importorskip("ot")
    s = OTPlanSampler(method)
    x0, x1 = torch.zeros(0, 3), torch.zeros(0, 3)
    y = torch.zeros(0, dtype=torch.long)
    state = np.random.get_state()[1].copy()
    for replace in (True, False):
        a0, a1 = s.sample_plan(x0, x1, replace=replace)
        assert a0.shape == (0, 3) and a1.shape == (0, 3)
        out = s.sample_plan_with_labels(x0, x1, y, y, replace=replace)
        assert [tuple(o.shape) for o in out] == [(0, 3), (0, 3), (0,), (0,)]
    assert np.array_equal(np.random.get_state()[1], state)
    t, xt, ut, y0, y1 = ExactOptimalTransportConditionalFlowMatcher().guided_sample_location_and_conditional_flow(
        x0, x1, y0=y, y1=y
    )
    assert xt.shape == (0, 3) and y0.shape == (0,)
    with pytest.raises(ValueError, match="x1 is empty: cannot draw 4 pairs"):
        s.sample_plan(torch.zeros(4, 3), x1)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["sinkhorn", "unbalanced", "partial"])
def test_entropic_plans_stay_on_the_gpu_and_draw_like_torchcfm(method):
    tcfm_ot = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = noise_data_pair(64, (3, 4), 6)
    ours = OTPlanSampler(method, reg=0.5)
    pi = ours._plan(x0.cuda(), x1.cuda())
    assert isinstance(pi, torch.Tensor) and pi.is_cuda
    np.testing.assert_allclose(
        pi.cpu().numpy(), tcfm_ot.OTPlanSampler(method, reg=0.5).get_map(x0, x1), rtol=1e-5, atol=1e-12
    )
    np.random.seed(3)
    a0, a1 = tcfm_ot.OTPlanSampler(method, reg=0.5).sample_plan(x0, x1)
    np.random.seed(3)
    c0, c1 = ours.sample_plan(x0.cuda(), x1.cuda())
    assert c0.is_cuda and torch.equal(c0.cpu(), a0) and torch.equal(c1.cpu(), a1)
