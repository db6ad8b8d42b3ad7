"""LOOM's arguments and persistence: the constructor's and the state_dict's checks and the reading of
checkpoints (replicated files and sharded manifests). Writing is the table's own (``LoomTable.save``);
installing a verified table is the coupling's.

Every reader returns ``(rows, generator state, next_counter)`` with ``rows(a, b)`` the verified global rows
``a..b-1``; nothing is installed until all of it has been checked.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .._io import load_verified
from .distributed import Group
from .grouped import DEFAULT_GROUP_SIZE
from .journal import DEFAULT_DURABILITY
from .seed_stream import check_seed_table
from .sharded import ShardReader, check_shards
from .tables import mmap_path_for, rows_for

FORMAT_VERSION = 2  # 2: save() stores a checksum (load() verifies it)


def check_args(num_points, shape, num_caches, seed, scope, scopes) -> tuple:
    """Refuse bad ``LoomCoupling`` arguments by name; returns ``shape`` as a tuple."""
    for name, v, low in (("num_points", num_points, 1), ("num_caches", num_caches, 1), ("seed", seed, None)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (low is not None and v < low):
            raise ValueError(f"{name} must be {'a positive' if low else 'an'} int, got {v!r}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(shape) == 0 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    if scope not in scopes:
        raise ValueError(f"scope must be one of {scopes}, got {scope!r}")
    return shape


def loom_config(num_points: int, shape: tuple, num_caches: int, seed: int, metric: str) -> dict:
    """What a checkpoint must match to be loaded into a coupling."""
    return {"num_points": num_points, "shape": list(shape), "num_caches": num_caches, "seed": seed, "metric": metric}


def check_generator(gen, where: str) -> torch.Tensor:
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        raise ValueError(f"{where}['generator'] must be a uint8 tensor (torch.Generator.get_state()), got {gen!r:.80}")
    return gen


def check_state(state, config: dict, rows_needed: tuple) -> tuple:
    """Verify a ``LoomCoupling.state_dict()`` for a coupling of ``config`` holding global rows ``rows_needed``.

    Refuses one made for another configuration (names what differs) and a corrupt one (zeroed, negative or
    duplicated seeds, seeds the stream has not handed out, a counter that would hand seeds out again).
    Returns ``(rows, generator state, next_counter)``.
    """
    if not isinstance(state, dict):
        raise ValueError(f"not a LoomCoupling state_dict: expected a dict, got {type(state).__name__}")
    missing = [k for k in ("config", "seeds", "generator", "next_counter") if k not in state]
    if missing:
        raise ValueError(f"not a LoomCoupling state_dict: missing keys {missing}")
    theirs = dict(state["config"])
    theirs["shape"] = list(theirs.get("shape", []))
    diff = {k: (theirs.get(k), config[k]) for k in config if theirs.get(k) != config[k]}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r} vs this coupling {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"LoomCoupling state_dict does not match this coupling's configuration ({detail})")
    seeds = state["seeds"]
    slo, shi = (int(v) for v in state.get("shard_rows", (0, config["num_points"])))
    expected = (shi - slo, config["num_caches"])
    if not isinstance(seeds, torch.Tensor) or tuple(seeds.shape) != expected or seeds.dtype != torch.int64:
        got = (tuple(seeds.shape), seeds.dtype) if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ValueError(f"state_dict['seeds'] must be an int64 tensor of shape {expected}, got {got}")
    lo, hi = rows_needed
    if not slo <= lo <= hi <= shi:
        raise ValueError(
            f"state_dict['seeds'] holds rows [{slo}, {shi}) of a table sharded over {state.get('world')} ranks, but "
            f"this coupling needs rows [{lo}, {hi}): move a sharded table to another world size or layout with "
            f"save() and LoomCoupling.load()"
        )
    gen = check_generator(state["generator"], "state_dict")
    check_seed_table(seeds, config["seed"], state["next_counter"])
    return (lambda a, b: seeds[a - slo : b - slo]), gen, state["next_counter"]


def check_manifest(path, manifest: dict, config: dict, rows_needed: tuple, grp=None) -> tuple:
    """Verify a sharded checkpoint (any world size) for a coupling of ``config`` holding ``rows_needed``:
    only the shards overlapping those rows are read, each verified, and their union checked (``grp``: the
    group of a sharded load, a collective then). Returns ``(rows, generator, counter)``."""
    reader = ShardReader(path, manifest)
    if reader.config != config:
        raise ValueError(f"the sharded checkpoint {os.fspath(path)!r} has config {reader.config}, expected {config}")
    gen, counter = manifest.get("generator"), manifest.get("next_counter")
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        raise ValueError(f"{os.fspath(path)!r}['generator'] must be a uint8 tensor, got {gen!r:.80}")
    lo, hi = rows_needed
    check_shards(reader, lo, hi, config["seed"], counter, grp)
    return reader.rows, gen, counter


def read_checkpoint(path) -> dict:
    """The verified dict saved at ``path`` (a replicated coupling file or a sharded manifest)."""
    state = load_verified(path, "LoomCoupling file", mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{os.fspath(path)!r} is not a LoomCoupling file (no 'config' entry)")
    return state


def is_manifest(state: dict) -> bool:
    """True for a sharded checkpoint's manifest (its seeds are in shard files beside it)."""
    return "save_id" in state


