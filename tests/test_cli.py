"""The command line: documented subcommands, and one-line errors (no traceback) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slmfactory.cli import SUBCOMMANDS, build_parser
from slmfactory.data.corpus.store import SAMPLE_DIR

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


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


def test_corpus_sample_builds_and_prints_its_manifest(tmp_path):
    # Every `corpus` action ends with the manifest's summary: the corpus folder and its parts.
    out = run_cli("corpus", "sample", "-c", str(TINY), "--set", f"workdir={tmp_path}",
                  "--set", "corpus.domains=[legal,code]")
    assert out.returncode == 0, out.stderr
    assert f"sample files: {SAMPLE_DIR}" in out.stdout
    assert f"corpus written to {tmp_path / 'corpus'}" in out.stdout
    assert (tmp_path / "corpus" / "manifest.json").is_file()
    for part in ("generic", "legal", "code"):
        assert part in out.stdout


def test_unknown_domain(tiny_cfg):
    out = run_cli("train", "--config", "configs/tiny.yaml", "--set", f"workdir={tiny_cfg.workdir}",
                  "--domain", "astrology")
    assert_one_line_error(out, "astrology", "data.domain")


def _serve_until(cfg, models, port: int, out: list[str], said: str):
    """``slmfactory serve`` on the tiny recipe, started as a script's background job is
    (``cmd &`` in a non-interactive shell: SIGINT ignored), once it has printed ``said``.
    Returns the process and the thread reading its output into ``out`` (it ends at the
    output's end: join it before reading the last lines)."""
    import os
    import signal
    import threading
    import time

    def as_a_background_job():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "slmfactory.cli", "serve", "--config", str(TINY), "--models", str(models),
         "--port", str(port), "--set", f"workdir={cfg.root}", "--set", "serving.replica_cpus=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_a_background_job,
        start_new_session=True)
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while not any(said in line for line in out):
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # its Ray with it (its own session)
            raise AssertionError(f"serve did not say {said!r}:\n" + "".join(out)[-3000:])
        time.sleep(0.05)
    return proc, reader


@pytest.mark.ray
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_stops_cleanly_on_sigint_and_sigterm(tiny_cfg):
    """``kill -INT`` (even where SIGINT was inherited ignored, as by ``serve &`` in a script)
    and ``kill -TERM`` shut Serve and Ray down and exit 0, instead of being ignored and then
    aborting in Ray's fatal-signal handler (exit by SIGABRT: the shell's "Aborted"): once
    serving, and while Serve is still starting (the signal sent as soon as the command says
    it is starting). A second Ctrl-C while it shuts down stops it without the sweep's
    "rerun the same command to resume" or an internal error."""
    import os
    import signal
    import time
    import urllib.request

    import torch

    from slmfactory.models.train.phases import export_hf, load_lm
    from tests.local_cluster import free_port

    torch.manual_seed(0)
    models = tiny_cfg.root / "models"
    export_hf(tiny_cfg, load_lm(tiny_cfg, "slm", None).eval(), models / "legal",
              {"domain": "legal", "strategy": "slm", "params": 1, "test_ppl": 1.0})
    for sig, when in ((signal.SIGINT, "serving on"), (signal.SIGTERM, "serve: starting")):
        port, out = free_port(), []
        proc, reader = _serve_until(tiny_cfg, models, port, out, when)
        try:
            if when == "serving on":
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:
                    # The served domain and "auto" (routed by the models' scores whenever a start-up model is served).
                    assert [m["id"] for m in json.load(r)["data"]] == ["legal", "auto"]
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=60)  # the output's last lines
        text = "".join(out)
        assert rc == 0, f"{sig.name} after {when!r}: exit {rc}\n{text[-3000:]}"
        assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
        assert "internal error" not in text and "rerun the same command" not in text, text[-3000:]
        assert f"serve: stopped ({sig.name})" in text, text[-3000:]

    # A second Ctrl-C once shutting down: the shutdown is interrupted (exit 130, one line),
    # never the sweep's resume hint. Should the shutdown have finished before the second
    # signal arrived, the exit is the first signal's clean one, and it says so.
    port, out = free_port(), []
    proc, reader = _serve_until(tiny_cfg, models, port, out, "serving on")
    try:
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while not any("shutting down" in line for line in out):
            assert time.time() < deadline and proc.poll() is None, "".join(out)[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=60)
    text = "".join(out)
    assert "serve: stopped (SIGTERM); shutting down" in text, text[-3000:]
    if rc == 130:
        assert text.count("slmfactory: serve interrupted while shutting down") == 1, text[-3000:]
    else:
        assert rc == 0 and "serve interrupted" not in text, f"exit {rc}\n{text[-3000:]}"
    assert "internal error" not in text and "rerun the same command" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
