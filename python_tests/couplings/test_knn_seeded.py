"""KNNNoiseCoupling's seeded candidates: the fused C++ pass (``_C.philox_nearest``) against a float64 brute
force over ``gaussian_noise`` of the same seeds, its fallback, the tie rule and bad input."""

from __future__ import annotations

import pytest
import torch

from loom_kernels import _native
from loom_kernels.couplings import knn
from loom_kernels.couplings.factory import make_coupling
from loom_kernels.couplings.knn import KNNNoiseCoupling, nearest_of_seeds
from loom_kernels.noise import gaussian_noise


def _brute(x, seeds, k):
    """(argmin, |x - z|^2 (b, k)) in float64 over the candidates gaussian_noise(seeds)."""
    b, d = x.shape
    z = gaussian_noise(seeds, (d,)).double().view(b, k, d)
    full = (x.double()[:, None] - z).square().sum(2)
    return full.argmin(1), full


def _seeds(n, gen):
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)  # negative seeds too


@pytest.fixture(params=_native.cpu_isas())
def isa(request):
    """Each instruction set this build and CPU run (the normals differ in the last bits between them)."""
    _native.set_cpu_isa(request.param)
    yield request.param
    _native.set_cpu_isa("auto")


def test_the_compiled_module_has_the_fused_pass():
    assert knn.fused_pass() is not None  # a stale _C*.so would silently take the fallback


