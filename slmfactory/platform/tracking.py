"""Experiment tracking. Only the driver (or rank 0) ever opens a tracker: Ray's own
MLflow callback follows the same rule, so N workers never create N runs.

MLflow >= 3.10 dropped the ``./mlruns`` file store, so the default backend is a sqlite
database inside the run's workdir; a cluster points ``tracking.uri`` at a server
(``mlflow server`` on PostgreSQL: docs/shared-cluster.md).

A tracking server that restarts: MLflow's own HTTP client retries every request (connection
refused or reset, 408/429/5xx) with exponential backoff, bounded by
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7) and ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``
(default 2): about 4 minutes of waiting before a call gives up. This module adds what MLflow
leaves out: a line per retry on stderr (``[tracking] ...``: otherwise a sweep waiting on a dead
server is silent) and, when the retries run out, :class:`TrackingUnavailable`, one line that
names the server, the bound and the variables that set it, instead of urllib3's traceback.

A live run's calls are best effort (:func:`best_effort_calls`): they run under a short bound,
:data:`BEST_EFFORT_HTTP`, since the driver logs every finished trial under the full one; a
trial never waits minutes on a server that is away.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from slmfactory.platform.errors import SlmFactoryError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class TrackingUnavailable(SlmFactoryError):
    """The MLflow tracking server did not answer within MLflow's retry bound."""


def retry_budget() -> tuple[int, int, float]:
    """(retries, backoff factor, seconds waited in all) of MLflow's HTTP client, from its
    environment variables: urllib3 retries the first failure at once, then waits
    ``factor * 2**(k-1)`` seconds (at most 120, plus up to 1 s of jitter) after the k-th."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return retries, factor, float(sum(min(120, factor * 2 ** (k - 1)) for k in range(2, retries + 1)))


#: MLflow's HTTP bound for best-effort calls (:func:`best_effort_calls`): 2 retries 0 and 2 s
#: apart, 60 s per attempt. A server that refuses connections (restarting) costs a call ~2 s,
#: one that accepts and never answers ~3 minutes; MLflow's default bound is ~4 minutes of
#: backoff plus 120 s per attempt.
BEST_EFFORT_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_best_effort_lock = threading.Lock()
_best_effort_depth = 0
_best_effort_saved: dict[str, str | None] = {}


@contextmanager
def best_effort_calls():
    """MLflow calls in this block, in every thread of this process (MLflow's system-metrics
    monitor's too), run under :data:`BEST_EFFORT_HTTP`: a live run's calls, whose loss costs
    a curve point, not a result. MLflow reads its bound from the environment at each call,
    so the block sets those variables and restores them when the last nested block ends."""
    global _best_effort_depth, _best_effort_saved
    with _best_effort_lock:
        if _best_effort_depth == 0:
            _best_effort_saved = {k: os.environ.get(k) for k in BEST_EFFORT_HTTP}
            os.environ.update(BEST_EFFORT_HTTP)
        _best_effort_depth += 1
    try:
        yield
    finally:
        with _best_effort_lock:
            _best_effort_depth -= 1
            if _best_effort_depth == 0:
                for k, v in _best_effort_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


def _gave_up(exc: BaseException) -> str | None:
    """Why a call failed if the server was unreachable or kept failing (MLflow wraps the
    requests exception it retried without ``from``: it is the context), else None."""
    import requests

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, requests.exceptions.RetryError):
            return "kept answering with server errors"
        if isinstance(exc, requests.exceptions.Timeout):
            return "did not answer in time"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return "could not be reached"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class _RetryLine(logging.Handler):
    """urllib3 logs each retry of MLflow's client at WARNING; nothing shows it by default.
    This prints the retries of MLflow's REST calls (their paths name ``mlflow``) as one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) != 3 or "mlflow" not in str(args[2]):
            return
        retry, err, path = args
        retries, factor, seconds = retry_budget()
        left = getattr(retry, "total", None)
        n = f" {retries - left} of {retries}" if isinstance(left, int) else ""
        reason = type(err).__name__ if isinstance(err, BaseException) else str(err)
        print(f"[tracking] MLflow server not answering ({reason} on {path}): retry{n}; gives up after "
              f"~{seconds:.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}, "
              f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={factor})", file=sys.stderr, flush=True)


def _show_retries() -> None:
    log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(h, _RetryLine) for h in log.handlers):
        log.addHandler(_RetryLine())


