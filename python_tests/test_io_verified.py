"""Checksummed torch files (``loom_kernels._io``): damaged files are refused by name, and the couplings read
and write them without the trainer's checkpoint module."""

import subprocess
import sys

import pytest
import torch

from loom_kernels._io import atomic_save, load_verified


def test_every_flipped_bit_in_the_zip_end_records_is_a_clear_error_naming_the_file(tmp_path):
    # issue 23 item 8: a flipped bit in the end-of-central-directory record (its disk numbers) made
    # zipfile.is_zipfile raise a bare BadZipFile naming no file
    good = tmp_path / "good.pt"
    atomic_save({"version": 2, "seeds": torch.arange(50)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    tail = 100  # the end-of-central-directory record, its zip64 locator and the end of the directory
    for off in range(len(data) - tail, len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[off] ^= 1 << bit
            bad.write_bytes(flipped)
            try:
                obj = load_verified(bad, "coupling file", mmap=True)
            except ValueError as exc:
                assert str(bad) in str(exc), (off, bit, str(exc))
                continue
            # a bit the format ignores (a comment length, an unused field): the content must still verify
            assert torch.equal(obj["seeds"], torch.arange(50)), (off, bit)


def test_the_couplings_do_not_import_the_trainers_checkpoint_module():
    code = (
        "import sys, loom_kernels.couplings, loom_kernels.coupling; "
        "assert 'loom_kernels.checkpoint' not in sys.modules, sorted(m for m in sys.modules if 'loom' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_checkpoint_keeps_its_old_names():
    from loom_kernels import checkpoint

    assert checkpoint.atomic_save is atomic_save and checkpoint.load_verified is load_verified
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_verified("/nonexistent/x.pt")
