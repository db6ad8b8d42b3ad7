"""Minibatch OT's steps, one per scope: ``global_step`` (also ``"local"``, on a group of one) and
``grouped_step``; ``step_for(scope)`` picks one. Each returns ``(x0 (b, ...) matched to this rank's items,
stats, perm)``: ``perm (b,)`` the global position (rank order; this rank's in the local scope) of each
returned noise row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...cost import pairwise_cost
from .group import Group
from .partition import Partition, Route, mean_stats, raise_if_flagged
from .solve import add_cond_cost, pair_stats, solve


@dataclass
class MinibatchSpec:
    """What a step needs of the coupling: metric, group size, partition generator, condition weight."""

    metric: str
    group_size: int
    generator: torch.Generator  # the partition's: the same state on every rank
    cond_weight: float


def global_step(grp: Group, x1f, x0, labels, cond, spec: MinibatchSpec, want_perm: bool) -> tuple:
    """Couple the ``W*b`` items of every rank as one problem (``grp`` of one rank: this rank's batch).

    ``x1f (b, D)`` this rank's data in the cost dtype, ``x0 (m, ...)`` its noise, ``labels (b,)`` and
    ``cond (b, Dc)`` float64 or None (None also at ``cond_weight == 0``)."""
    b = x1f.shape[0]
    g_x0 = grp.gather(x0)  # every rank's noise: rank r's rows may be matched with it
    cost = grp.global_cost(x1f, g_x0.flatten(1).to(x1f.dtype), spec.metric)
    g_cond = None if cond is None else grp.gather(cond)  # row j of the noise carries item j's condition
    cost = add_cond_cost(cost, g_cond, g_cond, spec.cond_weight)
    col = solve(cost, None if labels is None else grp.gather(labels))
    stats = pair_stats(cost, col)
    perm = col[grp.rank * b : (grp.rank + 1) * b]
    return g_x0[perm], stats, perm


def grouped_step(grp: Group, x1f, x0, labels, cond, spec: MinibatchSpec, want_perm: bool) -> tuple:
    """Split the global batch at random into groups of at most ``group_size``, solved by owner ranks."""
    b = x1f.shape[0]
    part = Partition(grp.world * b, b, grp.world, spec.group_size, spec.generator)
    return solve_groups(
        grp, part, x1f, x0, spec.metric, labels, x1f.dtype, cond=cond, cond_weight=spec.cond_weight, want_perm=want_perm
    )


def step_for(scope: str) -> Callable:
    """The step of ``scope`` (``"local"`` is the global step on a group of one rank)."""
    return grouped_step if scope == "grouped" else global_step


def solve_groups(
    grp: Group,
    part: Partition,
    x1f: torch.Tensor,
    x0: torch.Tensor,
    metric: str,
    labels: torch.Tensor | None,
    dtype,
    cond: torch.Tensor | None = None,
    cond_weight: float = 0.0,
    want_perm: bool = False,
):
    """Minibatch OT's grouped step: ``(x0 (b, ...) matched to this rank's items, stats, perm)``.

    ``x1f (b, D)`` this rank's data (cost dtype), ``x0 (b, ...)`` this rank's noise, ``labels (b,)``
    and ``cond (b, Dc)`` (float64) or None. Noise rows travel to their group's owner with the data and
    come back matched. ``want_perm`` (the same on every rank): ``perm (b,)``, the global position (rank
    order) of each returned noise row, one more all-to-all of ``b`` int64; else None.
    """
    route = Route(part, grp)
    xo, no = route.to_owners(x1f), route.to_owners(x0)
    lo = None if labels is None else route.to_owners(labels)
    co = None if cond is None else route.to_owners(cond)
    pos = route.to_owners(torch.arange(grp.rank * part.b, (grp.rank + 1) * part.b)) if want_perm else None
    out = no.clone()
    sums = torch.zeros(4, dtype=torch.float64)
    for a, c in part.segments(grp.rank):
        cost = pairwise_cost(xo[a:c], no[a:c].flatten(1).to(dtype), metric=metric)
        cost = add_cond_cost(cost, *(None, None) if co is None else (co[a:c], co[a:c]), cond_weight)
        try:
            col = solve(cost, None if lo is None else lo[a:c])
        except ValueError:
            sums[3] = 1
            break
        out[a:c] = no[a:c][col]
        if want_perm:
            pos[a:c] = pos[a:c][col.cpu()]
        st = pair_stats(cost, col)
        sums[:3] += torch.stack(
            [st["pre_cost"].cpu() * (c - a), st["post_cost"].cpu() * (c - a), st["swaps"].cpu().double()]
        )
    back = route.to_homes(out)
    tot = grp.gather(sums[None])
    raise_if_flagged(tot[:, 3], grp, "x1")
    perm = route.to_homes(pos).to(x1f.device) if want_perm else None
    return back, mean_stats(tot[:, :3].sum(0), part.n, x1f.device), perm
