"""Entropic OT couplings at any batch size: pairs drawn from a streamed Sinkhorn plan.

M. Klein, A. Mousavi-Hosseini, S. Zhang, M. Cuturi, "On Fitting Flow Models with Large Sinkhorn
Couplings", 2025: large batches and a low, scale-invariant epsilon. The solver and the sampler
are ``loom_kernels.sinkhorn`` (the cost is never stored); this file holds the bookkeeping:

- labels, scopes: the steps of ``scopes/sinkhorn_steps.py``;
- cond: ``sqrt(cond_weight) * c`` appended to the features of both sides (the streamed cost is the
  squared Euclidean one, so the cost gains exactly ``cond_weight * |c_i - c_j|^2``); C2OT's options
  (``c2ot.py``): the cosine's unit rows scaled by ``sqrt(cond_weight / 2)``, the adaptive weight from the
  closed-form means of both sides (no ``(n, m)`` cost), C2OT's own rule ``"c2ot"`` from the ``(n, k n)``
  cost formed once per call in float64 (an order statistic needs every pair), ``oversample`` as a rectangular
  problem;
"""

from __future__ import annotations

import math

import torch

from .base import Coupling, check_cost_range, check_flag, check_indices, check_pair_inputs, pair_out
from .c2ot import (
    COND_METRICS,
    check_c2ot_options,
    check_cond_range,
    cond_features,
    gathered_c2ot_weight,
    streamed_adaptive_weight,
    weight_code,
)
from .scopes.agree import agree, float_bits, generator_hash
from .scopes.group import Group
from .scopes.partition import DEFAULT_GROUP_SIZE, SCOPES, check_group_size, check_scope
from .scopes.sinkhorn_steps import SinkhornSpec, step_for
from .scopes.solve import raise_bad_data

_GOLDEN64 = 0x9E3779B97F4A7C15


