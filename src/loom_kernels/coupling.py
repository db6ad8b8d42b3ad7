"""The couplings' old import path, kept as a re-export of :mod:`loom_kernels.couplings`."""

from .couplings import IndependentCoupling, LoomCoupling, MinibatchOTCoupling

__all__ = ["IndependentCoupling", "MinibatchOTCoupling", "LoomCoupling"]
