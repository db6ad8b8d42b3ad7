"""loom_kernels._io.atomic_write: the one place every persisted file goes through."""
import os

import pytest

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
