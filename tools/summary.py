"""pytest-benchmark JSON as markdown: every group's providers with their ratio to ours (providers
named ``loom*``), or with ``--targets`` one table of every GPU target of bench/RESULTS.md.

    python tools/summary.py bench.json [more.json ...] [--gpu NAME]   # per-group table
    python tools/summary.py out/bench_*.json --targets                # met / missed / not run

A target finds its benchmarks by group and provider names (regular expressions), so
a benchmark that did not run (missing module, skipped, failed) gives a "not run" row instead of
an error. New benchmarks meet a target by using these names: the compat solver's group must
match ``compat.*solver`` with providers ``loom...`` and ``flow_matching...``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass


def _provider(bench):
    params = bench.get("params") or {}
    extra = bench.get("extra_info") or {}
    return str(params.get("provider") or extra.get("provider") or bench["name"])


def _groups(data):
    groups = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b["fullname"].split("[")[0]].append(b)
    return groups


def rows(data):
    for group, benches in _groups(data).items():
        ours = [b["stats"]["median"] for b in benches if _provider(b).startswith("loom")]
        best_ours = min(ours) if ours else None
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            ratio = f"{med / best_ours:.2f}x" if best_ours else ""
            extra = b.get("extra_info") or {}
            note = ", ".join(f"{k}={v}" for k, v in extra.items() if k != "provider")
            yield group, _provider(b), med * 1e3, b["stats"]["iqr"] * 1e3, b["stats"]["rounds"], ratio, note


# ---- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``max_ms``: our median must be at most this. ``min_ratio``: baseline median / our median
    (how many times faster we are; for a rate, our rate as a fraction of the baseline's) must be
    at least this. ``beside``: a provider whose median is printed next to ours (no pass/fail)."""

    name: str
    group: str  # regular expression, searched in the group name
    ours: str  # regular expression matched at the start of the provider name
    max_ms: float | None = None
    baseline: str | None = None  # as ours
    min_ratio: float | None = None
    beside: str | None = None


TARGETS = [
    Target(
        "assign CUDA: 64x256 sq-Euclidean <= 1 ms (#3)",
        r"^assign cuda 64x256",
        r"loom-cuda$",
        max_ms=1.0,
        beside=r"loom-cpu$",
    ),
    Target(
        "assign CUDA: single N=2048 <= 10 ms (#3)",
        r"^assign cuda 1x2048",
        r"loom-cuda$",
        max_ms=10.0,
        beside=r"loom-cpu$",
    ),
    Target("assign CUDA: single N=8192 <= 200 ms (#3)", r"^assign cuda 1x8192", r"loom-cuda$", max_ms=200.0),
    Target(
        "pairwise_cost GPU bf16 >= 80% of bmm's rate (#4)",
        r"^cost gpu .*b(f|float)16$",
        r"loom\.pairwise_cost$",
        baseline=r"torch\.bmm",
        min_ratio=0.8,
    ),
    Target(
        "pairwise_cost GPU f32 >= 80% of bmm's rate (#4)",
        r"^cost gpu .*f(loat)?32$",
        r"loom\.pairwise_cost$",
        baseline=r"torch\.bmm",
        min_ratio=0.8,
    ),
    Target(
        "pairwise_cost GPU f32 >= 5x torch.cdist (#4)",
        r"^cost gpu .*f(loat)?32$",
        r"loom\.pairwise_cost$",
        baseline=r"torch\.cdist",
        min_ratio=5.0,
    ),
    Target(
        "gaussian_noise GPU >= 70% of write bandwidth (#4)",
        r"^noise gpu 16384x",
        r"loom\.gaussian_noise$",
        baseline=r"torch\.empty\.fill_",
        min_ratio=0.7,
    ),
    Target("LOOM step GPU b=256 CIFAR <= 1 ms (#5)", r"^coupling step cuda cifar .*b=256\b", r"loom", max_ms=1.0),
    Target(
        "sampler GPU (CUDA graph) >= 3x torchdiffeq, MLP 4096 (#6)",
        r"^sampler euler .*mlp batch 4096.*cuda",
        r"loom$",
        baseline=r"torchdiffeq",
        min_ratio=3.0,
    ),
    Target(
        "compat ODESolver (CUDA graph) >= 3x flow_matching",
        r"(?i)compat.*solver",
        r"loom",
        baseline=r".*flow_matching",
        min_ratio=3.0,
    ),
]


def _pick(benches, pattern):
    """The best (lowest) median of the providers ``pattern`` matches (at the start), in seconds."""
    meds = [b["stats"]["median"] for b in benches if re.match(pattern, _provider(b))]
    return min(meds) if meds else None


def _label(pattern):
    return pattern.replace("\\", "").replace(".*", "").rstrip("$")


def _fmt_ms(sec):
    return "" if sec is None else f"{sec * 1e3:.4g} ms"


def evaluate(data, targets=TARGETS):
    """One dict per target and matching group: name, group, ours, other, value, status."""
    groups = _groups(data)
    out = []
    for t in targets:
        matched = [g for g in groups if re.search(t.group, g)]
        if not matched:
            out.append(dict(name=t.name, group="", ours="", other="", value="", status="not run"))
            continue
        for g in sorted(matched):
            benches = groups[g]
            ours = _pick(benches, t.ours)
            other_p = t.baseline or t.beside
            other = _pick(benches, other_p) if other_p else None
            row = dict(
                name=t.name,
                group=g,
                ours=_fmt_ms(ours),
                other=f"{_label(other_p)}: {_fmt_ms(other)}" if other is not None else "",
            )
            if ours is None or (t.min_ratio is not None and other is None):
                row.update(value="", status="not run")
            elif t.max_ms is not None:
                row.update(
                    value=f"{ours * 1e3:.4g} ms (limit {t.max_ms:g})",
                    status="met" if ours * 1e3 <= t.max_ms else "missed",
                )
            else:
                ratio = other / ours
                row.update(
                    value=f"{ratio:.2f}x (need {t.min_ratio:g}x)", status="met" if ratio >= t.min_ratio else "missed"
                )
            out.append(row)
    return out


def print_targets(data):
    print("| target | group | ours (median) | baseline / beside | value | status |")
    print("|---|---|---:|---|---:|---|")
    for r in evaluate(data):
        print(f"| {r['name']} | {r['group']} | {r['ours']} | {r['other']} | {r['value']} | {r['status']} |")


def load(paths):
    """The benchmarks of every readable JSON file, one dict (the first file's machine and date);
    unreadable or missing files are reported and skipped (their benchmarks did not run)."""
    data = {"benchmarks": []}
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            print(f"(no benchmark results in {path}: {e})")
            continue
        data.setdefault("machine_info", part.get("machine_info", {}))
        data.setdefault("datetime", part.get("datetime"))
        data["benchmarks"] += part.get("benchmarks", [])
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s), merged")
    ap.add_argument("--gpu", default="", help="device name to print in the header")
    ap.add_argument("--targets", action="store_true", help="print the targets table instead of the groups")
    args = ap.parse_args(argv)
    data = load(args.json)
    info = data.get("machine_info", {})
    print(f"machine: {info.get('cpu', {}).get('brand_raw', '?')} {args.gpu}".rstrip())
    print(f"date: {data.get('datetime', '?')}\n")
    if args.targets:
        print_targets(data)
        return
    print("| group | provider | median ms | IQR ms | rounds | time / ours | extra |")
    print("|---|---|---:|---:|---:|---:|---|")
    for group, prov, med, iqr, rounds, ratio, note in rows(data):
        print(f"| {group} | {prov} | {med:.4g} | {iqr:.3g} | {rounds} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
