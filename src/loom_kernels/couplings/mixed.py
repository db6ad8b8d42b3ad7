"""Two couplings mixed: per batch (:class:`MixedCoupling`) or per item by timestep (:class:`TimestepMixedCoupling`).

LOOM-CFM's code has both (``MixedCoupling``, ``TimestampMixedCoupling``): e.g. a reflow coupling mixed
with LOOM, or LOOM at small ``t`` and independent noise at large ``t``. A part is called only on the items
it serves, so a ``LoomCoupling`` part reassigns (and its seed table updates) only those items' noise.
"""

from __future__ import annotations

import numbers

import torch

from .base import Coupling, call_coupling

__all__ = ["MixedCoupling", "TimestepMixedCoupling", "mix_probability"]


def _check_part(c, name: str):
    if not callable(c):
        raise TypeError(f"{name} must be a coupling (callable as {name}(x1, indices, ...)), got {type(c).__name__}")
    return c


def _options(x0, labels, cond, return_indices) -> dict:
    # Only what the caller gave: a plain callable or an older coupling need not take every keyword.
    kw = {k: v for k, v in (("x0", x0), ("labels", labels), ("cond", cond)) if v is not None}
    if return_indices:
        kw["return_indices"] = True
    return kw


class _Pair:
    """What both mixes share (a mixin, so that only the two public classes are ``Coupling`` subclasses)."""

    accepts_t = True

    def __init__(self, first, second, generator):
        self.first, self.second = _check_part(first, "first"), _check_part(second, "second")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a CPU torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.stats = {}

    def _rand(self, n: int) -> torch.Tensor:
        # Drawn on the CPU (the choice never needs the device), from generator or torch's global RNG.
        return torch.rand(n, dtype=torch.float64, generator=self.generator)

    def state_dict(self) -> dict:
        return {name: getattr(getattr(self, name), "state_dict", dict)() for name in ("first", "second")}

    def load_state_dict(self, state: dict) -> None:
        for name in ("first", "second"):
            part = getattr(self, name)
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(state.get(name, {}))
            elif state.get(name):
                raise ValueError(f"{name} has no load_state_dict, but the state holds keys {sorted(state[name])}")


class MixedCoupling(_Pair, Coupling):
    """Each batch is coupled by ``first`` with probability ``p``, else by ``second`` (LOOM-CFM's ``MixedCoupling``).

    The call's keywords go to the chosen coupling as they are (``t=`` only if it takes timesteps), and its
    ``stats`` are this coupling's, plus ``"first"`` (1 or 0). The choice comes from ``generator`` (a CPU
    ``torch.Generator``) or torch's global RNG. Under DDP with parts that exchange across ranks (a global
    scope), give every rank a generator with the same seed, so that all ranks choose the same part (the
    trainer seeds the global RNG per rank). ``state_dict`` holds both parts' states.

    Example::

        c = MixedCoupling(ReflowCoupling("pairs/"), IndependentCoupling(), p=0.5)
    """

    def __init__(self, first, second, p: float, *, generator: torch.Generator | None = None):
        super().__init__(first, second, generator)
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1] (the chance of using first), got {p!r}")
        self.p = float(p)

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False, t=None):
        use_first = bool(self._rand(1)[0] < self.p)
        part = self.first if use_first else self.second
        out = call_coupling(part, x1, indices, t=t, **_options(x0, labels, cond, return_indices))
        self.stats = {**getattr(part, "stats", {}), "first": int(use_first)}
        return out


def mix_probability(t: torch.Tensor, power: float) -> torch.Tensor:
    """``p(t) = power t^(power-1) - (power-1) t^power``, clipped to [0, 1] (above 1 near t = 0 when power < 1)."""
    t = t.double()
    return (power * t.pow(power - 1) - (power - 1) * t.pow(power)).nan_to_num(1.0).clamp(0.0, 1.0)


