"""SinkhornCoupling(scope="global") on W gloo ranks against one process on the concatenated batch.

Issue 25's number: W = 4, b = 1,024 per rank, against a one-process solve of the 4,096 items (the same
epsilon, tolerance and pairs by argmax, so the results compare exactly). Each rank and the single
process run with one thread; timings are medians of ``--repeats`` calls after one warm-up, measured in
the same run. Also reported: the all-reduce share of each rank's time, the bytes each rank sent, and
whether the ranks' pairs equal the one-process pairs. pytest-benchmark cannot drive four processes,
hence a script:

    python tools/sinkhorn_global.py --world 4 --b 1024 --dim 64
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch


def _data(n, d):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g).tanh(), torch.randn(n, d, generator=g)


def _coupling(eps, tol):
    from loom_kernels.couplings import SinkhornCoupling

    return SinkhornCoupling(eps, argmax=True, tol=tol, max_iter=100000)


def _rank(rank, world, store, args, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from loom_kernels.couplings import sinkhorn as mod
    from loom_kernels.couplings.scopes.group import count_bytes

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    x1, x0 = _data(world * args.b, args.dim)
    sl = slice(rank * args.b, (rank + 1) * args.b)
    c = _coupling(args.eps, args.tol)
    comm = [0.0]
    real = mod._AllReduce._reduce

    def timed(self, t, op):
        t0 = time.perf_counter()
        out = real(self, t, op)
        comm[0] += time.perf_counter() - t0
        return out

    mod._AllReduce._reduce = timed
    out = c(x1[sl], x0=x0[sl])[0]  # warm-up
    times, comms = [], []
    for _ in range(args.repeats):
        dist.barrier()
        comm[0] = 0.0
        with count_bytes() as cb:
            t0 = time.perf_counter()
            out = c(x1[sl], x0=x0[sl])[0]
            times.append(time.perf_counter() - t0)
        comms.append(comm[0])
    queue.put((rank, times, comms, cb["sent"], int(c.stats["iterations"]), out.numpy()))  # by value, not an fd
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--b", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n = args.world * args.b
    x1, x0 = _data(n, args.dim)
    one = _coupling(args.eps, args.tol)
    ref = one(x1, x0=x0)[0]
    single = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = one(x1, x0=x0)[0]
        single.append(time.perf_counter() - t0)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, args.world, os.path.join(tmp, "store"), args, queue))
            for r in range(args.world)
        ]
        for pr in procs:
            pr.start()
        res = sorted(queue.get(timeout=1800) for _ in procs)
        for pr in procs:
            pr.join()
    outs = torch.cat([torch.from_numpy(r[5]) for r in res])
    slowest = max(statistics.median(r[1]) for r in res)
    comm = max(statistics.median(r[2]) for r in res)
    one_med = statistics.median(single)
    print(
        f"W={args.world} b={args.b} D={args.dim} eps={args.eps} tol={args.tol} iterations: one process "
        f"{int(one.stats['iterations'])}, ranks {[r[4] for r in res]}"
    )
    print(f"one process, {n} items, 1 thread: median {one_med:.3f} s over {args.repeats}")
    print(
        f"global scope, slowest rank (1 thread each, {os.cpu_count()} cores): median {slowest:.3f} s "
        f"(all-reduce/gather time inside: {comm:.3f} s); ratio to one process {slowest / one_med:.2f}x; "
        f"ratio of (rank time - comm) to one process {(slowest - comm) / one_med:.2f}x"
    )
    print(
        f"bytes sent per rank per call: {res[0][3]:,}; pairs equal to one process: {torch.equal(outs, ref)} "
        f"({int((outs != ref).any(-1).sum())} rows differ)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