class _Client:
    """An ``MlflowClient`` whose calls to a tracking server that stays down fail with
    :class:`TrackingUnavailable` once MLflow's retries are spent (every other error, and
    every attribute, is the client's own)."""

    def __init__(self, client, uri: str):
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised unless the server was unreachable
                why = _gave_up(e)
                if why is None:
                    raise
                retries, factor, seconds = retry_budget()
                raise TrackingUnavailable(
                    f"MLflow tracking server {self._uri} {why} ({name}), still after {retries} retries over "
                    f"~{seconds:.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES={retries}, "
                    f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR={factor}): start it or fix tracking.uri, then rerun "
                    f"(a sweep: with --resume; finished trials are kept)") from e

        return call


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri``; for a tracking server, one that prints its retries and
    fails with :class:`TrackingUnavailable` when they are spent."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if uri.startswith(("http://", "https://")):
        _show_retries()
        return _Client(client, uri)
    return client


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing: for tests and for workers other than rank 0."""

    run_id = None

    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def set_tags(self, tags): pass
    def log_dict(self, data, name): pass
    def log_figure(self, figure, name): pass
    def log_artifact(self, path, artifact_path=None): pass
    def flush(self): pass
    def close(self, status="FINISHED"): pass


def client_for(uri: str):
    """An ``MlflowClient`` for ``uri`` (a sqlite database's folder is created first)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return mlflow_client(uri)


#: MLflow's experiment-type tag. Without it the UI infers a kind from the runs and, for runs
#: logged after the fact, lands on the GenAI overview (traces); these are model-training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client, uri: str, experiment: str) -> str:
    """The id of ``experiment``, created (artifacts beside a sqlite database) if missing,
    declared a model-training experiment."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:  # an experiment an older version created
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    artifact_root = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, not in the current directory.
        artifact_root = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=artifact_root, tags=EXPERIMENT_KIND)
    except MlflowException as e:
        # A create whose reply was lost, retried by MLflow's client, finds its own experiment
        # (as does a second process creating it at the same time).
        exp = client.get_experiment_by_name(experiment)
        if e.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
            raise
        return exp.experiment_id


DUPLICATE_TAG = "slmfactory.duplicate_of"
"""On a deleted duplicate run: the run kept in its place (:func:`find_or_create_run`)."""


def runs_tagged(client, experiment_id: str, tag: str, value: str) -> list:
    """The experiment's active runs tagged ``tag = value``, oldest first (start time, then run id)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_or_create_run(client, experiment_id: str, tag: str, value: str, run_name: str,
                       tags: dict[str, str] | None = None, start_time: int | None = None):
    """The one run of ``experiment_id`` tagged ``tag = value`` (a trial's key, a sweep's name):
    found, or created with that tag, and returned (an ``mlflow.entities.Run``).

    MLflow's HTTP client retries every request, ``create_run`` included: a tracking server
    that created the run but whose reply was lost (it died, a proxy dropped the connection)
    gets the request again and creates a second run. The tag travels in the create request
    itself, so every run the retries made carries it: after a create the runs so tagged are
    read back, the oldest (start time, then run id; a retried request carries the same start
    time) is kept and any other is deleted (tagged ``slmfactory.duplicate_of`` the kept one;
    MLflow keeps deleted runs until ``mlflow gc``). Every caller applies the same rule, so a
    retried trial, a resumed sweep and the driver all land on the same run."""
    runs = runs_tagged(client, experiment_id, tag, value)
    if not runs:
        # start_time fixed here, not by the client, so that a retry carries the same one.
        client.create_run(experiment_id, run_name=run_name, tags={**(tags or {}), tag: value},
                          start_time=start_time or int(time.time() * 1000))
        runs = runs_tagged(client, experiment_id, tag, value)
    kept, *duplicates = runs
    for run in duplicates:
        client.set_tag(run.info.run_id, DUPLICATE_TAG, kept.info.run_id)
        client.delete_run(run.info.run_id)
    return kept


