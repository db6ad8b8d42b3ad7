"""Interleaved timing of every flow matcher, ours against torchcfm's, call by call (robust to a loaded machine).

pytest-benchmark times one provider after the other; on a shared machine the load changes between
the two. Here the providers take turns (the order alternating every round) on the batch of
bench/bench_compat_matchers.py, one thread, and the medians and minima are compared.

Run: ``OMP_NUM_THREADS=1 python tools/compare_compat_matchers.py --rounds 40``
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/, for the shared problem factory
from bench_compat_matchers import MATCHERS, _problem  # noqa: E402

import loom_kernels.compat.torchcfm as ours  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    import torchcfm.conditional_flow_matching as theirs

    torch.set_num_threads(1)
    x0, x1 = _problem()
    print("| matcher | loom median ms | torchcfm median ms | ratio (medians) | loom min ms | torchcfm min ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, (name, kwargs) in MATCHERS.items():
        fms = [("loom", getattr(ours, name)(**kwargs)), ("torchcfm", getattr(theirs, name)(**kwargs))]
        times = {k: [] for k, _ in fms}
        for r in range(args.rounds):
            for k, fm in fms if r % 2 == 0 else fms[::-1]:
                np.random.seed(r)
                t0 = time.perf_counter()
                fm.sample_location_and_conditional_flow(x0, x1)
                times[k].append((time.perf_counter() - t0) * 1e3)
        lo, th = np.array(times["loom"]), np.array(times["torchcfm"])
        print(
            f"| {key} | {np.median(lo):.2f} | {np.median(th):.2f} | {np.median(th) / np.median(lo):.2f} | "
            f"{lo.min():.2f} | {th.min():.2f} |"
        )


if __name__ == "__main__":
    main()
