"""The thin trainer: learning, logging, checkpoints, exact resume, EMA, errors, DDP, and the CLIs."""
import csv
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from loom_kernels import data
from loom_kernels.models import MLPVelocity
from loom_kernels.train import LOG_COLUMNS, TrainConfig, load_checkpoint, load_model, make_coupling, train


def _setup(coupling="loom", n=96, caches=2, hidden=16, seed=0):
    torch.manual_seed(seed)
    ds = data.IndexedDataset(data.load("8gaussians", n=n, seed=seed))
    model = MLPVelocity((2,), hidden=hidden, depth=2, time_dim=8)
    return model, ds, make_coupling(coupling, n, (2,), num_caches=caches, seed=seed)


def _cfg(**kw):
    base = dict(steps=10, batch_size=16, lr=3e-3, warmup=3, progress=False, log_every=1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_loss_decreases_on_a_toy_set():
    model, ds, coupling = _setup("ot", n=512, hidden=32)
    res = train(model, ds, coupling, _cfg(steps=100, batch_size=64, lr=3e-3, warmup=10))
    losses = [r["loss"] for r in res.history]
    assert res.step == 100 and len(losses) == 100
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    # The logged coupling stats are the minibatch OT's: re-pairing lowers the cost.
    assert all(r["post_cost"] <= r["pre_cost"] + 1e-6 for r in res.history)
    assert res.history[-1]["lr"] == pytest.approx(3e-3)
    assert res.history[0]["lr"] == pytest.approx(3e-3 / 10)  # linear warm-up


def test_csv_log_columns_and_rows(tmp_path):
    model, ds, coupling = _setup("loom")
    train(model, ds, coupling, _cfg(steps=12, log_every=4, out_dir=str(tmp_path)))
    with open(tmp_path / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 1]  # 96 points / batch 16: steps 7-12 are epoch 1
    for r in rows:
        assert float(r["post_cost"]) <= float(r["pre_cost"]) + 1e-6
        assert 0 <= float(r["swaps"]) <= 16 and np.isfinite(float(r["loss"]))


def test_checkpoint_round_trip_and_ema_is_saved(tmp_path):
    model, ds, coupling = _setup("loom")
    res = train(model, ds, coupling, _cfg(steps=30, out_dir=str(tmp_path), ema_decay=0.9),
                metadata={"model": model.spec, "note": "x"})
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["step"] == 30 and ck["epoch"] == 4 and ck["metadata"]["note"] == "x"
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "coupling", "rng", "config"):
        assert key in ck
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    assert torch.equal(ck["coupling"]["seeds"], coupling.seeds)
    raw, ema = res.model.state_dict(), res.ema.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the EMA must differ from the raw weights"
    # model.pt (what sampling uses) holds the EMA, and load_model rebuilds the net from the spec.
    for path in ("model.pt", "checkpoint.pt"):
        net = load_model(str(tmp_path / path))
        for k, v in net.state_dict().items():
            assert torch.equal(v, ema[k])
    raw_net = load_model(str(tmp_path / "checkpoint.pt"), weights="raw")
    for k, v in raw_net.state_dict().items():
        assert torch.equal(v, raw[k])
    with pytest.raises(ValueError, match="only the EMA"):
        load_model(str(tmp_path / "model.pt"), weights="raw")


