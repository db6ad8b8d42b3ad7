"""``cond=`` against the unconditioned coupling, in the same run (issue 21: within 10%).

LOOM (global scope, one process) and minibatch OT at b = 256 on CIFAR-shaped data (D = 3072), with no
condition, a scalar condition (Dc = 1) and a 64-dim embedding (Dc = 64). The condition adds one
``(b, b)`` float64 penalty (``common.cond_cost``) to the cost before the exact assignment; everything else
is the same call. The ratio to the ``none`` row of the same group is the number to quote.

Run: ``python -m pytest bench/bench_coupling_cond.py --benchmark-columns=median,iqr,rounds``
(GPU cases: ``-m cuda``, on a machine with a GPU).
"""
import itertools

import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling

SHAPE, B, BATCHES, CPU_THREADS = (3, 32, 32), 256, 4, 2
CONDS = {"none": None, "dc1": 1, "dc64": 64}


def _problem(device):
    """A data-like stream over ``BATCHES * B`` points with a per-point condition of each width."""
    g = torch.Generator().manual_seed(0)
    n, d = BATCHES * B, 3 * 32 * 32
    basis = torch.randn(32, d, generator=g) / 32**0.5
    data = torch.tanh(torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g))
    conds = {k: None if dc is None else torch.randn(n, dc, generator=g).to(device) for k, dc in CONDS.items()}
    noise = torch.randn(n, d, generator=g).reshape(n, *SHAPE).to(device)
    perm = torch.randperm(n, generator=g)
    return n, data.reshape(n, *SHAPE).to(device), noise, conds, [perm[a:a + B] for a in range(0, n, B)]


def _step(coupling, data, noise, cond, batches, takes_x0, sync=None):
    def item(idx):
        i = idx.to(data.device)
        kw = {"x0": noise[i]} if takes_x0 else {}
        return data[i], idx, dict(kw, cond=None if cond is None else cond[i])

    it = itertools.cycle([item(idx) for idx in batches])  # sliced beforehand: the timed step is the call

    def step():
        x1, idx, kw = next(it)
        x0, _ = coupling(x1, idx, **kw)
        if sync is not None:
            sync()
        return x0

    return step


def _run(benchmark, kind, cond_name, device, sync=None):
    n, data, noise, conds, batches = _problem(device)
    if kind == "loom":
        coupling = LoomCoupling(n, SHAPE, seed=0, device=device)
    else:
        coupling = MinibatchOTCoupling()
    benchmark.group = f"cond {kind} {device} b={B} D=3072"
    benchmark.extra_info.update(cond=cond_name, threads=torch.get_num_threads())
    step = _step(coupling, data, noise, conds[cond_name], batches, kind == "minibatch", sync)
    x0 = benchmark.pedantic(step, rounds=20, warmup_rounds=2, iterations=1)
    assert x0.shape == (B, *SHAPE)


@pytest.mark.parametrize("cond_name", list(CONDS))
@pytest.mark.parametrize("kind", ["loom", "minibatch"])
def test_cond_cpu(benchmark, kind, cond_name):
    torch.set_num_threads(CPU_THREADS)
    _run(benchmark, kind, cond_name, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("cond_name", list(CONDS))
@pytest.mark.parametrize("kind", ["loom", "minibatch"])
def test_cond_cuda(benchmark, kind, cond_name):
    _run(benchmark, kind, cond_name, "cuda", torch.cuda.synchronize)
