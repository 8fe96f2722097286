"""Experiment tracking. Only the driver (or rank 0) ever opens a tracker: Ray's own
MLflow callback follows the same rule, so N workers never create N runs.

MLflow >= 3.10 dropped the ``./mlruns`` file store, so the default backend is a sqlite
database inside the run's workdir; a cluster points ``tracking.uri`` at a server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def log_figure(self, figure: Any, name: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
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
    def close(self, status="FINISHED"): pass


def client_for(uri: str):
    """An ``MlflowClient`` for ``uri`` (a sqlite database's folder is created first)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


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
    artifact_root = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, not in the current directory.
        artifact_root = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return client.create_experiment(experiment, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


class MlflowTracker:
    """One MLflow run, driven through ``MlflowClient`` (no global active-run state, so
    several trackers can coexist in a sweep driver)."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                 run_id: str | None = None, start_time: int | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
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
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

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

    def close(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)


def open_tracker(cfg, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
    """The tracker a driver should use for ``cfg``: MLflow unless tracking is disabled."""
    if not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(cfg.tracking_uri, cfg.tracking.experiment, run_name, tags)


def register_model(tracker, name: str, artifact_path: str) -> None:
    """A new version of the domain's registered model, pointing at this run's model folder."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description="specialised small models of one domain (slmfactory)")
    except MlflowException:
        pass  # already registered
    client.create_model_version(name, f"runs:/{tracker.run_id}/{artifact_path}", run_id=tracker.run_id)
