"""``cond=`` against the unconditioned coupling, in the same run (issue 21: within 10%).

LOOM (global scope, one process) and minibatch OT at b = 256 on CIFAR-shaped data (D = 3072), with no
condition, a scalar condition (Dc = 1) and a 64-dim embedding (Dc = 64). The condition adds one
``(b, b)`` float64 penalty (``common.cond_cost``) to the cost before the exact assignment; everything else
is the same call. The ratio to the ``none`` row of the same group is the number to quote.

On a loaded machine the separate rows drift by more than the effect (each row runs at another time):
``test_cond_interleaved_cpu`` runs the three providers round-robin inside every round (the order
rotating) and reports in ``extra_info`` each provider's median call and the median over rounds of the
per-round ratio to ``none`` (paired, so load that drifts between rounds cancels). ``test_cond_term_cpu``
times the work the condition adds (``check_cond`` + ``add_cond_cost``) beside the ``(b, b)`` cost matrix
it is added to: the overhead's upper bound, measurable where whole steps are too noisy.

Run: ``python -m pytest bench/bench_coupling_cond.py --benchmark-columns=median,iqr,rounds``
(GPU cases: ``-m cuda``, on a machine with a GPU).
"""

import itertools
import os
import statistics
import time

import pytest
import torch

from loom_kernels.cost import pairwise_cost
from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling
from loom_kernels.couplings.base import check_cond
from loom_kernels.couplings.scopes.solve import add_cond_cost

SHAPE, B, BATCHES = (3, 32, 32), 256, 4
# 2 like the other CPU benches; LOOM_BENCH_THREADS=1 on a loaded machine, where every parallel region of
# a 2-thread run can wait a scheduler slice for a descheduled sibling thread (that wait, not the work,
# then dominates the difference between the providers).
CPU_THREADS = int(os.environ.get("LOOM_BENCH_THREADS", "2"))
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
    return n, data.reshape(n, *SHAPE).to(device), noise, conds, [perm[a : a + B] for a in range(0, n, B)]


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


def _coupling(kind, n, device):
    return LoomCoupling(n, SHAPE, seed=0, device=device) if kind == "loom" else MinibatchOTCoupling()


def _run(benchmark, kind, cond_name, device, sync=None):
    n, data, noise, conds, batches = _problem(device)
    coupling = _coupling(kind, n, device)
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


@pytest.mark.parametrize("kind", ["loom", "minibatch"])
def test_cond_interleaved_cpu(benchmark, kind):
    torch.set_num_threads(CPU_THREADS)
    n, data, noise, conds, batches = _problem("cpu")
    names = list(CONDS)
    steps = {k: _step(_coupling(kind, n, "cpu"), data, noise, conds[k], batches, kind == "minibatch") for k in names}
    times = {k: [] for k in names}
    rounds = itertools.count()

    def one_round():
        r = next(rounds)
        for k in names[r % 3 :] + names[: r % 3]:  # rotate the order: no provider always runs first
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)

    benchmark.group = f"cond interleaved {kind} cpu b={B} D=3072"
    benchmark.pedantic(one_round, rounds=30, warmup_rounds=2, iterations=1)
    keep = {k: v[2:] for k, v in times.items()}  # the warm-up rounds are recorded too
    med = {k: statistics.median(v) * 1e3 for k, v in keep.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(keep[k], keep["none"])) for k in names[1:]}
    benchmark.extra_info.update({f"median_ms_{k}": round(v, 2) for k, v in med.items()})
    benchmark.extra_info.update({f"paired_ratio_{k}": round(v, 3) for k, v in ratio.items()})
    print(f"\n{kind}: median ms {med}; paired ratio to none {ratio}")


@pytest.mark.parametrize("provider", ["cost-matrix", "cond-dc1", "cond-dc64"])
def test_cond_term_cpu(benchmark, provider):
    torch.set_num_threads(CPU_THREADS)
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(B, 3 * 32 * 32, generator=g), torch.randn(B, 3 * 32 * 32, generator=g)
    cost = pairwise_cost(x1, x0)
    benchmark.group = f"cond term cpu b={B} D=3072"
    if provider == "cost-matrix":
        benchmark.pedantic(lambda: pairwise_cost(x1, x0), rounds=30, warmup_rounds=2, iterations=1)
        return
    raw = torch.randn(B, 1 if provider == "cond-dc1" else 64, generator=g)

    def term():
        c = check_cond(raw, B, x1.device)
        return add_cond_cost(cost, c, c, 1.0)

    out = benchmark.pedantic(term, rounds=100, warmup_rounds=5, iterations=1)
    assert out.shape == (B, B)
