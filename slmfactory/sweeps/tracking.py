"""A sweep in MLflow: one parent run per sweep, one nested run per trial, written by the driver.

The parent run (tag ``slmfactory.sweep``) holds the recipe (``recipe.yaml``, resolved), the
dry-run plan (``plan.txt``), and after ``slmfactory report`` the report's files and the
recommendation. Each trial's run is a child of it (MLflow's ``mlflow.parentRunId`` tag:
the UI folds the trials under the sweep) and is found again by its ``slmfactory.trial`` tag
(the trial key), so logging the same trial twice — a resumed sweep, a rerun — updates its
one run instead of opening another. Tags carry what the MLflow UI filters and groups by
(strategy, domain, phase, in-domain size, generic budget); metrics carry perplexity and
every cost figure, so the UI's compare view plots perplexity against cost without custom
code. A trial's run starts and ends when the trial's own work did (the record's
``started_ms``/``ended_ms``), not when the driver logged it.

Registry: each domain's registered model ``<experiment>-<domain>`` gets the alias
``champion`` on its best version (lowest test perplexity) and ``champion-<cap>`` on its best
version of at most each ``sweep.inference_caps`` parameters. Aliases rather than tags:
``models:/<name>@champion`` is a URI MLflow resolves itself (serving, ``mlflow.artifacts``),
a tag is not; an alias moves only when a strictly better version arrives.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

TRIAL_TAG = "slmfactory.trial"
SWEEP_TAG = "slmfactory.sweep"
PARENT_TAG = "mlflow.parentRunId"
CHAMPION = "champion"


def find_trial_run(client, experiment_id: str, trial_key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_key}'",
                              max_results=5)
    return runs[0] if runs else None


def _short_budget(label: str) -> str:
    """``2e+05T`` -> ``200k``: run names the UI's name column shows whole."""
    if not label or label == "none":
        return "-"
    unit = label[-1] if label[-1] in "TF" else ""
    try:
        v = float(label[:-1] if unit else label)
    except ValueError:
        return label
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.3g}{suffix}" + ("F" if unit == "F" else "")
    return f"{v:.3g}" + ("F" if unit == "F" else "")


def run_name(record: dict[str, Any]) -> str:
    """``slm-is legal 200k/32.8k``: strategy, domain, generic/specialisation budget (the full
    trial name stays in the ``slmfactory.trial_name`` tag)."""
    t = record["tags"]
    return (f"{t['strategy']} {t['domain']} {_short_budget(t.get('generic_budget', ''))}/"
            f"{_short_budget(t.get('spec_budget', ''))}" + (f" {t['settings']}" if t.get("settings") else ""))


def find_sweep_run(client, experiment_id: str, sweep: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}'", max_results=5)
    return runs[0] if runs else None


def ensure_sweep_run(cfg, experiment: str, sweep: str, plan_text: str) -> str:
    """The sweep's parent run (found by its ``slmfactory.sweep`` tag, so a resumed sweep
    keeps its one parent), holding the resolved recipe and the dry-run plan; RUNNING until
    :func:`finish_sweep_run`."""
    from slmfactory.platform.recipe_schema import show_yaml
    from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment

    client = client_for(cfg.tracking_uri)
    existing = find_sweep_run(client, ensure_experiment(client, cfg.tracking_uri, experiment), sweep)
    tracker = MlflowTracker(cfg.tracking_uri, experiment, f"sweep {sweep}", {SWEEP_TAG: sweep},
                            run_id=existing.info.run_id if existing is not None else None)
    if existing is not None and existing.info.status != "RUNNING":
        client.update_run(tracker.run_id, status="RUNNING")
    tracker.client.log_text(tracker.run_id, show_yaml(cfg), "recipe.yaml")
    tracker.client.log_text(tracker.run_id, plan_text, "plan.txt")
    if existing is None:
        tracker.log_params({k: v for k, v in cfg.to_dict().items() if k.startswith("sweep.")})
    return tracker.run_id


def finish_sweep_run(cfg, run_id: str, status: str = "FINISHED") -> None:
    from slmfactory.platform.tracking import client_for

    client_for(cfg.tracking_uri).set_terminated(run_id, status=status)


