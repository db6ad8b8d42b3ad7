"""Fault injection: kill -9 mid-call and mid-load, two processes and two threads on one table, flipped
bits, hostile and damaged files, hostile state dicts, a table larger than the disk.

The kill tests run a worker script in a subprocess that forks one child per round (torch is imported
once), kills it with SIGKILL at a random instant (or at the worst instant, from inside), then reopens
the table and compares it with an in-memory coupling replayed call by call: it must be the table of
the last completed call or the one before, never a mix. ``-m slow`` runs the long variant.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

from loom_kernels.checkpoint import atomic_save, load_checkpoint, load_verified
from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.loom.tables.file_lock import TableInUseError
from loom_kernels.couplings.loom.tables.replicated import ReplicatedTable as SeedTable

# The worker: MODE random|journal|apply runs ROUNDS rounds on a fresh table and prints one JSON line each.
WORKER = r"""
import json, os, random, signal, sys, time
os.environ["OMP_NUM_THREADS"] = "1"
import numpy as np, torch
torch.set_num_threads(1)
from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.loom.tables import journal as journal_mod
from loom_kernels.couplings.loom.tables.replicated import ReplicatedTable as SeedTable

mode, rounds, seed, path, durability = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
P, B, K, SHAPE = 2048, 256, 2, (2,)
data = torch.randn(P, *SHAPE, generator=torch.Generator().manual_seed(1))

def batch(j):
    return torch.randperm(P, generator=torch.Generator().manual_seed(1000 + j))[:B]

def make(**kw):
    return LoomCoupling(P, SHAPE, num_caches=K, seed=3, **kw)

ref, states = make(), []
def state(j):  # the table after j calls
    while len(states) <= j:
        if states:
            idx = batch(len(states) - 1)
            ref(data[idx], idx)
        states.append(ref.seeds.clone())
    return states[j]

