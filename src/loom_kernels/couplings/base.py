"""The protocol every coupling follows, so a trainer calls any of them the same way (no ``hasattr``), and the
checks of the protocol's arguments (one place: every coupling refuses bad input with the same words)."""

from __future__ import annotations

from types import MappingProxyType

import torch

from ..cost import METRICS  # the metric names live beside the code that computes them


class Coupling:
    """A data-noise coupling: ``coupling(x1, indices=None, *, x0=None, labels=None, cond=None) -> (x0, x1)``.

    One calling convention for every coupling, so they are drop-ins for each other (``coupling(x1, idx)``
    in a loop over ``(idx, x1)`` works with any of them). ``x0[i]`` is the noise paired with the data item
    ``x1[i]``. ``indices (b,)`` (integer) are the dataset indices of the batch: needed by couplings with
    memory, checked and otherwise ignored by the others (a floating tensor there is TorchCFM's
    ``(x0, x1)`` order by mistake and raises ``TypeError``). ``x0`` (keyword only) is a noise batch to
    pair, for couplings that take their noise from outside (minibatch OT, independent; LOOM draws its own
    and refuses one). ``labels (b,)`` (integer) make the coupling class-conditional: noise is only
    exchanged between items of the same label. ``cond (b, Dc)`` or ``(b,)`` (floating) is a continuous
    condition per item: the noise drawn for (or held by) item ``j`` carries ``cond[j]``, so giving item ``i``
    the noise of item ``j`` costs ``metric(x1_i, x0_j) + cond_weight * ||cond_i - cond_j||^2``
    (``cond_weight``: a constructor keyword, default 1.0; labels forbid, cond penalises).
    ``return_indices=True`` returns ``(x0, x1, perm)``: ``perm (b,)`` int64, the permutation applied, so
    that ``x0[i]`` is the noise of source ``perm[i]`` (each coupling says what its sources are: the rows of
    the given ``x0``, or the noises the batch's items held); use it to regroup per-noise fields or losses.
    ``stats`` holds the last call's ``pre_cost``, ``post_cost`` and
    ``swaps`` (0-dim tensors). ``t (b,)`` (keyword only, optional) are the timesteps the trainer drew for the
    batch, for couplings that depend on them (``TimestepMixedCoupling``); such a coupling sets ``accepts_t =
    True`` and the trainer passes ``t=`` only to those (:func:`call_coupling`), so the others need not take it.
    ``state_dict``/``load_state_dict`` default to "no state", so every coupling can
    be checkpointed.

    Example::

        class Identity(Coupling):
            def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False):
                x0 = torch.zeros_like(x1) if x0 is None else x0
                return (x0, x1, torch.arange(len(x1))) if return_indices else (x0, x1)
    """

    stats: dict = MappingProxyType({})  # read-only "no stats yet"; each call assigns its own dict
    accepts_t: bool = False  # True: __call__ takes the batch's timesteps as t=

    def __call__(
        self,
        x1: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        return_indices: bool = False,
        t: torch.Tensor | None = None,
    ) -> tuple:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The state to checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a coupling without state accepts only an empty one."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got a state with keys {sorted(state)}")


def call_coupling(coupling, x1, indices=None, *, t=None, **kw) -> tuple:
    """``coupling(x1, indices, **kw)``, with ``t=t`` added when the coupling takes timesteps (``accepts_t``)."""
    if t is not None and getattr(coupling, "accepts_t", False):
        kw["t"] = t
    return coupling(x1, indices, **kw)


# ---- the checks of the protocol's arguments ---------------------------------------------------------


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


def check_cond_weight(cond_weight) -> float:
    """``cond_weight`` as a float, or a ``ValueError``: a finite real number ``>= 0``."""
    if isinstance(cond_weight, bool) or not isinstance(cond_weight, (int, float)):
        raise ValueError(f"cond_weight must be a finite float >= 0, got {cond_weight!r}")
    w = float(cond_weight)
    if not (w >= 0.0 and w != float("inf")):  # also refuses NaN
        raise ValueError(f"cond_weight must be a finite float >= 0, got {cond_weight!r}")
    return w


