"""Per-step time and bytes per rank against W for scope = global, local and grouped (gloo, CPU ranks).

A script, not a pytest-benchmark module: each world size needs its own set of processes. Every rank runs
the same LoomCoupling step loop on its slice of a shared data stream; the step time is the slowest rank's
median (after a warm-up step), bytes are counted from the collectives (``count_bytes``), per rank per step.
One process per rank, one thread each: with W > cores the ranks share the cores, so absolute times grow
with W for every scope; compare scopes within one W.

Run: ``PYTHONPATH=. python bench/bench_scaling.py --worlds 2 4 8 --b 256 --group-size 512``
"""
import argparse
import datetime
import multiprocessing
import os
import statistics
import tempfile
import time

import torch

SHAPE = (3, 32, 32)


def _worker(rank, world, store, args, queue):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from loom_kernels.couplings import LoomCoupling
    from loom_kernels.couplings.distributed import count_bytes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    b, n_points = args.b, 4 * world * args.b
    g = torch.Generator().manual_seed(0)
    data = torch.rand((n_points, *SHAPE), generator=g)
    out = {}
    for scope in args.scopes:
        c = LoomCoupling(n_points, SHAPE, num_caches=args.caches, scope=scope, group_size=args.group_size)
        times, nbytes = [], None
        for step in range(args.steps + 1):
            idx = torch.randperm(n_points, generator=g)[: world * b][rank * b:(rank + 1) * b]
            x1 = data[idx]
            dist.barrier()
            with count_bytes() as cnt:
                t0 = time.perf_counter()
                c(x1, idx)
                times.append(time.perf_counter() - t0)
            nbytes = cnt if step == 1 else nbytes
        out[scope] = (statistics.median(times[1:]), nbytes["sent"], nbytes["received"])
    queue.put((rank, out))
    dist.destroy_process_group()


def run(world, args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=512)
    ap.add_argument("--caches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scopes", nargs="+", default=["global", "local", "grouped"])
    args = ap.parse_args()
    d = 1
    for s in SHAPE:
        d *= s
    print(f"# LoomCoupling step, D={d}, b={args.b}, G={args.group_size}, K={args.caches}, gloo, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}")
    print("| W | scope | step ms (slowest rank, median) | sent KiB/rank | received KiB/rank (max) |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        res = run(world, args)
        for scope in args.scopes:
            t = max(res[r][scope][0] for r in res)
            sent = max(res[r][scope][1] for r in res) / 1024
            recv = max(res[r][scope][2] for r in res) / 1024
            print(f"| {world} | {scope} | {1e3 * t:.0f} | {sent:.0f} | {recv:.0f} |", flush=True)


if __name__ == "__main__":
    main()