def worker(w, stop_at):
    c = make(mmap_path=path, overwrite=True, durability=durability)
    if mode != "random":  # kill from inside call number stop_at, at the chosen instant
        real_write = os.write
        jfd = {}
        def write(fd, buf):
            armed = jfd.get("armed") if fd == c._table._jfd else None
            if armed == "journal":
                real_write(fd, bytes(buf)[: len(buf) // 2])  # half a journal record reaches the file
                os.kill(os.getpid(), signal.SIGKILL)
            n = real_write(fd, buf)
            if armed == "apply":
                if durability == "power":
                    os.fdatasync(fd)
                # the record is written; tear the table: half of this call's entries zeroed, then die
                blob = open(path + ".journal", "rb").read()
                start, end = journal_mod.record_spans(blob)[-1]
                head = journal_mod.REC.size
                flat = np.frombuffer(blob, np.int64, (end - start - head) // 16, start + head)
                c._table._memmap.reshape(-1)[flat[: len(flat) // 2]] = 0
                os.kill(os.getpid(), signal.SIGKILL)
            return n
        os.write = write
    for j in range(10**9):
        if mode != "random" and j == stop_at:
            jfd["armed"] = mode
        idx = batch(j)
        c(data[idx], idx)
        os.write(w, b"x")  # one byte per completed call

rng = random.Random(seed)
for r in range(rounds):
    stop_at = rng.randrange(1, 12)
    rfd, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            worker(w, stop_at)
        finally:
            os._exit(1)
    os.close(w)
    if mode == "random":
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    done = 0
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        done += len(chunk)
    os.close(rfd)
    t = SeedTable.open(path)
    got = t.seeds.clone()
    t.close()
    match = [j for j in (done, done + 1) if torch.equal(got, state(j))]
    distinct = len(np.unique(got.numpy()))
    print(json.dumps({"round": r, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "done": done, "match": match, "distinct": distinct, "size": P * K,
                      "files": sorted(os.listdir(os.path.dirname(path)))}), flush=True)
"""


def _run_worker(tmp_path, mode, rounds, seed, timeout, durability="crash"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    table = tmp_path / "t" / "table.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(script), mode, str(rounds), str(seed), str(table), durability],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == rounds
    return rows


def _check_rounds(rows, expect):
    for row in rows:
        assert row["signal"] == 9, row
        assert row["distinct"] == row["size"], row  # no seed lost or doubled
        assert row["match"], row  # the table of the last completed call or the one before
        if expect is not None:
            assert row["match"] == [row["done"] + expect], row
        assert row["files"] == ["table.npy"], row  # journal folded in on reopen, no temp files


# the "power" variants (fdatasync) in the slow run: the crash-safe default is the one each default run checks
@pytest.mark.parametrize("durability", ["crash", pytest.param("power", marks=pytest.mark.slow)])
def test_kill9_at_random_instants_leaves_a_whole_table(tmp_path, durability):
    _check_rounds(_run_worker(tmp_path, "random", 6, seed=11, timeout=240, durability=durability), expect=None)


@pytest.mark.parametrize("durability", ["crash", pytest.param("power", marks=pytest.mark.slow)])
def test_kill9_mid_journal_write_leaves_the_previous_table(tmp_path, durability):
    _check_rounds(_run_worker(tmp_path, "journal", 3, seed=12, timeout=120, durability=durability), expect=0)


@pytest.mark.parametrize("durability", ["crash", pytest.param("power", marks=pytest.mark.slow)])
def test_kill9_mid_table_write_redoes_the_call(tmp_path, durability):
    _check_rounds(_run_worker(tmp_path, "apply", 3, seed=13, timeout=120, durability=durability), expect=1)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["crash", pytest.param("power", marks=pytest.mark.slow)])
def test_kill9_stress(tmp_path, durability):
    _check_rounds(_run_worker(tmp_path, "random", 60, seed=14, timeout=1500, durability=durability), expect=None)
    _check_rounds(_run_worker(tmp_path, "apply", 20, seed=15, timeout=600, durability=durability), expect=1)


# ---- kill -9 during load ------------------------------------------------------------------------------

LOAD_KILLER = r"""
import os, signal, sys
import numpy as np
from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.loom.tables import replicated as table_mod
table_mod._INIT_CHUNK = 64  # many chunks: die in the middle of the copy
orig_fill = table_mod.fill_rows
def fill(dst, rows):
    def killing_rows(a, b):
        if a >= 256:
            os.kill(os.getpid(), signal.SIGKILL)
        return rows(a, b)
    return orig_fill(dst, killing_rows)
table_mod.fill_rows = fill
LoomCoupling.load(sys.argv[1])
"""


def test_kill9_during_load_keeps_the_previous_table(tmp_path):
    p, shape = 1024, (2,)
    table, ckpt = tmp_path / "table.npy", tmp_path / "ckpt.pt"
    data = torch.randn(p, *shape)
    c = LoomCoupling(p, shape, num_caches=2, seed=1, mmap_path=table)
    c.save(ckpt)
    for _ in range(5):
        idx = torch.randperm(p)[:256]
        c(data[idx], idx)
    before = c.seeds.clone()
    c.close()
    script = tmp_path / "killer.py"
    script.write_text(LOAD_KILLER)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, str(script), str(ckpt)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr[-2000:]
    np.testing.assert_array_equal(np.load(table), before.numpy())  # the previous table, whole
    assert len(os.listdir(tmp_path)) == 4  # the killed load's temp is still there ...
    r = LoomCoupling.load(ckpt)  # ... until the next write to the table removes it
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "killer.py", "table.npy"]
    np.testing.assert_array_equal(np.load(table), LoomCoupling.load(ckpt, mmap_path=None).seeds.numpy())
    r.close()


# ---- sharing one table --------------------------------------------------------------------------------

HOLDER = r"""
import sys, time
from loom_kernels.couplings import LoomCoupling
c = LoomCoupling(64, (2,), mmap_path=sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""


def test_two_processes_on_one_table(tmp_path):
    table, ckpt = tmp_path / "table.npy", tmp_path / "c.pt"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = dict(os.environ)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(table)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        inode = os.stat(table).st_ino
        LoomCoupling(64, (2,), mmap_path=None).save(ckpt)
        sd = torch.load(ckpt, weights_only=True)
        sd["mmap_path"] = str(table)
        atomic_save(sd, ckpt)
        with pytest.raises(TableInUseError, match="in use by another LoomCoupling"):
            LoomCoupling.load(ckpt)  # mmap_path="auto": the live file
        with pytest.raises(TableInUseError, match="table.npy"):
            LoomCoupling(64, (2,), mmap_path=table, overwrite=True)
        with pytest.raises(TableInUseError):
            SeedTable.open(table)
        assert os.stat(table).st_ino == inode  # never replaced under the live writer
        LoomCoupling.load(ckpt, mmap_path=None)  # inspecting a checkpoint in memory is fine
    finally:
        holder.communicate("", timeout=60)
    # the holder has exited: the constructor refuses to reset the table silently, overwrite=True may
    with pytest.raises(FileExistsError, match="overwrite=True"):
        LoomCoupling(64, (2,), mmap_path=table)
    LoomCoupling(64, (2,), mmap_path=table, overwrite=True).close()


def test_two_couplings_in_one_process(tmp_path):
    table = tmp_path / "table.npy"
    a = LoomCoupling(32, (2,), mmap_path=table)
    with pytest.raises(TableInUseError, match="close\\(\\) it first"):
        LoomCoupling(32, (2,), mmap_path=table, overwrite=True)
    a.close()
    b = LoomCoupling(32, (2,), mmap_path=table, overwrite=True)
    assert torch.equal(b.seeds, LoomCoupling(32, (2,)).seeds)
    b.close()


def test_threads_sharing_one_coupling_keep_every_seed():
    p, shape = 1000, (4,)
    c = LoomCoupling(p, shape, num_caches=2, seed=2)
    initial = torch.sort(c.seeds.reshape(-1)).values
    data = torch.randn(p, *shape)
    errors = []

    def run(k):
        g = torch.Generator().manual_seed(k)
        try:
            for _ in range(40):
                idx = torch.randperm(p, generator=g)[:128]
                c(data[idx], idx)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(torch.sort(c.seeds.reshape(-1)).values, initial)


# ---- corrupted and hostile files ----------------------------------------------------------------------


def _flip(path, offset, bit=0):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _find(path, needle):
    blob = open(path, "rb").read()
    at = blob.find(needle)
    assert at >= 0
    return at


def test_a_flipped_bit_in_a_seed_or_weight_is_refused(tmp_path):
    c = LoomCoupling(256, (2,), num_caches=2, seed=5)
    path = tmp_path / "coupling.pt"
    c.save(path)
    _flip(path, _find(path, c.seeds.numpy().tobytes()[:64]) + 8 * 77 + 3, bit=5)
    with pytest.raises(ValueError, match="coupling.pt' fails its checksum"):
        LoomCoupling.load(path)
    w = torch.randn(64, 32)
    ck = tmp_path / "checkpoint.pt"
    atomic_save({"format": "loom_kernels.checkpoint", "version": 1, "model": {"w": w}, "step": 3}, ck)
    assert load_checkpoint(str(ck))["step"] == 3
    _flip(ck, _find(ck, w.numpy().tobytes()[:64]) + 4 * 1000 + 2, bit=7)
    with pytest.raises(ValueError, match="checkpoint.pt' fails its checksum"):
        load_checkpoint(str(ck))


def test_every_flipped_bit_is_refused_or_harmless(tmp_path, rng):
    c = LoomCoupling(64, (2,), num_caches=2, seed=5)
    path = tmp_path / "coupling.pt"
    c.save(path)
    good, blob = LoomCoupling.load(path).state_dict(), open(path, "rb").read()
    for off in rng.choice(len(blob), 300, replace=False):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(blob)
        _flip(bad, int(off), bit=int(rng.integers(8)))
        try:
            got = LoomCoupling.load(bad, mmap_path=None).state_dict()
        except (ValueError, FileNotFoundError):
            continue
        # accepted: only bytes that carry no content changed (zip padding, names, timestamps)
        assert torch.equal(got["seeds"], good["seeds"]) and torch.equal(got["generator"], good["generator"])
        assert got["next_counter"] == good["next_counter"] and got["config"] == good["config"]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_file_runs_no_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"format": "loom_kernels.checkpoint", "x": _Exploit(str(marker))}, path)
    with pytest.raises(ValueError, match="safe loading .*refuses"):
        load_checkpoint(str(path))
    with pytest.raises(ValueError, match="refuses"):
        LoomCoupling.load(path)
    assert not marker.exists()


def test_a_legacy_numpy_rng_state_still_loads(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "loom_kernels.checkpoint", "rng": [{"numpy": np.random.get_state()}]}, path)
    ck = load_checkpoint(str(path))
    assert ck["rng"][0]["numpy"][0] == "MT19937"


def _damaged(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save({"format": "loom_kernels.model", "model": {"w": torch.randn(4000)}}, good)
    blob = good.read_bytes()
    zf = tmp_path / "other.zip"
    with zipfile.ZipFile(zf, "w") as z:
        z.writestr("a.txt", "hello")
    return {
        "empty": (b"", "is empty \\(0 bytes\\)"),
        "truncated": (blob[: len(blob) // 2], "is truncated or damaged"),
        "text": (b"step,loss\n1,0.5\n", "not a PyTorch file \\(a text file"),
        "zip": (zf.read_bytes(), "is corrupt or truncated"),
        "pickle": (pickle.dumps([1, 2, 3], protocol=2), "corrupt or truncated|not a loom_kernels"),
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "zip", "pickle"])
def test_damaged_files_name_the_file_and_the_cause(tmp_path, kind):
    content, cause = _damaged(tmp_path)[kind]
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint.pt'.*({cause})"):
        load_checkpoint(str(path))
    with pytest.raises(ValueError, match=f"coupling.pt'.*({cause})|not a LoomCoupling file"):
        shutil.copy(path, tmp_path / "coupling.pt")
        LoomCoupling.load(tmp_path / "coupling.pt")


def test_checkpoints_load_with_weights_only(tmp_path):
    from loom_kernels.checkpoint import restore_rng_state, rng_state

    np.random.seed(3)
    st = rng_state(torch.device("cpu"))
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "loom_kernels.checkpoint", "rng": [st]}, path)
    raw = torch.load(path, weights_only=True)  # what a user does
    expect = np.random.rand(5)
    np.random.seed(99)
    restore_rng_state(load_verified(path)["rng"][0], torch.device("cpu"))
    np.testing.assert_array_equal(np.random.rand(5), expect)
    assert "checksum" in raw


# ---- hostile state dicts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s["seeds"].zero_(), "all zeros"),
        (lambda s: s["seeds"].neg_(), "negative seeds"),
        (lambda s: s["seeds"].__setitem__((5, 1), s["seeds"][9, 0]), "1 duplicated seeds"),
        (lambda s: s["seeds"].__setitem__((5, 1), 12345), "did not hand out"),
        (lambda s: s.__setitem__("next_counter", 0), "next_counter'\\] must be at least"),
        (lambda s: s.__setitem__("next_counter", -7), "must be at least"),
        (lambda s: s.__setitem__("next_counter", 100), "must be at least the table size 128"),
        (lambda s: s.__setitem__("next_counter", 3.5), "must be an int"),
        (lambda s: s.__setitem__("generator", torch.zeros(3)), "generator"),
    ],
)
def test_hostile_state_dicts_are_refused(edit, match):
    a = LoomCoupling(64, (2,), num_caches=2, seed=4)
    a.resample(torch.tensor([1, 2]))
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.state_dict().items()}
    b = LoomCoupling(64, (2,), num_caches=2, seed=4)
    before = b.seeds.clone()
    edit(sd)
    with pytest.raises(ValueError, match=match):
        b.load_state_dict(sd)
    assert torch.equal(b.seeds, before)  # a refused state changes nothing


