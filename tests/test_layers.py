"""The layers a newcomer can see: the platform (config, stages, cost, tracking, data
pipelines) imports nothing from models, sweeps or serving, and no modules import each
other in a cycle. Imports are read from the source (function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmfactory"
UPPER = ("slmfactory.models", "slmfactory.sweeps", "slmfactory.serving", "slmfactory.pipeline", "slmfactory.cli")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            for t in targets:
                if t.startswith("slmfactory") and t != name:
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in modules and t != name:
                        graph[name].add(t)
    return graph


def test_the_platform_imports_nothing_from_the_layers_above():
    graph = import_graph()
    broken = sorted(f"{src} -> {dst}" for src, dsts in graph.items() if src.startswith("slmfactory.platform")
                    for dst in dsts if dst.startswith(UPPER))
    assert not broken, "the platform must not import models/sweeps/serving: " + ", ".join(broken)


def test_no_modules_import_each_other():
    graph = import_graph()
    # Every edge that closes a cycle, found by a depth-first search.
    state: dict[str, int] = {}
    closing: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                closing.append(" -> ".join(stack[stack.index(n):] + [m, n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not closing, "import cycles: " + "; ".join(closing)


def test_the_graph_sees_real_edges():
    """Guards the walker itself: known edges must be found."""
    graph = import_graph()
    assert "slmfactory.platform.config" in graph["slmfactory.models.lm"]
    assert "slmfactory.platform.stages" in graph["slmfactory.data.tokenizer"]
    assert "slmfactory.models.strategies.base" in graph["slmfactory.models.strategies.slm"]
