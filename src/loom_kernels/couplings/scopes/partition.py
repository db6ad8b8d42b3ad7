"""The scopes and the partition: ``scope`` is ``"global"`` (the ``W*b`` items of all ranks as one problem),
``"local"`` (each rank's batch alone) or ``"grouped"`` (the global batch split at random into groups of
at most G items, solved in parallel by owner ranks).

Invariants of the grouped scope (docs/scaling.md has the cost model, ``cost_model.py``):

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

import torch

from .group import Group
from .solve import raise_bad_data

SCOPES = ("global", "local", "grouped")
DEFAULT_GROUP_SIZE = 1024  # a 1024-item group: ~80 ms on 2 CPU cores, ~26 ms on an H200 (docs/scaling.md)


def check_scope(scope) -> str:
    """``scope`` validated: one of ``SCOPES``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


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


def raise_if_flagged(failed: torch.Tensor, grp: Group, data: str):
    """Raise on every rank when an owner flagged its groups' data (``failed (W,)``: one flag per rank)."""
    bad = torch.nonzero(failed.cpu()).flatten().tolist()
    if not bad:
        return
    if grp.world == 1:
        raise_bad_data(data)
    raise ValueError(
        f"{data} contains NaN or inf (or values so large that the pair costs overflow float32) in a group "
        f"solved by rank(s) {bad}: the batch was refused on every rank and the coupling's state left unchanged"
    )


def mean_stats(tot: torch.Tensor, n: int, device) -> dict:
    """The stats of ``n`` items from the sums ``tot = (pre cost, post cost, swaps)`` over every group."""
    return {
        "pre_cost": (tot[0] / n).to(device),
        "post_cost": (tot[1] / n).to(device),
        "swaps": tot[2].round().to(torch.int64).to(device),
    }
