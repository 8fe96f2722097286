"""A sweep in MLflow: one parent run per sweep (its trials' runs, logged by
:func:`slmfactory.trial.log_trial`, nest under it), the report on it, and the registry's
champion aliases.

The parent run (tag ``slmfactory.sweep``) holds the recipe (``recipe.yaml``, resolved), the
dry-run plan (``plan.txt``), and after ``slmfactory report`` the report's files and the
recommendation. Each trial's run is a child of it (:mod:`slmfactory.trial`).

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

from slmfactory.platform.recipe_schema import show_yaml
from slmfactory.platform.tracking import (MlflowTracker, client_for, ensure_experiment, find_or_create_run,
                                          runs_tagged)
from slmfactory.trial import PARENT_TAG, TrialRecord

SWEEP_TAG = "slmfactory.sweep"
CHAMPION = "champion"


def find_sweep_run(client, experiment_id: str, sweep: str):
    runs = runs_tagged(client, experiment_id, SWEEP_TAG, sweep)
    return runs[0] if runs else None


def ensure_sweep_run(cfg, experiment: str, sweep: str, plan_text: str) -> str:
    """The sweep's parent run (found by its ``slmfactory.sweep`` tag, so a resumed sweep
    keeps its one parent), holding the resolved recipe and the dry-run plan; RUNNING until
    :func:`finish_sweep_run`."""
    client = client_for(cfg.tracking_uri)
    exp_id = ensure_experiment(client, cfg.tracking_uri, experiment)
    existing = find_sweep_run(client, exp_id, sweep)
    run = find_or_create_run(client, exp_id, SWEEP_TAG, sweep, f"sweep {sweep}")
    tracker = MlflowTracker(cfg.tracking_uri, experiment, f"sweep {sweep}", run_id=run.info.run_id)
    if run.info.status != "RUNNING":
        client.update_run(tracker.run_id, status="RUNNING")
    tracker.client.log_text(tracker.run_id, show_yaml(cfg), "recipe.yaml")
    tracker.client.log_text(tracker.run_id, plan_text, "plan.txt")
    if existing is None:
        tracker.log_params({k: v for k, v in cfg.to_dict().items() if k.startswith("sweep.")})
    return tracker.run_id


def fail_running_trials(uri: str, experiment: str, parent_run_id: str) -> list[str]:
    """Mark FAILED every trial run under the sweep's run still RUNNING once its trials are
    done (trials Tune stopped: an interrupted sweep); returns their run ids. ``--resume``
    reopens them (``trial.open_trial_run``)."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                                                 "and attributes.status = 'RUNNING'",
                              max_results=10000)
    for run in runs:
        client.set_terminated(run.info.run_id, status="FAILED")
    return [r.info.run_id for r in runs]


def finish_sweep_run(cfg, run_id: str, status: str = "FINISHED") -> None:
    client_for(cfg.tracking_uri).set_terminated(run_id, status=status)


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
            d = t.get(TrialRecord.DOMAIN)
            ppl_name = TrialRecord.ppl_metric(d)
            if run.info.status != "FINISHED" or d is None or ppl_name not in m or TrialRecord.PARAMS not in m:
                continue
            scored.append((m[ppl_name], m[TrialRecord.PARAMS], int(mv.version)))
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
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    want = {k: v for k, v in tags.items() if k != TrialRecord.SETTINGS}
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in want.items())
    for run in client.search_runs([exp.experiment_id], filter_string=flt + " and attributes.status = 'FINISHED'"):
        if run.data.tags.get(TrialRecord.SETTINGS, "") != tags.get(TrialRecord.SETTINGS, ""):
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
    # cost/* measured, cost/paper_* the paper's convention (docs/costs.md); the columns a
    # trial also logs carry the trial record's names.
    R = TrialRecord
    generic, total, paper_generic, paper_total = (R.cost_metric("generic", "flops"), R.total_flops_metric(7),
                                                  R.paper_cost_metric("generic", "flops"),
                                                  R.total_flops_metric(7, paper=True))
    rows = {"configuration": [], "strategy": [], R.PARAMS: [], R.PPL_MACRO: [], generic: [],
            "cost/spec_flops_per_domain": [], total: [], paper_generic: [], paper_total: [],
            R.serving_cost_metric("generate"): []}
    for c in report.get("configs", []):
        rows["configuration"].append(getattr(c, "label", c.strategy))
        rows["strategy"].append(c.strategy)
        rows[R.PARAMS].append(int(c.params))
        rows[R.PPL_MACRO].append(round(float(c.ppl_macro), 3))
        g, s = c.costs.get("flops", (0.0, 0.0))
        rows[generic].append(float(g))
        rows["cost/spec_flops_per_domain"].append(float(s))
        rows[total].append(float(g) + 7 * float(s))
        paper = c.costs_in("paper").get("flops", (0.0, 0.0))
        rows[paper_generic].append(float(paper[0]))
        rows[paper_total].append(float(paper[0]) + 7 * float(paper[1]))
        # Measured device-hours per million generated tokens (None: not measured).
        rows[R.serving_cost_metric("generate")].append(c.serving.get("generate") if hasattr(c, "serving") else None)
    if rows["strategy"]:
        client.log_table(run_id, data=rows, artifact_file="configurations.json")
    return run_id
