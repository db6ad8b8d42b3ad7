"""ODE samplers for flow-matching models: Euler, explicit midpoint, Heun, RK4 (fixed step) and dopri5 (adaptive).

Integrates dx/dt = model(x, t) from t0 (noise) to t1 (data) with exactly ``nfe`` model
evaluations (fixed-step methods) or as many as the tolerances need (dopri5: the Dormand-Prince 5(4)
pair with FSAL and the usual step-size control, Hairer, Norsett, Wanner sec. II.4-5). The model is
called in one of four conventions (``SIGNATURES``), with optional keyword inputs (class labels, ...)
and classifier-free guidance (Ho & Salimans 2022) batched into one call per evaluation. Methods
(E. Hairer, S. P. Norsett, G. Wanner, "Solving Ordinary Differential Equations I", sec. II.1):
- euler:    x' = x + h v(x, t)                                   (1 NFE per step, order 1)
- midpoint: x' = x + h v(x + h/2 v(x, t), t + h/2)               (2 NFE per step, order 2)
- heun:     x' = x + h/2 (v(x, t) + v(x + h v(x, t), t + h))     (2 NFE per step, order 2;
            the explicit trapezoidal rule, *not* the EDM variant (Karras et al. 2022) that skips
            the correction on the last step: every step, the last included, costs 2 NFE.)
- rk4:      classical Runge-Kutta                                (4 NFE per step, order 4)

CUDA: every state update is one fused Triton kernel (``update.py``), the loop never synchronizes
with the host, and repeated calls replay the whole loop as a CUDA graph. CPU: the same updates in
plain torch.

The package, one idea per module:
- ``api``     ``sample``, the public entry: argument checks, then one of the runs below
- ``options`` ``Guidance`` and ``Options``, ``sample``'s grouped keywords
- ``methods`` one class per fixed-step method (a new method: a class and a ``REGISTRY`` line)
- ``update``  the fused update kernel and its torch twin
- ``field``   the calling conventions (one table), keyword inputs and classifier-free guidance
- ``fixed``   the fixed-step run: time grid, quadrature weights, the loop, the eager run
- ``graphs``  CUDA-graph capture and replay, ``GraphCache``
- ``dopri5``  the adaptive Dormand-Prince 5(4) pair
"""

from __future__ import annotations

from .api import sample
from .dopri5 import ADAPTIVE
from .field import SIGNATURES
from .fixed import quadrature
from .graphs import GraphCache, clear_graph_cache
from .methods import METHODS, REGISTRY, Method
from .options import Guidance, Options

__all__ = [
    "sample",
    "Guidance",
    "Options",
    "quadrature",
    "clear_graph_cache",
    "GraphCache",
    "METHODS",
    "REGISTRY",
    "Method",
    "ADAPTIVE",
    "SIGNATURES",
]
