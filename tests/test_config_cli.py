"""`slmfactory config show` and `config schema`: the resolved recipe people read, and the
JSON Schema editors complete from, checked against every recipe under configs/."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from slmfactory.platform.config import from_dict, load_config, strategy_settings

from .conftest import REPO

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "slmfactory.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def schema():
    out = run_cli("config", "schema")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "demo.yaml", "paper.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_against_the_schema(schema, recipe):
    validator = jsonschema.Draft202012Validator(schema)
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]
    assert not errors, errors
    # The resolved form `config show` prints validates too, and loads back to the same config.
    out = run_cli("config", "show", "-c", str(recipe))
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert not list(validator.iter_errors(shown))
    assert from_dict(shown) == load_config(recipe)


def test_schema_rejects_what_the_loader_rejects(schema):
    validator = jsonschema.Draft202012Validator(schema)
    for bad in ({"pretrain": {"learning_rate": 0.1}},          # unknown key
                {"strategy": {"name": "no-such-strategy"}},     # unknown strategy
                {"strategy": {"slm-mix": {"experts": "many"}}},  # wrong type in a strategy's own section
                {"pretrain": {"lr": "fast"}},                   # not a number
                {"sweep": {"domains": "legal"}}):                # a list, not a string
        assert list(validator.iter_errors(bad)), bad
    # Numbers written as YAML 1.1 reads them (a string "3.12e14") are numbers to the loader.
    assert not list(validator.iter_errors({"device": {"peak_flops": "3.12e14"}}))


def test_schema_describes_every_strategy_and_field(schema):
    strat = schema["$defs"]["StrategyConfig"]["properties"]
    assert set(strat) == {"name", *strategy_settings()}
    assert strat["slm-pn"]["properties"]["experts"]["type"] == "integer"
    train = schema["$defs"]["TrainConfig"]["properties"]
    assert "Peak learning rate" in train["lr"]["description"]  # the attribute docstrings
    assert schema["properties"]["finetune"]["default"]["patience"] == 3  # a default_factory's value


def test_show_fills_every_default_and_applies_overrides():
    out = run_cli("config", "show", "-c", "configs/tiny.yaml", "--set", "strategy.slm-pn.experts=8",
                  "--set", "pretrain.lr=2e-3")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert list(shown)[:2] == ["name", "workdir"]  # the recipe's own order, not sorted
    assert shown["strategy"]["slm-pn"]["experts"] == 8
    assert shown["pretrain"]["lr"] == 2e-3
    # Every strategy's section and every serving default, though tiny.yaml names neither.
    assert set(shown["strategy"]) == {"name", *strategy_settings()}
    assert shown["serving"]["port"] == 8000


def test_bad_input_is_one_line_naming_the_field():
    out = run_cli("config", "show", "-c", "configs/tiny.yaml", "--set", "pretrain.lrr=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("slmfactory: error: pretrain.lrr")
    out = run_cli("config", "schema", "-c", "configs/tiny.yaml")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