class SinkhornCoupling(Coupling):
    """Entropic OT coupling: each data row's noise is drawn from its row of the Sinkhorn plan.

    ``epsilon`` (relative to the batch's mean cost when ``relative``, scale invariant as in Klein et
    al. 2025; absolute otherwise), ``tol``/``max_iter`` as ``loom_kernels.sinkhorn.sinkhorn`` (a
    ``SinkhornWarning`` with the error reached when ``max_iter`` stops it). Each row ``i`` draws its
    noise from ``P_ij / sum_j P_ij`` by a streamed Gumbel-max (seeded from ``generator``), or takes its
    argmax (``argmax=True``): pairs are drawn with replacement, so a noise row may serve several items.

    ``labels (b,)`` (integer; needs ``m == b``): no cross-class pair is ever drawn (one balanced problem
    per class, solved in one batched call; epsilon relative to the whole batch's mean cost). ``cond
    (b, Dc)`` (float; needs ``m == b``): the cost gains ``cond_weight * |c_i - c_j|^2``, exactly. C2OT's
    options, as ``MinibatchOTCoupling``'s: ``cond_metric="cosine"`` (``cond_weight * (1 - cos)``, exactly),
    ``cond_weight="adaptive"`` (per call, the weight at which the condition is the fraction ``cond_ratio`` of
    the mean cost over every (data, noise) pair of the global batch), ``cond_weight="c2ot"`` (per call, C2OT's
    own rule, ``c2ot.c2ot_search_weight``, over the same pairs: it forms their ``(n, k n)`` cost once in
    float64) and ``oversample=k`` (with ``x0``
    drawn: ``k*b`` noise rows, each of mass ``1/(k b)``, rows ``i*k .. i*k+k-1`` carrying item i's condition
    and label; not with ``scope="grouped"``). ``stats["cond_weight"]``: the weight used.

    Scopes under torch.distributed: ``"global"`` solves the ``W*b`` items of all ranks as one problem
    (equal to one process on the concatenated batch, to ``tol``): noise all-gathered once, then one
    max and one sum all-reduce of ``m``-vectors per iteration. ``"local"``: each rank alone.
    ``"grouped"``: the random partition of ``MinibatchOTCoupling``'s grouped scope. Every rank checks
    that all ranks use the same configuration (epsilon, scope, ...): a mismatch raises on every rank.

    ``stats``: ``pre_cost``, ``post_cost`` (mean cost of the drawn pairs), ``swaps``, ``iterations``,
    ``error`` (marginal error reached), ``sharpness`` (normalised entropy, 0 sharp, 1 independent).

    Example::

        coupling = SinkhornCoupling(0.05)
        x0, x1 = coupling(torch.randn(4096, 2))      # x0[i] drawn from x1[i]'s row of the plan
    """

    def __init__(
        self,
        epsilon: float = 0.05,
        *,
        relative: bool = True,
        tol: float = 1e-3,
        max_iter: int = 1000,
        generator: torch.Generator | None = None,
        scope: str = "global",
        process_group=None,
        group_size: int = DEFAULT_GROUP_SIZE,
        seed: int = 0,
        argmax: bool = False,
        cond_weight: float | str = 1.0,
        cond_metric: str = "sqeuclidean",
        cond_ratio: float | None = None,
        oversample: int = 1,
    ):
        self.epsilon = _check_positive("epsilon", epsilon)
        self.tol = _check_positive("tol", tol)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        check_scope(scope)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.relative, self.argmax, self.max_iter = bool(relative), bool(argmax), max_iter
        why = "scope='grouped' routes each item's noise row with it" if scope == "grouped" else ""
        c2ot = check_c2ot_options(cond_weight, cond_metric, cond_ratio, oversample, no_oversample=why)
        self.cond_weight, self.cond_metric, self.cond_ratio, self.oversample = c2ot
        self.group_size = check_group_size(group_size)
        self._part_gen = torch.Generator().manual_seed(seed)
        self.generator, self.process_group, self.scope = generator, process_group, scope
        self.stats = {}

    def _config(self) -> dict:
        return {  # floats as their bit patterns: equal configurations agree exactly
            "epsilon": float_bits(self.epsilon),
            "relative": int(self.relative),
            "tol": float_bits(self.tol),
            "max_iter": self.max_iter,
            "scope": SCOPES.index(self.scope),
            "argmax": int(self.argmax),
            "cond_weight": float_bits(weight_code(self.cond_weight)),
            "cond_metric": COND_METRICS.index(self.cond_metric),
            "cond_ratio": float_bits(self.cond_ratio),
            "oversample": self.oversample,
            "group_size": self.group_size,
            "partition generator": generator_hash(self._part_gen),
        }

    def __call__(
        self,
        x1: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        return_indices: bool = False,
    ):
        """Couple ``x1 (b, *shape)`` with ``x0 (m, *shape)`` (drawn when None) -> ``(x0 (b, *shape), x1)``.

        ``return_indices=True``: also the int64 ``(b,)`` rows of the noise each item drew (rows of this
        rank's ``x0`` in scope ``"local"``, of every rank's ``x0`` concatenated in rank order otherwise;
        with replacement: an index may repeat)."""
        world = Group(self.process_group)
        grp = Group(self.process_group, local=self.scope == "local")
        name = type(self).__name__
        try:
            labels, cond = check_pair_inputs(x1, x0, labels, cond, self.scope)
            check_indices(indices, x1.shape[0], name)
            check_flag(return_indices, "return_indices")
            if not bool(torch.isfinite(x1).all()) or (x0 is not None and not bool(torch.isfinite(x0).all())):
                raise_bad_data("x1" if not bool(torch.isfinite(x1).all()) else "x0")
            # The streamed cost is float32 (float64 for float64 data): refused here, naming the argument,
            # before the generator moves (the solver alone would name its own x and y).
            dt = torch.float64 if x1.dtype == torch.float64 else torch.float32
            check_cost_range("x1", x1, 1.0, dt, "scale the data down, or pass float64 data")
            check_cond_range(cond, self.cond_weight, self.cond_metric, dt)
        except (TypeError, ValueError):
            sizes = {"batch size": -1, "x0 rows": -1, "cond dim": -1}
            specs = dict.fromkeys(("x1", "x0", "labels"))
            agree(world, name, sizes, {"labels": 0, "cond": 0}, self._config(), failed=True, specs=specs)
            raise
        k = 1
        if x0 is None:  # oversample=k: k*b rows (row i*k+j drawn for item i)
            k = self.oversample
            shape = (k * x1.shape[0], *x1.shape[1:])
            x0 = torch.randn(shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        b = x1.shape[0]
        many = grp.world > 1
        sizes = {
            "batch size": b if many else 0,
            "x0 rows": x0.shape[0] if many else 0,
            "cond dim": cond.shape[1] if (many and cond is not None) else 0,
        }
        given = {"labels": labels is not None and many, "cond": cond is not None and many}
        specs = {"x1": x1, "x0": x0, "labels": labels} if many else dict.fromkeys(("x1", "x0", "labels"))
        agree(world, name, sizes, given, self._config(), specs=specs)
        if b == 0:
            self.stats = {}
            return pair_out(x0[:0], x1, torch.zeros(0, dtype=torch.int64, device=x1.device), return_indices)
        seed = self._draw_seed(grp.rank, x1.device)
        dt = torch.float64 if x1.dtype == torch.float64 else torch.float32
        x1f, x0f = x1.flatten(1).to(dt), x0.flatten(1).to(dt)
        w = self.cond_weight
        if cond is not None and w == "adaptive":  # over the batch the scope couples (grouped: the global one)
            w = streamed_adaptive_weight(grp, x1f, x0f, cond, cond, self.cond_metric, self.cond_ratio)
        elif cond is not None and w == "c2ot":  # the same batch, its (n, k n) cost in float64 (an order statistic)
            w = gathered_c2ot_weight(grp, x1f, x0f, cond, k, self.cond_metric, self.cond_ratio)
        if cond is not None and w > 0:
            c = cond_features(cond, w, self.cond_metric).to(dt)
            x1f, x0f = torch.cat([x1f, c], 1), torch.cat([x0f, c.repeat_interleave(k, 0)], 1)
        spec = SinkhornSpec(
            self.epsilon, self.relative, self.tol, self.max_iter, self.argmax, self.group_size, self._part_gen, k
        )
        out, self.stats, idx = step_for(self.scope)(grp, x1f, x0f, x0, labels, seed, spec)
        if cond is not None:
            self.stats["cond_weight"] = torch.tensor(float(w), dtype=torch.float64, device=x1.device)
        return pair_out(out, x1, idx, return_indices)

    def _draw_seed(self, rank: int, device) -> int:
        """One 63-bit draw from the generator (or the global RNG), mixed with the rank."""
        gen = self.generator
        s = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device if gen is not None else "cpu"))
        return (s + rank * _GOLDEN64) % (2**63)


def _check_positive(name, v, allow_inf=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or (v == math.inf and not allow_inf):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)
