"""scope="grouped" and the subgroup refusal under torch.distributed: gloo processes at W = 2, 4, 8.

Each world runs once (process start-up dominates); workers write their results to files that the tests
compare with independent single-process references: scipy per group for LOOM (``reference_loom_step``),
``MinibatchOTCoupling`` on each group's rows for minibatch OT. Problems are tiny: the machine has 2 cores.
"""

import numpy as np
import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling
from loom_kernels.couplings.scopes.group import count_bytes
from loom_kernels.testing import reference_loom_step

from gloo_ranks import run_rank, spawn
from harness import clustered, per_class_ot, source_rows

pytestmark = pytest.mark.distributed

B, P, SHAPE, CACHES, SEED, STEPS, G = 6, 96, (2, 3), 2, 5, 3, 5
CLASSES, MB_DIM = 3, 7


def _data():
    return clustered(P, SHAPE, 0, shifted=3, classes=CLASSES)


def _global_batches(world):
    g = torch.Generator().manual_seed(world)
    return [torch.randperm(P, generator=g)[: world * B] for _ in range(STEPS)]


def _mb_inputs(world, step):
    g = torch.Generator().manual_seed(1000 * world + step)
    return (
        torch.randn(world * B, MB_DIM, generator=g),
        torch.randn(world * B, MB_DIM, generator=g),
        torch.randint(CLASSES, (world * B,), generator=g),
    )


def _loom_runs(rank, world, labelled):
    data, y = _data()
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope="grouped", group_size=G)
    x0s, stats, sl = [], [], slice(rank * B, (rank + 1) * B)
    with count_bytes() as nbytes:
        for gidx in _global_batches(world):
            idx = gidx[sl]
            x0s.append(c(data[idx], idx, labels=y[idx] if labelled else None)[0])
            stats.append([float(c.stats[k]) for k in ("pre_cost", "post_cost", "swaps")])
    return {
        "seeds": c.seeds.clone(),
        "x0": torch.stack(x0s),
        "gen": c._gen.get_state(),
        "stats": torch.tensor(stats),
        "bytes": dict(nbytes),
    }


def _mb_runs(rank, world):
    out, sl = {}, slice(rank * B, (rank + 1) * B)
    for lab in (False, True):
        c = MinibatchOTCoupling(scope="grouped", group_size=G, seed=3)
        x0s = []
        for step in range(2):
            x1, x0, y = _mb_inputs(world, step)
            x0s.append(c(x1[sl], x0=x0[sl], labels=y[sl] if lab else None)[0])
        out[lab] = (torch.stack(x0s), float(c.stats["post_cost"]))
    return out


