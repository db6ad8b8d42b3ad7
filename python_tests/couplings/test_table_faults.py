"""The memory-mapped seed table under hostile conditions (issue 23): concurrent creators of one new path, a
journal left by another table, a journal damaged in the middle, a damaged table file with a journal beside
it, forked workers holding the lock, a seed duplicated across the shards of a sharded checkpoint, and the
durability option.

Crashes are real: a forked child writes through a ``SeedTable`` (numpy only) and kills itself with SIGKILL.
``-m slow`` runs the long race variant.
"""

import json
import os
import signal
import subprocess
import sys
import traceback
import warnings

import numpy as np
import pytest
import torch

from loom_kernels.checkpoint import atomic_save
from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.loom.seed_stream import seed_values
from loom_kernels.couplings.loom.tables import file_lock
from loom_kernels.couplings.loom.tables import journal as journal_mod
from loom_kernels.couplings.loom.tables.replicated import ReplicatedTable as SeedTable
from loom_kernels.couplings.loom.tables.shard_files import SHARD_KIND, shard_path

P, K = 256, 2


def _rows(a, b):
    return seed_values(7, a * K, (b - a) * K).reshape(b - a, K)


def _writes(n, salt=0, size=32):
    """``n`` deterministic writes ``(rows, slots, values)`` of ``size`` entries each."""
    g = np.random.default_rng(salt)
    return [
        (
            torch.from_numpy(g.choice(P, size, replace=False)),
            torch.from_numpy(g.integers(0, K, size)),
            torch.from_numpy(g.integers(1, 2**62, size)),
        )
        for _ in range(n)
    ]


def _expected(writes, start=None):
    t = torch.from_numpy(_rows(0, P)) if start is None else start.clone()
    for r, s, v in writes:
        t[r, s] = v
    return t


def _crash(fn):
    """Run ``fn()`` in a forked child that then dies by SIGKILL (no close, no flush: the journal stays)."""
    pid = os.fork()
    if pid == 0:
        try:
            keep = fn()  # noqa: F841 - alive until the kill: a collected table would close and fold its journal
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, "the crashed run failed before its kill"


def _crashed_run(path, writes, create=True, torn=None):
    """A run that creates (or opens) ``path``, makes ``writes``, optionally ``torn`` bytes of one more record
    reach the journal, and is killed."""

    def run():
        t = SeedTable.create(path, (P, K), _rows) if create else SeedTable.open(path)
        for w in writes:
            t.write(*w)
        if torn is not None:
            os.write(t._journal(), torn)
        return t

    _crash(run)


def _records(jpath):
    """Byte offsets ``(start, end)`` of each record of a journal (past its header)."""
    return journal_mod.record_spans(open(jpath, "rb").read())


def _open_seeds(path, **kw):
    t = SeedTable.open(path, **kw)
    try:
        return t.seeds.clone()
    finally:
        t.close()


# ---- item 1: concurrent creators of one new path --------------------------------------------------------

RACE = r"""
import json, os, sys
import torch
from loom_kernels.couplings.loom.seed_stream import seed_values
from loom_kernels.couplings.loom.tables.file_lock import TableInUseError
from loom_kernels.couplings.loom.tables.replicated import ReplicatedTable as SeedTable
n, rounds, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = lambda a, b: seed_values(1, 2 * a, 2 * (b - a)).reshape(b - a, 2)
for r in range(rounds):
    path = os.path.join(d, f"t{r}.npy")
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    end_r, end_w = os.pipe()
    kids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.read(go_r, 1)  # every creator starts at once
            try:
                t = SeedTable.create(path, (4096, 2), rows)
                t.write(torch.tensor([i]), torch.tensor([0]), torch.tensor([10**12 + i]))
                msg = f"won {i}\n"
            except TableInUseError:
                t, msg = None, "in use\n"
            except BaseException as exc:  # reported, so the parent never waits for a dead creator
                t, msg = None, f"error {type(exc).__name__}: {exc}".replace("\n", " ") + "\n"
            os.write(res_w, msg.encode())
            os.read(end_r, 1)  # winners hold the table until every creator has tried
            if t is not None:
                t.close()
            os._exit(0)
        kids.append(pid)
    os.write(go_w, b"x" * n)
    got = b""
    while got.count(b"\n") < n:
        got += os.read(res_r, 4096)
    os.write(end_w, b"x" * n)
    for pid in kids:
        os.waitpid(pid, 0)
    t = SeedTable.open(path)
    winner = [int(x.split()[1]) for x in got.decode().splitlines() if x.startswith("won")]
    slot = int(t.seeds[winner[0], 0]) - 10**12 if len(winner) == 1 else None
    t.close()
    print(json.dumps([sorted(got.decode().splitlines()), slot, sorted(os.listdir(d))]), flush=True)
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
"""


