"""Pictures of samples, for the sample CLI and the experiments' figures (numpy arrays: matplotlib draws them)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["image_grid"]


def image_grid(x: torch.Tensor, rows: int, cols: int) -> np.ndarray:
    """The first ``rows * cols`` images of ``x`` (n, c, h, w) in [-1, 1], tiled with 1-pixel white gaps:
    (H, W) for one channel, else (H, W, c), values in [0, 1]."""
    x = x[: rows * cols].float().clamp(-1, 1).numpy()
    c, h, w = x.shape[1:]
    grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), dtype=np.float32)
    for k in range(len(x)):
        i, j = divmod(k, cols)
        grid[i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = (x[k].transpose(1, 2, 0) + 1) / 2
    return grid[..., 0] if c == 1 else grid
