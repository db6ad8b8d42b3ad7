"""Sinkhorn's steps, one per scope: ``global_step`` (also ``"local"``, on a group of one) and
``grouped_step``; ``step_for(scope)`` picks one. Each returns ``(x0 (b, ...) drawn for this rank's items,
stats, idx)``: ``idx (b,)`` the noise row each item drew (global, rank order; this rank's in the local scope).

- labels: the problem splits into one balanced problem per class (rows and columns of class k,
  masses ``n_k / n``), padded with zero-weight points into one batched solve, so a cross-class pair
  has no mass at all (exact: never drawn);
- scope ``"global"``: each rank keeps its rows and all-gathers the noise once per call; the column
  updates are combined by a log-sum-exp all-reduce (``GroupShards``), ``O(W b)`` numbers per iteration;
  ``"grouped"``: the partition and routes of ``partition.py``, each group solved by its owner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...sinkhorn import RowShards, draw_pairs, plan_sharpness, sinkhorn
from .group import Group
from .partition import Partition, Route


@dataclass
class SinkhornSpec:
    """What a step needs of the coupling: the solver's settings, the draw, the grouped scope's partition."""

    epsilon: float
    relative: bool
    tol: float
    max_iter: int
    argmax: bool
    group_size: int
    generator: torch.Generator  # the partition's: the same state on every rank
    oversample: int = 1  # k noise rows per item (global scope): row i*k + j was drawn for item i


class GroupShards(RowShards):
    """``RowShards`` over a process group: every reduction is one ``all_reduce`` (counted by ``count_bytes``)."""

    def __init__(self, grp: Group):
        self.grp = grp

    def sum(self, t):
        return self.grp.all_reduce(t, torch.distributed.ReduceOp.SUM)

    def max(self, t):
        return self.grp.all_reduce(t, torch.distributed.ReduceOp.MAX)


def global_step(grp: Group, x1f, x0f, x0, labels, seed: int, spec: SinkhornSpec) -> tuple:
    """Solve the ``W*b`` items of every rank as one problem (``grp`` of one rank: this rank's batch).

    ``x1f (b, D')``, ``x0f (m, D')``: the features (the condition appended), ``x0 (m, ...)`` the noise
    (``m = k b`` with ``spec.oversample = k``: row ``i*k + j`` carries item ``i``'s label)."""
    b = x1f.shape[0]
    g_x0f = grp.gather(x0f)
    g_lab = None if labels is None else grp.gather(labels).repeat_interleave(spec.oversample)
    shards = GroupShards(grp) if grp.world > 1 else None
    col, stats = solve_problem(x1f, g_x0f, labels, g_lab, grp.rank * b, seed, shards, spec)
    return grp.gather(x0)[col], stats, col


def grouped_step(grp: Group, x1f, x0f, x0, labels, seed: int, spec: SinkhornSpec) -> tuple:
    """Each owner solves its groups in one process; the drawn noise rows travel back home."""
    b = x1f.shape[0]
    part = Partition(grp.world * b, b, grp.world, spec.group_size, spec.generator)
    route = Route(part, grp)
    xo, no = route.to_owners(x1f), route.to_owners(x0f)
    lo = None if labels is None else route.to_owners(labels)
    raw = route.to_owners(x0)
    pos = route.to_owners(torch.arange(grp.rank * b, (grp.rank + 1) * b, device=x1f.device))
    pick, pick_pos = torch.empty_like(raw), torch.empty_like(pos)
    sums = torch.zeros(6, dtype=torch.float64)
    for a, c in part.segments(grp.rank):
        lab = None if lo is None else lo[a:c]
        col, st = solve_problem(xo[a:c], no[a:c], lab, lab, 0, seed + a, None, spec)
        pick[a:c], pick_pos[a:c] = raw[a:c][col], pos[a:c][col]
        w = c - a
        sums += torch.stack(
            [
                st["pre_cost"].cpu() * w,
                st["post_cost"].cpu() * w,
                st["swaps"].cpu().double(),
                st["iterations"].double(),
                st["error"].cpu(),
                st["sharpness"].cpu() * w,
            ]
        )
    home, home_pos = route.to_homes(pick), route.to_homes(pick_pos)
    tot = grp.gather(sums[None])
    n = part.n
    s = tot.sum(0)
    stats = {
        "pre_cost": (s[0] / n).to(x1f.device),
        "post_cost": (s[1] / n).to(x1f.device),
        "swaps": s[2].round().to(torch.int64).to(x1f.device),
        "iterations": tot[:, 3].max().to(torch.int64),
        "error": tot[:, 4].max().to(x1f.device),
        "sharpness": (s[5] / n).to(x1f.device),
    }
    return home, stats, home_pos


def step_for(scope: str) -> Callable:
    """The step of ``scope`` (``"local"`` is the global step on a group of one rank)."""
    return grouped_step if scope == "grouped" else global_step


def solve_problem(xf, yf, row_lab, col_lab, offset, seed, shards, spec: SinkhornSpec) -> tuple:
    """Rows ``xf (n, D)`` (this shard's, global positions ``offset + i``) against every column ``yf``."""
    n, total = xf.shape[0], yf.shape[0]
    # the rows of every shard (each of mass 1 / n_all); the columns (m >= n of them) each 1 / total
    n_all = n if shards is None else int(shards.sum(torch.tensor([float(n)], dtype=torch.float64)))
    # the relative epsilon's scale: the whole (unlabelled) batch's mean cost, so labels never change it
    eps, relative = spec.epsilon, spec.relative
    if row_lab is None:
        rows, cols = [torch.arange(n, device=xf.device)], [torch.arange(total, device=xf.device)]
        nmax, mmax = n, total
    else:
        if relative:
            eps = spec.epsilon * _mean_cost(xf, yf, shards, n_all)
            relative = False
        rows, cols, nmax, mmax = _classes(row_lab, col_lab)
    X = torch.stack([_pad(xf, r, nmax) for r in rows])
    Y = torch.stack([_pad(yf, c, mmax) for c in cols])
    a = torch.stack([_weights(r, nmax, n_all, xf) for r in rows]).to(xf.device)
    bw = torch.stack([_weights(c, mmax, total, xf) for c in cols]).to(xf.device)
    res = sinkhorn(
        X,
        Y,
        a.to(X.dtype),
        bw.to(X.dtype),
        epsilon=eps,
        relative=relative,
        tol=spec.tol,
        max_iter=spec.max_iter,
        row_shards=shards,
    )
    j = draw_pairs(res, X, Y, seed=seed, argmax=spec.argmax)  # (K, nmax)
    col = torch.empty(n, dtype=torch.int64, device=xf.device)
    for k, r in enumerate(rows):
        col[r] = cols[k][j[k, : len(r)]]
    sharp = plan_sharpness(res, X, Y, row_shards=shards)
    stats = _pair_stats(xf, yf, col, offset, shards, n_all, spec.oversample)
    # a class's sharpness weighted by its share of the items
    share = torch.tensor([len(c) / total for c in cols], dtype=torch.float64, device=sharp.device)
    stats.update(
        iterations=torch.tensor(res.iterations),
        error=res.error.max().to(xf.device),
        sharpness=(sharp * share).sum().to(xf.device),
    )
    return col, stats


def _classes(rows_lab, cols_lab):
    """Per class k: the row and column positions; the padded extents ``(nmax, mmax)``."""
    keys = torch.unique(cols_lab)
    rows = [torch.nonzero(rows_lab == k).flatten() for k in keys]
    cols = [torch.nonzero(cols_lab == k).flatten() for k in keys]
    return rows, cols, max(1, max(len(r) for r in rows)), max(len(c) for c in cols)


def _pad(x, index, size):
    out = x.new_zeros((size, x.shape[1]))
    out[: len(index)] = x[index]
    return out


def _weights(index, size, total, like):
    w = like.new_zeros(size, dtype=torch.float64)
    w[: len(index)] = 1.0 / total
    return w


def _mean_cost(xf, yf, shards, n_all):
    """Mean squared distance between every row (all shards) and every column, float64, O((n + m) D)."""
    x, y = xf.double(), yf.double()
    sx = torch.stack([(x * x).sum(), *x.sum(0)])
    if shards is not None:
        sx = shards.sum(sx)
    mx = sx[1:] / n_all
    return float(sx[0] / n_all + (y * y).sum(1).mean() - 2 * (mx * y.mean(0)).sum())


def _pair_stats(xf, yf, col, offset, shards, n_all, k=1):
    """Mean cost of the drawn pairs and of the identity pairs (row i with column (offset + i) k: its own first
    noise), swaps."""
    post = ((xf - yf[col]).double() ** 2).sum()
    ident = torch.arange(offset, offset + xf.shape[0], device=xf.device) * k
    ok = ident < yf.shape[0]
    pre = ((xf[ok] - yf[ident[ok]]).double() ** 2).sum()
    sums = torch.stack([pre, post, (col != ident).sum().double()])
    if shards is not None:
        sums = shards.sum(sums)
    return {"pre_cost": sums[0] / n_all, "post_cost": sums[1] / n_all, "swaps": sums[2].round().to(torch.int64)}
