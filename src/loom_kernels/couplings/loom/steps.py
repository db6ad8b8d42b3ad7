"""LOOM's three steps as functions over (table, group, batch): ``global_step``, ``local_step``, ``grouped_step``.

Each step reads the batch's current seeds from the table (one move to the compute device), regenerates
their noise, solves the exact assignment, writes the permuted seeds back (one move to the table's device)
and returns this rank's matched noise ``(b, ...)`` in the cost dtype with the call's stats. The table's
kind never shows here: replicated and sharded tables differ only inside ``tables/``.

The continuous condition ``cond (b, Dc)`` travels in :class:`Batch` beside ``labels``: gathered where the
labels are (``gathered``) in the global step, routed to the owners with the data in the grouped one, and
``w * d(c_i, c_j)`` is added to each cost (``spec.cond``, a ``cond_term.CondTerm``: ``d`` squared Euclidean or
cosine, ``w`` fixed or the adaptive weight its first call sets) before the solve.
Column ``j`` is the noise item ``j`` holds, so it carries item ``j``'s condition; the diagonal (each item
keeping its noise) has no penalty, so ``keep_if_cheaper`` makes the table's total cost never increase and
each applied matching pays its penalty out of that decrease.

Each step returns ``(x0, stats, perm)``: ``perm (b,)`` the batch position (global in the global and
grouped steps, this rank's in the local one) whose noise each item now holds; the grouped step computes
it only when ``batch.want_perm``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...cost import pairwise_cost
from ...noise import gaussian_noise
from ..scopes.group import Group, to_device
from ..scopes.partition import Partition, Route, mean_stats, raise_if_flagged
from ..scopes.solve import solve
from .cond_term import CondTerm
from .tables import LoomTable


@dataclass
class LoomSpec:
    """What a step needs of the coupling: noise shape, metric, compute device, group size, slot generator and
    the condition term."""

    shape: tuple
    metric: str
    device: torch.device
    group_size: int
    generator: torch.Generator  # the slot generator: the grouped partition is drawn from it after the slots
    cond: CondTerm = field(default_factory=CondTerm)

    def noise(self, seeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(n,)`` int64 seeds -> ``(n, *shape)`` Gaussian noise on the compute device."""
        return gaussian_noise(seeds, self.shape, device=self.device, dtype=dtype)


@dataclass
class Batch:
    """One call's items. ``x1f (b, D)``: this rank's data in the cost dtype; ``rows``/``slots`` ``(W*b,)``:
    the global batch's table entries (on the table's device; rows clamped until ``after_solve`` has checked
    them); ``labels (b,)`` this rank's or None; ``mine``: this rank's positions in the global batch;
    ``cond (b, Dc)`` float64 this rank's conditions or None (None also at ``cond_weight == 0``);
    ``want_perm``: the caller asked for the permutation (the same on every rank)."""

    x1f: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    labels: torch.Tensor | None
    mine: slice
    after_solve: Callable[[], None]
    cond: torch.Tensor | None = None
    want_perm: bool = False


