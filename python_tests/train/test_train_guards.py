"""Nothing lost, third pass (#34), the trainer's side: one trainer per directory (2), a skipped step
leaves BatchNorm's statistics alone (6), a full disk while logging names log.csv and is not replaced by
a second error (8), checkpoint fields checked by type with the file named (9), the fp16 grad scaler
stuck on a persistent NaN stops the run (the issue's last paragraph)."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from loom_kernels import data
from loom_kernels._io import atomic_save
from loom_kernels.couplings import IndependentCoupling
from loom_kernels.models import MLPVelocity
from loom_kernels.train import TrainConfig, load_checkpoint, load_model, train
from loom_kernels.train.lock import RunDirInUseError, lock_run_dir, unlock_run_dir
from loom_kernels.train.step import SCALER_STUCK, _agree, _count_scaler_skips

from train_common import setup_run, small_config

# -- 2. one trainer per out_dir --


def test_a_second_trainer_on_the_same_out_dir_is_refused(tmp_path):
    out = str(tmp_path / "run")
    model, ds, coupling = setup_run("independent")
    seen = {}

    def second_trainer(step, **_):
        if step == 2:  # while the first run holds the directory
            m2, ds2, c2 = setup_run("independent")
            with pytest.raises(RunDirInUseError, match=rf"in use by another trainer \(pid {os.getpid()}"):
                train(m2, ds2, c2, small_config(steps=4, out_dir=out, resume=True))
            seen["refused"] = True

    train(model, ds, coupling, small_config(steps=4, out_dir=out), callback=second_trainer, callback_every=1)
    assert seen == {"refused": True}
    # the refused run changed nothing: the log has the first run's 4 rows, and the lock is free again
    with open(os.path.join(out, "log.csv")) as f:
        assert len(f.read().strip().splitlines()) == 1 + 4
    train(model, ds, coupling, small_config(steps=6, out_dir=out, resume=True))
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 6


def test_the_lock_is_held_across_processes_and_dropped_when_the_holder_dies(tmp_path):
    out = str(tmp_path)
    code = textwrap.dedent(
        f"""
        import sys, time
        from loom_kernels.train.lock import lock_run_dir
        lock_run_dir({out!r}); print("locked", flush=True); time.sleep(60)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUseError, match=f"pid {p.pid}"):
            lock_run_dir(out)
    finally:
        p.kill()
        p.wait()
    fd = lock_run_dir(out)  # kill -9 released it: no stale lock
    unlock_run_dir(fd)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    fd = lock_run_dir(str(tmp_path))
    ready_r, ready_w = os.pipe()  # child -> parent: its at-fork handlers have run
    done_r, done_w = os.pipe()  # parent -> child: checked, the child may exit
    pid = os.fork()
    if pid == 0:  # the child (a data-loader worker, say) outlives the trainer's hold
        os.write(ready_w, b"x")
        os.read(done_r, 1)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        unlock_run_dir(fd)
        unlock_run_dir(lock_run_dir(str(tmp_path)))  # free although the child still runs
    finally:
        os.write(done_w, b"y")
        os.waitpid(pid, 0)
        for end in (ready_r, ready_w, done_r, done_w):
            os.close(end)


# -- 6. a skipped step restores BatchNorm's running statistics --


