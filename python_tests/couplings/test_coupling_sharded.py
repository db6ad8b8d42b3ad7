"""table="sharded": equal to the replicated table bit for bit under gloo (W = 2, 4), checkpoints across world sizes.

Two spawns: W = 4 runs every scope with both tables (with and without labels), then saves; W = 2 loads that
save (as a sharded and as a replicated table) and keeps training. The parent process (W = 1) loads the
W = 4 save too, and checks the refusals (a shard of another save, a missing or corrupted shard). Problems
are tiny and ``P`` is not a multiple of ``W``, so shards have uneven sizes.
"""

import os
import shutil

import pytest
import torch

from loom_kernels.couplings import LoomCoupling

from gloo_ranks import run_rank, spawn
from harness import clustered

pytestmark = pytest.mark.distributed

B, P, SHAPE, CACHES, SEED, STEPS, G, CLASSES = 5, 61, (2, 3), 2, 7, 3, 4, 3
# (scope, group_size): one group of the whole batch leaves all ranks but one without groups (empty all-to-alls)
SCOPES = (("global", G), ("local", G), ("grouped", G), ("grouped", 10**6))


def _data():
    return clustered(P, SHAPE, 1, shifted=3, classes=CLASSES)


def _batches(world, steps, salt=0):
    g = torch.Generator().manual_seed(100 * world + salt)
    return [torch.randperm(P, generator=g)[: world * B] for _ in range(steps)]


def _steps(c, rank, batches, labelled):
    data, y = _data()
    x0s, stats = [], []
    for gidx in batches:
        idx = gidx[rank * B : (rank + 1) * B]
        x0s.append(c(data[idx], idx, labels=y[idx] if labelled else None)[0])
        stats.append(torch.stack([c.stats[k].double() for k in ("pre_cost", "post_cost", "swaps")]))
    return torch.stack(x0s), torch.stack(stats)


def _full_table(c):
    """The whole table as every rank sees it (the shards all-gathered; a replicated table as is)."""
    import torch.distributed as dist

    if c.table == "replicated":
        return c.seeds.clone()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (c.shard_rows, c.seeds.clone()))
    assert [p[0] for p in parts] == sorted(p[0] for p in parts)
    return torch.cat([p[1] for p in parts])


def _record(c, rank, batches, labelled):
    x0, stats = _steps(c, rank, batches, labelled)
    return {
        "x0": x0,
        "stats": stats,
        "gen": c._gen.get_state(),
        "table": _full_table(c),
        "local_rows": c.seeds.shape[0],
    }


def _compare_tables(rank, world):
    out = {}
    for scope in SCOPES:
        for labelled in (False, True):
            for table in ("replicated", "sharded"):
                c = LoomCoupling(
                    P, SHAPE, num_caches=CACHES, seed=SEED, scope=scope[0], group_size=scope[1], table=table
                )
                rec = _record(c, rank, _batches(world, STEPS), labelled)
                c.resample(torch.tensor([3, P - 1]))  # every rank passes the same rows
                rec["resampled"] = _full_table(c)
                c.resample(torch.arange(P))  # every row: each shard's first and last rows included
                rec["resampled_all"] = _full_table(c)
                out[scope, labelled, table] = rec
    return out


def _save_w4(rank, world, out_dir):
    """The grouped sharded coupling after STEPS steps, saved twice at one path (the first save's shards go),
    then a replicated twin saved, and a later save at another path (for the wrong-shard check)."""
    kw = {"num_caches": CACHES, "seed": SEED, "scope": "grouped", "group_size": G}
    sh, rep = LoomCoupling(P, SHAPE, table="sharded", **kw), LoomCoupling(P, SHAPE, **kw)
    for c in (sh, rep):
        _steps(c, rank, _batches(world, STEPS), False)
    sh.save(os.path.join(out_dir, "ckpt.pt"))
    sh.save(os.path.join(out_dir, "ckpt.pt"))
    rep.save(os.path.join(out_dir, "rep.pt"))
    saved = {"table": _full_table(sh), "gen": sh._gen.get_state(), "state": sh.state_dict()}
    _steps(sh, rank, _batches(world, 1, salt=9), False)
    sh.save(os.path.join(out_dir, "later.pt"))
    return saved


def _worker4(rank, world, store, out_dir):
    run_rank(
        rank,
        world,
        store,
        out_dir,
        lambda: {"cmp": _compare_tables(rank, world), "saved": _save_w4(rank, world, out_dir)},
    )


