"""Public paths that had no test: the top-level package's lazy names and has_cuda(), load_model(model=...),
the sample command line in-process (dopri5, --weights raw, --seed, image --plot, --n > --batch-size, its
argument checks) and ``python -m loom_kernels.study`` with --jobs 2 (one subprocess)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import loom_kernels
from loom_kernels.checkpoint import load_model, save_model
from loom_kernels.cli.sample import main as sample_main
from loom_kernels.models import MLPVelocity
from loom_kernels.sampler import sample

# ---- the top-level package ---------------------------------------------------------------------------


def test_top_level_names_are_the_submodules_objects():
    import importlib

    where = {
        "linear_sum_assignment": "assign",
        "pairwise_cost": "cost",
        "gaussian_noise": "noise",
        "IndependentCoupling": "couplings",
        "MinibatchOTCoupling": "couplings",
        "LoomCoupling": "couplings",
        "w2": "metrics",
        "straightness": "metrics",
        "coupling_cost": "metrics",
    }
    assert set(loom_kernels.__all__) == set(where) | {"has_cuda", "__version__"}
    for name, mod in where.items():
        assert getattr(loom_kernels, name) is getattr(importlib.import_module(f"loom_kernels.{mod}"), name), name
    from loom_kernels import LoomCoupling, linear_sum_assignment  # the `from` form goes through __getattr__ too

    rows, cols = linear_sum_assignment(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    assert LoomCoupling(4, (2,)).seeds.shape == (4, 1)
    with pytest.raises(AttributeError, match="has no attribute 'assign_batch'"):
        loom_kernels.assign_batch  # noqa: B018
    assert isinstance(loom_kernels.__version__, str)


def test_has_cuda_follows_the_native_module(monkeypatch):
    from loom_kernels import _native

    assert loom_kernels.has_cuda() is _native.has_cuda()
    if not torch.cuda.is_available():
        assert loom_kernels.has_cuda() is False
    monkeypatch.setattr(_native, "has_cuda", lambda: True)  # the package asks _native at call time
    assert loom_kernels.has_cuda() is True


def test_import_needs_numpy_only(tmp_path):
    code = "import sys, loom_kernels; assert 'torch' not in sys.modules and 'triton' not in sys.modules, sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stderr


# ---- load_model(model=...) -----------------------------------------------------------------------------


def test_load_model_into_a_given_module(tmp_path):
    torch.manual_seed(0)
    saved = MLPVelocity((2,), hidden=8, depth=1)
    path = str(tmp_path / "model.pt")
    save_model(path, saved)  # no spec in the metadata: only load_model(model=...) can read it
    with pytest.raises(ValueError, match="has no model spec in its metadata: pass the model"):
        load_model(path)
    into = MLPVelocity((2,), hidden=8, depth=1)
    got = load_model(path, model=into)
    assert got is into
    for k, v in saved.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(path, model=MLPVelocity((2,), hidden=16, depth=1))


# ---- the sample command line, in-process --------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-D run of 3 steps (model.pt with the EMA, checkpoint.pt with the raw weights too) and an image model."""
    from loom_kernels.cli.train import main as train_main

    out = tmp_path_factory.mktemp("run")
    assert train_main(
        [
            "--data",
            "moons",
            "--coupling",
            "independent",
            "--points",
            "64",
            "--batch-size",
            "16",
            "--hidden",
            "8",
            "--depth",
            "1",
            "--steps",
            "3",
            "--warmup",
            "0",
            "--ema-decay",
            "0.5",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    ) in (0, None)
    torch.manual_seed(1)
    img = MLPVelocity((1, 8, 8), hidden=8, depth=1)
    save_model(str(out / "image.pt"), img, metadata={"model": img.spec})
    return out


def _sample(argv, capsys):
    assert sample_main([str(a) for a in argv] + ["--device", "cpu"]) == 0
    return capsys.readouterr().out


def _expected(model, n, shape, seed, batch, nfe, method, **kw):
    """The documented noise: one generator seeded with --seed, drawn batch by batch."""
    gen = torch.Generator().manual_seed(seed)
    out, nfes = [], []
    for start in range(0, n, batch):
        info = {}
        x0 = torch.randn(min(batch, n - start), *shape, generator=gen)
        out.append(sample(model, x0, nfe, method=method, info=info, **kw))
        nfes.append(info["nfe"])
    return torch.cat(out).numpy(), nfes


def test_sample_cli_dopri5_reports_the_nfe_it_made(run_dir, tmp_path, capsys):
    npy = tmp_path / "d.npy"
    text = _sample(
        [
            "--ckpt",
            run_dir / "model.pt",
            "--method",
            "dopri5",
            "--rtol",
            "1e-3",
            "--atol",
            "1e-3",
            "--n",
            "12",
            "--out",
            npy,
        ],
        capsys,
    )
    net = load_model(str(run_dir / "model.pt")).eval()
    want, nfes = _expected(net, 12, (2,), 0, 4096, None, "dopri5", rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.load(npy), want, rtol=0, atol=1e-6)
    assert f"(dopri5, NFE {nfes[0]})" in text and nfes[0] >= 8 and nfes[0] != 4, text  # not --nfe's default


def test_sample_cli_weights_seed_and_batches(run_dir, tmp_path, capsys):
    ema, raw = (load_model(str(run_dir / "checkpoint.pt"), weights=w).eval() for w in ("ema", "raw"))
    outs = {}
    for name, extra in {
        "ema": [],
        "raw": ["--weights", "raw"],
        "seed": ["--seed", "7"],
        "batches": ["--batch-size", "4"],
    }.items():
        npy = tmp_path / f"{name}.npy"
        text = _sample(
            [
                "--ckpt",
                run_dir / "checkpoint.pt",
                "--n",
                "10",
                "--nfe",
                "2",
                "--method",
                "midpoint",
                "--out",
                npy,
                *extra,
            ],
            capsys,
        )
        assert "(midpoint, NFE 2)" in text
        outs[name] = np.load(npy)
        assert outs[name].shape == (10, 2)
    np.testing.assert_allclose(outs["ema"], _expected(ema, 10, (2,), 0, 4096, 2, "midpoint")[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs["raw"], _expected(raw, 10, (2,), 0, 4096, 2, "midpoint")[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(outs["seed"], _expected(ema, 10, (2,), 7, 4096, 2, "midpoint")[0], rtol=0, atol=1e-6)
    # --n > --batch-size: three sampler calls (4 + 4 + 2), all n samples, the noise drawn batch by batch
    np.testing.assert_allclose(outs["batches"], _expected(ema, 10, (2,), 0, 4, 2, "midpoint")[0], rtol=0, atol=1e-6)
    assert not np.allclose(outs["raw"], outs["ema"]) and not np.allclose(outs["seed"], outs["ema"])


def test_sample_cli_image_plot(run_dir, tmp_path, capsys):
    import matplotlib.image

    npy, png = tmp_path / "i.npy", tmp_path / "i.png"
    text = _sample(["--ckpt", run_dir / "image.pt", "--n", "9", "--out", npy, "--plot", png], capsys)
    assert np.load(npy).shape == (9, 1, 8, 8) and f"wrote {png}" in text
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0  # a real picture, not a blank


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--n", "0"], "--n must be positive, got 0"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--out", "x.txt"], "--out must end in .npy"),
        (["--method", "dopri5", "--nfe", "8"], "--nfe is for the fixed-step methods"),
        (["--nfe", "0"], "--nfe must be positive, got 0"),
        (["--method", "heun", "--nfe", "3"], "--nfe must be positive and even for heun, got 3"),
        (["--label", "1"], "--label/--guidance need a class-conditional model"),
    ],
)
def test_sample_cli_argument_checks(run_dir, tmp_path, argv, match):
    npy = tmp_path / "x.npy"
    with pytest.raises(SystemExit, match=match):
        sample_main(["--ckpt", str(run_dir / "model.pt"), "--out", str(npy), "--device", "cpu", *argv])
    assert not npy.exists()


