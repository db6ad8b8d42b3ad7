"""LoomCoupling and MinibatchOTCoupling under torch.distributed: 2 CPU processes with gloo, compared with one process.

One spawn runs both scopes and the error paths (process start-up dominates the cost); the workers
write their results to files that the test compares with a single-process run.
"""

import numpy as np
import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling
from loom_kernels.testing import reference_loom_step

from gloo_ranks import run_rank, spawn
from harness import source_rows

pytestmark = pytest.mark.distributed

WORLD, B, P, SHAPE, CACHES, SEED, STEPS = 2, 8, 64, (2, 3), 3, 13, 12
MB_DIMS = (6, 40)  # D < W*B: ranks exchange their data; D > W*B: their cost rows
CLASSES = 3


def _labels():
    return torch.randint(CLASSES, (P,), generator=torch.Generator().manual_seed(2))


def _mb_data(dim):
    g = torch.Generator().manual_seed(dim)
    return torch.randn(WORLD * B, dim, generator=g), torch.randint(CLASSES, (WORLD * B,), generator=g)


def _mb_gen(rank):
    return torch.Generator().manual_seed(100 + rank)


def _minibatch_runs(rank):
    """Two calls per (dim, labels?, scope), each rank with its own noise generator."""
    out, sl = {}, slice(rank * B, (rank + 1) * B)
    for dim in MB_DIMS:
        x1, y = _mb_data(dim)
        for lab in (False, True):
            for scope in ("global", "local"):
                c = MinibatchOTCoupling(generator=_mb_gen(rank), scope=scope)
                x0s = [c(x1[sl], labels=y[sl] if lab else None)[0] for _ in range(2)]
                out[dim, lab, scope] = (torch.stack(x0s), float(c.stats["post_cost"]))
    return out


def _loom_label_runs(rank, data):
    out, y = {}, _labels()
    for scope in ("global", "local"):
        c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope=scope)
        x0s = []
        for gidx in _global_batches():
            idx = gidx[rank * B : (rank + 1) * B]
            x0s.append(c(data[idx], idx, labels=y[idx])[0])
        out[scope] = {"seeds": c.seeds.clone(), "x0": torch.stack(x0s)}
    return out


def _label_errors(rank, data):
    """Labels on one rank only, bad labels on one rank, unequal MinibatchOT batches: every rank raises."""
    errors, idx = [], torch.tensor([10, 20]) + rank
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED)
    before = c.seeds.clone()
    mb = MinibatchOTCoupling()
    y = torch.tensor([0, 1])
    calls = [
        lambda: c(data[idx], idx, labels=y if rank == 0 else None),
        lambda: mb(data[idx], labels=y if rank == 0 else None),
        lambda: c(data[idx], idx, labels=y if rank == 0 else y.float()),
        lambda: mb(data[idx], labels=y if rank == 0 else y[:1]),
        lambda: mb(data[: 2 + rank]),
    ]
    for call in calls:
        try:
            call()
            errors.append("no error")
        except (TypeError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    c(data[idx], idx, labels=y)  # the group still works after the errors
    mb(data[idx], labels=y)
    return errors, bool(torch.equal(c.seeds[:10], before[:10]))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((P, *SHAPE), generator=g) * 0.5
    x[: P // 2] += 2.0
    return x


def _global_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    while len(out) < STEPS:
        perm = torch.randperm(P, generator=g)
        out += [perm[a : a + WORLD * B] for a in range(0, P - WORLD * B + 1, WORLD * B)]
    return out[:STEPS]


def _results(rank):
    """One rank's runs: both scopes, the error paths, minibatch OT and labels."""
    import torch.distributed as dist

    data, result = _data(), {}
    for scope in ("global", "local"):
        c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope=scope)
        x0s, stats = [], []
        for gidx in _global_batches():
            idx = gidx[rank * B : (rank + 1) * B]
            x0, x1 = c(data[idx], idx)
            assert torch.equal(x1, data[idx])
            x0s.append(x0)
            stats.append([float(c.stats[k]) for k in ("pre_cost", "post_cost", "swaps")])
        result[scope] = {
            "seeds": c.seeds.clone(),
            "x0": torch.stack(x0s),
            "gen": c._gen.get_state(),
            "stats": torch.tensor(stats),
        }
    # an explicit process group behaves like the default one
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, process_group=dist.new_group(list(range(WORLD))))
    for gidx in _global_batches():
        idx = gidx[rank * B : (rank + 1) * B]
        c(data[idx], idx)
    assert torch.equal(c.seeds, result["global"]["seeds"]), "explicit process_group differs from the default"
    # error paths: every rank must raise the same error (no rank left waiting in a collective)
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED)
    before = c.seeds.clone()
    errors = []
    for idx in (
        torch.tensor([5, 6, 7]) + rank,  # index 6 and 7 on both ranks: duplicates globally
        torch.tensor([1, 2, 3, 4, 5])[: 3 + rank],
    ):  # batch sizes differ across ranks
        try:
            c(data[idx], idx)
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    idx = torch.tensor([10, 20]) + rank
    c(data[idx], idx)  # the group still works after the errors
    for bad in (
        LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED + rank),  # seed=rank: a classic
        LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope=("global", "local")[rank]),
    ):
        try:
            bad(data[idx], idx)
            errors.append("no error")
        except ValueError as exc:
            errors.append(str(exc))
    c.resample(torch.tensor([rank]))  # tables now differ: refused, not silently coupled
    try:
        c(data[idx], idx)
        errors.append("no error")
    except ValueError as exc:
        errors.append(str(exc))
    result["errors"] = errors
    result["untouched"] = bool(torch.equal(c.seeds[[5, 6, 7, 8]], before[[5, 6, 7, 8]]))
    result["mb"] = _minibatch_runs(rank)
    result["loom_labels"] = _loom_label_runs(rank, data)
    result["label_errors"] = _label_errors(rank, data)
    return result


