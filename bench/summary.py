"""Print pytest-benchmark JSON as one markdown table: per group, each provider's median and its
ratio to ours (providers named ``loom*``). Usage: python bench/summary.py bench.json [--gpu NAME]"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _provider(bench):
    params = bench.get("params") or {}
    extra = bench.get("extra_info") or {}
    return str(params.get("provider") or extra.get("provider") or bench["name"])


def rows(data):
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b.get("group") or b["fullname"].split("[")[0]].append(b)
    for group, benches in groups.items():
        ours = [b["stats"]["median"] for b in benches if _provider(b).startswith("loom")]
        best_ours = min(ours) if ours else None
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            med = b["stats"]["median"]
            ratio = f"{med / best_ours:.2f}x" if best_ours else ""
            extra = b.get("extra_info") or {}
            note = ", ".join(f"{k}={v}" for k, v in extra.items() if k != "provider")
            yield group, _provider(b), med * 1e3, b["stats"]["iqr"] * 1e3, b["stats"]["rounds"], ratio, note


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--gpu", default="", help="device name to print in the header")
    args = ap.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"machine: {info.get('cpu', {}).get('brand_raw', '?')} {args.gpu}".rstrip())
    print(f"date: {data.get('datetime', '?')}\n")
    print("| group | provider | median ms | IQR ms | rounds | time / ours | extra |")
    print("|---|---|---:|---:|---:|---:|---|")
    for group, prov, med, iqr, rounds, ratio, note in rows(data):
        print(f"| {group} | {prov} | {med:.4g} | {iqr:.3g} | {rounds} | {ratio} | {note} |")


if __name__ == "__main__":
    main()
