"""LOOM-CFM: a persistent data-noise assignment improved by every minibatch.

Davtyan, Dadi, Cevher, Favaro, "Faster Inference of Flow-Based Generative Models via Improved
Data-Noise Coupling" (LOOM-CFM, "Looking Out Of Minibatch"), ICLR 2025: keep the minibatch
assignments and compose them, tau_k = omega_k o tau_{k-1} (their Algorithm 1).

This module is the conductor: argument checks, the slot draw and the agreement of ranks, then one of the
steps of ``steps.py`` over the table (``tables/``: replicated or sharded behind one interface);
index checks live in ``indices.py``, checkpoint checks and reading in ``persistence.py``.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..._device import resolve_device
from ..base import Coupling, check_metric
from ..scopes.cost_model import budget_warning
from ..scopes.group import Group, check_whole_world, to_device
from ..scopes.partition import DEFAULT_GROUP_SIZE, check_group_size
from ..scopes.solve import cost_dtype
from . import persistence
from .agreement import agree_call, fingerprint
from .cond_term import CondTerm
from .indices import IndexCheck, check_inputs, resample_rows
from .seed_stream import seed_values
from .steps import Batch, LoomSpec, step_for
from .tables import LoomTable, check_table_args, make_table, rows_for
from .tables.journal import DEFAULT_DURABILITY, check_durability


def serialized(method):
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

    Conditions: with ``cond (b, Dc)`` or ``(b,)`` (floating, finite, on ``x1``'s device) the noise an item
    holds carries that item's condition, so giving item ``i`` the noise item ``j`` holds costs
    ``metric(x1_i, noise_j) + cond_weight * ||cond_i - cond_j||^2`` (``cond_weight``: constructor keyword,
    default 1.0; 0 is the unconditioned coupling bit for bit; a huge weight exchanges noise only between
    equal conditions, like ``labels``, which may be given too: labels forbid, cond penalises). Keeping
    one's own noise has no penalty, so the table's total cost still never increases (a matching is applied
    only when its cost, penalty included, is below the current pairs'); the batch ``stats`` include the
    penalty. Distributed: ``cond`` travels like ``labels`` (all-gathered in the global scope, routed with
    the data in the grouped one) and must be passed on every rank or on none. C2OT's options (``c2ot.py``):
    ``cond_metric="cosine"`` (``1 - cos(cond_i, cond_j)``) and ``cond_weight="adaptive"``: the weight at which
    the condition is the fraction ``cond_ratio`` in (0, 1) of the mean cost of the independent pairs, or
    ``"c2ot"`` (C2OT's own ``search_for_w``, ``c2ot.c2ot_search_weight``; ``cond_ratio=None``: 0.5 / 0.05), computed
    ONCE, at the first call whose conditions differ, then frozen (minibatch OT sets it per batch; LOOM's table
    is one problem, improved call after call, so it keeps one cost: ``cond_term.py``), saved and restored with
    the table, the same on every rank, in ``stats["cond_weight"]``. ``oversample > 1`` is refused: the noises
    are the table's seeds, there are no fresh rows to oversample.

    Permutation: ``return_indices=True`` returns ``(x0, x1, perm)``, ``perm (b,)`` int64: ``x0[i]`` is the
    noise that the item at batch position ``perm[i]`` held before the call (positions in the global batch
    of ``W * b`` items, rank order, except ``scope="local"``: this rank's batch), so fields that travel with
    the noise regroup as ``field[perm]``.

    Indices: each data point may appear at most once per (global) batch, else two items would write
    the same table entry: duplicates raise ``ValueError``. Augmented views (flips, crops) get their
    own index, e.g. ``i + len(dataset)`` with ``num_points = 2 * len(dataset)``. ``indices`` may be on
    the table's device or on the CPU. A refused batch (bad indices, NaN data) leaves the table
    unchanged; the slot generator has advanced, as on every rank. A matching costlier than the current
    pairs (the solver's float tolerance) is never applied, so the monotone total is exact.

    Distributed: with a process group of size ``W > 1`` (``process_group`` or the default group, which
    it must span: a subgroup is refused), every rank calls the coupling with its own batch of the same
    size ``b``. ``scope="global"`` couples the global batch of ``W * b`` items exactly, ``"local"`` each
    rank's batch alone (all updates reach every table), ``"grouped"`` random groups of at most
    ``group_size`` items solved by owner ranks in parallel (each group as one process would solve it
    alone); ``steps.py`` says what travels, docs/scaling.md what to choose at 8 to 512 GPUs. Noise
    is never sent. Call ``resample`` with the same arguments on every rank.

    Tables: ``mmap_path`` keeps the table in a ``.npy`` file (numpy memmap, 10^8+ points; preallocated,
    locked while the coupling lives, every call journaled so a crash leaves the last completed call or
    the one before: docs/guarantees.md); the constructor refuses an existing file unless
    ``overwrite=True``; resume with ``LoomCoupling.load(checkpoint, mmap_path=...)``; under DDP give each
    rank its own file. ``table="sharded"`` keeps on each rank only its block of rows (``shard_rows``,
    ``8 * num_points * num_caches / W`` bytes, in memory), results equal to the replicated table's bit
    for bit; ``save`` writes one file per rank plus a manifest, loadable on any world size as either kind.

    ``initial``: a verified checkpoint (``persistence.Restored``) installed instead of the seed stream's
    table (what ``load`` passes). Threads: calls, ``resample``, ``save`` and ``load_state_dict`` take a
    lock, so threads sharing one coupling take turns.

    ``stats`` after each call (0-dim tensors on the device, read with ``float()``): ``pre_cost`` and
    ``post_cost`` (mean pair cost before/after, over the coupled batch), ``swaps`` (items whose noise
    changed), with ``cond`` ``cond_weight`` (the weight used).

    Shapes: ``x1 (b, *shape)`` floating, ``indices (b,)`` integer -> ``(x0, x1)``, ``x0`` like ``x1``. The
    noise comes from the table, so the protocol's ``x0=`` must be None.

    Example::

        coupling = LoomCoupling(1000, (2,), num_caches=2, seed=0)
        x0, x1 = coupling(torch.randn(64, 2), torch.randperm(1000)[:64])
        coupling.save("coupling.pt"); coupling = LoomCoupling.load("coupling.pt")
    """

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
        cond_weight: float | str = 1.0,
        cond_metric: str = "sqeuclidean",
        cond_ratio: float | None = None,
        oversample: int = 1,
        initial: persistence.Restored | None = None,
    ):
        shape = persistence.check_args(num_points, shape, num_caches, seed, scope)
        check_table_args(table, mmap_path)
        check_whole_world(process_group, "LoomCoupling")
        self.group_size = check_group_size(group_size)
        self.num_points, self.num_caches, self.seed = int(num_points), int(num_caches), int(seed)
        self.shape = tuple(int(s) for s in shape)
        self.metric = check_metric(metric)
        self.cond_term = CondTerm(cond_weight, cond_metric, cond_ratio, oversample)
        self.cond_weight, self.cond_metric, self.cond_ratio = (self.cond_term.setting, *self.cond_term.options)
        self.device = resolve_device(device)
        self.process_group, self.scope, self.table = process_group, scope, table
        self.mmap_path = os.fspath(mmap_path) if mmap_path is not None else None
        self.durability = check_durability(durability)
        # The slot generator lives on the CPU: its state is a portable byte tensor, the same on every
        # device and rank, which keeps checkpoints and DDP ranks in lockstep.
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)
        self._next_counter = self.num_points * self.num_caches  # first unused seed number
        self._lock = threading.Lock()
        self._budget_checked = False  # the cost-model warning is given once, at the first call
        self._spec = LoomSpec(self.shape, self.metric, self.device, self.group_size, self._gen, self.cond_term)
        self.stats = {}
        self._table: LoomTable | None = None
        if initial is None:
            self._table = self._create_table(overwrite)
        else:  # a verified checkpoint (load): a file is built from its rows, then renamed in
            self._restore(initial)

    # -- table storage --------------------------------------------------------------------------

    @property
    def seeds(self) -> torch.Tensor:
        """The live ``(num_points, num_caches)`` int64 table (write through calls and ``resample`` only);
        with ``table="sharded"`` this rank's rows ``shard_rows`` only."""
        return self._table.seeds

    @property
    def shard_rows(self) -> tuple:
        """``(lo, hi)``: the global rows ``seeds`` holds (all of them for a replicated table)."""
        return self._table.rows_held

    @property
    def table_device(self) -> torch.device:
        """Where ``seeds`` lives: ``device``, or the CPU for a memory-mapped table."""
        return self._table.device

    def _create_table(self, overwrite: bool, rows=None) -> LoomTable:
        k = self.num_caches
        rows = rows or (lambda a, b: seed_values(self.seed, a * k, (b - a) * k).reshape(b - a, k))
        return make_table(
            self.table,
            Group(self.process_group),
            self.num_points,
            k,
            self.device,
            rows,
            mmap_path=self.mmap_path,
            overwrite=overwrite,
            durability=self.durability,
        )

    def flush(self):
        """Persist a memory-mapped table to disk and fold its journal in (no-op for an in-memory table)."""
        if self._table is not None:
            self._table.flush()

    def close(self):
        """Flush a memory-mapped table and release its file lock (another coupling may then open it)."""
        if self._table is not None:
            self._table.close()

    # -- the coupling ---------------------------------------------------------------------------

    def _draw_slots(self, n: int) -> torch.Tensor:
        if self.num_caches == 1:
            return torch.zeros(n, dtype=torch.int64)
        return torch.randint(self.num_caches, (n,), generator=self._gen, dtype=torch.int64)

    @serialized
    def __call__(
        self, x1: torch.Tensor, indices=None, *, x0=None, labels=None, cond=None, return_indices: bool = False
    ) -> tuple:
        """Couple ``x1 (b, *shape)`` with dataset indices ``indices (b,)`` (and ``labels (b,)``, ``cond (b, Dc)``).

        Returns ``(x0, x1)`` (``(x0, x1, perm)`` with ``return_indices=True``): ``x0[i]`` is the noise
        paired with ``x1[i]``."""
        grp = Group(self.process_group)
        try:
            indices, labels, cond = check_inputs(self, x1, indices, x0, labels, cond, return_indices)
        except (TypeError, ValueError):
            self._agree(grp, None, None, labels=None, cond=None, return_indices=False)  # the other ranks raise too
            raise
        b = x1.shape[0]
        self._agree(grp, b, x1, labels, cond, return_indices)
        g_idx = grp.gather(indices, grp.cdev)  # left on the comm device: validated after the solve's sync
        self._warn_budget(grp.world, b)
        # One shared slot stream over the global batch: identical generator states on all ranks.
        slots = to_device(self._draw_slots(grp.world * b), self.table_device)
        if b == 0:
            self.stats = {}
            empty = x1.new_empty(x1.shape)
            return (empty, x1, torch.zeros(0, dtype=torch.int64, device=x1.device)) if return_indices else (empty, x1)
        batch = self._batch(grp, x1, g_idx, slots, labels, cond, return_indices)
        x0, stats, perm = step_for(self.scope, grp.world)(self._table, grp, batch, self._spec)
        self.stats = self.cond_term.finish(stats, batch.cond is not None)  # an adaptive weight is frozen here
        x0 = x0.reshape(x1.shape).to(x1.dtype)
        return (x0, x1, perm) if return_indices else (x0, x1)

    def _agree(self, grp, b, x1, labels, cond, return_indices) -> None:
        agree_call(grp, b, x1, labels, cond, return_indices, lambda: fingerprint(self, self._gen, self._table))

    def _batch(self, grp, x1, g_idx, slots, labels, cond, return_indices) -> Batch:
        """The step's view of this call: the data in the cost dtype, the table rows, slots and checks."""
        b = x1.shape[0]
        check = IndexCheck(g_idx, self.num_points, grp.world)
        return Batch(
            x1.flatten(1).to(cost_dtype(x1.dtype)),
            to_device(check.safe, self.table_device),
            slots,
            labels,
            slice(grp.rank * b, (grp.rank + 1) * b),
            check.after_solve,
            cond=None if self.cond_weight == 0.0 else cond,  # weight 0: nothing added, nothing sent
            want_perm=return_indices,
        )

    def _warn_budget(self, world, b):
        if self._budget_checked or b == 0:
            return
        self._budget_checked = True
        scope = "local" if self.scope == "local" or world == 1 and self.scope == "global" else self.scope
        msg = budget_warning(scope, world, b, int(np.prod(self.shape)), self.group_size, self.device.type)
        if msg:
            warnings.warn(msg, stacklevel=4)

    # -- resampling -----------------------------------------------------------------------------

    @serialized
    def resample(self, indices=None):
        """Draw fresh seeds for the rows ``indices`` (all rows when ``None``), every cache slot.

        New seeds come from the same deterministic stream as the initial ones (keyed by ``seed``), so
        they are distinct from every seed the coupling has ever held, and every DDP rank that makes
        the same call gets the same table. Rows not named keep their seeds.

        Example::

            coupling.resample(torch.tensor([3, 7]))   # rows 3 and 7 get new noise
        """
        self._next_counter = resample_rows(self._table, self.seed, self._next_counter, self.num_points, indices)

    # -- persistence (the checks and the format: persistence.py) --------------------------------

    def state_dict(self) -> dict:
        """Seeds, slot-generator state, seed counter and config (tensors, ints, strings only).

        ``seeds`` is the live table (not a copy), as in ``nn.Module.state_dict``; with ``table="sharded"``
        this rank's rows ``shard_rows`` (load it on the same rank of the same world size; ``save``/``load``
        move a sharded table to another world size).
        """
        state = persistence.state_of(self, self._gen.get_state(), self._next_counter)
        state.update(self._table.state())
        return state

    @serialized
    def load_state_dict(self, state: dict):
        """Restore a ``state_dict()``; refuses one made for another configuration (names what differs)
        and a corrupt one (zeroed, negative or duplicated seeds, seeds the stream has not handed out,
        a counter that would hand seeds out again). A memory-mapped table gets a new file, filled
        before it is renamed over the old one."""
        rows_needed = rows_for(self.table, self.num_points, Group(self.process_group))
        self._restore(persistence.check_state(state, persistence.config_of(self), rows_needed))

    def _restore(self, restored: persistence.Restored):
        """Install a verified table, then its generator state and counter: a failed table write changes nothing."""
        install_cond = self.cond_term.restorer(restored.cond)  # checked first: a mismatch changes nothing
        if self._table is None:  # from the constructor: nothing to keep
            self._table = self._create_table(overwrite=True, rows=restored.rows)
        else:
            self._table.replace(restored.rows)
        self._gen.set_state(restored.generator.cpu())
        self._next_counter = int(restored.next_counter)
        install_cond()
        self.flush()

    @serialized
    def save(self, path: str | os.PathLike):
        """Write ``state_dict()`` and its checksum to ``path`` atomically (temp file, fsync, rename, fsync
        of the directory). A crash mid-save leaves the previous file intact; ``load`` verifies the checksum.
        A sharded table writes one file per rank and a manifest at ``path`` (a collective).

        Example: ``coupling.save("ckpt/coupling.pt")``.
        """
        self._table.save(Group(self.process_group), path, self.state_dict())

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
        cond_weight: float | str | None = None,
        **cond,
    ):
        """Rebuild a coupling saved with ``save``; ``device=None`` keeps the CPU.

        ``scope``, ``group_size``, ``cond_weight`` (``cond``: ``cond_metric``, ``cond_ratio``; a frozen adaptive
        weight is restored) and ``table`` ("replicated" or "sharded") default to the saved ones. A sharded
        checkpoint (a manifest at ``path``, one shard file per saving rank beside it) loads on any world size,
        as either kind; every rank reads only the shards overlapping its rows, each verified (checksum, save id).

        ``mmap_path="auto"`` memory-maps the table again at the path it was saved from (None: in memory):
        that file is replaced by the checkpoint's table (a new file, renamed in once filled), unless a
        live coupling holds it (``TableInUseError``). The checkpoint file itself is never modified;
        its checksum and contents are verified first. ``durability``: of that memory-mapped table, as in
        the constructor (not stored in checkpoints: it is how this process runs, like ``device``). Example::

            coupling = LoomCoupling.load("ckpt/coupling.pt", device="cuda")
        """
        args = (path, device, process_group, scope, group_size, mmap_path, table, durability, cond_weight)
        kwargs, restored = persistence.load_plan(*args, **cond)
        return cls(**kwargs, initial=restored)

    def __repr__(self):
        where = f"mmap_path={self.mmap_path!r}" if self.mmap_path else f"device={str(self.device)!r}"
        return (
            f"LoomCoupling(num_points={self.num_points}, shape={self.shape}, num_caches={self.num_caches}, "
            f"seed={self.seed}, metric={self.metric!r}, scope={self.scope!r}, group_size={self.group_size}, "
            f"table={self.table!r}, cond_weight={self.cond_weight!r}, {where})"
        )