def test_sample_cli_refusals(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ckpt .*holds only the EMA weights; weights='raw' needs checkpoint.pt"):
        sample_main(["--ckpt", str(run_dir / "model.pt"), "--weights", "raw", "--out", str(tmp_path / "x.npy")])
    with pytest.raises(SystemExit) as exc:
        sample_main(["--ckpt", str(run_dir / "model.pt"), "--method", "rk4"])
    assert exc.value.code == 2 and "invalid choice: 'rk4'" in capsys.readouterr().err


# ---- python -m loom_kernels.study ----------------------------------------------------------------------


@pytest.mark.slow  # three interpreters (the command and its two workers) importing torch: ~25 s on 2 cores
def test_study_module_with_two_jobs_matches_a_direct_run(tmp_path):
    from loom_kernels.experiments import study

    out = tmp_path / "s"
    argv = [
        "--data",
        "8gaussians",
        "--variants",
        "ot",
        "loom1",
        "--seeds",
        "1",
        "--steps",
        "6",
        "--points",
        "64",
        "--n-eval",
        "32",
        "--batch-size",
        "16",
        "--jobs",
        "2",
        "--out",
        str(out),
    ]
    res = subprocess.run(
        [sys.executable, "-m", "loom_kernels.study", *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 at a time" in res.stdout and "[2/2" in res.stdout
    for name in ("study.csv", "study_summary.csv", "study.md", "study.png"):
        assert os.path.getsize(out / name) > 100, name
    # a worker's record equals the same run made here, in this process
    settings = study.settings(study._parser().parse_args(argv), "8gaussians")
    direct = json.loads(json.dumps(study.run_one("8gaussians", "loom1", 0, settings)))
    runs = {}
    for name in os.listdir(out / "runs"):
        with open(out / "runs" / name) as f:
            rec = json.load(f)
        runs[rec["variant"]] = rec
    assert set(runs) == {"ot", "loom1"}
    # (workers run one thread each; this process may sum in another order: equal to float32 rounding)
    assert runs["loom1"]["w2_fresh"] == pytest.approx(direct["w2_fresh"], rel=1e-4)
    assert np.allclose(runs["loom1"]["dataset_cost_curve"], direct["dataset_cost_curve"], rtol=1e-4)


# ---- the couplings' old module paths (issue 30: couplings/ as scopes/ and loom/) ---------------------------


def test_the_couplings_old_module_paths_give_the_new_objects():
    import importlib

    from loom_kernels.couplings import scopes
    from loom_kernels.couplings.loom import persistence, seed_stream
    from loom_kernels.couplings.loom.tables import file_lock, journal, replicated, shard_files, sharded
    from loom_kernels.couplings.scopes import cost_model, group, partition, solve

    base = importlib.import_module("loom_kernels.couplings.base")
    old = {
        "common": {"add_cond_cost": solve, "check_cond": base, "cost_dtype": solve, "to_device": group},
        "distributed": {"count_bytes": group, "Group": group},
        "grouped": {
            "Partition": partition,
            "predicted_coupling_seconds": cost_model,
            "TYPICAL_STEP_S_PER_ITEM": cost_model,
        },
        "table": {"TableInUseError": file_lock, "seed_values": seed_stream, "journal_path": journal},
        "sharded": {"SHARD_KIND": shard_files, "shard_path": shard_files},
        "journal": {"TableInUseError": file_lock, "DURABILITIES": journal, "recover": journal},
    }
    for mod, names in old.items():
        m = importlib.import_module(f"loom_kernels.couplings.{mod}")
        for name, new in names.items():
            assert getattr(m, name) is getattr(new, name), (mod, name)
    t = importlib.import_module("loom_kernels.couplings.table")
    s = importlib.import_module("loom_kernels.couplings.sharded")
    assert t.SeedTable is replicated.ReplicatedTable and s.ShardedSeedTable is sharded.ShardedTable
    assert persistence.FORMAT_VERSION == 2 and scopes.__doc__
    from loom_kernels.compat.torchcfm.loom import LoomCoupling as compat_loom
    from loom_kernels.coupling import IndependentCoupling, LoomCoupling, MinibatchOTCoupling
    from loom_kernels.couplings import COUPLINGS, PrefetchCoupling, SinkhornCoupling, make_coupling
    from loom_kernels.couplings.prefetch import PrefetchCoupling as old_prefetch

    assert compat_loom is LoomCoupling and old_prefetch is PrefetchCoupling
    assert {IndependentCoupling, MinibatchOTCoupling} <= set(type(make_coupling(n)) for n in ("independent", "ot"))
    assert isinstance(make_coupling("sinkhorn", epsilon=0.1), SinkhornCoupling)
    with pytest.raises(ValueError, match="coupling must be one of"):
        make_coupling("nope")
    from loom_kernels.cli import train as cli_train

    assert cli_train.COUPLINGS is COUPLINGS  # the CLI's --coupling choices are the factory's one list
