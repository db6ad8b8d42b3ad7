"""Built-in data sets: shapes, ranges, determinism, held-out splits, .npy loading, errors."""

import numpy as np
import pytest
import torch

from loom_kernels import data


@pytest.mark.parametrize("name", data.TOY_2D)
def test_toy_shapes_determinism_and_split(name):
    a = data.load(name, n=300, seed=3)
    b = data.load(name, n=300, seed=3)
    c = data.load(name, n=300, seed=4)
    test = data.load(name, "test", n=300, seed=3)
    assert a.shape == (300, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, test)  # the held-out split is another draw
    assert torch.isfinite(a).all()
    # Roughly the scale of N(0, I) noise: centered, not degenerate, bounded.
    assert a.abs().max() < 10 and a.std() > 0.3
    assert a.mean(0).abs().max() < 1.0


def test_8gaussians_has_eight_modes():
    x = data.load("8gaussians", n=4000, seed=0)
    angles = torch.atan2(x[:, 1], x[:, 0])
    mode = torch.round(angles / (2 * np.pi / 8)) % 8
    counts = torch.bincount(mode.long(), minlength=8)
    assert (counts > 350).all()
    assert ((x.norm(dim=1) - 4).abs() < 2.5).float().mean() > 0.99


def test_checkerboard_occupies_alternate_squares():
    x = data.load("checkerboard", n=4000, seed=0) / 2.0  # back to unit squares
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert parity.unique().numel() == 1


def _assert_partition(allx, tr, te):
    """The rows of ``tr`` and ``te`` together are the rows of ``allx``, each used once (multisets)."""
    rows = lambda t: sorted(tuple(r) for r in t.reshape(len(t), -1).tolist())  # noqa: E731
    assert rows(torch.cat([tr, te])) == rows(allx)


def test_digits_range_shape_and_holdout():
    tr = data.load("digits", "train")
    te = data.load("digits", "test")
    allx = data.load("digits", "all")
    assert tr.shape[1:] == (1, 8, 8) and allx.shape == (1797, 1, 8, 8)
    assert tr.shape[0] + te.shape[0] == 1797 and te.shape[0] == round(0.2 * 1797)
    assert tr.min() >= -1 and tr.max() <= 1 and tr.min() == -1 and tr.max() == 1
    # Train and test partition the rows: every row of "all" is in exactly one of them (as multisets:
    # load_digits has a few duplicate images), and "all" is scikit-learn's set scaled to [-1, 1].
    _assert_partition(allx, tr, te)
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(allx.numpy()[:, 0], load_digits().images.astype(np.float32) / 8 - 1)
    assert torch.equal(data.load("digits", "train", seed=0), tr)
    assert not torch.equal(data.load("digits", "train", seed=1), tr)


def test_npy_round_trip_and_n(tmp_path):
    x = np.random.randn(50, 3, 4).astype(np.float64)
    p = str(tmp_path / "x.npy")
    np.save(p, x)
    allx = data.load(p, "all")
    assert allx.dtype == torch.float32 and allx.shape == (50, 3, 4)
    np.testing.assert_allclose(allx.numpy(), x.astype(np.float32))
    tr, te = data.load(p, "train", holdout=0.1), data.load(p, "test", holdout=0.1)
    assert len(tr) == 45 and len(te) == 5
    _assert_partition(allx, tr, te)
    assert data.load(p, "train", n=7).shape == (7, 3, 4)
    ints = tmp_path / "i.npy"
    np.save(ints, np.arange(12).reshape(6, 2))
    assert data.load(str(ints), "all").dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(name="nope"), ValueError, "data must be one of"),
        (dict(name="moons", split="val"), ValueError, "split must be one of"),
        (dict(name="moons", n=0), ValueError, "n must be a positive integer"),
        (dict(name="moons", split="all"), ValueError, "split='all'"),
        (dict(name="digits", holdout=1.0), ValueError, "holdout"),
        (dict(name="/no/such/file.npy"), FileNotFoundError, "does not exist"),
    ],
)
def test_load_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        data.load(**kwargs)


def test_npy_errors(tmp_path):
    bad = tmp_path / "nan.npy"
    np.save(bad, np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        data.load(str(bad), "all")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(N, \*shape\)"):
        data.load(str(flat), "all")
    strings = tmp_path / "s.npy"
    np.save(strings, np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="real numbers"):
        data.load(str(strings), "all")
    tiny = tmp_path / "tiny.npy"
    np.save(tiny, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no test rows"):
        data.load(str(tiny), "test", holdout=0.1)


def test_indexed_dataset():
    x = torch.randn(10, 2)
    ds = data.IndexedDataset(x)
    assert len(ds) == 10 and ds.shape == (2,)
    i, xi = ds[7]
    assert i == 7 and torch.equal(xi, x[7])
    with pytest.raises(ValueError, match=r"shape \(N, \*shape\)"):
        data.IndexedDataset(torch.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(N, \*shape\)"):
        data.IndexedDataset(np.zeros((5, 2)))


def test_npz_with_labels_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, 20)
    p = str(tmp_path / "d.npz")
    np.savez(p, x=x, y=y)
    xs, ys = data.load_labeled(p, "all")
    assert torch.equal(xs, torch.from_numpy(x)) and ys.tolist() == y.tolist()
    xt, yt = data.load_labeled(p, "train", seed=3)
    assert torch.equal(xt, data.load(p, "train", seed=3)) and len(yt) == len(xt)
    for i in range(len(xt)):  # labels follow their rows through the split
        j = int(np.flatnonzero((x == xt[i].numpy()).all(axis=(1, 2, 3)))[0])
        assert yt[i] == y[j]
    np.savez(str(tmp_path / "bad.npz"), x=x, y=y[:5])
    with pytest.raises(ValueError, match=r"labels 'y' must be integers of shape \(20,\) matching 'x'"):
        data.load_labeled(str(tmp_path / "bad.npz"))
    np.savez(str(tmp_path / "badf.npz"), x=x, y=y.astype(np.float32))
    with pytest.raises(ValueError, match="labels 'y' must be integers"):
        data.load_labeled(str(tmp_path / "badf.npz"))
    np.savez(str(tmp_path / "two.npz"), a=x, b=x)
    with pytest.raises(ValueError, match="must hold an array 'x'"):
        data.load(str(tmp_path / "two.npz"))
    np.savez(str(tmp_path / "nolab.npz"), x=x)
    assert data.load_labeled(str(tmp_path / "nolab.npz"))[1] is None


def test_labeled_and_flip_datasets():
    x, y = data.load_labeled("digits", n=10)
    assert y.dtype == torch.int64 and int(y.max()) <= 9
    ds = data.FlipDataset(data.LabeledDataset(x, y))
    assert len(ds) == 20
    i, xi, yi = ds[13]
    assert i == 13 and torch.equal(xi, x[3].flip(-1)) and yi == y[3]
    xb, yb = ds.batch(torch.tensor([3, 13]))
    assert torch.equal(xb[0], x[3]) and torch.equal(xb[1], x[3].flip(-1)) and yb.tolist() == [y[3], y[3]]
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(10,\)"):
        data.LabeledDataset(x, y[:4])
    with pytest.raises(ValueError, match="FlipDataset needs"):
        data.FlipDataset(data.IndexedDataset(torch.zeros(4, 2)))
