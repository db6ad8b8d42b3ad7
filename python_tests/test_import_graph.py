"""The package's import graph has no circle, function-level imports included (issue 30).

Every ``import`` statement of every module (at any depth: a function-level import runs too, only
later) is an edge to the package module it names; a module's own parent packages are left out
(Python imports them first anyway). A strongly connected component of more than one module is a
circle. The test plants one in a scratch copy to show it can fail.
"""

import ast
import pathlib
import shutil

import loom_kernels

PKG = pathlib.Path(loom_kernels.__file__).parent


def _modules(root: pathlib.Path) -> dict:
    out = {}
    for path in root.rglob("*.py"):
        parts = ("loom_kernels", *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges(mods: dict) -> dict:
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        here = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loom_kernels"):
                base = node.module
            elif isinstance(node, ast.Import):
                base = None
                for alias in node.names:
                    name = alias.name
                    while name and name not in mods:
                        name = name.rpartition(".")[0]
                    if name:
                        edges[m].add(name)
                continue
            else:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges[m].add(sub if sub in mods else base)
        parents = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
        edges[m] -= parents | {m}
        edges[m] &= set(mods)
    return edges


def _circles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative enough for ~100 modules)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _circles(_edges(_modules(PKG))) == []


def test_a_planted_circle_is_found(tmp_path):
    copy = tmp_path / "loom_kernels"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(copy / "visual.py", "a") as f:
        f.write("\n\ndef _late():\n    from .experiments import plots  # noqa: F401\n")
    assert ["loom_kernels.experiments.plots", "loom_kernels.visual"] in _circles(_edges(_modules(copy)))
