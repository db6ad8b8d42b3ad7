"""Built-in finite data sets for the trainer, the demo and the tests; nothing is downloaded.

2-D toy sets (``8gaussians``, ``moons``, ``checkerboard``) are a fixed number of points drawn from
a seed, so a "data set" is a finite set of points, which is what LOOM-CFM couples globally; the
held-out split is a second draw with another seed. ``digits`` is scikit-learn's bundled
``load_digits`` (1797 8x8 images) scaled to [-1, 1], with its labels 0-9; a user's ``.npy`` file
holds ``(N, *shape)``, a ``.npz`` file ``x`` ``(N, *shape)`` and optionally integer labels ``y`` ``(N,)``.
Those hold out a fixed, seeded fraction of the rows. :func:`load_labeled` returns the labels too.

Datasets for the trainer: :class:`IndexedDataset` yields ``(i, x_i)``, :class:`LabeledDataset`
``(i, x_i, y_i)``; :class:`FlipDataset` adds the horizontally flipped view of item ``i`` as item
``i + N`` (``2 N`` items), as the LOOM-CFM code does, so each view keeps its own noise.

Checkerboard follows the FFJORD toy set (Grathwohl et al., 2019); moons is scikit-learn's.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from ._optional import require

TOY_2D = ("8gaussians", "moons", "checkerboard")
BUILTIN = TOY_2D + ("digits",)
SPLITS = ("train", "test", "all")

# The held-out draw of a 2-D set uses seed + this offset, so train and test never share a stream.
_TEST_SEED_OFFSET = 1_000_003


def _toy_2d(name: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "8gaussians":
        # Eight modes on a circle of radius 4 with std 0.5: far from N(0, I) and multi-modal, so
        # independent pairing gives visibly curved flows (as in TorchCFM's toy experiments).
        angles = 2.0 * math.pi * rng.integers(0, 8, size=n) / 8.0
        centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centers + 0.5 * rng.standard_normal((n, 2))
    elif name == "moons":
        make_moons = require("sklearn.datasets", "the 'moons' data set").make_moons
        x, _ = make_moons(n_samples=n, noise=0.05, random_state=int(rng.integers(2**31)))
        # Center and scale to roughly unit variance per axis, the scale of the noise.
        x = (x - np.array([0.5, 0.25])) * np.array([2.0, 4.0])
    elif name == "checkerboard":
        x1 = rng.uniform(-2.0, 2.0, size=n)
        x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n)
        x2 = x2 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1) * 2.0
    else:  # pragma: no cover - guarded by load()
        raise ValueError(f"unknown 2-D data set {name!r}")
    return x.astype(np.float32)


def _holdout_split(x: np.ndarray, split: str, holdout: float, seed: int) -> np.ndarray:
    if split == "all":
        return x
    n = x.shape[0]
    n_test = int(round(holdout * n))
    if split == "test" and n_test == 0:
        raise ValueError(f"holdout={holdout} leaves no test rows out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    rows = np.sort(perm[:n_test] if split == "test" else perm[n_test:])
    return x[rows]


def _check_array(x: np.ndarray, name: str, what: str = "an array of shape (N, *shape)") -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"data file {name!r} must hold {what}, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"data file {name!r} must hold real numbers, got dtype {x.dtype}")
    integers = np.issubdtype(x.dtype, np.integer)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"data file {name!r} contains NaN or inf entries")
    _warn_scale(x, name, integers)
    return x


def _warn_scale(x: np.ndarray, name: str, integers: bool) -> None:
    """Warns about data far from the noise's scale: the flow carries N(0, I) noise to it, and raw pixel values
    (0..255) or unscaled features train poorly. A warning, not an error: the data may be meant that way."""
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if integers:
        warnings.warn(
            f"data file {name!r} holds integers (range {lo:g}..{hi:g}), used as floats unscaled; the noise is "
            "N(0, I): scale the data to about [-1, 1] first (8-bit images: x / 127.5 - 1)",
            UserWarning,
            stacklevel=4,
        )
    elif max(abs(lo), abs(hi)) > 50:
        warnings.warn(
            f"data file {name!r} spans {lo:g}..{hi:g}, far from the N(0, I) noise it is paired with: scale it "
            "to about [-1, 1] or unit variance first",
            UserWarning,
            stacklevel=4,
        )


def _read_npz(name: str):
    with np.load(name, allow_pickle=False) as z:
        keys = list(z.keys())
        if "x" not in keys and len(keys) != 1:
            raise ValueError(
                f"data file {name!r} must hold an array 'x' (N, *shape) and optionally labels 'y' (N,), "
                f"got arrays {keys}"
            )
        x = _check_array(z["x"] if "x" in keys else z[keys[0]], name, "'x' of shape (N, *shape)")
        y = z["y"] if "y" in keys else None
    if y is not None:
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"data file {name!r}: labels 'y' must be integers of shape ({x.shape[0]},) matching 'x' "
                f"{x.shape}, got {y.dtype} {y.shape}"
            )
        if y.size and y.min() < 0:
            raise ValueError(f"data file {name!r}: labels 'y' must be >= 0 (class indices), got min {y.min()}")
        y = y.astype(np.int64)
    return x, y


def _load_arrays(name: str):
    """(x, y or None) of a named set or file, before any split."""
    if name == "digits":
        d = require("sklearn.datasets", "the 'digits' data set").load_digits()
        images = d.images.astype(np.float32)  # (1797, 8, 8), values 0..16
        return (images / 8.0 - 1.0)[:, None], d.target.astype(np.int64)
    if str(name).endswith((".npy", ".npz")):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"data file {name!r} does not exist")
        if str(name).endswith(".npz"):
            return _read_npz(name)
        return _check_array(np.load(name, allow_pickle=False), name), None
    raise ValueError(f"data must be one of {BUILTIN} or a path ending in .npy or .npz, got {name!r}")


def load_labeled(
    name: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    holdout: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A finite data set and its labels: ``(x float32 (N, *shape), y int64 (N,) or None)``.

    Same arguments as :func:`load`; ``y`` is None for the 2-D sets, ``.npy`` files and ``.npz``
    files without ``y``.

    Example:
        >>> x, y = load_labeled("digits")
        >>> x.shape[1:], int(y.max())
        (torch.Size([1, 8, 8]), 9)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and (not isinstance(n, (int, np.integer)) or n <= 0):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")

    if name in TOY_2D:
        if split == "all":
            raise ValueError(f"split='all' is not defined for the 2-D set {name!r}: use 'train' or 'test'")
        draw_seed = seed + (_TEST_SEED_OFFSET if split == "test" else 0)
        return torch.from_numpy(_toy_2d(name, 4096 if n is None else int(n), draw_seed)), None

    x, y = _load_arrays(name)
    x = _holdout_split(x, split, holdout, seed)
    y = None if y is None else _holdout_split(y, split, holdout, seed)
    if n is not None:
        x, y = x[: int(n)], (None if y is None else y[: int(n)])
    if x.shape[0] == 0:
        raise ValueError(f"data set {name!r} split {split!r} is empty")
    return torch.from_numpy(np.ascontiguousarray(x)), (None if y is None else torch.from_numpy(np.ascontiguousarray(y)))


def load(
    name: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    holdout: float = 0.2,
) -> torch.Tensor:
    """A finite data set as a float32 tensor ``(N, *shape)`` (labels, if any, dropped: see :func:`load_labeled`).

    Args:
        name: ``"8gaussians"``, ``"moons"``, ``"checkerboard"`` (shape ``(2,)``), ``"digits"``
            (shape ``(1, 8, 8)``, values in [-1, 1]), a ``.npy`` file ``(N, *shape)`` or a ``.npz``
            file with ``x`` ``(N, *shape)`` (and optional labels ``y``).
        split: ``"train"``, ``"test"`` (held out) or ``"all"``.
        n: number of points of a 2-D set (default 4096 for train, the same for test); for
            digits and files, keeps the first ``n`` rows of the split.
        seed: the draw of a 2-D set, and the held-out permutation of digits / files.
        holdout: held-out fraction for digits and files.

    Example:
        >>> x = load("8gaussians", n=1000, seed=0)
        >>> x.shape
        torch.Size([1000, 2])
    """
    return load_labeled(name, split, n=n, seed=seed, holdout=holdout)[0]


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a tensor ``(N, *shape)`` so that item ``i`` is ``(i, data[i])``, as the trainer expects.

    Example:
        >>> ds = IndexedDataset(torch.zeros(10, 2))
        >>> ds[3][0], ds[3][1].shape
        (3, torch.Size([2]))
    """

    def __init__(self, data: torch.Tensor):
        if not isinstance(data, torch.Tensor) or data.ndim < 2:
            got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"data must be a tensor of shape (N, *shape), got {got}")
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i):
        return i, self.data[i]

    @property
    def shape(self) -> tuple:
        """Shape of one item."""
        return tuple(self.data.shape[1:])

    def batch(self, idx: torch.Tensor):
        """Items ``idx`` at once: ``(x (b, *shape), None)``."""
        return self.data[idx], None


