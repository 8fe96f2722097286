"""A trial's model in MLflow: the exported folder is an MLflow ``pyfunc`` model (signature,
input example, one copy of the weights) that completes prompts, the registry's versions
point at it, ``serve --from-registry`` still downloads a folder it serves; the run's inputs
are the corpus splits it read, with the manifest's digests and source packages.

The fast tests log a freshly initialised tiny model (no Ray); the marked ones run a one-trial
sweep of configs/sweep-tiny.yaml and load its champion with ``mlflow.pyfunc.load_model`` and
``mlflow models serve``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slmfactory.platform.tracking import (
    CORPUS_MANIFEST, DIGEST_CHARS, MlflowTracker, client_for, corpus_datasets, log_hf_model, register_model)
from tests.local_cluster import free_port

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "sweep-tiny.yaml"
MLFLOW_FILES = {"MLmodel", "mlflow_model.py", "requirements.txt", "python_env.yaml", "conda.yaml",
                "input_example.json", "serving_input_example.json"}


@contextlib.contextmanager
def tracking_uri(uri: str):
    """``models:/`` URIs resolve through MLflow's global tracking URI (as ``mlflow models
    serve`` reads it from MLFLOW_TRACKING_URI)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def greedy(folder: Path, prompt: str, n: int) -> str:
    """``n`` greedy tokens after ``prompt`` with plain transformers, cut at end of text."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    return tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out, skip_special_tokens=True)


@pytest.fixture
def exported(tiny_cfg, tmp_path) -> Path:
    """A freshly initialised tiny SLM exported as a trial exports it (``export_hf``)."""
    from slmfactory.models.arch.lm import build_model
    from slmfactory.models.train.phases import export_hf, vocab_size_of

    cfg = tiny_cfg
    folder = tmp_path / "export"
    folder.mkdir()
    export_hf(cfg, build_model(cfg.slm, vocab_size_of(cfg), cfg.data.seq_len).eval(), folder,
              {"strategy": "slm", "domain": "legal", "params": 1, "test_ppl": 9.0})
    return folder


# -- fast: no Ray, no server ----------------------------------------------------------------

def test_an_exported_folder_is_a_registered_mlflow_model_that_completes_prompts(exported, tmp_path):
    import mlflow
    import pandas as pd

    from slmfactory.platform.mlflow_model import MAX_TOKENS_LIMIT, settings
    from slmfactory.serving.catalog import from_folder, from_registry

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "mlmodel", "trial", {"domain": "legal", "strategy": "slm"})
    tracker.log_metrics({"params": 1, "ppl/legal": 9.0})
    log_hf_model(tracker, exported)
    register_model(tracker, "mlmodel-legal", "model")
    tracker.close()
    client = client_for(uri)
    client.set_registered_model_alias("mlmodel-legal", "champion", "1")

    # One copy: the run's model/ is the folder's files beside MLflow's own, nothing else.
    logged = {a.path.removeprefix("model/") for a in client.list_artifacts(tracker.run_id, "model")}
    assert logged == {p.name for p in exported.iterdir()} | MLFLOW_FILES
    assert not logged & {"artifacts", "python_model.pkl"}
    served = from_registry(uri, "mlmodel", tmp_path / "registry")
    folder = Path(served["legal"].path)
    assert set(from_folder(tmp_path / "registry")) == {"legal"}
    assert (folder / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()

    # The downloaded folder is the MLflow model: signature, params schema, example.
    meta = mlflow.models.Model.load(folder)
    assert [c.name for c in meta.signature.inputs.inputs] == ["prompt"]
    assert {p.name: p.default for p in meta.signature.params.params} == \
        {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0}
    assert meta.flavors["python_function"]["artifacts"]["model"]["path"] == "."
    example = json.loads((folder / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["prompt"] and example["params"]["max_tokens"] == 8
    assert "torch==" in (folder / "requirements.txt").read_text()

    model = mlflow.pyfunc.load_model(str(folder))
    got = model.predict(pd.DataFrame({"prompt": ["The licence", ""]}), params={"max_tokens": 6})
    assert len(got) == 2 and all(isinstance(t, str) for t in got)
    assert model.predict(pd.DataFrame({"prompt": ["The licence"]}), params={"max_tokens": 6}) == \
        [greedy(exported, "The licence", 6)]
    # Sampling answers too; the bounds hold whatever a request asks.
    assert len(model.predict(pd.DataFrame({"prompt": ["The"]}), params={"temperature": 0.8, "top_p": 0.9})) == 1
    assert settings({"max_tokens": 10**6, "temperature": -1.0, "top_p": 0.0}) == (MAX_TOKENS_LIMIT, 0.0, 1.0)
    # A prompt longer than the context (64 tokens here) keeps its end; prompt and completion fit it.
    (long,) = model.predict(pd.DataFrame({"prompt": ["The licence grants " * 60]}), params={"max_tokens": 1000})
    assert isinstance(long, str)
    assert settings(None) == (16, 0.0, 1.0) and settings({"max_tokens": 0})[0] == 1
    # The registry version is the model behind models:/NAME@champion.
    with tracking_uri(uri):
        assert mlflow.pyfunc.load_model("models:/mlmodel-legal@champion").metadata.run_id == tracker.run_id


def test_a_folder_holding_mlflows_own_file_names_is_refused(exported, tmp_path):
    (exported / "MLmodel").write_text("not ours")
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "clash", "trial")
    with pytest.raises(ValueError, match="MLmodel"):
        log_hf_model(tracker, exported)


def test_a_trial_logs_the_splits_it_read_with_the_manifests_digests(tiny_cfg, tmp_path):
    """``log_trial``: the domain's splits (and the generic ones when generic text was
    trained on) as dataset inputs, named, digested and sourced from the corpus manifest,
    each with its context."""
    from mlflow.tracking import MlflowClient

    from slmfactory.trial import TrialRecord as R, log_trial, trial_datasets
    from tests.test_trial import record_for

    from slmfactory.data.corpus.store import MANIFEST

    assert CORPUS_MANIFEST == MANIFEST  # the platform reads the file the data layer writes
    manifest = json.loads((tiny_cfg.corpus_dir / CORPUS_MANIFEST).read_text())["parts"]
    record = record_for(tiny_cfg, "legal", 3.0, tmp_path)  # a generic phase: spent/generic_tokens > 0
    run_id = log_trial(tiny_cfg, "datasets", record.key, record)
    inputs = MlflowClient(tiny_cfg.tracking_uri).get_run(run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"],
                            json.loads(i.dataset.source)["packages"], json.loads(i.dataset.profile)["sha256"])
           for i in inputs}
    parts = {"generic/train": "training", "generic/valid": "validation", "domains/legal/train": "training",
             "domains/legal/valid": "validation", "domains/legal/test": "test"}
    assert set(got) == {p.removeprefix("domains/") for p in parts}
    for part, context in parts.items():
        digest, ctx, packages, sha = got[part.removeprefix("domains/")]
        assert (digest, ctx, sha) == (manifest[part]["sha256"][:DIGEST_CHARS], context, manifest[part]["sha256"])
        assert packages == [s["source"] for s in manifest[part]["sources"]] and packages
    assert any(a.path == "model/MLmodel" for a in MlflowClient(tiny_cfg.tracking_uri).list_artifacts(run_id, "model"))

    # No generic text, no generic split; slm-is's resampled generic text counts.
    nopt = R.from_dict({**record.to_dict(), "metrics": {R.spent_tokens_metric("generic"): 0.0}})
    assert [p for p, _ in trial_datasets(nopt)] == ["domains/legal/train", "domains/legal/valid", "domains/legal/test"]
    resampled = R.from_dict({**nopt.to_dict(), "metrics": {R.EPOCHS_RESAMPLED_PRETRAIN: 1.0}})
    assert [p for p, _ in trial_datasets(resampled)][:2] == ["generic/train", "generic/valid"]
    assert corpus_datasets(tmp_path / "no-corpus", ["generic/train"]) == {}


# -- a real sweep's champion --------------------------------------------------------------

# One trial: slm-nopt trains no generic phase, so this is the cheapest sweep with a champion.
SWEEP = ("--set", "sweep.strategies=[slm-nopt]", "--set", "sweep.domains=[legal]", "--set", "sweep.spec_tokens=[5120]")
EXPERIMENT = "slmfactory-sweep-tiny"
CHAMPION = f"models:/{EXPERIMENT}-legal@champion"


@pytest.fixture(scope="module")
def swept(tiny_root, tmp_path_factory):
    """A finished one-trial sweep of the tiny recipe: (workdir, tracking URI)."""
    from slmfactory.platform.config import load_config

    work = tmp_path_factory.mktemp("mlmodel-sweep") / "work"
    shutil.copytree(tiny_root, work)
    out = subprocess.run([sys.executable, "-m", "slmfactory.cli", "sweep", "-c", str(RECIPE), "--set",
                          f"workdir={work}", *SWEEP], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "SLMFACTORY_LAUNCHER": "local"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return work, load_config(RECIPE, {"workdir": str(work)}).tracking_uri


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweeps_champion_loads_as_a_pyfunc_and_its_run_lists_its_datasets(swept):
    import mlflow
    import pandas as pd

    from slmfactory.serving.catalog import from_registry

    work, uri = swept
    client = client_for(uri)
    mv = client.get_model_version_by_alias(f"{EXPERIMENT}-legal", "champion")
    with tracking_uri(uri):
        model = mlflow.pyfunc.load_model(CHAMPION)
    (text,) = model.predict(pd.DataFrame({"prompt": ["Permission is hereby granted"]}), params={"max_tokens": 8})
    assert isinstance(text, str) and text.strip(), text
    assert model.metadata.run_id == mv.run_id and model.metadata.signature.params is not None

    manifest = json.loads((work / "corpus" / CORPUS_MANIFEST).read_text())["parts"]
    inputs = client.get_run(mv.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, i.tags[0].value) for i in inputs}
    assert got == {f"legal/{s}": (manifest[f"domains/legal/{s}"]["sha256"][:DIGEST_CHARS], context)
                   for s, context in (("train", "training"), ("valid", "validation"), ("test", "test"))}

    # serve --from-registry: the same version, a folder transformers loads, greedy alike.
    served = from_registry(uri, EXPERIMENT, work / "registry")
    folder = Path(served["legal"].path)
    assert served["legal"].uri == f"{CHAMPION} (version {mv.version})"
    assert (folder / "MLmodel").is_file() and (folder / "test_seq_nll.npy").is_file()
    assert greedy(folder, "Permission is hereby granted", 8) == text


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.mark.ray
@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_models_serve_answers_for_the_champion_on_loopback(swept):
    work, uri = swept
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           # the scoring server is `uvicorn`, found on PATH: this interpreter's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local",
                               "-m", CHAMPION, "-p", str(port), "-h", "127.0.0.1"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, ready = time.time() + 300, False
        while time.time() < deadline and server.poll() is None and not ready:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert ready, f"not ready (exit {server.poll()})"
        url = f"http://127.0.0.1:{port}/invocations"
        got = _post(url, {"dataframe_records": [{"prompt": "Permission is hereby granted"}, {"prompt": "The"}],
                          "params": {"max_tokens": 8, "temperature": 0}})
        assert len(got["predictions"]) == 2 and all(isinstance(t, str) for t in got["predictions"])
        assert got["predictions"][0].strip()
        # The logged example is a request the server answers as it is.
        client = client_for(uri)
        run_id = client.get_model_version_by_alias(f"{EXPERIMENT}-legal", "champion").run_id
        example = json.loads(Path(client.download_artifacts(run_id, "model/serving_input_example.json")).read_text())
        assert len(_post(url, example)["predictions"]) == 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