class BNNet(torch.nn.Module):
    """A BatchNorm MLP whose output is NaN on the calls in ``nan_calls`` (BatchNorm sees NaN input first)."""

    def __init__(self, nan_calls):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(3, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.out = torch.nn.Linear(16, 2)
        self.calls, self.nan_calls = 0, nan_calls

    def forward(self, x, t):
        self.calls += 1
        h = self.inp(torch.cat([x, t[:, None]], 1))
        if self.calls in self.nan_calls:
            h = h * float("nan")
        return self.out(torch.relu(self.bn(h)))


def test_skipped_step_leaves_batchnorm_statistics_finite_and_checkpoints_written(tmp_path):
    ds = data.IndexedDataset(data.load("8gaussians", n=96, seed=0))
    model = BNNet(nan_calls={3})
    cfg = TrainConfig(
        steps=6, batch_size=16, lr=1e-3, warmup=0, progress=False, nonfinite="skip", out_dir=str(tmp_path), ckpt_every=4
    )
    with pytest.warns(RuntimeWarning, match="1 of the steps"):
        res = train(model, ds, IndependentCoupling(), cfg)
    assert res.skipped == 1 and res.step == 6
    for name, buf in res.model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["step"] == 6 and all(torch.isfinite(v.float()).all() for v in ck["ema"].values())
    # the skipped step did not count in BatchNorm's statistics either
    assert int(res.model.bn.num_batches_tracked) == 5


# -- 8. a full disk while logging --


def test_full_disk_while_logging_names_log_csv_and_keeps_the_first_error(tmp_path, monkeypatch):
    from loom_kernels.train import log as log_mod

    model, ds, coupling = setup_run("independent")
    real = log_mod.CsvLog

    class FullDisk(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.rows = 0
            f = self.f

            class File:  # the file whose writes and close hit ENOSPC after two rows
                def write(_, s):
                    self.rows += 1
                    if self.rows > 2:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return f.write(s)

                def flush(_):
                    f.flush()

                def close(_):
                    f.close()
                    raise OSError(errno.ENOSPC, "No space left on device")

            self.f = File()
            self.w = log_mod.csv.DictWriter(self.f, fieldnames=log_mod.LOG_COLUMNS)

    monkeypatch.setattr("loom_kernels.train.loop.CsvLog", FullDisk)
    with pytest.raises(OSError, match=r"cannot append a row to .*log\.csv.*No space left") as exc:
        train(model, ds, coupling, small_config(steps=6, out_dir=str(tmp_path)))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename.endswith("log.csv")


# -- 9. checkpoint fields checked by type --


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda ck: ck.__setitem__("step", 2.5), "'step' must be a non-negative int"),
        (lambda ck: ck.__setitem__("step", True), "'step' must be a non-negative int"),
        (lambda ck: ck.pop("optimizer"), "'optimizer' is missing"),
        (lambda ck: ck.__setitem__("model", [1, 2]), "'model' must be a state dict"),
        (lambda ck: ck.__setitem__("rng", ck["rng"] * 2), "2 RNG states for world_size 1"),
        (lambda ck: ck.__setitem__("config", "x"), "'config' must be a dict"),
        (lambda ck: ck.__setitem__("coupling", 3), "'coupling' must be a state dict or None"),
    ],
)
def test_checkpoint_with_valid_checksum_but_bad_fields_is_refused_by_name(tmp_path, edit, field):
    out = str(tmp_path)
    model, ds, coupling = setup_run("independent")
    train(model, ds, coupling, small_config(steps=4, out_dir=out))
    path = os.path.join(out, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    ck.pop("checksum")
    edit(ck)
    atomic_save(ck, path)  # re-checksummed: only the field check can tell
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*" + field.replace("(", r"\(")):
        train(model, ds, coupling, small_config(steps=6, out_dir=out, resume=True))


def test_model_file_without_weights_is_refused_by_name(tmp_path):
    path = str(tmp_path / "model.pt")
    atomic_save({"format": "loom_kernels.model", "version": 2, "metadata": {}}, path)
    with pytest.raises(ValueError, match=r"model\.pt.*'model' is missing"):
        load_model(path, MLPVelocity((2,), hidden=8, depth=1, time_dim=4))


# -- fp16: the grad scaler stuck on a persistent NaN gradient --


def test_scaler_skips_are_counted_on_the_device_and_stop_the_run():
    class R:  # the two fields the counter reads, with a real (CPU) grad scaler
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        scaler_skips = 0
        world = 1

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    run = R()
    for k in range(SCALER_STUCK + 3):
        opt.zero_grad()
        grad_nan = k < SCALER_STUCK  # persistent NaN, then it recovers
        run.scaler.scale((p * (float("nan") if grad_nan else 1.0)).sum()).backward()
        before = run.scaler._scale.clone()
        run.scaler.step(opt)
        run.scaler.update()
        _count_scaler_skips(run, before)
        assert int(run.scaler_skips) == (k + 1 if grad_nan else 0)
        stuck = _agree(run, torch.zeros(2, dtype=torch.bool), False)[2]
        assert stuck == (grad_nan and k + 1 >= SCALER_STUCK)
