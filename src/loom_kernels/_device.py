"""Device resolution, in one place for the couplings, the metrics and the trainer."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None = None, *, prefer_cuda: bool = False) -> torch.device:
    """``device`` as a torch.device with an explicit CUDA index.

    ``None`` is the CPU, or the current CUDA device when ``prefer_cuda`` and one is available. A bare
    ``"cuda"`` gets the current device's index, so it compares equal to tensors' devices (the couplings
    need ``x1.device == coupling.device`` exactly).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        device = "cuda" if prefer_cuda and torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available")
        device = torch.device("cuda", torch.cuda.current_device())
    return device
