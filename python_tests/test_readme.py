"""README.md and docs/ kept true: every code block marked runnable runs, and quoted numbers match their source.

A block is marked by an HTML comment on the line before its fence: ``<!-- runnable -->`` (runs here) or
``<!-- runnable: cuda -->`` (skips without a CUDA GPU). Blocks run in a fresh namespace, in a temporary
directory, with small stand-ins for the names a snippet leaves to the reader (``dataset``, ``loader``,
``model``).
"""

import json
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
MARK = re.compile(r"^<!-- runnable(?::\s*(?P<need>[\w ]+))? -->\n```python\n(?P<code>.*?)^```", re.M | re.S)


def _blocks():
    found = []
    for name in DOCS:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for m in MARK.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            need = (m.group("need") or "").split()
            found.append(
                pytest.param(
                    m.group("code"), need, id=f"{name}:{line}", marks=[pytest.mark.cuda] if "cuda" in need else []
                )
            )
    return found


BLOCKS = _blocks()


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 2, "the markers were lost: no runnable block found"


def _stand_ins():
    """What the snippets leave to the reader: a tiny image dataset, its loader of (index, image), a model."""
    images = torch.rand(32, 3, 32, 32) * 2 - 1
    dataset = torch.utils.data.TensorDataset(torch.arange(32), images)
    return {"dataset": dataset, "loader": torch.utils.data.DataLoader(dataset, batch_size=8), "model": lambda x, t: x}


@pytest.mark.parametrize("code, need", BLOCKS)
def test_runnable_block(code, need, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__", **_stand_ins()}
    exec(compile(code, "<readme block>", "exec"), namespace)  # noqa: S102 - the documentation's own code


# ---- quoted numbers against their source -------------------------------------------------------------------


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_evidence_per_seed_values_are_the_json_in_seed_order():
    with open(os.path.join(ROOT, "docs", "demo_8gaussians.json")) as f:
        saved = json.load(f)
    text = " ".join(_read("docs/evidence.md").split())
    names = {"loom": "LOOM-CFM", "ot": "minibatch OT", "independent": "independent"}
    assert saved["seeds"] == [0, 1, 2]
    for key, label in names.items():
        values = " / ".join(f"{v:.3f}" for v in saved["couplings"][key]["w2"]["euler1"]["values"])
        assert f"{label} {values}" in text, (label, values)


def _matches(n, numbers):
    """``n`` (a string as quoted) is one of ``numbers`` rounded to its decimals."""
    places = len(n.split(".")[1]) if "." in n else 0
    return any(round(m, places) == float(n) for m in numbers)


_NUMBER = r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*x\d)"  # not the 64 of "64x256"

# Each README highlight (its "what" cell, start) -> the bench/RESULTS.md rows it quotes (a unique start of each).
HIGHLIGHT_ROWS = {
    "exact assignment, 18 CPU groups": [
        "| assign CPU: geometric-mean speedup over scipy",
        "| assign CPU goal: at or below lapx lapjvh",
    ],
    "assignment batch 64x256": ["| assign CPU goal: batch 64x256"],
    "LOOM coupling step, b=256 CIFAR shape, CPU": ["| LOOM step CPU b=256 CIFAR"],
    "noise 256x3072 from seeds": ["| gaussian_noise CPU >= 10x"],
    "sampler, MLP batch 4096": ["| sampler GPU (CUDA graph) >= 3x torchdiffeq"],
    "CUDA auction, 64x256 batch": ["| assign CUDA: 64x256 sq-Euclidean"],
    "auction sequential steps, slowest of 64x256": ["| sq3072 256x256 (the coupling's step)"],
    "the same, 64x1024": ["| sq3072 64x1024 (N << M", "| sq3072 2048x2048 |", "| sq3072 8192x8192 |"],
}


def _row(results, start):
    rows = [line for line in results.splitlines() if line.startswith(start)]
    assert len(rows) == 1, f"bench/RESULTS.md: {len(rows)} rows start with {start!r}"
    return rows[0]


