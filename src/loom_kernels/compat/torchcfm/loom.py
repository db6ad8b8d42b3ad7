"""LOOM-CFM's persistent coupling behind TorchCFM's flow-matcher methods (new; not in TorchCFM)."""

from __future__ import annotations

import torch

from ...couplings.loom import LoomCoupling
from .conditional_flow_matching import ConditionalFlowMatcher

__all__ = ["LoomConditionalFlowMatcher"]


class LoomConditionalFlowMatcher(ConditionalFlowMatcher):
    """OT-CFM's methods on LOOM-CFM's persistent coupling (:class:`loom_kernels.couplings.LoomCoupling`).

    The noise comes from the coupling's seed table, so the calls take the batch's dataset indices
    (keyword ``indices``); ``x0`` may be ``None`` (a given ``x0`` must be shaped like ``x1`` and is not
    used). The batch keeps its order: ``x0[k]`` is ``x1[k]``'s noise. ``guided_...`` couples within
    the classes ``y1``. ``cond=`` (and the options ``cond_weight``, ``cond_metric``, ``cond_ratio``: C2OT's)
    is the coupling's continuous condition.
    ``state_dict``/``load_state_dict`` checkpoint the coupling.

    Example::

        fm = LoomConditionalFlowMatcher(len(dataset), (3, 32, 32), sigma=0.0, num_caches=4, device="cuda")
        for idx, x1 in loader:
            t, xt, ut = fm.sample_location_and_conditional_flow(None, x1.cuda(), indices=idx)
    """

    def __init__(self, num_points: int, shape, sigma: float | int = 0.0, **options):
        super().__init__(sigma)
        self.coupling = LoomCoupling(num_points, shape, **options)

    def _couple(self, x0, x1, indices, labels=None, cond=None):
        if x0 is not None and (not isinstance(x0, torch.Tensor) or x0.shape != x1.shape):
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"x0 must be None or shaped like x1 {tuple(x1.shape)} (it is not used), got {got}")
        x0, _ = self.coupling(x1, indices, labels=labels, cond=cond)
        return x0

    def sample_location_and_conditional_flow(
        self, x0, x1, t=None, return_noise=False, *, indices=None, labels=None, cond=None
    ):
        x0 = self._couple(x0, x1, indices, labels, cond)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(
        self, x0, x1, y0=None, y1=None, t=None, return_noise=False, *, indices=None, cond=None
    ):
        x0 = self._couple(x0, x1, indices, y1, cond)
        out = super().sample_location_and_conditional_flow(x0, x1, t, return_noise)
        return (*out[:3], y0, y1, *out[3:])

    def state_dict(self) -> dict:
        return self.coupling.state_dict()

    def load_state_dict(self, state: dict):
        self.coupling.load_state_dict(state)
