"""The demo end to end on tiny settings (the report's structure, the figure, the JSON, the models),
and its ranking rule (an order is stated only when every seed agrees) on hand-made numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from loom_kernels.experiments import common, demo


def test_demo_quick_in_process(tmp_path, capsys):
    out = str(tmp_path / "d")
    summary = demo.run(
        demo._parser().parse_args(
            ["--quick", "--out", out, "--no-progress", "--seed", "1", "--seeds", "2", "--steps", "20"]
        )
    )
    text = capsys.readouterr().out
    for c in (
        "independent",
        "minibatch OT",
        "LOOM-CFM",
        "data floor",
        "Euler@1",
        "midpoint@8",
        "mean±sd over 2 seeds",
        "Rankings (stated only where the order is the same on all 2 seeds)",
        "Euler NFE 1 ",
        "midpoint NFE 8 ",
        "Global optimum for LOOM's noise set",
    ):
        assert c in text, c
    png = os.path.join(out, "demo_8gaussians.png")
    assert summary["figure"] == png and os.path.getsize(png) > 20_000
    with open(os.path.join(out, "demo_8gaussians.json")) as f:
        saved = json.load(f)
    assert saved["seeds"] == [1, 2]
    cols = set(common.COLUMNS)
    assert {"euler1", "euler2", "euler4", "euler8", "midpoint2", "midpoint4", "midpoint8"} <= cols
    assert set(saved["couplings"]) == {"independent", "ot", "loom"}
    for c, r in saved["couplings"].items():
        assert set(r["w2"]) == cols
        for sp in r["w2"].values():  # the spread is the one of the per-seed values
            v = np.array(sp["values"])
            assert len(v) == 2 and np.all(np.isfinite(v)) and np.all(v > 0)
            assert sp["mean"] == pytest.approx(v.mean()) and sp["sd"] == pytest.approx(v.std(ddof=1))
            assert sp["min"] == v.min() and sp["max"] == v.max()
        assert r["straightness"]["min"] >= 0
        assert r["dopri5_nfe"]["min"] >= 6  # dopri5 makes 6 evaluations per accepted step, at least one step
        for seed in (1, 2):
            assert os.path.isfile(os.path.join(out, f"8gaussians_{c}_seed{seed}", "model.pt"))
    for run in saved["per_seed"]:
        # LOOM's dataset-wide cost never increases (num_caches=1) and stays above the global optimum.
        curve = [c for _, c in run["loom_dataset_cost"]]
        assert all(b <= a + 1e-6 * a for a, b in zip(curve, curve[1:]))
        assert run["couplings"]["loom"]["global_optimum"] <= curve[-1] * (1 + 1e-6)
        assert curve[-1] < curve[0]
    # A stated order is the one measured on every seed.
    for col, r in saved["rankings"].items():
        if col == "straightness":
            continue
        for k, run in enumerate(saved["per_seed"]):
            w = {c: run["couplings"][c]["w2"][col] for c in ("independent", "ot", "loom")}
            assert r["orders"][k] == sorted(w, key=w.get)
        assert (r["order"] is not None) == all(o == r["orders"][0] for o in r["orders"])


def test_ranking_rule():
    agree = common.ranking([{"loom": 0.5, "ot": 0.7, "independent": 3.0}, {"loom": 0.6, "ot": 0.8, "independent": 3.1}])
    assert agree["order"] == ["loom", "ot", "independent"] and agree["below"]["loom<ot"] == 2
    split = common.ranking([{"loom": 0.5, "ot": 0.7, "independent": 3.0}, {"loom": 0.9, "ot": 0.8, "independent": 3.1}])
    assert split["order"] is None and split["below"]["loom<ot"] == 1 and split["below"]["ot<loom"] == 1
    assert split["orders"][1] == ["ot", "loom", "independent"]


def test_report_says_not_resolved(capsys):
    # Two seeds that disagree at one column: the report must say so instead of printing an order.
    def fake(loom_e1):
        w = {c: 1.0 for c in common.COLUMNS}
        return {
            "w2": dict(w, euler1=loom_e1),
            "straightness": 0.1,
            "pair_cost_end": 1.0,
            "final_loss": 1.0,
            "train_seconds": 1.0,
            "eval_seconds": 1.0,
            "dopri5_nfe": 60,
        }

    def seed_run(loom_e1):
        ot = fake(0.8)
        ind = {**fake(3.0), "w2": {c: 3.0 for c in common.COLUMNS}}
        return {
            "w2_floor": 0.4,
            "n_eval": 10,
            "n_train": 10,
            "couplings": {"loom": {**fake(loom_e1), "global_optimum": None}, "ot": ot, "independent": ind},
        }

    runs = [seed_run(0.5), seed_run(0.9)]
    agg = demo._aggregate(runs, dopri5=True)
    args = demo._parser().parse_args([])
    demo._report(args, demo._settings(args), runs, agg, dopri5=True)
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("Euler NFE 1 "))
    assert "not resolved" in line and "LOOM below on 1/2 seeds" in line


def test_dopri5_sample_counts_and_solves():
    x0 = torch.randn(8, 2, dtype=torch.float64)
    calls = []

    def field(x, t):
        calls.append(t.shape)
        return -x * (1 + t[:, None])  # x(1) = x0 exp(-1.5)

    x1, nfe = common.dopri5_sample(field, x0)
    assert nfe == len(calls) > 0 and all(s == (8,) for s in calls)
    assert torch.allclose(x1, x0 * np.exp(-1.5), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # heavy; CI runs it in its slow step
def test_demo_quick_digits_cli(tmp_path):
    out = str(tmp_path / "d")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom_kernels.demo",
            "--quick",
            "--data",
            "digits",
            "--out",
            out,
            "--no-progress",
            "--steps",
            "20",
            "--seeds",
            "1",
            "--no-dopri5",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Euler@1" in p.stdout and "total wall time" in p.stdout and "dopri5 reference skipped" in p.stdout
    assert os.path.getsize(os.path.join(out, "demo_digits.png")) > 20_000


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--data", "cifar10"], "--data must be one of"),
        (["--steps", "0"], "--steps must be positive"),
        (["--seeds", "0"], "--seeds must be positive"),
    ],
)
def test_demo_bad_arguments(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        demo.run(demo._parser().parse_args(argv + ["--out", str(tmp_path)]))
