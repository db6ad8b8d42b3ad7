"""The streamed pass over a data set sharded across gloo ranks: the (value, index) all-gather equals the
one-process pass on the whole data set, hard and Gumbel, with labels."""

from __future__ import annotations

import pytest
import torch

from loom_kernels.streamed import streamed_argmin

from gloo_ranks import run_rank, spawn

N, W = 300, 3


def _problem():
    g = torch.Generator().manual_seed(0)
    z, x, pot = torch.randn(40, 5, generator=g), torch.randn(N, 5, generator=g), torch.randn(N, generator=g)
    return z, x, pot, (torch.randint(3, (40,), generator=g), torch.randint(3, (N,), generator=g))


def _body(rank, world):
    import torch.distributed as dist

    z, x, pot, (rl, cl) = _problem()
    lo, hi = [0, 90, 200, N][rank], [0, 90, 200, N][rank + 1]  # uneven blocks
    out = {}
    for name, kw in {"hard": {}, "gumbel": {"epsilon": 0.5, "seed": 3}}.items():
        out[name] = streamed_argmin(z, x[lo:hi], pot[lo:hi], offset=lo, process_group=dist.group.WORLD, **kw)
        out[name + "-labels"] = streamed_argmin(
            z, x[lo:hi], pot[lo:hi], offset=lo, labels=(rl, cl[lo:hi]), process_group=dist.group.WORLD, **kw
        )
    return out


def _target(rank, world, store, out_dir):
    run_rank(rank, world, store, out_dir, lambda: _body(rank, world))


@pytest.mark.slow
def test_sharded_equals_whole(tmp_path):
    results = spawn(W, tmp_path, _target)
    z, x, pot, labels = _problem()
    for name, kw in {"hard": {}, "gumbel": {"epsilon": 0.5, "seed": 3}}.items():
        for suffix, extra in (("", {}), ("-labels", {"labels": labels})):
            v, i = streamed_argmin(z, x, pot, **kw, **extra)
            for r in results:
                rv, ri = r[name + suffix]
                assert torch.equal(ri, i), (name, suffix)
                torch.testing.assert_close(rv, v)