class TimestepMixedCoupling(_Pair, Coupling):
    """Item ``i`` is coupled by ``first`` with probability ``p(t_i)``, else by ``second`` (LOOM-CFM's
    ``TimestampMixedCoupling``), ``p(t) = power t^(power-1) - (power-1) t^power`` (:func:`mix_probability`).

    ``power = 1`` uses ``first`` always; ``power > 1`` gives ``p(0) = 0``, ``p(1) = 1``, rising in ``t``.
    Needs the batch's timesteps ``t (b,)`` in [0, 1] (the trainer passes them). Each part is called once on
    the items it serves (and not at all when it serves none), with their rows of ``indices``, ``x0``,
    ``labels``, ``cond`` and ``t``; the results are put back in the batch's order. ``return_indices``:
    ``perm[i]`` is the batch position of the source of ``x0[i]``, as each part reports it. ``stats``: the
    parts' costs weighted by their item counts, their swaps summed, and ``"first"`` (the fraction served
    by ``first``). Not for a coupling that needs every rank of a process group in each call (LOOM with a
    process group): the parts' item counts differ between ranks.

    Example::

        c = TimestepMixedCoupling(LoomCoupling(n, shape), IndependentCoupling(), power=2.0)
        x0, x1 = c(x1, idx, t=t)
    """

    def __init__(self, first, second, power: float, *, generator: torch.Generator | None = None):
        super().__init__(first, second, generator)
        if isinstance(power, bool) or not isinstance(power, numbers.Real) or not float(power) > 0:
            raise ValueError(
                f"power must be a number > 0 (p(t) = power t^(power-1) - (power-1) t^power), got {power!r}"
            )
        self.power = float(power)

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False, t=None):
        if not isinstance(x1, torch.Tensor) or x1.ndim < 1:
            raise TypeError(f"x1 must be a torch.Tensor of shape (b, *shape), got {type(x1).__name__}")
        b = x1.shape[0]
        if t is None:
            raise ValueError("TimestepMixedCoupling needs the batch's timesteps: call coupling(x1, indices, t=t)")
        t = torch.as_tensor(t)
        if t.shape != (b,) or not t.is_floating_point():
            raise ValueError(f"t must be a floating tensor of shape (b,) = ({b},), got {t.dtype} {tuple(t.shape)}")
        tc = t.detach().cpu()
        if not bool(((tc >= 0) & (tc <= 1)).all()):
            raise ValueError(f"t must lie in [0, 1], got values in [{float(tc.min())}, {float(tc.max())}]")
        mask = self._rand(b) < mix_probability(tc, self.power)
        if indices is not None:
            indices = torch.as_tensor(indices)
        x0_out, x1_out = torch.empty_like(x1), torch.empty_like(x1)
        perm_out = torch.empty(b, dtype=torch.int64, device=x1.device) if return_indices else None
        pre = post = torch.zeros((), dtype=torch.float64)
        swaps = 0
        for part, sel in ((self.first, mask), (self.second, ~mask)):
            rows = sel.nonzero().flatten()
            if rows.numel() == 0:
                continue
            dev = rows.to(x1.device)

            def take(v, rows=rows):
                return None if v is None else v[rows.to(v.device)]

            out = call_coupling(
                part,
                x1[dev],
                take(indices),
                t=take(t),
                **_options(take(x0), take(labels), take(cond), return_indices),
            )
            x0_out[dev], x1_out[dev] = out[0], out[1]
            if return_indices:
                perm_out[dev] = dev[out[2].to(x1.device)]
            st, w = getattr(part, "stats", {}), rows.numel() / b
            pre = pre + w * _num(st.get("pre_cost", 0.0))
            post = post + w * _num(st.get("post_cost", 0.0))
            swaps = swaps + int(_num(st.get("swaps", 0)))
        self.stats = {"pre_cost": pre, "post_cost": post, "swaps": torch.tensor(swaps), "first": mask.double().mean()}
        return (x0_out, x1_out, perm_out) if return_indices else (x0_out, x1_out)


def _num(v) -> torch.Tensor:
    return torch.as_tensor(v).detach().to("cpu", torch.float64)