def _race(tmp_path, creators, rounds):
    script = tmp_path / "race.py"
    script.write_text(RACE)
    d = tmp_path / "tables"
    d.mkdir()
    out = subprocess.run(
        [sys.executable, str(script), str(creators), str(rounds), str(d)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert len(lines) == rounds
    for r, line in enumerate(lines):
        results, slot, files = json.loads(line)
        assert sorted(results) == sorted([f"won {slot}"] + ["in use"] * (creators - 1)), line
        assert files == [f"t{r}.npy"], line  # no journal, no placeholder or temp file left


def test_concurrent_creators_of_one_new_path_one_wins(tmp_path):
    _race(tmp_path, creators=4, rounds=4)


@pytest.mark.slow
def test_concurrent_creators_stress(tmp_path):
    _race(tmp_path, creators=8, rounds=40)


def test_a_killed_creators_placeholder_is_taken_over(tmp_path):
    path = tmp_path / "t.npy"
    path.write_bytes(b"")  # what a creator killed before its table was renamed in leaves
    with pytest.raises(ValueError, match="t.npy' is empty: its creation was killed"):
        SeedTable.open(path)
    t = SeedTable.create(path, (P, K), _rows)  # not "already exists": an empty file is no table
    assert torch.equal(t.seeds, torch.from_numpy(_rows(0, P)))
    t.close()


# ---- item 3: a journal is tied to its table ------------------------------------------------------------


def test_a_journal_of_a_deleted_table_is_never_replayed(tmp_path):
    path = tmp_path / "t.npy"
    old, new = _writes(6, salt=1), _writes(4, salt=2)
    _crashed_run(path, old)
    assert os.path.exists(str(path) + ".journal")
    os.unlink(path)  # the killed run's table is deleted, its journal stays
    _crashed_run(path, new)  # a new run at the same path, killed as well
    got = _open_seeds(path)
    assert torch.equal(got, _expected(new))  # the new run's table, none of the old run's records
    assert len(np.unique(got.numpy())) == P * K


def test_a_journal_of_another_table_is_refused_by_name(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    _crashed_run(a, _writes(3, salt=3))
    SeedTable.create(b, (P, K), _rows).close()
    os.replace(str(a) + ".journal", str(b) + ".journal")
    before = b.read_bytes()
    with pytest.raises(ValueError, match=r"journal '.*b.npy.journal' belongs to another seed table .*remove the"):
        SeedTable.open(b)
    assert b.read_bytes() == before and os.path.exists(str(b) + ".journal")  # nothing applied, journal kept


def test_each_table_file_carries_its_own_id(tmp_path):
    ids = set()
    for name in ("a.npy", "b.npy"):
        t = SeedTable.create(tmp_path / name, (P, K), _rows)
        ids.add(t._mark.table_id)
        t.replace(_rows)  # a replaced file is another table: a new id
        ids.add(t._mark.table_id)
        t.close()
        np.testing.assert_array_equal(np.load(tmp_path / name), _rows(0, P))  # still a plain .npy file
    assert len(ids) == 4 and 0 not in ids


# ---- item 4: damage in the middle of a journal is refused, a torn last record dropped ------------------


def _cut(path, at, n):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:at] + blob[at + n :])


def _flip(path, at, bit=3):
    blob = bytearray(open(path, "rb").read())
    blob[at] ^= 1 << bit
    open(path, "wb").write(bytes(blob))


@pytest.mark.parametrize("damage", ["payload bit", "count bit", "crc bit", "cut inside", "cut most of it"])
def test_damage_before_the_last_record_is_refused(tmp_path, damage):
    path = tmp_path / "t.npy"
    jpath = str(path) + ".journal"
    _crashed_run(path, _writes(3, salt=4) + _writes(3, salt=5, size=2))  # 3 records of 528 bytes, 3 of 48
    recs = _records(jpath)
    (s, e), size = recs[2], os.path.getsize(jpath)
    if damage == "payload bit":
        _flip(jpath, s + 16 + 100)
    elif damage == "count bit":
        _flip(jpath, s + 4, bit=1)
    elif damage == "crc bit":
        _flip(jpath, s + 12)
    elif damage == "cut inside":
        _cut(jpath, s + 40, 8)
    else:  # the record's stated length now runs past the end: only the whole records after it tell it from a torn one
        _cut(jpath, s + 40, size - e + 8)
        assert s + (e - s) > os.path.getsize(jpath)
    before = path.read_bytes()
    with pytest.raises(
        ValueError,
        match=r"journal '.*t.npy.journal' of the seed table .* is damaged at byte "
        r".*LoomCoupling.load\(checkpoint, mmap_path=",
    ):
        SeedTable.open(path)
    assert path.read_bytes() == before and os.path.exists(jpath)  # nothing applied, the journal kept


@pytest.mark.parametrize("tail", ["half", "header only", "zeros"])
def test_a_torn_last_record_is_dropped_with_a_warning(tmp_path, tail):
    path = tmp_path / "t.npy"
    writes = _writes(5, salt=5)
    extra = _writes(1, salt=6)[0]
    record = journal_mod.pack_record(6, extra[0].numpy() * K + extra[1].numpy(), extra[2].numpy())
    torn = {"half": record[: len(record) // 2], "header only": record[:10], "zeros": bytes(len(record))}[tail]
    _crashed_run(path, writes, torn=torn)
    with pytest.warns(RuntimeWarning, match="dropped the torn last record"):
        got = _open_seeds(path)
    assert torch.equal(got, _expected(writes))
    assert not os.path.exists(str(path) + ".journal")


def test_a_whole_journal_is_replayed_after_a_crash(tmp_path):
    path = tmp_path / "t.npy"
    writes = _writes(7, salt=7)
    _crashed_run(path, writes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_open_seeds(path), _expected(writes))


# ---- item 5: a damaged table file with a journal beside it --------------------------------------------


@pytest.mark.parametrize("damage", ["cut header", "zeroed header", "cut data", "empty"])
def test_starting_over_from_a_damaged_table_with_a_journal(tmp_path, damage):
    path, ckpt = tmp_path / "t.npy", tmp_path / "c.pt"
    fresh = LoomCoupling(P, (3,), num_caches=K, seed=1)
    fresh.save(ckpt)

    def crash_and_damage(create):
        _crashed_run(path, _writes(4, salt=8), create=create)
        blob = path.read_bytes()
        path.write_bytes(
            {
                "cut header": blob[:60],
                "zeroed header": bytes(128) + blob[128:],
                "cut data": blob[: len(blob) // 2],
                "empty": b"",
            }[damage]
        )

    crash_and_damage(create=True)
    with pytest.warns(RuntimeWarning, match="discarded '.*t.npy.journal'"):
        c = LoomCoupling.load(ckpt, mmap_path=path)  # the first way of starting over
    assert torch.equal(c.seeds, fresh.seeds)
    c.close()
    crash_and_damage(create=False)
    with pytest.warns(RuntimeWarning, match="discarded"):
        c = LoomCoupling(P, (3,), num_caches=K, seed=1, mmap_path=path, overwrite=True)  # the second
    assert torch.equal(c.seeds, fresh.seeds)
    c.close()
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "t.npy"]
    crash_and_damage(create=False)
    with pytest.raises(ValueError, match=r"seed table '.*t.npy' (is damaged|is empty).*overwrite=True"):
        SeedTable.open(path)  # opening it as it is names the file and the ways out


# ---- item 6: forked workers do not hold the table's lock ----------------------------------------------

HOLDER = r"""
import multiprocessing, sys, time
from loom_kernels.couplings import LoomCoupling
c = LoomCoupling(64, (2,), mmap_path=sys.argv[1])
worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # a DataLoader worker
worker.start()
print(worker.pid, flush=True)
time.sleep(120)
"""


def test_forked_workers_do_not_keep_the_lock(tmp_path):
    table, ckpt = tmp_path / "table.npy", tmp_path / "c.pt"
    c = LoomCoupling(64, (2,), mmap_path=table)
    c.save(ckpt)
    assert not os.get_inheritable(c._table._lock_fd)  # close-on-exec
    r, w = os.pipe()  # child -> parent
    r2, w2 = os.pipe()  # parent -> child
    pid = os.fork()
    if pid == 0:  # a forked worker: holds no lock and cannot write the parent's table
        try:
            ok = c._table._lock_fd is None and file_lock._HELD == set()
            try:
                c._table.write(torch.tensor([1]), torch.tensor([0]), torch.tensor([5]))
            except RuntimeError as exc:
                ok = ok and "forked child" in str(exc)
            os.write(w, b"1" if ok else b"0")
            os.read(r2, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        c.close()
        LoomCoupling.load(ckpt).close()  # reloading into the same path while the worker lives
    finally:
        os.write(w2, b"x")
        os.waitpid(pid, 0)
        for fd in (r, w, r2, w2):
            os.close(fd)
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    other = tmp_path / "other.npy"
    holder = subprocess.Popen([sys.executable, str(script), str(other)], stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
        os.kill(worker, 0)  # the worker still lives (raises ProcessLookupError otherwise)
        LoomCoupling.load(ckpt, mmap_path=other).close()  # right after the holder is killed
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- item 7: a seed duplicated across the shards of a sharded checkpoint ------------------------------


def _sharded_checkpoint(path, edit=None):
    """A sharded checkpoint of world 2 written shard by shard (as ``save`` on 2 ranks writes it)."""
    c = LoomCoupling(P, (3,), num_caches=K, seed=4)
    c.resample(torch.tensor([5, 9]))
    state = c.state_dict()
    seeds = state["seeds"].clone()
    if edit is not None:
        edit(seeds)
    save_id, bounds = "00000000000000ab", [0, P // 2, P]
    for r in range(2):
        atomic_save(
            {
                "kind": SHARD_KIND,
                "save_id": save_id,
                "rank": r,
                "world": 2,
                "rows": bounds[r : r + 2],
                "config": state["config"],
                "seeds": seeds[bounds[r] : bounds[r + 1]].clone(),
            },
            shard_path(path, save_id, r, 2),
        )
    manifest = {k: v for k, v in state.items() if k not in ("seeds", "shard_rows")}
    manifest.update(save_id=save_id, world=2, bounds=bounds, table="sharded")
    atomic_save(manifest, path)
    return c


def _duplicate_across(seeds):
    seeds[P - 3, 1] = seeds[2, 0]  # a seed of shard 0 also in shard 1: each shard alone is fine


def test_a_seed_duplicated_across_shards_is_refused(tmp_path):
    good = _sharded_checkpoint(tmp_path / "good.pt")
    for table in ("replicated", "sharded"):
        assert torch.equal(LoomCoupling.load(tmp_path / "good.pt", table=table).seeds, good.seeds)
    _sharded_checkpoint(tmp_path / "bad.pt", edit=_duplicate_across)
    for table in ("replicated", "sharded"):
        with pytest.raises(ValueError, match=r"sharded checkpoint '.*bad.pt' holds 1 duplicated seeds across"):
            LoomCoupling.load(tmp_path / "bad.pt", table=table)
    sd = good.state_dict()
    _duplicate_across(sd["seeds"])  # the replicated path refuses the same edit
    with pytest.raises(ValueError, match="1 duplicated seeds"):
        LoomCoupling(P, (3,), num_caches=K, seed=4).load_state_dict(sd)


def _load_on_two(rank, world, store, out_dir, ckpt_dir):
    from gloo_ranks import run_rank

    def body():
        out = {}
        for name in ("good.pt", "bad.pt"):
            try:
                c = LoomCoupling.load(os.path.join(ckpt_dir, name), table="sharded")
                out[name] = ("ok", c.shard_rows)
            except ValueError as exc:
                out[name] = ("refused", str(exc))
        return out

    run_rank(rank, world, store, out_dir, body)


@pytest.mark.distributed
def test_a_seed_duplicated_across_ranks_is_refused_on_every_rank(tmp_path):
    from gloo_ranks import spawn

    _sharded_checkpoint(tmp_path / "good.pt")
    _sharded_checkpoint(tmp_path / "bad.pt", edit=_duplicate_across)
    out = tmp_path / "run"
    out.mkdir()
    ranks = spawn(2, out, _load_on_two, (str(tmp_path),))
    for r, res in enumerate(ranks):
        assert res["good.pt"] == ("ok", (P // 2 * r, P // 2 * (r + 1))), res
        assert res["bad.pt"][0] == "refused" and "1 duplicated seeds across its shards" in res["bad.pt"][1], res


# ---- durability -----------------------------------------------------------------------------------------


def test_durability_is_validated_and_chooses_the_sync(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"durability must be one of \('crash', 'power'\), got 'disk'"):
        LoomCoupling(P, (3,), mmap_path=tmp_path / "x.npy", durability="disk")
    with pytest.raises(ValueError, match="durability must be one of"):
        SeedTable.create(tmp_path / "y.npy", (P, K), _rows, durability=None)
    assert not os.path.exists(tmp_path / "x.npy") and not os.path.exists(tmp_path / "y.npy")
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    for durability, per_call in (("crash", 0), ("power", 1)):
        c = LoomCoupling(P, (3,), num_caches=K, mmap_path=tmp_path / f"{durability}.npy", durability=durability)
        assert c.durability == durability and c._table.durability == durability
        x, idx = torch.randn(64, 3), torch.randperm(P)[:64]
        c(x, idx)
        synced.clear()
        for _ in range(3):
            c(x, idx)
        assert len(synced) == 3 * per_call, durability
        c.close()
    assert LoomCoupling(P, (3,), mmap_path=tmp_path / "d.npy").durability == "crash"  # the default


def test_a_table_and_journal_written_before_ids_still_open(tmp_path):
    import zlib

    path = tmp_path / "old.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(P, K))
    mm[:] = _rows(0, P)
    mm.flush()
    del mm
    ((r, s, v),) = _writes(1, salt=11)  # a header-less journal of the old format, one record
    payload = (r.numpy() * K + s.numpy()).tobytes() + v.numpy().tobytes()
    (tmp_path / "old.npy.journal").write_bytes(
        journal_mod._REC1.pack(journal_mod._MAGIC1, len(r), zlib.crc32(payload)) + payload
    )
    t = SeedTable.open(path)
    # replayed, then given an id and a version
    assert torch.equal(t.seeds, _expected([(r, s, v)])) and t._mark.table_id != 0 and t._mark.version == 1
    t.close()
    assert SeedTable.open(path)._mark.table_id == t._mark.table_id


# ---- #34 item 1: journal records carry the table version and call they apply to -------------------------


def test_a_journal_cut_inside_an_earlier_record_replays_nothing_the_table_already_holds(tmp_path):
    # The killed run's table holds all 6 calls (the page cache keeps them); its journal is then cut inside the
    # third record, with nothing after the damage. Replaying the two whole records before it onto that table
    # would undo calls 3-6 for those entries (seeds lost and doubled); the table's call count says it holds
    # them all, so nothing is replayed.
    path = tmp_path / "t.npy"
    writes = _writes(6, salt=21)
    _crashed_run(path, writes)
    jpath = str(path) + ".journal"
    spans = _records(jpath)
    assert len(spans) == 6
    cut = spans[2][0] + (spans[2][1] - spans[2][0]) // 2
    os.truncate(jpath, cut)
    with pytest.warns(RuntimeWarning, match="the table already holds its call"):
        got = _open_seeds(path)
    assert torch.equal(got, _expected(writes))
    assert len(np.unique(got.numpy())) == P * K and not os.path.exists(jpath)


def test_a_table_restored_from_a_backup_older_than_its_journal_is_refused(tmp_path):
    import shutil

    path, backup = tmp_path / "t.npy", tmp_path / "backup.npy"
    w = _writes(5, salt=22)
    t = SeedTable.create(path, (P, K), _rows)
    t.write(*w[0])
    t.close()  # folds the journal in: a new version
    shutil.copy(path, backup)  # the backup: version 2
    t = SeedTable.open(path)
    t.write(*w[1])
    t.close()  # version 3
    _crashed_run(path, w[2:], create=False)  # its journal is of version 3
    jpath = str(path) + ".journal"
    shutil.copy(backup, path)  # the user restores the table from the backup, the crash's journal beside it
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"written for version 3 of the table, but the table file is at version 2"):
        SeedTable.open(path)
    assert path.read_bytes() == before and os.path.exists(jpath)  # nothing applied, the journal kept


def test_a_backup_within_the_same_version_gets_exactly_the_calls_it_lacks(tmp_path):
    import shutil

    path, backup = tmp_path / "t.npy", tmp_path / "backup.npy"
    w = _writes(6, salt=23)

    def run():
        t = SeedTable.create(path, (P, K), _rows)
        for k, x in enumerate(w):
            t.write(*x)
            if k == 1:
                shutil.copy(path, backup)  # a copy holding calls 1-2 (its trailer says so)
        return t

    _crash(run)
    shutil.copy(backup, path)
    assert torch.equal(_open_seeds(path), _expected(w))  # calls 3-6 replayed onto it


def test_a_journal_that_skips_calls_is_refused_by_name(tmp_path):
    path = tmp_path / "t.npy"
    _crashed_run(path, _writes(4, salt=24))
    jpath = str(path) + ".journal"
    blob = open(jpath, "rb").read()
    spans = _records(jpath)
    with open(jpath, "wb") as f:  # the header, then records 1 and 3-4: call 2 is missing
        f.write(blob[: spans[0][1]] + blob[spans[2][0] :])
    # the table holds all 4 calls, so first pretend it holds none: its trailer's count set to 0
    mm, mark = journal_mod.map_table(str(path))
    del mm
    fd = os.open(path, os.O_RDWR)
    mark.calls = 0
    journal_mod.write_mark(fd, mark)
    os.close(fd)
    with pytest.raises(ValueError, match=r"skips from call 1 to call 3"):
        SeedTable.open(path)
    with open(jpath, "wb") as f:  # the header, then records 3-4 only: calls 1-2 missing before them
        f.write(blob[: spans[0][0]] + blob[spans[2][0] :])
    with pytest.raises(ValueError, match=r"starts at call 3, but the table holds calls up to 0"):
        SeedTable.open(path)


def test_a_killed_journal_creators_temp_file_is_removed(tmp_path):
    # #34 item 11: a writer killed between creating the journal's temp file and renaming it into place left
    # PATH.journal.tmp-HOST-PID-XXXXXXXX behind, which nothing removed. The next journal opened at that path
    # removes it (its writer is gone); a live writer's temp is kept.
    import socket

    path = tmp_path / "t.npy"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"t.npy.journal.tmp-{host}-{int(dead.stdout)}-abcd1234"
    live = tmp_path / f"t.npy.journal.tmp-{host}-{os.getpid()}-wxyz5678"
    stale.write_bytes(b"LJH1")
    live.write_bytes(b"LJH1")
    _crashed_run(path, _writes(2, salt=3))  # creates the table, opens its journal, writes, is killed
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("fail_at", ["partial", "fdatasync"])
def test_a_failed_journal_append_is_rolled_back_and_names_the_journal(tmp_path, monkeypatch, fail_at):
    # #34 items 5 and 8: a full disk mid-append left a partial record; the next call's record after it made
    # the journal damaged before its end, so a crash later could not be replayed. The append is now cut
    # back, the error names the journal, and the table is unchanged.
    import errno

    from loom_kernels.couplings.loom.tables import replicated as table_mod

    path = tmp_path / "t.npy"
    w = _writes(3, salt=5)
    t = SeedTable.create(path, (P, K), _rows, durability="power")
    try:
        t.write(*w[0])
        before = t.seeds.clone()
        real_write, real_sync = os.write, os.fdatasync

        def short_write(fd, data):  # half the record lands, then the disk is full
            if len(data) > 8:
                real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def bad_sync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        if fail_at == "partial":
            monkeypatch.setattr(table_mod.os, "write", short_write)
        else:
            monkeypatch.setattr(table_mod.os, "fdatasync", bad_sync)
        with pytest.raises(OSError, match=r"cannot append to the journal .*t\.npy\.journal.*not applied") as exc:
            t.write(*w[1])
        assert exc.value.errno == errno.ENOSPC and exc.value.filename.endswith("t.npy.journal")
        monkeypatch.setattr(table_mod.os, "write", real_write)
        monkeypatch.setattr(table_mod.os, "fdatasync", real_sync)
        assert torch.equal(t.seeds, before)
        t.write(*w[2])
        # what a crash now would replay: whole records only, the failed call's none
        jpath = str(path) + ".journal"
        assert len(journal_mod.record_spans(open(jpath, "rb").read())) == 2
        assert torch.equal(t.seeds, _expected([w[0], w[2]]))
    finally:
        t.close()
    assert torch.equal(_open_seeds(path), _expected([w[0], w[2]]))


def test_a_call_count_on_disk_before_the_rows_still_replays_them(tmp_path):
    # After a power loss (durability="power") the trailer's call count may reach the disk before the rows of
    # that call: the journal, which reaches the count, is replayed whole, so the call is redone.
    path = tmp_path / "t.npy"
    writes = _writes(3, salt=25)
    _crashed_run(path, writes)
    mm, mark = journal_mod.map_table(str(path))
    assert mark.calls == 3
    before_last = _expected(writes[:2])
    r, s, _ = writes[2]
    mm.reshape(P, K)[r.numpy(), s.numpy()] = before_last[r, s].numpy()  # the last call's rows never landed
    mm.flush()
    del mm
    assert torch.equal(_open_seeds(path), _expected(writes))
