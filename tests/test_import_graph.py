"""The import graph of ``eta_guard`` has no cycle, counting imports inside functions too.

DESIGN.md: imports point one way (integrations, cli, server, eval above the engine; config,
verdict, errors at the bottom); a lazy import is an import. ``TYPE_CHECKING`` blocks are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "eta_guard"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_eta_guard_has_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_decoding_layer_imports_no_backend() -> None:
    """``eta_guard.decoding`` sits below ``eta_guard.backends`` (lazy imports included)."""
    for name, deps in _graph().items():
        if name.startswith("eta_guard.decoding"):
            upward = {d for d in deps if d.startswith("eta_guard.backends")}
            assert not upward, f"{name} imports {upward}"


def test_the_engine_sits_above_the_backends() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("eta_guard.backends", "eta_guard.decoding", "eta_guard.evaluators")):
            upward = {d for d in deps if d.startswith(("eta_guard.engine", "eta_guard.pipeline"))}
            assert not upward, f"{name} imports {upward}"
