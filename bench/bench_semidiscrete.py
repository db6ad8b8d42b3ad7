"""The streamed assignment of semidiscrete OT and nearest-of-k noise, each beside its floor, same run.

- assignment: ``streamed_argmin`` of b = 256 fresh noises against N = 50,000 items (D = 784, 3,072) vs
  ``torch.mm`` of the same shapes (the cost GEMM every assignment must at least compute);
- KNN: ``KNNNoiseCoupling(16)`` at b = 256, D = 3,072 (draw + nearest) vs drawing the 16 * 256 candidates
  (``torch.randn``); the seeded mode ``KNNNoiseCoupling(16, noise="seeds")`` (the fused C++ pass, then the
  256 winners drawn again) vs ``gaussian_noise`` of the 4,096 seeds (the same generator);
- fit (script mode only): the potential's ascent on N items of D = 784, the RMS cell-mass deviation over time.

    OMP_NUM_THREADS=2 python -m pytest bench/bench_semidiscrete.py --benchmark-columns=median,iqr,rounds
    python bench/bench_semidiscrete.py            # the same medians as a table, plus the fit
    python bench/bench_semidiscrete.py --fit-n 5000 --fit-seconds 300
    python bench/bench_semidiscrete.py --knn-only  # the KNN medians, the seeded pair interleaved
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from loom_kernels.couplings.knn import KNNNoiseCoupling
from loom_kernels.noise import gaussian_noise
from loom_kernels.streamed import sq_norms, streamed_argmin

N, B, K = 50_000, 256, 16


def _data(n, d):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, d, generator=g) * 2 - 1, torch.randn(B, d, generator=g), torch.randn(n, generator=g)


def _assign(x, z, g, xx):
    return streamed_argmin(z, x, g, x_sqnorm=xx)


def _gemm(x, z, g, xx):  # noqa: ARG001 - the same signature
    return torch.mm(z, x.T)


def _knn(z1, gen):
    return KNNNoiseCoupling(K, generator=gen)(z1)


def _draw(z1, gen):
    return torch.randn((K * z1.shape[0], z1.shape[1]), generator=gen)


def _knn_seeds(z1, gen):  # draws its 4,096 seeds from gen (torch.randint), as a training step would
    return KNNNoiseCoupling(K, noise="seeds", generator=gen)(z1)


def _draw_seeds(z1, gen):
    seeds = torch.randint(0, 2**63 - 1, (K * z1.shape[0],), generator=gen)
    return gaussian_noise(seeds, (z1.shape[1],))


@pytest.mark.parametrize("d", [784, 3072])
@pytest.mark.parametrize("fn", [_assign, _gemm], ids=["streamed_argmin", "torch.mm"])
def test_assignment(benchmark, fn, d):
    x, z, g = _data(N, d)
    xx = sq_norms(x, "cpu")
    benchmark.pedantic(fn, args=(x, z, g, xx), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize(
    ("fn", "rounds"),
    [(_knn, 9), (_draw, 9), (_knn_seeds, 41), (_draw_seeds, 41)],
    ids=["knn16", "draw16", "knn16_seeds", "draw16_seeds"],
)
def test_knn(benchmark, fn, rounds):
    z1, gen = torch.randn(B, 3072), torch.Generator().manual_seed(0)
    benchmark.pedantic(fn, args=(z1, gen), rounds=rounds, warmup_rounds=2)


def _median(fn, *args, rounds=5):
    fn(*args)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _interleaved(fns, args, rounds):
    """Median seconds of each of fns, called in turn round after round (a load change hits all alike)."""
    for fn in fns:
        fn(*args)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn(*args)
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def knn_medians():
    z1, gen = torch.randn(B, 3072), torch.Generator().manual_seed(0)
    kn, dr = _median(_knn, z1, gen, rounds=9), _median(_draw, z1, gen, rounds=9)
    print(f"knn k={K} b={B} D=3072: {kn * 1e3:.1f} ms, drawing the candidates {dr * 1e3:.1f} ms, {kn / dr:.2f}x")
    ks, ds = _interleaved([_knn_seeds, _draw_seeds], (z1, gen), rounds=101)
    print(f"knn seeds: {ks * 1e3:.2f} ms, gaussian_noise of the seeds {ds * 1e3:.2f} ms, {ks / ds:.2f}x (interleaved)")


def fit_curve(n: int, d: int, seconds: float, batch: int = 256):
    """(fit seconds, steps, mass_dev) until ``seconds`` of fitting: ``mass_dev`` measured on ``4 N`` fresh
    noises with the fitted ``g`` held fixed (``mass_deviation``; its time is not counted). The fit's own
    window estimate is optimistic: the iterate reacts to the counts it is measured on."""
    from loom_kernels.couplings.semidiscrete import SemidiscreteCoupling
    from loom_kernels.couplings.semidiscrete_fit import mass_deviation

    x, _, _ = _data(n, d)
    sd = SemidiscreteCoupling(x, seed=0)
    window = max(1, -(-8 * n // batch))
    spent, out = 0.0, []
    while spent < seconds:
        t = time.perf_counter()
        sd.fit(window, tol=None, batch_size=batch, window=window, progress=False)  # timed: no checks
        spent += time.perf_counter() - t
        rep = mass_deviation(sd, 4 * n)
        out.append((spent, sd.fit_steps, rep["mass_dev"], rep["mass_dev_floor"]))
        dev, floor = rep["mass_dev"], rep["mass_dev_floor"]
        print(f"  {spent:7.1f} s  step {sd.fit_steps:6d}  mass_dev {dev:.4f} (floor {floor:.4f})")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fit-n", type=int, default=5000)
    p.add_argument("--fit-d", type=int, default=784)
    p.add_argument("--fit-seconds", type=float, default=240)
    p.add_argument("--skip-assign", action="store_true")
    p.add_argument("--knn-only", action="store_true", help="only the KNN medians (no assignment, no fit)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for d in () if args.skip_assign or args.knn_only else (784, 3072):
        x, z, g = _data(N, d)
        xx = sq_norms(x, "cpu")
        a, m = _median(_assign, x, z, g, xx), _median(_gemm, x, z, g, xx)
        print(f"assign b={B} N={N} D={d}: streamed {a * 1e3:.0f} ms, torch.mm {m * 1e3:.0f} ms, ratio {a / m:.2f}")
        del x
    if not args.skip_assign:
        knn_medians()
    if args.knn_only:
        return
    print(f"fit N={args.fit_n} D={args.fit_d} b=256 ({args.fit_seconds:.0f} s budget):")
    fit_curve(args.fit_n, args.fit_d, args.fit_seconds)


if __name__ == "__main__":
    main()
