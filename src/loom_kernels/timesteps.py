"""Timestep distributions for flow-matching training: ``uniform``, ``beta(a, b)``, ``u_shaped``, ``logit_normal(m, s)``.

One place for the trainer (``TrainConfig.t_dist``, ``--t-dist``), the TorchCFM layer's ``t`` argument and
plain loops. Each distribution has ``sample(n, device=, dtype=, generator=)``, ``cdf(t)`` and ``pdf(t)``
(numpy, float64: the tests check the draws against them with a KS test).

- ``uniform``: ``t ~ U[0, 1]`` (``torch.rand``, so the trainer's default draws are unchanged).
- ``beta(a, b)``: ``t ~ Beta(a, b)``; LOOM-CFM's code uses Beta(0.5, 0.5).
- ``u_shaped``: LOOM-CFM's ``t = 0.5 - 0.25 asinh(sinh(2) (1 - 2U))``, ``U ~ U[0, 1]``: density
  ``2 cosh(2 - 4t) / sinh(2)``, more weight near both ends.
- ``logit_normal(m, s)``: ``t = sigmoid(m + s Z)``, ``Z ~ N(0, 1)`` (SD3-style training, Esser et al., 2024).

Specs are a name (``"u_shaped"``), a name with parameters (``"beta(0.5, 0.5)"``, ``"beta:0.5,0.5"``) or a
:class:`TimestepDist`.

Example:
    >>> t = timestep_dist("beta(0.5, 0.5)").sample(4)
    >>> t.shape
    torch.Size([4])
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

__all__ = ["T_DISTS", "TimestepDist", "timestep_dist"]

T_DISTS = ("uniform", "beta", "u_shaped", "logit_normal")
_DEFAULTS = {"uniform": (), "beta": (0.5, 0.5), "u_shaped": (), "logit_normal": (0.0, 1.0)}
_SINH2 = math.sinh(2.0)


class TimestepDist:
    """One timestep distribution on [0, 1]; build it with :func:`timestep_dist`."""

    def __init__(self, name: str, params: tuple = ()):
        self.name, self.params = name, tuple(float(p) for p in params)

    def __repr__(self) -> str:
        return self.name + (f"({', '.join(f'{p:g}' for p in self.params)})" if self.params else "")

    def __eq__(self, other) -> bool:
        return isinstance(other, TimestepDist) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, self.params))

    def sample(self, n: int, *, device=None, dtype=torch.float32, generator: torch.Generator | None = None):
        """``n`` draws, a ``(n,)`` tensor on ``device`` (``generator``: on that device; else torch's global RNG)."""
        kw = {"device": device, "generator": generator}
        if self.name == "uniform":
            return torch.rand(n, dtype=dtype, **kw)
        if self.name == "u_shaped":
            u = torch.rand(n, dtype=torch.float64, **kw)
            return (0.5 - 0.25 * torch.asinh(_SINH2 * (1 - 2 * u))).to(dtype)
        if self.name == "logit_normal":
            m, s = self.params
            return torch.sigmoid(m + s * torch.randn(n, dtype=torch.float64, **kw)).to(dtype)
        a, b = self.params  # beta: torch's gamma sampler takes no generator
        if generator is not None:
            raise ValueError("generator= is not supported for beta(a, b) (torch's gamma sampler has none)")
        conc = [torch.tensor(v, dtype=torch.float64, device=device) for v in (a, b)]
        return torch.distributions.Beta(*conc).sample((n,)).clamp_(0.0, 1.0).to(dtype)

    def cdf(self, t) -> np.ndarray:
        """The distribution function at ``t`` (numpy, float64)."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
        if self.name == "uniform":
            return t
        if self.name == "u_shaped":
            return 0.5 * (1.0 - np.sinh(2.0 - 4.0 * t) / _SINH2)
        from scipy import special

        if self.name == "beta":
            return special.betainc(*self.params, t)
        m, s = self.params
        with np.errstate(divide="ignore"):
            return special.ndtr((special.logit(t) - m) / s)

    def pdf(self, t) -> np.ndarray:
        """The density at ``t`` in (0, 1) (numpy, float64)."""
        t = np.asarray(t, dtype=np.float64)
        if self.name == "uniform":
            return np.ones_like(t)
        if self.name == "u_shaped":
            return 2.0 * np.cosh(2.0 - 4.0 * t) / _SINH2
        from scipy import stats

        if self.name == "beta":
            return stats.beta.pdf(t, *self.params)
        m, s = self.params
        return stats.norm.pdf((np.log(t) - np.log1p(-t) - m) / s) / (s * t * (1 - t))


def _check(name: str, params: tuple, arg: str) -> tuple:
    want = len(_DEFAULTS[name])
    if len(params) not in (0, want):
        raise ValueError(f"{arg}={name!r} takes {want} parameters, got {len(params)}: {params}")
    params = tuple(params) or _DEFAULTS[name]
    if not all(isinstance(p, (int, float)) and math.isfinite(p) for p in params):
        raise ValueError(f"{arg}: the parameters of {name} must be finite numbers, got {params}")
    if name == "beta" and not all(p > 0 for p in params):
        raise ValueError(f"{arg}: beta(a, b) needs a > 0 and b > 0, got {params}")
    if name == "logit_normal" and not params[1] > 0:
        raise ValueError(f"{arg}: logit_normal(m, s) needs s > 0, got s={params[1]}")
    return params


def timestep_dist(spec="uniform", *params, arg: str = "t_dist") -> TimestepDist:
    """The distribution ``spec`` names: ``"uniform"``, ``"beta(a, b)"``, ``"u_shaped"``, ``"logit_normal(m, s)"``.

    Parameters go in the string (``"beta(2, 1)"`` or ``"beta:2,1"``) or after it (``timestep_dist("beta", 2,
    1)``); without them beta is Beta(0.5, 0.5) and logit_normal is (0, 1). ``arg`` is the argument name the
    errors give (``t_dist``, ``--t-dist``, ``t``). A :class:`TimestepDist` is returned as it is.
    """
    if isinstance(spec, TimestepDist) and not params:
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{arg} must be a distribution name {T_DISTS} (or a TimestepDist), got {type(spec).__name__}")
    m = re.fullmatch(r"\s*([a-z_]+)\s*(?:\((.*)\)|:(.*))?\s*", spec)
    if m is None or m[1] not in T_DISTS:
        raise ValueError(
            f"{arg} must be one of {T_DISTS} (with parameters as 'beta(0.5, 0.5)' or 'logit_normal:0,1'), got {spec!r}"
        )
    text = m[2] if m[2] is not None else m[3]
    if text is not None and params:
        raise ValueError(f"{arg}: give the parameters in {spec!r} or as arguments, not both")
    if text is not None and text.strip():
        try:
            params = tuple(float(p) for p in text.split(","))
        except ValueError:
            raise ValueError(f"{arg}: the parameters in {spec!r} must be numbers separated by commas") from None
    return TimestepDist(m[1], _check(m[1], tuple(params), arg))
