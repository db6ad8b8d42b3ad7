"""Per-step time and bytes per rank against W for scope = global, local and grouped (gloo, CPU ranks).

A script, not a pytest-benchmark module: each world size needs its own set of processes. Every rank runs
the same LoomCoupling step loop on its slice of a shared data stream; the step time is the slowest rank's
median (after a warm-up step), bytes are counted from the collectives (``count_bytes``), per rank per step.
One process per rank, one thread each: with W > cores the ranks share the cores, so absolute times grow
with W for every scope; compare scopes within one W.

``--tables replicated sharded`` times both seed tables (``LoomCoupling(table=...)``) for each scope.
``--big-table N`` instead times an ``N``-row table (K = 1) kept in RAM, memory-mapped, and sharded over 2 gloo
ranks: create, one step (median of 3 after a warm-up), save, load, and the peak RSS of each process (each
kind runs in fresh processes).

Run: ``PYTHONPATH=. python bench/bench_scaling.py --worlds 2 4 8 --b 256 --group-size 512``
     ``PYTHONPATH=. python bench/bench_scaling.py --big-table 100000000 --big-dir /tmp/bigtable``
"""

import argparse
import datetime
import multiprocessing
import os
import resource
import shutil
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
    from loom_kernels.couplings.scopes.group import count_bytes

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800)
    )
    b, n_points = args.b, 4 * world * args.b
    g = torch.Generator().manual_seed(0)
    data = torch.rand((n_points, *SHAPE), generator=g)
    out = {}
    for scope, table in ((s, t) for s in args.scopes for t in args.tables):
        c = LoomCoupling(n_points, SHAPE, num_caches=args.caches, scope=scope, group_size=args.group_size, table=table)
        times, nbytes = [], None
        for step in range(args.steps + 1):
            idx = torch.randperm(n_points, generator=g)[: world * b][rank * b : (rank + 1) * b]
            x1 = data[idx]
            dist.barrier()
            with count_bytes() as cnt:
                t0 = time.perf_counter()
                c(x1, idx)
                times.append(time.perf_counter() - t0)
            nbytes = cnt if step == 1 else nbytes
        out[scope, table] = (statistics.median(times[1:]), nbytes["sent"], nbytes["received"])
    queue.put((rank, out))
    dist.destroy_process_group()


def run(world, args, target=_worker, extra=()):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=target, args=(r, world, os.path.join(tmp, "store"), args, queue, *extra))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        results = dict(queue.get() for _ in procs)
        for p in procs:
            p.join()
    return results


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _big_worker(rank, world, store, args, queue, kind):
    """One kind of big table: create, step, save, load; seconds and this process's peak RSS (GiB)."""
    torch.set_num_threads(1)
    from loom_kernels.couplings import LoomCoupling

    if kind == "sharded":
        import torch.distributed as dist

        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800)
        )
    n, d = args.big_table, os.path.join(args.big_dir, kind)
    os.makedirs(d, exist_ok=True)
    kw = {"sharded": {"table": "sharded"}, "mmap": {"mmap_path": os.path.join(d, "table.npy")}}.get(kind, {})
    c, t_create = _timed(lambda: LoomCoupling(n, SHAPE, seed=1, scope="grouped", overwrite=True, **kw))
    g = torch.Generator().manual_seed(rank)
    x1 = torch.rand((args.b, *SHAPE), generator=g)
    steps = []
    for _ in range(4):
        idx = torch.randint(n // 1000, (1,)).item() * 1000 + torch.randperm(1000 * world)[: world * args.b]
        idx = (idx % n)[rank * args.b : (rank + 1) * args.b]
        t0 = time.perf_counter()
        c(x1, idx)
        steps.append(time.perf_counter() - t0)
    _, t_save = _timed(lambda: c.save(os.path.join(d, "ckpt.pt")))
    c.close()
    c = None  # frees the table before the load
    _, t_load = _timed(lambda: LoomCoupling.load(os.path.join(d, "ckpt.pt")))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put((rank, (t_create, statistics.median(steps[1:]), t_save, t_load, rss)))
    if kind == "sharded":
        dist.destroy_process_group()


def big_table(args):
    print(
        f"# {args.big_table:,}-row seed table (K = 1, {8 * args.big_table / 2**30:.2f} GiB), D=3072, b={args.b}, "
        f"scope=grouped, {os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}"
    )
    print("| table | ranks | create s | step ms | save s | load s | peak RSS GiB / process |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, world in (("ram", 1), ("mmap", 1), ("sharded", 2)):
        res = run(world, args, _big_worker, (kind,))
        worst = [max(res[r][j] for r in res) for j in range(5)]
        print(
            f"| {kind} | {world} | {worst[0]:.1f} | {1e3 * worst[1]:.0f} | {worst[2]:.1f} | {worst[3]:.1f} | "
            f"{worst[4]:.2f} |",
            flush=True,
        )
        shutil.rmtree(os.path.join(args.big_dir, kind), ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=512)
    ap.add_argument("--caches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scopes", nargs="+", default=["global", "local", "grouped"])
    ap.add_argument("--tables", nargs="+", default=["replicated"], choices=["replicated", "sharded"])
    ap.add_argument("--big-table", type=int, default=0, help="time an N-row table instead (see above)")
    ap.add_argument("--big-dir", default=os.path.join(tempfile.gettempdir(), "loom_bigtable"))
    args = ap.parse_args()
    if args.big_table:
        return big_table(args)
    d = 1
    for s in SHAPE:
        d *= s
    print(
        f"# LoomCoupling step, D={d}, b={args.b}, G={args.group_size}, K={args.caches}, gloo, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}"
    )
    print("| W | scope | table | step ms (slowest rank, median) | sent KiB/rank | received KiB/rank (max) |")
    print("|---|---|---|---|---|---|")
    for world in args.worlds:
        res = run(world, args)
        for key in ((s, t) for s in args.scopes for t in args.tables):
            t = max(res[r][key][0] for r in res)
            sent = max(res[r][key][1] for r in res) / 1024
            recv = max(res[r][key][2] for r in res) / 1024
            print(f"| {world} | {key[0]} | {key[1]} | {1e3 * t:.0f} | {sent:.0f} | {recv:.0f} |", flush=True)


if __name__ == "__main__":
    main()
