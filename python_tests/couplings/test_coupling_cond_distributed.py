"""``cond=`` and ``return_indices`` under torch.distributed: 2 gloo ranks (issue 21 item 6).

One spawn runs every body; the tests compare the ranks' results with single-process references: the
coupling on the concatenated global batch (global scope), each group solved alone (grouped minibatch OT),
one process on the global batch (grouped LOOM: the same partition from the same slot generator). The
errors (cond on one rank only, a bad cond on one rank, unequal condition widths or weights,
return_indices on one rank only) must be raised on every rank, with every table unchanged. C2OT's adaptive
weight (issue 32): every rank freezes LOOM's to one number, one process's on the global batch, and it stays.
"""

import numpy as np
import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling, SinkhornCoupling
from loom_kernels.couplings.c2ot import adaptive_cond_weight, c2ot_search_weight, cond_pair_cost
from loom_kernels.couplings.scopes.partition import Partition

from gloo_ranks import run_rank, spawn

pytestmark = pytest.mark.distributed

W, B, P, SHAPE, DC, G, STEPS, WEIGHT = 2, 8, 64, (2, 3), 3, 5, 3, 0.6


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(P, *SHAPE, generator=g), torch.randn(P, DC, generator=g), torch.randint(3, (P,), generator=g)


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randperm(P, generator=g)[: W * B] for _ in range(STEPS)]


