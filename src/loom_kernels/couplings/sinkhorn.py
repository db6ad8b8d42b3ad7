"""Entropic OT couplings at any batch size: pairs drawn from a streamed Sinkhorn plan.

M. Klein, A. Mousavi-Hosseini, S. Zhang, M. Cuturi, "On Fitting Flow Models with Large Sinkhorn
Couplings", 2025: large batches and a low, scale-invariant epsilon. The solver and the sampler
are ``loom_kernels.sinkhorn`` (the cost is never stored); this file holds the bookkeeping:

- labels: the problem splits into one balanced problem per class (rows and columns of class k,
  masses ``n_k / n``), padded with zero-weight points into one batched solve, so a cross-class pair
  has no mass at all (exact: never drawn);
- cond: ``sqrt(cond_weight) * c`` appended to the features of both sides (the streamed cost is the
  squared Euclidean one, so the cost gains exactly ``cond_weight * |c_i - c_j|^2``);
- scope ``"global"``: each rank keeps its rows and all-gathers the noise once per call; the column
  updates are combined by a log-sum-exp all-reduce (``_AllReduce``), ``O(W b)`` numbers per iteration;
  ``"grouped"``: the partition and routes of ``grouped.py``, each group solved by its owner.
"""

from __future__ import annotations

import math

import torch

from ..sinkhorn import RowShards, draw_pairs, plan_sharpness, sinkhorn
from . import distributed as _dist
from .base import Coupling
from .common import check_cond_weight, check_indices, raise_bad_data
from .distributed import Group
from .grouped import DEFAULT_GROUP_SIZE, Partition, Route, check_group_size
from .minibatch import MinibatchOTCoupling

_SCOPES = ("global", "local", "grouped")
_GOLDEN64 = 0x9E3779B97F4A7C15


class _AllReduce(RowShards):
    """``RowShards`` over a process group: every reduction is one ``all_reduce`` (counted by ``count_bytes``)."""

    def __init__(self, grp: Group):
        self.grp = grp

    def _reduce(self, t, op):
        src = t.to(self.grp.cdev).contiguous().clone()
        torch.distributed.all_reduce(src, op=op, group=self.grp.group)
        nbytes = src.numel() * src.element_size()
        _dist._count(nbytes, (self.grp.world - 1) * nbytes)
        return src.to(t.device)

    def sum(self, t):
        return self._reduce(t, torch.distributed.ReduceOp.SUM)

    def max(self, t):
        return self._reduce(t, torch.distributed.ReduceOp.MAX)


def _check_positive(name, v, allow_inf=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0) or (v == math.inf and not allow_inf):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


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


