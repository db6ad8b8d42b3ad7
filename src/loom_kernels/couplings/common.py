"""Helpers shared by every coupling: argument checks, metric names, devices, pair statistics, the solve.

Public to the package (the couplings, the tables and compat import them); not part of the user API.
"""

from __future__ import annotations

import torch

from ..assign import assign
from ..cost import METRICS  # the metric names live beside the code that computes them

_COST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_x1(x1, name="x1"):
    if not isinstance(x1, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (b, *shape), got {type(x1).__name__}")
    if not x1.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x1.dtype}")
    if x1.dim() < 2:
        raise ValueError(f"{name} must have shape (b, *shape) with at least one feature dim, got {tuple(x1.shape)}")


def cost_dtype(dtype):
    # pairwise_cost takes float32/float16/bfloat16; float64 data is compared in float32.
    return dtype if dtype in _COST_DTYPES else torch.float32


def pair_stats(cost, col):
    """pre_cost (mean diagonal), post_cost (mean matched), swaps; 0-dim tensors, no host sync."""
    n = cost.shape[0]
    ar = torch.arange(n, device=cost.device)
    pre = cost.diagonal()[:n].double().sum() / max(n, 1)
    post = cost.gather(1, col[:, None]).double().sum() / max(n, 1)
    return {"pre_cost": pre, "post_cost": post, "swaps": (col != ar).sum()}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``t`` to ``device``; host -> GPU goes through pinned memory so the copy never stalls the host
    (a pageable source lets the driver synchronize with the stream)."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def check_indices(indices, b: int, who: str):
    """``indices`` of a coupling that does not use them: ``None`` or ``b`` integers (tensor or array-like).

    A floating tensor in their place is the noise passed positionally in TorchCFM's ``(x0, x1)`` order,
    which would train the reverse flow: refused with a ``TypeError`` that names ``x0=``."""
    if indices is None:
        return None
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(
            f"{who}(x1, indices, *, x0=None, labels=None): indices must be integer dataset indices, got dtype "
            f"{idx.dtype}. Pass the noise as the keyword x0=: TorchCFM's order (x0, x1) would treat the noise "
            f"as data and train the reverse flow"
        )
    if idx.dim() != 1 or idx.shape[0] != b:
        raise ValueError(f"indices must have shape (b,) = ({b},) to match x1, got {tuple(idx.shape)}")
    return idx


def check_labels(labels, b: int, device: torch.device):
    """``labels`` as given (``None`` or an integer ``(b,)`` tensor on ``device``), or a clear error."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor of shape (b,), got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"labels must have shape (b,) = ({b},) to match x1, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on x1's device {device}, got {labels.device}")
    return labels


def solve(cost: torch.Tensor, labels: torch.Tensor | None = None, data: str = "x1") -> torch.Tensor:
    """``assign(cost)`` with the pairs of different labels forbidden; ``col (n,)`` int64.

    ``cost (n, m)``: rows are data items, columns noises; with ``labels (n,)`` (square cost) column
    ``j`` is item ``j``'s noise, so forbidding cross-label pairs (+inf) solves exact OT per class in
    one batched solve (the identity stays feasible). A non-finite cost can only come from the data
    (noise is finite), so it is reported as the argument ``data``'s, before any caller changes its state.
    """
    # No pass of our own over the cost: a bad data row makes assign refuse (NaN entries, or a row of
    # +inf that leaves no feasible assignment), and only then is the cost checked, to name the data.
    # On CUDA non-finite costs become NaN so the refusal needs no host read besides assign's own sync.
    raw = cost
    if cost.device.type != "cpu":
        cost = torch.where(torch.isfinite(cost), cost, cost.new_full((), float("nan")))
    if labels is not None:
        cost = cost.masked_fill(labels[:, None] != labels[None, :], float("inf"))
    try:
        return assign(cost)
    except ValueError:
        if not bool(torch.isfinite(raw).all()):
            raise_bad_data(data)
        raise


def raise_bad_data(data):
    raise ValueError(
        f"{data} contains NaN or inf (or values so large that the pair costs overflow float32): "
        "the batch was refused and the coupling's state left unchanged"
    ) from None