class MlflowTracker:
    """One MLflow run, driven through ``MlflowClient`` (no global active-run state, so
    several trackers can coexist in a sweep driver)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, start_time: int | None = None):
        import mlflow

        self.client = client_for(uri)
        self.uri = uri
        exp_id = self.experiment_id = ensure_experiment(self.client, uri, experiment)
        if run_id is None:
            # start_time (ms): a run logged after the fact (a sweep trial) keeps the time its
            # work started, so the UI's duration is the trial's, not the logging's.
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags or {}, start_time=start_time)
            run_id = run.info.run_id
        self.run_id = run_id
        self._mlflow = mlflow

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = timestamp or int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def flush(self) -> None:
        pass  # every call above is sent at once

    def close(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)


MAX_BATCH_METRICS = 1000
"""MLflow's limit on the metrics of one ``log_batch``."""
LIVE_FLUSH_SECONDS = 10.0
"""How long a live run's curve points wait to be sent together (:class:`LiveRunTracker`)."""


class LiveRunTracker(MlflowTracker):
    """A run that is live while its work runs (a sweep trial's, opened when the trial
    starts): the trainer's curve points (``Trainer``'s tracker hook) are buffered and sent
    as one ``log_batch`` at most every :data:`LIVE_FLUSH_SECONDS` (the first point at once,
    so a new run shows its curve from the start) and at every :meth:`flush` (the trainer's
    end of phase); a Ray Train phase ships it to its workers (rank 0 logs), so it pickles
    without its client or its buffer."""

    def __init__(self, uri: str, run_id: str, flush_seconds: float = LIVE_FLUSH_SECONDS):
        self.uri, self.run_id, self.flush_seconds = uri, run_id, flush_seconds
        self.start_time: int | None = None
        """The run's start (ms), as its opener read it."""
        self._client = None
        self._points: list = []
        self._sent_at: float | None = None

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_points": [], "_sent_at": None}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp or int(time.time() * 1000)
        self._points += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if (self._sent_at is None or len(self._points) >= MAX_BATCH_METRICS
                or time.monotonic() - self._sent_at >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        # Best effort: live curves must not fail a trial while the tracking server is away
        # (the driver logs the finished trial, with its own retries); unsent points are kept.
        try:
            with best_effort_calls():  # a Ray Train worker's rank 0 holds no other MLflow call
                while self._points:
                    self.client.log_batch(self.run_id, metrics=self._points[:MAX_BATCH_METRICS])
                    del self._points[:MAX_BATCH_METRICS]
        except Exception as e:  # noqa: BLE001
            print(f"[tracking] live curve points kept for later: {type(e).__name__}: {e}", file=sys.stderr)
        self._sent_at = time.monotonic()

    def close(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.flush()
        super().close(status, end_time)


def watch_system(run_id: str, uri: str):
    """MLflow's system metrics on a live run (``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, disk and network; GPU ones where ``pynvml``
    is): MLflow's ``SystemMetricsMonitor``, a thread sampling every 10 s
    (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``) that logs to the run while it is RUNNING;
    a retried attempt's samples go on from the last step. On unless MLflow's own switch
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` says false: ``bench/system_metrics.py`` measured
    no cost on the 2-core machine, sampling even every second (docs/sweeps.md). It needs
    psutil; without it (a line when the switch asked for it), or switched off, this is None.
    Returns the monitor: ``finish()`` stops it and sends what it holds."""
    import importlib.util

    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    asked = MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set()
    if asked and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    if importlib.util.find_spec("psutil") is None:  # MLflow's monitors sample through it (not ours to import)
        if asked:
            print("[tracking] MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set but psutil is not installed: "
                  "no system metrics (pip install psutil)", file=sys.stderr)
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def open_tracker(cfg, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
    """The tracker a driver should use for ``cfg``: MLflow unless tracking is disabled."""
    if not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(cfg.tracking_uri, cfg.tracking.experiment, run_name, tags)


def register_model(tracker, name: str, artifact_path: str) -> None:
    """A new version of the domain's registered model, pointing at this run's model folder
    (``runs:/<run>/<artifact_path>``; a trial's is an MLflow model: :func:`log_hf_model`)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description="specialised small models of one domain (slmfactory)")
    except MlflowException:
        pass  # already registered

    def versions() -> list:
        found = client.search_model_versions(f"run_id = '{tracker.run_id}'")
        return sorted((mv for mv in found if mv.name == name), key=lambda mv: int(mv.version))

    # One version per run: a run logged again (a resumed sweep) registers nothing new, and a
    # create whose reply was lost and was retried keeps its first version (the rule of
    # find_or_create_run: the oldest stays, the others are deleted).
    if not versions():
        client.create_model_version(name, f"runs:/{tracker.run_id}/{artifact_path}", run_id=tracker.run_id)
        for extra in versions()[1:]:
            client.delete_model_version(name, extra.version)


# -- an exported model folder as an MLflow model -------------------------------------------

#: What a logged model needs to run its code (``platform/mlflow_model.py``), pinned to the
#: versions that logged it; the rest (safetensors, tokenizers, pandas) comes with them.
MODEL_REQUIREMENTS = ("mlflow", "torch", "transformers")


def model_requirements() -> list[str]:
    """``dist==version`` of :data:`MODEL_REQUIREMENTS` as installed here (a local version
    label such as torch's ``+cpu`` dropped: an index serves it, PyPI does not)."""
    from importlib.metadata import version

    return [f"{d}=={version(d).split('+', 1)[0]}" for d in MODEL_REQUIREMENTS]


def log_hf_model(tracker, folder: Path, artifact_path: str = "model") -> None:
    """Log an exported model folder (``export_hf``: safetensors, config, tokenizer files,
    ``slmfactory.json``) as the run's artifact ``artifact_path``, an MLflow ``pyfunc`` model
    whose root is the folder itself: its files as they are, beside MLflow's own (``MLmodel``
    with the signature, the environment files, the input example and ``mlflow_model.py``,
    the code of :mod:`slmfactory.platform.mlflow_model`, whose artifact ``model`` is that
    root). The weights are uploaded once, straight from the folder; ``runs:/<run>/model``
    (and a registry version of it) is both the folder ``AutoModelForCausalLM`` loads and a
    model ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` complete prompts with.
    Nothing is loaded or run here (no weights read, no requirements inferred): logging costs
    the upload and a few small files.

    A run artifact rather than an MLflow 3 *logged model* (``models:/<model_id>``, its files
    under the experiment's ``models/``): MLflow 3.17 reaches a logged model's files from
    ``runs:/<run>/model`` and registers ``models:/<model_id>`` sources through the process's
    global tracking URI, not the client's; every reader here holds a client for a given
    store (``serve --from-mlflow``, the study's per-sequence NLL export, the registry's
    download), and a second copy of the weights in the run would double the storage."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.pyfunc.model import CONFIG_KEY_ARTIFACT_RELATIVE_PATH, CONFIG_KEY_ARTIFACT_URI, CONFIG_KEY_ARTIFACTS

    from slmfactory.platform import mlflow_model

    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="slmfactory-mlmodel-") as tmp:
        local = Path(tmp) / "mlflow"
        mlflow.pyfunc.save_model(local, python_model=mlflow_model.__file__,
                                 mlflow_model=Model(artifact_path=artifact_path, run_id=tracker.run_id),
                                 signature=mlflow_model.signature(), input_example=mlflow_model.input_example(),
                                 pip_requirements=model_requirements())
        # The pyfunc artifact is the model's root: the folder's files, uploaded beside.
        meta = Model.load(local)
        meta.flavors[mlflow.pyfunc.FLAVOR_NAME][CONFIG_KEY_ARTIFACTS] = {
            mlflow_model.ARTIFACT: {CONFIG_KEY_ARTIFACT_RELATIVE_PATH: ".", CONFIG_KEY_ARTIFACT_URI: "."}}
        meta.model_size_bytes = (meta.model_size_bytes or 0) + sum(f.stat().st_size for f in folder.rglob("*")
                                                                   if f.is_file())
        meta.save(local / "MLmodel")
        clash = sorted(p.name for p in local.iterdir() if (folder / p.name).exists())
        if clash:
            raise ValueError(f"{folder}: holds {clash}, the names of an MLflow model's own files")
        # The folder first, MLmodel last: a folder with an MLmodel is complete.
        tracker.client.log_artifacts(tracker.run_id, str(folder), artifact_path)
        tracker.client.log_artifacts(tracker.run_id, str(local), artifact_path)


# -- the corpus splits a run read, as MLflow datasets ---------------------------------------

CORPUS_MANIFEST = "manifest.json"
"""The corpus manifest's file name under ``cfg.corpus_dir`` (``data.corpus.MANIFEST``; the
platform reads the file, the data layer writes and owns it)."""
SPLIT_COLUMNS = ("doc_id", "text", "source")
"""Every split's parquet columns, all strings (``data/corpus/store.py``)."""
MAX_SOURCE_PACKAGES = 1000
DIGEST_CHARS = 36
"""MLflow's limit on a dataset digest: the manifest's sha256 cut to it (whole in the profile)."""


def corpus_datasets(corpus_dir: Path, parts: list[str]) -> dict[str, Any]:
    """``{part: mlflow.entities.Dataset}`` of the corpus parts named (``generic/train``,
    ``domains/legal/test``), from the corpus manifest: name ``generic/train`` or
    ``legal/test``, digest the part's sha256, source the parquet file and the source
    packages the manifest names for it; profile its documents, bytes, words and full sha256.
    A part the manifest lacks (or a corpus without one) is left out."""
    from mlflow.entities import Dataset
    from mlflow.types import ColSpec, Schema

    path = Path(corpus_dir) / CORPUS_MANIFEST
    if not path.is_file():
        return {}
    manifest_parts = json.loads(path.read_text(encoding="utf-8")).get("parts", {})
    schema = json.dumps({"mlflow_colspec": Schema([ColSpec("string", c) for c in SPLIT_COLUMNS]).to_dict()})
    out = {}
    for part in parts:
        entry = manifest_parts.get(part)
        if not entry or not entry.get("sha256"):
            continue
        packages = [s.get("source", s.get("package", "?")) for s in entry.get("sources", [])]
        source = {"uri": (Path(corpus_dir).resolve() / f"{part}.parquet").as_uri(),
                  # within MLflow's 64 kB for a source: a corpus of thousands of packages is cut
                  "packages": packages[:MAX_SOURCE_PACKAGES],
                  **({"more_packages": len(packages) - MAX_SOURCE_PACKAGES}
                     if len(packages) > MAX_SOURCE_PACKAGES else {})}
        profile = {k: entry[k] for k in ("docs", "bytes", "tokens_ws", "sha256") if k in entry}
        out[part] = Dataset(name=part.removeprefix("domains/"), digest=entry["sha256"][:DIGEST_CHARS],
                            source_type="local", source=json.dumps(source), schema=schema,
                            profile=json.dumps(profile))
    return out


def log_datasets(tracker, datasets: list[tuple[Any, str]]) -> None:
    """Log ``(mlflow.entities.Dataset, context)`` pairs as the run's dataset inputs, each
    tagged with its context (``training``, ``validation``, ``test``)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if datasets:
        tracker.client.log_inputs(tracker.run_id, [DatasetInput(d, [InputTag(MLFLOW_DATASET_CONTEXT, context)])
                                                   for d, context in datasets])
