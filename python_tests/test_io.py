"""loom_kernels._io.atomic_write: the one place every persisted file goes through."""

import os

import pytest
import torch

from loom_kernels._io import atomic_write


def test_writes_text_and_binary(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write(p, lambda f: f.write("x,y\r\n1,2\n"), mode="w")
    assert p.read_bytes() == b"x,y\r\n1,2\n"  # newline="" keeps csv's line endings untouched
    atomic_write(p, lambda f: f.write(b"\x00\x01"))
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(p.parent) == ["a.txt"]


def test_crash_mid_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "state.bin"
    p.write_bytes(b"old")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, crash)
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]  # no temp file left behind


def test_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"):
        atomic_write(tmp_path / "x", lambda f: None, mode="a")


def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_killed_writers_are_removed(tmp_path):
    import socket

    host = socket.gethostname()
    stale = tmp_path / f"state.bin.tmp-{host}-{_dead_pid()}-abcd1234.tmp"
    live = tmp_path / f"state.bin.tmp-{host}-{os.getpid()}-efgh5678.tmp"  # a writer still running
    other = tmp_path / f"other.bin.tmp-{host}-{_dead_pid()}-abcd1234.tmp"  # another file's
    for f in (stale, live, other):
        f.write_bytes(b"x" * 100)
    atomic_write(tmp_path / "state.bin", lambda f: f.write(b"new"))
    assert sorted(os.listdir(tmp_path)) == sorted(["state.bin", live.name, other.name])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f.txt", lambda f: f.write("x"), mode="w")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.txt").st_mode & 0o777 == mode


def test_a_full_disk_is_named(tmp_path):
    import errno

    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"old")

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    msg = r"no room to write .*checkpoint.pt.*No space left on device .*'checkpoint.pt' was not replaced"
    with pytest.raises(OSError, match=msg) as info:
        atomic_write(p, full)
    assert info.value.errno == errno.ENOSPC
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


FSIZE = r"""
import resource, signal, sys, torch
from loom_kernels.checkpoint import atomic_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # writes past 1 MiB fail, as on a full disk
try:
    atomic_save({"w": torch.zeros(1 << 20)}, sys.argv[1])
except OSError as exc:
    print(exc.errno, exc)
"""


def test_torch_save_past_the_space_limit_is_named(tmp_path):
    import errno
    import subprocess
    import sys

    env = dict(os.environ)
    p = tmp_path / "checkpoint.pt"
    out = subprocess.run([sys.executable, "-c", FSIZE, str(p)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # not "unexpected pos"
    assert out.stdout.startswith(f"{errno.EFBIG} [Errno {errno.EFBIG}] no room to write"), out.stdout
    assert "checkpoint.pt" in out.stdout and "File too large" in out.stdout
    assert os.listdir(tmp_path) == []


def test_a_checksummed_file_whose_bytes_changed_is_refused(tmp_path):
    """atomic_save's checksum is compared on load: one flipped bit in a stored tensor is a clear error."""
    from loom_kernels._io import atomic_save, load_verified

    p = tmp_path / "state.pt"
    seeds = torch.arange(1000, 1064, dtype=torch.int64)
    atomic_save({"version": 2, "seeds": seeds}, p)
    assert torch.equal(load_verified(p)["seeds"], seeds)  # intact: loads, without its checksum entry
    blob = bytearray(p.read_bytes())
    at = blob.find(seeds.numpy().tobytes())  # torch.save stores tensor bytes uncompressed
    assert at > 0
    blob[at + 8 * 17] ^= 0x04  # seed 1017 becomes 1021: still a valid file for torch.load
    p.write_bytes(bytes(blob))
    assert torch.load(p, weights_only=True)["seeds"][17] == 1021
    with pytest.raises(ValueError, match=r"state\.pt.* fails its checksum"):
        load_verified(p)