class LabeledDataset(IndexedDataset):
    """Item ``i`` is ``(i, data[i], labels[i])``: the trainer passes the labels to the model and the coupling.

    Example:
        >>> ds = LabeledDataset(torch.zeros(10, 2), torch.arange(10) % 3)
        >>> ds[4][2]
        tensor(1)
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        super().__init__(data)
        if not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],) or labels.is_floating_point():
            got = (labels.dtype, tuple(labels.shape)) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},) matching data, got {got}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0 (class indices), got min {int(labels.min())}")
        self.labels = labels.long()

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels.numel() else 0

    def __getitem__(self, i):
        return i, self.data[i], self.labels[i]

    def batch(self, idx: torch.Tensor):
        """Items ``idx`` at once: ``(x (b, *shape), y (b,))``."""
        return self.data[idx], self.labels[idx]


class FlipDataset(torch.utils.data.Dataset):
    """Horizontal-flip augmentation as LOOM-CFM does it: item ``i + N`` is item ``i`` flipped (last axis).

    ``len = 2 N``; give the coupling ``num_points = 2 * N`` so each view keeps its own noise.

    Example:
        >>> ds = FlipDataset(IndexedDataset(torch.arange(8.0).reshape(2, 1, 1, 4)))
        >>> len(ds), ds[2][1].flatten().tolist()
        (4, [3.0, 2.0, 1.0, 0.0])
    """

    def __init__(self, base):
        if not isinstance(base, IndexedDataset) or base.data.ndim < 3:
            raise ValueError("FlipDataset needs an IndexedDataset / LabeledDataset of images (N, C, H, W) or (N, H, W)")
        self.base = base

    def __len__(self) -> int:
        return 2 * len(self.base)

    @property
    def shape(self) -> tuple:
        return self.base.shape

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    def __getitem__(self, i):
        n = len(self.base)
        if not 0 <= i < 2 * n:
            raise IndexError(f"index {i} out of range for {2 * n} items")
        item = self.base[i % n]
        x = item[1].flip(-1) if i >= n else item[1]
        return (i, x) + tuple(item[2:])

    def batch(self, idx: torch.Tensor):
        n = len(self.base)
        x, y = self.base.batch(idx % n)
        flip = (idx >= n).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(flip, x.flip(-1), x), y
