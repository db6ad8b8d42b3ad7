"""Fixed noise without reassignment: the paper's "fixed source, no reassignment" ablation."""

from __future__ import annotations

import torch

from ..noise import gaussian_noise
from .base import Coupling, check_cond, check_flag, check_labels, pair_out
from .loom import LoomCoupling


class FixedNoiseCoupling(Coupling):
    """Fixed noise without reassignment: item i is always paired with ``noise(seeds[i, 0])``.

    Reads the seed table of a ``LoomCoupling`` (its initial, random pairing) and never reassigns it:
    the paper's "fixed source, no reassignment" ablation. Its ``stats`` (pre = post cost, 0 swaps)
    reach the trainer's log like every coupling's; it has no state of its own (the seeds are a pure
    function of the LoomCoupling's seed). ``labels`` and ``cond`` are checked and change nothing (no
    noise is ever exchanged); ``return_indices=True`` returns ``(x0, x1, arange(b))``: each item keeps
    its own noise.

    Example:
        >>> from loom_kernels.couplings import LoomCoupling
        >>> c = FixedNoiseCoupling(LoomCoupling(100, (2,), seed=0))
        >>> x0, x1 = c(torch.randn(8, 2), torch.arange(8))
    """

    def __init__(self, loom: LoomCoupling):
        self.seeds = loom.seeds[:, :1].clone()  # (N, 1): one fixed noise per point
        self.shape = tuple(loom.shape)
        self.stats = {}

    def __call__(
        self,
        x1: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        return_indices: bool = False,
    ) -> tuple:
        if x0 is not None:
            raise ValueError("FixedNoiseCoupling draws the noise from its seeds: x0 must be None")
        if indices is None:
            raise ValueError("FixedNoiseCoupling needs the dataset indices of the batch: call coupling(x1, indices)")
        idx = torch.as_tensor(indices)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(
                f"FixedNoiseCoupling(x1, indices): indices must be integer dataset indices, got dtype {idx.dtype}. "
                "Is this TorchCFM's argument order coupling(x0, x1)? Call coupling(x1, indices) with the data first"
            )
        idx = idx.to(device=self.seeds.device, dtype=torch.int64)
        if idx.shape != (x1.shape[0],):
            raise ValueError(f"indices must have shape (b,) = ({x1.shape[0]},) to match x1, got {tuple(idx.shape)}")
        check_labels(labels, x1.shape[0], x1.device)
        check_cond(cond, x1.shape[0], x1.device)
        check_flag(return_indices, "return_indices")
        x0 = gaussian_noise(self.seeds[idx, 0], self.shape, device=x1.device, dtype=x1.dtype)
        cost = (x1 - x0).flatten(1).square().sum(1).mean()
        self.stats = {"pre_cost": cost, "post_cost": cost, "swaps": 0}
        return pair_out(x0, x1, torch.arange(x1.shape[0], device=x1.device), return_indices)
