"""Checkpoints and resume: exact resume, periodic saves, resume with other settings, torn logs, SIGTERM, and the
non-finite guard (#23 item 2: a finite loss with a NaN gradient stops or skips before the optimizer step;
nothing non-finite reaches Adam, the weights, the EMA or a checkpoint; the stop names a finite checkpoint)."""

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loom_kernels import data
from loom_kernels.couplings import IndependentCoupling
from loom_kernels.models import MLPVelocity
from loom_kernels.train import TrainConfig, load_checkpoint, load_model, make_coupling, train

from train_common import NaNAfter, param_copy, setup_run, small_config


def test_checkpoint_round_trip_and_ema_is_saved(tmp_path):
    model, ds, coupling = setup_run("loom")
    res = train(
        model,
        ds,
        coupling,
        small_config(steps=30, out_dir=str(tmp_path), ema_decay=0.9),
        metadata={"model": model.spec, "note": "x"},
    )
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
    model_a, ds, coup_a = setup_run(coupling)
    res_a = train(model_a, ds, coup_a, small_config(steps=k, **kw))

    model_b, ds, coup_b = setup_run(coupling)
    out = str(tmp_path / "run")
    train(model_b, ds, coup_b, small_config(steps=half, out_dir=out, **kw))
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ck["step"], ck["epoch"], ck["seen"]) == (9, 1, 48)
    torch.manual_seed(1234)  # resume must not depend on the state of the caller's RNG
    # A different initialization: the weights must come from the checkpoint (the coupling's
    # configuration must match the saved one; its table and generator state come from the checkpoint).
    model_c, _, coup_c = setup_run(coupling, seed=77)
    coup_c = make_coupling(coupling, 96, (2,), num_caches=2, seed=0)
    res_c = train(model_c, ds, coup_c, small_config(steps=k, out_dir=out, resume=True, **kw))

    assert res_c.step == k
    for name, a, c in (("raw", res_a.model, res_c.model), ("ema", res_a.ema, res_c.ema)):
        pa, pc = param_copy(a), param_copy(c)
        for key in pa:
            assert torch.equal(pa[key], pc[key]), f"{name} parameter {key} differs after resume"
    if coupling == "loom":
        assert torch.equal(coup_a.seeds, coup_c.seeds)
    assert [r["loss"] for r in res_a.history[half:]] == [r["loss"] for r in res_c.history]
    with open(os.path.join(out, "log.csv"), newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, k + 1))


