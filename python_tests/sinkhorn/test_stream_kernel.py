"""loom_kernels.streamed: the fused C++ tile kernel against the torch tiles (bitwise for argmax and
Gumbel draws, float tolerance for the log-sum-exp), a float64 reference, on every instruction set
this CPU runs; its use by the Sinkhorn solver and ``streamed_argmin``; bad and empty inputs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from loom_kernels import _native, streamed
from loom_kernels.sinkhorn import _tiles, draw_pairs, sinkhorn

_C = _native.cpu()
ISAS = _C.isas()


@pytest.fixture(params=ISAS)
def isa(request):
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("auto")


def _terms(B, n, m, D, eps, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, D, generator=g) * spread
    y = torch.randn(B, m, D, generator=g) * spread
    geo = _tiles.PointTiles(x, y)
    u, scale, _ = geo.terms(torch.randn(B, m, generator=g), torch.full((B, 1), eps))
    return geo, u.contiguous(), scale.contiguous()


def _lse64(geo, u, scale):
    s = u.double()[:, None, :] + scale.double()[:, None, None] * (geo.x.double() @ geo.y.double().transpose(1, 2))
    return torch.logsumexp(s, -1)


SHAPES = [(2, 37, 1100, 1), (1, 300, 77, 2), (2, 61, 530, 3), (1, 50, 1030, 17), (1, 45, 300, 64), (1, 29, 90, 100)]


@pytest.mark.parametrize("B,n,m,D", SHAPES)
def test_lse_matches_the_tiles_and_float64(isa, B, n, m, D):
    geo, u, scale = _terms(B, n, m, D, eps=0.1)
    out = streamed.lse(geo.x, geo.y, u, scale, threads=2)
    ref = _tiles.row_lse(geo, u, scale)
    assert out.dtype == torch.float32 and out.shape == (B, n)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))
    exact = _lse64(geo, u, scale)
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("B,n,m,D", SHAPES)
@pytest.mark.parametrize("keyed", [False, True])
def test_argmax_and_gumbel_draws_are_those_of_the_tiles(isa, B, n, m, D, keyed):
    geo, u, scale = _terms(B, n, m, D, eps=0.05, seed=3)
    ki = _tiles.row_keys(12345, B, n, "cpu") if keyed else None
    kj = _tiles.col_keys(m, "cpu") if keyed else None
    out = streamed.argmax(geo.x, geo.y, u, scale, ki, kj, threads=2)
    assert torch.equal(out, _tiles.row_argmax(geo, u, scale, ki, kj))


def test_gumbel_draws_follow_the_softmax():
    """Many seeds of one row: the draw frequencies are the row's softmax (chi-square-sized error)."""
    geo, u, scale = _terms(1, 1, 6, 2, eps=0.5, seed=5)
    p = torch.softmax(u + scale * (geo.x[0] @ geo.y[0].T), -1)[0].double()
    kj = _tiles.col_keys(6, "cpu")
    draws = [int(streamed.argmax(geo.x, geo.y, u, scale, _tiles.row_keys(s, 1, 1, "cpu"), kj)) for s in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=6).double() / 4000
    assert float((freq - p).abs().max()) < 0.03, (freq, p)


@pytest.mark.parametrize("eps", [1e3, 1e-4])
def test_huge_and_tiny_epsilon(isa, eps):
    """eps 1e3: logits ~ u (flat); 1e-4: logits spread over ~1e5, exp underflows for all but a few."""
    geo, u, scale = _terms(2, 40, 700, 3, eps=eps, seed=7)
    torch.testing.assert_close(
        streamed.lse(geo.x, geo.y, u, scale), _tiles.row_lse(geo, u, scale), rtol=2e-6, atol=1e-6
    )
    assert torch.equal(streamed.argmax(geo.x, geo.y, u, scale), _tiles.row_argmax(geo, u, scale))


def test_duplicate_points_tie_to_the_lowest_column(isa):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(7, 4, generator=g)
    y = base.repeat(150, 1)[None]  # 1050 columns: each value 150 times, across panels
    x = base[torch.randint(0, 7, (33,), generator=g)][None]
    u = torch.zeros(1, 1050)
    scale = torch.ones(1)
    out = streamed.argmax(x, y, u, scale)
    assert torch.equal(out, _tiles.row_argmax(_tiles.PointTiles(x, y), u, scale))
    assert int(out.max()) < 7  # the first copy


def test_columns_of_minus_infinity(isa):
    """Zero-weight columns (u = -inf) never win and add nothing; a row of them gives -inf and column 0."""
    geo, u, scale = _terms(2, 20, 300, 2, eps=0.2, seed=4)
    u[0, ::3] = -float("inf")
    u[1] = -float("inf")
    out = streamed.lse(geo.x, geo.y, u, scale)
    torch.testing.assert_close(out, _tiles.row_lse(geo, u, scale), rtol=2e-6, atol=1e-6)
    assert bool(torch.isneginf(out[1]).all())
    arg = streamed.argmax(geo.x, geo.y, u, scale)
    assert torch.equal(arg, _tiles.row_argmax(geo, u, scale)) and int(arg[0].remainder(3).min()) > 0


def test_nan_is_refused_with_a_clear_error():
    geo, u, scale = _terms(1, 5, 9, 2, eps=0.1)
    u[0, 3] = float("nan")
    with pytest.raises(ValueError, match="u must not hold NaN"):
        streamed.lse(geo.x, geo.y, u, scale)
    with pytest.raises(ValueError, match="u must not hold NaN"):  # a NaN potential reaches the kernel's u
        streamed.streamed_argmin(torch.zeros(2, 2), torch.zeros(3, 2), torch.tensor([0.0, float("nan"), 1.0]))


