"""Sequential steps of the auction per problem, counted by its CPU twin, as one markdown table.

On the GPU a bidding round or a sweep of the path finish is one latency-bound step of a thread
block, so the slowest problem's count times the step latency bounds a batch's time; the GPU
reproduces the twin's count exactly (test_auction.py, ``cuda`` tests). Problems: the coupling's
squared-Euclidean cost (noise vs data-like points, D=3072, float32, ``testing.assignment_problem``
family ``sq3072``) and the other benchmark families, tol 1e-6 as ``assign`` uses for float32.

    python tools/auction_rounds.py            # the table of bench/RESULTS.md (N=8192 takes minutes)
    python tools/auction_rounds.py --quick    # without the N >= 4096 problems
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from loom_kernels import _native
from loom_kernels.testing import assignment_problem

PROBLEMS = [  # (family, batch, N, M)
    ("sq3072", 64, 256, 256),
    ("unif", 64, 256, 256),
    ("sq2", 64, 256, 256),
    ("sq3072", 8, 64, 1024),
    ("sq3072", 8, 200, 256),
    ("unif", 16, 190, 256),
    ("sq3072", 1, 1024, 1024),
    ("sq3072", 1, 2048, 2048),
    ("sq3072", 1, 4096, 4096),
    ("sq3072", 1, 8192, 8192),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip N >= 4096")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    solve = _native.cpu().solve_auction
    print("| problem | batch | rounds max | rounds mean | twin CPU s |")
    print("|---|---:|---:|---:|---:|")
    for family, batch, n, m in PROBLEMS:
        if args.quick and n >= 4096:
            continue
        rng = np.random.default_rng(args.seed)
        cost = assignment_problem(family, n, m, batch=batch, rng=rng, dtype=np.float32)
        t0 = time.perf_counter()
        _, status, rounds = solve(cost, False, 1e-6, 0, True)
        dt = time.perf_counter() - t0
        if np.any(status != 0):
            raise SystemExit(f"{family} {n}x{m}: status {np.unique(status)}")
        print(f"| {family} {n}x{m} | {batch} | {rounds.max()} | {rounds.mean():.0f} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    main()