def test_readme_highlights_are_their_own_results_rows():
    """Every number of a highlight (ours, baseline, ratio) is one of its own RESULTS.md rows' numbers as rounded
    there, or (a ratio) the quotient of two of the highlight's own times."""
    readme, results = _read("README.md"), _read("bench/RESULTS.md")
    table = readme[readme.index("| what | ours | baseline | ratio |") :]
    table = table[: table.index("\n\n")].splitlines()[2:]
    seen = set()
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = [k for k in HIGHLIGHT_ROWS if cells[0].startswith(k)]
        assert len(key) == 1, f"README highlight {cells[0]!r} has no entry in HIGHLIGHT_ROWS (or several)"
        seen.add(key[0])
        own = [float(v) for start in HIGHLIGHT_ROWS[key[0]] for v in re.findall(_NUMBER, _row(results, start))]
        times = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?)\s*ms\b", " ".join(cells[1:3]))]
        ratios = [b / a for a in times for b in times if a > 0 and b != a]
        quoted = [n for cell in cells[1:4] for n in re.findall(_NUMBER, cell)]
        assert quoted, line
        for n in quoted:
            is_ratio = re.search(rf"(?<![\w.]){re.escape(n)}x", " ".join(cells[1:4])) is not None
            assert _matches(n, own) or (is_ratio and _matches(n, ratios)), (
                f"highlight {cells[0]!r}: {n} is not a number of its RESULTS rows {HIGHLIGHT_ROWS[key[0]]}"
            )
    assert seen == set(HIGHLIGHT_ROWS)


def test_the_highlight_check_can_fail():
    # a number any other row holds is refused: 962 (the LOOM step's baseline) is not the noise row's
    own = [float(v) for v in re.findall(_NUMBER, _row(_read("bench/RESULTS.md"), "| gaussian_noise CPU >= 10x"))]
    assert _matches("10.45", own) and _matches("8.8", own) and not _matches("962", own) and not _matches("82", own)


def test_docstring_example_of_the_cost_model():
    from loom_kernels.couplings.scopes.cost_model import predicted_coupling_seconds

    doc = predicted_coupling_seconds.__doc__
    quoted = float(re.search(r'"cuda"\)\s+#\s*~\s*([\d.]+)\s*s', doc).group(1))
    assert predicted_coupling_seconds("global", 64, 256, 3072, 1024, "cuda") == pytest.approx(quoted, rel=0.05)


_TIMING = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:\s?(?:ms|us|µs)\b| (?:s|min|h)\b)")


def _paragraphs(text):
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", re.sub(r"```.*?```", "", text, flags=re.S))]


def test_every_timing_cites_bench_results():
    # A paragraph quoting a time cites the bench/RESULTS.md section it comes from (or the paragraph or
    # heading before it does: tables), unless it says it is an assumption, a model or a prediction.
    exempt = re.compile(r"assum|model|predict", re.I)
    uncited = []
    for name in DOCS:
        paras = _paragraphs(_read(name))
        for i, p in enumerate(paras):
            around = p + (paras[i - 1] if i else "")  # a table is introduced by the paragraph (or heading) before it
            if _TIMING.search(p) and "RESULTS" not in around and not exempt.search(around):
                uncited.append(f"{name}: {p[:100]}")
    assert not uncited, "\n".join(uncited)


def test_cited_results_sections_exist():
    results = " ".join(_read("bench/RESULTS.md").split())
    sections = {m.strip() for m in re.findall(r"^## (.+)$", _read("bench/RESULTS.md"), re.M)}
    cited = []
    for name in DOCS:
        cited += re.findall(r'bench/RESULTS\.md,? "([^"]+)"', " ".join(_read(name).split()))
    assert cited, "no citation found"
    missing = sorted({c for c in cited if c not in sections and f"## {c}" not in results})
    assert not missing, f"cited sections that bench/RESULTS.md does not have: {missing}"
