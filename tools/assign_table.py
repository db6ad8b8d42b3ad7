"""Print bench_assign.py's pytest-benchmark JSON as the RESULTS.md table: median ms per provider
and group, speedup over scipy, and the geometric-mean speedups over the single-problem grid.

Usage: python tools/assign_table.py /tmp/assign.json
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    med = defaultdict(dict)  # group -> provider -> median seconds
    order = []
    for b in data["benchmarks"]:
        g, p = b["group"], b["extra_info"]["provider"]
        if g not in med:
            order.append(g)
        med[g][p] = b["stats"]["median"]
    provs = ["scipy", "lapjvh", "loom-cpu"]
    info = data.get("machine_info", {})
    print(f"machine: {info.get('cpu', {}).get('brand_raw', '?')}, {info.get('cpu', {}).get('count', '?')} logical CPUs")
    print(f"date: {data.get('datetime', '?')}\n")
    print("| group | scipy ms | lapjvh ms | loom-cpu ms | loom vs scipy | loom vs lapjvh |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = defaultdict(list)
    for g in order:
        m = med[g]
        cells = [f"{m[p] * 1e3:.3g}" if p in m else "-" for p in provs]
        vs = {}
        for base in ("scipy", "lapjvh"):
            if base in m and "loom-cpu" in m:
                vs[base] = m[base] / m["loom-cpu"]
                if "batch" not in g:
                    ratios[base].append(vs[base])
        ratios = " | ".join(f"{vs[b]:.2f}x" if b in vs else "-" for b in ("scipy", "lapjvh"))
        print(f"| {g} | {' | '.join(cells)} | {ratios} |")
    for base, r in ratios.items():
        gm = math.exp(sum(map(math.log, r)) / len(r))
        print(
            f"\ngeometric-mean speedup of loom-cpu over {base} (single problems, {len(r)} groups): {gm:.2f}x; "
            f"min {min(r):.2f}x, max {max(r):.2f}x"
        )


if __name__ == "__main__":
    main(sys.argv[1])
