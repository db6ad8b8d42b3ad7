"""Timestep distributions (issue 31): draws against scipy's and the issue's formulas (KS, 1e5 draws), bad specs."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from loom_kernels.timesteps import T_DISTS, TimestepDist, timestep_dist

N = 100_000


def _u_shaped_reference_cdf(t):
    # Inverse of the issue's map u = 0.5 - 0.25 asinh(sinh(2) (1 - 2 U)), derived independently:
    # U = (1 - sinh(2 - 4u) / sinh(2)) / 2; checked numerically below against the map itself.
    return 0.5 * (1 - np.sinh(2 - 4 * np.asarray(t)) / math.sinh(2))


CASES = [
    ("uniform", stats.uniform(0, 1).cdf),
    ("beta(0.5, 0.5)", stats.beta(0.5, 0.5).cdf),
    ("beta:2,5", stats.beta(2, 5).cdf),
    ("u_shaped", _u_shaped_reference_cdf),
    ("logit_normal(0, 1)", lambda t: stats.norm.cdf(np.log(t / (1 - t)))),
    ("logit_normal(0.5, 0.7)", lambda t: stats.norm.cdf((np.log(t / (1 - t)) - 0.5) / 0.7)),
]


@pytest.mark.parametrize("spec,ref_cdf", CASES, ids=[c[0] for c in CASES])
def test_draws_follow_the_reference_distribution(spec, ref_cdf):
    torch.manual_seed(0)
    t = timestep_dist(spec).sample(N, dtype=torch.float64).numpy()
    assert t.shape == (N,) and t.min() >= 0 and t.max() <= 1
    assert stats.kstest(t, ref_cdf).pvalue > 1e-3
    # The wrong distribution must be rejected: the test can fail.
    if not spec.startswith("uniform"):
        assert stats.kstest(t, "uniform").pvalue < 1e-6


@pytest.mark.parametrize("spec", [c[0] for c in CASES])
def test_cdf_and_pdf_are_consistent(spec):
    d = timestep_dist(spec)
    grid = np.linspace(0.01, 0.99, 41)
    ref = dict(CASES)[spec](grid)
    np.testing.assert_allclose(d.cdf(grid), ref, atol=1e-12)
    # The density integrates to the CDF's increments.
    for a, b in ((0.01, 0.3), (0.3, 0.99)):
        area = integrate.quad(lambda x: float(d.pdf(x)), a, b)[0]
        assert area == pytest.approx(float(d.cdf(b) - d.cdf(a)), rel=1e-7)


def test_u_shaped_matches_the_issue_formula_draw_for_draw():
    g = torch.Generator().manual_seed(3)
    t = timestep_dist("u_shaped").sample(1000, generator=g, dtype=torch.float64)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = 0.5 - 0.25 * torch.asinh(math.sinh(2) * (1 - 2 * u))
    torch.testing.assert_close(t, ref)
    np.testing.assert_allclose(_u_shaped_reference_cdf(ref.numpy()), u.numpy(), atol=1e-12)


def test_uniform_is_torch_rand_so_the_trainer_default_is_unchanged():
    torch.manual_seed(5)
    a = timestep_dist("uniform").sample(7)
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(7))


def test_specs_and_defaults():
    assert timestep_dist("beta") == TimestepDist("beta", (0.5, 0.5))
    assert timestep_dist("beta", 2, 3) == timestep_dist("beta(2,3)") == timestep_dist(" beta:2, 3 ")
    assert timestep_dist("logit_normal").params == (0.0, 1.0)
    d = timestep_dist("u_shaped")
    assert timestep_dist(d) is d and repr(timestep_dist("beta(2,3)")) == "beta(2, 3)"
    assert set(T_DISTS) == {"uniform", "beta", "u_shaped", "logit_normal"}


@pytest.mark.parametrize(
    "spec,params,match",
    [
        ("gauss", (), "t_dist must be one of"),
        ("beta(0, 1)", (), "a > 0 and b > 0"),
        ("beta(1)", (), "takes 2 parameters"),
        ("beta(a, b)", (), "must be numbers"),
        ("logit_normal(0, -1)", (), "s > 0"),
        ("logit_normal(0, nan)", (), "finite"),
        ("uniform(1)", (), "takes 0 parameters"),
        ("beta(1, 2)", (1, 2), "not both"),
    ],
)
def test_bad_specs_name_the_argument(spec, params, match):
    with pytest.raises(ValueError, match=match) as e:
        timestep_dist(spec, *params)
    assert "t_dist" in str(e.value)


def test_type_error_and_custom_argument_name():
    with pytest.raises(TypeError, match="t_dist must be a distribution name"):
        timestep_dist(0.5)
    with pytest.raises(ValueError, match="--t-dist must be one of"):
        timestep_dist("normal", arg="--t-dist")
    with pytest.raises(ValueError, match="generator"):
        timestep_dist("beta").sample(3, generator=torch.Generator())


def test_torchcfm_layer_takes_a_distribution_name_for_t():
    from loom_kernels.compat.torchcfm import ConditionalFlowMatcher

    fm = ConditionalFlowMatcher(sigma=0.0)
    x0, x1 = torch.zeros(50_000, 2), torch.ones(50_000, 2)
    t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t="logit_normal(0.5, 0.7)")
    assert stats.kstest(t.double().numpy(), CASES[-1][1]).pvalue > 1e-3
    torch.testing.assert_close(xt[:, 0], t)  # x_t = t x1 + (1 - t) x0 with the drawn t
    with pytest.raises(ValueError, match="^t must be one of"):
        fm.sample_location_and_conditional_flow(x0, x1, t="normal")
