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


_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_SPEC_DIMS = 6  # feature dimensions sent as they are; more are folded into the last (and still compared)


def _spec_code(t) -> list:
    """A tensor's feature shape (all but the batch dimension) and dtype as ``2 + _SPEC_DIMS`` ints (-1: absent)."""
    if t is None:
        return [-1] * (2 + _SPEC_DIMS)
    feat = list(t.shape[1:])
    if len(feat) > _SPEC_DIMS:
        feat = [*feat[: _SPEC_DIMS - 1], hash(tuple(feat[_SPEC_DIMS - 1 :])) & (2**62 - 1)]
    dtype = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else 99
    return [dtype, t.ndim, *feat, *([-1] * (_SPEC_DIMS - len(feat)))]


def _spec_text(code: list) -> str:
    dtype, ndim, *feat = code
    name = str(_DTYPES[dtype]).replace("torch.", "") if 0 <= dtype < len(_DTYPES) else "another dtype"
    return f"(b, {', '.join(str(d) for d in feat[: max(ndim - 1, 0)])}) {name}".replace("(b, )", "(b,)")


def agree(
    grp: Group, who: str, sizes: dict, inputs: dict, config: dict, failed: bool = False, specs: dict | None = None
) -> None:
    """One small all-gather that every rank makes before the call's collectives (nothing on one rank).

    Raises on every rank at once (none is left waiting in a collective) when: a rank ``failed`` its
    own input checks (that rank then raises its own error), the coupling's ``config`` (name -> int)
    differs, the ``sizes`` differ (the first one is the batch size), or an optional input (``inputs``:
    name -> given) is passed on some ranks only, or a tensor of ``specs`` (name -> tensor or None) has another
    feature shape or dtype on some rank (``x1`` of other shapes would be gathered into a half-filled buffer;
    gloo aborts on some). Every rank must pass as many of each.

    Example::

        agree(grp, "MinibatchOTCoupling", {"batch size": b}, {"labels": labels is not None}, {"scope": 0})
    """
    if grp.world == 1:
        return
    specs = specs or {}
    codes = [c for t in specs.values() for c in _spec_code(None if failed else t)]
    vals = [int(failed), *sizes.values(), *(int(v) for v in inputs.values()), *config.values(), *codes]
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
    cfg = rows[:, 1 + len(sizes) + len(inputs) : 1 + len(sizes) + len(inputs) + len(config)]
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
    at = 1 + len(sizes) + len(inputs) + len(config)
    width = 2 + _SPEC_DIMS
    for j, name in enumerate(specs):
        got = rows[:, at + j * width : at + (j + 1) * width]
        if (got != got[0]).any() and not (got[:, 0] == -1).any():  # -1: not passed (the inputs check above)
            seen = "; ".join(f"rank {r}: {_spec_text(got[r].tolist())}" for r in range(len(got)))
            raise ValueError(f"{name} must have the same feature shape and dtype on every rank to {who}, got {seen}")
    for j, (name, _) in enumerate(sizes.items()):
        got = rows[:, 1 + j]
        if (got != got[0]).any():
            hint = " (use drop_last=True in the DataLoader/DistributedSampler)" if j == 0 else ""
            what = "a batch of the same size" if j == 0 else f"the same {name}"
            raise ValueError(f"every rank must pass {what} to {who}, got sizes {got.tolist()}{hint}")