def check_cond(cond, b: int, device: torch.device) -> torch.Tensor | None:
    """``cond`` as a float64 ``(b, Dc)`` tensor (``(b,)`` is read as ``Dc = 1``), or None, or a clear error.

    ``cond`` holds one row of condition values per data item (a timestep, a physical parameter, an
    embedding). It must be a floating tensor on ``x1``'s device, finite: NaN or inf is refused here, before
    anything changes (on CUDA this reads one flag back from the device). Float64 keeps the penalty's
    precision whatever the input dtype, and every rank of a group sends the same dtype.

    Example::

        c = check_cond(torch.rand(8), 8, torch.device("cpu"))   # (8, 1) float64
    """
    if cond is None:
        return None
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"cond must be a floating torch.Tensor of shape (b, Dc) or (b,), got {type(cond).__name__}")
    if not cond.is_floating_point():
        raise TypeError(
            f"cond must have a floating dtype (continuous condition values), got {cond.dtype}; pass integer "
            "class labels as labels= instead"
        )
    if cond.dim() not in (1, 2) or cond.shape[0] != b:
        raise ValueError(f"cond must have shape (b, Dc) or (b,) with b = {b} to match x1, got {tuple(cond.shape)}")
    if cond.device != device:
        raise ValueError(f"cond must be on x1's device {device}, got {cond.device}")
    if not bool(torch.isfinite(cond).all()):
        raise ValueError("cond contains NaN or inf: the batch was refused and the coupling's state left unchanged")
    return (cond[:, None] if cond.dim() == 1 else cond).to(torch.float64)


def check_cost_range(name: str, x: torch.Tensor | None, weight: float, dtype: torch.dtype, fix: str) -> None:
    """Refuses an input whose cost term ``weight * |x_i - x_j|^2`` can overflow ``dtype`` (one host read).

    ``x (b, ...)`` (None: nothing to check). The bound ``weight * 4 max|x_i|^2`` is what the Gram identity of
    the cost forms; past ``finfo(dtype).max / 64`` the cost turns to inf - inf = NaN, which read as bad data
    (minibatch OT blamed x1 for a cond of 1e200) or, in the entropic solver, as one column for every row.
    """
    if x is None or weight == 0.0 or x.numel() == 0:
        return
    bound = weight * 4.0 * float(x.flatten(1).double().square().sum(1).amax())
    limit = torch.finfo(dtype).max / 64
    if not bound <= limit:
        raise ValueError(
            f"{name} holds values so large that its cost term overflows {str(dtype).replace('torch.', '')} "
            f"(up to {bound:.3g}, the limit is {limit:.3g}): {fix}; the batch was refused and the coupling's "
            "state left unchanged"
        )


def check_flag(value, name: str) -> bool:
    """A call's boolean keyword (``return_indices``): a real bool, not a truthy tensor or string."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r:.40}")
    return value


def check_pair_inputs(x1, x0, labels, cond, scope="global"):
    """The checks of a coupling that pairs ``x1 (b, *shape)`` with a given noise ``x0 (m, *shape)``, ``m >= b``
    (minibatch OT, Sinkhorn): ``(labels, cond)`` checked (``cond`` as float64 ``(b, Dc)``); labels, cond and
    ``scope="grouped"`` need ``m == b`` (row ``i`` is item ``i``'s noise)."""
    check_x1(x1)
    if x0 is not None:
        check_x1(x0, "x0")
        if x0.shape[1:] != x1.shape[1:] or x0.shape[0] < x1.shape[0]:
            raise ValueError(
                f"x0 must have shape (m, *x1.shape[1:]) with m >= b = {x1.shape[0]}, "
                f"got x0 {tuple(x0.shape)} for x1 {tuple(x1.shape)}"
            )
        if x0.device != x1.device:
            raise ValueError(f"x0 must be on x1's device {x1.device}, got {x0.device}")
    if scope == "grouped" and x0 is not None and x0.shape[0] != x1.shape[0]:
        raise ValueError(f"scope='grouped' needs x0 with exactly b = {x1.shape[0]} rows, got {x0.shape[0]}")
    labels = check_labels(labels, x1.shape[0], x1.device)
    if labels is not None and x0 is not None and x0.shape[0] != x1.shape[0]:
        raise ValueError(
            f"labels need x0 with exactly b = {x1.shape[0]} rows (row i is item i's noise), got {x0.shape[0]}"
        )
    cond = check_cond(cond, x1.shape[0], x1.device)
    if cond is not None and x0 is not None and x0.shape[0] != x1.shape[0]:
        raise ValueError(
            f"cond needs x0 with exactly b = {x1.shape[0]} rows (row i is item i's noise), got {x0.shape[0]}"
        )
    return labels, cond


def pair_out(x0, x1, perm, return_indices: bool) -> tuple:
    """The protocol's result: ``(x0, x1, perm)`` when ``return_indices``, else ``(x0, x1)``."""
    return (x0, x1, perm) if return_indices else (x0, x1)
