"""The demo end to end on tiny settings: the table, the ranking line, the figure, the JSON and the models."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loom_kernels import demo



def test_demo_quick_in_process(tmp_path, capsys):
    out = str(tmp_path / "d")
    summary = demo.run(demo._parser().parse_args(["--quick", "--out", out, "--no-progress", "--seed", "1"]))
    text = capsys.readouterr().out
    for c in ("independent", "minibatch OT", "LOOM-CFM", "data floor", "ranking at NFE 1", "ranking at NFE 2"):
        assert c in text
    png = os.path.join(out, "demo_8gaussians.png")
    assert summary["figure"] == png and os.path.getsize(png) > 20_000
    with open(os.path.join(out, "demo_8gaussians.json")) as f:
        saved = json.load(f)
    assert set(saved["results"]) == {"independent", "ot", "loom"}
    for c, r in saved["results"].items():
        assert set(r["w2"]) == {"1", "2", "4", "8"}
        assert all(np.isfinite(v) and v > 0 for v in r["w2"].values())
        assert r["straightness"] >= 0
        assert os.path.isfile(os.path.join(out, f"8gaussians_{c}", "model.pt"))
    # LOOM's dataset-wide cost never increases (num_caches=1) and stays above the global optimum.
    curve = [c for _, c in saved["loom_dataset_cost"]]
    assert all(b <= a + 1e-6 * a for a, b in zip(curve, curve[1:]))
    assert saved["loom_global_optimum"] <= curve[-1] * (1 + 1e-6)
    assert curve[-1] < curve[0]
    # The ranking printed is the one measured.
    for nfe in ("1", "2"):
        order = saved["rankings"][nfe]
        w = [saved["results"][c]["w2"][nfe] for c in order]
        assert w == sorted(w)


def test_demo_quick_digits_cli(tmp_path):
    out = str(tmp_path / "d")
    p = subprocess.run([sys.executable, "-m", "loom_kernels.demo", "--quick", "--data", "digits", "--out", out,
                        "--no-progress", "--steps", "20"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "W2@NFE1" in p.stdout and "total wall time" in p.stdout
    assert os.path.getsize(os.path.join(out, "demo_digits.png")) > 20_000


@pytest.mark.parametrize("argv, match", [(["--data", "cifar10"], "--data must be one of"),
                                         (["--steps", "0"], "--steps must be positive")])
def test_demo_bad_arguments(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        demo.run(demo._parser().parse_args(argv + ["--out", str(tmp_path)]))
