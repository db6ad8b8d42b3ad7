"""The streamed argmin pass against float64 brute force: every tiling, input kind, option and backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom_kernels.streamed import sq_norms, streamed_argmin

from kernel_paths import BACKENDS, needs_interpreter, on


def _brute(z, x, g, metric="sqeuclidean", aux=None, labels=None):
    z64, x64 = z.double(), x.reshape(len(x), -1).double()
    c = torch.cdist(z64, x64).square() if metric == "sqeuclidean" else -(z64 @ x64.T)
    c = c - g.double()[None, :]
    if aux is not None:
        c = c - aux[2] * (aux[0].double() @ aux[1].double().T)
    if labels is not None:
        c = c.masked_fill(labels[0][:, None] != labels[1][None, :], float("inf"))
    return c.min(1)


@pytest.mark.parametrize("metric", ["sqeuclidean", "inner"])
@pytest.mark.parametrize("tile", [None, 97, 1000])
def test_matches_float64_brute_force(metric, tile):
    z, x, g = torch.randn(33, 7), torch.randn(500, 7), torch.randn(500)
    v, i = streamed_argmin(z, x, g, metric=metric, tile=tile)
    vr, ir = _brute(z, x, g, metric)
    assert torch.equal(i, ir)
    torch.testing.assert_close(v.double(), vr, rtol=1e-5, atol=1e-4)


def test_memmap_equals_tensor(tmp_path):
    x = torch.randn(300, 2, 3)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(300, 2, 3))
    mm[:] = x.numpy()
    mm.flush()
    z, g = torch.randn(20, 6), torch.randn(300)
    ro = np.load(tmp_path / "x.npy", mmap_mode="r")
    for kw in ({}, {"epsilon": 0.3, "seed": 5}):
        v0, i0 = streamed_argmin(z, x, g, **kw)
        v1, i1 = streamed_argmin(z, ro, g, x_sqnorm=sq_norms(ro, "cpu"), tile=64, **kw)
        assert torch.equal(i0, i1)
        torch.testing.assert_close(v0, v1)


def test_labels_and_aux_term():
    z, x, g = torch.randn(40, 5), torch.randn(200, 5), torch.randn(200)
    aux = (torch.randn(40, 3), torch.randn(200, 3), 0.7)
    labels = (torch.randint(4, (40,)), torch.randint(4, (200,)))
    v, i = streamed_argmin(z, x, g, aux=aux, labels=labels, tile=128)
    vr, ir = _brute(z, x, g, aux=aux, labels=labels)
    assert torch.equal(i, ir)
    assert bool((labels[1][i] == labels[0]).all())
    torch.testing.assert_close(v.double(), vr, rtol=1e-5, atol=1e-4)


def test_ties_take_the_lowest_column_across_tiles():
    x = torch.randn(10, 3).repeat(30, 1)  # row j and j + 10k are equal
    z = torch.randn(16, 3)
    _, i = streamed_argmin(z, x, tile=16 * 7)  # 7 columns per tile: equal rows sit in different tiles
    assert bool((i < 10).all())


def test_gumbel_draw_follows_the_softmax():
    z, x = torch.zeros(3000, 2), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5]])
    g = torch.tensor([0.0, 0.2, 0.0])
    draws = streamed_argmin(z, x, g, epsilon=0.8, seed=4)[1]  # each row its own hash key: 3000 draws
    freq = torch.bincount(draws, minlength=3).double() / 3000
    p = torch.softmax(-(torch.tensor([0.0, 1.0, 2.25]) - g).double() / 0.8, 0)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / 3000).sqrt().max()


def test_gumbel_is_independent_of_tiling_and_sharding():
    z, x, g = torch.randn(25, 4), torch.randn(400, 4), torch.randn(400)
    _, whole = streamed_argmin(z, x, g, epsilon=0.5, seed=11)
    _, tiled = streamed_argmin(z, x, g, epsilon=0.5, seed=11, tile=25 * 13)
    assert torch.equal(whole, tiled)
    # a shard with its offset draws the same noise: where the winner lies in the shard, the shard finds it
    _, hi = streamed_argmin(z, x[150:], g[150:], epsilon=0.5, seed=11, offset=150)
    mine = whole >= 150
    assert bool(mine.any()) and torch.equal(hi[mine] + 150, whole[mine])
    _, other = streamed_argmin(z, x, g, epsilon=0.5, seed=12)
    assert not torch.equal(whole, other)


def test_float64_inputs_compute_in_float64():
    z, x = torch.randn(8, 3, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    v, i = streamed_argmin(z, x)
    vr, ir = _brute(z, x, torch.zeros(50))
    assert v.dtype == torch.float64 and torch.equal(i, ir)
    torch.testing.assert_close(v, vr)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"metric": "cosine"}, "metric"),
        ({"g": torch.zeros(3)}, "g must"),
    ],
)
def test_bad_inputs(kw, match):
    with pytest.raises(ValueError, match=match):
        streamed_argmin(torch.randn(4, 2), torch.randn(10, 2), **kw)
    with pytest.raises(ValueError, match="x must have D"):
        streamed_argmin(torch.randn(4, 2), torch.randn(10, 3))


@needs_interpreter
def test_triton_matches_torch_tiny():
    z, x, g = torch.randn(5, 3), torch.randn(40, 3), torch.randn(40)
    for kw in ({}, {"epsilon": 0.4, "seed": 3, "offset": 7}):
        v0, i0 = streamed_argmin(z, x, g, **kw)
        v1, i1 = on("triton", streamed_argmin, z, x, g, **kw)
        assert torch.equal(i0, i1)
        torch.testing.assert_close(v0, v1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "inner"])
def test_backends_agree_with_every_option(backend, metric):
    z, x, g = torch.randn(20, 37), torch.randn(300, 37), torch.randn(300)  # D = 37: several ragged K-tiles
    aux = (torch.randn(20, 3), torch.randn(300, 3), 0.7)
    labels = (torch.randint(3, (20,)), torch.randint(3, (300,)))
    v, i = on(backend, streamed_argmin, z, x, g, metric=metric, aux=aux, labels=labels)
    vr, ir = _brute(z, x, g, metric, aux, labels)
    assert torch.equal(i, ir)
    torch.testing.assert_close(v.double(), vr, rtol=1e-5, atol=1e-4)
    ref = streamed_argmin(z, x, g, metric=metric, epsilon=0.3, seed=9, aux=aux, labels=labels)[1]
    assert torch.equal(
        on(backend, streamed_argmin, z, x, g, metric=metric, epsilon=0.3, seed=9, aux=aux, labels=labels)[1], ref
    )
