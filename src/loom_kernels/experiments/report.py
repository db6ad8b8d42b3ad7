"""The study's outputs: the per-run CSV, the summary over seeds (CSV and markdown), the comparison with
minibatch OT per seed, the memorisation table and the figure (``plots.study_figure``)."""

from __future__ import annotations

import csv
import io
import os

from .._io import atomic_write
from .common import fmt
from .plots import study_figure
from .variants import LABELS, NFES, VARIANTS

__all__ = ["CSV_COLUMNS", "csv_row", "summarize", "markdown", "versus_ot", "write_outputs"]

_PM = " ± "  # the tables' "mean ± sd"

CSV_COLUMNS = (
    ["data", "variant", "seed", "caches", "n_train", "noise_total", "steps", "batch_size", "n_eval"]
    + [f"w2_fresh_nfe{k}" for k in NFES]
    + [f"w2_train_nfe{k}" for k in NFES]
    + [f"gap_nfe{k}" for k in NFES]
    + [
        "w2_floor",
        "straightness",
        "dataset_cost_start",
        "dataset_cost_end",
        "global_optimum",
        "minibatch_cost_end",
        "converge_epochs",
        "final_loss",
        "train_seconds",
        "eval_seconds",
    ]
)


def csv_row(r: dict) -> dict:
    row = {k: r.get(k) for k in CSV_COLUMNS}
    for k in NFES:
        row[f"w2_fresh_nfe{k}"] = r["w2_fresh"][k]
        row[f"w2_train_nfe{k}"] = r["w2_train"][k]
        row[f"gap_nfe{k}"] = None if r["w2_train"][k] is None else r["w2_fresh"][k] - r["w2_train"][k]
    row["converge_epochs"] = r["converge_curve"][-1][0] if "converge_curve" in r else None
    return row


def summarize(records: list) -> list:
    """One row per (data, variant): mean, sd, min, max over seeds of every numeric CSV column."""
    from .common import spread

    groups = {}
    for r in records:
        groups.setdefault((r["data"], r["variant"]), []).append(csv_row(r))
    out = []
    for (data, variant), rows in groups.items():
        s = {
            "data": data,
            "variant": variant,
            "seeds": len(rows),
            "caches": rows[0]["caches"],
            "noise_total": rows[0]["noise_total"],
        }
        for col in CSV_COLUMNS[9:]:
            vals = [x[col] for x in rows if x[col] is not None]
            if vals:
                s[col] = spread(vals)
        out.append(s)
    return out


def markdown(summary: list) -> str:
    """The study's table: per data set and variant, mean ± sd over seeds."""
    head = (
        "variant",
        "noise samples",
        "W2 fresh NFE1",
        "NFE2",
        "NFE4",
        "NFE8",
        "W2 train-noise NFE1",
        "NFE8",
        "gap NFE1 (fresh - train)",
        "gap NFE8",
        "straightness",
        "dataset cost at the end",
        "global optimum",
    )
    lines = []
    for data in dict.fromkeys(s["data"] for s in summary):
        rows = [s for s in summary if s["data"] == data]
        lines += [
            f"\n**{data}** ({rows[0]['seeds']} seeds; W2 data floor {fmt(rows[0]['w2_floor'], sep=_PM)})\n",
            "| " + " | ".join(head) + " |",
            "|---|" + "---:|" * (len(head) - 1),
        ]
        for s in rows:
            cells = [LABELS[s["variant"]], str(s["noise_total"] or "fresh")]
            cells += [fmt(s[f"w2_fresh_nfe{k}"], sep=_PM) for k in NFES]
            cells += [fmt(s.get(key), sep=_PM) for key in ("w2_train_nfe1", "w2_train_nfe8", "gap_nfe1", "gap_nfe8")]
            cells += [
                fmt(s["straightness"], 4, sep=_PM),
                fmt(s.get("dataset_cost_end"), sep=_PM),
                fmt(s.get("global_optimum"), sep=_PM),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _memorisation_table(summary)


def versus_ot(records: list) -> str:
    """On how many seeds each variant's fresh-noise W2 is below minibatch OT's (same data set and seed)."""
    ot = {(r["data"], r["seed"]): r for r in records if r["variant"] == "ot"}
    datasets = list(dict.fromkeys(r["data"] for r in records))
    variants = [v for v in dict.fromkeys(r["variant"] for r in records) if v != "ot"]
    if not ot or not variants:
        return ""
    lines = [
        "\n**Against minibatch OT**: seeds on which the variant's W2 (fresh noise) is below minibatch OT's, "
        "at Euler NFE 1 / NFE 8\n",
        "| variant | " + " | ".join(datasets) + " |",
        "|---|" + "---:|" * len(datasets),
    ]
    for v in variants:
        cells = []
        for d in datasets:
            pairs = [
                (r, ot[(d, r["seed"])])
                for r in records
                if r["data"] == d and r["variant"] == v and (d, r["seed"]) in ot
            ]
            cells.append(
                " / ".join(f"{sum(a['w2_fresh'][k] < b['w2_fresh'][k] for a, b in pairs)}/{len(pairs)}" for k in (1, 8))
                if pairs
                else "-"
            )
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _memorisation_table(summary: list) -> str:
    """W2 on fresh minus W2 on training noise (Euler NFE 8) against caches x points, LOOM only."""
    looms = [v for v in VARIANTS if v.startswith("loom")]
    rows = []
    for data in dict.fromkeys(s["data"] for s in summary):
        by = {s["variant"]: s for s in summary if s["data"] == data}
        cells = [f"{fmt(by[v].get('gap_nfe8'), sep=_PM)} ({by[v]['noise_total']})" if v in by else "-" for v in looms]
        if any(c != "-" for c in cells):
            rows.append(f"| {data} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = "| data | " + " | ".join(LABELS[v] for v in looms) + " |"
    return (
        "\n**Memorisation**: W2 from fresh noise minus W2 from the training noise at Euler NFE 8 "
        "(mean ± sd over seeds; in brackets the noise samples, caches x points)\n\n"
        + "\n".join([head, "|---|" + "---:|" * len(looms)] + rows)
        + "\n"
    )


def write_outputs(records: list, out: str) -> None:
    def write_csv(path, rows, cols):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")

    write_csv(os.path.join(out, "study.csv"), [csv_row(r) for r in records], CSV_COLUMNS)
    summary = summarize(records)
    flat = []
    for s in summary:
        row = {k: s[k] for k in ("data", "variant", "seeds", "caches", "noise_total")}
        for col in CSV_COLUMNS[9:]:
            if col in s:
                for stat in ("mean", "sd", "min", "max"):
                    row[f"{col}_{stat}"] = s[col][stat]
        flat.append(row)
    cols = list(dict.fromkeys(k for row in flat for k in row))
    write_csv(os.path.join(out, "study_summary.csv"), flat, cols)
    md = markdown(summary) + versus_ot(records)
    atomic_write(os.path.join(out, "study.md"), lambda f: f.write(md), mode="w")
    print(md)
    study_figure(records, summary, os.path.join(out, "study.png"))