def _errors(rank, world):
    """NaN data on one rank only: every rank raises and the table is unchanged; then a subgroup is refused."""
    import torch.distributed as dist

    data, _ = _data()
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope="grouped", group_size=G)
    before, idx = c.seeds.clone(), _global_batches(world)[0][rank * B : (rank + 1) * B]
    x = data[idx].clone()
    if rank == world - 1:
        x[0, 0, 0] = float("nan")
    errors = []
    try:
        c(x, idx)
        errors.append("no error")
    except ValueError as exc:
        errors.append(str(exc))
    untouched = bool(torch.equal(c.seeds, before))
    c(data[idx], idx)  # the group still works
    # W = 4 as two groups of two: a subgroup process_group is refused on every rank, before any collective
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else []
    for scope in ("global", "local", "grouped") if halves else ():
        try:
            LoomCoupling(P, SHAPE, seed=SEED, scope=scope, process_group=halves[rank // 2])
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    if halves:  # minibatch OT has no table: a subgroup is fine and couples within its group
        x1, x0, _ = _mb_inputs(world, 0)
        sl = slice(rank * B, (rank + 1) * B)
        errors.append(MinibatchOTCoupling(process_group=halves[rank // 2])(x1[sl], x0=x0[sl])[0])
    return errors, untouched


def _results(rank, world):
    result = {"loom": _loom_runs(rank, world, False)}
    if world <= 4:
        result["loom_labels"] = _loom_runs(rank, world, True)
        result["mb"] = _mb_runs(rank, world)
        result["errors"] = _errors(rank, world)
    return result


def _worker(rank, world, store, out_dir):
    run_rank(rank, world, store, out_dir, lambda: _results(rank, world))


@pytest.fixture(
    scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)]
)
def world(request, tmp_path_factory):
    w = request.param
    return w, spawn(w, tmp_path_factory.mktemp(f"w{w}"), _worker)


def _groups(n, g):
    """The documented partition, written out: ``m = ceil(n / G)`` groups of balanced sizes (the first
    ``n mod m`` one larger), taking consecutive positions of ``randperm(n, g)``."""
    perm = torch.randperm(n, generator=g)
    m = -(-n // G)
    sizes = [n // m + (j < n % m) for j in range(m)]
    return torch.split(perm, sizes)


def _loom_reference(world, labelled):
    """One process, scipy per group: slots then the partition from the slot generator, each group alone."""
    data, y = _data()
    table = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED).seeds.clone()
    g = torch.Generator().manual_seed(SEED)
    x0s = []
    for gidx in _global_batches(world):
        n = len(gidx)
        slots = torch.randint(CACHES, (n,), generator=g)
        x0 = torch.empty((n, *SHAPE), dtype=torch.float64)
        new = table.clone()
        for pos in _groups(n, g):
            # labels: each class of the group solved alone (the coupling forbids cross-label pairs)
            parts = [pos[y[gidx[pos]] == k] for k in range(CLASSES)] if labelled else [pos]
            for sel in (p for p in parts if len(p)):
                t, x, _ = reference_loom_step(table, data[gidx[sel]], gidx[sel], slots[sel])
                new[gidx[sel]] = torch.from_numpy(t)[gidx[sel]]
                x0[sel] = torch.from_numpy(x)
        table = new
        x0s.append(x0)
    return table, torch.stack(x0s), g.get_state()


@pytest.mark.parametrize("labelled", [False, True])
def test_grouped_loom_equals_each_group_solved_alone(world, labelled):
    w, ranks = world
    if labelled and w > 4:
        pytest.skip("labels are run at W <= 4 only (CI time)")
    table, x0s, gen = _loom_reference(w, labelled)
    key = "loom_labels" if labelled else "loom"
    for r, res in enumerate(ranks):
        got = res[key]
        assert torch.equal(got["seeds"], table), f"rank {r} table differs from the per-group reference"
        assert torch.equal(got["gen"], gen)
        np.testing.assert_allclose(got["x0"].double().numpy(), x0s[:, r * B : (r + 1) * B].numpy(), rtol=0, atol=1e-5)
        assert torch.equal(got["stats"], ranks[0][key]["stats"])
    assert not torch.equal(table, LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED).seeds)


def test_grouped_minibatch_equals_each_group_solved_alone(world):
    w, ranks = world
    if w > 4:
        pytest.skip("minibatch OT is run at W <= 4 only (CI time)")
    for lab in (False, True):
        gen = torch.Generator().manual_seed(3)
        for step in range(2):
            x1, x0, y = _mb_inputs(w, step)
            ref = torch.empty_like(x0)
            for pos in _groups(w * B, gen):
                ref[pos] = x0[pos][per_class_ot(x1[pos], x0[pos], y[pos] if lab else None)]  # scipy per group
            if lab:  # the reference's own contract: noise stays within its class
                src = source_rows(ref, x0)
                assert torch.equal(y[src], y)
            for r, res in enumerate(ranks):
                assert torch.equal(res["mb"][lab][0][step], ref[r * B : (r + 1) * B]), f"rank {r} step {step}"


def test_grouped_bytes_per_rank_stay_b_rows_of_data(world):
    """A rank sends at most its b data rows (and small integers); it receives at most the rows of the groups
    it owns, plus 8 bytes per owned item from every other rank (the replicated table's updates)."""
    w, ranks = world
    d, n = int(np.prod(SHAPE)), w * B
    groups = -(-n // G)  # ceil
    width = -(-groups // w) * -(-n // groups)  # the most items one owner can hold
    # index gather, the owners' seed rows, the agreement row (its config, the condition term's weight, metric,
    # ratio and frozen weight, sizes and the x1/labels shape specs)
    ints = 8 * (B + width + 4) + 8 * 35
    for res in ranks:
        got = res["loom"]["bytes"]
        assert got["sent"] / STEPS <= 4 * B * d + ints
        assert got["received"] / STEPS <= 4 * width * d + (w - 1) * ints


def test_errors_on_every_rank_and_subgroups_refused(world):
    w, ranks = world
    if w > 4:
        pytest.skip("error paths are run at W <= 4")
    for r, res in enumerate(ranks):
        errors, untouched = res["errors"]
        assert "contains NaN or inf" in errors[0] and "every rank" in errors[0], errors[0]
        assert untouched
        if w == 4:
            for msg in errors[1:4]:
                assert "process_group has 2 of the 4 ranks of the default group" in msg, msg
            x1, x0, _ = _mb_inputs(w, 0)
            half = slice((r // 2) * 2 * B, (r // 2 + 1) * 2 * B)
            ref, _ = MinibatchOTCoupling()(x1[half], x0=x0[half])
            assert torch.equal(errors[4], ref[(r % 2) * B : (r % 2 + 1) * B])


@pytest.mark.parametrize("labelled", [False, True])
def test_grouped_single_process_matches_the_reference_and_checkpoints(labelled):
    data, y = _data()
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope="grouped", group_size=G)
    gidx = _global_batches(1)
    x0s = []
    for step, idx in enumerate(gidx):  # one process, b = 6 > G = 5: two groups per step
        x0s.append(c(data[idx], idx, labels=y[idx] if labelled else None)[0])
        if step == 0:
            state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.state_dict().items()}
    table, ref_x0s, gen = _loom_reference(1, labelled)  # scipy per group (and class)
    assert torch.equal(c.seeds, table) and torch.equal(c._gen.get_state(), gen)
    np.testing.assert_allclose(torch.stack(x0s).double().numpy(), ref_x0s.numpy(), rtol=0, atol=1e-5)
    d = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope="grouped", group_size=G)
    d.load_state_dict(state)
    for idx in gidx[1:]:
        d(data[idx], idx, labels=y[idx] if labelled else None)
    assert torch.equal(c.seeds, d.seeds)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        LoomCoupling(P, SHAPE, scope="grouped", group_size=0)
    with pytest.raises(ValueError, match="scope must be one of"):
        MinibatchOTCoupling(scope="groups")
    mb = MinibatchOTCoupling(scope="grouped", group_size=G)
    with pytest.raises(ValueError, match="scope='grouped' needs x0 with exactly b = 4 rows"):
        mb(torch.randn(4, 2), x0=torch.randn(5, 2))


def test_cost_model_warning_once_and_only_past_the_budget(monkeypatch):
    from loom_kernels.couplings.scopes import cost_model as grouped

    assert grouped.budget_warning("grouped", 512, 256, 3072, 1024, "cuda") is None
    assert grouped.budget_warning("local", 512, 256, 3072, 1024, "cuda") is None
    msg = grouped.budget_warning("global", 64, 256, 3072, 1024, "cuda")
    assert "scope='global'" in msg and "W=64" in msg and "use scope='grouped'" in msg
    # the model grows with W for global only; grouped stays flat
    t = [
        grouped.predicted_coupling_seconds(s, w, 256, 3072, 512, "cuda") for s in ("global", "grouped") for w in (8, 64)
    ]
    assert t[1] > 50 * t[0] and t[2] == t[3]
    data, _ = _data()
    idx = torch.arange(8)
    monkeypatch.setitem(grouped.TYPICAL_STEP_S_PER_ITEM, "cpu", 0.0)
    c = LoomCoupling(P, SHAPE, seed=SEED)
    with pytest.warns(UserWarning, match="is predicted to take") as rec:
        for step in range(2):
            c(data[idx + 8 * step], idx + 8 * step)
    assert len([w for w in rec if "predicted" in str(w.message)]) == 1
