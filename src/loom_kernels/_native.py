"""Loads the compiled modules. The only place that knows how they are found.

The CPU kernels (exact solver, noise) run the best instruction set the CPU has (scalar, avx2,
avx512; a LOOM_NATIVE=1 build has only "native"). ``LOOM_CPU_ISA=scalar|avx2|avx512`` in the
environment, read when ``_C`` is first loaded, or :func:`set_cpu_isa` forces one, e.g. to test
or time a path: every path gives the same results.
"""

from __future__ import annotations

import functools
import importlib
import os


@functools.cache
def _load(name):
    try:
        return importlib.import_module(f"loom_kernels.{name}"), None
    except ImportError as exc:  # keep the reason for the error message
        return None, exc


@functools.cache
def _cpu_isa_from_env(mod):
    name = os.environ.get("LOOM_CPU_ISA", "").strip()
    if name:
        try:
            mod.set_isa(name)
        except ValueError as exc:
            raise ValueError(f"LOOM_CPU_ISA={name!r}: {exc}") from None


def cpu():
    """The CPU module ``loom_kernels._C``; raises an actionable ImportError when missing."""
    mod, exc = _load("_C")
    if mod is not None:
        _cpu_isa_from_env(mod)  # once: a failure is not cached and raises again
    if mod is None:
        raise ImportError(
            "loom_kernels._C is not built: install the package with `pip install .` "
            "(or `pip install -e .` in a checkout; an uncompiled tree put on sys.path by hand, e.g. "
            "PYTHONPATH=src, has no compiled modules). "
            f"Import failed with: {exc}"
        )
    return mod


def cpu_isa() -> str:
    """The instruction set the CPU kernels run now: ``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"native"``."""
    return cpu().isa()


def cpu_isas() -> list[str]:
    """The instruction sets this build has and this CPU runs, best last, e.g. ``["scalar", "avx2"]``."""
    return cpu().isas()


def set_cpu_isa(name: str) -> None:
    """Force the CPU kernels' instruction set (one of :func:`cpu_isas`, or ``"auto"`` for the best).

    Raises ValueError naming the sets available when this build or CPU lacks ``name``.
    Example: ``set_cpu_isa("avx2")`` runs the AVX2 kernels on an AVX-512 machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_isa: name must be a str, got {type(name).__name__}")
    cpu().set_isa(name)


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
