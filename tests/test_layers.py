"""The layers a newcomer can see, bottom to top:

    platform   config, stages, cost, footprint, tracking, runtime, errors, the registry
    trial      a trial's identity, its record (the names of every metric and tag it logs)
               and its MLflow run                             (slmfactory/trial.py)
    data       corpus, tokenizer, token streams, embeddings, clusters, resampling
    models     the LM, the trainer, the phase library, the strategies (one file each)
    pipeline   the one trial driver                           (slmfactory/pipeline.py)
    sweeps     plan, run, the sweep's MLflow run    analysis   frontier, report, figures    serving   the Serve app
    demo, cli  the demo driver and the command line: they join the three

Each imports only from the layers below it; ``sweeps`` (running a sweep), ``analysis``
(reading one back from MLflow, which needs no trial code) and ``serving`` stand side by side
and never import each other; no modules import each other in a cycle. Serving imports the
model architectures and no training code, with one stated exception: three serving modules
import the instant builder (``models.instant``), which fine-tunes a run-time domain and so
brings in the fine-tune phase, the trainer and the Ray launcher. ``SERVING_TO_TRAINING``
lists exactly those imports and why; any other is a failure. Imports are read from the
source (function-level ones included).

The platform names one package above it at run time, by string: the strategy registry
imports ``slmfactory.models.strategies`` on its first lookup (``platform/registry.py``
says why); that is not a static import and this test does not count it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slmfactory"
UPPER = ("slmfactory.models", "slmfactory.sweeps", "slmfactory.analysis", "slmfactory.serving", "slmfactory.pipeline",
         "slmfactory.demo", "slmfactory.cli")
TOP = ("slmfactory", "slmfactory.demo", "slmfactory.cli")
"""Above every layer: the package's ``__init__``, the demo driver and the cli may import anything."""
LAYERS = {
    # layer: what it may import (itself included)
    "slmfactory.platform": ("slmfactory.platform",),
    "slmfactory.data": ("slmfactory.platform", "slmfactory.data"),
    # The phase library and the strategies write the trial record's metrics by its names.
    "slmfactory.models": ("slmfactory.platform", "slmfactory.data", "slmfactory.trial", "slmfactory.models"),
    "slmfactory.trial": ("slmfactory.platform",),
    "slmfactory.pipeline": ("slmfactory.platform", "slmfactory.data", "slmfactory.models", "slmfactory.trial"),
    "slmfactory.sweeps": ("slmfactory.platform", "slmfactory.data", "slmfactory.models", "slmfactory.trial",
                          "slmfactory.pipeline", "slmfactory.sweeps"),
    "slmfactory.analysis": ("slmfactory.platform", "slmfactory.trial", "slmfactory.analysis"),
    "slmfactory.serving": ("slmfactory.platform", "slmfactory.data", "slmfactory.trial", "slmfactory.serving",
                           # the model architectures; no training code (but SERVING_TO_TRAINING)
                           "slmfactory.models.arch"),
}
SERVING_TO_TRAINING = {
    # (serving module, training module it imports): why. Every import lazy, inside a function.
    ("slmfactory.serving.domains.runtime", "slmfactory.models.instant"):
        "a domain created at run time (POST /v1/domains, `slmfactory specialize`) is built and "
        "fine-tuned by the instant builder, in the serving process",
}
"""The only imports from serving into training code, each with why. Training code: every
``slmfactory.models`` module but the architectures, and the layers above models."""
ARCHITECTURES = "slmfactory.models.arch"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_from(node: ast.ImportFrom, name: str, is_package: bool) -> str | None:
    """The absolute module a ``from ... import`` in module ``name`` reads from: relative
    ones (``from . import x``, ``from ..data import y``) resolved against its package."""
    if node.level == 0:
        return node.module
    package = name.split(".") if is_package else name.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None  # beyond the top package: Python refuses it too
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def faces() -> dict[str, dict[str, str]]:
    """Subsystem package -> {exported name: its module} (``EXPORTS`` and ``MODULES``, the
    modules exported whole, read from the source)."""
    out = {}
    for init in PACKAGE.rglob("__init__.py"):
        package = module_name(init)
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXPORTS" for t in node.targets):
                out.setdefault(package, {}).update({n: f"{package}.{m}" for m, names in
                                                    ast.literal_eval(node.value).items() for n in names})
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODULES" for t in node.targets):
                out.setdefault(package, {}).update({m: f"{package}.{m}" for m in ast.literal_eval(node.value)})
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    face = faces()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (
                    module := imported_from(node, name, path.name == "__init__.py")) is not None:
                # `from pkg import mod` imports the module pkg.mod when there is one; a name a
                # subsystem's face exports (imported on first use) is an edge to its module.
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else
                           face.get(module, {}).get(a.name, module) for a in node.names]
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
    assert not broken, "the platform must not import models/sweeps/analysis/serving: " + ", ".join(broken)


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def climbing_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs a layer or crosses between side-by-side layers."""
    broken = []
    for src, dsts in graph.items():
        layer = _layer(src)
        if layer is None:
            continue  # TOP: may import anything
        allowed = LAYERS[layer]
        broken += [f"{src} -> {dst}" for dst in sorted(dsts)
                   if not any(dst == a or dst.startswith(a + ".") for a in allowed)
                   and (src, dst) not in SERVING_TO_TRAINING]
    return broken


def test_each_layer_imports_only_the_layers_below_it():
    broken = climbing_imports(import_graph())
    assert not broken, "imports that climb a layer (or cross sweeps/analysis/serving): " + ", ".join(broken)


@pytest.mark.parametrize("src, dst", [
    ("slmfactory.analysis.frontier", "slmfactory.sweeps.run"),      # across: reading back -> running
    ("slmfactory.sweeps.run", "slmfactory.analysis.report"),        # across: running -> reading back
    ("slmfactory.serving.server", "slmfactory.analysis.frontier"),  # across: serving -> reading back
    ("slmfactory.analysis.report", "slmfactory.pipeline"),          # up: reading back needs no trial driver
    ("slmfactory.analysis.figures", "slmfactory.demo"),             # up: to the demo driver
    ("slmfactory.platform.cost", "slmfactory.analysis.frontier"),   # up: from the platform
    ("slmfactory.trial", "slmfactory.models.train.phases"),               # up: the record stands on the platform
])
def test_the_layer_check_fails_on_an_upward_or_crossing_import(src, dst):
    """Guards the checker: one added import that climbs or crosses is reported, by name."""
    graph = import_graph()
    assert src in graph and dst in graph and dst not in graph[src]
    before = set(climbing_imports(graph))
    graph[src].add(dst)
    assert set(climbing_imports(graph)) - before == {f"{src} -> {dst}"}


def test_every_module_has_a_layer():
    """A new module lands in a layer the table above names (or is one of ``TOP``)."""
    graph = import_graph()
    orphans = sorted(m for m in graph if _layer(m) is None and m not in TOP)
    assert not orphans, f"modules outside every layer: {orphans}"


def _is_training(module: str) -> bool:
    if module.startswith("slmfactory.models"):
        return module != "slmfactory.models" and not (module == ARCHITECTURES or module.startswith(ARCHITECTURES + "."))
    return module.startswith(UPPER) and not module.startswith(("slmfactory.serving", "slmfactory.analysis"))


def test_serving_reaches_training_code_only_through_the_stated_imports():
    """Transitively: leave out the imports ``SERVING_TO_TRAINING`` states and what serving
    imports reaches no training code (no trainer, phase library, launcher, strategy, driver,
    sweep or cli); each stated import exists and is the training code the docstring names."""
    graph = import_graph()
    direct = {(src, dst) for src, dsts in graph.items() if src.startswith("slmfactory.serving")
              for dst in dsts if _is_training(dst)}
    assert direct == set(SERVING_TO_TRAINING), (
        f"serving imports training code not stated in SERVING_TO_TRAINING: {sorted(direct - set(SERVING_TO_TRAINING))}; "
        f"stated but gone (delete them): {sorted(set(SERVING_TO_TRAINING) - direct)}")
    seen, todo = set(), [m for m in graph if m.startswith("slmfactory.serving")]
    while todo:
        m = todo.pop()
        for n in graph[m]:
            if (m, n) not in SERVING_TO_TRAINING and n not in seen:
                seen.add(n)
                todo.append(n)
    reached = sorted(m for m in seen if _is_training(m))
    assert not reached, f"serving reaches training code outside SERVING_TO_TRAINING: {reached}"
    # The exception is what it says: through the instant builder, serving reaches the trainer.
    through, todo = set(), ["slmfactory.models.instant"]
    while todo:
        for n in graph[todo.pop()]:
            if n not in through:
                through.add(n)
                todo.append(n)
    assert {"slmfactory.models.train.trainer", "slmfactory.models.train.phases", "slmfactory.models.train.distributed"} <= through
    assert not [m for m in through if m.startswith(("slmfactory.sweeps", "slmfactory.pipeline", "slmfactory.cli"))]


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
    assert "slmfactory.platform.config" in graph["slmfactory.models.arch.lm"]
    assert "slmfactory.platform.stages" in graph["slmfactory.data.tokens.tokenizer"]
    assert "slmfactory.models.strategies.base" in graph["slmfactory.models.strategies.slm"]
    assert "slmfactory.platform.config" in graph["slmfactory.trial"]
    assert "slmfactory.data.clustering.clusters" in graph["slmfactory.data.clustering.pipeline"]


@pytest.mark.parametrize("source, module, is_package, want", [
    ("from . import config", "slmfactory.platform.stages", False, "slmfactory.platform"),
    ("from .config import RunConfig", "slmfactory.platform.stages", False, "slmfactory.platform.config"),
    ("from ...serving import app", "slmfactory.models.arch.lm", False, "slmfactory.serving"),
    ("from .strategies import base", "slmfactory.models", True, "slmfactory.models.strategies"),
    ("from .... import x", "slmfactory.models.arch.lm", False, None),
])
def test_relative_imports_are_resolved_to_the_module_they_name(source, module, is_package, want):
    """An upward import spelt relatively (``from ..serving import app``) is an edge too."""
    assert imported_from(ast.parse(source).body[0], module, is_package) == want


def test_the_package_imports_nothing_from_outside_the_wheel():
    """The wheel carries ``slmfactory`` alone: no module of it imports the study's write-up
    (``study/``), the scripts or the tests of a checkout."""
    outside = ("study", "scripts", "tests", "bench")
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            found += [f"{module_name(path)} -> {n}" for n in names if n.split(".")[0] in outside]
    assert not found, "package modules importing from outside the wheel: " + ", ".join(found)


def _bound_names(target: ast.expr) -> list[str]:
    """The names an assignment target binds (``f = ...``, ``a, b = ...``); ``f.tool = ...``
    binds none."""
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _bound_names(e)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return []


def redefined_names(source: str) -> list[str]:
    """Top-level functions and classes a module defines twice (the second silently replaces
    the first: every caller of the first then gets the second)."""
    defined, bound, twice = set(), set(), []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names, is_def = [node.name], True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            # An assignment that rebinds a function or class replaces it as a second def does.
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names, is_def = [n for t in targets for n in _bound_names(t)], False
        else:
            continue
        for n in names:
            if n in defined or (is_def and n in bound):
                twice.append(n)
            (defined if is_def else bound).add(n)
    return twice


def test_no_module_defines_a_name_twice():
    found = {module_name(p): twice for p in PACKAGE.rglob("*.py") if (twice := redefined_names(p.read_text()))}
    assert found == {}
    assert redefined_names("class A:\n    pass\n\n\ndef f():\n    pass\n\n\nclass A:\n    pass\n") == ["A"]
    assert redefined_names("def f():\n    pass\n\n\nf = 1\n") == ["f"]
    assert redefined_names("F = 1\n\n\ndef F():\n    pass\n") == ["F"]
    assert redefined_names("x = 1\nx = 2\n\n\ndef f():\n    pass\n") == []  # plain variables may change


RUN_TIME_FORBIDDEN = ("slmfactory.models.train.trainer", "slmfactory.models.train.phases", "slmfactory.models.train.distributed",
                      "slmfactory.models.strategies", "slmfactory.models.instant", "slmfactory.pipeline",
                      "slmfactory.sweeps", "ray.train", "ray.data", "ray.tune")
"""What building a config and starting to serve must not import, at run time as statically."""

SERVING_START = """
import asyncio, json, sys
from slmfactory.platform.config import from_dict, load_config
cfg = load_config(sys.argv[1], {"workdir": sys.argv[2]})           # a RunConfig, as a driver builds it
from slmfactory.serving.app import build_app                       # what a replica's process imports
app = build_app({"config": sys.argv[1], "set": [f"workdir={sys.argv[2]}"], "models": sys.argv[3]})
args = app._bound_deployment.init_args                             # what each replica is started with
from slmfactory.serving.domains.runtime import RuntimeDomains
from slmfactory.serving.engine import load, score_ids
from slmfactory.serving.server import import_everything
import_everything()                                                # a replica's first act (DomainServer)
replica_cfg = from_dict(args[4]["config"])                         # its config, from the app's arguments

