"""LOOM's persistence: the state_dict's checks and the reading of checkpoints (replicated files and sharded
manifests). Writing is the table's own (``LoomTable.save``); installing a verified table is the coupling's.

Every reader returns ``(rows, generator state, next_counter)`` with ``rows(a, b)`` the verified global rows
``a..b-1``; nothing is installed until all of it has been checked.
"""
from __future__ import annotations

import os

import torch

from .._io import load_verified
from .seed_stream import check_seed_table
from .sharded import ShardReader, shard_path

FORMAT_VERSION = 2  # 2: save() stores a checksum (load() verifies it)


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
    return (lambda a, b: seeds[a - slo:b - slo]), gen, state["next_counter"]


def check_manifest(path, manifest: dict, config: dict, rows_needed: tuple) -> tuple:
    """Verify a sharded checkpoint (any world size) for a coupling of ``config`` holding ``rows_needed``:
    only the shards overlapping those rows are read, each verified. Returns ``(rows, generator, counter)``."""
    reader = ShardReader(path, manifest)
    if reader.config != config:
        raise ValueError(f"the sharded checkpoint {os.fspath(path)!r} has config {reader.config}, expected {config}")
    gen, counter = manifest.get("generator"), manifest.get("next_counter")
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        raise ValueError(f"{os.fspath(path)!r}['generator'] must be a uint8 tensor, got {gen!r:.80}")
    lo, hi = rows_needed
    for r, part in reader.parts(lo, hi):
        check_seed_table(part, config["seed"], counter, where=shard_path(path, reader.save_id, r, reader.world))
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
