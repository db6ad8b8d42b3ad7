"""CPU assignment: loom_kernels.assign vs scipy.optimize.linear_sum_assignment and lapx (lapjvh).

Run (about 5 minutes on 2 cores; the table printer gives the RESULTS.md table):
    python -m pytest bench/bench_assign.py --benchmark-json=/tmp/assign.json -q
    python tools/assign_table.py /tmp/assign.json

Groups: one per (family, N) for single problems, families ``unif`` (U[0,1)), ``sq3072``
(squared Euclidean, standard-normal noise vs data-like points in 3072 dims) and ``sq2``
(noise vs the 8-Gaussian ring in 2-D); plus a batch of 64 problems of N=256. Every provider
solves the same matrix (one cached factory per group), and its total is checked against scipy's
once, outside the timing. Single problems run on one thread for every provider; batches use
every core for the providers that can.
"""

import functools
import os

import numpy as np
import pytest

from loom_kernels.assign import assign, linear_sum_assignment
from loom_kernels.testing import assignment_problem

scipy_opt = pytest.importorskip("scipy.optimize")
try:
    import lap
except ImportError:  # lapx is optional
    lap = None

FAMILIES = ("unif", "sq3072", "sq2")
SIZES = (64, 128, 256, 512, 1024, 2048)
PROVIDERS = ("scipy", "lapjvh", "loom-cpu")
BATCH, BATCH_N = 64, 256
THREADS = os.cpu_count() or 1


@functools.cache
def _problem(family, n, batch=None):
    rng = np.random.default_rng([FAMILIES.index(family), n, batch or 0])
    return assignment_problem(family, n, batch=batch, rng=rng)


@functools.cache
def _scipy_total(family, n, batch=None):
    cost = _problem(family, n, batch)
    if batch is None:
        r, c = scipy_opt.linear_sum_assignment(cost)
        return cost[r, c].sum()
    return np.array([ci[scipy_opt.linear_sum_assignment(ci)].sum() for ci in cost])


def _rounds(n, provider):
    if n >= 2048:
        return 3
    if n >= 1024:
        return 5 if provider == "scipy" else 10
    return 20 if n >= 256 else 100


def _single(provider, cost):
    if provider == "scipy":
        return lambda: scipy_opt.linear_sum_assignment(cost)
    if provider == "lapjvh":
        return lambda: lap.lapjvh(cost, return_cost=False)
    return lambda: linear_sum_assignment(cost, threads=1)


def _total(cost, rows, cols):
    return cost[np.asarray(rows), np.asarray(cols)].sum()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_single(benchmark, family, n, provider):
    if provider == "lapjvh" and lap is None:
        pytest.skip("lapx is not installed")
    benchmark.group = f"assign {family} N={n}"
    benchmark.extra_info.update(provider=provider, family=family, n=n, threads=1)
    cost = _problem(family, n)
    fn = _single(provider, cost)
    rows, cols = fn()
    ref = _scipy_total(family, n)
    assert abs(_total(cost, rows, cols) - ref) <= 1e-9 * abs(ref), (provider, _total(cost, rows, cols), ref)
    benchmark.pedantic(fn, rounds=_rounds(n, provider), iterations=1, warmup_rounds=1)


def _batch(provider, cost):
    if provider == "scipy":
        return lambda: [scipy_opt.linear_sum_assignment(c) for c in cost]
    if provider == "lapjvh":
        return lambda: lap.lapjvh_batch(cost, return_cost=False, n_threads=THREADS)
    return lambda: assign(cost)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("family", ("unif", "sq3072"))
def test_batch(benchmark, family, provider):
    if provider == "lapjvh" and (lap is None or not hasattr(lap, "lapjvh_batch")):
        pytest.skip("lapx with lapjvh_batch is not installed")
    benchmark.group = f"assign batch {family} {BATCH}x{BATCH_N}"
    threads = 1 if provider == "scipy" else THREADS
    benchmark.extra_info.update(provider=provider, family=family, n=BATCH_N, batch=BATCH, threads=threads)
    cost = _problem(family, BATCH_N, BATCH)
    fn = _batch(provider, cost)
    out = fn()
    if provider == "scipy":
        totals = np.array([_total(c, *rc) for c, rc in zip(cost, out)])
    elif provider == "lapjvh":
        totals = np.array([_total(c, r, k) for c, r, k in zip(cost, *out)])
    else:
        totals = np.array([c[np.arange(BATCH_N), a].sum() for c, a in zip(cost, out)])
    ref = _scipy_total(family, BATCH_N, BATCH)
    np.testing.assert_allclose(totals, ref, rtol=1e-9)
    benchmark.pedantic(fn, rounds=10, iterations=1, warmup_rounds=1)