async def start():
    domains = RuntimeDomains(replica_cfg, list(args[0]), 2)       # its run-time domains, on its loop
    await asyncio.sleep(0.5)
    return domains

asyncio.run(start())
loaded = load(args[0]["legal"]["source"]["path"])                  # a start-up model loads and answers
scores = score_ids(loaded, [loaded.tokenizer.encode("The licence grants permission to any person.")])
modules = sorted(sys.modules)
same = replica_cfg.to_tree(resolved=False) == cfg.to_tree(resolved=False)
print(json.dumps({"scored": len(scores[0]), "modules": modules, "config": same}))
"""


def test_a_config_and_the_serving_path_import_no_training_code_at_run_time(tiny_root, tmp_path):
    """In a fresh process: building a ``RunConfig`` from a recipe, the Serve app (the
    catalog, the replicas' arguments), a replica's start (its imports, its config, its
    run-time domains) and a start-up model answering a score import no trainer, phase
    library, launcher, strategy, instant builder, Ray Train, Ray Data or Ray Tune module.
    The static checks above read the source; this one runs it, so a lazy import or a
    name looked up at run time (the strategy registry) counts too."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    import torch

    from slmfactory.models.train.phases import export_hf, load_lm
    from slmfactory.platform.config import load_config

    tiny = PACKAGE.parent / "configs" / "tiny.yaml"
    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    cfg = load_config(tiny, {"workdir": str(work)})
    torch.manual_seed(0)
    export_hf(cfg, load_lm(cfg, "slm", None).eval(), tmp_path / "models" / "legal",
              {"domain": "legal", "strategy": "slm", "params": 1, "test_ppl": 1.0})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", SERVING_START, str(tiny), str(work), str(tmp_path / "models")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scored"] > 5 and result["config"]  # it did serve, with the driver's config
    modules = result["modules"]
    assert "slmfactory.serving.server" in modules and "transformers" in modules  # the path ran
    imported = sorted(m for m in modules if m.startswith(RUN_TIME_FORBIDDEN))
    assert not imported, f"building a config and starting to serve imported training code: {imported}"