def test_resampled_state_is_accepted_and_counter_checked():
    a = LoomCoupling(64, (2,), num_caches=2, seed=4)
    a.resample(torch.tensor([1, 2]))
    a.resample()
    b = LoomCoupling(64, (2,), num_caches=2, seed=4)
    b.load_state_dict(a.state_dict())
    sd = dict(a.state_dict(), next_counter=a.state_dict()["next_counter"] - 1)
    with pytest.raises(ValueError, match="did not hand out"):
        b.load_state_dict(sd)


# ---- a table larger than the disk ---------------------------------------------------------------------


def test_a_table_larger_than_the_disk_is_a_clear_error(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    rows = 2 * free // 8 + 1
    with pytest.raises(OSError, match=r"not enough disk space for the seed table .*big.npy.* needs [\d,]+ bytes"):
        LoomCoupling(rows, (2,), mmap_path=tmp_path / "big.npy")
    assert os.listdir(tmp_path) == []


def test_preallocation_failure_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"cannot allocate [\d,]+ bytes for the seed table .*t.npy.*No space left"):
        LoomCoupling(100, (2,), mmap_path=tmp_path / "t.npy")
    assert os.listdir(tmp_path) == []


def test_huge_data_names_x1_and_the_overflow():
    c = LoomCoupling(16, (3,), seed=0)
    x1 = torch.full((8, 3), 1e30)
    before = c.seeds.clone()
    msg = "x1 contains NaN or inf \\(or values so large that the pair costs overflow float32\\)"
    with pytest.raises(ValueError, match=msg):
        c(x1, torch.arange(8))
    assert torch.equal(c.seeds, before)


