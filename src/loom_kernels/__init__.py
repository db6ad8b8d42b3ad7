"""loom_kernels: fast, exact data-noise couplings for flow matching.

Submodules are imported lazily so ``import loom_kernels`` needs numpy only; torch and triton
are loaded by the modules that use them. ``loom_kernels.assign`` and ``loom_kernels.sampler`` are
modules (their functions ``assign`` and ``sample`` live inside them), so they are not re-exported.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

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


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'loom_kernels' has no attribute {name!r}")
