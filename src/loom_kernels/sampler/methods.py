"""The fixed-step ODE methods, one small class each: where a step evaluates the model, the quadrature
weight of each evaluation, and the step itself as fused updates (``update.py``).

E. Hairer, S. P. Norsett, G. Wanner, "Solving Ordinary Differential Equations I", sec. II.1:
- euler:    x' = x + h v(x, t)                                   (1 NFE per step, order 1)
- midpoint: x' = x + h v(x + h/2 v(x, t), t + h/2)               (2 NFE per step, order 2)
- heun:     x' = x + h/2 (v(x, t) + v(x + h v(x, t), t + h))     (2 NFE per step, order 2)
- rk4:      classical Runge-Kutta, stages at t, t + h/2, t + h/2, t + h (4 NFE per step, order 4)

A step gets ``v(y, i)`` (the field at the step's i-th evaluation time), the state ``x``, ``scratch``
buffers of x's shape and ``out`` (which may be ``x`` itself). A model may return its input tensor,
so a stage's velocity may alias the scratch buffer it was evaluated at: every update below is
elementwise, and a buffer is overwritten only once the velocities read from it are used.
New method: a class here and a line in ``REGISTRY``.
"""

from __future__ import annotations

from .update import update

__all__ = ["Method", "Euler", "Midpoint", "Heun", "RK4", "REGISTRY", "METHODS"]


class Method:
    """A fixed-step method: ``stages`` model evaluations per step, ``scratch`` buffers of x's shape."""

    name = ""
    stages = 1
    scratch = 0
    offsets: tuple = (0.0,)  # evaluation times within a step, as fractions of h
    fractions: tuple = (1.0,)  # quadrature weight of each evaluation, as fractions of h

    def step(self, v, x, h: float, scratch: list, out) -> None:
        raise NotImplementedError


class Euler(Method):
    name = "euler"

    def step(self, v, x, h, scratch, out):
        update(x, v(x, 0), None, h, 0.0, out)


class Midpoint(Method):
    name = "midpoint"
    stages, scratch = 2, 1
    offsets, fractions = (0.0, 0.5), (0.0, 1.0)

    def step(self, v, x, h, scratch, out):
        (s,) = scratch
        update(x, v(x, 0), None, 0.5 * h, 0.0, s)
        update(x, v(s, 1), None, h, 0.0, out)


class Heun(Method):
    """The explicit trapezoidal rule: the last step also makes its correction (unlike EDM's sampler)."""

    name = "heun"
    stages, scratch = 2, 1
    offsets, fractions = (0.0, 1.0), (0.5, 0.5)

    def step(self, v, x, h, scratch, out):
        (s,) = scratch
        v1 = v(x, 0)
        update(x, v1, None, h, 0.0, s)
        update(x, v1, v(s, 1), 0.5 * h, 0.5 * h, out)


class RK4(Method):
    """Classical RK4; ``acc`` gathers x + h/6 k1 + h/3 k2 + h/3 k3 while the stages run."""

    name = "rk4"
    stages, scratch = 4, 2
    offsets, fractions = (0.0, 0.5, 0.5, 1.0), (1 / 6, 1 / 3, 1 / 3, 1 / 6)

    def step(self, v, x, h, scratch, out):
        s, acc = scratch
        k1 = v(x, 0)
        update(x, k1, None, 0.5 * h, 0.0, s)
        k2 = v(s, 1)
        update(x, k1, k2, h / 6, h / 3, acc)
        update(x, k2, None, 0.5 * h, 0.0, s)
        k3 = v(s, 2)
        update(acc, k3, None, h / 3, 0.0, acc)
        update(x, k3, None, h, 0.0, s)
        update(acc, v(s, 3), None, h / 6, 0.0, out)


#: every fixed-step method by name
REGISTRY: dict[str, Method] = {m.name: m for m in (Euler(), Midpoint(), Heun(), RK4())}
#: model evaluations per step of each method
METHODS: dict[str, int] = {name: m.stages for name, m in REGISTRY.items()}
