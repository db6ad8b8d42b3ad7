"""The auction's schedule constants against its step count: rebuilds the CPU twin with other
values of LOOM_AUCTION_THETA (ε divisor per phase) and LOOM_AUCTION_SAP_SWITCH (bidders left when
the path finish starts; 0 = bidding only) and counts the sequential steps (bidding rounds + path
sweeps) of the slowest problem of the coupling's 64 x 256 batch (``sq3072``, float32, tol 1e-6).
A batch on the GPU takes as long as its slowest problem. Needs g++ and the csrc/ sources.

    python tools/auction_tuning.py [--theta 4 8 16] [--switch 0 1 3 6] [--batch 64]
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from loom_kernels.testing import assignment_problem

CSRC = Path(__file__).resolve().parents[1] / "csrc"
WRAPPER = """
#include "cpu/auction_cpu.h"
extern "C" void solve_f32(const float* c, int64_t B, int64_t N, int64_t M, double tol, int64_t* col,
                          int8_t* st, int64_t* rounds) {
  loom::auction_solve_batch<float>(c, B, N, M, false, tol, col, st, rounds, 0);
}
"""


def build(theta, switch, workdir):
    src = Path(workdir) / "wrapper.cpp"
    src.write_text(WRAPPER)
    so = Path(workdir) / f"twin_{theta}_{switch}.so"
    subprocess.run(
        [
            "g++",
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-pthread",
            f"-I{CSRC}",
            f"-DLOOM_AUCTION_THETA={float(theta)}",
            f"-DLOOM_AUCTION_SAP_SWITCH={int(switch)}",
            str(src),
            str(CSRC / "cpu" / "auction_cpu.cpp"),
            "-o",
            str(so),
        ],
        check=True,
    )
    return ctypes.CDLL(str(so))


def steps(lib, cost):
    B, N, M = cost.shape
    col = np.empty((B, N), np.int64)
    st = np.empty(B, np.int8)
    rounds = np.empty(B, np.int64)
    p = [a.ctypes.data_as(ctypes.c_void_p) for a in (cost, col, st, rounds)]
    lib.solve_f32(
        p[0], ctypes.c_int64(B), ctypes.c_int64(N), ctypes.c_int64(M), ctypes.c_double(1e-6), p[1], p[2], p[3]
    )
    if np.any(st != 0):
        raise SystemExit(f"status {np.unique(st)}")
    return rounds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--theta", type=float, nargs="+", default=[4, 8, 16])
    ap.add_argument("--switch", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    cost = np.ascontiguousarray(
        assignment_problem("sq3072", 256, batch=args.batch, rng=np.random.default_rng(0), dtype=np.float32)
    )
    print("| theta | switch | steps max | steps mean |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for theta in args.theta:
            for switch in args.switch:
                r = steps(build(theta, switch, tmp), cost)
                print(f"| {theta:g} | {switch} | {r.max()} | {r.mean():.0f} |", flush=True)


if __name__ == "__main__":
    main()