@pytest.mark.parametrize("coupling", ["independent", "ot", "loom"])
def test_exact_resume(tmp_path, coupling):
    # 96 points / 16 per batch = 6 steps per epoch: the split at step 9 is mid-epoch, and the run crosses
    # three epoch boundaries, so a restarted epoch counter or data order would show.
    k, half = 20, 9
    kw = dict(sigma=1e-3, ema_decay=0.9)
    model_a, ds, coup_a = _setup(coupling)
    res_a = train(model_a, ds, coup_a, _cfg(steps=k, **kw))

    model_b, ds, coup_b = _setup(coupling)
    out = str(tmp_path / "run")
    train(model_b, ds, coup_b, _cfg(steps=half, out_dir=out, **kw))
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ck["step"], ck["epoch"], ck["seen"]) == (9, 1, 48)
    torch.manual_seed(1234)  # resume must not depend on the state of the caller's RNG
    # A different initialization: the weights must come from the checkpoint (the coupling's
    # configuration must match the saved one; its table and generator state come from the checkpoint).
    model_c, _, coup_c = _setup(coupling, seed=77)
    coup_c = make_coupling(coupling, 96, (2,), num_caches=2, seed=0)
    res_c = train(model_c, ds, coup_c, _cfg(steps=k, out_dir=out, resume=True, **kw))

    assert res_c.step == k
    for name, a, c in (("raw", res_a.model, res_c.model), ("ema", res_a.ema, res_c.ema)):
        pa, pc = _params(a), _params(c)
        for key in pa:
            assert torch.equal(pa[key], pc[key]), f"{name} parameter {key} differs after resume"
    if coupling == "loom":
        assert torch.equal(coup_a.seeds, coup_c.seeds)
    assert [r["loss"] for r in res_a.history[half:]] == [r["loss"] for r in res_c.history]
    with open(os.path.join(out, "log.csv"), newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, k + 1))


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    model, ds, coupling = _setup("independent")
    out = str(tmp_path)
    train(model, ds, coupling, _cfg(steps=6, out_dir=out))
    with open(os.path.join(out, "log.csv"), "a", newline="") as f:  # rows of a run that died after step 6
        f.write("7,1,0.5,1,1,0,0.001\n8,1,0.5,1,1,0,0.001\n")
    model, ds, coupling = _setup("independent")
    train(model, ds, coupling, _cfg(steps=10, out_dir=out, resume=True))
    with open(os.path.join(out, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert float(rows[6]["loss"]) != 0.5


def test_periodic_checkpoints_and_no_overwrite(tmp_path):
    model, ds, coupling = _setup("loom")
    out = str(tmp_path)
    seen = []
    train(model, ds, coupling, _cfg(steps=8, out_dir=out, ckpt_every=3),
          callback=lambda step, **kw: seen.append((step, sorted(kw))), callback_every=4)
    assert seen == [(4, ["coupling", "ema", "model"]), (8, ["coupling", "ema", "model"])]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.csv", "model.pt"]  # no temp files left
    with pytest.raises(FileExistsError, match="resume"):
        train(model, ds, coupling, _cfg(steps=8, out_dir=out))


def test_generic_dataset_matches_indexed_dataset():
    class Items(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return i, self.x[i].numpy()

    model_a, ds, coup = _setup("independent")
    res_a = train(model_a, ds, coup, _cfg(steps=5))
    model_b, _, coup = _setup("independent")
    res_b = train(model_b, Items(ds.data), coup, _cfg(steps=5))
    for k, v in _params(res_a.model).items():
        assert torch.equal(v, _params(res_b.model)[k])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(lr=float("nan")), "lr must be a positive"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(grad_clip=0.0), "grad_clip must be positive"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(ckpt_every=5), "ckpt_every needs out_dir"),
        (dict(resume=True), "resume needs out_dir"),
        (dict(sigma=-1.0), "sigma must be >= 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_errors():
    model, ds, coupling = _setup("independent")
    with pytest.raises(ValueError, match="fewer than one global batch of 128"):
        train(model, ds, coupling, _cfg(batch_size=128))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(model, ds, coupling, _cfg(precision="bf16", device="cpu"))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(model, ds, coupling, {"steps": 3})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train(lambda x, t: x, ds, coupling, _cfg())
    with pytest.raises(ValueError, match="callback_every"):
        train(model, ds, coupling, _cfg(), callback=print)

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(ValueError, match=r"\(index, x\) pairs"):
        train(model, Bad(), coupling, _cfg())
    with pytest.raises(ValueError, match="coupling must be one of"):
        make_coupling("sinkhorn", 10, (2,))
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/no/such/checkpoint.pt")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_autocast(tmp_path, precision):
    model, ds, _ = _setup("loom")
    coupling = make_coupling("loom", 96, (2,), num_caches=2, seed=0, device="cuda")
    res = train(model, ds, coupling, _cfg(steps=12, precision=precision, device="cuda", out_dir=str(tmp_path)))
    assert res.step == 12 and all(np.isfinite(r["loss"]) for r in res.history)
    assert next(res.ema.parameters()).is_cuda and coupling.seeds.is_cuda
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert "cuda" in ck["rng"][0]
    model2, _, _ = _setup("loom")
    coupling2 = make_coupling("loom", 96, (2,), num_caches=2, seed=0, device="cuda")
    res2 = train(model2, ds, coupling2, _cfg(steps=16, precision=precision, device="cuda", out_dir=str(tmp_path),
                                             resume=True))
    assert res2.step == 16 and [r["step"] for r in res2.history] == [13, 14, 15, 16]


# ---- distributed (2 processes, gloo, CPU) -----------------------------------------------------------

_DDP_WORKER = textwrap.dedent(
    """
    import os, sys, datetime, torch
    import torch.distributed as dist
    from loom_kernels import data
    from loom_kernels.couplings import LoomCoupling
    from loom_kernels.models import MLPVelocity
    from loom_kernels.train import TrainConfig, train
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    ds = data.IndexedDataset(data.load("8gaussians", n=64, seed=0))
    model = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)
    coupling = LoomCoupling(64, (2,), num_caches=2, seed=0, process_group=dist.group.WORLD)
    initial = coupling.seeds.clone()
    res = train(model, ds, coupling, TrainConfig(steps=10, batch_size=8, log_every=1, progress=False, seed=3,
                                                 out_dir=sys.argv[1] if rank == 0 else sys.argv[1]))
    torch.save({"step": res.step, "params": res.model.state_dict(), "ema": res.ema.state_dict(),
                "seeds": coupling.seeds.clone(), "initial": initial, "history": res.history},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.destroy_process_group()
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
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
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 10


_AGREE_WORKER = textwrap.dedent(
    """
    import os, sys, time, datetime, torch
    import torch.distributed as dist
    from loom_kernels import data
    from loom_kernels.couplings import IndependentCoupling
    from loom_kernels.models import MLPVelocity
    from loom_kernels.train import TrainConfig, train
    rank, out, mode = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
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

    torch.manual_seed(0)
    ds = data.IndexedDataset(data.load("8gaussians", n=64, seed=0))
    model = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)
    if mode == "sigterm":
        train(model, ds, IndependentCoupling(), TrainConfig(steps=100000, batch_size=8, progress=False, seed=3,
              out_dir=out), callback=cb, callback_every=1)
    else:
        res = train(model, ds, NaNOnRank1(), TrainConfig(steps=6, batch_size=8, progress=False, seed=3,
                    nonfinite=mode))
        torch.save({"skipped": res.skipped, "params": res.model.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
    """
)


def _two_ranks(tmp_path, mode, signal_rank=None):
    """Runs _AGREE_WORKER on 2 gloo ranks; with signal_rank, sends SIGTERM to that rank alone after step 3."""
    import time

    script = tmp_path / "worker.py"
    script.write_text(_AGREE_WORKER)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], cwd=tmp_path,
                              env=dict(os.environ, RANK=str(r), PORT=port, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        if signal_rank is not None:
            deadline = time.time() + 120
            while not (tmp_path / "started").exists() and time.time() < deadline and procs[0].poll() is None:
                time.sleep(0.05)
            procs[signal_rank].send_signal(15)
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


@pytest.mark.distributed
def test_ddp_sigterm_on_one_rank_saves_on_all_at_the_same_step(tmp_path):
    # The save is collective: a rank that saw the signal must not save alone (the other would hang).
    procs, outs = _two_ranks(tmp_path, "sigterm", signal_rank=1)
    steps = []
    for p, out in zip(procs, outs):
        assert p.returncode != 0 and "SIGTERM at step" in out, out
        steps.append(int(out.split("SIGTERM at step ")[1].split(":")[0]))
    assert steps[0] == steps[1] >= 3
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["step"] == steps[0] and ck["world_size"] == 2


@pytest.mark.distributed
def test_ddp_nonfinite_loss_on_one_rank_is_skipped_or_stops_on_all(tmp_path):
    procs, outs = _two_ranks(tmp_path, "skip")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["skipped"] == r1["skipped"] == 1  # rank 0's loss was finite, yet it skipped with rank 1
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        assert torch.isfinite(r0["params"][k]).all()
    procs, outs = _two_ranks(tmp_path, "stop")
    assert "on another rank) at step 3" in outs[0] and "(nan on rank 1) at step 3" in outs[1], outs
    assert all(p.returncode != 0 for p in procs)


@pytest.mark.distributed
def test_cli_under_torchrun(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "loom_kernels.train", "--data", "moons", "--coupling", "loom", "--points", "128",
                        "--batch-size", "16", "--hidden", "16", "--depth", "1", "--steps", "6", "--log-every", "1",
                        "--device", "cpu", "--out", out, "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("trained 6 steps") == 1  # rank 0 reports
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["world_size"] == 2 and ck["step"] == 6 and ck["epoch"] == 1  # 128 / (2 x 16) = 4 steps per epoch


# ---- command line ---------------------------------------------------------------------------------------


def _cli(*args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Run outside the checkout: `python -m` puts the cwd first on sys.path, and the source tree of a
    # non-editable install has no compiled modules.
    p = subprocess.run([sys.executable, "-m", *args], cwd=tempfile.gettempdir(), env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_cli_train_resume_and_sample(tmp_path):
    out = str(tmp_path / "run")
    common = ["--data", "moons", "--coupling", "loom", "--points", "256", "--batch-size", "32", "--hidden", "16",
              "--depth", "1", "--out", out, "--no-progress", "--log-every", "1", "--num-caches", "2"]
    assert "trained 6 steps" in _cli("loom_kernels.train", *common, "--steps", "6")
    assert "trained 10 steps" in _cli("loom_kernels.train", *common, "--steps", "10", "--resume")
    with open(os.path.join(out, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))
    npy, png = str(tmp_path / "s.npy"), str(tmp_path / "s.png")
    _cli("loom_kernels.sample", "--ckpt", os.path.join(out, "model.pt"), "--nfe", "2", "--n", "100", "--out", npy,
         "--plot", png, "--method", "midpoint")
    x = np.load(npy)
    assert x.shape == (100, 2) and np.isfinite(x).all()
    assert os.path.getsize(png) > 1000


def test_cli_help_and_errors(tmp_path):
    assert "--coupling" in _cli("loom_kernels.train", "--help")
    assert "--nfe" in _cli("loom_kernels.sample", "--help")
    p = subprocess.run([sys.executable, "-m", "loom_kernels.train", "--data", "moons", "--coupling", "sinkhorn",
                        "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "invalid choice" in p.stderr


# ---- real data: labels, flips, UNet, schedules, metric ----------------------------------------------------

from loom_kernels.couplings import IndependentCoupling  # noqa: E402
from loom_kernels.models import UNet  # noqa: E402


class LabelledIndependent(IndependentCoupling):
    """IndependentCoupling that records the labels it gets."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def __call__(self, x1, *, indices=None, labels=None):
        self.seen.append((indices.clone(), None if labels is None else labels.clone(), x1.clone()))
        return super().__call__(x1, indices=indices)


class Recording(UNet):
    def forward(self, x, t, y=None):
        self.ys = getattr(self, "ys", []) + [None if y is None else y.clone()]
        return super().forward(x, t, y)


def _digits(n=256, flip=False):
    x, y = data.load_labeled("digits", n=n)
    ds = data.LabeledDataset(x, y)
    return data.FlipDataset(ds) if flip else ds


def test_class_conditional_digits_end_to_end_and_resume_with_labels(tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = Recording((1, 8, 8), channels=8, num_classes=10)
        coupling = LabelledIndependent()  # global RNG: checkpointed
        res = train(model, _digits(), coupling, _cfg(steps=steps, batch_size=32, out_dir=out, resume=resume,
                                                     label_dropout=0.25, ckpt_every=0))
        return res, model, coupling

    res, model, coupling = run(str(tmp_path / "a"), 8)
    ds = _digits()
    for idx, labels, x1 in coupling.seen:  # the coupling gets the true labels of its items
        assert torch.equal(labels, ds.labels[idx]) and torch.equal(x1, ds.data[idx])
    ys = torch.cat(model.ys)
    assert ((ys == 10).float().mean() - 0.25).abs() < 0.1  # label dropout to the null label
    assert all(np.isfinite(r["loss"]) for r in res.history)
    run(str(tmp_path / "b"), 4)
    with pytest.warns(UserWarning, match="steps: 4 -> 8"):
        res_b, _, _ = run(str(tmp_path / "b"), 8, resume=True)
    for k, v in _params(res.ema).items():  # resume with labels is exact
        assert torch.equal(v, _params(res_b.ema)[k]), k


def test_flip_indices_and_views():
    torch.manual_seed(0)
    ds = _digits(n=64, flip=True)
    coupling = LabelledIndependent()
    train(Recording((1, 8, 8), channels=8, num_classes=10), ds, coupling, _cfg(steps=8, batch_size=32))
    idx = torch.cat([s[0] for s in coupling.seen])
    assert idx.max() >= 64 and idx.max() < 128  # the flipped view of item i is item i + N
    for i, _, x1 in coupling.seen:
        base = ds.base.data[i % 64]
        want = torch.where((i >= 64).view(-1, 1, 1, 1), base.flip(-1), base)
        assert torch.equal(x1, want)
    assert sorted(torch.cat([s[0] for s in coupling.seen[:4]]).tolist()) == list(range(128))  # one epoch = 2N items


def test_cosine_schedule_and_metric():
    model, ds, _ = _setup("independent")
    res = train(model, ds, make_coupling("ot", 96, (2,), metric="euclidean"),
                _cfg(steps=12, warmup=2, schedule="cosine", lr=1e-2))
    lrs = [r["lr"] for r in res.history]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    # step 6: 4 of the 10 post-warm-up steps done
    assert lrs[6] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 4 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert make_coupling("loom", 10, (2,), metric="euclidean").metric == "euclidean"


# ---- resume with other arguments, non-finite losses, SIGTERM, torn logs --------------------------------------


def test_resume_refuses_other_data_and_batch_size_and_states_overrides(tmp_path):
    out = str(tmp_path)
    model, ds, coupling = _setup("independent")
    train(model, ds, coupling, _cfg(steps=4, out_dir=out))
    other = data.IndexedDataset(data.load("8gaussians", n=96, seed=9))
    with pytest.raises(ValueError, match="another data set"):
        train(model, other, coupling, _cfg(steps=8, out_dir=out, resume=True))
    with pytest.raises(ValueError, match="batch_size: 16 -> 32"):
        train(model, ds, coupling, _cfg(steps=8, batch_size=32, out_dir=out, resume=True))
    with pytest.raises(ValueError, match="seed: 5 -> 6"):
        train(model, ds, coupling, _cfg(steps=8, seed=6, out_dir=out, resume=True))
    with pytest.warns(UserWarning, match=r"lr: 0.003 -> 0.0005.*warmup: 3 -> 0"):
        res = train(model, ds, coupling, _cfg(steps=8, lr=5e-4, warmup=0, out_dir=out, resume=True))
    assert all(r["lr"] == pytest.approx(5e-4) for r in res.history)  # the override applies


class NaNAfter(IndependentCoupling):
    def __init__(self, after):
        super().__init__()
        self.calls, self.after = 0, after

    def __call__(self, x1, *, indices=None, labels=None):
        self.calls += 1
        x0, x1 = super().__call__(x1, indices=indices)
        return (x0 * float("nan") if self.calls in self.after else x0), x1


def test_nonfinite_loss_stops_without_overwriting_or_skips(tmp_path):
    out = str(tmp_path)
    model, ds, _ = _setup("independent")
    train(model, ds, IndependentCoupling(), _cfg(steps=4, out_dir=out))
    with pytest.raises(FloatingPointError, match="non-finite loss.*at step 6.*without writing a checkpoint"):
        train(model, ds, NaNAfter({2}), _cfg(steps=8, out_dir=out, resume=True, ckpt_every=1))
    # step 5 was checkpointed (finite), step 6 stopped the run: nothing NaN was written
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    mk = load_checkpoint(os.path.join(out, "model.pt"))
    assert mk["step"] == 5 and all(torch.isfinite(v).all() for v in mk["model"].values())
    model, ds, _ = _setup("independent")
    with pytest.warns(RuntimeWarning, match="2 of the steps had a non-finite loss"):
        res = train(model, ds, NaNAfter({3, 5}), _cfg(steps=8, nonfinite="skip"))
    assert res.skipped == 2 and res.step == 8
    assert all(torch.isfinite(v).all() for v in _params(res.model).values())


def test_sigterm_saves_then_exits(tmp_path):
    out, flag = str(tmp_path / "run"), str(tmp_path / "started")
    script = textwrap.dedent(f"""
        import torch
        from loom_kernels import data
        from loom_kernels.models import MLPVelocity
        from loom_kernels.train import TrainConfig, make_coupling, train
        ds = data.IndexedDataset(data.load("moons", n=64))
        def cb(step, **kw):
            if step == 3:
                open({flag!r}, "w").close()
            import time; time.sleep(0.05)
        train(MLPVelocity((2,), hidden=8, depth=1), ds, make_coupling("loom", 64, (2,)),
              TrainConfig(steps=100000, batch_size=16, progress=False, out_dir={out!r}), callback=cb, callback_every=1)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while not os.path.exists(flag) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(15)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "SIGTERM at step" in err, err
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert 3 <= ck["step"] < 100000 and ck["coupling"] is not None
    with open(os.path.join(out, "log.csv")) as f:
        assert all(int(r["step"]) <= ck["step"] for r in csv.DictReader(f))


def test_torn_last_log_row_is_dropped_with_a_warning(tmp_path):
    out = str(tmp_path)
    model, ds, coupling = _setup("independent")
    train(model, ds, coupling, _cfg(steps=4, out_dir=out))
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("\0\0\0\0")  # a crash after the file grew but before the bytes landed
    with pytest.warns(RuntimeWarning, match="torn last row"):
        train(model, ds, coupling, _cfg(steps=6, out_dir=out, resume=True))
    with open(os.path.join(out, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("x,1,2,3,4,5,6\n7,1,0.5,1,1,0,0.001\n")  # damage inside the file: a clear error
    with pytest.raises(ValueError, match="row 8 is not a log row"):
        train(model, ds, coupling, _cfg(steps=8, out_dir=out, resume=True))


def test_cli_unet_flip_and_sample_refuses_nan(tmp_path):
    out = str(tmp_path / "run")
    _cli("loom_kernels.train", "--data", "digits", "--coupling", "loom", "--model", "unet", "--channels", "8",
         "--flip", "--steps", "4", "--batch-size", "32", "--points", "128", "--out", out, "--no-progress",
         "--metric", "euclidean", "--schedule", "cosine", "--caches", "2")
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["metadata"]["model"]["kind"] == "unet" and ck["coupling"]["config"]["num_points"] == 256  # 2 x 128 views
    npy = str(tmp_path / "s.npy")
    _cli("loom_kernels.sample", "--ckpt", os.path.join(out, "model.pt"), "--nfe", "2", "--n", "8", "--out", npy)
    assert np.load(npy).shape == (8, 1, 8, 8)
    net = load_model(os.path.join(out, "model.pt"))
    with torch.no_grad():
        net.conv_out.bias.fill_(float("nan"))
    from loom_kernels.checkpoint import save_model

    save_model(str(tmp_path / "nan.pt"), net, metadata={"model": net.spec})
    p = subprocess.run([sys.executable, "-m", "loom_kernels.sample", "--ckpt", str(tmp_path / "nan.pt"), "--n", "4",
                        "--out", str(tmp_path / "nan.npy")], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())
    assert p.returncode != 0 and "NaN or inf" in p.stderr and not os.path.exists(tmp_path / "nan.npy")


# ---- the coupling protocol, and class-conditional training with the real couplings ------------------------


def test_plain_callable_coupling_is_adapted_and_other_objects_refused(tmp_path):
    from loom_kernels.couplings import Coupling

    model, ds, _ = _setup("independent")
    calls = []

    def fn(x1, indices=None):  # no labels=, no stats, no state: wrapped once by the trainer
        calls.append(indices.clone())
        return torch.randn_like(x1), x1

    res = train(model, ds, fn, _cfg(steps=3, out_dir=str(tmp_path)))
    assert len(calls) == 3 and all(np.isnan(r["pre_cost"]) and np.isfinite(r["loss"]) for r in res.history)
    ck = load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))
    assert ck["coupling"] == {} and ck["coupling_class"] == "function"

    class Identity(Coupling):  # the protocol's own example: no stats of its own
        def __call__(self, x1, *, indices=None, labels=None):
            return torch.zeros_like(x1), x1

    res = train(model, ds, Identity(), _cfg(steps=2))
    assert res.step == 2 and np.isnan(res.history[-1]["swaps"])
    with pytest.raises(TypeError, match="coupling must be a loom_kernels.couplings.Coupling.*got int"):
        train(model, ds, 42, _cfg())


def _class_seeds(seeds, y):
    return {int(c): seeds[y == c].flatten().sort().values for c in y.unique()}


def test_cli_conditional_digits_with_loom_keeps_each_class_seeds_and_resumes_exactly(tmp_path):
    common = ["--data", "digits", "--model", "unet", "--channels", "8", "--conditional", "--points", "160",
              "--batch-size", "32", "--caches", "2", "--no-progress", "--log-every", "1", "--ckpt-every", "0",
              "--coupling", "loom", "--seed", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert "trained 8 steps" in _cli("loom_kernels.train", *common, "--steps", "8", "--out", a)
    _cli("loom_kernels.train", *common, "--steps", "4", "--out", b)
    _cli("loom_kernels.train", *common, "--steps", "8", "--out", b, "--resume")
    ck_a, ck_b = (load_checkpoint(os.path.join(d, "checkpoint.pt")) for d in (a, b))
    for k, v in ck_a["ema"].items():  # resume with labels is exact
        assert torch.equal(v, ck_b["ema"][k]), k
    assert torch.equal(ck_a["coupling"]["seeds"], ck_b["coupling"]["seeds"])
    # The seed table moved, but only inside each class: noise never crossed a label during training.
    x, y = data.load_labeled("digits", "train", n=160, seed=1, holdout=0.2)
    initial = make_coupling("loom", len(x), tuple(x.shape[1:]), num_caches=2, seed=1).seeds
    final = ck_a["coupling"]["seeds"]
    assert not torch.equal(final, initial) and len(y.unique()) == 10
    before, after = _class_seeds(initial, y), _class_seeds(final, y)
    assert all(torch.equal(before[c], after[c]) for c in before)
    with open(os.path.join(a, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sum(float(r["swaps"]) for r in rows) > 0
    assert all(float(r["post_cost"]) <= float(r["pre_cost"]) + 1e-6 for r in rows)


def test_cli_conditional_digits_with_minibatch_ot_and_sample_a_class(tmp_path):
    out = str(tmp_path / "ot")
    _cli("loom_kernels.train", "--data", "digits", "--model", "unet", "--channels", "8", "--conditional",
         "--points", "160", "--batch-size", "32", "--coupling", "ot", "--steps", "3", "--log-every", "1",
         "--no-progress", "--out", out)
    with open(os.path.join(out, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["post_cost"]) <= float(r["pre_cost"]) + 1e-6 for r in rows)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["coupling_class"] == "MinibatchOTCoupling"
    npy = str(tmp_path / "s.npy")
    _cli("loom_kernels.sample", "--ckpt", os.path.join(out, "model.pt"), "--nfe", "2", "--n", "6", "--label", "3",
         "--guidance", "2", "--out", npy)
    assert np.load(npy).shape == (6, 1, 8, 8)