def _worker(rank, world, store, out_dir):
    run_rank(rank, world, store, out_dir, lambda: _results(rank))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(WORLD, tmp_path_factory.mktemp("ddp"), _worker)


def test_global_scope_equals_one_process_on_the_global_batch(ranks):
    data = _data()
    single = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED)
    x0s, stats = [], []
    for gidx in _global_batches():
        x0, _ = single(data[gidx], gidx)
        x0s.append(x0)
        stats.append([float(single.stats[k]) for k in ("pre_cost", "post_cost", "swaps")])
    x0s = torch.stack(x0s)
    for r, res in enumerate(ranks):
        g = res["global"]
        assert torch.equal(g["seeds"], single.seeds), f"rank {r} table differs from the single process"
        assert torch.equal(g["gen"], single._gen.get_state())
        np.testing.assert_allclose(g["x0"].numpy(), x0s[:, r * B : (r + 1) * B].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(g["stats"].numpy(), np.array(stats), rtol=1e-5)
    assert not torch.equal(single.seeds, LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED).seeds)


def test_local_scope_tables_agree_and_apply_every_local_solution(ranks):
    data = _data()
    table = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED).seeds.clone()
    g = torch.Generator().manual_seed(SEED)
    for step, gidx in enumerate(_global_batches()):
        slots = torch.randint(CACHES, (WORLD * B,), generator=g)  # one shared stream over the global batch
        new = table.clone()
        for r in range(WORLD):
            sl = slice(r * B, (r + 1) * B)
            upd, x0, _ = reference_loom_step(table, data[gidx[sl]], gidx[sl], slots[sl])
            rows = gidx[sl]
            new[rows] = torch.from_numpy(upd)[rows]
            np.testing.assert_allclose(ranks[r]["local"]["x0"][step].double().numpy(), x0, rtol=0, atol=1e-6)
        table = new
    for r, res in enumerate(ranks):
        assert torch.equal(res["local"]["seeds"], table), f"rank {r} local-scope table is wrong"
        assert torch.equal(res["local"]["gen"], g.get_state())
    assert not torch.equal(ranks[0]["local"]["seeds"], ranks[0]["global"]["seeds"])


