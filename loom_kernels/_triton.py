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
