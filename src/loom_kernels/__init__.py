"""loom_kernels: fast, exact data-noise couplings for flow matching.

Submodules are imported lazily so ``import loom_kernels`` needs numpy only; torch and triton
are loaded by the modules that use them. ``loom_kernels.assign`` and ``loom_kernels.sampler`` are
modules (their functions ``assign`` and ``sample`` live inside them), so they are not re-exported.
"""

from __future__ import annotations

import importlib

_LAZY = {
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
__all__ = sorted(_LAZY) + ["has_cuda", "__version__"]


def has_cuda() -> bool:
    """True when the CUDA solver is built and a GPU is visible."""
    from ._native import has_cuda as _has_cuda

    return _has_cuda()


def _version() -> str:
    # The one place the version is written is pyproject.toml; an installed package reads it from
    # its metadata, a source tree on sys.path (PYTHONPATH=src, never installed) from the file.
    from importlib import metadata
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file() and (Path(__file__).resolve().parents[1].name == "src"):
        import re

        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return metadata.version("loom_kernels")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def __getattr__(name):
    if name == "__version__":  # lazily: importing the metadata machinery costs a few ms
        globals()["__version__"] = version = _version()
        return version
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'loom_kernels' has no attribute {name!r}")
