"""Test-side helpers for the distributed tests: run a body on W spawned gloo ranks of this machine and
collect each rank's result (or every rank's traceback) in the parent."""
from __future__ import annotations

import datetime
import multiprocessing
import os
import traceback

import torch

TIMEOUT_S = 120


def run_rank(rank, world, store, out_dir, body):
    """In a spawned rank: join the gloo group (one thread), save ``body()`` to ``out_dir/rank{rank}.pt``
    and leave; a failure's traceback goes to ``rank{rank}.err`` for the parent to report."""
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.save(body(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn(world, out, target, extra=()):
    """Run ``target(rank, world, store, out_dir, *extra)`` (a module-level function that calls
    ``run_rank``) on ``world`` spawned processes; return the ranks' results in rank order.

    ``out`` is a pathlib directory (the file store and the results live there). Fails the test when a
    rank times out (``TIMEOUT_S``), raises or exits non-zero, with every rank's traceback.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, str(out / "store"), str(out), *extra))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    errs = [(out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()]
    assert not alive, f"distributed workers timed out after {TIMEOUT_S}s"
    assert not errs and all(p.exitcode == 0 for p in procs), errs
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
