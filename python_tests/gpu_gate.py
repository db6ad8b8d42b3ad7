"""The GPU gate of a test session: which `cuda` tests run, which skip, and when the run must fail.

A `cuda` test needs a CUDA GPU and, unless marked ``@pytest.mark.cuda(triton_only=True)``, the compiled
CUDA module ``loom_kernels._cuda``. The rules (:func:`decide`):

- no GPU visible to torch: every `cuda` test skips (a CPU machine);
- a GPU, and the CUDA module imports and sees a device: everything runs;
- a GPU, but the CUDA module is built and does not import (or sees no device): the run FAILS, never
  skips; the same when it was not built at all, unless ``LOOM_CUDA=0`` says the build is CPU-only on
  purpose (then only the CUDA-module tests skip; the Triton ones still run on the GPU);
- an NVIDIA driver on the machine (``nvidia-smi`` on PATH or ``/proc/driver/nvidia``) but no GPU visible
  to torch (a CPU build of torch, a driver mismatch, ``CUDA_VISIBLE_DEVICES=""``): the run FAILS, unless
  ``LOOM_CUDA=0`` says the GPU is left out on purpose;
- ``-m cuda`` (any expression selecting them) fails when no `cuda` test passed, or when any skipped for
  a reason other than the explicit opt-out (``LOOM_CUDA=0``).

:func:`probe` gathers the facts from this machine; conftest.py applies the decision.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Facts:
    gpu: bool  # torch sees a CUDA device
    torch_devices: int
    module_found: bool  # loom_kernels/_cuda*.so is on the path
    import_error: str | None  # why it did not import (None: it imported, or it was not found)
    module_devices: int | None  # what the imported module sees (None: not imported)
    expect_cuda: str  # LOOM_CUDA in the environment ("0": this build is CPU-only on purpose)
    driver: bool = False  # an NVIDIA driver is installed: nvidia-smi on PATH or /proc/driver/nvidia
    torch_build: str = ""  # torch's version and CUDA version, for the message when it sees no GPU


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
        gpu, count, build = False, 0, "torch not installed"
    else:
        gpu = torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else 0
        build = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    driver = shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")
    found = importlib.util.find_spec("loom_kernels._cuda") is not None
    error, devices = None, None
    if found:
        try:
            devices = int(importlib.import_module("loom_kernels._cuda").device_count())
        except Exception as exc:  # any failure to load it is the finding, reported by decide()
            error = f"{type(exc).__name__}: {exc}"
    expect = os.environ.get("LOOM_CUDA", "auto").strip().lower()
    return Facts(gpu, count, found, error, devices, expect, driver, build)


OPT_OUT = "LOOM_CUDA=0"  # in a skip reason: the one skip a `-m cuda` run accepts


def decide(f: Facts) -> Gate:
    """What the session does with its `cuda` tests, from the machine's facts (pure: tested directly)."""
    if not f.gpu:
        why = "needs a CUDA GPU (torch.cuda.is_available() is False)"
        if f.driver and f.expect_cuda == "0":
            return Gate(False, False, None, f"{why}; the machine's NVIDIA driver is left out on purpose ({OPT_OUT})")
        if f.driver:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hidden = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
            return Gate(
                False,
                False,
                f"this machine has an NVIDIA driver (nvidia-smi or /proc/driver/nvidia) but torch sees no CUDA "
                f"device ({f.torch_build or 'torch'}{hidden}): a CPU build of torch, a driver mismatch or hidden "
                f"devices would skip every cuda test; fix it, or set {OPT_OUT} to run without the GPU on purpose",
                why,
            )
        return Gate(False, False, None, why)
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


def final_status(
    gate: Gate, markexpr: str, cuda_passed: int, exitstatus: int, cuda_skipped: tuple = ()
) -> tuple[int, str | None]:
    """The session's exit status and the line saying why it was changed (None: unchanged).

    ``cuda_skipped``: ``(test id, skip reason)`` of every `cuda` test that skipped."""
    if gate.error is not None:
        return 1, f"GPU gate: {gate.error}"
    if not asks_for_cuda(markexpr):
        return exitstatus, None
    if cuda_passed == 0 and exitstatus in (0, 5):
        why = gate.skip_reason or "none was selected"
        return 1, f"GPU gate: -m {markexpr!r} ran no cuda test ({why}): a GPU check that checks nothing fails"
    unexplained = [(test, why) for test, why in cuda_skipped if OPT_OUT not in why]
    if unexplained:
        shown = "; ".join(f"{test}: {why}" for test, why in unexplained[:5])
        more = f" (and {len(unexplained) - 5} more)" if len(unexplained) > 5 else ""
        return 1, (
            f"GPU gate: -m {markexpr!r} skipped {len(unexplained)} cuda test(s) without the opt-out "
            f"({OPT_OUT}): {shown}{more}"
        )
    return exitstatus, None