# D: not a multiple of the SIMD width or of a Philox step (128), 1, one full step, past a 2**14 chunk
@pytest.mark.parametrize(("b", "k", "d"), [(7, 5, 1000), (1, 16, 3), (6, 1, 37), (4, 3, 1), (3, 4, 128), (2, 3, 16500)])
def test_fused_pass_matches_a_float64_brute_force(b, k, d, isa):
    gen = torch.Generator().manual_seed(b * 1000 + k * 10 + d)
    x, seeds = torch.randn(b, d, generator=gen) * 1.5, _seeds(b * k, gen)
    j, dist, xx = nearest_of_seeds(x, seeds, k)
    ref_j, full = _brute(x, seeds, k)
    assert dist.dtype == xx.dtype == torch.float64 and dist.shape == (b, k)
    assert torch.equal(j, ref_j)
    torch.testing.assert_close(xx, x.double().square().sum(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(dist + xx[:, None], full, rtol=1e-12, atol=1e-9)


def test_ties_go_to_the_lowest_candidate(isa, monkeypatch):
    b, k, d = 6, 5, 300
    gen = torch.Generator().manual_seed(3)
    x, seeds = torch.randn(b, d, generator=gen), _seeds(b * k, gen).view(b, k)
    j0, _ = _brute(x, seeds.flatten(), k)
    seeds[0] = seeds[0, 0]  # all k identical: the first
    for i in range(1, b):  # the nearest seed again at every later position
        w = int(j0[i])
        seeds[i, w:] = seeds[i, w]
    x[5] = 0.0  # and one item nearest by |z|^2 alone
    want = _brute(x, seeds.flatten(), k)[0]
    for fused in (True, False):
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(knn, "fused_pass", lambda: None)
            j, dist, _ = nearest_of_seeds(x, seeds.flatten(), k)
        assert torch.equal(j, want), fused
        assert int(j[0]) == 0 and bool((dist[0] == dist[0, 0]).all())
        for i in range(1, 5):
            w = int(j0[i])
            assert int(j[i]) == w and bool((dist[i, w:] == dist[i, w]).all())


def test_fallback_gives_the_same_result(monkeypatch):
    b, k, d = 9, 6, 777
    gen = torch.Generator().manual_seed(5)
    x, seeds = torch.randn(b, d, generator=gen), _seeds(b * k, gen)
    j, dist, xx = nearest_of_seeds(x, seeds, k)
    j64, dist64, xx64 = nearest_of_seeds(x.double(), seeds, k)  # float64 x1: the fallback on its own
    monkeypatch.setattr(knn, "FALLBACK_ELEMENTS", 2 * k * d)  # several chunks
    monkeypatch.setattr(knn, "fused_pass", lambda: None)
    jf, distf, xxf = nearest_of_seeds(x, seeds, k)
    for jj, dd, qq in ((j64, dist64, xx64), (jf, distf, xxf)):
        assert torch.equal(jj, j)
        torch.testing.assert_close(dd, dist, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(qq, xx, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_seeded_coupling_returns_the_regenerated_winners(dtype):
    b, k, shape = 5, 4, (3, 5, 7)
    x1 = torch.randn(b, *shape).to(dtype)
    c = KNNNoiseCoupling(k, noise="seeds", generator=torch.Generator().manual_seed(1))
    x0, out1, perm = c(x1, return_indices=True)
    seeds = c.candidate_seeds
    assert seeds.shape == (b * k,) and bool((seeds >= 0).all()) and out1 is x1
    ref_j, full = _brute(x1.reshape(b, -1).double(), seeds, k)
    assert torch.equal(perm, torch.arange(b) * k + ref_j)
    assert torch.equal(c.chosen_seeds, seeds[perm])
    assert x0.dtype == dtype and torch.equal(x0, gaussian_noise(c.chosen_seeds, shape, dtype=dtype))
    torch.testing.assert_close(c.stats["post_cost"], full.gather(1, ref_j[:, None]).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(c.stats["pre_cost"], full[:, 0].mean(), rtol=1e-6, atol=0)
    assert int(c.stats["swaps"]) == int((ref_j != 0).sum())
    # the same generator state, the same seeds; a call's seeds= takes the seeded path in either mode
    again = KNNNoiseCoupling(k, noise="seeds", generator=torch.Generator().manual_seed(1))(x1)[0]
    assert torch.equal(again, x0)
    assert torch.equal(KNNNoiseCoupling(k)(x1, seeds=seeds)[0], x0)


def test_seeds_and_given_candidates_agree():
    b, k, d = 16, 8, 200
    x1, seeds = torch.randn(b, d), torch.arange(b * k) * 7919
    x0_s, _, p_s = KNNNoiseCoupling(k)(x1, seeds=seeds, return_indices=True)
    x0_c, _, p_c = KNNNoiseCoupling(k)(x1, x0=gaussian_noise(seeds, (d,)), return_indices=True)
    assert torch.equal(p_s, p_c) and torch.equal(x0_s, x0_c)


def test_randn_mode_is_unchanged():
    b, k = 6, 4
    x1 = torch.randn(b, 10)
    x0, _, perm = KNNNoiseCoupling(k, generator=torch.Generator().manual_seed(2))(x1, return_indices=True)
    cand = torch.randn(b * k, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x0, cand[perm]) and torch.equal(perm, torch.arange(b) * k + knn.nearest_of_k(x1, cand, k)[0])


def test_factory_selects_the_seeded_mode():
    c = make_coupling("knn", options={"k": 3, "noise": "seeds"})
    assert isinstance(c, KNNNoiseCoupling) and (c.k, c.noise) == (3, "seeds")
    assert make_coupling("knn").noise == "randn"


def test_seeded_bad_input():
    x1 = torch.randn(3, 4)
    with pytest.raises(ValueError, match="noise must be one of"):
        KNNNoiseCoupling(2, noise="normal")
    with pytest.raises(ValueError, match=r"seeds must hold k\*b = 6"):
        KNNNoiseCoupling(2)(x1, seeds=torch.arange(5))
    with pytest.raises(TypeError, match="seeds must be an integer"):
        KNNNoiseCoupling(2)(x1, seeds=torch.zeros(6))
    with pytest.raises(ValueError, match="seeds must be 1-D"):
        KNNNoiseCoupling(2)(x1, seeds=torch.arange(6).view(3, 2))
    with pytest.raises(ValueError, match="not both"):
        KNNNoiseCoupling(2)(x1, x0=torch.randn(6, 4), seeds=torch.arange(6))
    fn = knn.fused_pass()
    with pytest.raises(ValueError, match="b \\* k = 6"):
        fn(torch.arange(5).numpy(), x1.numpy(), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fn(torch.arange(0).numpy(), x1.numpy(), 0)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.arange(2).numpy(), x1[0].numpy(), 2)
    j, dist, xx = fn(torch.arange(0).numpy(), x1[:0].numpy(), 2)  # b = 0
    assert j.shape == (0,) and dist.shape == (0, 2) and xx.shape == (0,)