def serialized(method):
    """Run ``method`` under the coupling's lock: threads sharing one coupling take turns on the table."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class LoomPersistence:
    """LoomCoupling's state_dict, save and load (a mixin: the coupling's table, generator and counter)."""

    def _config(self):
        return loom_config(self.num_points, self.shape, self.num_caches, self.seed, self.metric)

    def state_dict(self) -> dict:
        """Seeds, slot-generator state, seed counter and config (tensors, ints, strings only).

        ``seeds`` is the live table (not a copy), as in ``nn.Module.state_dict``; with ``table="sharded"``
        this rank's rows ``shard_rows`` (load it on the same rank of the same world size; ``save``/``load``
        move a sharded table to another world size).
        """
        state = {
            "version": FORMAT_VERSION,
            "config": self._config(),
            "seeds": self.seeds,
            "generator": self._gen.get_state(),
            "next_counter": int(self._next_counter),
            "scope": self.scope,
            "group_size": self.group_size,
            "cond_weight": self.cond_weight,
            "mmap_path": self.mmap_path,
            "table": self.table,
        }
        state.update(self._table.state())
        return state

    @serialized
    def load_state_dict(self, state: dict):
        """Restore a ``state_dict()``; refuses one made for another configuration (names what differs)
        and a corrupt one (zeroed, negative or duplicated seeds, seeds the stream has not handed out,
        a counter that would hand seeds out again). A memory-mapped table gets a new file, filled
        before it is renamed over the old one."""
        self._restore(*check_state(state, self._config(), self._rows_needed()))

    def _rows_needed(self) -> tuple:
        """The global rows this rank's table holds (or will hold, before it is built)."""
        return rows_for(self.table, self.num_points, Group(self.process_group))

    def _restore(self, rows, gen: torch.Tensor, next_counter: int):
        """Install a verified table (``rows(a, b)``: global rows), generator state and seed counter."""
        self._gen.set_state(gen.cpu())
        self._next_counter = int(next_counter)
        if self._table is None:  # from load(): nothing to keep
            self._table = self._create_table(overwrite=True, rows=rows)
        else:
            self._table.replace(rows)
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
        cond_weight: float | None = None,
    ):
        """Rebuild a coupling saved with ``save``; ``device=None`` keeps the CPU.

        ``scope``, ``group_size``, ``cond_weight`` and ``table`` default to the saved ones.

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
        state = read_checkpoint(path)
        cfg, saved = state["config"], state.get("table", "replicated")
        table = table if table is not None else saved
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
            mmap_path=mmap_path_for(table, saved, state.get("mmap_path")) if mmap_path == "auto" else mmap_path,
            table=table,
            durability=durability,
            cond_weight=cond_weight if cond_weight is not None else state.get("cond_weight", 1.0),
        )
        if is_manifest(state):
            grp = Group(coupling.process_group) if table == "sharded" else None  # sharded: a collective check
            with coupling._lock:
                coupling._restore(*check_manifest(path, state, coupling._config(), coupling._rows_needed(), grp))
        else:
            coupling.load_state_dict(state)
        return coupling