def gathered(grp: Group, t: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's ``t`` (rank order), or None."""
    return None if t is None else grp.gather(t)


def keep_if_cheaper(cost: torch.Tensor, col: torch.Tensor) -> tuple:
    """``(col, stats)``: the solve's matching, or the current pairs when it costs more (float tolerance)."""
    # An assignment within the solver's float tolerance could, in a near-tie, cost a hair more than
    # keeping the current pairs; keeping them then makes "the total cost never increases" exact.
    n = cost.shape[0]
    ar = torch.arange(n, device=cost.device)
    pre = cost.diagonal().sum(dtype=torch.float64)
    post = cost.gather(1, col[:, None]).sum(dtype=torch.float64)
    keep = post <= pre
    col = torch.where(keep, col, ar)
    stats = {"pre_cost": pre / n, "post_cost": torch.where(keep, post, pre) / n, "swaps": (col != ar).sum()}
    return col, stats


def global_step(table: LoomTable, grp: Group, batch: Batch, spec: LoomSpec) -> tuple:
    """Couple the global batch of ``W*b`` items (every rank solves the same problem, keeps its slice)."""
    seeds = to_device(table.read_global(grp, batch.rows, batch.slots, batch.mine), spec.device)
    noise = spec.noise(seeds, batch.x1f.dtype)
    cost = grp.global_cost(batch.x1f, noise.flatten(1), spec.metric)  # (W*b, W*b) float32
    g_cond = gathered(grp, batch.cond)
    if g_cond is not None:  # the adaptive weight's first call: this rank's rows of the global cost
        own = cost.diagonal()[batch.mine]  # each item's current pair: the table's independent pair
        w = spec.cond.settle(grp, [(cost[batch.mine], g_cond[batch.mine], g_cond, own)])
        cost = spec.cond.add(cost, g_cond, g_cond, w)
    col = solve(cost, gathered(grp, batch.labels))  # the single host sync on CUDA
    batch.after_solve()
    col, stats = keep_if_cheaper(cost, col)
    table.write_global(grp, batch.rows, batch.slots, to_device(seeds[col], table.device), batch.mine)
    perm = col[batch.mine]
    return noise[perm], stats, perm


def local_step(table: LoomTable, grp: Group, batch: Batch, spec: LoomSpec) -> tuple:
    """Couple each rank's ``b`` items on their own; every rank's updates reach the table."""
    rows, slots = batch.rows[batch.mine], batch.slots[batch.mine]
    seeds = to_device(table.read(grp, rows, slots), spec.device)
    noise = spec.noise(seeds, batch.x1f.dtype)
    cost = pairwise_cost(batch.x1f, noise.flatten(1), metric=spec.metric)
    if batch.cond is not None:
        cost = spec.cond.add(
            cost, batch.cond, batch.cond, spec.cond.settle(grp, [(cost, batch.cond, batch.cond, cost.diagonal())])
        )
    col = solve(cost, batch.labels)
    batch.after_solve()
    col, stats = keep_if_cheaper(cost, col)
    table.write_local(grp, batch.rows, batch.slots, seeds[col], batch.mine)
    return noise[col], stats, col


def grouped_step(table: LoomTable, grp: Group, batch: Batch, spec: LoomSpec) -> tuple:
    """Split the global batch at random into groups of at most ``group_size``, solved by owner ranks."""
    part = Partition(len(batch.slots), batch.x1f.shape[0], grp.world, spec.group_size, spec.generator)
    own = to_device(part.lists[grp.rank], table.device)
    seeds = to_device(table.read(grp, batch.rows[own], batch.slots[own]), spec.device)

    def noise_fn(s):
        return spec.noise(s, batch.x1f.dtype).flatten(1)

    new, stats, perm = solve_groups(
        grp,
        part,
        batch.x1f,
        seeds,
        noise_fn,
        spec.metric,
        gathered(grp, batch.labels),
        keep_if_cheaper,
        gather=table.gathers_group_updates,
        cond=batch.cond,
        cond_weight=spec.cond,
        want_perm=batch.want_perm,
    )
    batch.after_solve()
    mine = table.write_groups(grp, part, batch.rows, batch.slots, own, new)
    return noise_fn(mine), stats, perm


def step_for(scope: str, world: int) -> Callable:
    """The step of ``scope`` for a group of ``world`` ranks (``local`` alone is ``global`` on one rank)."""
    if scope == "grouped":
        return grouped_step
    return local_step if scope == "local" and world > 1 else global_step


def solve_groups(
    grp: Group,
    part: Partition,
    x1f: torch.Tensor,
    seeds: torch.Tensor,
    noise_fn: Callable,
    metric: str,
    labels: torch.Tensor | None,
    guard: Callable,
    gather: bool = True,
    cond: torch.Tensor | None = None,
    cond_weight: float | CondTerm = 0.0,
    want_perm: bool = False,
):
    """LOOM's grouped step: ``(new_seeds (n,) int64, stats, perm)``, the same on every rank but ``perm``.

    ``x1f (b, D)`` this rank's data; ``seeds (len(lists[rank]),)`` the current seeds of the items this
    rank owns (list order); ``noise_fn(seeds) -> (k, D)``; ``labels (n,)`` global or None; ``guard(cost,
    col) -> (col, stats)`` keeps the current pairs when the solve found nothing cheaper. ``gather=False``
    (a sharded table, which needs no replica of the updates): returns the owned items' new seeds
    ``(len(lists[rank]),)`` in list order instead, and only the stats and flags are all-gathered.
    ``cond (b, Dc)`` this rank's conditions (float64) or None travel to the owners beside the data, and each
    group's cost gets ``cond_weight * ||c_i - c_j||^2`` (a ``CondTerm``: its metric and weight; an adaptive one
    not set yet is set from every group's pairs). ``want_perm`` (the same on every rank): ``perm (b,)``,
    for each of this rank's items the global position whose noise it now holds (one more all-to-all of
    ``b`` int64), else None.
    """
    rank = grp.rank
    own = part.lists[rank]
    route = Route(part, grp)
    xo = route.to_owners(x1f)
    co = None if cond is None else route.to_owners(cond)
    src = own.clone() if want_perm else None
    new = seeds.clone()
    sums = torch.zeros(3, dtype=torch.float64)
    failed = False
    noise = noise_fn(seeds)
    term = cond_weight if isinstance(cond_weight, CondTerm) else CondTerm(cond_weight)
    w = 0.0
    if co is not None:  # the blocks are computed only for an adaptive weight's first call
        segs = part.segments(rank)
        costs = ((a, c, pairwise_cost(xo[a:c], noise[a:c], metric=metric)) for a, c in segs)
        w = term.settle(grp, ((m, co[a:c], co[a:c], m.diagonal()) for a, c, m in costs))
    for a, c in part.segments(rank):
        cost = pairwise_cost(xo[a:c], noise[a:c], metric=metric)
        cost = term.add(cost, *(None, None) if co is None else (co[a:c], co[a:c]), w)
        try:
            col = solve(cost, None if labels is None else labels[own[a:c].to(labels.device)])
        except ValueError:
            failed = True
            break
        col, st = guard(cost, col)
        new[a:c] = seeds[a:c][col]
        if want_perm:
            src[a:c] = own[a:c][col.cpu()]
        sums += torch.stack(
            [st["pre_cost"].cpu() * (c - a), st["post_cost"].cpu() * (c - a), st["swaps"].cpu().double()]
        )
    # One all-gather returns everything: each owner's new seeds (padded), its stat sums and its flag.
    width = max(len(lst) for lst in part.lists) if gather else 0
    row = torch.zeros(width + 4, dtype=torch.int64)
    if gather:
        row[: len(own)] = new.cpu()
    row[width : width + 3] = sums.view(torch.int64)
    row[-1] = int(failed)
    rows = grp.gather(row[None])
    raise_if_flagged(rows[:, -1], grp, "x1")
    tot = rows[:, width : width + 3].contiguous().view(torch.float64).sum(0)
    perm = route.to_homes(src).to(x1f.device) if want_perm else None
    if not gather:
        return new, mean_stats(tot, part.n, x1f.device), perm
    out = torch.empty(part.n, dtype=torch.int64)
    for o, lst in enumerate(part.lists):
        out[lst] = rows[o, : len(lst)]
    return out.to(seeds.device), mean_stats(tot, part.n, x1f.device), perm
