"""Device resolution, in one place for the couplings, the metrics and the trainer."""
from __future__ import annotations

import torch


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> cpu; a bare "cuda" gets the current device's index, so it compares equal to tensors'."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
