"""The docs name only what exists: every repository path, test file and ``test_x.py::name`` that README.md or
a docs/ page names is checked against the checkout (a moved test or file fails here, not in a reader's shell)."""

import ast
import functools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "loom_kernels"
TOP = ("python_tests", "src", "csrc", "bench", "docs", "tools", "examples", ".ci")
# a path-like token (a/b/c.py, dir/) or a file name, optionally ::test_name; not a pattern (bench/bench_<m>.py, *)
TOKEN = re.compile(
    r"(?<![\w./:-])((?:\.ci|[A-Za-z_][\w-]*)(?:/[\w.-]+)+/?|[\w-]+\.(?:py|md|sh))(?:::([A-Za-z_]\w*))?(?![\w/<*-])"
)
# Names the docs use for files a user writes or a run produces (not files of this repository).
OUTPUTS = ("runs/", "study/", "dist/", "out/")


def _pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@functools.cache
def _tests_by_name():
    return {p.name: p for p in (ROOT / "python_tests").rglob("test_*.py")} | {
        p.name: p for p in (ROOT / "bench").rglob("*.py")
    }


@functools.cache
def _defined(path: Path) -> set:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}


def _resolve(token: str):
    """The file or folder ``token`` names, None when it names nothing checkable, False when it is missing."""
    token = token.rstrip(".")
    first = token.split("/")[0]
    if token.startswith(OUTPUTS) or "/" in token and not token.rstrip("/").split("/")[-1]:
        return None
    if first in TOP:
        return ROOT / token if (ROOT / token).exists() else False
    if "/" in token:
        if not token.endswith((".py", ".cu", ".cpp", ".h", ".sh", ".md")):
            return None  # prose (K/W, pre/post, sinkhorn/unbalanced/partial)
        # a docs/ page links relative to docs/
        for base in (PKG, ROOT / "src", ROOT / "python_tests", ROOT / "csrc", ROOT / "bench", ROOT, ROOT / "docs"):
            if (base / token).exists():
                return base / token
        return False
    if re.fullmatch(r"test_\w+\.py", token):
        return _tests_by_name().get(token, False)
    if token.endswith(".md"):
        return next((p for p in (ROOT / token, ROOT / "docs" / token) if p.exists()), False)
    return None  # a bare file name of another kind: setup.py, a user's train.py


def _references(text: str):
    text = re.sub(r"https?://\S+", "", text)
    for m in TOKEN.finditer(text):
        yield m.group(1), m.group(2)


def missing_in(text: str) -> list:
    """Every path or test named in ``text`` that the checkout lacks (``name::test`` whose test is not defined)."""
    bad = []
    for token, test in _references(text):
        found = _resolve(token)
        if found is False:
            bad.append(token)
        elif test and found and found.suffix == ".py" and test not in _defined(found):
            bad.append(f"{token}::{test}")
    return bad


@pytest.mark.parametrize("page", _pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_docs_name_only_existing_files_and_tests(page):
    bad = missing_in(page.read_text())
    assert not bad, f"{os.path.relpath(page, ROOT)} names what does not exist: {sorted(set(bad))}"


def test_the_check_can_fail():
    assert missing_in("see `python_tests/test_io.py` and docs/scaling.md") == []
    assert missing_in("see `python_tests/test_nothing.py`") == ["python_tests/test_nothing.py"]
    assert missing_in("test_io.py::test_bad_mode and test_io.py::test_gone") == ["test_io.py::test_gone"]
    assert missing_in("`test_gone.py`, couplings/gone.py, src/loom_kernels/gone/") == [
        "test_gone.py",
        "couplings/gone.py",
        "src/loom_kernels/gone/",
    ]
    assert missing_in("runs/cb/model.pt, K/W, pre/post, setup.py, https://x.org/a/b.py, bench/bench_<m>.py") == []
