"""The multi-process harness of the tests: run a body on W spawned gloo ranks of this machine and collect
each rank's result (or every rank's traceback) in the parent (``spawn`` + ``run_rank``); or, where a rank
must be a whole interpreter (a script's own process group, a signal to one rank), launch W copies of a
script (``launch``) on a free port (``free_port``, also what torchrun's --master_port gets)."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import subprocess
import sys
import time
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

        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
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
    procs = [ctx.Process(target=target, args=(r, world, str(out / "store"), str(out), *extra)) for r in range(world)]
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


def free_port():
    """A TCP port of 127.0.0.1 free right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, argv, cwd, env=None, signal_rank=None, started=None, timeout=240):
    """Run ``python *argv`` as ``world`` processes in ``cwd``, each with RANK, PORT (one free port for all)
    and OMP_NUM_THREADS=1 in its environment (over ``env`` or os.environ); return ``(procs, outputs)`` (stdout
    and stderr together) once all have exited. With ``signal_rank``, SIGTERM goes to that rank alone as soon
    as the file ``started`` exists (or after 120 s, or when rank 0 exited). No process outlives the call."""
    port = str(free_port())
    base = dict(os.environ if env is None else env)
    procs = [
        subprocess.Popen(
            [sys.executable, *map(str, argv)],
            cwd=cwd,
            env=dict(base, RANK=str(r), PORT=port, OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        if signal_rank is not None:
            deadline = time.time() + 120
            while not os.path.exists(started) and time.time() < deadline and procs[0].poll() is None:
                time.sleep(0.05)
            procs[signal_rank].send_signal(15)
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs
