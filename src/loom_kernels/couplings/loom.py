"""LOOM-CFM: a persistent data-noise assignment improved by every minibatch.

Davtyan, Dadi, Cevher, Favaro, "Faster Inference of Flow-Based Generative Models via Improved
Data-Noise Coupling" (LOOM-CFM, "Looking Out Of Minibatch"), ICLR 2025: keep the minibatch
assignments and compose them, tau_k = omega_k o tau_{k-1} (their Algorithm 1).
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..checkpoint import atomic_save, load_verified
from ..cost import pairwise_cost
from ..noise import gaussian_noise
from ._common import METRICS as _METRICS
from ._common import _as_device, _check_labels, _check_metric, _check_x1, _cost_dtype, _solve, _to
from .base import Coupling
from .distributed import _check_whole_world, _Group
from .grouped import DEFAULT_GROUP_SIZE, Partition, Route, budget_warning, check_group_size, solve_loom_groups
from .sharded import ShardedSeedTable, ShardReader, check_shards, new_save_id, save_shards, shard_bounds, write_manifest
from .table import DEFAULT_DURABILITY, SeedTable, _seed_values, check_durability, check_seed_table

_SCOPES = ("global", "local", "grouped")
_TABLES = ("replicated", "sharded")
_FORMAT_VERSION = 2  # 2: save() stores a checksum (load() verifies it)


def _serialized(method):
    """Run ``method`` under the coupling's lock: threads sharing one coupling take turns on the table."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class LoomCoupling(Coupling):
    """LOOM-CFM: a persistent data-noise assignment, improved by every minibatch (exact, fast, DDP-aware).

    The coupling owns a seed table ``seeds`` of shape ``(num_points, num_caches)`` (int64): data point
    ``i`` owns the noises ``gaussian_noise(seeds[i, k])``, ``k < num_caches``. Each call

    1. picks one cache slot per item uniformly with the coupling's own ``torch.Generator`` (seeded by
       ``seed``; its state is checkpointed, so runs are reproducible and resumable),
    2. regenerates those noises from their seeds (no noise is ever stored),
    3. solves the exact assignment between the data items (rows) and the noises (columns) under
       ``metric`` ("sqeuclidean", the default, or "euclidean", the reference code's choice),
    4. writes the permuted seeds back, so item ``i`` now owns the noise it was matched with.

    Invariants: the seeds in the table are a fixed set (distinct, only permuted) until ``resample()``;
    the total cost ``sum_{i,k} c(x1_i, noise(seeds[i, k]))`` never increases (with ``num_caches=1``
    the per-cache total; with several caches noises move between caches, so only the total over all
    caches is monotone); on a small data set the table approaches the global optimal assignment.

    Labels: with ``labels (b,)`` (integer, on ``x1``'s device) noise is only exchanged between items of
    the same label (cross-label pairs are forbidden in one batched solve), so the set of seeds owned by
    each class never changes; give a data point the same label on every call.

    Indices: each data point may appear at most once per (global) batch, else two items would write
    the same table entry: duplicates raise ``ValueError``. Augmented views (flips, crops) get their
    own index, e.g. ``i + len(dataset)`` with ``num_points = 2 * len(dataset)``. ``indices`` may be on
    the table's device or on the CPU (validated there without a device sync). A refused batch (bad
    indices, NaN data) leaves the table unchanged; the slot generator has advanced, as on every rank.
    If the solver's float tolerance ever returned a matching costlier than the current pairs, the
    current pairs are kept, so the monotone total is exact for the float32 costs.

    Distributed: with a process group of size ``W > 1`` (``process_group`` or the default group),
    every rank calls the coupling with its own batch of the same size ``b``. ``scope="global"`` couples
    the global batch of ``W * b`` items: ranks all-gather the indices (and labels) and their cost rows
    (``b x W*b`` floats each; their data instead when it is smaller, ``D < W*b``), every rank
    regenerates the global noise from the (identical) tables, solves the same assignment and keeps
    its slice. ``scope="local"`` solves each rank's minibatch and all-gathers the ``(index, slot,
    seed)`` updates. ``scope="grouped"`` splits the global batch at random (from the slot generator, after
    the slots) into groups of at most ``group_size`` items, each solved by one owner rank, owners in
    parallel: items travel to their owner as data rows, owners return the new seeds; the solve stays
    ``group_size`` wide whatever ``W`` is (see docs/scaling.md for what to choose at 8 to 512 GPUs).
    Each group's result equals one process solving that group alone. Tables and generator states stay
    identical on all ranks; noise is never sent. Call ``resample`` with the same arguments on every rank.
    The table is shared by every rank of the default group, so ``process_group`` must span all of it
    (a subgroup would let the tables of different subgroups diverge silently: refused).

    Memory-mapped tables: ``mmap_path`` keeps the table in a ``.npy`` file on disk (numpy memmap); each
    call reads and writes only the batch's rows, so 10^8+ points fit. The constructor creates the file
    (preallocated: a full disk is an error now, not a SIGBUS later) and refuses an existing one unless
    ``overwrite=True``; resume with ``LoomCoupling.load(checkpoint, mmap_path=...)``. The file is locked
    while the coupling lives (``close()`` releases it) and every call is journaled, so a crash at any
    instant leaves the table of the last completed call or the one before (see ``table.SeedTable`` and
    docs/guarantees.md). Under DDP give each rank its own file (e.g. ``f"table.rank{rank}.npy"`` or a
    node-local disk): every rank holds a full table. ``durability``: "crash" (the default: the journal is
    written without fdatasync and survives kill -9, OOM kills and every other process fault) or "power"
    (each call's record is fdatasynced first: also survives a power loss or kernel crash, ~0.1-7 ms a call).

    Sharded tables: ``table="sharded"`` keeps on each rank only its block of rows (``shard_rows``,
    ``8 * num_points * num_caches / W`` bytes); reads and writes become all-to-alls of the batch's
    integers, with results equal to the replicated table's bit for bit, in every scope. ``save`` writes one
    file per rank plus a manifest (a collective); ``load`` reads it on any world size, as either table kind
    (see docs/scaling.md). In memory only (no ``mmap_path``).

    Threads: calls, ``resample``, ``save`` and ``load_state_dict`` take a lock, so threads sharing one
    coupling take turns.

    ``stats`` after each call (0-dim tensors on the device, read with ``float()``): ``pre_cost`` and
    ``post_cost`` (mean pair cost before/after, over the coupled batch), ``swaps`` (items whose noise
    changed).

    Shapes: ``x1 (b, *shape)`` floating, ``indices (b,)`` integer -> ``(x0, x1)``, ``x0`` like ``x1``.

    Example::

        coupling = LoomCoupling(1000, (2,), num_caches=2, seed=0)
        x0, x1 = coupling(torch.randn(64, 2), torch.randperm(1000)[:64])
        coupling.save("coupling.pt"); coupling = LoomCoupling.load("coupling.pt")
    """

    _defer_table = False  # set on the instance by load(), which attaches the checkpoint's table

    def __init__(
        self,
        num_points: int,
        shape: int | Sequence[int],
        *,
        num_caches: int = 1,
        seed: int = 0,
        metric: str = "sqeuclidean",
        device: str | torch.device | None = None,
        process_group=None,
        scope: str = "global",
        group_size: int = DEFAULT_GROUP_SIZE,
        mmap_path: str | os.PathLike | None = None,
        overwrite: bool = False,
        table: str = "replicated",
        durability: str = DEFAULT_DURABILITY,
    ):
        if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or num_points < 1:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if isinstance(num_caches, bool) or not isinstance(num_caches, (int, np.integer)) or num_caches < 1:
            raise ValueError(f"num_caches must be a positive int, got {num_caches!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if len(shape) == 0 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        if table not in _TABLES:
            raise ValueError(f"table must be one of {_TABLES}, got {table!r}")
        if table == "sharded" and mmap_path is not None:
            raise ValueError("table='sharded' keeps each rank's shard in memory (8*num_points*num_caches/W bytes); "
                             "mmap_path is for the replicated table only: pass one or the other")
        _check_whole_world(process_group, "LoomCoupling")
        self.group_size = check_group_size(group_size)
        self.num_points = int(num_points)
        self.num_caches = int(num_caches)
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.metric = _check_metric(metric)
        self.device = _as_device(device)
        self.process_group = process_group
        self.scope = scope
        self.table = table
        self.mmap_path = os.fspath(mmap_path) if mmap_path is not None else None
        self.durability = check_durability(durability)
        # The slot generator lives on the CPU: its state is a portable byte tensor, the same on every
        # device and rank, which keeps checkpoints and DDP ranks in lockstep.
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)
        self._next_counter = self.num_points * self.num_caches  # first unused seed number
        self._lock = threading.Lock()
        self._budget_checked = False  # the cost-model warning is given once, at the first call
        self.stats = {}
        # load() attaches the checkpoint's table itself (a file is built from its rows, then renamed in).
        self._table: SeedTable | None = None if self._defer_table else self._create_table(overwrite)

    # -- table storage --------------------------------------------------------------------------

    @property
    def seeds(self) -> torch.Tensor:
        """The live ``(num_points, num_caches)`` int64 table (write through calls and ``resample`` only);
        with ``table="sharded"`` this rank's rows ``shard_rows`` only."""
        return self._table.seeds

    @property
    def shard_rows(self) -> tuple:
        """``(lo, hi)``: the global rows ``seeds`` holds (all of them for a replicated table)."""
        if self.table == "sharded":
            return self._table.lo, self._table.hi
        return 0, self.num_points

    @property
    def table_device(self) -> torch.device:
        """Where ``seeds`` lives: ``device``, or the CPU for a memory-mapped table."""
        return self._table.device

    def _initial_rows(self, a: int, b: int) -> np.ndarray:
        k = self.num_caches
        return _seed_values(self.seed, a * k, (b - a) * k).reshape(b - a, k)

    def _create_table(self, overwrite: bool, rows=None) -> SeedTable:
        rows = rows or self._initial_rows
        shape = (self.num_points, self.num_caches)
        if self.table == "sharded":
            return ShardedSeedTable(_Group(self.process_group), self.num_points, self.num_caches, self.device, rows)
        if self.mmap_path is None:
            return SeedTable.in_memory(shape, self.device, rows)
        return SeedTable.create(self.mmap_path, shape, rows, overwrite=overwrite, durability=self.durability)

    def flush(self):
        """Persist a memory-mapped table to disk and fold its journal in (no-op for an in-memory table)."""
        if self._table is not None:
            self._table.flush()

    def close(self):
        """Flush a memory-mapped table and release its file lock (another coupling may then open it)."""
        if self._table is not None:
            self._table.close()

    # -- validation -----------------------------------------------------------------------------

    def _check_inputs(self, x1, indices, labels):
        _check_x1(x1)
        if tuple(x1.shape[1:]) != self.shape:
            raise ValueError(f"x1 must have shape (b, {', '.join(map(str, self.shape))}), got {tuple(x1.shape)}")
        if x1.device != self.device:
            raise ValueError(
                f"x1 is on {x1.device} but the coupling computes on {self.device}; "
                f"build it with LoomCoupling(..., device={str(x1.device)!r}) or move x1"
            )
        if indices is None:
            raise ValueError("LoomCoupling needs the dataset indices of the batch: call coupling(x1, indices)")
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(np.asarray(indices))
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must have an integer dtype, got {indices.dtype}")
        if indices.dim() != 1 or indices.shape[0] != x1.shape[0]:
            raise ValueError(
                f"indices must have shape (b,) = ({x1.shape[0]},) to match x1 {tuple(x1.shape)}, "
                f"got {tuple(indices.shape)}"
            )
        if indices.device.type != "cpu" and indices.device != self.table_device:
            raise ValueError(
                f"indices must be on the table's device {self.table_device} (or on the CPU), got {indices.device}"
            )
        return indices.to(torch.int64), _check_labels(labels, x1.shape[0], x1.device)

    def _index_flags(self, idx):
        """Device tensor [any out of range, any duplicate] (no host sync)."""
        n = idx.shape[0]
        out = ((idx < 0) | (idx >= self.num_points)).any()
        if n > 1:
            s = torch.sort(idx).values
            dup = (s[1:] == s[:-1]).any()
        else:
            dup = torch.zeros((), dtype=torch.bool, device=idx.device)
        return torch.stack([out, dup])

    def _raise_index_error(self, idx, where="the batch"):
        idx = idx.cpu()
        bad = idx[(idx < 0) | (idx >= self.num_points)]
        if len(bad):
            raise ValueError(
                f"indices must lie in [0, num_points) = [0, {self.num_points}), got {int(bad[0])} "
                f"({len(bad)} out of range, min {int(idx.min())}, max {int(idx.max())}); for data augmentation "
                f"give each augmented view its own index (e.g. i + len(dataset) for flipped images) and size "
                f"num_points for all views"
            )
        vals, counts = torch.unique(idx, return_counts=True)
        rep = vals[counts > 1]
        if len(rep):
            raise ValueError(
                f"indices must be distinct within {where}: index {int(rep[0])} appears "
                f"{int(counts[counts > 1][0])} times ({len(rep)} repeated); two items would overwrite the same "
                f"noise slot. Sample without replacement (drop_last=True with DistributedSampler), or give "
                f"augmented views their own index (i + len(dataset))"
            )

    # -- the coupling ---------------------------------------------------------------------------

    def _draw_slots(self, n: int) -> torch.Tensor:
        if self.num_caches == 1:
            return torch.zeros(n, dtype=torch.int64)
        return torch.randint(self.num_caches, (n,), generator=self._gen, dtype=torch.int64)

    @_serialized
    def __call__(self, x1: torch.Tensor, indices=None, *, labels=None) -> tuple:
        """Couple ``x1 (b, *shape)`` with dataset indices ``indices (b,)`` (and ``labels (b,)``).

        Returns ``(x0, x1)``: ``x0[i]`` is the noise paired with ``x1[i]``."""
        grp = _Group(self.process_group)
        try:
            indices, labels = self._check_inputs(x1, indices, labels)
        except (TypeError, ValueError):
            if grp.world > 1:  # the other ranks raise too instead of waiting in a collective
                grp.agree("LoomCoupling", {"batch size": -1}, {"labels": False}, self._fingerprint(), failed=True)
            raise
        world, rank = grp.world, grp.rank
        b = x1.shape[0]
        tdev = self.table_device
        if world > 1:  # the fingerprint reads the table: only when there is something to agree on
            grp.agree("LoomCoupling", {"batch size": b}, {"labels": labels is not None}, self._fingerprint())
        g_idx = grp.gather(indices, grp.cdev)  # left on the comm device: validated after the solve's sync
        n = world * b
        self._warn_budget(world, b)
        # One shared slot stream over the global batch: identical generator states on all ranks.
        g_slots = _to(self._draw_slots(n), tdev)
        if b == 0:
            self.stats = {}
            return x1.new_empty(x1.shape), x1

        # Validation: host indices are checked at once; device ones after the assignment's own sync,
        # when the queue is empty (no extra stall). Clamped indices keep the gathers in bounds meanwhile.
        flags = self._index_flags(g_idx)
        where = "the batch" if world == 1 else f"the global batch of all {world} ranks"
        if g_idx.device.type == "cpu" and bool(flags.any()):
            self._raise_index_error(g_idx, where)
        safe_idx = g_idx if g_idx.device.type == "cpu" else g_idx.clamp(0, self.num_points - 1)
        safe_idx = _to(safe_idx, tdev)

        dt = _cost_dtype(x1.dtype)
        x1f = x1.flatten(1).to(dt)
        lo, hi = rank * b, (rank + 1) * b
        if self.scope == "grouped":
            return self._grouped_step(grp, x1, x1f, safe_idx, g_slots, labels, flags, g_idx, where)
        sharded = self.table == "sharded"
        if self.scope == "local" and world > 1:
            seeds = _to(self._read(grp, safe_idx[lo:hi], g_slots[lo:hi]), self.device)
            noise = gaussian_noise(seeds, self.shape, device=self.device, dtype=dt)
            cost = pairwise_cost(x1f, noise.flatten(1), metric=self.metric)
            col = _solve(cost, labels)
            self._check_flags_after_sync(flags, g_idx, where)
            col, stats = self._guard(cost, col)
            if sharded:  # each rank sends its own b updates to their owners
                self._table.update(grp, safe_idx[lo:hi], g_slots[lo:hi], _to(seeds[col], tdev))
            else:
                self._table.write(safe_idx, g_slots, grp.gather(seeds[col], tdev))
            self.stats = stats
            return noise[col].to(x1.dtype), x1

        if sharded:  # every rank fetches its own b seeds, then all of them are gathered
            g_seeds = _to(grp.gather(self._read(grp, safe_idx[lo:hi], g_slots[lo:hi])), self.device)
        else:
            g_seeds = _to(self.seeds[safe_idx, g_slots], self.device)
        noise = gaussian_noise(g_seeds, self.shape, device=self.device, dtype=dt)
        cost = grp.global_cost(x1f, noise.flatten(1), self.metric)  # (W*b, W*b) float32
        col = _solve(cost, None if labels is None else grp.gather(labels))  # the single host sync on CUDA
        self._check_flags_after_sync(flags, g_idx, where)
        col, stats = self._guard(cost, col)
        if sharded:
            self._table.update(grp, safe_idx[lo:hi], g_slots[lo:hi], g_seeds[col[lo:hi]].to(tdev))
        else:
            self._table.write(safe_idx, g_slots, g_seeds[col].to(tdev))
        self.stats = stats
        return noise[col[lo:hi]].to(x1.dtype), x1

    def _read(self, grp, rows, slots):
        """``table[rows, slots]`` of this rank's items: local, or fetched from their owners (a collective)."""
        if self.table == "sharded":
            return self._table.fetch(grp, rows, slots)
        return self.seeds[rows, slots]

    def _warn_budget(self, world, b):
        if self._budget_checked or b == 0:
            return
        self._budget_checked = True
        scope = "local" if self.scope == "local" or world == 1 and self.scope == "global" else self.scope
        dim = int(np.prod(self.shape))
        msg = budget_warning(scope, world, b, dim, self.group_size, self.device.type)
        if msg:
            warnings.warn(msg, stacklevel=4)

    def _grouped_step(self, grp, x1, x1f, safe_idx, g_slots, labels, flags, g_idx, where):
        part = Partition(len(g_slots), x1.shape[0], grp.world, self.group_size, self._gen)
        own = _to(part.lists[grp.rank], self.table_device)
        seeds = _to(self._read(grp, safe_idx[own], g_slots[own]), self.device)
        noise_fn = lambda s: gaussian_noise(s, self.shape, device=self.device, dtype=x1f.dtype).flatten(1)  # noqa: E731
        sharded = self.table == "sharded"
        new, stats = solve_loom_groups(grp, part, x1f, seeds, noise_fn, self.metric,
                                       None if labels is None else grp.gather(labels), self._guard,
                                       gather=not sharded)
        self._check_flags_after_sync(flags, g_idx, where)
        if sharded:  # owners write their groups' seeds to the table's owners and send each item's home
            self._table.update(grp, safe_idx[own], g_slots[own], _to(new, self.table_device))
            mine = Route(part, grp).to_homes(new)
        else:
            self._table.write(safe_idx, g_slots, _to(new, self.table_device))
            mine = new[grp.rank * x1.shape[0]:(grp.rank + 1) * x1.shape[0]]
        self.stats = stats
        return noise_fn(mine).reshape(x1.shape).to(x1.dtype), x1

    def _fingerprint(self) -> dict:
        """What must agree on every rank: config, slot-generator state, a checksum of the table's head."""
        state = self._gen.get_state().to(torch.int64)
        gen_hash = int((state * torch.arange(1, len(state) + 1)).sum())
        # a shard's head differs across ranks: only the table kind is compared then
        head = -1 if self.table == "sharded" else int((self.seeds[: min(self.num_points, 4096)] % 1000003).sum())
        return {"seed": self.seed, "num_points": self.num_points, "num_caches": self.num_caches,
                "scope": _SCOPES.index(self.scope), "metric": _METRICS.index(self.metric),
                "group_size": self.group_size, "table": _TABLES.index(self.table),
                "slot generator": gen_hash, "seed table": head}

    def _check_flags_after_sync(self, flags, g_idx, where):
        if flags.device.type != "cpu" and bool(flags.any()):  # the queue is empty after assign: cheap
            self._raise_index_error(g_idx, where)

    @staticmethod
    def _guard(cost, col):
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

    # -- resampling -----------------------------------------------------------------------------

    @_serialized
    def resample(self, indices=None):
        """Draw fresh seeds for the rows ``indices`` (all rows when ``None``), every cache slot.

        New seeds come from the same deterministic stream as the initial ones (keyed by ``seed``), so
        they are distinct from every seed the coupling has ever held, and every DDP rank that makes
        the same call gets the same table. Rows not named keep their seeds.

        Example::

            coupling.resample(torch.tensor([3, 7]))   # rows 3 and 7 get new noise
        """
        k, start = self.num_caches, self._next_counter
        if indices is None:
            self._table.replace(lambda a, b: _seed_values(self.seed, start + a * k, (b - a) * k).reshape(b - a, k))
            self._next_counter += self.num_points * k
            return
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"indices must have an integer dtype, got {idx.dtype}")
        idx = idx.reshape(-1).to(torch.int64).cpu()
        if len(idx) and bool(self._index_flags(idx).any()):
            self._raise_index_error(idx, where="a resample call")
        if len(idx):
            vals = torch.from_numpy(_seed_values(self.seed, start, len(idx) * k))
            rows = idx.repeat_interleave(k).to(self.table_device)
            slots = torch.arange(k).repeat(len(idx)).to(self.table_device)
            write = self._table.write_owned if self.table == "sharded" else self._table.write
            write(rows, slots, vals.to(self.table_device))
        self._next_counter += len(idx) * k

    # -- persistence ----------------------------------------------------------------------------

    def _config(self):
        return {
            "num_points": self.num_points,
            "shape": list(self.shape),
            "num_caches": self.num_caches,
            "seed": self.seed,
            "metric": self.metric,
        }

    def state_dict(self) -> dict:
        """Seeds, slot-generator state, seed counter and config (tensors, ints, strings only).

        ``seeds`` is the live table (not a copy), as in ``nn.Module.state_dict``; with ``table="sharded"``
        this rank's rows ``shard_rows`` (load it on the same rank of the same world size; ``save``/``load``
        move a sharded table to another world size).
        """
        state = {
            "version": _FORMAT_VERSION,
            "config": self._config(),
            "seeds": self.seeds,
            "generator": self._gen.get_state(),
            "next_counter": int(self._next_counter),
            "scope": self.scope,
            "group_size": self.group_size,
            "mmap_path": self.mmap_path,
            "table": self.table,
        }
        if self.table == "sharded":
            state.update(shard_rows=list(self.shard_rows), world=self._table.world)
        return state

    @_serialized
    def load_state_dict(self, state: dict):
        """Restore a ``state_dict()``; refuses one made for another configuration (names what differs)
        and a corrupt one (zeroed, negative or duplicated seeds, seeds the stream has not handed out,
        a counter that would hand seeds out again). A memory-mapped table gets a new file, filled
        before it is renamed over the old one."""
        if not isinstance(state, dict):
            raise ValueError(f"not a LoomCoupling state_dict: expected a dict, got {type(state).__name__}")
        missing = [k for k in ("config", "seeds", "generator", "next_counter") if k not in state]
        if missing:
            raise ValueError(f"not a LoomCoupling state_dict: missing keys {missing}")
        theirs, ours = dict(state["config"]), self._config()
        theirs["shape"] = list(theirs.get("shape", []))
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r} vs this coupling {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"LoomCoupling state_dict does not match this coupling's configuration ({detail})")
        seeds = state["seeds"]
        slo, shi = (int(v) for v in state.get("shard_rows", (0, self.num_points)))
        expected = (shi - slo, self.num_caches)
        if not isinstance(seeds, torch.Tensor) or tuple(seeds.shape) != expected or seeds.dtype != torch.int64:
            got = (tuple(seeds.shape), seeds.dtype) if isinstance(seeds, torch.Tensor) else type(seeds).__name__
            raise ValueError(f"state_dict['seeds'] must be an int64 tensor of shape {expected}, got {got}")
        lo, hi = self._rows_needed()
        if not slo <= lo <= hi <= shi:
            raise ValueError(
                f"state_dict['seeds'] holds rows [{slo}, {shi}) of a table sharded over {state.get('world')} "
                f"ranks, but "
                f"this coupling needs rows [{lo}, {hi}): move a sharded table to another world size or layout with "
                f"save() and LoomCoupling.load()"
            )
        gen = state["generator"]
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError(
                f"state_dict['generator'] must be a uint8 tensor (torch.Generator.get_state()), got {gen!r:.80}")
        check_seed_table(seeds, self.seed, state["next_counter"])
        self._restore(lambda a, b: seeds[a - slo:b - slo], gen, state["next_counter"])

    def _rows_needed(self) -> tuple:
        """The global rows this rank's table holds (or will hold, before it is built)."""
        if self.table == "replicated":
            return 0, self.num_points
        grp = _Group(self.process_group)
        bounds = shard_bounds(self.num_points, grp.world)
        return bounds[grp.rank], bounds[grp.rank + 1]

    def _restore(self, rows, gen: torch.Tensor, next_counter: int):
        """Install a verified table (``rows(a, b)``: global rows), generator state and seed counter."""
        self._gen.set_state(gen.cpu())
        self._next_counter = int(next_counter)
        if self._table is None:  # from load(): nothing to keep
            self._table = self._create_table(overwrite=True, rows=rows)
        else:
            self._table.replace(rows)
        self.flush()

    def _load_manifest(self, path, manifest: dict):
        """Restore from a sharded checkpoint (any world size, any table kind): verify the shards this rank needs."""
        reader = ShardReader(path, manifest)
        if reader.config != self._config():
            raise ValueError(
                f"the sharded checkpoint {os.fspath(path)!r} has config {reader.config}, expected {self._config()}")
        gen, counter = manifest.get("generator"), manifest.get("next_counter")
        if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
            raise ValueError(f"{os.fspath(path)!r}['generator'] must be a uint8 tensor, got {gen!r:.80}")
        lo, hi = self._rows_needed()
        grp = _Group(self.process_group) if self.table == "sharded" else None  # a sharded load: a collective check
        check_shards(reader, lo, hi, self.seed, counter, grp)
        self._restore(reader.rows, gen, counter)

    @_serialized
    def save(self, path: str | os.PathLike):
        """Write ``state_dict()`` and its checksum to ``path`` atomically (temp file, fsync, rename, fsync
        of the directory). A crash mid-save leaves the previous file intact; ``load`` verifies the checksum.

        Example: ``coupling.save("ckpt/coupling.pt")``.
        """
        if self.table == "sharded":
            return self._save_sharded(path)
        self.flush()
        atomic_save(self.state_dict(), path)

    def _save_sharded(self, path):
        grp = _Group(self.process_group)
        save_id = new_save_id(grp)
        save_shards(grp, self._table, path, save_id, self._config())
        manifest = {k: v for k, v in self.state_dict().items() if k not in ("seeds", "shard_rows")}
        manifest.update(save_id=save_id, world=grp.world, bounds=self._table.bounds)
        write_manifest(grp, manifest, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        process_group=None,
        scope: str | None = None,
        group_size: int | None = None,
        mmap_path: str | os.PathLike | None = "auto",
        table: str | None = None,
        durability: str = DEFAULT_DURABILITY,
    ) -> LoomCoupling:
        """Rebuild a coupling saved with ``save``; ``device=None`` keeps the CPU.

        ``table``: "replicated" or "sharded" (default: as saved). A sharded checkpoint (a manifest at
        ``path`` and one shard file per saving rank beside it) loads on any world size, as either kind;
        every rank reads only the shards overlapping its rows, each verified (checksum, save id).

        ``mmap_path="auto"`` memory-maps the table again at the path it was saved from (None: in memory):
        that file is replaced by the checkpoint's table (a new file, renamed in once filled), unless a
        live coupling holds it (``TableInUseError``). The checkpoint file itself is never modified;
        its checksum and contents are verified first. ``durability``: of that memory-mapped table, as in
        the constructor (not stored in checkpoints: it is how this process runs, like ``device``). Example::

            coupling = LoomCoupling.load("ckpt/coupling.pt", device="cuda")
        """
        state = load_verified(path, "LoomCoupling file", mmap=True)
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError(f"{os.fspath(path)!r} is not a LoomCoupling file (no 'config' entry)")
        cfg = state["config"]
        table = table if table is not None else state.get("table", "replicated")
        if mmap_path == "auto":
            mmap_path = state.get("mmap_path") if table == "replicated" else None
        coupling = cls.__new__(cls)
        coupling._defer_table = True  # the table comes from the checkpoint, not from the seed stream
        coupling.__init__(
            cfg["num_points"],
            tuple(cfg["shape"]),
            num_caches=cfg["num_caches"],
            seed=cfg["seed"],
            metric=cfg["metric"],
            device=device,
            process_group=process_group,
            scope=scope if scope is not None else state.get("scope", "global"),
            group_size=group_size if group_size is not None else state.get("group_size", DEFAULT_GROUP_SIZE),
            mmap_path=mmap_path,
            table=table,
            durability=durability,
        )
        if "save_id" in state:
            with coupling._lock:
                coupling._load_manifest(path, state)
        else:
            coupling.load_state_dict(state)
        return coupling

    def __repr__(self):
        where = f"mmap_path={self.mmap_path!r}" if self.mmap_path else f"device={str(self.device)!r}"
        return (
            f"LoomCoupling(num_points={self.num_points}, shape={self.shape}, num_caches={self.num_caches}, "
            f"seed={self.seed}, metric={self.metric!r}, scope={self.scope!r}, group_size={self.group_size}, "
            f"table={self.table!r}, {where})"
        )