def log_trial(cfg, experiment: str, trial_key: str, record: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Log (or complete) the one run of ``trial_key``, nested under the sweep's run
    ``parent_run_id`` when given; returns its run id."""
    from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment

    client = client_for(cfg.tracking_uri)
    existing = find_trial_run(client, ensure_experiment(client, cfg.tracking_uri, experiment), trial_key)
    if existing is not None and existing.info.status == "FINISHED" and "ppl_macro" in existing.data.metrics:
        return existing.info.run_id  # logged in full already
    nested = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    tracker = MlflowTracker(cfg.tracking_uri, experiment, run_name(record), tags=nested,
                            run_id=existing.info.run_id if existing is not None else None,
                            start_time=record.get("started_ms"))
    tracker.set_tags({TRIAL_TAG: trial_key, "slmfactory.trial_name": record["name"], **nested, **record["tags"]})
    tracker.log_params(record["params"])
    # Final metrics stamped at the trial's end: the UI's time axes are the trial's own.
    tracker.log_metrics(record["metrics"], timestamp=record.get("ended_ms"))
    for name, points in record.get("curves", {}).items():
        for step, value in points:
            tracker.log_metrics({name: value}, step=int(step))
    model = Path(record["model_path"])
    if model.is_dir():
        tracker.log_artifact(model, "model")
        register(tracker, f"{experiment}-{record['tags']['domain']}", "model")
    tracker.log_dict(record, "trial.json")
    tracker.close(end_time=record.get("ended_ms"))
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


def cap_alias(cap: float) -> str:
    """``champion-1_5m`` for a cap of 1.5e6 parameters (aliases allow only word characters
    and dashes)."""
    for div, suffix in ((1e9, "b"), (1e6, "m"), (1e3, "k"), (1, "")):
        if cap >= div:
            return f"{CHAMPION}-{cap / div:.3g}{suffix}".replace(".", "_").replace("+", "")
    return f"{CHAMPION}-{cap:.3g}".replace(".", "_")


def update_champions(uri: str, experiment: str, inference_caps=(), log=None) -> dict[str, dict[str, int]]:
    """Point ``champion`` (and ``champion-<cap>`` per inference cap) of every domain's
    registered model at its best version: the lowest test perplexity of the run behind it,
    among versions of at most the cap's parameters. The alias moves only when a version is
    strictly better than the one holding it. Returns {model name: {alias: version}}."""
    from mlflow.exceptions import MlflowException

    from slmfactory.platform.tracking import client_for

    client = client_for(uri)
    out: dict[str, dict[str, int]] = {}
    prefix = f"{experiment}-"
    for rm in client.search_registered_models(max_results=1000):
        if not rm.name.startswith(prefix):
            continue
        scored = []  # (ppl, params, version)
        for mv in client.search_model_versions(f"name = '{rm.name}'"):
            try:
                run = client.get_run(mv.run_id)
            except MlflowException:
                continue  # the run was deleted
            m, t = run.data.metrics, run.data.tags
            d = t.get("domain")
            if run.info.status != "FINISHED" or d is None or f"ppl/{d}" not in m or "params" not in m:
                continue
            scored.append((m[f"ppl/{d}"], m["params"], int(mv.version)))
        if not scored:
            continue
        held = dict(client.get_registered_model(rm.name).aliases or {})
        by_version = {v: (ppl, params) for ppl, params, v in scored}
        moved = {}
        for alias, cap in [(CHAMPION, math.inf), *((cap_alias(c), c) for c in sorted(inference_caps))]:
            fits = [s for s in scored if s[1] <= cap]
            if not fits:
                continue
            ppl, _, version = min(fits, key=lambda s: (s[0], s[2]))
            current = int(held[alias]) if alias in held and int(held[alias]) in by_version else None
            if current is not None and by_version[current][1] <= cap and by_version[current][0] <= ppl:
                moved[alias] = current  # the holder is as good: keep it
                continue
            client.set_registered_model_alias(rm.name, alias, str(version))
            moved[alias] = version
            if log:
                log(f"[registry] {rm.name}@{alias} -> version {version} (test ppl {ppl:.2f})")
        out[rm.name] = moved
    return out


def trial_model_uri(uri: str, experiment: str, tags: dict[str, str]) -> tuple[str, list[str]] | None:
    """The registry URI of the model a trial (matched by its tags: strategy, budgets,
    in-domain size, settings, domain) registered: ``models:/<name>/<version>``, and the
    aliases that version holds."""
    from slmfactory.platform.tracking import client_for

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    want = {k: v for k, v in tags.items() if k != "settings"}
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in want.items())
    for run in client.search_runs([exp.experiment_id], filter_string=flt + " and attributes.status = 'FINISHED'"):
        if run.data.tags.get("settings", "") != tags.get("settings", ""):
            continue
        for mv in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            # search results carry no aliases; the version itself does
            mv = client.get_model_version(mv.name, mv.version)
            return f"models:/{mv.name}/{mv.version}", list(mv.aliases or [])
    return None


def log_report_to_sweep(uri: str, experiment: str, out: Path, report: dict[str, Any]) -> str | None:
    """The report's files (``report/``), the recommendation and a table of every measured
    configuration (``configurations.json``, MLflow's table artifact: the UI lists it and
    sorts it by perplexity or cost) on the sweep's parent run. Returns its run id, or None
    when the experiment has no sweep run."""
    from slmfactory.platform.tracking import client_for

    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    run = None
    if exp is not None:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` != ''", max_results=5)
        run = runs[0] if runs else None
    if run is None:
        return None
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(out), "report")
    client.log_text(run_id, report["recommendation"], "recommendation.md")
    rows = {"configuration": [], "strategy": [], "params": [], "ppl_macro": [], "cost/generic_flops": [],
            "cost/spec_flops_per_domain": [], "cost/total_flops_N7": []}
    for c in report.get("configs", []):
        rows["configuration"].append(getattr(c, "label", c.strategy))
        rows["strategy"].append(c.strategy)
        rows["params"].append(int(c.params))
        rows["ppl_macro"].append(round(float(c.ppl_macro), 3))
        g, s = c.costs.get("flops", (0.0, 0.0))
        rows["cost/generic_flops"].append(float(g))
        rows["cost/spec_flops_per_domain"].append(float(s))
        rows["cost/total_flops_N7"].append(float(g) + 7 * float(s))
    if rows["strategy"]:
        client.log_table(run_id, data=rows, artifact_file="configurations.json")
    return run_id
