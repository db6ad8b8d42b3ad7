"""Built-in finite data sets for the trainer, the demo and the tests; nothing is downloaded.

2-D toy sets (``8gaussians``, ``moons``, ``checkerboard``) are a fixed number of points drawn from
a seed, so a "data set" is a finite set of points, which is what LOOM-CFM couples globally; the
held-out split is a second draw with another seed. ``digits`` is scikit-learn's bundled
``load_digits`` (1797 8x8 images) scaled to [-1, 1]; a user's ``.npy`` file holds ``(N, *shape)``.
Those two hold out a fixed, seeded fraction of the rows.

Checkerboard follows the FFJORD toy set (Grathwohl et al., 2019); moons is scikit-learn's.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

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
        from sklearn.datasets import make_moons

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


def load(
    name: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    holdout: float = 0.2,
) -> torch.Tensor:
    """A finite data set as a float32 tensor ``(N, *shape)``.

    Args:
        name: ``"8gaussians"``, ``"moons"``, ``"checkerboard"`` (shape ``(2,)``), ``"digits"``
            (shape ``(1, 8, 8)``, values in [-1, 1]) or a path to a ``.npy`` file ``(N, *shape)``.
        split: ``"train"``, ``"test"`` (held out) or ``"all"``.
        n: number of points of a 2-D set (default 4096 for train, the same for test); for
            digits and ``.npy`` files, keeps the first ``n`` rows of the split.
        seed: the draw of a 2-D set, and the held-out permutation of digits / ``.npy``.
        holdout: held-out fraction for digits and ``.npy`` files.

    Example:
        >>> x = load("8gaussians", n=1000, seed=0)
        >>> x.shape
        torch.Size([1000, 2])
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
        return torch.from_numpy(_toy_2d(name, 4096 if n is None else int(n), draw_seed))

    if name == "digits":
        from sklearn.datasets import load_digits

        images = load_digits().images.astype(np.float32)  # (1797, 8, 8), values 0..16
        x = (images / 8.0 - 1.0)[:, None]
    elif str(name).endswith(".npy"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"data file {name!r} does not exist")
        x = np.load(name, allow_pickle=False)
        if x.ndim < 2:
            raise ValueError(f"data file {name!r} must hold an array of shape (N, *shape), got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise TypeError(f"data file {name!r} must hold real numbers, got dtype {x.dtype}")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"data file {name!r} contains NaN or inf entries")
    else:
        raise ValueError(f"data must be one of {BUILTIN} or a path ending in .npy, got {name!r}")

    x = _holdout_split(x, split, holdout, seed)
    if n is not None:
        x = x[: int(n)]
    if x.shape[0] == 0:
        raise ValueError(f"data set {name!r} split {split!r} is empty")
    return torch.from_numpy(np.ascontiguousarray(x))


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
