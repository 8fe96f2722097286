"""The command line: documented subcommands, and one-line errors (no traceback) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slmfactory.cli import SUBCOMMANDS, build_parser
from slmfactory.data.corpus import SAMPLE_DIR


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "slmfactory.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout
    # The CLI does not grow: new settings belong in the config tree.
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert tuple(sub.choices) == SUBCOMMANDS


def assert_one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("slmfactory: error:")]
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "nope.yaml")), "nope.yaml", "not found")


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("pretrain:\n  lr: [1,\n")
    assert_one_line_error(run_cli("tokenizer", "--config", str(p)), "bad.yaml", "malformed YAML")


def test_unknown_key(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("pretrain:\n  learning_rate: 0.1\n")
    assert_one_line_error(run_cli("train", "--config", str(p)), "pretrain.learning_rate", "unknown key")
    assert_one_line_error(run_cli("train", "--set", "cluster.kk=3"), "cluster.kk")


def test_train_without_a_corpus(tmp_path):
    assert_one_line_error(run_cli("train", "--set", f"workdir={tmp_path}"), "no corpus", "corpus build")


def test_import_missing_file(tmp_path):
    out = run_cli("corpus", "import", "--set", f"workdir={tmp_path}", "--generic", str(tmp_path / "none.jsonl"),
                  "--domain", f"legal={tmp_path / 'none2.jsonl'}")
    assert_one_line_error(out, "none")


def test_import_non_utf8_and_empty(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait " * 40)
    # A well-formed domain (real licence texts from the committed sample) so that the
    # error can only come from the generic file.
    good = tmp_path / "legal.jsonl"
    good.write_text((SAMPLE_DIR / "legal.jsonl").read_text(encoding="utf-8"))
    out = run_cli("corpus", "import", "--set", f"workdir={tmp_path / 'w'}", "--generic", str(bad),
                  "--domain", f"legal={good}")
    assert_one_line_error(out, "bad.txt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = run_cli("corpus", "import", "--set", f"workdir={tmp_path / 'w2'}", "--generic", str(empty),
                  "--domain", f"legal={good}")
    assert_one_line_error(out, "empty")


def test_unknown_domain(tiny_cfg):
    out = run_cli("train", "--config", "configs/tiny.yaml", "--set", f"workdir={tiny_cfg.workdir}",
                  "--domain", "astrology")
    assert_one_line_error(out, "astrology", "data.domain")
