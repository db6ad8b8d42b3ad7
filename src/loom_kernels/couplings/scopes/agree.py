"""The agreement of ranks: one small all-gather every coupling makes before its collectives.

What a coupling's ranks compare is a dict of ints (``config``): floats enter as their bits (``float_bits``),
a generator as a hash of its state (``generator_hash``), so equal configurations agree exactly.
"""

from __future__ import annotations

import torch

from .group import Group


def float_bits(value: float) -> int:
    """A float as the int64 of its bits: how a float setting enters the ranks' agreement (ints only)."""
    return int(torch.tensor(float(value), dtype=torch.float64).view(torch.int64))


def generator_hash(gen: torch.Generator) -> int:
    """An int that differs when two generators' states differ (a weighted sum of the state's bytes)."""
    state = gen.get_state().to(torch.int64)
    return int((state * torch.arange(1, len(state) + 1)).sum())


def agree(grp: Group, who: str, sizes: dict, inputs: dict, config: dict, failed: bool = False) -> None:
    """One small all-gather that every rank makes before the call's collectives (nothing on one rank).

    Raises on every rank at once (none is left waiting in a collective) when: a rank ``failed`` its
    own input checks (that rank then raises its own error), the coupling's ``config`` (name -> int)
    differs, the ``sizes`` differ (the first one is the batch size), or an optional input (``inputs``:
    name -> given) is passed on some ranks only. Every rank must pass as many of each.

    Example::

        agree(grp, "MinibatchOTCoupling", {"batch size": b}, {"labels": labels is not None}, {"scope": 0})
    """
    if grp.world == 1:
        return
    vals = [int(failed), *sizes.values(), *(int(v) for v in inputs.values()), *config.values()]
    rows = grp.all_gather_rows(torch.tensor([vals], dtype=torch.int64)).cpu()
    bad_ranks = torch.nonzero(rows[:, 0]).flatten().tolist()
    if bad_ranks:
        if failed:
            return  # the caller raises its own error
        raise ValueError(
            f"rank(s) {bad_ranks} refused their input to {who} (see the error raised there); every rank "
            f"raises so that none waits in a collective"
        )
    # The configuration first: ranks built differently (another scope, say) disagree on the sizes too,
    # and the configuration is what to fix.
    cfg = rows[:, 1 + len(sizes) + len(inputs) :]
    bad = [name for j, name in enumerate(config) if (cfg[:, j] != cfg[0, j]).any()]
    if bad:
        raise ValueError(
            f"{who} differs across ranks ({', '.join(bad)}): build it with the same arguments on "
            f"every rank and resume every rank from the same checkpoint"
        )
    # Optional inputs before sizes: a cond passed on one rank only also differs in its column count,
    # and "passed on some ranks only" is what to fix.
    col = 1 + len(sizes)
    for j, name in enumerate(inputs):
        got = rows[:, col + j]
        if (got != got[0]).any():
            given = torch.nonzero(got).flatten().tolist()
            raise ValueError(
                f"{name} must be passed on every rank or on none: rank(s) {given} passed {name}, "
                f"rank(s) {torch.nonzero(got == 0).flatten().tolist()} did not"
            )
    for j, (name, _) in enumerate(sizes.items()):
        got = rows[:, 1 + j]
        if (got != got[0]).any():
            hint = " (use drop_last=True in the DataLoader/DistributedSampler)" if j == 0 else ""
            what = "a batch of the same size" if j == 0 else f"the same {name}"
            raise ValueError(f"every rank must pass {what} to {who}, got sizes {got.tolist()}{hint}")
