"""examples/ run as a user copies them, at tiny sizes (issue 22): each script with --tiny, DDP under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gloo_ranks import free_port

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args, timeout=600):
    # OMP 1: the examples run beside each other on small CI machines; the package is the installed one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent
    )
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.parametrize("script", ["torchcfm_images.py", "latent_recipe.py"])
def test_example_runs_tiny(script):
    out = _run([str(EXAMPLES / script), "--tiny"])
    assert "loss" in out


def test_class_conditional_guidance_moves_samples_toward_their_class():
    # The guided samples' class means must be ordered like the class centers (x of class 0 is the
    # largest): a sampler that ignored labels or guidance would give three equal means.
    out = _run([str(EXAMPLES / "class_conditional.py"), "--tiny"])
    means = [float(line.split("[")[1].split(",")[0]) for line in out.splitlines() if line.startswith("class ")]
    assert len(means) == 3 and means[0] > means[1] and means[0] > means[2]


def test_reflow_example_trains_generates_and_samples_at_nfe_1(tmp_path):
    out = _run([str(EXAMPLES / "reflow.py"), "--tiny", "--out", str(tmp_path)])
    w2 = {line.split(":")[0]: float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "NFE 1" in line}
    assert set(w2) == {"loom", "reflow"} and all(v == v and v < 10 for v in w2.values())
    assert sorted(os.listdir(tmp_path / "pairs")) == [
        "manifest.json",
        "progress.json",
        "seeds.npy",
        "targets.npy",
    ]


@pytest.mark.distributed  # in the default run (~10 s): the example users copy must not crash at exit
def test_ddp_example_under_torchrun():
    out = _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(EXAMPLES / "ddp.py"),
            "--tiny",
        ]
    )
    for name in ("LOOM-CFM, global batch", "minibatch OT, global batch", "minibatch OT, groups of 8"):
        assert f"{name}: world 2" in out, out
