"""triton is optional (the CPU paths never need it): its import and the launch guard shared by the
Triton kernels of cost.py, noise.py and sampler.py."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


# The one internal switch of the Triton paths: run the kernels on CPU tensors too, through the
# interpreter (TRITON_INTERPRET=1 set before triton's import), instead of the torch CPU code.
# Off in the library; the tests turn it on (python_tests/kernel_paths.py) to check every kernel
# without a GPU. Nothing else chooses between a kernel and its torch twin.
KERNELS_ON_CPU = False


def use_kernel(device) -> bool:
    """Whether the Triton kernel (rather than the torch path) runs for tensors on ``device``."""
    return device.type == "cuda" or KERNELS_ON_CPU


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (which must be set before triton is first imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(what: str, device, without_triton_hint: str) -> None:
    """Raise a RuntimeError saying why the Triton kernel ``what`` cannot run on ``device``."""
    if triton is None:
        raise RuntimeError(
            f"{what} on CUDA tensors needs triton (CUDA builds of PyTorch ship it); "
            f"`pip install triton`, or {without_triton_hint}"
        )
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton {what} kernel runs on CUDA tensors, or on CPU tensors only under "
            f"TRITON_INTERPRET=1 (set before triton is imported); got device {device}"
        )