def test_empty_inputs():
    x, y, u, s = torch.zeros(1, 0, 3), torch.zeros(1, 5, 3), torch.zeros(1, 5), torch.ones(1)
    assert streamed.lse(x, y, u, s).shape == (1, 0) and streamed.argmax(x, y, u, s).shape == (1, 0)
    out = streamed.lse(torch.zeros(1, 4, 3), torch.zeros(1, 0, 3), torch.zeros(1, 0), s)
    assert bool(torch.isneginf(out).all())
    vals, idx = streamed.streamed_argmin(torch.zeros(0, 3), torch.randn(5, 3))
    assert vals.shape == idx.shape == (0,)
    with pytest.raises(ValueError, match="at least one row"):
        streamed.streamed_argmin(torch.zeros(2, 3), torch.zeros(0, 3))


def test_the_result_does_not_depend_on_the_thread_count():
    geo, u, scale = _terms(3, 400, 900, 5, eps=0.1, seed=9)
    ki, kj = _tiles.row_keys(1, 3, 400, "cpu"), _tiles.col_keys(900, "cpu")
    outs = [
        (streamed.lse(geo.x, geo.y, u, scale, t), streamed.argmax(geo.x, geo.y, u, scale, ki, kj, t)) for t in (1, 2, 3)
    ]
    for lse_t, arg_t in outs[1:]:
        assert torch.equal(lse_t, outs[0][0]) and torch.equal(arg_t, outs[0][1])


# ---- streamed_argmin: the semidiscrete / nearest-neighbour pass ---------------------------------


@pytest.mark.parametrize("metric", ["sqeuclidean", "inner"])
@pytest.mark.parametrize("D", [2, 33])
def test_streamed_argmin_matches_brute_force(isa, metric, D):
    g = torch.Generator().manual_seed(D)
    z, x = torch.randn(70, D, generator=g) + 3.0, torch.randn(1500, D, generator=g) + 3.0
    pot = torch.randn(1500, generator=g)
    vals, idx = streamed.streamed_argmin(z, x, pot, metric=metric)
    z64, x64 = z.double(), x.double()
    c = torch.cdist(z64, x64) ** 2 if metric == "sqeuclidean" else -(z64 @ x64.T)
    full = c - pot.double()
    best = full.min(-1).values
    # the chosen column is optimal up to float32 rounding of the Gram identity
    assert float((full.gather(1, idx[:, None])[:, 0] - best).abs().max()) <= 1e-4 * float(c.abs().max())
    assert float((full.argmin(-1) != idx).float().mean()) < 0.05
    torch.testing.assert_close(vals.double(), full.gather(1, idx[:, None])[:, 0], rtol=1e-5, atol=1e-4)


def test_streamed_argmin_draws_are_the_same_on_every_path():
    """Gumbel-max draws: the kernel, the torch tiles and (through draw_pairs' hash) any device agree."""
    g = torch.Generator().manual_seed(0)
    z, x, pot = torch.randn(64, 3, generator=g), torch.randn(900, 3, generator=g), torch.randn(900, generator=g)
    _, a = streamed.streamed_argmin(z, x, pot, epsilon=0.3, seed=77)
    with streamed.disabled():
        _, b = streamed.streamed_argmin(z, x, pot, epsilon=0.3, seed=77)
    _, c = streamed.streamed_argmin(z, x, pot, epsilon=0.3, seed=78)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_streamed_argmin_bad_arguments():
    z, x = torch.zeros(2, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="x must have D = 3 features"):
        streamed.streamed_argmin(z, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="metric"):
        streamed.streamed_argmin(z, x, metric="cosine")
    with pytest.raises(ValueError, match="epsilon"):
        streamed.streamed_argmin(z, x, epsilon=-1.0)
    with pytest.raises(ValueError, match="g must be"):
        streamed.streamed_argmin(z, x, torch.zeros(3))


# ---- the solver on the kernel -----------------------------------------------------------------


def test_sinkhorn_on_the_kernel_matches_the_torch_tiles():
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(300, 5, generator=g), torch.randn(260, 5, generator=g) + 0.3
    res = sinkhorn(x, y, epsilon=0.05, tol=1e-6)
    pairs = draw_pairs(res, x, y, seed=5)
    with streamed.disabled():
        ref = sinkhorn(x, y, epsilon=0.05, tol=1e-6)
        ref_pairs = draw_pairs(ref, x, y, seed=5)
    assert res.converged and ref.converged and abs(res.iterations - ref.iterations) <= 1
    eps = float(res.epsilon)
    torch.testing.assert_close(res.f, ref.f, atol=1e-3 * eps, rtol=0)
    torch.testing.assert_close(res.g, ref.g, atol=1e-3 * eps, rtol=0)
    assert float((pairs != ref_pairs).float().mean()) <= 0.01  # potentials differ in the last bits


@pytest.mark.slow
def test_memory_at_65536_points_is_one_tile_per_thread():
    """One LSE and one argmax pass at n = m = 65,536 (the cost would be 16 GiB): the peak resident
    memory grows by less than 64 MiB over the inputs (a fresh process, so the peak is this pass)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from loom_kernels import streamed
        x, y = torch.randn(1, 65536, 2), torch.randn(1, 65536, 2)
        u, s = torch.zeros(1, 65536), torch.full((1,), 2.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = streamed.lse(x, y, u, s)
        arg = streamed.argmax(x, y, u, s)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert bool(torch.isfinite(out).all()) and int(arg.max()) < 65536
        print(grew)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 64 * 1024, done.stdout  # KiB
