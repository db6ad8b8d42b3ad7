"""Issue 32's couplings behind TorchCFM's flow-matcher methods (new; not in TorchCFM): nearest-of-k noise
and semidiscrete OT with fresh noise."""

from __future__ import annotations

from ...couplings.knn import KNNNoiseCoupling
from ...couplings.semidiscrete import SemidiscreteCoupling
from .conditional_flow_matching import ConditionalFlowMatcher

__all__ = ["KNNConditionalFlowMatcher", "SemidiscreteConditionalFlowMatcher"]


class KNNConditionalFlowMatcher(ConditionalFlowMatcher):
    """CFM on ``KNNNoiseCoupling(k)``: each ``x1[i]`` takes the nearest of k fresh noises (Immiscible Diffusion).

    ``x0``: None (k*b candidates drawn) or the ``k * b`` candidates (row ``i*k + j`` is item i's j-th).

    Example::

        fm = KNNConditionalFlowMatcher(k=16)
        t, xt, ut = fm.sample_location_and_conditional_flow(None, x1)
    """

    def __init__(self, k: int = 16, sigma: float | int = 0.0, *, generator=None):
        super().__init__(sigma)
        self.coupling = KNNNoiseCoupling(k, generator=generator)

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        x0, _ = self.coupling(x1, x0=x0)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)


class SemidiscreteConditionalFlowMatcher(ConditionalFlowMatcher):
    """CFM on ``SemidiscreteCoupling``: ``fm.draw(b)`` gives the next batch's indices, then
    ``sample_location_and_conditional_flow(None, data[idx], indices=idx)`` pairs it with the noise drawn.

    ``options`` go to ``SemidiscreteCoupling(data, **options)``; call ``fm.coupling.fit(...)`` first.
    ``state_dict``/``load_state_dict`` checkpoint the potential.

    Example::

        fm = SemidiscreteConditionalFlowMatcher(data, sigma=0.0)
        fm.coupling.fit(2000)
        idx = fm.draw(256)
        t, xt, ut = fm.sample_location_and_conditional_flow(None, data[idx], indices=idx)
    """

    def __init__(self, data, sigma: float | int = 0.0, **options):
        super().__init__(sigma)
        self.coupling = SemidiscreteCoupling(data, **options)

    def draw(self, b: int, **kw):
        return self.coupling.draw(b, **kw)

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False, *, indices=None):
        if x0 is not None:
            raise ValueError("SemidiscreteConditionalFlowMatcher draws the noise: x0 must be None")
        x0, _ = self.coupling(x1, indices)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def state_dict(self) -> dict:
        return self.coupling.state_dict()

    def load_state_dict(self, state: dict):
        self.coupling.load_state_dict(state)
