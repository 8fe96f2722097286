"""The wheel works outside the repository: built with ``python -m build`` from the checkout's
files, installed with its declared dependencies into a fresh virtual environment, and run
from a temporary directory where the checkout is not importable.

The venv is a real one (no ``--system-site-packages``, no path into ``.venv``): the base
interpreter's site-packages holds none of the dependencies, so every one of them is
installed from the package index as a user's ``pip install slmfactory-*.whl`` would, which
also proves the wheel declares every dependency it imports. Two things keep it cheap
(~1.5-3 min on 2 cores): pip runs from the test's interpreter (``pip --python``) so the venv
needs no pip of its own, and ``--no-compile`` skips byte-compiling 2 GB of dependencies
(Python compiles the modules a command imports, on first use).

The venv already holds an older PyYAML than the one the suite runs with (``OLDER``), inside the
wheel's range: the install must keep it (the wheel declares ranges, not pins, so it joins an
environment without a resolver fight), ``pip check`` must find the set consistent, and the CLI
runs on it. The ``datasets`` extra is not installed there: ``load_split`` says to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

RECIPE = """\
name: wheel
workdir: {workdir}
tokenizer: {{vocab_size: 512, train_chars: 2000000}}
corpus: {{domains: [legal, code]}}
tracking: {{enabled: false}}
"""


def _checkout_files() -> list[str]:
    """Tracked files plus new ones not ignored: what a clean clone holds once committed."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools>=77) is already in the test environment;
    # an isolated build would install it again from the index on every run.
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (whl,) = dist.glob("slmfactory-*.whl")
    return whl


def test_wheel_ships_package_data_not_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "slmfactory/data/corpus/sample/generic.jsonl" in names
    assert "slmfactory/data/corpus/sample/LICENSES.md" in names
    # The checkout's tests, scripts and the study's write-up stay out; reading a sweep back ships.
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "study/"))]
    assert {"slmfactory/analysis/frontier.py", "slmfactory/analysis/report.py", "slmfactory/demo.py"} <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "slmfactory = slmfactory.cli:main" in text
    # The registry finds the strategies by importing their package (no entry point), so
    # every strategy file must ship; `config show` below proves the installed registry.
    strategy_files = {f"slmfactory/models/strategies/{m}.py" for m in
                      ("slm", "slm_nopt", "llm", "llm_lora", "slm_is", "slm_d", "slm_mix", "slm_pn")}
    assert strategy_files <= set(names)


# A release of a dependency older than constraints.txt's and inside the wheel's range (PyYAML's
# floor in pyproject.toml is this one): small, and the CLI reads every recipe with it.
OLDER = ("PyYAML", "6.0.1")


def _pip(py: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # pip from the test's interpreter (the venv has none); --no-compile: see the docstring.
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(py), *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding ``OLDER`` first, then the wheel with its declared dependencies."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    name, version = OLDER
    out = _pip(py, "install", "-q", "--no-compile", "--disable-pip-version-check", f"{name}=={version}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # torch==2.13.0 named exactly as `make setup` does: the wheel's range would let pip pick
    # PyPI's CUDA build.
    out = _pip(py, "install", "-q", "--no-compile", "--disable-pip-version-check", "torch==2.13.0", str(wheel))
    assert out.returncode == 0, out.stderr[-3000:]
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return env


def test_the_wheel_joins_a_venv_keeping_its_compatible_versions(wheel, venv, tmp_path):
    py = venv / "bin" / "python"
    name, version = OLDER
    # OLDER is what this test says it is: inside the wheel's range, not the version the suite runs with.
    from packaging.requirements import Requirement

    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    (spec,) = [Requirement(line.split(":", 1)[1]).specifier
               for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
               if line.startswith("Requires-Dist:") and Requirement(line.split(":", 1)[1]).name == name]
    pinned = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith(f"{name}==")]
    assert spec.contains(version) and pinned and pinned[0] != f"{name}=={version}", (spec, pinned)
    probe = f"""
import importlib.metadata as md, importlib.util
import slmfactory, slmfactory.platform.config, slmfactory.serving.app, yaml
print(md.version({name!r}))
print(yaml.__version__)
print(importlib.util.find_spec("datasets") is None)
"""
    r = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=_env(venv), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, loaded, no_datasets = r.stdout.split()
    assert (kept, loaded) == (version, version), \
        f"installing the wheel replaced {name} {version} by {kept}: a requirement of the wheel excludes it"
    # Every requirement of every installed distribution is met: no conflict left behind.
    check = _pip(py, "check", "--disable-pip-version-check", timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]

    # Without the `datasets` extra the optional loader names the extra it needs.
    assert no_datasets == "True", "datasets is installed in the fresh venv: nothing should pull it in"
    r = subprocess.run([str(py), "-c", "from slmfactory.data.corpus.store import load_split; load_split('.', 'legal', 'train')"],
                       cwd=tmp_path, env=_env(venv), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ImportError" in r.stderr and "pip install 'slmfactory[datasets]'" in r.stderr, r.stderr[-2000:]


def test_fresh_venv_runs_the_cli_outside_the_checkout(venv, tmp_path):
    py = venv / "bin" / "python"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(venv)

    def cli(*args, timeout=300):
        r = subprocess.run([str(venv / "bin" / "slmfactory"), *args], cwd=work, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout

    # The installed package, not the checkout, is what runs.
    where = subprocess.run([str(py), "-c", "import slmfactory, sys; print(slmfactory.__file__); print(sys.path)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where.splitlines()[0] and str(REPO) not in where

    assert "corpus" in cli("--help") and "config" in cli("--help")
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(workdir=work / "run"))
    shown = cli("config", "show", "-c", str(recipe))
    assert "slm-pn:" in shown and "workdir:" in shown
    json.loads(cli("config", "schema"))

    # The sample corpus ships in the wheel: build it, then import its files as a user would.
    out = cli("corpus", "sample", "-c", str(recipe))
    sample = Path(out.splitlines()[0].split(": ", 1)[1])
    assert sample.is_relative_to(venv) and (sample / "generic.jsonl").is_file()
    manifest = json.loads((work / "run" / "corpus" / "manifest.json").read_text())
    assert set(manifest["parts"]) >= {"generic/train", "domains/legal/train", "domains/code/test"}
    cli("corpus", "import", "-c", str(recipe), "--set", f"workdir={work / 'imported'}",
        "--generic", str(sample / "generic.jsonl"), "--domain", f"legal={sample / 'legal.jsonl'}", "--domain", f"code={sample / 'code.jsonl'}")
    assert (work / "imported" / "corpus" / "domains" / "legal" / "train.parquet").is_file()
    assert "tokens" in cli("tokenizer", "-c", str(recipe))
