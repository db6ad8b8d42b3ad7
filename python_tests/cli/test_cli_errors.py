"""The command lines' errors: one line naming the option and the fix, no traceback (``--debug`` shows it);
resume mismatches named by option; warnings for integer or unscaled data; every default shown once in --help."""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from loom_kernels.cli import sample as sample_cli
from loom_kernels.cli import train as train_cli
from loom_kernels.experiments import demo, study

TINY = ["--points", "64", "--batch-size", "16", "--hidden", "8", "--depth", "1", "--steps", "2", "--no-progress"]


def _train(argv):
    """``python -m loom_kernels.train argv`` at a tiny size, in this process."""
    return train_cli.main([*argv, *TINY])


def _error(main, argv, capsys=None) -> str:
    """The message of the SystemExit that ``main(argv)`` ends with; it must be one line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    msg = str(exc.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_error_is_one_line_and_debug_shows_the_traceback():
    argv = ["--data", "moon", "--coupling", "ot", "--out", "x"]
    assert _error(train_cli.main, argv) == (
        "python -m loom_kernels.train: error: --data moon: data must be one of ('8gaussians', 'moons', "
        "'checkerboard', 'digits') or a path ending in .npy or .npz, got 'moon'"
    )
    with pytest.raises(Exception, match="--data moon: data must be one of") as exc:  # --debug: the exception itself
        train_cli.main([*argv, "--debug"])
    assert isinstance(exc.value.__cause__, ValueError)


@pytest.mark.slow  # two launches (~5 s each); the in-process test above checks the same message
def test_python_m_error_has_no_traceback():
    argv = [sys.executable, "-m", "loom_kernels.train", "--data", "moon", "--coupling", "ot", "--out", "x"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(argv, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "error: --data moon: data must be one of" in p.stderr
    p = subprocess.run(
        [*argv, "--debug"], capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=120
    )
    assert p.returncode == 1 and "Traceback" in p.stderr and "ValueError: data must be one of" in p.stderr


def test_data_errors_name_the_option(tmp_path):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "nope.npy")
    assert _error(_train, ["--data", missing, "--coupling", "ot", "--out", out]).endswith(
        f"error: --data {missing}: data file {missing!r} does not exist"
    )
    flat = str(tmp_path / "flat.npy")
    np.save(flat, np.zeros(100, np.float32))
    assert f"--data {flat}: data file {flat!r} must hold an array of shape (N, *shape), got shape (100,)" in _error(
        _train, ["--data", flat, "--coupling", "ot", "--out", out]
    )
    nan = str(tmp_path / "nan.npy")
    np.save(nan, np.full((100, 2), np.nan, np.float32))
    assert f"--data {nan}: data file {nan!r} contains NaN or inf entries" in _error(
        _train, ["--data", nan, "--coupling", "ot", "--out", out]
    )
    few = str(tmp_path / "few.npy")
    np.save(few, np.zeros((10, 2), np.float32))
    msg = _error(
        train_cli.main, ["--data", few, "--coupling", "ot", "--out", out, "--batch-size", "32", "--holdout", "0"]
    )
    assert "--batch-size 32: the training set has 10 items, fewer than one global batch" in msg
    assert "lower --batch-size" in msg
    msg = _error(
        _train, ["--data", "digits", "--coupling", "ot", "--out", out, "--model", "unet", "--channel-mult", "1,x"]
    )
    assert "--channel-mult must be integers separated by commas" in msg


def test_missing_checkpoint_names_ckpt(tmp_path):
    ckpt = str(tmp_path / "model.pt")
    msg = _error(sample_cli.main, ["--ckpt", ckpt, "--out", str(tmp_path / "s.npy")])
    assert msg == f"python -m loom_kernels.sample: error: --ckpt {ckpt}: checkpoint {ckpt!r} does not exist"


def test_existing_run_without_resume_is_refused(tmp_path):
    out = str(tmp_path / "run")
    assert _train(["--data", "moons", "--coupling", "ot", "--out", out]) == 0
    msg = _error(_train, ["--data", "moons", "--coupling", "ot", "--out", out])
    ckpt = os.path.join(out, "checkpoint.pt")
    assert msg.endswith(f"--out: {ckpt} exists; add --resume to continue that run, or choose another --out")


def test_warnings_for_integer_and_unscaled_data(tmp_path, capsys):
    ints = str(tmp_path / "ints.npy")
    np.save(ints, np.random.default_rng(0).integers(0, 256, (80, 2)).astype(np.uint8))
    assert _train(["--data", ints, "--coupling", "ot", "--out", str(tmp_path / "a"), "--holdout", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: data file" in err and "holds integers (range" in err and "x / 127.5 - 1" in err
    big = str(tmp_path / "big.npy")
    np.save(big, np.random.default_rng(0).normal(0, 1000, (80, 2)).astype(np.float32))
    assert _train(["--data", big, "--coupling", "ot", "--out", str(tmp_path / "b"), "--holdout", "0"]) == 0
    err = capsys.readouterr().err
    assert "far from the N(0, I) noise" in err and "holds integers" not in err
    assert _train(["--data", "moons", "--coupling", "ot", "--out", str(tmp_path / "c")]) == 0
    assert "warning" not in capsys.readouterr().err  # scaled data: no warning


def test_resume_without_checkpoint_says_so_or_refuses(tmp_path, capsys):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint.pt")
    msg = _error(_train, ["--data", "moons", "--coupling", "ot", "--out", out, "--resume", "must"])
    assert f"--resume must: there is no checkpoint {ckpt}" in msg and "drop --resume" in msg
    assert not os.path.exists(ckpt)
    assert _train(["--data", "moons", "--coupling", "ot", "--out", out, "--resume"]) == 0
    assert f"--resume: there is no checkpoint {ckpt} yet: starting a new run from step 0" in capsys.readouterr().err
    assert os.path.exists(ckpt)


@pytest.mark.parametrize(
    "change, named, fix",
    [
        (["--coupling", "ot"], "--coupling ot (the checkpoint has --coupling loom)", "resume with --coupling loom"),
        (["--num-caches", "4"], "--num-caches 4 (the checkpoint has --num-caches 2)", "resume with --num-caches 2"),
        (["--hidden", "16"], "--hidden 16 (the checkpoint has --hidden 8)", "resume with --hidden 8"),
        (["--batch-size", "32"], "--batch-size 32 (the checkpoint has --batch-size 16)", "resume with --batch-size 16"),
    ],
)
def test_resume_with_other_settings_names_each_option(tmp_path, change, named, fix):
    out = str(tmp_path / "run")
    base = ["--data", "moons", "--coupling", "loom", "--num-caches", "2", "--out", out, *TINY]
    assert train_cli.main(base) == 0

    def edited(argv, opt, value):
        i = argv.index(opt)
        return argv[: i + 1] + [value] + argv[i + 2 :]

    msg = _error(train_cli.main, [*edited(base, change[0], change[1]), "--resume"])
    assert named in msg and fix in msg and "another --out" in msg, msg


@pytest.mark.parametrize("module", [train_cli, sample_cli, demo, study])
def test_help_shows_each_default_once(module):
    parser = module._parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        shows = not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        assert text.count("default") == (1 if shows else 0), (action.dest, text)
        assert "(default " not in text, (action.dest, text)  # a default spelled out beside argparse's
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
