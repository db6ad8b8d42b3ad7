"""Loads the compiled modules. The only place that knows how they are found."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load(name):
    try:
        return importlib.import_module(f"loom_kernels.{name}"), None
    except ImportError as exc:  # keep the reason for the error message
        return None, exc


def cpu():
    """The CPU module ``loom_kernels._C``; raises an actionable ImportError when missing."""
    mod, exc = _load("_C")
    if mod is None:
        raise ImportError(
            "loom_kernels._C is not built: install the package with `pip install .` "
            "(or `pip install -e .` in a checkout). If it is installed and you run Python from the "
            "source checkout, the uncompiled tree on sys.path shadows it: run from another directory. "
            f"Import failed with: {exc}"
        )
    return mod


def has_cuda_build() -> bool:
    """True when ``loom_kernels._cuda`` was compiled (nvcc was found at build time)."""
    return _load("_cuda")[0] is not None


def cuda():
    """The CUDA module ``loom_kernels._cuda``; raises a RuntimeError naming the backend when missing."""
    mod, exc = _load("_cuda")
    if mod is None:
        raise RuntimeError(
            "backend='cuda' needs loom_kernels._cuda, but loom_kernels was built without CUDA "
            f"(nvcc was not found at build time, or LOOM_CUDA=0); pass backend='cpu' to solve on the "
            f"host explicitly. Import failed with: {exc}"
        )
    return mod


def has_cuda() -> bool:
    """True when the CUDA module is built and a CUDA device is visible."""
    mod, _ = _load("_cuda")
    return mod is not None and mod.device_count() > 0
