"""Minibatch OT: the exact assignment between each minibatch and its noise (Pooladian et al. 2023; Tong et al. 2023)."""

from __future__ import annotations

import torch

from .base import (
    METRICS,
    Coupling,
    check_flag,
    check_indices,
    check_metric,
    check_pair_inputs,
    pair_out,
)
from .c2ot import COND_METRICS, c2ot_global_step, check_c2ot_options, check_cond_range, is_weight_rule, weight_code
from .scopes.agree import agree, float_bits, generator_hash
from .scopes.group import Group
from .scopes.minibatch_steps import MinibatchSpec, step_for
from .scopes.partition import DEFAULT_GROUP_SIZE, SCOPES, check_group_size, check_scope
from .scopes.solve import cost_dtype


class MinibatchOTCoupling(Coupling):
    """Exact minibatch optimal transport: the noise of each batch is permuted to the optimal pairing.

    ``x0`` is drawn like ``IndependentCoupling`` when not given. With ``x0`` of ``m >= b`` rows, the
    ``b`` best-matching rows are kept (rectangular assignment). The assignment is exact (``assign``).
    The call follows the couplings' protocol ``coupling(x1, indices=None, *, x0=None, labels=None)``:
    the data comes first, ``indices`` (integer, ``(b,)``) are checked and not used, and ``x0`` is
    keyword-only: TorchCFM's order is ``(x0, x1)``, and ``coupling(x0, x1)`` would treat the noise as
    data and train the reverse flow, so a floating tensor in the ``indices`` place is refused.

    ``labels (b,)`` (integer, on ``x1``'s device; needs ``m == b``): noise is only exchanged between
    items of the same label, which equals exact OT solved per class (one batched solve).

    ``cond (b, Dc)`` or ``(b,)`` (floating, on ``x1``'s device; needs ``m == b``): row ``j`` of ``x0`` is item
    ``j``'s noise and carries ``cond[j]``, so the cost of giving item ``i`` the noise ``j`` is
    ``metric(x1_i, x0_j) + cond_weight * ||cond_i - cond_j||^2`` (one ``(b, b)`` addition to the cost,
    ``scopes.solve.add_cond_cost``); ``cond_weight=0`` is the unconditioned coupling bit for bit, a huge weight
    exchanges noise only between equal conditions, as ``labels`` do. ``stats`` include the penalty. With
    ``labels`` too, labels forbid and cond penalises. C2OT's options (Cheng, Schwing, ICCV 2025;
    ``c2ot.py``): ``cond_metric="cosine"`` (``1 - cos(cond_i, cond_j)``), ``cond_weight="adaptive"`` (per
    batch, the weight at which the condition is the fraction ``cond_ratio`` in (0, 1) of the mean pair cost),
    ``cond_weight="c2ot"`` (per batch, C2OT's own ``search_for_w``: the largest weight leaving the fraction
    ``cond_ratio`` of all pairs no dearer than their item's independent pair; ``cond_ratio=None``: 0.5 for
    ``"adaptive"``, 0.05 for ``"c2ot"``) and ``oversample=k`` (with ``x0`` drawn: ``k*b`` noise rows, the
    assignment keeps the best ``b``; rows ``i*k .. i*k+k-1`` carry item i's condition and label; item i's
    independent pair is row ``i*k``); not with ``scope="grouped"``.
    ``stats["cond_weight"]``: the weight used.

    ``return_indices=True`` returns ``(x0_matched, x1, perm)``: ``perm (b,)`` int64 with
    ``x0_matched == x0[perm]`` (under a process group of ``W`` ranks, in every scope but ``"local"``:
    indices into the concatenation of every rank's ``x0``, rank order), so per-noise fields regroup as
    ``field[perm]``. Under a process group pass ``return_indices`` the same on every rank.

    Distributed: with a process group of size ``W > 1`` (``process_group`` or the default group) and
    ``scope="global"``, one call couples the ``W*b`` items of all ranks exactly as one process would
    couple the concatenated batch (with ``x0`` the concatenation of every rank's noise); each rank
    gets its own rows' noise. Ranks all-gather their noise and then their cost rows, or their data
    when ``D < W*m``. Seed each rank's ``generator`` (or global RNG) differently. ``scope="local"``
    couples each rank's batch on its own; every rank still checks, in one tiny all-gather per call, that
    all ranks use the same configuration (scope, metric, group size), so a rank built with another scope
    raises on every rank instead of leaving the others waiting in a collective. ``scope="grouped"``
    splits the global batch at random into groups of at most ``group_size`` items (the partition comes
    from a generator seeded with ``seed``, the same on every rank, checkpointed in ``state_dict``); each
    group is solved by one owner rank, owners in parallel: data and noise rows travel to the owner and the
    matched noise rows come back (``O(b*D)`` bytes per rank whatever ``W`` is; needs ``m == b``). Each
    group's result equals ``MinibatchOTCoupling()(x1[g], x0=x0[g])`` in one process.

    Shapes: ``x1 (b, *shape)``, ``x0 (m, *shape)`` with ``m >= b`` -> ``(x0 (b, *shape), x1)``.

    Example::

        coupling = MinibatchOTCoupling()
        x0, x1 = coupling(torch.rand(64, 2), labels=torch.randint(10, (64,)))
        # x0[i] is the noise paired with x1[i]; coupling.stats["post_cost"] <= ["pre_cost"]
    """

    def __init__(
        self,
        metric: str = "sqeuclidean",
        *,
        generator: torch.Generator | None = None,
        process_group=None,
        scope: str = "global",
        group_size: int = DEFAULT_GROUP_SIZE,
        seed: int = 0,
        cond_weight: float | str = 1.0,
        cond_metric: str = "sqeuclidean",
        cond_ratio: float | None = None,
        oversample: int = 1,
    ):
        check_scope(scope)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.group_size = check_group_size(group_size)
        self._part_gen = torch.Generator().manual_seed(seed)  # the same on every rank: the partition
        self.metric = check_metric(metric)
        self.generator = generator
        self.process_group = process_group
        self.scope = scope
        c2ot = check_c2ot_options(cond_weight, cond_metric, cond_ratio, oversample)
        self.cond_weight, self.cond_metric, self.cond_ratio, self.oversample = c2ot
        if scope == "grouped" and (self.oversample > 1 or self._c2ot):
            raise ValueError(
                "scope='grouped' takes neither oversample > 1 nor cond_weight='adaptive' / 'c2ot' nor "
                "cond_metric='cosine'"
            )
        self.stats = {}

    def __call__(
        self,
        x1: torch.Tensor,
        indices: torch.Tensor | None = None,
        *,
        x0: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        return_indices: bool = False,
    ) -> tuple:
        """Couple ``x1 (b, *shape)`` with ``x0 (m, *shape)`` (drawn when None); ``indices`` are checked, unused."""
        world = Group(self.process_group)  # every rank agrees on the config, whatever the scope
        grp = Group(self.process_group, local=self.scope == "local")
        name = type(self).__name__
        try:
            labels, cond = check_pair_inputs(x1, x0, labels, cond, self.scope)
            check_cond_range(cond, self.cond_weight, self.cond_metric)
            check_indices(indices, x1.shape[0], name)
            check_flag(return_indices, "return_indices")
        except (TypeError, ValueError):
            sizes = {"batch size": -1, "x0 rows": -1, "cond columns": -1}
            given = {"labels": 0, "cond": 0, "return_indices": 0}
            agree(world, name, sizes, given, self._config(), failed=True, specs=dict.fromkeys(("x1", "x0", "labels")))
            raise
        k = 1
        if x0 is None:  # oversample=k: k*b rows (row i*k+j drawn for item i), the assignment keeps b
            k = self.oversample
            shape = (k * x1.shape[0], *x1.shape[1:])
            x0 = torch.randn(shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        b = x1.shape[0]
        # scope="local" couples each rank's batch alone: its sizes and inputs may differ across ranks
        sizes = {"batch size": b, "x0 rows": x0.shape[0], "cond columns": 0 if cond is None else cond.shape[1]}
        sizes = sizes if grp.world > 1 else dict.fromkeys(sizes, 0)
        given = {
            "labels": labels is not None and grp.world > 1,
            "cond": cond is not None and grp.world > 1,
            "return_indices": return_indices and world.world > 1,
        }
        specs = {"x1": x1, "x0": x0, "labels": labels} if grp.world > 1 else dict.fromkeys(("x1", "x0", "labels"))
        agree(world, name, sizes, given, self._config(), specs=specs)
        if b == 0:
            self.stats = {}
            return pair_out(x0[:0], x1, torch.zeros(0, dtype=torch.int64, device=x1.device), return_indices)
        if cond is not None and self.cond_weight == 0.0:
            cond = None  # nothing to add: the unconditioned coupling, bit for bit, and nothing sent
        x1f = x1.flatten(1).to(cost_dtype(x1.dtype))
        if k > 1 or self._c2ot:  # C2OT's options (issue 32); the default path below is unchanged
            opts = (self.metric, k, self.cond_weight, self.cond_metric, self.cond_ratio)
            x0, self.stats, perm = c2ot_global_step(grp, x1f, x0, labels, cond, *opts)
            return pair_out(x0, x1, perm, return_indices)
        spec = MinibatchSpec(self.metric, self.group_size, self._part_gen, self.cond_weight)
        x0, self.stats, perm = step_for(self.scope)(grp, x1f, x0, labels, cond, spec, return_indices)
        return pair_out(x0, x1, perm, return_indices)

    def _config(self) -> dict:
        return {
            "metric": METRICS.index(self.metric),
            "scope": SCOPES.index(self.scope),
            "group_size": self.group_size,
            "cond_weight": float_bits(weight_code(self.cond_weight)),
            "cond_metric": COND_METRICS.index(self.cond_metric),
            "cond_ratio": float_bits(self.cond_ratio),
            "oversample": self.oversample,
            "partition generator": generator_hash(self._part_gen),
        }

    @property
    def _c2ot(self) -> bool:
        return is_weight_rule(self.cond_weight) or self.cond_metric != "sqeuclidean"

    def state_dict(self) -> dict:
        """The partition generator's state (``scope="grouped"``; the other scopes have no state)."""
        return {"partition_generator": self._part_gen.get_state()} if self.scope == "grouped" else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scope != "grouped" or not state:
            return super().load_state_dict(state)
        gen = state.get("partition_generator") if isinstance(state, dict) else None
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError(
                f"state_dict['partition_generator'] must be a uint8 tensor (Generator.get_state()), got {gen!r:.80}"
            )
        self._part_gen.set_state(gen)
