"""The trainer under DDP (2 gloo processes on the CPU): identical ranks, the global step, the mean loss, the
collective checkpoint, non-finite losses agreed on by every rank, SIGTERM on one rank, and the CLI under
torchrun. One launch of two processes runs several scenarios in turn (a launch costs seconds of imports)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loom_kernels.train import load_checkpoint

from gloo_ranks import launch

pytestmark = pytest.mark.distributed

_WORKER = textwrap.dedent(
    """
    import os, sys, time, datetime, torch
    import torch.distributed as dist
    from loom_kernels import data
    from loom_kernels.couplings import IndependentCoupling, LoomCoupling
    from loom_kernels.models import MLPVelocity
    from loom_kernels.train import TrainConfig, train
    rank, out, modes = int(os.environ["RANK"]), sys.argv[1], sys.argv[2].split(",")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))

    class NaNOnRank1(IndependentCoupling):  # a non-finite loss on one rank only, at its 3rd step
        calls = 0
        def __call__(self, x1, *, indices=None, labels=None):
            self.calls += 1
            x0, x1 = super().__call__(x1, indices=indices)
            return (x0 * float("nan") if rank == 1 and self.calls == 3 else x0), x1

    def cb(step, **kw):
        if rank == 0 and step == 3:
            open(os.path.join(out, "started"), "w").close()
        time.sleep(0.05)

    def setup():
        torch.manual_seed(0)
        return data.IndexedDataset(data.load("8gaussians", n=64, seed=0)), MLPVelocity((2,), hidden=16, depth=2,
                                                                                      time_dim=8)

    for mode in modes:
        ds, model = setup()
        if mode == "train":
            coupling = LoomCoupling(64, (2,), num_caches=2, seed=0, process_group=dist.group.WORLD)
            initial = coupling.seeds.clone()
            res = train(model, ds, coupling, TrainConfig(steps=10, batch_size=8, log_every=1, progress=False, seed=3,
                                                         out_dir=os.path.join(out, "train")))
            torch.save({"step": res.step, "params": res.model.state_dict(), "ema": res.ema.state_dict(),
                        "seeds": coupling.seeds.clone(), "initial": initial, "history": res.history},
                       os.path.join(out, f"train{rank}.pt"))
        elif mode == "sigterm":
            train(model, ds, IndependentCoupling(), TrainConfig(steps=100000, batch_size=8, progress=False, seed=3,
                  out_dir=os.path.join(out, "sigterm")), callback=cb, callback_every=1)
        elif mode == "skip":
            res = train(model, ds, NaNOnRank1(), TrainConfig(steps=6, batch_size=8, progress=False, seed=3,
                        nonfinite="skip"))
            torch.save({"skipped": res.skipped, "params": res.model.state_dict()}, os.path.join(out, f"skip{rank}.pt"))
        elif mode == "stop":
            try:
                train(model, ds, NaNOnRank1(), TrainConfig(steps=6, batch_size=8, progress=False, seed=3))
                msg = "no error"
            except FloatingPointError as e:
                msg = str(e)
            with open(os.path.join(out, f"stop{rank}.txt"), "w") as f:
                f.write(msg)
    dist.barrier()  # both ranks are past their last collective before the group goes away
    dist.destroy_process_group()
    sys.stdout.flush()
    # Leave without running C++ static destructors: gloo's transport threads can still be joinable at
    # interpreter exit, and std::thread's destructor then aborts the process (SIGABRT, "terminate called
    # without an active exception") after every result above is written and checked below.
    os._exit(0)
    """
)


def _two_ranks(tmp_path, modes, signal_rank=None):
    """Runs the worker's ``modes`` in turn on 2 gloo ranks; with signal_rank, sends SIGTERM to that rank
    alone once rank 0 passed step 3."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    return launch(2, [script, tmp_path, modes], tmp_path, signal_rank=signal_rank, started=tmp_path / "started")


def test_ddp_training_and_nonfinite_agreement(tmp_path):
    procs, outs = _two_ranks(tmp_path, "train,skip,stop")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    # -- training: identical ranks --
    r0, r1 = (torch.load(tmp_path / f"train{r}.pt", weights_only=False) for r in range(2))
    # The global step counts optimizer steps (not steps x ranks); 64 points / (2 x 8) = 4 steps per epoch.
    assert r0["step"] == r1["step"] == 10
    assert [h["step"] for h in r0["history"]] == list(range(1, 11))
    assert r0["history"][-1]["epoch"] == 2
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"rank parameters differ: {k}"
        assert torch.equal(r0["ema"][k], r1["ema"][k])
    assert torch.equal(r0["seeds"], r1["seeds"]), "seed tables differ across ranks"
    assert not torch.equal(r0["seeds"], r0["initial"])
    assert torch.equal(r0["seeds"].flatten().sort().values, r0["initial"].flatten().sort().values)
    # The loss logged is the mean over ranks: the same row on both ranks.
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    ck = load_checkpoint(str(tmp_path / "train" / "checkpoint.pt"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 10
    # -- a non-finite loss on rank 1 only: skipped on both ranks at once --
    s0, s1 = (torch.load(tmp_path / f"skip{r}.pt", weights_only=False) for r in range(2))
    assert s0["skipped"] == s1["skipped"] == 1  # rank 0's loss was finite, yet it skipped with rank 1
    for k in s0["params"]:
        assert torch.equal(s0["params"][k], s1["params"][k]), k
        assert torch.isfinite(s0["params"][k]).all()
    # -- ... or stopped on both ranks, each saying where it came from --
    m0, m1 = ((tmp_path / f"stop{r}.txt").read_text() for r in range(2))
    assert "on another rank) at step 3" in m0 and "(nan on rank 1) at step 3" in m1, (m0, m1)


@pytest.mark.slow  # heavy; CI runs it in its slow step
def test_ddp_sigterm_on_one_rank_saves_on_all_at_the_same_step(tmp_path):
    # The save is collective: a rank that saw the signal must not save alone (the other would hang).
    procs, outs = _two_ranks(tmp_path, "sigterm", signal_rank=1)
    steps = []
    for p, out in zip(procs, outs):
        assert p.returncode != 0 and "SIGTERM at step" in out, out
        steps.append(int(out.split("SIGTERM at step ")[1].split(":")[0]))
    assert steps[0] == steps[1] >= 3
    ck = load_checkpoint(str(tmp_path / "sigterm" / "checkpoint.pt"))
    assert ck["step"] == steps[0] and ck["world_size"] == 2


@pytest.mark.slow  # heavy; CI runs it in its slow step
def test_cli_under_torchrun(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "loom_kernels.train",
            "--data",
            "moons",
            "--coupling",
            "loom",
            "--points",
            "128",
            "--batch-size",
            "16",
            "--hidden",
            "16",
            "--depth",
            "1",
            "--steps",
            "6",
            "--log-every",
            "1",
            "--device",
            "cpu",
            "--out",
            out,
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("trained 6 steps") == 1  # rank 0 reports
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["world_size"] == 2 and ck["step"] == 6 and ck["epoch"] == 1  # 128 / (2 x 16) = 4 steps per epoch
