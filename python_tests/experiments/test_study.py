"""The ablation study on tiny settings: its couplings (fixed noise, pre-convergence), one run of each
variant, the grid's outputs and its resume, and the summary's statistics on hand-made records."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from loom_kernels.couplings import Coupling, FixedNoiseCoupling, LoomCoupling
from loom_kernels.experiments import study
from loom_kernels.metrics import dataset_cost, global_optimum
from loom_kernels.noise import gaussian_noise
from loom_kernels.testing import cost_matrix_np, loom_table_cost

TINY = dict(n=128, steps=12, batch_size=16, hidden=16, depth=2, lr=1e-3, n_eval=64)


def test_fixed_noise_coupling_never_reassigns():
    loom = LoomCoupling(50, (3,), seed=4)
    fixed = FixedNoiseCoupling(loom)
    assert isinstance(fixed, Coupling)  # the trainer sees its stats (it wrapped the old one and logged NaN)
    idx = torch.tensor([7, 3, 49, 0])
    x1 = torch.randn(4, 3)
    x0, out = fixed(x1, idx)
    assert out is x1
    assert torch.equal(x0, gaussian_noise(loom.seeds[idx, 0], (3,)))
    assert float(fixed.stats["pre_cost"]) == pytest.approx(float((x1 - x0).square().sum(1).mean()), rel=1e-6)
    again, _ = fixed(torch.randn(4, 3) * 10, idx)  # other data, same indices: the same noise
    assert torch.equal(again, x0)
    loom(torch.randn(4, 3), idx)  # the LOOM table moving does not move the frozen copy
    assert torch.equal(fixed(x1, idx)[0], x0)
    with pytest.raises(ValueError, match=r"indices must have shape \(b,\) = \(4,\)"):
        fixed(x1, idx[:3])
    # the protocol's refusals: no indices, noise in the indices' place, a given x0
    with pytest.raises(ValueError, match="needs the dataset indices"):
        fixed(x1)
    with pytest.raises(TypeError, match="indices must be integer dataset indices.*TorchCFM's argument order"):
        fixed(x1, torch.randn(4, 3))
    with pytest.raises(ValueError, match="x0 must be None"):
        fixed(x1, idx, x0=x1)
    assert fixed.state_dict() == {} and torch.equal(fixed(x1, idx, labels=idx % 2)[0], x0)


def test_converge_is_monotone_and_reaches_a_fixed_point():
    x = torch.randn(96, 2) * 2 + 1
    c = LoomCoupling(96, (2,), seed=1)
    start = c.seeds.clone()
    curve = study.converge(c, x, 16, seed=0)
    costs = [v for _, v in curve]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(costs, costs[1:]))
    assert costs[-2] - costs[-1] <= study.CONVERGE_RTOL * costs[-2]  # stopped because it stopped improving
    assert len(curve) < study.CONVERGE_MAX_EPOCHS
    opt = global_optimum(c.seeds, x, 4096)
    assert opt <= costs[-1] * (1 + 1e-6) and costs[-1] < 0.5 * costs[0] + 0.5 * opt  # most of the way down
    # the curve's ends against the float64 cost of the tables (independent of demo.dataset_cost)
    assert costs[0] == pytest.approx(loom_table_cost(start, x).mean(), rel=1e-5)
    assert costs[-1] == pytest.approx(loom_table_cost(c.seeds, x).mean(), rel=1e-5)
    assert dataset_cost(c, x) == pytest.approx(loom_table_cost(c.seeds, x).mean(), rel=1e-5)
    # the global optimum against scipy on the same noise set (each point once per cache)
    noise = gaussian_noise(c.seeds.reshape(-1), (2,)).double().numpy()
    cost = cost_matrix_np(x.double().numpy(), noise)
    r, k = linear_sum_assignment(cost)
    assert opt == pytest.approx(cost[r, k].mean(), rel=1e-5)


@pytest.mark.parametrize("variant", study.ALL_VARIANTS)
def test_run_one_records(variant):
    rec = study.run_one("moons", variant, 0, TINY)
    # every number of the CSV row is finite (the "fixed" variant wrote NaN into minibatch_cost_end)
    row = study.csv_row(rec)
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert "minibatch_cost_end" in numbers and "straightness" in numbers
    assert all(np.isfinite(v) for v in numbers.values()), {k: v for k, v in numbers.items() if not np.isfinite(v)}
    assert rec["variant"] == variant and rec["n_train"] == 128 and rec["n_eval"] == 64
    assert set(rec["w2_fresh"]) == set(study.NFES) and all(v > 0 for v in rec["w2_fresh"].values())
    fresh = ("independent", "ot") + study.SINKHORN_VARIANTS + study.NEW_VARIANTS  # sdseeded: refilled each epoch
    finite = variant not in fresh  # fresh noise: no table
    assert (rec["caches"] is not None) == finite
    assert all((v is not None) == finite for v in rec["w2_train"].values())
    if finite:
        assert rec["noise_total"] == rec["caches"] * 128
        costs = [v for _, v in rec["dataset_cost_curve"]]
        assert costs[0] == pytest.approx(rec["dataset_cost_start"])
        assert costs[-1] == pytest.approx(rec["dataset_cost_end"])
        if variant == "fixed":
            assert max(costs) == pytest.approx(min(costs), rel=1e-9)  # never reassigned
        else:
            assert all(b <= a * (1 + 1e-6) for a, b in zip(costs, costs[1:]))
    if variant == "converged":
        pre = [v for _, v in rec["converge_curve"]]
        assert rec["dataset_cost_start"] == pytest.approx(pre[-1]) and pre[-1] < pre[0]
    json.dumps(rec)  # JSON-able


def test_grid_outputs_and_resume(tmp_path, capsys):
    out = str(tmp_path / "s")
    argv = [
        "--data",
        "8gaussians",
        "--variants",
        "ot",
        "loom1",
        "--seeds",
        "2",
        "--steps",
        "10",
        "--points",
        "96",
        "--n-eval",
        "48",
        "--batch-size",
        "16",
        "--jobs",
        "1",
        "--out",
        out,
    ]
    records = study.run(study._parser().parse_args(argv))
    assert len(records) == 4
    for name in ("study.csv", "study_summary.csv", "study.md", "study.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    with open(os.path.join(out, "study.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [("ot", "0"), ("ot", "1"), ("loom1", "0"), ("loom1", "1")]
    with open(os.path.join(out, "study_summary.csv")) as f:
        summ = {r["variant"]: r for r in csv.DictReader(f)}
    w = [float(r["w2_fresh_nfe1"]) for r in rows if r["variant"] == "loom1"]
    assert float(summ["loom1"]["w2_fresh_nfe1_mean"]) == pytest.approx(np.mean(w))
    assert float(summ["loom1"]["w2_fresh_nfe1_sd"]) == pytest.approx(np.std(w, ddof=1))
    capsys.readouterr()
    study.run(study._parser().parse_args(argv))  # a rerun finds every run on disk
    assert "4 already in" in capsys.readouterr().out


def test_summary_statistics_and_table():
    def rec(variant, seed, fresh, train):
        return {
            "data": "moons",
            "variant": variant,
            "seed": seed,
            "caches": None if variant == "ot" else 1,
            "n_train": 10,
            "noise_total": None if variant == "ot" else 10,
            "steps": 1,
            "batch_size": 1,
            "n_eval": 10,
            "w2_fresh": {k: fresh for k in study.NFES},
            "w2_train": {k: train for k in study.NFES},
            "w2_floor": 0.3,
            "straightness": 0.1,
        }

    records = [rec("ot", 0, 1.0, None), rec("ot", 1, 2.0, None), rec("loom1", 0, 1.0, 0.5), rec("loom1", 1, 1.4, 0.6)]
    summary = {s["variant"]: s for s in study.summarize(records)}
    w2 = summary["ot"]["w2_fresh_nfe1"]
    assert w2["mean"] == 1.5 and w2["sd"] == pytest.approx(0.5**0.5)
    assert "w2_train_nfe1" not in summary["ot"]
    assert summary["loom1"]["gap_nfe1"]["values"] == pytest.approx([0.5, 0.8])
    md = study.markdown(list(summary.values()))
    assert "| minibatch OT | fresh | 1.500 ± 0.707" in md and "| LOOM 1 cache | 10 |" in md
    assert "| 0.650 ± 0.212 |" in md  # the gap at NFE 1, per seed 0.5 and 0.8
    # seed 0: 1.0 vs 1.0 (not below), seed 1: 1.4 vs 2.0 (below)
    assert "| LOOM 1 cache | 1/2 / 1/2 |" in study.versus_ot(records)


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--steps must be positive"):
        study.run(study._parser().parse_args(["--steps", "0", "--out", str(tmp_path)]))
    with pytest.raises(SystemExit) as exc:  # argparse's usage error: status 2, naming the bad choice
        study._parser().parse_args(["--variants", "loom3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--variants" in err and "invalid choice: 'loom3'" in err