class SinkhornCoupling(Coupling):
    """Entropic OT coupling: each data row's noise is drawn from its row of the Sinkhorn plan.

    ``epsilon`` (relative to the batch's mean cost when ``relative``, scale invariant as in Klein et
    al. 2025; absolute otherwise), ``tol``/``max_iter`` as ``loom_kernels.sinkhorn.sinkhorn`` (a
    ``SinkhornWarning`` with the error reached when ``max_iter`` stops it). Each row ``i`` draws its
    noise from ``P_ij / sum_j P_ij`` by a streamed Gumbel-max (seeded from ``generator``), or takes its
    argmax (``argmax=True``): pairs are drawn with replacement, so a noise row may serve several items.

    ``labels (b,)`` (integer; needs ``m == b``): no cross-class pair is ever drawn (one balanced problem
    per class, solved in one batched call; epsilon relative to the whole batch's mean cost). ``cond
    (b, Dc)`` (float; needs ``m == b``): the cost gains ``cond_weight * |c_i - c_j|^2``, exactly.

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
        cond_weight: float = 1.0,
    ):
        self.epsilon = _check_positive("epsilon", epsilon)
        self.tol = _check_positive("tol", tol)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.relative, self.argmax, self.max_iter = bool(relative), bool(argmax), max_iter
        self.cond_weight = check_cond_weight(cond_weight)
        self.group_size = check_group_size(group_size)
        self._part_gen = torch.Generator().manual_seed(seed)
        self.generator, self.process_group, self.scope = generator, process_group, scope
        self.stats = {}

    def _config(self) -> dict:
        # floats as their bit patterns: equal configurations agree exactly
        bits = [
            torch.tensor(v, dtype=torch.float64).view(torch.int64).item()
            for v in (self.epsilon, self.tol, self.cond_weight)
        ]
        state = self._part_gen.get_state().to(torch.int64)
        return {
            "epsilon": bits[0],
            "relative": int(self.relative),
            "tol": bits[1],
            "max_iter": self.max_iter,
            "scope": _SCOPES.index(self.scope),
            "argmax": int(self.argmax),
            "cond_weight": bits[2],
            "group_size": self.group_size,
            "partition generator": int((state * torch.arange(1, len(state) + 1)).sum()),
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
            labels, cond = MinibatchOTCoupling._check_inputs(x1, x0, labels, cond, self.scope)
            check_indices(indices, x1.shape[0], name)
            if not bool(torch.isfinite(x1).all()) or (x0 is not None and not bool(torch.isfinite(x0).all())):
                raise_bad_data("x1" if not bool(torch.isfinite(x1).all()) else "x0")
        except (TypeError, ValueError):
            world.agree(
                name,
                {"batch size": -1, "x0 rows": -1, "cond dim": -1},
                {"labels": 0, "cond": 0},
                self._config(),
                failed=True,
            )
            raise
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        b = x1.shape[0]
        many = grp.world > 1
        sizes = {
            "batch size": b if many else 0,
            "x0 rows": x0.shape[0] if many else 0,
            "cond dim": cond.shape[1] if (many and cond is not None) else 0,
        }
        world.agree(
            name, sizes, {"labels": labels is not None and many, "cond": cond is not None and many}, self._config()
        )
        if b == 0:
            self.stats = {}
            empty = torch.zeros(0, dtype=torch.int64, device=x1.device)
            return (x0[:0], x1, empty) if return_indices else (x0[:0], x1)
        seed = self._draw_seed(grp.rank, x1.device)
        dt = torch.float64 if x1.dtype == torch.float64 else torch.float32
        x1f, x0f = x1.flatten(1).to(dt), x0.flatten(1).to(dt)
        if cond is not None and self.cond_weight > 0:
            c = cond.to(dt) * math.sqrt(self.cond_weight)
            x1f, x0f = torch.cat([x1f, c], 1), torch.cat([x0f, c], 1)
        if self.scope == "grouped":
            out, idx, self.stats = self._grouped(grp, x1f, x0f, x0, labels, seed)
            return (out, x1, idx) if return_indices else (out, x1)
        g_x0f = grp.gather(x0f)
        g_lab = None if labels is None else grp.gather(labels)
        shards = _AllReduce(grp) if grp.world > 1 else None
        col, self.stats = self._solve(x1f, g_x0f, labels, g_lab, grp.rank * b, seed, shards)
        out = grp.gather(x0)[col]
        return (out, x1, col) if return_indices else (out, x1)

    def _draw_seed(self, rank: int, device) -> int:
        """One 63-bit draw from the generator (or the global RNG), mixed with the rank."""
        gen = self.generator
        s = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device if gen is not None else "cpu"))
        return (s + rank * _GOLDEN64) % (2**63)

    def _solve(self, xf, yf, row_lab, col_lab, offset, seed, shards):
        """Rows ``xf (n, D)`` (this shard's, global positions ``offset + i``) against every column ``yf``."""
        n, total = xf.shape[0], yf.shape[0]
        n_all = total if shards is None else int(shards.sum(torch.tensor([float(n)], dtype=torch.float64)))
        # the relative epsilon's scale: the whole (unlabelled) batch's mean cost, so labels never change it
        eps, relative = self.epsilon, self.relative
        if row_lab is None:
            rows, cols = [torch.arange(n, device=xf.device)], [torch.arange(total, device=xf.device)]
            nmax, mmax = n, total
        else:
            if relative:
                eps = self.epsilon * _mean_cost(xf, yf, shards, n_all)
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
            tol=self.tol,
            max_iter=self.max_iter,
            row_shards=shards,
        )
        j = draw_pairs(res, X, Y, seed=seed, argmax=self.argmax)  # (K, nmax)
        col = torch.empty(n, dtype=torch.int64, device=xf.device)
        for k, r in enumerate(rows):
            col[r] = cols[k][j[k, : len(r)]]
        sharp = plan_sharpness(res, X, Y, row_shards=shards)
        stats = _pair_stats(xf, yf, col, offset, shards, n_all)
        # a class's sharpness weighted by its share of the items
        share = torch.tensor([len(c) / total for c in cols], dtype=torch.float64, device=sharp.device)
        stats.update(
            iterations=torch.tensor(res.iterations),
            error=res.error.max().to(xf.device),
            sharpness=(sharp * share).sum().to(xf.device),
        )
        return col, stats

    def _grouped(self, grp, x1f, x0f, x0, labels, seed):
        """Each owner solves its groups in one process; the drawn noise rows travel back home."""
        b = x1f.shape[0]
        part = Partition(grp.world * b, b, grp.world, self.group_size, self._part_gen)
        route = Route(part, grp)
        xo, no = route.to_owners(x1f), route.to_owners(x0f)
        lo = None if labels is None else route.to_owners(labels)
        raw = route.to_owners(x0)
        pos = route.to_owners(torch.arange(grp.rank * b, (grp.rank + 1) * b, device=x1f.device))
        pick, pick_pos = torch.empty_like(raw), torch.empty_like(pos)
        sums = torch.zeros(6, dtype=torch.float64)
        for a, c in part.segments(grp.rank):
            lab = None if lo is None else lo[a:c]
            col, st = self._solve(xo[a:c], no[a:c], lab, lab, 0, seed + a, None)
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
        return home, home_pos, stats


def _mean_cost(xf, yf, shards, n_all):
    """Mean squared distance between every row (all shards) and every column, float64, O((n + m) D)."""
    x, y = xf.double(), yf.double()
    sx = torch.stack([(x * x).sum(), *x.sum(0)])
    if shards is not None:
        sx = shards.sum(sx)
    mx = sx[1:] / n_all
    return float(sx[0] / n_all + (y * y).sum(1).mean() - 2 * (mx * y.mean(0)).sum())


def _pair_stats(xf, yf, col, offset, shards, n_all):
    """Mean cost of the drawn pairs and of the identity pairs (row i with column offset + i), swaps."""
    post = ((xf - yf[col]).double() ** 2).sum()
    ident = torch.arange(offset, offset + xf.shape[0], device=xf.device)
    ok = ident < yf.shape[0]
    pre = ((xf[ok] - yf[ident[ok]]).double() ** 2).sum()
    sums = torch.stack([pre, post, (col != ident).sum().double()])
    if shards is not None:
        sums = shards.sum(sums)
    return {"pre_cost": sums[0] / n_all, "post_cost": sums[1] / n_all, "swaps": sums[2].round().to(torch.int64)}