# -- subsystems: each reached through its face -------------------------------------------------

def _package_of(module: str, modules: dict[str, Path]) -> str:
    """The package a module belongs to (a package's ``__init__`` is its own)."""
    return module if modules[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def face_breaches(sources: dict[str, str]) -> list[str]:
    """Every import that reaches past a subsystem's face (a module of the subsystem instead of
    its package, or a name its ``EXPORTS`` leaves out) or takes another package's private
    (underscore) name. ``sources``: module name -> its source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    face = faces()
    inside = lambda m, s: m == s or m.startswith(s + ".")  # noqa: E731
    broken = []
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            pairs: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (
                    module := imported_from(node, name, modules[name].name == "__init__.py")) is not None:
                pairs = [(module, a.name) for a in node.names]
            for target, imported in pairs:
                if not target.startswith("slmfactory"):
                    continue
                for sub, exported in face.items():
                    if inside(target, sub) and not inside(name, sub):
                        if target != sub or imported is None:
                            broken.append(f"{name}: {target}{'.' + imported if imported else ''} "
                                          f"(import it from {sub})")
                        elif imported not in exported:
                            broken.append(f"{name}: {sub}.{imported} (not in {sub}'s EXPORTS)")
                if imported and imported.startswith("_") and target in modules and \
                        _package_of(target, modules) != _package_of(name, modules):
                    broken.append(f"{name}: {target}.{imported} (another package's private name)")
    return broken


def test_a_subsystem_is_reached_through_its_face_and_no_private_name_crosses():
    """Outside a subsystem, a module imports from its package and only what ``EXPORTS`` lists;
    no module takes an underscore name of another package."""
    sources = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    broken = face_breaches(sources)
    assert not broken, "imports past a subsystem's face: " + "; ".join(broken)


@pytest.mark.parametrize("module, line, want", [
    ("slmfactory.serving.engine", "from slmfactory.data.clustering.clusters import nearest_centroid",
     "import it from slmfactory.data.clustering"),
    ("slmfactory.serving.engine", "from slmfactory.data.clustering import kmeans_fit", "not in"),
    ("slmfactory.pipeline", "import slmfactory.models.train.trainer", "import it from slmfactory.models.train"),
    ("slmfactory.analysis.report", "from slmfactory.platform.config import _coerce", "private name"),
])
def test_the_face_check_fails_on_a_breach(module, line, want):
    sources = {module: (PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text() + "\n" + line + "\n"}
    assert any(want in b for b in face_breaches(sources))


def test_every_subsystem_has_a_face_whose_names_exist():
    """Every package of the data, models and serving layers is a subsystem: its ``__init__``
    exports names (``EXPORTS``), and each resolves, imported on first use."""
    import importlib
    import pkgutil

    face = faces()
    packages = sorted(module_name(p) for p in PACKAGE.rglob("__init__.py")
                      if len(p.relative_to(PACKAGE).parts) == 3)  # slmfactory/<layer>/<subsystem>/
    assert packages and not [p for p in packages if p not in face], f"packages without EXPORTS: {packages}"
    for sub, exported in face.items():
        package = importlib.import_module(sub)
        assert sorted(package.__all__) == sorted(exported)
        for sub_module in pkgutil.iter_modules(package.__path__):
            # every module imported: a submodule binds its name on the package
            importlib.import_module(f"{sub}.{sub_module.name}")
        for name, module in exported.items():
            want = importlib.import_module(module)
            if name not in getattr(package, "MODULES", ()):  # a name, not a module exported whole
                assert hasattr(want, name), f"{sub}.{name}: {module} defines no {name}"
                want = getattr(want, name)
            # A name that is also a submodule's name would come back as the module.
            assert getattr(package, name) is want, f"{sub}.{name} is not {module}'s {name}"


STRATEGY_SIBLINGS = {
    # strategy module: the sibling strategy modules it builds on (a variant of one): why
    "slmfactory.models.strategies.llm": {"slmfactory.models.strategies.slm"},        # SmallModel, larger
    "slmfactory.models.strategies.slm_nopt": {"slmfactory.models.strategies.slm"},   # SmallModel, no pretraining
    "slmfactory.models.strategies.llm_lora": {"slmfactory.models.strategies.llm"},   # LargeModel, LoRA fine-tune
}
"""docs/strategies.md: a strategy imports a sibling only where it is a variant of it."""


def test_a_strategy_imports_only_the_interface_and_the_siblings_it_is_a_variant_of():
    graph = import_graph()
    package = "slmfactory.models.strategies"
    for module, dsts in graph.items():
        if module.startswith(package + ".") and module != f"{package}.base":
            siblings = {d for d in dsts if d.startswith(package + ".") and d != f"{package}.base"}
            assert siblings == STRATEGY_SIBLINGS.get(module, set()), (module, sorted(siblings))