def test_errors_are_raised_on_every_rank(ranks):
    for res in ranks:
        dup, size, seed, scope, table = res["errors"]
        assert "indices must be distinct within the global batch of all 2 ranks: index 6 appears 2 times" in dup
        assert "every rank must pass a batch of the same size" in size and "[3, 4]" in size
        assert "LoomCoupling differs across ranks (seed, slot generator, seed table)" in seed
        assert "LoomCoupling differs across ranks (scope)" in scope
        assert "LoomCoupling differs across ranks (seed table)" in table
        assert res["untouched"]


# ---- labels and MinibatchOTCoupling (issue 11) ------------------------------------------------------------


@pytest.mark.parametrize("lab", [False, True])
@pytest.mark.parametrize("dim", MB_DIMS)
def test_minibatch_global_scope_equals_one_process_on_the_concatenated_batch(ranks, dim, lab):
    x1, y = _mb_data(dim)
    gens = [_mb_gen(r) for r in range(WORLD)]
    for step in range(2):
        x0 = torch.cat([torch.randn((B, dim), generator=g) for g in gens])  # what each rank drew
        single = MinibatchOTCoupling()
        ref, _ = single(x1, x0=x0, labels=y if lab else None)
        for r, res in enumerate(ranks):
            got, post = res["mb"][dim, lab, "global"]
            assert torch.equal(got[step], ref[r * B : (r + 1) * B]), f"rank {r} differs from one process"
            if step == 1:
                assert post == pytest.approx(float(single.stats["post_cost"]), rel=1e-6)
        if lab:
            col = source_rows(ref, x0)
            assert torch.equal(y[col], y)
        for r, res in enumerate(ranks):  # scope="local": each rank alone
            sl = slice(r * B, (r + 1) * B)
            loc, _ = MinibatchOTCoupling()(x1[sl], x0=x0[sl], labels=y[sl] if lab else None)
            assert torch.equal(res["mb"][dim, lab, "local"][0][step], loc)
    assert not torch.equal(ranks[0]["mb"][dim, lab, "global"][0], ranks[0]["mb"][dim, lab, "local"][0])


def test_loom_labels_global_equals_one_process_and_classes_keep_their_seeds(ranks):
    data, y = _data(), _labels()
    single = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED)
    owned = {k: sorted(single.seeds[y == k].flatten().tolist()) for k in range(CLASSES)}
    x0s = torch.stack([single(data[g], g, labels=y[g])[0] for g in _global_batches()])
    for r, res in enumerate(ranks):
        assert torch.equal(res["loom_labels"]["global"]["seeds"], single.seeds), f"rank {r} table differs"
        np.testing.assert_allclose(
            res["loom_labels"]["global"]["x0"].numpy(), x0s[:, r * B : (r + 1) * B].numpy(), rtol=0, atol=1e-6
        )
        for scope in ("global", "local"):
            seeds = res["loom_labels"][scope]["seeds"]
            assert torch.equal(seeds, ranks[0]["loom_labels"][scope]["seeds"])
            assert {k: sorted(seeds[y == k].flatten().tolist()) for k in range(CLASSES)} == owned, scope
    assert not torch.equal(ranks[0]["loom_labels"]["global"]["seeds"], ranks[0]["global"]["seeds"])


def test_label_errors_are_raised_on_every_rank(ranks):
    one_rank = "labels must be passed on every rank or on none: rank(s) [0] passed labels, rank(s) [1] did not"
    for r, res in enumerate(ranks):
        (loom_one, mb_one, loom_bad, mb_bad, mb_size), untouched = res["label_errors"]
        assert one_rank in loom_one and one_rank in mb_one
        if r == 1:  # the rank with bad labels raises its own error, the other is told which rank refused
            assert "TypeError: labels must have an integer dtype" in loom_bad
            assert "labels must have shape (b,) = (2,)" in mb_bad
        else:
            assert "rank(s) [1] refused their input to LoomCoupling" in loom_bad
            assert "rank(s) [1] refused their input to MinibatchOTCoupling" in mb_bad
        assert "every rank must pass a batch of the same size to MinibatchOTCoupling, got sizes [2, 3]" in mb_size
        assert untouched
