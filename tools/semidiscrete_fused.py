"""Semidiscrete assignment on the fused C++ kernel vs the torch tiles vs the GEMM alone (one thread, CPU seconds).

Run by hand: ``python tools/semidiscrete_fused.py`` (bench/RESULTS.md, the summary row of issues 32 and 37).
"""

import time

import torch

from loom_kernels.streamed import disabled, sq_norms, streamed_argmin

N, D, B = 50_000, 784, 256


def median_cpu_seconds(fn, rounds=3):
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, z, g = torch.randn(N, D), torch.randn(B, D), torch.randn(N)
    xx = sq_norms(x, "cpu")
    fused = median_cpu_seconds(lambda: streamed_argmin(z, x, g, x_sqnorm=xx))
    with disabled():
        tiles = median_cpu_seconds(lambda: streamed_argmin(z, x, g, x_sqnorm=xx))
        ref = streamed_argmin(z, x, g, x_sqnorm=xx)[1]
    gemm = median_cpu_seconds(lambda: torch.mm(z, x.T))
    same = float((streamed_argmin(z, x, g, x_sqnorm=xx)[1] == ref).float().mean())
    print(
        f"b={B} N={N} D={D}, one thread, CPU seconds (median of 3): fused kernel {fused:.3f} s, torch tiles "
        f"{tiles:.3f} s, torch.mm {gemm:.3f} s; fused/mm {fused / gemm:.2f}, tiles/mm {tiles / gemm:.2f}; "
        f"same indices on both paths {same:.4f}"
    )


if __name__ == "__main__":
    main()