def _worker2(rank, world, store, out_dir, ckpt_dir):
    def body():
        loaded = {
            "sharded": LoomCoupling.load(os.path.join(ckpt_dir, "ckpt.pt"), table="sharded"),
            "replicated": LoomCoupling.load(os.path.join(ckpt_dir, "ckpt.pt"), table="replicated"),
            "from_replicated": LoomCoupling.load(os.path.join(ckpt_dir, "rep.pt"), table="sharded"),
        }
        res = {k: {"at_load": _full_table(c), "gen_at_load": c._gen.get_state()} for k, c in loaded.items()}
        for k, c in loaded.items():
            res[k].update(_record(c, rank, _batches(world, 2, salt=5), True))
        return {"cmp": _compare_tables(rank, world), "loaded": res}

    run_rank(rank, world, store, out_dir, body)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d4, d2 = tmp_path_factory.mktemp("w4"), tmp_path_factory.mktemp("w2")
    w4 = spawn(4, d4, _worker4)
    w2 = spawn(2, d2, _worker2, (str(d4),))
    return {4: w4, 2: w2}, d4


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_replicated_bit_for_bit(runs, world):
    ranks = runs[0][world]
    for scope in SCOPES:
        for labelled in (False, True):
            for r, res in enumerate(ranks):
                rep, sh = res["cmp"][scope, labelled, "replicated"], res["cmp"][scope, labelled, "sharded"]
                what = f"W={world} scope={scope} labels={labelled} rank {r}"
                for key in ("x0", "stats", "gen", "table", "resampled", "resampled_all"):
                    assert torch.equal(rep[key], sh[key]), f"{key} differs: {what}"
                assert sh["local_rows"] in (P // world, P // world + 1), what  # N*K*8/W bytes per rank
            assert torch.equal(
                ranks[0]["cmp"][scope, labelled, "sharded"]["table"],
                ranks[-1]["cmp"][scope, labelled, "sharded"]["table"],
            )
            # the test can fail: the steps changed the table
            init = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED).seeds
            assert not torch.equal(ranks[0]["cmp"][scope, labelled, "sharded"]["table"], init)


def test_save_on_4_load_on_2_and_1(runs):
    (by_world, d4) = runs
    saved = by_world[4][0]["saved"]
    names = sorted(os.listdir(d4))
    shards = [n for n in names if n.startswith("ckpt.pt.")]
    assert len(shards) == 4, names  # the first save's shards were removed by the second
    loaded = by_world[2][0]["loaded"]
    for kind in ("sharded", "replicated", "from_replicated"):
        assert torch.equal(loaded[kind]["at_load"], saved["table"]), kind
        assert torch.equal(loaded[kind]["gen_at_load"], saved["gen"]), kind
    for key in ("x0", "stats", "table", "gen"):  # training on at W = 2: all three agree on every rank
        for r in range(2):
            ref = by_world[2][r]["loaded"]["replicated"][key]
            assert torch.equal(by_world[2][r]["loaded"]["sharded"][key], ref), key
            assert torch.equal(by_world[2][r]["loaded"]["from_replicated"][key], ref), key
    for table in ("sharded", "replicated"):  # W = 1: this process
        c = LoomCoupling.load(d4 / "ckpt.pt", table=table)
        assert c.shard_rows == (0, P) and torch.equal(c.seeds, saved["table"])
        assert torch.equal(c._gen.get_state(), saved["gen"])


def test_bad_shards_and_state_dicts_are_refused(runs, tmp_path):
    (by_world, d4) = runs
    for name in os.listdir(d4):
        if name.startswith(("ckpt.pt", "later.pt")):
            shutil.copy(d4 / name, tmp_path / name)
    shard = {p: sorted(n for n in os.listdir(tmp_path) if n.startswith(p + ".")) for p in ("ckpt.pt", "later.pt")}
    # a shard of another save (the later one) under this save's name
    shutil.copy(tmp_path / shard["later.pt"][1], tmp_path / shard["ckpt.pt"][1])
    with pytest.raises(ValueError, match="does not belong to the checkpoint .*save_id"):
        LoomCoupling.load(tmp_path / "ckpt.pt")
    os.unlink(tmp_path / shard["later.pt"][2])
    with pytest.raises(FileNotFoundError, match=r"rank 2 of 4\) of the checkpoint"):
        LoomCoupling.load(tmp_path / "later.pt")
    shutil.copy(d4 / shard["later.pt"][2], tmp_path / shard["later.pt"][2])
    first = tmp_path / shard["later.pt"][0]
    blob = bytearray(first.read_bytes())
    at = blob.find(torch.load(first)["seeds"][0, 0].numpy().tobytes())  # a stored seed: a flipped bit in it
    blob[at] ^= 0x01
    first.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="seed-table shard .*fails its checksum"):
        LoomCoupling.load(tmp_path / "later.pt", table="replicated")
    # rank 0's state_dict of W = 4 holds rows [0, 15): a coupling of one process needs them all
    c = LoomCoupling(P, SHAPE, num_caches=CACHES, seed=SEED, scope="grouped", group_size=G, table="sharded")
    with pytest.raises(ValueError, match=r"holds rows \[0, 15\) of a table sharded over 4 ranks.*save\(\)"):
        c.load_state_dict(by_world[4][0]["saved"]["state"])
    with pytest.raises(ValueError, match="table must be one of"):
        LoomCoupling(P, SHAPE, table="shard")
    with pytest.raises(ValueError, match="mmap_path is for the replicated table only"):
        LoomCoupling(P, SHAPE, table="sharded", mmap_path=tmp_path / "t.npy")
