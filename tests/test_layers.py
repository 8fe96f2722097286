"""The layers a newcomer can see, bottom to top:

    platform   config, stages, cost, footprint, tracking, runtime, errors, the registry
    data       corpus, tokenizer, token streams, embeddings, clusters, resampling
    models     the LM, the trainer, the phase library, the strategies (one file each)
    trial      a trial's identity and its MLflow run          (slmfactory/trial.py)
    pipeline   the one trial driver                           (slmfactory/pipeline.py)
    sweeps     plan, run, report, the sweep's MLflow run      serving   the Serve app
    cli        the command line

Each imports only from the layers below it; ``sweeps`` and ``serving`` stand side by side
and never import each other; serving imports no training code (only the model
architectures and the instant builder); no modules import each other in a cycle.
Imports are read from the source (function-level ones included).

The platform names one package above it at run time, by string: the strategy registry
imports ``slmfactory.models.strategies`` on its first lookup (``platform/registry.py``
says why); that is not a static import and this test does not count it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slmfactory"
UPPER = ("slmfactory.models", "slmfactory.sweeps", "slmfactory.serving", "slmfactory.pipeline", "slmfactory.cli")
LAYERS = {
    # layer: what it may import (itself included)
    "slmfactory.platform": ("slmfactory.platform",),
    "slmfactory.data": ("slmfactory.platform", "slmfactory.data"),
    "slmfactory.models": ("slmfactory.platform", "slmfactory.data", "slmfactory.models"),
    "slmfactory.trial": ("slmfactory.platform",),
    "slmfactory.pipeline": ("slmfactory.platform", "slmfactory.data", "slmfactory.models", "slmfactory.trial"),
    "slmfactory.sweeps": ("slmfactory.platform", "slmfactory.data", "slmfactory.models", "slmfactory.trial",
                          "slmfactory.pipeline", "slmfactory.sweeps"),
    "slmfactory.serving": ("slmfactory.platform", "slmfactory.data", "slmfactory.trial", "slmfactory.serving",
                           # the model architectures and the instant builder; no training code
                           "slmfactory.models.lm", "slmfactory.models.projected", "slmfactory.models.instant"),
}


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


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def test_each_layer_imports_only_the_layers_below_it():
    graph = import_graph()
    broken = []
    for src, dsts in graph.items():
        layer = _layer(src)
        if layer is None:
            continue  # the cli (and the package's __init__) may import anything
        allowed = LAYERS[layer]
        broken += [f"{src} -> {dst}" for dst in sorted(dsts)
                   if not any(dst == a or dst.startswith(a + ".") for a in allowed)]
    assert not broken, "imports that climb a layer (or cross sweeps/serving): " + ", ".join(broken)


def test_every_module_has_a_layer():
    """A new module lands in a layer the table above names (or is the cli)."""
    graph = import_graph()
    orphans = sorted(m for m in graph if _layer(m) is None and m not in ("slmfactory", "slmfactory.cli"))
    assert not orphans, f"modules outside every layer: {orphans}"


def test_the_instant_builder_is_the_only_training_code_serving_reaches():
    """Transitively: what serving imports reaches the trainer only through the instant
    builder (which fine-tunes a new domain), never through sweeps or the driver."""
    graph = import_graph()
    seen, todo = set(), [m for m in graph if m.startswith("slmfactory.serving")]
    while todo:
        m = todo.pop()
        for n in graph[m]:
            if n not in seen and n != "slmfactory.models.instant":
                seen.add(n)
                todo.append(n)
    assert not [m for m in seen if m.startswith(("slmfactory.sweeps", "slmfactory.pipeline", "slmfactory.cli"))]
    assert "slmfactory.models.trainer" not in seen and "slmfactory.models.strategies" not in seen


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
    assert "slmfactory.platform.config" in graph["slmfactory.trial"]
    assert "slmfactory.data.clusters" in graph["slmfactory.data.cluster_pipeline"]
