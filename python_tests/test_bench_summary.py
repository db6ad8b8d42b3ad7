"""tools/summary.py's targets table on a fabricated pytest-benchmark JSON: met, missed, not run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SUMMARY = Path(__file__).resolve().parents[1] / "tools" / "summary.py"


@pytest.fixture(scope="module")
def summary():
    if not SUMMARY.is_file():
        pytest.skip("tools/summary.py is not next to the tests")
    spec = importlib.util.spec_from_file_location("bench_summary", SUMMARY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _bench(group, provider, median_s):
    return {
        "group": group,
        "name": f"test[{provider}]",
        "fullname": f"bench/x.py::test[{provider}]",
        "params": {"provider": provider},
        "extra_info": {},
        "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 5},
    }


# group -> {provider: median seconds}
FAKE_GROUPS = {
    # assign 64x256: 0.8 ms -> met; the CPU solver beside it
    "assign cuda 64x256 sq3072 f32": {"loom-cuda": 0.8e-3, "loom-cpu": 30e-3},
    # assign 2048: 12 ms -> missed
    "assign cuda 1x2048 sq3072 f32": {"loom-cuda": 12e-3},
    # cost bf16: bmm 1.0 ms, ours 1.1 ms -> 0.91 >= 0.8 met; the tf32 variant must not count as ours
    "cost gpu B=64 256x256 D=3072 bfloat16": {
        "loom.pairwise_cost": 1.1e-3,
        "loom.pairwise_cost(tf32)": 0.1e-3,
        "torch.bmm (product only)": 1.0e-3,
    },
    # cost f32: bmm 1 ms, ours 2 ms -> 0.5 missed; cdist 12 ms -> 6x met
    "cost gpu B=64 256x256 D=3072 float32": {
        "loom.pairwise_cost": 2e-3,
        "torch.bmm (product only)": 1e-3,
        "torch.cdist": 12e-3,
    },
    # sampler: ours (graph) 0.5 ms, eager faster must not count, torchdiffeq 1 ms -> 2x missed
    "sampler euler nfe 8, mlp batch 4096, cuda": {"loom": 0.5e-3, "loom_eager": 0.1e-3, "torchdiffeq": 1e-3},
    # compat solver present, flow_matching baseline absent -> not run
    "compat ODESolver euler mlp cuda": {"loom (cuda graph)": 1e-3},
}
FAKE = {"benchmarks": [_bench(g, p, m) for g, by_provider in FAKE_GROUPS.items() for p, m in by_provider.items()]}


def test_targets_met_missed_not_run(summary):
    rows = summary.evaluate(FAKE)
    by_name = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    assert {t.name for t in summary.TARGETS} == set(by_name), "every target gets a row"

    def one(prefix):
        (name,) = [n for n in by_name if n.startswith(prefix)]
        (row,) = by_name[name]
        return row

    r = one("assign CUDA: 64x256")
    assert r["status"] == "met" and "0.8 ms" in r["ours"] and "loom-cpu: 30 ms" in r["other"]
    assert one("assign CUDA: single N=2048")["status"] == "missed"
    assert one("assign CUDA: single N=8192")["status"] == "not run"
    r = one("pairwise_cost GPU bf16")
    assert r["status"] == "met" and r["value"].startswith("0.91x"), r
    assert one("pairwise_cost GPU f32 >= 80%")["status"] == "missed"
    r = one("pairwise_cost GPU f32 >= 5x")
    assert r["status"] == "met" and r["value"].startswith("6.00x"), r
    assert one("gaussian_noise")["status"] == "not run"
    assert one("LOOM step")["status"] == "not run"
    r = one("sampler GPU")
    assert r["status"] == "missed" and r["value"].startswith("2.00x"), r
    assert one("compat ODESolver")["status"] == "not run"


def test_cli_prints_one_table_even_without_results(summary, tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(FAKE))
    empty = tmp_path / "bench_other.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    summary.main([str(path), str(empty), "--targets", "--gpu", "H200"])  # several files merge
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(summary.evaluate(FAKE))
    assert "| met |" in out and "| missed |" in out and "| not run |" in out
    summary.main([str(tmp_path / "absent.json"), "--targets"])  # the bench stage produced nothing
    out = capsys.readouterr().out
    assert out.count("| not run |") == len(summary.TARGETS)
    summary.main([str(path)])  # the per-group table still works
    assert "| cost gpu B=64 256x256 D=3072 bfloat16 | loom.pairwise_cost(tf32) |" in capsys.readouterr().out
