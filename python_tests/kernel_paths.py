"""Test-side helpers for the Triton paths: the switch that runs a kernel on CPU tensors, the
backends every CPU-tensor test is parametrized over, and the marks that skip what cannot run here."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from loom_kernels import _triton


def interpreter_available() -> bool:
    """True when Triton kernels can run on CPU tensors: triton importable and TRITON_INTERPRET=1
    set before its import (conftest.py sets it on machines without CUDA)."""
    return _triton.triton is not None and _triton.interpreting()


needs_interpreter = pytest.mark.skipif(
    not interpreter_available(),
    reason="the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1 set before triton is "
    "imported (python_tests/conftest.py sets it on machines without CUDA)",
)

# Every backend that runs on CPU tensors: the torch path always, Triton through the interpreter.
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
# The same, with the interpreted Triton case in the slow run (CI runs it; the default run keeps the torch
# path and the lighter Triton cases): the interpreter takes 10-30 s a case on 2 cores.
BACKENDS_SLOW_TRITON = ["torch", pytest.param("triton", marks=[needs_interpreter, pytest.mark.slow])]


@contextmanager
def kernels_on_cpu(on: bool = True):
    """Within the block, CPU tensors go through the Triton kernels (the library's one switch)."""
    saved, _triton.KERNELS_ON_CPU = _triton.KERNELS_ON_CPU, on
    try:
        yield
    finally:
        _triton.KERNELS_ON_CPU = saved


def on(backend: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with CPU tensors on ``backend``: ``"torch"`` or ``"triton"``."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    with kernels_on_cpu(backend == "triton"):
        return fn(*args, **kwargs)
