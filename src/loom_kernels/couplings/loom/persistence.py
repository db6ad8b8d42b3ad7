"""LOOM's persistence as plain functions: the constructor's and the state_dict's checks, the checkpoint's
config, and the reading of checkpoints (replicated files and sharded manifests). Writing is the table's own
(``LoomTable.save``); installing a verified table is the coupling's (``LoomCoupling(..., initial=...)`` or
``load_state_dict``).

Every reader returns a :class:`Restored` ``(rows, generator, next_counter)`` with ``rows(a, b)`` the
verified global rows ``a..b-1``; nothing is installed until all of it has been checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ..._io import load_verified
from ..scopes.group import Group, check_whole_world
from ..scopes.partition import DEFAULT_GROUP_SIZE, check_scope
from .seed_stream import check_seed_table
from .tables import check_table_args, mmap_path_for, rows_for
from .tables.shard_files import ShardReader, check_shards

FORMAT_VERSION = 2  # 2: save() stores a checksum (load() verifies it)


class Restored(NamedTuple):
    """A verified checkpoint, ready to install: ``rows(a, b)`` (global rows), generator state, seed counter,
    the condition entries (``cond_term.CondTerm.state()``'s; None in a checkpoint older than them)."""

    rows: Callable
    generator: torch.Tensor
    next_counter: int
    cond: dict | None = None


COND_KEYS = ("cond_weight", "cond_metric", "cond_ratio", "cond_weight_frozen")


def cond_entries(state: dict) -> dict:
    """The condition entries of a state_dict or manifest (checked by the coupling that installs them)."""
    return {k: state[k] for k in COND_KEYS if k in state}


def check_args(num_points, shape, num_caches, seed, scope) -> tuple:
    """Refuse bad ``LoomCoupling`` arguments by name; returns ``shape`` as a tuple."""
    for name, v, low in (("num_points", num_points, 1), ("num_caches", num_caches, 1), ("seed", seed, None)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (low is not None and v < low):
            raise ValueError(f"{name} must be {'a positive' if low else 'an'} int, got {v!r}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(shape) == 0 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape!r}")
    check_scope(scope)
    return shape


def loom_config(num_points: int, shape: tuple, num_caches: int, seed: int, metric: str) -> dict:
    """What a checkpoint must match to be loaded into a coupling."""
    return {"num_points": num_points, "shape": list(shape), "num_caches": num_caches, "seed": seed, "metric": metric}


def config_of(coupling) -> dict:
    """``loom_config`` of a ``LoomCoupling`` (its public settings)."""
    return loom_config(coupling.num_points, coupling.shape, coupling.num_caches, coupling.seed, coupling.metric)


def state_of(coupling, generator: torch.Tensor, next_counter: int) -> dict:
    """A ``LoomCoupling``'s ``state_dict`` but its table kind's entries: the seeds, the slot generator's state,
    the seed counter, the config and the settings a load restores by default."""
    return {
        "version": FORMAT_VERSION,
        "config": config_of(coupling),
        "seeds": coupling.seeds,
        "generator": generator,
        "next_counter": int(next_counter),
        "scope": coupling.scope,
        "group_size": coupling.group_size,
        **coupling.cond_term.state(),  # cond_weight, cond_metric, cond_ratio, cond_weight_frozen
        "mmap_path": coupling.mmap_path,
        "table": coupling.table,
    }


def check_generator(gen, where: str) -> torch.Tensor:
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        raise ValueError(f"{where}['generator'] must be a uint8 tensor (torch.Generator.get_state()), got {gen!r:.80}")
    return gen


def check_state(state, config: dict, rows_needed: tuple) -> Restored:
    """Verify a ``LoomCoupling.state_dict()`` for a coupling of ``config`` holding global rows ``rows_needed``.

    Refuses one made for another configuration (names what differs) and a corrupt one (zeroed, negative or
    duplicated seeds, seeds the stream has not handed out, a counter that would hand seeds out again).
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
    return Restored(lambda a, b: seeds[a - slo : b - slo], gen, state["next_counter"], cond_entries(state))


def check_manifest(path, manifest: dict, config: dict, rows_needed: tuple, grp=None) -> Restored:
    """Verify a sharded checkpoint (any world size) for a coupling of ``config`` holding ``rows_needed``:
    only the shards overlapping those rows are read, each verified, and their union checked (``grp``: the
    group of a sharded load, a collective then)."""
    reader = ShardReader(path, manifest)
    if reader.config != config:
        raise ValueError(f"the sharded checkpoint {os.fspath(path)!r} has config {reader.config}, expected {config}")
    gen, counter = manifest.get("generator"), manifest.get("next_counter")
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        raise ValueError(f"{os.fspath(path)!r}['generator'] must be a uint8 tensor, got {gen!r:.80}")
    lo, hi = rows_needed
    check_shards(reader, lo, hi, config["seed"], counter, grp)
    return Restored(reader.rows, gen, counter, cond_entries(manifest))


def read_checkpoint(path) -> dict:
    """The verified dict saved at ``path`` (a replicated coupling file or a sharded manifest)."""
    state = load_verified(path, "LoomCoupling file", mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{os.fspath(path)!r} is not a LoomCoupling file (no 'config' entry)")
    return state


def is_manifest(state: dict) -> bool:
    """True for a sharded checkpoint's manifest (its seeds are in shard files beside it)."""
    return "save_id" in state


def load_plan(
    path, device, process_group, scope, group_size, mmap_path, table, durability, cond_weight, **cond
) -> tuple:
    """What ``LoomCoupling.load`` builds: ``(constructor kwargs, Restored)``, the checkpoint at ``path`` verified.

    The arguments are ``load``'s (``cond``: ``cond_metric``, ``cond_ratio``); ``None`` (``"auto"`` for
    ``mmap_path``) means "as saved". The constructor's
    own checks of the arguments run first, so a bad argument is named before the checkpoint is read further.
    """
    state = read_checkpoint(path)
    cfg, saved = state["config"], state.get("table", "replicated")
    table = table if table is not None else saved
    kwargs = {
        "num_caches": cfg["num_caches"],
        "seed": cfg["seed"],
        "metric": cfg["metric"],
        "device": device,
        "process_group": process_group,
        "scope": scope if scope is not None else state.get("scope", "global"),
        "group_size": group_size if group_size is not None else state.get("group_size", DEFAULT_GROUP_SIZE),
        "mmap_path": mmap_path_for(table, saved, state.get("mmap_path")) if mmap_path == "auto" else mmap_path,
        "table": table,
        "durability": durability,
        "cond_weight": cond_weight if cond_weight is not None else state.get("cond_weight", 1.0),
    }
    unknown = sorted(set(cond) - {"cond_metric", "cond_ratio"})
    if unknown:
        raise TypeError(f"LoomCoupling.load() got unexpected keyword arguments {unknown}")
    for k, default in (("cond_metric", "sqeuclidean"), ("cond_ratio", 0.5)):
        kwargs[k] = cond[k] if cond.get(k) is not None else state.get(k, default)
    shape = check_args(cfg["num_points"], tuple(cfg["shape"]), kwargs["num_caches"], kwargs["seed"], kwargs["scope"])
    check_table_args(table, kwargs["mmap_path"])
    check_whole_world(process_group, "LoomCoupling")
    shape = tuple(int(s) for s in shape)
    config = loom_config(int(cfg["num_points"]), shape, int(cfg["num_caches"]), int(cfg["seed"]), cfg["metric"])
    rows_needed = rows_for(table, config["num_points"], Group(process_group))
    if is_manifest(state):
        grp = Group(process_group) if table == "sharded" else None  # sharded: a collective check
        restored = check_manifest(path, state, config, rows_needed, grp)
    else:
        restored = check_state(state, config, rows_needed)
    return {"num_points": cfg["num_points"], "shape": tuple(cfg["shape"]), **kwargs}, restored
