"""The collectives the couplings use under torch.distributed (one code path for every coupling)."""
from __future__ import annotations

import torch

from ._common import _to


def _default_group(process_group):
    """(group, world_size, rank) of the active process group, or (None, 1, 0) without one."""
    if process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None, 1, 0
        process_group = torch.distributed.group.WORLD
    world = torch.distributed.get_world_size(process_group)
    rank = torch.distributed.get_rank(process_group)
    return process_group, world, rank


def _comm_device(group):
    # NCCL moves CUDA tensors only; gloo (and the rest) are happy with CPU tensors.
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, group, world: int, device) -> torch.Tensor:
    """Concatenate along dim 0 the same-shaped tensor from every rank (rank order)."""
    src = _to(t, device).contiguous()
    out = [torch.empty_like(src) for _ in range(world)]
    torch.distributed.all_gather(out, src, group=group)
    return torch.cat(out, 0)