def test_load_state_dict_failing_half_way_leaves_the_coupling_as_it_was(tmp_path, monkeypatch):
    # #34 item 4: a load_state_dict whose table replacement failed (a full disk, a read-only folder) had
    # already installed the new generator and counter over the old table; the state was then inconsistent
    # and every later checkpoint was refused. Now all or nothing.
    import errno

    from loom_kernels.couplings.loom.tables.replicated import ReplicatedTable as SeedTable

    p = 256
    data = torch.randn(p, 2)
    c = LoomCoupling(p, (2,), num_caches=2, seed=3, mmap_path=tmp_path / "t.npy")

    def snapshot():  # state_dict()'s seeds may view the live table
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in c.state_dict().items()}

    try:
        old = snapshot()
        for _ in range(3):
            idx = torch.randperm(p)[:64]
            c(data[idx], idx)
        c.resample(torch.arange(16))  # the counter moves on
        now = snapshot()
        assert now["next_counter"] != old["next_counter"]

        def full_disk(self, rows):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(SeedTable, "replace", full_disk)
        with pytest.raises(OSError, match="No space left"):
            c.load_state_dict(old)
        monkeypatch.undo()
        after = snapshot()
        assert torch.equal(after["seeds"], now["seeds"]) and after["next_counter"] == now["next_counter"]
        assert torch.equal(after["generator"], now["generator"])
        c.save(tmp_path / "ck.pt")  # consistent: a checkpoint of it loads
        c.load_state_dict(old)  # and the load itself works once the disk has room
        assert c.state_dict()["next_counter"] == old["next_counter"]
    finally:
        c.close()
    r = LoomCoupling.load(tmp_path / "ck.pt", mmap_path=None)
    assert torch.equal(r.seeds, now["seeds"])


def test_a_table_in_a_read_only_folder_says_mmap_path_none_loads_in_memory(tmp_path, monkeypatch):
    # #34: LoomCoupling.load of a checkpoint whose table folder is read-only only said "Permission denied".
    import errno

    from loom_kernels.couplings.loom.tables import replicated

    c = LoomCoupling(64, (2,), num_caches=2, seed=1, mmap_path=tmp_path / "t.npy")
    c.save(tmp_path / "ck.pt")
    c.close()

    def read_only(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(replicated, "claim", read_only)
    with pytest.raises(OSError, match=r"cannot write the seed table .*t\.npy.*mmap_path=None"):
        LoomCoupling.load(tmp_path / "ck.pt")
    monkeypatch.undo()
    assert torch.equal(LoomCoupling.load(tmp_path / "ck.pt", mmap_path=None).seeds, c.seeds)