def test_resume_drops_log_rows_past_the_checkpoint(tmp_path):
    model, ds, coupling = setup_run("independent")
    out = str(tmp_path)
    train(model, ds, coupling, small_config(steps=6, out_dir=out))
    with open(os.path.join(out, "log.csv"), "a", newline="") as f:  # rows of a run that died after step 6
        f.write("7,1,0.5,1,1,0,0.001\n8,1,0.5,1,1,0,0.001\n")
    model, ds, coupling = setup_run("independent")
    train(model, ds, coupling, small_config(steps=10, out_dir=out, resume=True))
    with open(os.path.join(out, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert float(rows[6]["loss"]) != 0.5


def test_periodic_checkpoints_and_no_overwrite(tmp_path):
    model, ds, coupling = setup_run("loom")
    out = str(tmp_path)
    seen = []
    train(
        model,
        ds,
        coupling,
        small_config(steps=8, out_dir=out, ckpt_every=3),
        callback=lambda step, **kw: seen.append((step, sorted(kw))),
        callback_every=4,
    )
    assert seen == [(4, ["coupling", "ema", "model"]), (8, ["coupling", "ema", "model"])]
    # no temp files left; .lock is the trainer's directory lock (flock: it stays, only its lock goes)
    assert sorted(os.listdir(out)) == [".lock", "checkpoint.pt", "log.csv", "model.pt"]
    with pytest.raises(FileExistsError, match="resume"):
        train(model, ds, coupling, small_config(steps=8, out_dir=out))


def test_resume_refuses_other_data_and_batch_size_and_states_overrides(tmp_path):
    out = str(tmp_path)
    model, ds, coupling = setup_run("independent")
    train(model, ds, coupling, small_config(steps=4, out_dir=out))
    other = data.IndexedDataset(data.load("8gaussians", n=96, seed=9))
    with pytest.raises(ValueError, match="another data set"):
        train(model, other, coupling, small_config(steps=8, out_dir=out, resume=True))
    with pytest.raises(ValueError, match="batch_size: 16 -> 32"):
        train(model, ds, coupling, small_config(steps=8, batch_size=32, out_dir=out, resume=True))
    with pytest.raises(ValueError, match="seed: 5 -> 6"):
        train(model, ds, coupling, small_config(steps=8, seed=6, out_dir=out, resume=True))
    with pytest.warns(UserWarning, match=r"lr: 0.003 -> 0.0005.*warmup: 3 -> 0"):
        res = train(model, ds, coupling, small_config(steps=8, lr=5e-4, warmup=0, out_dir=out, resume=True))
    assert all(r["lr"] == pytest.approx(5e-4) for r in res.history)  # the override applies


def test_nonfinite_loss_stops_without_overwriting_or_skips(tmp_path):
    out = str(tmp_path)
    model, ds, _ = setup_run("independent")
    train(model, ds, IndependentCoupling(), small_config(steps=4, out_dir=out))
    with pytest.raises(FloatingPointError, match="non-finite loss.*at step 6.*without writing a checkpoint"):
        train(model, ds, NaNAfter({2}), small_config(steps=8, out_dir=out, resume=True, ckpt_every=1))
    # step 5 was checkpointed (finite), step 6 stopped the run: nothing NaN was written
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())
    mk = load_checkpoint(os.path.join(out, "model.pt"))
    assert mk["step"] == 5 and all(torch.isfinite(v).all() for v in mk["model"].values())
    model, ds, _ = setup_run("independent")
    with pytest.warns(RuntimeWarning, match="2 of the steps had a non-finite loss"):
        res = train(model, ds, NaNAfter({3, 5}), small_config(steps=8, nonfinite="skip"))
    assert res.skipped == 2 and res.step == 8
    assert all(torch.isfinite(v).all() for v in param_copy(res.model).values())


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
    p = subprocess.Popen(
        [sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True
    )
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
    model, ds, coupling = setup_run("independent")
    train(model, ds, coupling, small_config(steps=4, out_dir=out))
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("\0\0\0\0")  # a crash after the file grew but before the bytes landed
    with pytest.warns(RuntimeWarning, match="torn last row"):
        train(model, ds, coupling, small_config(steps=6, out_dir=out, resume=True))
    with open(os.path.join(out, "log.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7))
    with open(os.path.join(out, "log.csv"), "a") as f:
        f.write("x,1,2,3,4,5,6\n7,1,0.5,1,1,0,0.001\n")  # damage inside the file: a clear error
    with pytest.raises(ValueError, match="row 8 is not a log row"):
        train(model, ds, coupling, small_config(steps=8, out_dir=out, resume=True))


class SqrtAtZero(torch.nn.Module):
    """An MLP plus ``0 * sqrt(p * alive)``: the loss stays finite, but from call ``dies_at`` on p's
    gradient is 0 * inf = NaN (the derivative of sqrt at 0), and every weight's after clipping."""

    def __init__(self, dies_at: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)
        self.p = torch.nn.Parameter(torch.ones(()))
        self.calls, self.dies_at = 0, dies_at

    def forward(self, x, t):
        self.calls += 1
        alive = 0.0 if self.calls >= self.dies_at else 1.0
        return self.net(x, t) + 0.0 * torch.sqrt(self.p * alive)


def _ds():
    return data.IndexedDataset(data.load("8gaussians", n=96, seed=0))


def _nf_config(**kw):
    base = dict(steps=8, batch_size=16, lr=3e-3, warmup=0, progress=False, log_every=1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nan_gradient_with_finite_loss_stops_before_the_step(tmp_path, grad_clip):
    out = str(tmp_path)
    model = SqrtAtZero(dies_at=5)
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite gradient norm .*loss .*at step 5: training stopped "
        r"before the optimizer step.*last good one is .*checkpoint\.pt",
    ):
        train(model, _ds(), IndependentCoupling(), _nf_config(out_dir=out, ckpt_every=2, grad_clip=grad_clip))
    # the weights, the optimizer state and the checkpoint the message names are all finite
    assert _finite(model.state_dict())
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 4 and _finite(ck["model"]) and _finite(ck["ema"])
    assert all(_finite(s) for s in ck["optimizer"]["state"].values())
    assert _finite(load_checkpoint(os.path.join(out, "model.pt"))["model"])


def test_nan_gradient_is_skipped_and_nothing_spreads(tmp_path):
    model = SqrtAtZero(dies_at=5)
    with pytest.warns(RuntimeWarning, match="4 of the steps had a non-finite loss or gradient"):
        res = train(model, _ds(), IndependentCoupling(), _nf_config(out_dir=str(tmp_path), nonfinite="skip"))
    assert res.skipped == 4 and res.step == 8
    assert _finite(res.model.state_dict()) and _finite(res.ema.state_dict())
    ck = load_checkpoint(os.path.join(str(tmp_path), "checkpoint.pt"))
    assert _finite(ck["model"]) and _finite(ck["ema"]) and all(_finite(s) for s in ck["optimizer"]["state"].values())


def test_checkpoint_is_never_written_from_nonfinite_weights(tmp_path):
    # Weights that turn non-finite by another route (here: a callback on the EMA) are refused at the checkpoint:
    # the file on disk stays the last finite one, and the error names it.
    out = str(tmp_path)
    torch.manual_seed(0)
    model = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)

    def poison(step, model, ema, coupling):
        if step == 3:
            with torch.no_grad():
                next(ema.parameters()).fill_(float("nan"))  # the loss stays finite: only the save sees it

    with pytest.raises(
        FloatingPointError,
        match=r"not finite at step 4: checkpoint not written; the last good "
        r"checkpoint is .*checkpoint\.pt",
    ):
        train(
            model,
            _ds(),
            IndependentCoupling(),
            _nf_config(out_dir=out, ckpt_every=2),
            callback=poison,
            callback_every=1,
        )
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 2 and _finite(ck["model"]) and _finite(ck["ema"])
