"""One MLflow run per sweep trial, written by the driver.

A trial's run is found again by its ``slmfactory.trial`` tag (the trial key), so logging
the same trial twice — a resumed sweep, a rerun — updates its one run instead of opening
another. Tags carry what the MLflow UI filters and groups by (strategy, domain, phase,
in-domain size, generic budget); metrics carry perplexity and every cost figure, so the
UI's compare view plots perplexity against cost without custom code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRIAL_TAG = "slmfactory.trial"


def find_trial_run(client, experiment_id: str, trial_key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_key}'",
                              max_results=5)
    return runs[0] if runs else None


def log_trial(cfg, experiment: str, trial_key: str, record: dict[str, Any]) -> str:
    """Log (or complete) the one run of ``trial_key``; returns its run id."""
    from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment

    client = client_for(cfg.tracking_uri)
    existing = find_trial_run(client, ensure_experiment(client, cfg.tracking_uri, experiment), trial_key)
    if existing is not None and existing.info.status == "FINISHED" and "ppl_macro" in existing.data.metrics:
        return existing.info.run_id  # logged in full already
    tracker = MlflowTracker(cfg.tracking_uri, experiment, record["name"],
                            run_id=existing.info.run_id if existing is not None else None)
    tracker.set_tags({TRIAL_TAG: trial_key, **record["tags"]})
    tracker.log_params(record["params"])
    tracker.log_metrics(record["metrics"])
    for name, points in record.get("curves", {}).items():
        for step, value in points:
            tracker.log_metrics({name: value}, step=int(step))
    model = Path(record["model_path"])
    if model.is_dir():
        tracker.log_artifact(model, "model")
        register(tracker, f"{experiment}-{record['tags']['domain']}", "model")
    tracker.log_dict(record, "trial.json")
    tracker.close()
    return tracker.run_id


def register(tracker, name: str, artifact_path: str) -> None:
    """A new version of the domain's registered model, pointing at this run's model folder."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        client.create_registered_model(name, description="specialised small models of one domain (slmfactory)")
    except MlflowException:
        pass  # already registered
    client.create_model_version(name, f"runs:/{tracker.run_id}/{artifact_path}", run_id=tracker.run_id)
