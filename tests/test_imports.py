"""The subpackages of ``suite`` import one another in one direction only (no cycles).

A node is a subpackage (``suite/data``, ``suite/scenario``, ...); the top-level modules (``suite/plan.py``,
``suite/records.py``, ``suite/registry.py``, ``suite/cli.py`` ...) are shared floors and entry points, not
nodes, and a path through them is not counted. An edge A -> B is any ``import`` of B's modules in A's files, at the top of a file or inside a function
(both count: a function-level import is still a dependency, only deferred). A cycle is printed with the
file of each edge, so the fix starts from the output.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import suite

ROOT = Path(suite.__file__).parent

# Edges of cycles inside the plug-in area (techniques, workloads, models), being untangled with the
# plug-in rework: each is named so that no other cycle can hide behind it, and the test fails once it
# no longer closes a cycle (then delete its line).
KNOWN: set[tuple[str, str]] = {
}


def _node(parts: tuple[str, ...]) -> str:
    """'data' for suite/data/..."""
    return parts[0]


def import_graph() -> dict[str, dict[str, set[str]]]:
    """{node: {imported node: {files doing it}}} over every module of the suite package."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = _node(rel.parts)
        package = ["suite", *rel.parts[:-1]]  # the package relative imports start from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                # `from suite import registry` imports the module suite.registry
                names = [f"{module}.{a.name}" for a in node.names] if module == "suite" else [module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "suite" or len(parts) < 2:
                    continue
                dst = parts[1]
                if len(rel.parts) > 1 and (ROOT / dst).is_dir() and dst != src:
                    graph[src][dst].add(str(rel))
    return graph


def components(graph) -> list[list[str]]:
    """The strongly connected components of more than one node: each is one or more cycles (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps)


def _describe(graph, comp: list[str]) -> str:
    """The component's edges, each with the files that make it."""
    return "  cycle among " + ", ".join(comp) + ":\n" + "\n".join(
        f"    {a} -> {b}: {', '.join(sorted(graph[a][b]))}" for a in comp for b in sorted(graph[a]) if b in comp)


def without(graph, edges) -> dict:
    return {a: {b: f for b, f in out.items() if (a, b) not in edges} for a, out in graph.items()}


def test_no_import_cycles_between_subpackages():
    graph = import_graph()
    found = components(without(graph, KNOWN))
    assert not found, "import cycles between suite's subpackages:\n" + "\n".join(_describe(graph, c) for c in found)
    for a, b in KNOWN:  # a known edge that no longer closes a cycle must leave the list
        assert any(a in c and b in c for c in components(graph)), f"{a} -> {b} is no longer in a cycle: remove it from KNOWN"


def test_the_graph_sees_both_kinds_of_import(tmp_path, monkeypatch):
    """A function-level import and a relative import are edges too: a planted cycle is found."""
    for name, text in {"a/__init__.py": "", "a/m.py": "def f():\n    from suite.b import x\n",
                       "b/__init__.py": "", "b/x.py": "from ..a import m\n", "c/y.py": "import suite.a.m\n",
                       "top.py": "import suite.c.y\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["a"]["b"] == {"a/m.py"} and graph["b"]["a"] == {"b/x.py"} and "a" in graph["c"] and "top.py" not in graph
    assert components(graph) == [["a", "b"]]
