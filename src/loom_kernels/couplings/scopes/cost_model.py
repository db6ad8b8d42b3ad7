"""The cost model behind docs/scaling.md and LoomCoupling's budget warning: the predicted seconds of one
coupling call per scope, from measured solve times (docs/scaling.md derives it and lists the measurements)."""

from __future__ import annotations

# Seconds of the cost matrix + exact assignment of one n-item problem of dimension D, per device kind
# (noise regeneration and communication come on top). CPU: a 2-core Xeon (78 ms at n=1024, 332 ms at
# 2048, 2.3 s at 4096, 10 s at 8192, D=3072): a cost term n^2 D and an assignment term n^3.1. CUDA: the
# H200 assignment of bench/RESULTS.md (25.7 ms at 1024, 105 ms at 2048, 476 ms at 4096, 2.2 s at 8192;
# the cost matrix is ~1 ms there).
_SOLVE_MODEL = {
    "cpu": lambda n, d: 0.064 * (n / 1024) ** 2 * (d / 3072) + 0.0139 * (n / 1024) ** 3.1,
    "cuda": lambda n, d: 0.0257 * (n / 1024) ** 2.15,
}
# A typical training step (forward + backward of the model), seconds per item of the local batch: an
# assumption stated in docs/scaling.md, not a measurement (a 36M-parameter U-Net on CIFAR-sized images).
TYPICAL_STEP_S_PER_ITEM = {"cpu": 5e-3, "cuda": 5e-4}
WARN_FRACTION = 0.25  # LoomCoupling warns when the coupling would take more than this share of a step


def predicted_coupling_seconds(scope: str, world: int, b: int, dim: int, group_size: int, device: str) -> float:
    """The cost model's time of one coupling call on one rank (the slowest rank), in seconds.

    ``global``: one ``W*b`` problem on every rank; ``local``: one ``b`` problem; ``grouped``: each owner
    solves ``ceil(m / W)`` groups of ``~W*b/m`` items, ``m = ceil(W*b / G)``. Example::

        predicted_coupling_seconds("global", 64, 256, 3072, 1024, "cuda")   # ~ 10 s: far too slow
    """
    solve = _SOLVE_MODEL["cuda" if device == "cuda" else "cpu"]
    n = world * b
    if scope == "global":
        return solve(n, dim)
    if scope == "local":
        return solve(b, dim)
    m = max(1, -(-n // group_size))
    return -(-m // world) * solve(-(-n // m), dim)


def budget_warning(scope: str, world: int, b: int, dim: int, group_size: int, device: str) -> str | None:
    """The warning's text when the model predicts more than ``WARN_FRACTION`` of a typical step, else None."""
    kind = "cuda" if device == "cuda" else "cpu"
    t = predicted_coupling_seconds(scope, world, b, dim, group_size, kind)
    step = TYPICAL_STEP_S_PER_ITEM[kind] * b
    if b == 0 or t <= WARN_FRACTION * step:
        return None
    advice = (
        "use scope='grouped' (group_size ~1024 on the CPU, 512-1024 on a GPU)"
        if scope == "global"
        else "lower group_size"
        if scope == "grouped"
        else "lower the per-rank batch"
    )
    return (
        f"LoomCoupling(scope={scope!r}) at W={world} ranks, b={b} per rank, D={dim} is predicted to take "
        f"{t:.3g} s per call on {kind}, more than {WARN_FRACTION:.0%} of a typical {step:.3g} s training step "
        f"(docs/scaling.md has the cost model): {advice}"
    )
