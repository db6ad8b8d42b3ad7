"""``scope="grouped"``: the global batch split at random into groups of at most G items, solved in parallel.

Invariants (docs/scaling.md has the cost model):

- every rank draws the same partition (``Partition``) from a generator all ranks hold in the same state,
  so groups mix items of all ranks and every rank knows who sends what to whom without asking;
- group ``j`` is solved by its owner rank ``j mod W``; an item travels to its owner as its data row
  (``D`` values) and the owner sends back what the item's rank needs: LOOM's new seeds (8 bytes, gathered
  by every rank for its replica of the table) or, for minibatch OT, the matched noise row;
- a group's result equals solving that group alone in one process (same rows, same order, same solve);
- an owner that refuses its groups' data (NaN) still takes part in every collective and flags it, so
  every rank raises the same error and none waits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cost import pairwise_cost
from .common import add_cond_cost, pair_stats, raise_bad_data, solve
from .distributed import Group

DEFAULT_GROUP_SIZE = 1024  # a 1024-item group: ~80 ms on 2 CPU cores, ~26 ms on an H200 (docs/scaling.md)


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


class Partition:
    """A random partition of the ``n = W*b`` global positions (rank ``r`` holds ``r*b .. r*b+b-1``).

    ``m = ceil(n / G)`` groups of balanced sizes (``n // m`` or one more), group ``j`` taking the next
    positions of ``randperm(n, generator)``; owner of group ``j``: rank ``j mod W``. ``lists[o]`` are the
    positions owner ``o`` solves (its groups in order, each in permutation order); ``segments(o)`` cuts
    that list into its groups. Example::

        part = Partition(8, 4, 2, 3, torch.Generator().manual_seed(0))   # groups of sizes 3, 3, 2
        part.groups()  # [tensor([...3 positions]), ...]
    """

    def __init__(self, n: int, b: int, world: int, group_size: int, generator: torch.Generator):
        self.n, self.b, self.world = n, b, world
        self.perm = torch.randperm(n, generator=generator)
        m = max(1, -(-n // group_size))
        self.sizes = torch.full((m,), n // m, dtype=torch.int64)
        self.sizes[: n % m] += 1
        owner_k = torch.repeat_interleave(torch.arange(m) % world, self.sizes)  # per permutation entry
        order = torch.argsort(owner_k, stable=True)
        owned = self.perm[order]  # owner by owner, each owner's groups in order
        counts = torch.bincount(owner_k, minlength=world)
        starts = torch.cumsum(counts, 0) - counts
        self.owner = torch.empty(n, dtype=torch.int64)
        self.owner[self.perm] = owner_k
        self.slot = torch.empty(n, dtype=torch.int64)  # place in its owner's list
        self.slot[owned] = torch.arange(n) - starts[owner_k[order]]
        self.lists = [owned[int(a) : int(a + c)] for a, c in zip(starts, counts)]

    def groups(self) -> list[torch.Tensor]:
        """Every group's positions, group order."""
        return list(torch.split(self.perm, self.sizes.tolist()))

    def segments(self, owner: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each group of ``owner`` within ``lists[owner]``."""
        sizes = self.sizes[owner :: self.world].tolist()
        ends = torch.cumsum(torch.tensor(sizes, dtype=torch.int64), 0).tolist()
        return [(e - s, e) for s, e in zip(sizes, ends)]


class Route:
    """The all-to-all between this rank's items (position order) and its owned list (list order)."""

    def __init__(self, part: Partition, grp: Group):
        self.grp, r, b, w = grp, grp.rank, part.b, part.world
        mine = torch.arange(r * b, (r + 1) * b)
        owner = part.owner[mine]
        self.send_order = torch.argsort(owner * part.n + part.slot[mine])  # by owner, then list order
        self.send_counts = torch.bincount(owner, minlength=w).tolist()
        home = part.lists[r] // b
        self.recv_order = torch.argsort(home, stable=True)  # by source rank, then list order
        self.recv_counts = torch.bincount(home, minlength=w).tolist()

    def to_owners(self, x: torch.Tensor) -> torch.Tensor:
        """``x (b, ...)`` this rank's rows -> ``(len(lists[rank]), ...)`` the owned items' rows, list order."""
        buf = self.grp.all_to_all(x[self.send_order.to(x.device)], self.send_counts, self.recv_counts)
        out = torch.empty_like(buf)
        out[self.recv_order.to(buf.device)] = buf
        return out

    def to_homes(self, y: torch.Tensor) -> torch.Tensor:
        """The reverse of ``to_owners``: owned rows (list order) back to their ranks, position order."""
        buf = self.grp.all_to_all(y[self.recv_order.to(y.device)], self.recv_counts, self.send_counts)
        out = torch.empty_like(buf)
        out[self.send_order.to(buf.device)] = buf
        return out


def _raise_if_flagged(failed: torch.Tensor, grp: Group, data: str):
    bad = torch.nonzero(failed.cpu()).flatten().tolist()
    if not bad:
        return
    if grp.world == 1:
        raise_bad_data(data)
    raise ValueError(
        f"{data} contains NaN or inf (or values so large that the pair costs overflow float32) in a group "
        f"solved by rank(s) {bad}: the batch was refused on every rank and the coupling's state left unchanged"
    )


def solve_loom_groups(
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
    cond_weight: float = 0.0,
    want_perm: bool = False,
):
    """LOOM's grouped step: ``(new_seeds (n,) int64, stats, perm)``, the same on every rank but ``perm``.

    ``x1f (b, D)`` this rank's data; ``seeds (len(lists[rank]),)`` the current seeds of the items this
    rank owns (list order); ``noise_fn(seeds) -> (k, D)``; ``labels (n,)`` global or None; ``guard(cost,
    col) -> (col, stats)`` keeps the current pairs when the solve found nothing cheaper. ``gather=False``
    (a sharded table, which needs no replica of the updates): returns the owned items' new seeds
    ``(len(lists[rank]),)`` in list order instead, and only the stats and flags are all-gathered.
    ``cond (b, Dc)`` this rank's conditions (float64) or None travel to the owners beside the data, and each
    group's cost gets ``cond_weight * ||c_i - c_j||^2``. ``want_perm`` (the same on every rank): ``perm (b,)``,
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
    for a, c in part.segments(rank):
        cost = pairwise_cost(xo[a:c], noise[a:c], metric=metric)
        cost = add_cond_cost(cost, *(None, None) if co is None else (co[a:c], co[a:c]), cond_weight)
        try:
            col = solve(cost, None if labels is None else labels[_dev(own[a:c], labels)])
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
    _raise_if_flagged(rows[:, -1], grp, "x1")
    tot = rows[:, width : width + 3].contiguous().view(torch.float64).sum(0)
    perm = route.to_homes(src).to(x1f.device) if want_perm else None
    if not gather:
        return new, _mean_stats(tot, part.n, x1f.device), perm
    out = torch.empty(part.n, dtype=torch.int64)
    for o, lst in enumerate(part.lists):
        out[lst] = rows[o, : len(lst)]
    return out.to(seeds.device), _mean_stats(tot, part.n, x1f.device), perm


def solve_minibatch_groups(
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
    _raise_if_flagged(tot[:, 3], grp, "x1")
    perm = route.to_homes(pos).to(x1f.device) if want_perm else None
    return back, _mean_stats(tot[:, :3].sum(0), part.n, x1f.device), perm


def _dev(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.to(like.device)


def _mean_stats(tot: torch.Tensor, n: int, device) -> dict:
    return {
        "pre_cost": (tot[0] / n).to(device),
        "post_cost": (tot[1] / n).to(device),
        "swaps": tot[2].round().to(torch.int64).to(device),
    }


# ---- the cost model (docs/scaling.md derives it and lists the measurements) -----------------------------

# Seconds of the cost matrix + exact assignment of one n-item problem of dimension D, per device kind
# (noise regeneration and communication come on top). CPU: a 2-core Xeon (78 ms at n=1024, 332 ms at
# 2048, 2.3 s at 4096, 10 s at 8192, D=3072): a cost term n^2 D and an assignment term n^3.1. CUDA: the
# H200 assignment of bench/RESULTS.md (25.7 ms at 1024, 105 ms at 2048, 476 ms at 4096, 2.2 s at 8192;
# the cost matrix is ~1 ms there).
_SOLVE_MODEL = {
    "cpu": lambda n, d: 0.064 * (n / 1024) ** 2 * (d / 3072) + 0.0139 * (n / 1024) ** 3.1,
    "cuda": lambda n, d: 0.0257 * (n / 1024) ** 2.15,
}
# A typical training step (forward + backward of the model), seconds per item of the local batch: an
# assumption stated in docs/scaling.md, not a measurement (a 36M-parameter U-Net on CIFAR-sized images).
TYPICAL_STEP_S_PER_ITEM = {"cpu": 5e-3, "cuda": 5e-4}
WARN_FRACTION = 0.25  # LoomCoupling warns when the coupling would take more than this share of a step


def predicted_coupling_seconds(scope: str, world: int, b: int, dim: int, group_size: int, device: str) -> float:
    """The cost model's time of one coupling call on one rank (the slowest rank), in seconds.

    ``global``: one ``W*b`` problem on every rank; ``local``: one ``b`` problem; ``grouped``: each owner
    solves ``ceil(m / W)`` groups of ``~W*b/m`` items, ``m = ceil(W*b / G)``. Example::

        predicted_coupling_seconds("global", 64, 256, 3072, 1024, "cuda")   # ~ 10 s: far too slow
    """
    solve = _SOLVE_MODEL["cuda" if device == "cuda" else "cpu"]
    n = world * b
    if scope == "global":
        return solve(n, dim)
    if scope == "local":
        return solve(b, dim)
    m = max(1, -(-n // group_size))
    return -(-m // world) * solve(-(-n // m), dim)


def budget_warning(scope: str, world: int, b: int, dim: int, group_size: int, device: str) -> str | None:
    """The warning's text when the model predicts more than ``WARN_FRACTION`` of a typical step, else None."""
    kind = "cuda" if device == "cuda" else "cpu"
    t = predicted_coupling_seconds(scope, world, b, dim, group_size, kind)
    step = TYPICAL_STEP_S_PER_ITEM[kind] * b
    if b == 0 or t <= WARN_FRACTION * step:
        return None
    advice = (
        "use scope='grouped' (group_size ~1024 on the CPU, 512-1024 on a GPU)"
        if scope == "global"
        else "lower group_size"
        if scope == "grouped"
        else "lower the per-rank batch"
    )
    return (
        f"LoomCoupling(scope={scope!r}) at W={world} ranks, b={b} per rank, D={dim} is predicted to take "
        f"{t:.3g} s per call on {kind}, more than {WARN_FRACTION:.0%} of a typical {step:.3g} s training step "
        f"(docs/scaling.md has the cost model): {advice}"
    )
