"""loom_kernels.compat.torchcfm against TorchCFM's contract: POT's exact plans, TorchCFM's draws, its flow matchers.

Pins the behaviour of torchcfm's published tests (tests/test_optimal_transport.py and
tests/test_conditional_flow_matcher.py) and compares with the real torchcfm / POT where installed.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from loom_kernels.compat.torchcfm import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    LoomConditionalFlowMatcher,
    OTPlanSampler,
    pad_t_like_x,
    wasserstein,
)
from loom_kernels.couplings import LoomCoupling

from harness import noise_data_pair, per_class_ot, source_rows

SHAPES = [(128, (2, 2, 2)), (100, (2,)), (64, (3, 32, 32)), (1, (3,))]


def _pair(b, dims, seed):
    """(x0, x1): x0 standard normal, x1 uniform on [-0.5, 1.5) (a different law from the noise)."""
    return noise_data_pair(b, dims, seed, width=2.0)


def _sq(x0, x1):
    return (x0.flatten(1).double() - x1.flatten(1).double()).pow(2).sum(1)


# ---- the exact plan: POT's, on the tensors' device ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,dims", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_get_map_equals_pot_emd(b, dims, seed, dtype):
    ot = pytest.importorskip("ot")
    x0, x1 = (x.to(dtype) for x in _pair(b, dims, seed))
    M = torch.cdist(x0.reshape(b, -1), x1.reshape(b, -1)) ** 2
    pot_pi = ot.emd(ot.unif(b), ot.unif(b), M.numpy())
    pi = OTPlanSampler("exact").get_map(x0, x1)
    assert isinstance(pi, np.ndarray) and pi.dtype == np.float64
    assert np.array_equal(pi, pot_pi)


@pytest.mark.parametrize("b,dims", SHAPES[:3])
def test_get_map_and_sample_plan_equal_torchcfm(b, dims):
    tcfm = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = _pair(b, dims, 7)
    theirs, ours = tcfm.OTPlanSampler("exact"), OTPlanSampler("exact")
    assert np.array_equal(ours.get_map(x0, x1), theirs.get_map(x0, x1))
    for seed in (1980, 3):
        np.random.seed(seed)
        a0, a1 = theirs.sample_plan(x0, x1, replace=True)
        theirs_next = np.random.rand(3)
        np.random.seed(seed)
        c0, c1 = ours.sample_plan(x0, x1, replace=True)
        assert torch.equal(a0, c0) and torch.equal(a1, c1)
        assert np.array_equal(np.random.rand(3), theirs_next)  # the same use of numpy's RNG
    # replace=False: TorchCFM returns the pairs in a random order, we return them in x1's order
    np.random.seed(5)
    a0, a1 = theirs.sample_plan(x0, x1, replace=False)
    c0, c1 = ours.sample_plan(x0, x1, replace=False)
    assert torch.equal(c1, x1)
    order = source_rows(a1, x1)
    assert torch.equal(c0[order], a0)


def test_sample_map_without_replacement_recovers_the_plan():
    # torchcfm's test_sample_map: every element of a permutation plan is drawn exactly once
    b = 128
    permuted = np.random.default_rng(0).permutation(np.eye(b), axis=1)
    i, j = OTPlanSampler("exact").sample_map(permuted, batch_size=b, replace=False)
    rebuilt = np.zeros((b, b))
    rebuilt[i, j] = 1
    assert np.array_equal(rebuilt, permuted)


def test_sample_plan_is_get_map_then_sample_map():
    # torchcfm's test_sample_plan, with no peer package needed
    x0, x1 = _pair(128, (2, 2, 2), 1980)
    s = OTPlanSampler("exact")
    np.random.seed(1980)
    i, j = s.sample_map(s.get_map(x0, x1), batch_size=128, replace=True)
    np.random.seed(1980)
    a0, a1 = s.sample_plan(x0, x1, replace=True)
    assert torch.equal(a0, x0[i]) and torch.equal(a1, x1[j])


@pytest.mark.parametrize("b,dims", SHAPES)
def test_replace_false_is_the_exact_permutation_and_leaves_numpy_alone(b, dims):
    x0, x1 = _pair(b, dims, 3)
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    out0, out1 = OTPlanSampler("exact").sample_plan(x0, x1, replace=False)
    assert np.array_equal(np.random.get_state()[1], state)
    assert out1 is x1
    col = source_rows(out0, x0)
    assert sorted(col.tolist()) == list(range(b))  # a permutation: no duplicated or dropped noise
    best = per_class_ot(x1, x0)  # exact OT, no labels
    assert float(_sq(out0, x1).sum()) == pytest.approx(float(_sq(x0[best], x1).sum()), rel=1e-6)


def test_sample_plan_with_labels_matches_torchcfm():
    tcfm = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = _pair(64, (5,), 11)
    y0, y1 = torch.randint(3, (64,)), torch.randint(3, (64,))
    for seed in (0, 1):
        np.random.seed(seed)
        theirs = tcfm.OTPlanSampler("exact").sample_plan_with_labels(x0, x1, y0, y1)
        np.random.seed(seed)
        ours = OTPlanSampler("exact").sample_plan_with_labels(x0, x1, y0, y1)
        assert all(torch.equal(a, c) for a, c in zip(theirs, ours))
    np.random.seed(0)
    _, _, a, b = OTPlanSampler("exact").sample_plan_with_labels(x0, x1, None, None)
    assert a is None and b is None
    c0, c1, cy0, cy1 = OTPlanSampler("exact").sample_plan_with_labels(x0, x1, y0, y1, replace=False)
    col = source_rows(c0, x0)
    assert c1 is x1 and cy1 is y1 and torch.equal(cy0, y0[col])


def test_sample_trajectory_matches_torchcfm():
    tcfm = pytest.importorskip("torchcfm.optimal_transport")
    X = torch.randn(32, 4, 3)
    np.random.seed(2)
    theirs = tcfm.OTPlanSampler("exact").sample_trajectory(X)
    np.random.seed(2)
    ours = OTPlanSampler("exact").sample_trajectory(X)
    assert isinstance(ours, np.ndarray) and ours.shape == (32, 4, 3)
    assert np.array_equal(ours, theirs)


# ---- class-conditional plans ------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [1, 3, 10, 1000])
def test_labels_never_cross_classes_and_equal_per_class_ot(classes):
    b = 200
    x0, x1 = _pair(b, (4,), classes)
    y = torch.randint(classes, (b,), generator=torch.Generator().manual_seed(classes))
    out0, out1 = OTPlanSampler("exact").sample_plan(x0, x1, replace=False, labels=y)
    col = source_rows(out0, x0)
    assert out1 is x1 and sorted(col.tolist()) == list(range(b))
    assert torch.equal(y[col], y), "a noise crossed classes"  # noise k belongs to item k's class
    best = per_class_ot(x1, x0, y)
    for c in torch.unique(y).tolist():
        m = torch.nonzero(y == c).flatten()
        ref = float(_sq(x0[best][m], x1[m]).sum())
        assert float(_sq(out0[m], x1[m]).sum()) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_label_and_input_errors():
    x0, x1 = _pair(16, (2,), 0)
    s = OTPlanSampler("exact")
    y = torch.arange(16) % 3
    with pytest.raises(ValueError, match="labels need replace=False"):
        s.sample_plan(x0, x1, labels=y)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        s.sample_plan(x0, x1, replace=False, labels=y.float())
    with pytest.raises(ValueError, match=r"labels must have shape \(b,\) = \(16,\)"):
        s.sample_plan(x0, x1, replace=False, labels=y[:15])
    with pytest.raises(ValueError, match="labels must be on x1's device cpu, got meta"):
        s.sample_plan(x0, x1, replace=False, labels=y.to("meta"))
    with pytest.raises(ValueError, match="labels need method='exact' and batches of the same size"):
        s.sample_plan(x0[:8], x1, replace=False, labels=y)
    with pytest.raises(ValueError, match="Unknown method: nope"):
        OTPlanSampler("nope")
    bad = x1.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x0 or x1 contains NaN or inf"):
        s.sample_plan(x0, bad, replace=False)


def test_pot_methods_hand_off_to_pot():
    x0, x1 = _pair(32, (3,), 0)
    pytest.importorskip("ot")
    tcfm = pytest.importorskip("torchcfm.optimal_transport")
    for method in ("sinkhorn", "unbalanced", "partial"):
        ours, theirs = OTPlanSampler(method, reg=0.5), tcfm.OTPlanSampler(method, reg=0.5)
        assert np.array_equal(ours.get_map(x0, x1), theirs.get_map(x0, x1))  # host tensors: TorchCFM's own call
        for seed in (0, 1):
            np.random.seed(seed)
            a0, a1 = theirs.sample_plan(x0, x1)
            np.random.seed(seed)
            c0, c1 = ours.sample_plan(x0, x1)
            assert torch.equal(a0, c0) and torch.equal(a1, c1)
    # exact plans between batches of different sizes are POT's too
    assert np.array_equal(OTPlanSampler("exact").get_map(x0[:20], x1), tcfm.OTPlanSampler("exact").get_map(x0[:20], x1))


def test_without_pot_the_error_names_the_extra(monkeypatch):
    x0, x1 = _pair(32, (3,), 0)
    monkeypatch.setitem(sys.modules, "ot", None)  # POT missing
    with pytest.raises(ImportError, match=r"loom_kernels\[torchcfm\]"):
        OTPlanSampler("sinkhorn")
    with pytest.raises(ImportError, match=r"loom_kernels\[torchcfm\]"):
        wasserstein(x0, x1, "sinkhorn")
    with pytest.raises(ImportError, match=r"loom_kernels\[torchcfm\]"):
        OTPlanSampler("exact").get_map(x0[:20], x1)
    OTPlanSampler("exact").sample_plan(x0, x1)  # ours needs no POT
    assert wasserstein(x0, x1) > 0


def test_importable_without_torchcfm_or_pot():
    code = (
        "import sys; sys.modules['ot'] = None; sys.modules['torchcfm'] = None\n"
        "import torch\n"
        "from loom_kernels.compat.torchcfm import ExactOptimalTransportConditionalFlowMatcher as F\n"
        "t, xt, ut = F().sample_location_and_conditional_flow(torch.randn(8, 2), torch.rand(8, 2))\n"
        "print(tuple(xt.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(8, 2)"


# ---- wasserstein ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("b,dims", SHAPES[:3])
def test_wasserstein_equals_pot(power, b, dims):
    ot = pytest.importorskip("ot")
    x0, x1 = _pair(b, dims, 1980)
    M = torch.cdist(x0.reshape(b, -1), x1.reshape(b, -1))
    ref = ot.emd2(ot.unif(b), ot.unif(b), (M**power).numpy(), numItermax=int(1e7))
    ref = np.sqrt(ref) if power == 2 else ref
    assert wasserstein(x0, x1, "exact", power=power) == pytest.approx(ref, rel=1e-12)
    assert wasserstein(x0, x1, power=power) == pytest.approx(ref, rel=1e-12)


def test_wasserstein_sinkhorn_and_errors():
    x0, x1 = _pair(64, (2,), 0)
    with pytest.raises(ValueError, match="Unknown method: noname"):
        wasserstein(x0, x1, "noname")
    with pytest.raises(ValueError, match="power must be 1 or 2"):
        wasserstein(x0, x1, power=3)
    tcfm = pytest.importorskip("torchcfm.optimal_transport")
    assert wasserstein(x0, x1, "sinkhorn", reg=0.5, power=1) == tcfm.wasserstein(x0, x1, "sinkhorn", reg=0.5, power=1)
    assert wasserstein(x0[:50], x1) == pytest.approx(tcfm.wasserstein(x0[:50], x1), rel=1e-12)


# ---- flow matchers ---------------------------------------------------------------------------------------


def _manual_cfm(x0, x1, sigma, seed):
    torch.manual_seed(seed)
    t = torch.rand(x0.shape[0])
    tp = t.reshape(-1, *([1] * (x0.dim() - 1)))
    eps = torch.randn_like(x0)
    return t, tp * x1 + (1 - tp) * x0 + sigma * eps, x1 - x0, eps


def test_cfm_matches_its_formula_and_torchcfm():
    x0, x1 = _pair(128, (2, 2), 0)
    torch.manual_seed(1994)
    out = ConditionalFlowMatcher(sigma=0.5).sample_location_and_conditional_flow(x0, x1, return_noise=True)
    for a, c in zip(out, _manual_cfm(x0, x1, 0.5, 1994)):
        assert torch.equal(a, c)
    assert torch.equal(pad_t_like_x(torch.arange(4.0), torch.zeros(4, 2, 3)), torch.arange(4.0).reshape(4, 1, 1))
    assert pad_t_like_x(0.5, x0) == 0.5
    tcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    torch.manual_seed(1994)
    theirs = tcfm.ConditionalFlowMatcher(sigma=0.5).sample_location_and_conditional_flow(x0, x1, return_noise=True)
    assert all(torch.equal(a, c) for a, c in zip(out, theirs))
    t = torch.rand(7)
    assert ConditionalFlowMatcher(0.5).compute_lambda(t) == tcfm.ConditionalFlowMatcher(0.5).compute_lambda(t)


def test_ot_cfm_is_the_plan_sampler_then_cfm_and_matches_torchcfm():
    # torchcfm's test_OT_CFM_class, then the real one under the same seeds
    x0, x1 = _pair(128, (2, 2), 1)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.5)
    torch.manual_seed(1994)
    np.random.seed(1994)
    out = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    torch.manual_seed(1994)
    np.random.seed(1994)
    p0, p1 = OTPlanSampler("exact").sample_plan(x0, x1)
    for a, c in zip(out, _manual_cfm(p0, p1, 0.5, 1994)):
        assert torch.equal(a, c)
    tcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    pytest.importorskip("ot")
    y0, y1 = torch.randint(4, (128,)), torch.randint(4, (128,))
    for call in ("sample_location_and_conditional_flow", "guided_sample_location_and_conditional_flow"):
        args = (x0, x1) if call.startswith("sample") else (x0, x1, y0, y1)
        res = []
        for F in (ExactOptimalTransportConditionalFlowMatcher, tcfm.ExactOptimalTransportConditionalFlowMatcher):
            torch.manual_seed(7)
            np.random.seed(7)
            res.append(getattr(F(sigma=0.1), call)(*args, return_noise=True))
        assert len(res[0]) == len(res[1]) and all(torch.equal(a, c) for a, c in zip(*res))


def test_loom_flow_matcher_is_the_loom_coupling_then_cfm():
    p, shape = 64, (3,)
    data = torch.randn(p, *shape)
    fm = LoomConditionalFlowMatcher(p, shape, sigma=0.1, num_caches=2, seed=5)
    ref = LoomCoupling(p, shape, num_caches=2, seed=5)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        idx = torch.randperm(p, generator=g)[:16]
        given = None if step % 2 else torch.randn(16, 3)  # a given x0 is shape-checked, not used
        torch.manual_seed(step)
        out = fm.sample_location_and_conditional_flow(given, data[idx], indices=idx, return_noise=True)
        x0, _ = ref(data[idx], idx)
        for a, c in zip(out, _manual_cfm(x0, data[idx], 0.1, step)):
            assert torch.equal(a, c)
    assert torch.equal(fm.coupling.seeds, ref.seeds)
    # guided: labels y1 keep each class's seeds; y0 and y1 come back unchanged
    y = torch.arange(p) % 4
    owned = {c: sorted(fm.coupling.seeds[y == c].flatten().tolist()) for c in range(4)}
    for _ in range(5):
        idx = torch.randperm(p, generator=g)[:32]
        t, xt, ut, y0, y1 = fm.guided_sample_location_and_conditional_flow(None, data[idx], None, y[idx], indices=idx)
        assert y0 is None and torch.equal(y1, y[idx])
    assert {c: sorted(fm.coupling.seeds[y == c].flatten().tolist()) for c in range(4)} == owned
    state = fm.state_dict()
    other = LoomConditionalFlowMatcher(p, shape, num_caches=2, seed=5)
    other.load_state_dict(state)
    assert torch.equal(other.coupling.seeds, fm.coupling.seeds)
    with pytest.raises(ValueError, match=r"x0 must be None or shaped like x1 \(4, 3\)"):
        fm.sample_location_and_conditional_flow(torch.randn(4, 2), data[:4], indices=torch.arange(4))
    with pytest.raises(ValueError, match="needs the dataset indices"):
        fm.sample_location_and_conditional_flow(None, data[:4])


@pytest.mark.cuda
def test_exact_plan_on_cuda_stays_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x0, x1 = _pair(256, (3, 8, 8), 0)
    c0, c1 = OTPlanSampler("exact").sample_plan(x0, x1, replace=False)
    g0, g1 = OTPlanSampler("exact").sample_plan(x0.cuda(), x1.cuda(), replace=False)
    assert g0.is_cuda and g1.is_cuda
    assert float(_sq(g0.cpu(), x1).sum()) == pytest.approx(float(_sq(c0, x1).sum()), rel=1e-5)
    y = (torch.arange(256) % 10).cuda()
    l0, _ = OTPlanSampler("exact").sample_plan(x0.cuda(), x1.cuda(), replace=False, labels=y)
    assert torch.equal(y.cpu()[source_rows(l0.cpu(), x0)], y.cpu())


@pytest.mark.parametrize("method", ["sinkhorn", "unbalanced", "partial"])
@pytest.mark.parametrize("reg", [0.0, -0.05, float("nan"), float("inf")])
def test_entropic_reg_must_be_positive_and_finite(method, reg):
    # TorchCFM hands reg to POT unchecked: reg < 0 gives a plan costlier than independent pairs, reg = 0
    # the independent plan. Refused at construction, with the reason (#34 item 10).
    pytest.importorskip("ot")
    with pytest.raises(ValueError, match=rf"reg must be a positive finite number for method='{method}'.*unchecked"):
        OTPlanSampler(method=method, reg=reg)
    with pytest.raises(ValueError, match="reg must be a positive finite number"):
        wasserstein(torch.randn(8, 2), torch.randn(8, 2), method="sinkhorn", reg=reg)
