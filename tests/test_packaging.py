"""The wheel declares what the package imports, as ranges; constraints.txt holds the exact
versions the suite runs with.

The import rule (``undeclared_imports``):

- Every module under ``slmfactory/`` is parsed with ``ast``. Each absolute ``import X`` and
  ``from X import ...``, at module level or inside a function or class, counts, and so does
  ``importlib.import_module("X")`` with a literal name: a lazy import is still one the package
  needs when that code runs. Imports under ``if TYPE_CHECKING:`` do not count (they never run);
  nor do relative imports, the standard library (``sys.stdlib_module_names``), ``__future__``
  and the package itself.
- Each remaining top-level name is mapped to its distributions with
  ``importlib.metadata.packages_distributions()``; a name no installed distribution provides is
  an error (nothing can say what would declare it).
- The import is declared when one of those distributions is a base requirement of the wheel
  (``importlib.metadata.requires("slmfactory")``, no ``extra ==`` marker). An extra satisfies it
  only for a name listed in ``OPTIONAL`` (name -> extra), and only if every import of it is
  inside a function (importing any module of the package never needs the extra) and that extra
  declares it; the feature then names the extra in its ImportError (``data.corpus.load_split``:
  tests/test_wheel.py calls it in a venv without the extra).

The metadata read is the installed one (``make setup`` reinstalls it when pyproject.toml
changes); ``test_installed_metadata_is_the_checkouts_pyproject`` fails when it is stale.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import REPO

PACKAGE = "slmfactory"
# Imports an optional feature makes, and the extra that declares them.
OPTIONAL = {"datasets": "datasets"}
CONSTRAINTS = REPO / "constraints.txt"


# -- the checker ------------------------------------------------------------------------------

class _Imports(ast.NodeVisitor):
    """(top-level name, line, inside a function) for each import a module makes when it runs."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int, bool]] = []
        self._depth = 0

    def _add(self, dotted: str, node: ast.AST) -> None:
        self.found.append((dotted.split(".")[0], node.lineno, self._depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node.module, node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if (name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            self._add(node.args[0].value, node)
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        t = node.test
        if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function


def third_party_imports(package_dir: Path) -> dict[str, list[tuple[Path, int, bool]]]:
    """Top-level name -> [(file, line, inside a function)] for every non-stdlib import of the
    package under ``package_dir`` (its own name excluded)."""
    own = package_dir.name
    out: dict[str, list[tuple[Path, int, bool]]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for top, line, lazy in visitor.found:
            if top in sys.stdlib_module_names or top in ("__future__", own):
                continue
            out.setdefault(top, []).append((path, line, lazy))
    return out


@functools.cache
def _module_distributions() -> dict[str, tuple[str, ...]]:
    return {m: tuple(ds) for m, ds in md.packages_distributions().items()}


def declared(requirements: Iterable[str], package: str = PACKAGE) -> dict[str, set[str]]:
    """Canonical distribution names per group: ``""`` the base requirements, else the extra's
    (an extra that names ``package[other]`` includes ``other``'s)."""
    groups: dict[str, set[str]] = {"": set()}
    nested: dict[str, set[str]] = {}
    for text in requirements:
        req = Requirement(text)
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", str(req.marker or ""))
        group = m.group(1) if m else ""
        if req.marker is not None and not req.marker.evaluate({"extra": group}):
            continue  # not on this platform
        if canonicalize_name(req.name) == canonicalize_name(package):
            nested.setdefault(group, set()).update(req.extras)
        else:
            groups.setdefault(group, set()).add(canonicalize_name(req.name))
    for group in list(nested):
        todo, seen = list(nested[group]), set()
        while todo:
            other = todo.pop()
            if other not in seen:
                seen.add(other)
                groups.setdefault(group, set()).update(groups.get(other, set()))
                todo.extend(nested.get(other, ()))
    return groups


def undeclared_imports(package_dir: Path, requirements: Iterable[str], optional: Mapping[str, str] = OPTIONAL,
                       package: str = PACKAGE) -> list[str]:
    """One line per import of the package that its requirements do not declare (the rule in
    this module's docstring); empty when every import is declared."""
    groups = declared(requirements, package)
    base = groups[""]
    problems = []
    for top, sites in sorted(third_party_imports(package_dir).items()):
        where = ", ".join(f"{p.relative_to(package_dir.parent)}:{line}" for p, line, _ in sites)
        dists = sorted({canonicalize_name(d) for d in _module_distributions().get(top, ())})
        if not dists:
            problems.append(f"{where}: imports {top!r}, which no installed distribution provides")
            continue
        if base & set(dists):
            continue
        extra = optional.get(top)
        if extra is None:
            in_extras = sorted(g for g, names in groups.items() if g and names & set(dists))
            also = f" (only in the extra(s) {in_extras}: an optional import must be listed in OPTIONAL)" if in_extras else ""
            problems.append(f"{where}: imports {top!r} (distribution {' or '.join(dists)}), "
                            f"not a base requirement of {package}{also}")
            continue
        if not groups.get(extra, set()) & set(dists):
            problems.append(f"{where}: imports {top!r} (distribution {' or '.join(dists)}), "
                            f"optional but not declared in the extra {extra!r}")
        eager = [f"{p.relative_to(package_dir.parent)}:{line}" for p, line, lazy in sites if not lazy]
        if eager:
            problems.append(f"{', '.join(eager)}: imports the optional {top!r} (extra {extra!r}) at module level: "
                            f"importing the module would need the extra; import it inside the function that uses it")
    return problems


# -- the package ------------------------------------------------------------------------------

def test_every_import_of_the_package_is_declared():
    imports = third_party_imports(REPO / PACKAGE)
    # Not vacuous: the walk sees eager and lazy imports, those the issue named among them.
    assert {"torch", "ray", "fastapi", "starlette", "prometheus_client", "yaml", "datasets"} <= imports.keys()
    problems = undeclared_imports(REPO / PACKAGE, md.requires(PACKAGE))
    assert not problems, "undeclared imports (declare them in pyproject.toml):\n" + "\n".join(problems)


def _installed_undeclared() -> str:
    """``packaging``: installed (pytest needs it), declared by nothing of ours."""
    assert "packaging" in _module_distributions(), "the planted import needs `packaging` installed"
    assert not any("packaging" in names for names in declared(md.requires(PACKAGE)).values()), \
        "`packaging` is now declared: plant another installed but undeclared distribution"
    return "packaging"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "planted"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nfrom . import clean\n")
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


def test_a_planted_undeclared_import_is_named(tmp_path):
    name = _installed_undeclared()
    pkg = _package(tmp_path, {
        # Declared, stdlib, relative and annotation-only imports pass.
        "clean.py": ("from typing import TYPE_CHECKING\nimport numpy as np\nimport yaml\nfrom .sub import x\n"
                     f"if TYPE_CHECKING:\n    import {name}\n"),
        "planted.py": f"import json\n\n\ndef f():\n    from {name}.version import Version\n    return Version\n",
    })
    problems = undeclared_imports(pkg, md.requires(PACKAGE))
    assert len(problems) == 1, problems
    assert problems[0].startswith("planted/planted.py:5: imports 'packaging' (distribution packaging)"), problems


def test_a_planted_dynamic_import_is_named(tmp_path):
    name = _installed_undeclared()
    pkg = _package(tmp_path, {"clean.py": "", "dyn.py": f"import importlib\nmod = importlib.import_module({name!r})\n"})
    (problem,) = undeclared_imports(pkg, md.requires(PACKAGE))
    assert problem.startswith("planted/dyn.py:2: imports 'packaging'"), problem


def test_optional_imports_need_their_extra_and_a_function(tmp_path):
    pkg = _package(tmp_path, {"clean.py": "", "lazy.py": "def load():\n    import datasets\n"})
    requires = md.requires(PACKAGE)
    assert undeclared_imports(pkg, requires) == []
    # Declared in an extra but not listed as optional: a base import it must be.
    (problem,) = undeclared_imports(pkg, requires, optional={})
    assert "'datasets'" in problem and "not a base requirement" in problem and "'datasets'" in problem.split("extra(s)")[1]
    # Listed as optional, but the extra named does not declare it.
    (problem,) = undeclared_imports(pkg, requires, optional={"datasets": "server"})
    assert "not declared in the extra 'server'" in problem
    # At module level, the optional import would make every importer need the extra.
    (pkg / "eager.py").write_text("import datasets\n")
    (problem,) = undeclared_imports(pkg, requires)
    assert problem.startswith("planted/eager.py:1: imports the optional 'datasets'") and "at module level" in problem


def test_a_name_no_distribution_provides_is_named(tmp_path):
    pkg = _package(tmp_path, {"clean.py": "def f():\n    import no_such_module_anywhere\n"})
    (problem,) = undeclared_imports(pkg, md.requires(PACKAGE))
    assert problem == "planted/clean.py:2: imports 'no_such_module_anywhere', which no installed distribution provides"


# -- the metadata, the ranges and constraints.txt ----------------------------------------------

def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _by_group(pairs: Iterable[tuple[str, str]]) -> set[tuple]:
    out = set()
    for group, text in pairs:
        req = Requirement(text)
        out.add((group, canonicalize_name(req.name), tuple(sorted(req.extras)), frozenset(map(str, req.specifier))))
    return out


def test_installed_metadata_is_the_checkouts_pyproject():
    project = _pyproject()
    wanted = _by_group([("", r) for r in project["dependencies"]]
                       + [(g, r) for g, reqs in project["optional-dependencies"].items() for r in reqs])
    installed = []
    for text in md.requires(PACKAGE):
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", str(Requirement(text).marker or ""))
        installed.append((m.group(1) if m else "", text))
    where = Path(md.distribution(PACKAGE).locate_file("")).resolve()
    hint = "run `make setup`" + (f" (it rewrites {PACKAGE}.egg-info here, which shadows the installed metadata "
                                 f"when Python runs from the checkout; or delete that folder)" if where == REPO else "")
    assert _by_group(installed) == wanted, f"the metadata read from {where} is not pyproject.toml's: {hint}"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not name==version"
            key = canonicalize_name(name.strip())
            assert key not in pins, f"constraints.txt: {name} twice"
            pins[key] = version.strip()
    return pins


def test_requirements_are_ranges_holding_the_constrained_versions():
    project = _pyproject()
    pins = _constraints()
    reqs = [Requirement(r) for r in project["dependencies"]] + \
           [Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs]
    problems = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == PACKAGE:
            continue
        ops = {s.operator for s in req.specifier}
        if not ({">=", "~="} & ops and ("<" in ops or "~=" in ops)) or ops & {"==", "===", "<=", ">"}:
            problems.append(f"{req}: not a range with a floor (>=) and a cap (<)")
        if name not in pins:
            problems.append(f"{req}: no pin in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: constraints.txt's {pins[name]} is outside it")
    assert not problems, "\n".join(problems)
    # `make setup` installs exactly this torch (the CPU build); a range would pull a CUDA one.
    assert pins["torch"] == "2.13.0"


def test_the_venv_holds_the_constrained_versions():
    """constraints.txt is what the suite runs with: every pin is the version installed here."""
    problems = []
    for name, version in sorted(_constraints().items()):
        try:
            have = Version(md.version(name))
        except md.PackageNotFoundError:
            problems.append(f"{name}=={version}: not installed")
            continue
        if have.public != Version(version).public or (Version(version).local and have != Version(version)):
            problems.append(f"{name}=={version}: {have} installed")
    assert not problems, ("constraints.txt and .venv differ (run `make setup`; if the installed versions are "
                          "the ones wanted, `make constraints`):\n" + "\n".join(problems))
