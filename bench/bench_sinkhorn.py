"""loom_kernels.sinkhorn against POT's log-domain Sinkhorn (``ot.bregman.sinkhorn_log`` on torch
tensors, the cost matrix formed by ``ot.dist``), same epsilon (absolute, 0.05 x the mean cost) and
the same stop value: ours stops on the relative L1 marginal error, POT on the L2 norm of the
column marginal error (checked every 10 iterations), and L1 >= L2, so ours stops no earlier.

    OMP_NUM_THREADS=2 python -m pytest bench/bench_sinkhorn.py --benchmark-columns=median,iqr,rounds
    python bench/bench_sinkhorn.py --memory      # n = m = 65,536, D = 64 on the CPU: peak RSS, time per pass
    python bench/bench_sinkhorn.py --equal-error --threads 1   # iterations and CPU time at equal error
"""

from __future__ import annotations

import pytest
import torch

from loom_kernels.sinkhorn import sinkhorn

EPS_REL = 0.05
TOL = 1e-3


def _problem(n, d, device="cpu"):
    """Data-like x1 (tanh of a Gaussian) and standard-normal x0: one factory for every provider."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g).tanh().to(device), torch.randn(n, d, generator=g).to(device)


def _ours(x, y, eps_abs):
    return sinkhorn(x, y, epsilon=eps_abs, relative=False, tol=TOL, max_iter=100000)


def _pot(x, y, eps_abs):
    import ot

    n, m = len(x), len(y)
    a = torch.full((n,), 1.0 / n, device=x.device)
    b = torch.full((m,), 1.0 / m, device=x.device)
    return ot.bregman.sinkhorn_log(a, b, ot.dist(x, y), eps_abs, stopThr=TOL, numItermax=100000)


def _mean_cost(x, y):
    xd, yd = x.double(), y.double()
    return float(
        ((xd - xd.mean(0)) ** 2).sum(1).mean()
        + ((yd - yd.mean(0)) ** 2).sum(1).mean()
        + ((xd.mean(0) - yd.mean(0)) ** 2).sum()
    )


PROVIDERS = {"loom.sinkhorn": _ours, "pot.sinkhorn_log": _pot}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("d", [2, 64])
def test_sinkhorn_cpu_4096(benchmark, provider, d):
    pytest.importorskip("ot")
    x, y = _problem(4096, d)
    eps = EPS_REL * _mean_cost(x, y)
    benchmark.group = f"sinkhorn cpu n=m=4096 D={d} eps=0.05*mean tol={TOL}"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    out = benchmark.pedantic(PROVIDERS[provider], args=(x, y, eps), rounds=3, warmup_rounds=0, iterations=1)
    if provider == "loom.sinkhorn":
        benchmark.extra_info.update(iterations=out.iterations, error=float(out.error))
        assert out.converged


@pytest.mark.parametrize("provider", ["loom.streamed", "torch tiles"])
@pytest.mark.parametrize("d", [2, 64])
def test_lse_pass_cpu_4096(benchmark, provider, d):
    """One streamed LSE pass (half an iteration): the C++ kernel against the torch tiles it replaced."""
    from loom_kernels import streamed
    from loom_kernels.sinkhorn import _tiles

    x, y = _problem(4096, d)
    geo = _tiles.PointTiles(x[None].contiguous(), y[None].contiguous())
    u, scale, _ = geo.terms(torch.zeros(1, 4096), torch.full((1, 1), EPS_REL * _mean_cost(x, y)))
    u, scale = u.contiguous(), scale.contiguous()
    benchmark.group = f"sinkhorn cpu LSE pass n=m=4096 D={d}"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    if provider == "loom.streamed":
        benchmark(streamed.lse, geo.x, geo.y, u, scale)
    else:
        benchmark(_tiles.row_lse, geo, u, scale)


# ---- GPU ----------------------------------------------------------------------------------------


def _cuda(fn, *args):
    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.cuda
@pytest.mark.parametrize("n", [16384, 65536])
def test_sinkhorn_cuda_solve_d64(benchmark, n):
    """The whole solve at eps = 0.05 x mean cost, tol 1e-3 (iterations in extra_info)."""
    x, y = _problem(n, 64, "cuda")
    eps = EPS_REL * _mean_cost(x, y)
    run = _cuda(_ours, x, y, eps)
    out = run()
    benchmark.group = f"sinkhorn cuda n=m={n} D=64 solve"
    benchmark.extra_info.update(provider="loom.sinkhorn", iterations=out.iterations)
    benchmark.pedantic(run, rounds=3, warmup_rounds=0, iterations=1)


@pytest.mark.cuda
def test_sinkhorn_cuda_pot_16384_d64(benchmark):
    pytest.importorskip("ot")
    x, y = _problem(16384, 64, "cuda")
    benchmark.group = "sinkhorn cuda n=m=16384 D=64 solve"
    benchmark.extra_info.update(provider="pot.sinkhorn_log")
    run = _cuda(_pot, x, y, EPS_REL * _mean_cost(x, y))
    run()
    benchmark.pedantic(run, rounds=3, warmup_rounds=0, iterations=1)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_sinkhorn_cuda_pass_65536_d64(benchmark, tf32):
    """One streamed LSE pass (half an iteration) at n = m = 65,536, D = 64."""
    from loom_kernels.sinkhorn._problem import Problem

    x, y = _problem(65536, 64, "cuda")
    prob = Problem(x=x, y=y, allow_tf32=tf32)
    g = torch.zeros(1, 65536, device="cuda")
    eps = torch.full((1, 1), EPS_REL * float(prob.mean_cost), device="cuda")
    run = _cuda(prob.lse, g, eps)
    run()
    benchmark.group = "sinkhorn cuda LSE pass n=m=65536 D=64"
    benchmark.extra_info.update(provider=f"loom ({'tf32' if tf32 else 'ieee'})")
    benchmark(run)


def _memory():
    """n = m = 65,536, D = 64 on the CPU: peak RSS above the inputs, and the time per LSE pass."""
    import resource
    import time

    from loom_kernels.sinkhorn._problem import Problem

    x, y = _problem(65536, 64)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    prob = Problem(x=x, y=y)
    g = torch.zeros(1, 65536)
    eps = torch.full((1, 1), EPS_REL * float(prob.mean_cost))
    t1 = time.perf_counter()
    f = prob.lse(g, eps)
    t2 = time.perf_counter()
    prob.lse(f, eps, transpose=True)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"inputs {2 * x.numel() * 4 / 2**20:.0f} MiB; peak RSS {peak:.0f} MiB, {peak - base:.0f} MiB above the "
        f"inputs (dense cost: {65536**2 * 4 / 2**30:.0f} GiB); setup {t1 - t0:.2f} s, row pass {t2 - t1:.1f} s, "
        f"column pass {t3 - t2:.1f} s (one iteration = both), threads {torch.get_num_threads()}"
    )


def _equal_error(threads: int):
    """n = m = 4,096, D = 2 and 64: POT ``sinkhorn_log`` at stopThr = TOL, then ours (i) at tol = TOL
    and (ii) at tol = the error POT's plan reached, in one measure: the L1 marginal error of the
    returned plan relative to the mass. POT's last update makes the rows exact and it stops on the
    L2 norm of the column error (every 10th iteration); ours makes the columns exact and stops on the
    L1 row error, measured every iteration. Times: process CPU seconds (the machine is shared)."""
    import time

    import ot

    torch.set_num_threads(threads)
    print(f"threads {threads}; eps = {EPS_REL} x mean cost (absolute for both), TOL = {TOL}")
    for d in (2, 64):
        x, y = _problem(4096, d)
        eps = EPS_REL * _mean_cost(x, y)
        n = len(x)
        a = torch.full((n,), 1.0 / n)
        c0 = time.process_time()
        plan, log = ot.bregman.sinkhorn_log(a, a, ot.dist(x, y), eps, stopThr=TOL, numItermax=100000, log=True)
        t_pot = time.process_time() - c0
        err_pot = float((plan.double().sum(0) - 1.0 / n).abs().sum())  # rows exact: the column L1 error
        del plan
        c0 = time.process_time()
        ours = _ours(x, y, eps)
        t_ours = time.process_time() - c0
        c0 = time.process_time()
        same = sinkhorn(x, y, epsilon=eps, relative=False, tol=err_pot, max_iter=100000)
        t_same = time.process_time() - c0
        print(
            f"D={d}: POT {t_pot:.2f} s, {log['niter'] + 1} it, L1 error {err_pot:.2e} (its L2 stop {TOL}) | "
            f"ours tol={TOL}: {t_ours:.2f} s, {ours.iterations} it, L1 error {float(ours.error):.2e}, "
            f"POT/ours {t_pot / t_ours:.2f}x | ours at POT's L1 error: {t_same:.2f} s, {same.iterations} it, "
            f"POT/ours {t_pot / t_same:.2f}x"
        )


if __name__ == "__main__":
    import sys

    if "--memory" in sys.argv:
        _memory()
    if "--equal-error" in sys.argv:
        _equal_error(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1)
