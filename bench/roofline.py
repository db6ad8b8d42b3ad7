"""How far each CPU kernel is from what this machine can do: a roofline table.

First the machine, with micro-kernels of the C++ module (csrc/cpu/stream_cpu.cpp, the same vector
width and exp polynomial as the streamed kernel): exp throughput (exps/s over L1-resident data),
float32 FMA throughput (independent chains in registers) and read bandwidth (a 256 MiB sweep).
Then each kernel's time, its floor and the fraction floor / time:

- floor = max(compute, memory), compute = exps / exp rate + FMAs / FMA rate (the exp polynomial
  runs on the same FMA pipes as the products, so the two add), memory = bytes / bandwidth;
- cost (``pairwise_cost``, b x b at D): b^2 D FMAs, b^2 x 4 bytes written;
- noise (``gaussian_noise``): bytes written (Philox is integer work: the floor is a lower bound);
- LSA (``linear_sum_assignment``): no roofline bound (combinatorial), time only;
- the streamed pass (``streamed.lse`` / ``argmax``, n = m): n m D FMAs (+ n m exps for the LSE);
- the semidiscrete assignment (``streamed_argmin``, b = 256 against N = 50,000, D = 784): b N D FMAs.

Times are CPU seconds of the process (``time.process_time``): on a machine shared with other jobs
that is what the kernel cost, where wall time also counts waiting for a core. With --threads 2
the wall time is printed too. Median of --reps runs.

    PYTHONPATH=src python bench/roofline.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from loom_kernels import _native, streamed
from loom_kernels.assign import linear_sum_assignment
from loom_kernels.cost import pairwise_cost
from loom_kernels.noise import gaussian_noise

_C = _native.cpu()


def machine(threads: int) -> dict:
    """Peak rates of one thread, scaled by the thread count (each thread runs the micro-kernel alone)."""
    exp_n, exp_reps = 4096, 4000
    exp_rate = max(exp_n * exp_reps / _C.roofline_exp(exp_n, exp_reps) for _ in range(3))
    fma_reps = 100000
    fma_rate = max(fma_reps * _C.roofline_fma_per_rep() / _C.roofline_fma(fma_reps) for _ in range(3))
    buf = np.ones(64 << 20, dtype=np.float32)  # 256 MiB: far beyond the caches
    bw = max(buf.nbytes * 2 / _C.roofline_read(buf, 2) for _ in range(3))
    return {"exp": exp_rate * threads, "fma": fma_rate * threads, "bw": bw, "isa": _C.isa()}


def timed(fn, reps: int):
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def floor(peaks, exps=0.0, fmas=0.0, nbytes=0.0):
    return max(exps / peaks["exp"] + fmas / peaks["fma"], nbytes / peaks["bw"])


def kernels(n: int, threads: int):
    """(name, fn, floor-args or None) for each kernel of the table."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for d in (2, 64):
        x, y = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g)
        u, s = torch.randn(1, n, generator=g), torch.full((1,), 0.5)
        nbytes = (2 * n * d + n) * 4
        rows.append(
            (
                f"streamed LSE n=m={n} D={d}",
                lambda x=x, y=y, u=u, s=s: streamed.lse(x, y, u, s, threads),
                dict(exps=n * n, fmas=n * n * d, nbytes=nbytes),
            )
        )
        rows.append(
            (
                f"streamed argmax n=m={n} D={d}",
                lambda x=x, y=y, u=u, s=s: streamed.argmax(x, y, u, s, threads=threads),
                dict(fmas=n * n * d, nbytes=nbytes),
            )
        )
        ki = torch.randint(0, 2**32, (1, n), generator=g)
        kj = torch.randint(0, 2**32, (n,), generator=g)
        rows.append(
            (
                f"streamed Gumbel-max n=m={n} D={d}",
                lambda x=x, y=y, u=u, s=s, ki=ki, kj=kj: streamed.argmax(x, y, u, s, ki, kj, threads),
                dict(exps=2 * n * n, fmas=n * n * d, nbytes=nbytes),
            )  # two logs per entry, counted as exps
        )
    z, data, pot = torch.randn(256, 784, generator=g), torch.randn(50000, 784, generator=g), torch.randn(50000)
    rows.append(
        (
            "semidiscrete argmin b=256 N=50000 D=784",
            lambda: streamed.streamed_argmin(z, data, pot, threads=threads),
            dict(fmas=256 * 50000 * 784, nbytes=50000 * 784 * 4),
        )
    )
    xb, yb = torch.randn(1024, 3072, generator=g), torch.randn(1024, 3072, generator=g)
    rows.append(
        ("cost b=1024 D=3072", lambda: pairwise_cost(xb, yb), dict(fmas=1024 * 1024 * 3072, nbytes=1024 * 1024 * 4))
    )
    seeds = torch.arange(256)
    rows.append(("noise 256 x 3072 normals", lambda: gaussian_noise(seeds, (3072,)), dict(nbytes=256 * 3072 * 4)))
    c = torch.rand(512, 512, generator=g, dtype=torch.float64)
    rows.append(("LSA 512 x 512 (exact)", lambda: linear_sum_assignment(c), None))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peaks = machine(args.threads)
    print(
        f"machine ({args.threads} thread(s), {peaks['isa']}): exp {peaks['exp'] / 1e9:.2f} G/s, "
        f"FMA {peaks['fma'] / 1e9:.1f} G/s ({2 * peaks['fma'] / 1e9:.0f} GFLOP/s), read {peaks['bw'] / 1e9:.1f} GB/s"
    )
    print("| kernel | time (CPU s) | wall s | floor s | floor / time |\n|---|---|---|---|---|")
    for name, fn, work in kernels(args.n, args.threads):
        fn()  # warm
        cpu, wall = timed(fn, args.reps)
        per_thread = cpu / max(1, args.threads)  # CPU seconds spread over the threads
        if work is None:
            print(f"| {name} | {cpu:.4f} | {wall:.4f} | no bound | - |")
        else:
            fl = floor(peaks, **work)
            print(f"| {name} | {cpu:.4f} | {wall:.4f} | {fl:.4f} | {fl / per_thread:.2f} |")


if __name__ == "__main__":
    main()
