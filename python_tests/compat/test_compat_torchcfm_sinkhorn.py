"""The native Sinkhorn behind ``OTPlanSampler("sinkhorn")`` and SB-CFM off the host (issue 25 item 4).

Run here on CPU tensors with the native path forced (``native=True``): the plan equals POT's
``ot.sinkhorn`` to its tolerance, and TorchCFM's seeded draws (numpy's uniforms, plan-based sampling
with replacement) come out the same. Host tensors keep POT's bit-identical call (the matcher tests).
"""

import warnings
from functools import partial

import numpy as np
import pytest
import torch

from loom_kernels.compat.torchcfm import _plans
from loom_kernels.compat.torchcfm.conditional_flow_matching import SchrodingerBridgeConditionalFlowMatcher

ot = pytest.importorskip("ot")


def _quiet():
    """Both solvers may stop at 1000 iterations here (and both warn: tested below)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return _Exit(ctx)


class _Exit:
    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _batch(b0, b1, dims, seed, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b0, *dims), generator=g), torch.randn((b1, *dims), generator=g) + shift


# reg = 0.5: POT's own converged reference takes ~10-50 s on 2 loaded cores: in the slow run (CI step 6)
@pytest.mark.parametrize(
    "reg,normalize", [pytest.param(0.5, False, marks=pytest.mark.slow), (0.1, True), (2.0, False), (0.05, True)]
)
@pytest.mark.parametrize("b0,b1,dims", [(64, 64, (3,)), (40, 72, (2, 3)), (1, 9, (2,))])
def test_native_plan_equals_pot(reg, normalize, b0, b1, dims):
    x0, x1 = _batch(b0, b1, dims, 7)
    with _quiet():
        p = _plans.entropic_plan("sinkhorn", x0, x1, reg, 1.0, normalize, native=True)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float64 and p.shape == (b0, b1)
    M = torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()) ** 2
    if normalize:
        M = M / M.max()
    with _quiet():
        ref = ot.sinkhorn(ot.unif(b0), ot.unif(b1), M.numpy(), reg)  # TorchCFM's call: POT's defaults
        conv = ot.sinkhorn(ot.unif(b0), ot.unif(b1), M.numpy(), reg, numItermax=200000, stopThr=1e-13)
    # POT's tolerance: where its 1000 iterations stop short, how far its own plan is from the converged one
    tol = max(1e-6, 3 * float(np.abs(ref - conv).max() / ref.max()))
    np.testing.assert_allclose(p.numpy(), ref, rtol=0, atol=tol * ref.max())
    np.testing.assert_allclose(p.sum(0).numpy(), np.full(b1, 1 / b1), rtol=1e-9)  # columns: the last update


@pytest.mark.slow  # issue 36 item 6: out of the default run (3-minute budget), still in CI step 6
def test_both_solvers_warn_where_they_stop_short():
    x0, x1 = _batch(64, 64, (3,), 7)
    M = (torch.cdist(x0.double(), x1.double()) ** 2).numpy()
    with pytest.warns(UserWarning, match="did not converge"):
        ot.sinkhorn(ot.unif(64), ot.unif(64), M, 0.3)
    with pytest.warns(RuntimeWarning, match=r"stopped at max_iter=1000 with marginal error"):
        _plans.entropic_plan("sinkhorn", x0, x1, 0.3, 1.0, False, native=True)


def test_host_path_is_still_pots_numpy_call():
    x0, x1 = _batch(32, 32, (3,), 1)
    host = _plans.entropic_plan("sinkhorn", x0, x1, 0.5, 1.0, False)
    assert isinstance(host, np.ndarray)  # TorchCFM's bit-identical call, untouched


def test_native_draws_equal_torchcfm_seeded(monkeypatch):
    tcfm_ot = pytest.importorskip("torchcfm.optimal_transport")
    x0, x1 = _batch(48, 48, (3,), 4)
    theirs = tcfm_ot.OTPlanSampler("sinkhorn", reg=0.5)
    for seed in range(4):
        np.random.seed(seed)
        a0, a1 = theirs.sample_plan(x0, x1)
        after = np.random.rand(2)
        np.random.seed(seed)
        pi = _plans.entropic_plan("sinkhorn", x0, x1, 0.5, 1.0, False, native=True)
        i, j = _plans.draw_on_device(pi, 48)
        assert torch.equal(a0, x0[i]) and torch.equal(a1, x1[j])
        assert np.array_equal(np.random.rand(2), after)


def test_sbcfm_on_the_native_solver_matches_torchcfm(monkeypatch):
    tcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    monkeypatch.setattr(_plans, "entropic_plan", partial(_plans.entropic_plan, native=True))
    ours = SchrodingerBridgeConditionalFlowMatcher(sigma=1.0, ot_method="sinkhorn")
    theirs = tcfm.SchrodingerBridgeConditionalFlowMatcher(sigma=1.0, ot_method="sinkhorn")
    x0, x1 = _batch(64, 64, (2,), 3)
    for seed in range(3):
        outs = []
        for fm in (ours, theirs):
            torch.manual_seed(seed)
            np.random.seed(seed)
            outs.append(fm.sample_location_and_conditional_flow(x0, x1))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_plan_refuses_bad_input():
    x0, x1 = _batch(8, 8, (2,), 0)
    x0[2, 1] = float("nan")
    with pytest.raises(ValueError, match="cost must be finite"):
        _plans.entropic_plan("sinkhorn", x0, x1, 0.5, 1.0, False, native=True)
    with pytest.raises(ValueError, match="epsilon must be a positive number"):
        _plans.entropic_plan("sinkhorn", x1, x1, 0.0, 1.0, False, native=True)
