"""Minibatch OT: the exact assignment between each minibatch and its noise (Pooladian et al. 2023; Tong et al. 2023)."""

from __future__ import annotations

import torch

from .base import Coupling
from .common import (
    COND_METRICS,
    METRICS,
    add_c2ot_cond_cost,
    add_cond_cost,
    check_cond,
    check_cond_metric,
    check_cond_ratio,
    check_cond_weight_or_adaptive,
    check_flag,
    check_indices,
    check_labels,
    check_metric,
    check_oversample,
    check_x1,
    cost_dtype,
    float_bits,
    pair_stats,
    solve,
)
from .distributed import Group
from .grouped import DEFAULT_GROUP_SIZE, Partition, check_group_size, solve_minibatch_groups

_SCOPES = ("global", "local", "grouped")


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
    ``common.add_cond_cost``); ``cond_weight=0`` is the unconditioned coupling bit for bit, a huge weight
    exchanges noise only between equal conditions, as ``labels`` do. ``stats`` include the penalty. With
    ``labels`` too, labels forbid and cond penalises. C2OT's options (Cheng, Schwing, ICCV 2025):
    ``cond_metric="cosine"`` (``1 - cos(cond_i, cond_j)``), ``cond_weight="adaptive"`` (per batch, the weight
    at which the condition is the fraction ``cond_ratio`` in (0, 1) of the mean pair cost) and
    ``oversample=k`` (with ``x0`` drawn: ``k*b`` noise rows, the assignment keeps the best ``b``; rows
    ``i*k .. i*k+k-1`` carry item i's condition and label). ``stats["cond_weight"]``: the weight used.

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
        cond_ratio: float = 0.5,
        oversample: int = 1,
    ):
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.group_size = check_group_size(group_size)
        self._part_gen = torch.Generator().manual_seed(seed)  # the same on every rank: the partition
        self.metric = check_metric(metric)
        self.generator = generator
        self.process_group = process_group
        self.scope = scope
        self.cond_weight = check_cond_weight_or_adaptive(cond_weight)
        self.cond_metric, self.cond_ratio = check_cond_metric(cond_metric), check_cond_ratio(cond_ratio)
        self.oversample = check_oversample(oversample)
        if scope == "grouped" and (self.oversample > 1 or self._c2ot):
            raise ValueError(
                "scope='grouped' takes neither oversample > 1 nor cond_weight='adaptive' / cond_metric='cosine'"
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
            labels, cond = self._check_inputs(x1, x0, labels, cond, self.scope)
            check_indices(indices, x1.shape[0], name)
            check_flag(return_indices, "return_indices")
        except (TypeError, ValueError):
            world.agree(
                name,
                {"batch size": -1, "x0 rows": -1, "cond columns": -1},
                {"labels": 0, "cond": 0, "return_indices": 0},
                self._config(),
                failed=True,
            )
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
        world.agree(name, sizes, given, self._config())
        if b == 0:
            self.stats = {}
            return self._out(x0[:0], x1, torch.zeros(0, dtype=torch.int64, device=x1.device), return_indices)
        dt = cost_dtype(x1.dtype)
        if cond is not None and self.cond_weight == 0.0:
            cond = None  # nothing to add: the unconditioned coupling, bit for bit, and nothing sent
        if self.scope == "grouped":
            part = Partition(grp.world * b, b, grp.world, self.group_size, self._part_gen)
            x0, self.stats, perm = solve_minibatch_groups(
                grp,
                part,
                x1.flatten(1).to(dt),
                x0,
                self.metric,
                labels,
                dt,
                cond=cond,
                cond_weight=self.cond_weight,
                want_perm=return_indices,
            )
            return self._out(x0, x1, perm, return_indices)
        g_x0 = grp.gather(x0)  # every rank's noise: rank r's rows may be matched with it
        cost = grp.global_cost(x1.flatten(1).to(dt), g_x0.flatten(1).to(dt), self.metric)
        g_cond = None if cond is None else grp.gather(cond)  # row j of the noise carries item j's condition
        g_lab = None if labels is None else grp.gather(labels)
        if k > 1 or self._c2ot:  # C2OT's options (issue 32); the default path below is unchanged
            cols = None if g_cond is None else g_cond.repeat_interleave(k, 0)
            if g_lab is not None and k > 1:  # rectangular: forbid cross-label pairs here, not in solve
                cost = cost.masked_fill(g_lab[:, None] != g_lab.repeat_interleave(k)[None, :], float("inf"))
                g_lab = None
            cost, w = add_c2ot_cond_cost(cost, g_cond, cols, self.cond_weight, self.cond_metric, self.cond_ratio)
        else:
            cost, w = add_cond_cost(cost, g_cond, g_cond, self.cond_weight), self.cond_weight
        col = solve(cost, g_lab)
        self.stats = pair_stats(cost, col)
        if cond is not None:
            self.stats["cond_weight"] = torch.tensor(float(w))
        perm = col[grp.rank * b : (grp.rank + 1) * b]
        return self._out(g_x0[perm], x1, perm, return_indices)

    @property
    def _c2ot(self) -> bool:
        return self.cond_weight == "adaptive" or self.cond_metric != "sqeuclidean"

    @staticmethod
    def _out(x0, x1, perm, return_indices):
        return (x0, x1, perm) if return_indices else (x0, x1)

    def _config(self) -> dict:
        state = self._part_gen.get_state().to(torch.int64)
        return {
            "metric": METRICS.index(self.metric),
            "scope": _SCOPES.index(self.scope),
            "group_size": self.group_size,
            "cond_weight": float_bits(-1.0 if self.cond_weight == "adaptive" else self.cond_weight),
            "cond_metric": COND_METRICS.index(self.cond_metric),
            "cond_ratio": float_bits(self.cond_ratio),
            "oversample": self.oversample,
            "partition generator": int((state * torch.arange(1, len(state) + 1)).sum()),
        }

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

    @staticmethod
    def _check_inputs(x1, x0, labels, cond, scope="global"):
        check_x1(x1)
        if x0 is not None:
            check_x1(x0, "x0")
            if x0.shape[1:] != x1.shape[1:] or x0.shape[0] < x1.shape[0]:
                raise ValueError(
                    f"x0 must have shape (m, *x1.shape[1:]) with m >= b = {x1.shape[0]}, "
                    f"got x0 {tuple(x0.shape)} for x1 {tuple(x1.shape)}"
                )
            if x0.device != x1.device:
                raise ValueError(f"x0 must be on x1's device {x1.device}, got {x0.device}")
        if scope == "grouped" and x0 is not None and x0.shape[0] != x1.shape[0]:
            raise ValueError(f"scope='grouped' needs x0 with exactly b = {x1.shape[0]} rows, got {x0.shape[0]}")
        labels = check_labels(labels, x1.shape[0], x1.device)
        if labels is not None and x0 is not None and x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"labels need x0 with exactly b = {x1.shape[0]} rows (row i is item i's noise), got {x0.shape[0]}"
            )
        cond = check_cond(cond, x1.shape[0], x1.device)
        if cond is not None and x0 is not None and x0.shape[0] != x1.shape[0]:
            raise ValueError(
                f"cond needs x0 with exactly b = {x1.shape[0]} rows (row i is item i's noise), got {x0.shape[0]}"
            )
        return labels, cond
