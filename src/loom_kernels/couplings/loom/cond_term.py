"""LOOM's condition term: a fixed weight, or a weight rule's weight frozen at the first batch (issue 32).

Minibatch OT sets ``cond_weight="adaptive"`` (or ``"c2ot"``) anew on every batch; LOOM sets it once. Its
table is one problem improved call after call: the cost that decides which exchanges of noise are taken,
and so the table a long run settles in (one that no batch can improve), is defined by one weight. A weight that
followed each batch's scale would change that problem from call to call (and between a run and its
resumption). So the weight is computed once, from the first call with conditions that differ (the closed
form of ``c2ot.adaptive_cond_weight`` over every pair of independent (item, noise) pairs that call's problems
hold; for ``"c2ot"`` ``c2ot.c2ot_search_weight`` over the same pairs, each item's own pair its current one),
all-reduced so every rank freezes the same number, then kept: in ``state_dict``/``save`` as
``cond_weight_frozen``, restored by ``load_state_dict``/``load``, reported in ``stats["cond_weight"]``.
(The data-noise cost of the table never increases with any weight >= 0: every item holds its own noise, so
the current pairs pay no condition.)
"""

from __future__ import annotations

import math

import torch

from ..c2ot import (
    COND_METRICS,
    add_weighted_cond_cost,
    c2ot_order_weight,
    c2ot_thresholds,
    check_c2ot_options,
    cond_pair_cost,
    is_weight_rule,
    ratio_weight,
    weight_code,
)
from ..scopes.agree import float_bits

NO_OVERSAMPLE = (
    "LoomCoupling's noises are its table's seeds, one per item and cache slot, exchanged between items: it "
    "draws no fresh noise rows to oversample (MinibatchOTCoupling and SinkhornCoupling do)"
)


