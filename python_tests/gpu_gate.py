"""The GPU gate of a test session: which `cuda` tests run, which skip, and when the run must fail.

A `cuda` test needs a CUDA GPU and, unless marked ``@pytest.mark.cuda(triton_only=True)``, the compiled
CUDA module ``loom_kernels._cuda``. The rules (:func:`decide`):

- no GPU visible to torch: every `cuda` test skips (a CPU machine);
- a GPU, and the CUDA module imports and sees a device: everything runs;
- a GPU, but the CUDA module is built and does not import (or sees no device): the run FAILS, never
  skips; the same when it was not built at all, unless ``LOOM_CUDA=0`` says the build is CPU-only on
  purpose (then only the CUDA-module tests skip; the Triton ones still run on the GPU).

:func:`probe` gathers the facts from this machine; conftest.py applies the decision.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Facts:
    gpu: bool  # torch sees a CUDA device
    torch_devices: int
    module_found: bool  # loom_kernels/_cuda*.so is on the path
    import_error: str | None  # why it did not import (None: it imported, or it was not found)
    module_devices: int | None  # what the imported module sees (None: not imported)
    expect_cuda: str  # LOOM_CUDA in the environment ("0": this build is CPU-only on purpose)


@dataclass(frozen=True)
class Gate:
    gpu: bool  # Triton (triton_only) cuda tests run
    native: bool  # every cuda test runs
    error: str | None  # the run must fail with this message
    skip_reason: str  # why the cuda tests that cannot run skip


def probe() -> Facts:
    """The facts of this machine; imports torch and tries ``loom_kernels._cuda``, nothing else."""
    try:
        import torch
    except ImportError:
        gpu, count = False, 0
    else:
        gpu = torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else 0
    found = importlib.util.find_spec("loom_kernels._cuda") is not None
    error, devices = None, None
    if found:
        try:
            devices = int(importlib.import_module("loom_kernels._cuda").device_count())
        except Exception as exc:  # any failure to load it is the finding, reported by decide()
            error = f"{type(exc).__name__}: {exc}"
    return Facts(gpu, count, found, error, devices, os.environ.get("LOOM_CUDA", "auto").strip().lower())


def decide(f: Facts) -> Gate:
    """What the session does with its `cuda` tests, from the machine's facts (pure: tested directly)."""
    if not f.gpu:
        return Gate(False, False, None, "needs a CUDA GPU (torch.cuda.is_available() is False)")
    if f.module_found and f.import_error is not None:
        return Gate(
            True,
            False,
            f"a CUDA GPU is visible but loom_kernels._cuda is built and does not import "
            f"({f.import_error}): the CUDA build is broken",
            "",
        )
    if f.module_found and not f.module_devices:
        return Gate(
            True,
            False,
            f"torch sees {f.torch_devices} CUDA device(s) but loom_kernels._cuda sees "
            f"{f.module_devices}: a driver/runtime mismatch",
            "",
        )
    if f.module_found:
        return Gate(True, True, None, "")
    if f.expect_cuda == "0":
        return Gate(True, False, None, "loom_kernels was built without its CUDA module (LOOM_CUDA=0)")
    return Gate(
        True,
        False,
        "a CUDA GPU is visible but loom_kernels was built without its CUDA module "
        "(loom_kernels._cuda not found): rebuild with nvcc on PATH, or set LOOM_CUDA=0 to "
        "run the tests without it on purpose",
        "",
    )


def needs_native(item) -> bool:
    """Whether a `cuda` item needs the CUDA module (not only a GPU for its Triton kernels)."""
    mark = item.get_closest_marker("cuda")
    return not (mark is not None and mark.kwargs.get("triton_only", False))


def item_action(gate: Gate, item) -> tuple[str, str] | None:
    """``("fail", why)``, ``("skip", why)`` or None (run) for a `cuda` item under ``gate``."""
    if gate.error is not None:
        return "fail", gate.error
    if not gate.gpu or (needs_native(item) and not gate.native):
        return "skip", gate.skip_reason
    return None


def asks_for_cuda(markexpr: str) -> bool:
    """Whether a ``-m`` expression selects `cuda` tests (``cuda``, ``cuda and not slow``; not ``not cuda``)."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return any(w == "cuda" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def final_status(gate: Gate, markexpr: str, cuda_passed: int, exitstatus: int) -> tuple[int, str | None]:
    """The session's exit status and the line saying why it was changed (None: unchanged)."""
    if gate.error is not None:
        return 1, f"GPU gate: {gate.error}"
    if asks_for_cuda(markexpr) and cuda_passed == 0 and exitstatus in (0, 5):
        why = gate.skip_reason or "none was selected"
        return 1, f"GPU gate: -m {markexpr!r} ran no cuda test ({why}): a GPU check that checks nothing fails"
    return exitstatus, None
