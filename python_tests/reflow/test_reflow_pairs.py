"""Reflow pairs stored as seeds (issue 31): contents against a float64 reference, storage, crash safety, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reflow_helpers
from loom_kernels.noise import gaussian_noise
from loom_kernels.reflow import PairsFolder, generate_pairs, open_pairs, seeds_for
from loom_kernels.reflow.cli import main as cli_main
from reflow_helpers import TinyConditional, TinyField, euler_reference


def _gen(model, out, num=40, **kw):
    kw = {"method": "euler", "nfe": 4, "batch_size": 16, "device": "cpu", "progress": False, **kw}
    return generate_pairs(model, num, out=str(out), **kw)


def test_targets_are_the_ode_solutions_of_the_regenerated_noise(tmp_path):
    model = TinyField()
    pf = _gen(model, tmp_path / "p", num=40)
    assert pf.complete and pf.count == 40 and pf.shape == (2,)
    seeds = torch.from_numpy(np.asarray(pf.seeds))
    assert len(set(seeds.tolist())) == 40
    ref = euler_reference(model, gaussian_noise(seeds, (2,)), 4)
    np.testing.assert_allclose(np.asarray(pf.targets), ref.numpy(), atol=1e-5)
    # The noise is a pure function of the stored seed: pair 7 alone gives the same noise and target.
    one = euler_reference(model, gaussian_noise(seeds[7:8], (2,)), 4)
    np.testing.assert_allclose(np.asarray(pf.targets[7:8]), one.numpy(), atol=1e-5)


@pytest.mark.parametrize("method,nfe", [("midpoint", 4), ("heun", 4), ("dopri5", None)])
def test_other_methods_match_the_sampler(tmp_path, method, nfe):
    from loom_kernels.sampler import sample

    model = TinyField()
    pf = _gen(model, tmp_path / method, num=20, method=method, nfe=nfe, batch_size=20)
    x0 = gaussian_noise(torch.from_numpy(np.asarray(pf.seeds)), (2,))
    want = sample(model.double(), x0.double(), nfe, method=method).float()
    np.testing.assert_allclose(np.asarray(pf.targets), want.numpy(), atol=1e-4)


def test_storage_is_the_target_plus_8_bytes_per_pair(tmp_path):
    pf = _gen(TinyField(), tmp_path / "p", num=1000, dtype="float16", batch_size=500)
    data = (os.path.getsize(tmp_path / "p" / "targets.npy"), os.path.getsize(tmp_path / "p" / "seeds.npy"))
    header = 128  # one .npy header each
    assert data[0] <= 1000 * 2 * 2 + header and data[1] <= 1000 * 8 + header
    assert pf.targets.dtype == np.float16
    # float16 targets are the float32 ones rounded.
    pf32 = _gen(TinyField(), tmp_path / "q", num=1000, batch_size=500)
    np.testing.assert_array_equal(np.asarray(pf.targets), np.asarray(pf32.targets).astype(np.float16))


def test_seeds_are_distinct_and_a_pure_function_of_the_seed():
    s = seeds_for(3, 100_000)
    assert s.dtype == np.int64 and len(np.unique(s)) == 100_000
    np.testing.assert_array_equal(s[:10], seeds_for(3, 10))
    assert not np.array_equal(seeds_for(4, 10), s[:10])


def test_conditional_pairs_store_their_labels_and_use_guidance(tmp_path):
    model = TinyConditional()
    pf = _gen(model, tmp_path / "p", num=30, labels="balanced", guidance=2.0, batch_size=30)
    np.testing.assert_array_equal(pf.labels, np.arange(30) % 3)
    x0 = gaussian_noise(torch.from_numpy(np.asarray(pf.seeds)), (2,)).double()
    y = torch.from_numpy(pf.labels)
    m = model.double()
    x = x0
    with torch.no_grad():  # guided euler, written out: v_null + w (v_cond - v_null)
        for k in range(4):
            t = torch.full((30,), k / 4, dtype=torch.float64)
            vn, vc = m(x, t, y=torch.full_like(y, 3)), m(x, t, y=y)
            x = x + (vn + 2.0 * (vc - vn)) / 4
    np.testing.assert_allclose(np.asarray(pf.targets), x.numpy(), atol=1e-5)
    pf2 = _gen(TinyConditional(), tmp_path / "q", num=30, labels=np.full(30, 2), batch_size=30)
    assert (pf2.labels == 2).all()


def test_resume_after_kill_9_keeps_every_pair_once(tmp_path):
    out = tmp_path / "p"
    helper = Path(reflow_helpers.__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(helper.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(helper), str(out)], env=env)
    try:
        deadline = time.time() + 120
        done = 0
        while time.time() < deadline and proc.poll() is None:
            try:
                done = json.loads((out / "progress.json").read_text())["done"]
            except (OSError, ValueError):
                done = 0
            if done >= 16:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the generator finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = PairsFolder(out)  # opens after the kill: checksums of the finished blocks hold
    stale = [n for n in os.listdir(out) if ".tmp-" in n]
    assert 16 <= before.done < 64
    kept = np.array(before.targets[: before.done])
    model = TinyField()
    pf = _gen(model, out, num=64, nfe=2, batch_size=4)
    assert pf.complete and not [n for n in os.listdir(out) if ".tmp-" in n], stale
    assert model.calls == 2 * (64 - before.done)  # only the missing pairs were sampled (2 evaluations each)
    np.testing.assert_array_equal(np.asarray(pf.targets[: before.done]), kept)
    whole = _gen(TinyField(), tmp_path / "whole", num=64, nfe=2, batch_size=4)
    np.testing.assert_allclose(np.asarray(pf.targets), np.asarray(whole.targets), atol=1e-6)
    np.testing.assert_array_equal(pf.seeds, whole.seeds)


def test_power_durability_writes_the_same_folder(tmp_path):
    a = _gen(TinyField(), tmp_path / "a", durability="power")
    b = _gen(TinyField(), tmp_path / "b")
    np.testing.assert_array_equal(np.asarray(a.targets), np.asarray(b.targets))
    assert a.block_digests == b.block_digests and open_pairs(tmp_path / "a").complete


def test_a_second_run_on_a_finished_folder_samples_nothing(tmp_path):
    _gen(TinyField(), tmp_path / "p")
    model = TinyField()
    _gen(model, tmp_path / "p")
    assert model.calls == 0


# ---- bad input ---------------------------------------------------------------------------------------


def test_a_folder_from_another_model_or_settings_is_refused(tmp_path):
    out = tmp_path / "p"
    _gen(TinyField(), out)
    with pytest.raises(ValueError, match=r"was made by another model or other settings \(model:") as e:
        _gen(TinyField(seed=1), out)
    assert str(out) in str(e.value)
    with pytest.raises(ValueError, match="settings:.*'nfe': 4.*'nfe': 8"):
        _gen(TinyField(), out, nfe=8)
    with pytest.raises(ValueError, match="count: 40 -> 41"):
        _gen(TinyField(), out, num=41)
    with pytest.raises(ValueError, match="seeds differ"):
        _gen(TinyField(), out, seed=5)
    assert open_pairs(out).complete  # nothing written was lost


def test_damage_is_named(tmp_path):
    out = tmp_path / "p"
    _gen(TinyField(), out)
    t = out / "targets.npy"
    raw = bytearray(t.read_bytes())
    raw[-3] ^= 0x40
    t.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"targets.npy' fails its checksum in block 2 \(pairs 32..39\)"):
        open_pairs(out)
    t.write_bytes(bytes(raw[:-20]))
    with pytest.raises(ValueError, match="targets.npy' .*truncated"):
        open_pairs(out)
    s = out / "seeds.npy"
    raw = bytearray(s.read_bytes())
    raw[-1] ^= 1
    s.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"seeds.npy' \(seeds\) fails its checksum"):
        open_pairs(out)
    m = out / "manifest.json"
    m.write_text(m.read_text().replace('"nfe": 4', '"nfe": 5'))
    with pytest.raises(ValueError, match="manifest.*fails its checksum"):
        open_pairs(out)
    m.write_text(m.read_text()[:20])
    with pytest.raises(ValueError, match="manifest.*damaged or truncated"):
        open_pairs(out)


def test_missing_and_unfinished_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        open_pairs(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="other files"):
        _gen(TinyField(), tmp_path / "other")
    pf = _gen(TinyField(), tmp_path / "p", num=40)
    prog = tmp_path / "p" / "progress.json"
    from loom_kernels.reflow.store import _write_json

    _write_json(str(prog), {"done": 16, "digests": pf.block_digests[:1]})
    with pytest.raises(ValueError, match="holds 16 of 40 pairs: its generation was interrupted"):
        open_pairs(tmp_path / "p")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num": 0}, "num must be a positive integer"),
        ({"seeds": np.array([1, 2, 1, 3])}, "seeds has a seed collision"),
        ({"seeds": np.arange(3)}, r"seeds must be a \(4,\) integer array"),
        ({"method": "rk4"}, "method must be one of"),
        ({"nfe": 0}, "nfe must be a positive integer"),
        ({"dtype": "bfloat16"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"labels": "balanced"}, "labels were given but the model is not conditional"),
        ({"durability": "disk"}, "durability must be 'crash' or 'power'"),
        ({"commit_every": -1}, "commit_every must be a number of seconds >= 0"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kw, match):
    kw = {"num": 4, **kw}
    with pytest.raises(ValueError, match=match):
        _gen(TinyField(), tmp_path / "p", **kw)
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_a_conditional_model_needs_labels(tmp_path):
    with pytest.raises(ValueError, match=r"the model is conditional \(3 classes\): pass labels="):
        _gen(TinyConditional(), tmp_path / "p")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        _gen(TinyConditional(), tmp_path / "p", labels=np.full(40, 3))


def test_non_finite_targets_are_not_stored(tmp_path):
    class Bad(TinyField):
        def forward(self, x, t):
            return super().forward(x, t) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite targets for pairs 0..15"):
        _gen(Bad(), tmp_path / "p")
    assert PairsFolder(tmp_path / "p").done == 0

    class LateBad(TinyField):  # the second batch fails: the first one, already written, is kept
        def forward(self, x, t):
            self.calls += 0
            v = super().forward(x, t)
            return v * float("nan") if self.calls > 16 * 4 else v

    with pytest.raises(FloatingPointError, match="non-finite targets for pairs 16..31.*the 16 pairs before it"):
        _gen(LateBad(), tmp_path / "q", commit_every=3600)
    pf = PairsFolder(tmp_path / "q")
    assert pf.done == 16
    np.testing.assert_allclose(np.asarray(pf.targets[:16]), np.asarray(_gen(TinyField(), tmp_path / "r").targets[:16]))


def test_command_line(tmp_path, capsys):
    from loom_kernels.checkpoint import save_model

    model = TinyField()
    save_model(str(tmp_path / "model.pt"), model, metadata={})
    with pytest.raises(SystemExit, match="no model spec"):
        cli_main(["generate", "--model", str(tmp_path / "model.pt"), "--num", "8", "--nfe", "2", "--out", "x"])
    from loom_kernels import models

    mlp = models.MLPVelocity((2,), hidden=8, depth=1)
    save_model(str(tmp_path / "mlp.pt"), mlp, metadata={"model": mlp.spec})
    argv = ["generate", "--model", str(tmp_path / "mlp.pt"), "--num", "24", "--nfe", "2", "--out", str(tmp_path / "p")]
    assert cli_main([*argv, "--batch-size", "8", "--no-progress", "--device", "cpu"]) == 0
    assert "wrote 24 pairs" in capsys.readouterr().out
    assert open_pairs(tmp_path / "p").count == 24
    with pytest.raises(SystemExit, match="num must be a positive integer"):
        cli_main([*argv[:4], "0", *argv[5:], "--no-progress", "--device", "cpu"])
    with pytest.raises(SystemExit, match="settings"):
        cli_main([*argv[:-1], str(tmp_path / "p"), "--method", "heun", "--no-progress", "--device", "cpu"])


@pytest.mark.slow  # ~14 s on the loaded 2-core VM (a UNet); the Python-level conditional tests stay default
def test_command_line_conditional_model_needs_labels(tmp_path):
    from loom_kernels import models
    from loom_kernels.checkpoint import save_model

    unet = models.UNet((1, 8, 8), channels=8, channel_mult=(1,), num_classes=3)
    save_model(str(tmp_path / "u.pt"), unet, metadata={"model": unet.spec})
    argv = ["generate", "--model", str(tmp_path / "u.pt"), "--num", "6", "--nfe", "1", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit, match="the model is conditional"):
        cli_main([*argv, "--no-progress", "--device", "cpu"])
    np.save(tmp_path / "y.npy", np.array([0, 1, 2, 2, 1, 0]))
    assert cli_main([*argv, "--labels", str(tmp_path / "y.npy"), "--no-progress", "--device", "cpu"]) == 0
    np.testing.assert_array_equal(open_pairs(tmp_path / "p").labels, [0, 1, 2, 2, 1, 0])
    with pytest.raises(SystemExit, match="--labels 'nope.npy': not 'balanced' nor a readable .npy"):
        cli_main([*argv, "--labels", "nope.npy"])
    # A reflow run on the labelled pairs: the trainer's CLI makes the model conditional from the pairs.
    from loom_kernels.checkpoint import load_checkpoint
    from loom_kernels.cli import train as train_cli

    run = ["--coupling", "reflow", "--pairs", str(tmp_path / "p"), "--model", "unet", "--channels", "8"]
    run += ["--channel-mult", "1", "--batch-size", "6", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    run += ["--init-from", str(tmp_path / "u.pt"), "--out", str(tmp_path / "r"), "--no-progress"]
    assert train_cli.main(run) == 0
    assert load_checkpoint(str(tmp_path / "r" / "model.pt"))["metadata"]["model"]["num_classes"] == 3


def test_a_continuous_condition_is_passed_to_the_model_and_stored(tmp_path):
    class CondField(TinyField):
        def forward(self, x, t, cond=None):
            return super().forward(x, t) + cond

    cond = torch.linspace(-1, 1, 12)[:, None].repeat(1, 2)
    pf = _gen(CondField(), tmp_path / "p", num=12, cond=cond, nfe=2)
    np.testing.assert_array_equal(pf.cond, cond.numpy())
    x0 = gaussian_noise(torch.from_numpy(np.asarray(pf.seeds)), (2,))
    ref = euler_reference(CondField(), x0, 2, cond=cond.double())
    np.testing.assert_allclose(np.asarray(pf.targets), ref.numpy(), atol=1e-5)
    assert open_pairs(tmp_path / "p").cond.shape == (12, 2)
    with pytest.raises(ValueError, match="cond differ"):
        _gen(CondField(), tmp_path / "p", num=12, cond=cond + 1, nfe=2)
    with pytest.raises(ValueError, match=r"cond must be a finite \(12, Dc\)"):
        _gen(CondField(), tmp_path / "q", num=12, cond=cond[:5], nfe=2)