class CondTerm:
    """The weight and metric of LOOM's condition term: ``cond_weight`` a number or a rule, ``"adaptive"`` or
    ``"c2ot"`` (then the rule's weight for ``cond_ratio``, frozen at the first call whose conditions differ),
    ``cond_metric``."""

    def __init__(self, cond_weight=1.0, cond_metric: str = "sqeuclidean", cond_ratio=None, oversample=1):
        opts = check_c2ot_options(cond_weight, cond_metric, cond_ratio, oversample, no_oversample=NO_OVERSAMPLE)
        self.setting, self.metric, self.ratio = opts[:3]
        self.frozen: float | None = None  # adaptive: the weight of the first call, kept
        self.pending: float | None = None  # set by this call's step; frozen once the call has succeeded
        self.used = 0.0  # the weight of the last call

    @property
    def options(self) -> tuple:
        """``(cond_metric, cond_ratio)`` as checked."""
        return self.metric, self.ratio

    @property
    def value(self) -> float | None:
        """The weight the next call uses: the number, the frozen adaptive weight, or None (not set yet)."""
        return self.frozen if is_weight_rule(self.setting) else self.setting

    def settle(self, grp, blocks) -> float:
        """This call's weight. ``blocks``: this rank's ``(cost, c_rows, c_cols, own)`` blocks of independent
        pairs (``own``: each row's own pair cost), read only while the rule's weight is not set: then a
        collective (every rank calls it)."""
        if self.value is not None:
            self.used = self.value
            return self.used
        if self.setting == "c2ot":
            self.pending = self._c2ot_weight(grp, blocks)
            self.used = 0.0 if self.pending is None else self.pending
            return self.used
        sums = torch.zeros(3, dtype=torch.float64)
        for cost, c_rows, c_cols, _ in blocks:
            pen = cond_pair_cost(c_rows.to(cost.device), c_cols.to(cost.device), self.metric)
            sums += torch.stack([cost.double().sum().cpu(), pen.sum().cpu(), torch.tensor(float(cost.numel()))])
        if grp.world > 1:  # the same sums, so the same weight, on every rank
            sums = grp.all_reduce(sums, torch.distributed.ReduceOp.SUM)
        n = max(float(sums[2]), 1.0)
        self.pending = ratio_weight(float(sums[0]) / n, float(sums[1]) / n, self.ratio)
        self.used = 0.0 if self.pending is None else self.pending
        return self.used

    def _c2ot_weight(self, grp, blocks) -> float | None:
        """``c2ot.c2ot_search_weight`` over the pairs of every block of every rank: the thresholds all-gathered
        (padded with -inf, a pair that never counts), the counts all-reduced; the same number on every rank.
        None (nothing frozen) when every condition is equal: no pair has a threshold."""
        thr, counts = [], torch.zeros(2, dtype=torch.float64)
        for cost, c_rows, c_cols, own in blocks:
            pen = cond_pair_cost(c_rows.to(cost.device), c_cols.to(cost.device), self.metric)
            t, free, pairs = c2ot_thresholds(cost, pen, own)
            thr.append(t.cpu())
            counts += torch.tensor([float(free), float(pairs)], dtype=torch.float64)
        thr = torch.cat(thr) if thr else torch.zeros(0, dtype=torch.float64)
        if grp.world > 1:
            counts = grp.all_reduce(counts, torch.distributed.ReduceOp.SUM)
            size = grp.all_reduce(torch.tensor([thr.numel()], dtype=torch.int64), torch.distributed.ReduceOp.MAX)
            pad = torch.full((int(size) - thr.numel(),), -math.inf, dtype=torch.float64)
            thr = grp.gather(torch.cat([thr, pad]))
            thr = thr[thr > -math.inf]
        if thr.numel() == 0:
            return None
        return c2ot_order_weight(thr, int(counts[0]), int(counts[1]), self.ratio)

    def add(self, cost, c_rows, c_cols, weight: float):
        """``cost += weight * d(c_rows[i], c_cols[j])`` (``c2ot.add_weighted_cond_cost``)."""
        return add_weighted_cond_cost(cost, c_rows, c_cols, weight, self.metric)

    def finish(self, stats: dict, had_cond: bool) -> dict:
        """After a successful call: freeze a weight computed by it; ``stats["cond_weight"]`` when it had ``cond``."""
        if had_cond:
            if self.pending is not None:
                self.frozen, self.pending = self.pending, None
            device = stats["pre_cost"].device if "pre_cost" in stats else None
            stats["cond_weight"] = torch.tensor(self.used, dtype=torch.float64, device=device)
        return stats

    # -- checkpoints and agreement ----------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "cond_weight": self.setting,
            "cond_metric": self.metric,
            "cond_ratio": self.ratio,
            "cond_weight_frozen": self.frozen,
        }

    def restorer(self, saved: dict | None):
        """Check a checkpoint's condition entries (``state()``'s) against this term; returns the function
        that installs them (called once the table is in). A number as ``cond_weight`` rules: nothing read."""
        frozen = None if saved is None else saved.get("cond_weight_frozen")
        if frozen is not None and (not isinstance(frozen, float) or not math.isfinite(frozen) or frozen < 0):
            raise ValueError(f"state_dict['cond_weight_frozen'] must be None or a finite float >= 0, got {frozen!r}")
        if not is_weight_rule(self.setting):
            return lambda: None
        theirs = (saved.get("cond_weight", self.setting), saved.get("cond_metric"), saved.get("cond_ratio"))
        if frozen is not None and theirs != (self.setting, self.metric, self.ratio):
            raise ValueError(
                f"the checkpoint's {theirs[0]!r} cond_weight {frozen!r} was frozen for cond_metric="
                f"{saved.get('cond_metric')!r}, cond_ratio={saved.get('cond_ratio')!r}, and this coupling has "
                f"cond_weight={self.setting!r}, cond_metric={self.metric!r}, cond_ratio={self.ratio!r}: LOOM keeps "
                "one weight for the table's whole life; build the coupling with the saved ones (LoomCoupling.load "
                "does), or pass a number as cond_weight"
            )

        def install():
            self.frozen, self.pending = frozen, None

        return install

    def fingerprint(self) -> dict:
        """What every rank must agree on (floats as bit patterns; -1: adaptive, not set)."""
        return {
            "cond_weight": float_bits(weight_code(self.setting)),
            "cond_metric": COND_METRICS.index(self.metric),
            "cond_ratio": float_bits(self.ratio),
            "cond_weight_frozen": float_bits(-1.0 if self.frozen is None else self.frozen),
        }
