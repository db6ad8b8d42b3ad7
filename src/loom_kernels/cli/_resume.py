"""``--resume`` on the training command line: what happens without a checkpoint, and a resume whose options
differ from the checkpoint's, named by option before anything is loaded into the model or the coupling."""

from __future__ import annotations

import os

from ..checkpoint import load_checkpoint
from ._errors import CliError, say

# metadata key -> option; the model spec's keys -> option (num_classes: --conditional)
_META = {"data": "--data", "n": "--points", "holdout": "--holdout", "flip": "--flip", "coupling": "--coupling",
         "num_caches": "--num-caches", "metric": "--metric"}  # fmt: skip
_SPEC = {"kind": "--model", "hidden": "--hidden", "depth": "--depth", "channels": "--channels",
         "channel_mult": "--channel-mult", "num_classes": "--conditional"}  # fmt: skip
_CONFIG = {"batch_size": "--batch-size", "seed": "--seed", "precision": "--precision"}


def _shown(opt: str, value) -> str:
    if isinstance(value, bool) or opt == "--conditional":
        return opt if value else f"no {opt}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"{opt} {value}"


def refuse_overwrite(ckpt: str) -> None:
    """Without ``--resume``, an existing checkpoint is never trained over."""
    if os.path.exists(ckpt):
        raise CliError(f"--out: {ckpt} exists; add --resume to continue that run, or choose another --out")


def check(args, ckpt: str, meta: dict, config: dict) -> bool:
    """True: resume from ``ckpt``; False: start fresh (said on stderr). Raises :class:`CliError` naming each
    option whose value differs from the run in ``ckpt`` (``meta``/``config``: this run's, as they would be saved).
    """
    if not os.path.exists(ckpt):
        if args.resume == "must":
            raise CliError(
                f"--resume must: there is no checkpoint {ckpt}; check --out, or drop --resume to start a new run"
            )
        say(f"--resume: there is no checkpoint {ckpt} yet: starting a new run from step 0")
        return False
    ck = load_checkpoint(ckpt, map_location="cpu")
    old_meta, old_cfg = ck.get("metadata") or {}, ck.get("config") or {}
    diffs = []  # (option now, option in the checkpoint)
    for key, opt in _META.items():
        if key in old_meta and old_meta[key] != meta.get(key):
            diffs.append((_shown(opt, meta.get(key)), _shown(opt, old_meta[key])))
    old_spec, spec = old_meta.get("model") or {}, meta.get("model") or {}
    for key, opt in _SPEC.items():
        if (
            key in old_spec
            and old_spec.get(key) != spec.get(key)
            and (key == "kind" or old_spec.get("kind") == spec.get("kind"))
        ):
            diffs.append((_shown(opt, spec.get(key)), _shown(opt, old_spec[key])))
    for key, opt in _CONFIG.items():
        if key in old_cfg and old_cfg[key] != config.get(key):
            diffs.append((_shown(opt, config.get(key)), _shown(opt, old_cfg[key])))
    if diffs:
        now = "; ".join(f"{new} (the checkpoint has {old})" for new, old in diffs)
        fix = " ".join(old if not old.startswith("no ") else "without " + old[3:] for _, old in diffs)
        raise CliError(
            f"{now}: {ckpt} (step {ck.get('step')}) cannot be resumed with other data, coupling, model or batch "
            f"settings; resume with {fix}, or start a new run in another --out"
        )
    return True