def _mb_inputs(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(W * B, 5, generator=g), torch.randn(W * B, 5, generator=g), torch.randn(W * B, DC, generator=g)


LOOMS = {
    "global": dict(),
    "grouped": dict(scope="grouped", group_size=G),
    "grouped-sharded": dict(scope="grouped", group_size=G, table="sharded"),
    "global-sharded": dict(table="sharded"),
}


def _loom_runs(rank, labelled):
    data, cond, y = _data()
    out, sl = {}, slice(rank * B, (rank + 1) * B)
    for name, kw in LOOMS.items():
        c = LoomCoupling(P, SHAPE, num_caches=2, seed=4, cond_weight=WEIGHT, **kw)
        x0s, perms = [], []
        for gidx in _batches():
            idx = gidx[sl]
            x0, _, perm = c(data[idx], idx, cond=cond[idx], labels=y[idx] if labelled else None, return_indices=True)
            x0s.append(x0)
            perms.append(perm)
        # a sharded table holds this rank's rows only: gather the full table for the comparison
        seeds = c.seeds.clone() if "sharded" not in name else _full_table(c)
        out[name] = {"seeds": seeds, "x0": torch.stack(x0s), "perm": torch.stack(perms)}
    return out


def _full_table(c):
    import torch.distributed as dist

    parts = [None] * W
    dist.all_gather_object(parts, (c.shard_rows, c.seeds.clone()))
    return torch.cat([s for _, s in sorted(parts, key=lambda p: p[0][0])])


def _mb_runs(rank):
    out, sl = {}, slice(rank * B, (rank + 1) * B)
    for scope in ("global", "grouped"):
        c = MinibatchOTCoupling(scope=scope, group_size=G, seed=3, cond_weight=WEIGHT)
        res = []
        for step in range(2):
            x1, x0, cond = _mb_inputs(step)
            res.append(c(x1[sl], x0=x0[sl], cond=cond[sl], return_indices=True))
        out[scope] = [(x0, perm) for x0, _, perm in res]
    return out


def _errors(rank):
    data, cond, y = _data()
    idx = torch.arange(B) + rank * B
    c = LoomCoupling(P, SHAPE, num_caches=2, seed=4, scope="grouped", group_size=G)
    cg = LoomCoupling(P, SHAPE, num_caches=2, seed=4)
    mb = MinibatchOTCoupling(scope="grouped", group_size=G)
    before = (c.seeds.clone(), cg.seeds.clone())
    ci = cond[idx]
    calls = {
        "loom cond one rank": lambda: c(data[idx], idx, cond=ci if rank == 0 else None),
        "loom-global cond one rank": lambda: cg(data[idx], idx, cond=ci if rank == 0 else None),
        "mb cond one rank": lambda: mb(data[idx], cond=ci if rank == 0 else None),
        "loom bad cond": lambda: c(data[idx], idx, cond=ci if rank == 0 else ci.long()),
        "loom nan cond": lambda: cg(data[idx], idx, cond=ci if rank == 0 else ci * float("nan")),
        "mb bad cond": lambda: mb(data[idx], cond=ci if rank == 0 else ci[:3]),
        "loom widths": lambda: c(data[idx], idx, cond=ci if rank == 0 else ci[:, :1]),
        "loom weights": lambda: LoomCoupling(P, SHAPE, cond_weight=1.0 + rank)(data[idx], idx, cond=ci),
        "mb weights": lambda: MinibatchOTCoupling(cond_weight=1.0 + rank)(data[idx], cond=ci),
        "loom ratios": lambda: LoomCoupling(P, SHAPE, cond_weight="adaptive", cond_ratio=0.2 + 0.1 * rank)(
            data[idx], idx, cond=ci
        ),
        "sinkhorn metrics": lambda: SinkhornCoupling(cond_metric=("sqeuclidean", "cosine")[rank])(data[idx], cond=ci),
        "loom return_indices one rank": lambda: c(data[idx], idx, cond=ci, return_indices=rank == 0),
        "mb return_indices one rank": lambda: mb(data[idx], cond=ci, return_indices=rank == 0),
        # #34 item 3: feature shapes and dtypes that differ across ranks (gloo aborted, or a half-filled buffer)
        "mb dtype": lambda: MinibatchOTCoupling()(data[idx] if rank == 0 else data[idx].double()),
        "mb features": lambda: MinibatchOTCoupling()(data[idx] if rank == 0 else data[idx][:, :1]),
        "mb labels dtype": lambda: MinibatchOTCoupling()(data[idx], labels=y[idx] if rank == 0 else y[idx].int()),
        "loom dtype": lambda: cg(data[idx] if rank == 0 else data[idx].double(), idx),
        "sinkhorn dtype": lambda: SinkhornCoupling()(data[idx] if rank == 0 else data[idx].double()),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = "no error"
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    unchanged = torch.equal(c.seeds, before[0]) and torch.equal(cg.seeds, before[1])
    c(data[idx], idx, cond=ci)  # the group still works after the errors
    mb(data[idx], cond=ci, return_indices=True)
    return errors, unchanged


# ---- C2OT's adaptive weight (issue 32 item 3): LOOM's frozen at its first call, Sinkhorn's per call ----------

C2OT_P = 40
C2OT_KW = dict(cond_weight="adaptive", cond_ratio=0.35, cond_metric="cosine", seed=4)
RULE_KWS = {"adaptive": C2OT_KW, "c2ot": dict(cond_weight="c2ot", cond_ratio=0.2, cond_metric="cosine", seed=4)}
C2OT_LOOMS = {"global": {}, "grouped": dict(scope="grouped", group_size=G), "sharded": dict(table="sharded")}


def _c2ot_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(C2OT_P, *SHAPE, generator=g), torch.randn(C2OT_P, 3, generator=g)


def _c2ot_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randperm(C2OT_P, generator=g)[: W * B] for _ in range(STEPS)]


def _c2ot_body(rank):
    import torch.distributed as dist

    data, cond = _c2ot_data()
    sl = slice(rank * B, (rank + 1) * B)
    out = {}
    for rule, name in ((rule, name) for rule in RULE_KWS for name in C2OT_LOOMS):
        kw = C2OT_LOOMS[name]
        c = LoomCoupling(C2OT_P, SHAPE, **RULE_KWS[rule], **kw)
        weights = []
        for step, gidx in enumerate(_c2ot_batches()):
            idx = gidx[sl]
            scale = 10.0 ** (step * (1 - 2 * rank))  # the ranks' later batches differ in scale: nothing moves
            c(data[idx] * (1 if step == 0 else scale), idx, cond=cond[idx])
            weights.append(float(c.stats["cond_weight"]))
        parts = [None] * W
        dist.all_gather_object(parts, (c.shard_rows, c.seeds.clone()))
        seeds = torch.cat([s for _, s in sorted(parts, key=lambda p: p[0][0])]) if name == "sharded" else c.seeds
        out[name if rule == "adaptive" else f"{rule} {name}"] = {"weights": weights, "seeds": seeds.clone()}
    x1 = torch.randn(W * B, 4, generator=torch.Generator().manual_seed(2))
    s = SinkhornCoupling(0.1, cond_weight="adaptive", cond_ratio=0.6, generator=torch.Generator().manual_seed(3 + rank))
    s(x1[sl] * (1 + rank), cond=cond[: W * B][sl])
    out["sinkhorn"] = float(s.stats["cond_weight"])
    s = SinkhornCoupling(0.1, cond_weight="c2ot", cond_ratio=0.2, generator=torch.Generator().manual_seed(3 + rank))
    s(x1[sl] * (1 + rank), cond=cond[: W * B][sl])
    out["sinkhorn c2ot"] = float(s.stats["cond_weight"])
    return out


def _worker(rank, world, store, out_dir):
    run_rank(
        rank,
        world,
        store,
        out_dir,
        lambda: {
            "loom": _loom_runs(rank, False),
            "loom_labels": _loom_runs(rank, True),
            "mb": _mb_runs(rank),
            "errors": _errors(rank),
            "c2ot": _c2ot_body(rank),
        },
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(W, tmp_path_factory.mktemp("cond"), _worker)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("name", sorted(LOOMS))
def test_loom_cond_equals_one_process_on_the_global_batch(ranks, name, labelled):
    data, cond, y = _data()
    kw = {k: v for k, v in LOOMS[name].items() if k != "table"}
    single = LoomCoupling(P, SHAPE, num_caches=2, seed=4, cond_weight=WEIGHT, **kw)
    x0s, perms = [], []
    for gidx in _batches():
        x0, _, perm = single(
            data[gidx], gidx, cond=cond[gidx], labels=y[gidx] if labelled else None, return_indices=True
        )
        x0s.append(x0)
        perms.append(perm)
    x0s, perms = torch.stack(x0s), torch.stack(perms)
    key = "loom_labels" if labelled else "loom"
    for r, res in enumerate(ranks):
        got = res[key][name]
        assert torch.equal(got["seeds"], single.seeds), f"rank {r}: table differs from one process"
        np.testing.assert_allclose(got["x0"].numpy(), x0s[:, r * B : (r + 1) * B].numpy(), rtol=0, atol=1e-5)
        assert torch.equal(got["perm"], perms[:, r * B : (r + 1) * B])
    plain = LoomCoupling(P, SHAPE, num_caches=2, seed=4, **kw)  # the condition changed the outcome
    for gidx in _batches():
        plain(data[gidx], gidx, labels=y[gidx] if labelled else None)
    assert not torch.equal(single.seeds, plain.seeds)


def test_minibatch_global_equals_one_process_and_perm_indexes_the_concatenated_noise(ranks):
    for step in range(2):
        x1, x0, cond = _mb_inputs(step)
        ref, _, ref_perm = MinibatchOTCoupling(cond_weight=WEIGHT)(x1, x0=x0, cond=cond, return_indices=True)
        for r, res in enumerate(ranks):
            got, perm = res["mb"]["global"][step]
            assert torch.equal(got, ref[r * B : (r + 1) * B]) and torch.equal(perm, ref_perm[r * B : (r + 1) * B])
            assert torch.equal(got, x0[perm])


def test_minibatch_grouped_equals_each_group_solved_alone(ranks):
    gen = torch.Generator().manual_seed(3)
    for step in range(2):
        x1, x0, cond = _mb_inputs(step)
        ref = torch.empty_like(x0)
        for pos in Partition(W * B, B, W, G, gen).groups():
            ref[pos] = MinibatchOTCoupling(cond_weight=WEIGHT)(x1[pos], x0=x0[pos], cond=cond[pos])[0]
        for r, res in enumerate(ranks):
            got, perm = res["mb"]["grouped"][step]
            assert torch.equal(got, ref[r * B : (r + 1) * B]), f"rank {r} step {step}"
            assert torch.equal(got, x0[perm])


def test_cond_errors_are_raised_on_every_rank_and_tables_unchanged(ranks):
    for r, res in enumerate(ranks):
        errors, unchanged = res["errors"]
        assert unchanged, f"rank {r}: a refused call changed a table"
        assert all(e != "no error" for e in errors.values()), errors
        for name in ("loom cond one rank", "loom-global cond one rank", "mb cond one rank"):
            assert "cond must be passed on every rank or on none: rank(s) [0] passed cond" in errors[name]
        for name in ("loom return_indices one rank", "mb return_indices one rank"):
            assert "return_indices must be passed on every rank or on none" in errors[name]
        assert "same cond columns" in errors["loom widths"]
        assert "differs across ranks (cond_weight)" in errors["loom weights"]
        assert "differs across ranks (cond_weight)" in errors["mb weights"]
        assert "differs across ranks (cond_ratio)" in errors["loom ratios"]
        assert "differs across ranks (cond_metric)" in errors["sinkhorn metrics"]
        for name, want in [
            ("mb dtype", "rank 0: (b, 2, 3) float32; rank 1: (b, 2, 3) float64"),
            ("mb features", "rank 0: (b, 2, 3) float32; rank 1: (b, 1, 3) float32"),
            ("mb labels dtype", "labels must have the same feature shape and dtype on every rank"),
            ("loom dtype", "x1 must have the same feature shape and dtype on every rank to LoomCoupling"),
            ("sinkhorn dtype", "x1 must have the same feature shape and dtype on every rank to SinkhornCoupling"),
        ]:
            assert want in errors[name], (name, errors[name])
        if r == 1:  # the rank with the bad cond raises its own error; the other is told which rank refused
            assert "TypeError: cond must have a floating dtype" in errors["loom bad cond"]
            assert "cond contains NaN or inf" in errors["loom nan cond"]
            assert "cond must have shape (b, Dc) or (b,) with b = 8" in errors["mb bad cond"]
        else:
            for name in ("loom bad cond", "loom nan cond", "mb bad cond"):
                assert "rank(s) [1] refused their input" in errors[name]


@pytest.mark.parametrize("rule", sorted(RULE_KWS))
@pytest.mark.parametrize("name", sorted(C2OT_LOOMS))
def test_c2ot_loom_ranks_freeze_one_weight_equal_to_one_process(ranks, name, rule):
    """Both weight rules; "c2ot": the thresholds of every rank's blocks gathered (padded), one order statistic."""
    data, cond = _c2ot_data()
    kw = {k: v for k, v in C2OT_LOOMS[name].items() if k != "table"}
    single = LoomCoupling(C2OT_P, SHAPE, **RULE_KWS[rule], **kw)
    key = name if rule == "adaptive" else f"{rule} {name}"
    batches = _c2ot_batches()
    single(data[batches[0]], batches[0], cond=cond[batches[0]])
    w0 = float(single.stats["cond_weight"])
    for r, res in enumerate(ranks):
        got = res["c2ot"][key]["weights"]
        assert got == [got[0]] * STEPS, f"rank {r}: the weight moved {got}"
        assert abs(got[0] - w0) <= 1e-12 * w0, (r, got[0], w0)  # the global batch's pairs, summed in another order
    assert ranks[0]["c2ot"][key]["weights"] == ranks[1]["c2ot"][key]["weights"]  # bit for bit across ranks
    for step, gidx in enumerate(batches[1:], 1):
        x1 = data[gidx].clone()
        x1[:B] *= 10.0**step
        x1[B:] *= 10.0**-step
        single(x1, gidx, cond=cond[gidx])
    for r, res in enumerate(ranks):
        assert torch.equal(res["c2ot"][key]["seeds"], single.seeds), f"rank {r}: table differs from one process"


@pytest.mark.parametrize(
    "key, rule, ratio, rtol",
    [("sinkhorn", adaptive_cond_weight, 0.6, 1e-5), ("sinkhorn c2ot", c2ot_search_weight, 0.2, 1e-9)],
)
def test_c2ot_sinkhorn_weight_is_the_global_batch_one(ranks, key, rule, ratio, rtol):
    # both weight rules ("adaptive", "c2ot") over the gathered batch of both ranks, not each rank's own
    _, cond = _c2ot_data()
    x1 = torch.randn(W * B, 4, generator=torch.Generator().manual_seed(2))
    x1[B:] *= 2
    noise = torch.cat([torch.randn(B, 4, generator=torch.Generator().manual_seed(3 + r)) for r in range(W)])
    c = cond[: W * B].double()
    ref = rule(torch.cdist(x1.double(), noise.double()) ** 2, cond_pair_cost(c, c, "sqeuclidean"), ratio)
    assert ranks[0]["c2ot"][key] == ranks[1]["c2ot"][key]
    assert abs(ranks[0]["c2ot"][key] - ref) <= rtol * ref
