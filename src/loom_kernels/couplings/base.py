"""The protocol every coupling follows, so a trainer calls any of them the same way (no ``hasattr``)."""

from __future__ import annotations

from types import MappingProxyType

import torch


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
