"""The study's results page, step one: a tidy CSV of every trial run, and configurations from it.

``docs/results.md`` is regenerated from a CSV alone (``scripts/study_page.py --from-csv``), so it
can be rebuilt and tested without the MLflow store. This module holds the two ends of that
CSV and the optional wall-time parse of the study's log:

- :func:`export_rows` reads every finished trial run of a sweep's experiment from MLflow
  (tagged ``slmfactory.trial``, with a ``test_nll``: the runs ``measured.load_configs`` reads)
  into one flat row per run; :func:`write_csv` / :func:`read_csv` store them losslessly
  (floats as ``repr``, so a value read back equals the logged metric exactly).
- :func:`configs_from_rows` groups rows into ``measured.MeasuredConfig`` objects by the same rules as
  ``measured.load_configs`` (costs: generic = max over the trials, specialisation = mean over
  domains; only configurations measured on every domain), so ``report``'s tables and plots
  draw from the CSV.
- :func:`parse_stage_log` turns the study log's ``HH:MM:SS`` stage markers into seconds per
  stage; :func:`write_stages` keeps them in a JSON beside the CSV.

The claims and the page itself are in ``study.claims`` and ``study.page``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.analysis import measured
from slmfactory.analysis.measured import COST_UNITS, MeasuredConfig, generic_ppl
from slmfactory.platform.errors import DataError
from slmfactory.trial import TRIAL_TAG, Budget, TrialRecord as R

# (CSV column, MLflow metric) for the per-trial metrics copied verbatim.
METRIC_COLUMNS = (
    ("params", R.PARAMS),
    ("inference_flops_per_token", R.INFERENCE_FLOPS_PER_TOKEN),
    ("test_nll", R.TEST_NLL),
    ("test_nll_se", R.TEST_NLL_SE),
    ("test_sequences", R.TEST_SEQUENCES),
    ("ppl_before", R.TEST_PPL_BEFORE),
    ("routed_generic_ppl", R.ROUTED_GENERIC_PPL),
    ("teacher_generic_ppl", R.TEACHER_GENERIC_PPL),
    ("teacher_test_ppl", R.TEACHER_TEST_PPL),
    ("generic_flops", R.cost_metric("generic", "flops")),
    ("spec_flops", R.cost_metric("spec", "flops")),
    ("generic_device_hours", R.cost_metric("generic", "device_hours")),
    ("spec_device_hours", R.cost_metric("spec", "device_hours")),
    ("generic_wall_seconds", R.cost_metric("generic", "wall_seconds")),
    ("spec_wall_seconds", R.cost_metric("spec", "wall_seconds")),
    ("clustering_generic_flops", R.clustering_cost_metric("generic", "flops")),
    ("clustering_generic_device_hours", R.clustering_cost_metric("generic", "device_hours")),
    ("spent_generic_tokens", R.spent_tokens_metric("generic")),
    ("spent_spec_tokens", R.spent_tokens_metric("spec")),
    ("epochs_generic", R.EPOCHS_GENERIC),
    ("epochs_spec", R.EPOCHS_SPEC),
    ("epochs_resampled_pretrain", R.EPOCHS_RESAMPLED_PRETRAIN),
    ("epochs_resampled_window_repeats", R.EPOCHS_RESAMPLED_WINDOW_REPEATS),
    ("finetune_steps", R.FINETUNE_STEPS),
    ("domain_entropy", R.DOMAIN_ENTROPY),
    ("lora_trainable_params", R.LORA_TRAINABLE_PARAMS),
    ("valid_nll", R.VALID_NLL),
    ("finetune_best_step", R.FINETUNE_BEST_STEP),
)
# Metrics named after the trial's domain: ppl/<domain>, ppl_lo/<domain>, ppl_hi/<domain>.
DOMAIN_COLUMNS = ("ppl", "ppl_lo", "ppl_hi")
_DOMAIN_METRICS = (R.ppl_metric, R.ppl_lo_metric, R.ppl_hi_metric)
TAG_COLUMNS = (R.STRATEGY, R.DOMAIN, R.GENERIC_BUDGET, R.SPEC_BUDGET, R.IN_DOMAIN_TOKENS, R.SETTINGS)
COLUMNS = (("run_id", "trial_key") + TAG_COLUMNS + ("pretrain_seed",) + DOMAIN_COLUMNS + ("generic_ppl",)
           + tuple(c for c, _ in METRIC_COLUMNS) + ("domain_entropy_k", "start_ms", "end_ms", "is_shares"))
# JSON columns: ``is_shares`` = {kind: {label: share}} of slm-is's resampled pretraining tokens by
# generic source and collection (``TrialRecord.is_shares``); the page's provenance table.
_JSON_COLUMNS = ("is_shares",)
_UNIT_COLUMNS = {"flops": ("generic_flops", "spec_flops"),
                 "device_hours": ("generic_device_hours", "spec_device_hours")}
_EMBED_COLUMNS = {"flops": "clustering_generic_flops", "device_hours": "clustering_generic_device_hours"}


def budget_value(label: str) -> float:
    """``8e+06T`` -> 8e6 (``none`` -> 0): budgets sort by value, not by text."""
    try:
        return float(label.rstrip("TF"))
    except ValueError:
        return 0.0


def fill_entropy_k(rows: list[dict[str, Any]], cfg) -> tuple[list[dict[str, Any]], int]:
    """Rows with ``domain_entropy_k`` filled where a CSV exported before the column lacks it:
    ``measured.entropy_clusters`` of the recipe ``cfg`` with the row's settings applied. Returns the
    rows (copies where filled) and how many were filled."""
    base = cfg.to_dict()
    out, filled = [], 0
    for r in rows:
        if r.get("domain_entropy") is not None and r.get("domain_entropy_k") is None:
            k = measured.entropy_clusters(r["strategy"], {**base, **measured.parse_settings(r["settings"])})
            if k is not None:
                r = {**r, "domain_entropy_k": float(k)}
                filled += 1
        out.append(r)
    return out, filled


def row_from_run(run) -> dict[str, Any]:
    """One flat row from an MLflow trial run (None where a metric was not logged)."""
    t, m = run.data.tags, run.data.metrics
    d = t[R.DOMAIN]
    row: dict[str, Any] = {"run_id": run.info.run_id, "trial_key": t.get(TRIAL_TAG, "")}
    row.update({k: t.get(k, "") for k in TAG_COLUMNS})
    # The pages group and show budgets by their labels (display); the run's tags hold them exactly.
    for side, col in (("generic", R.GENERIC_BUDGET), ("spec", R.SPEC_BUDGET)):
        budget = Budget.from_tags(t, side)
        row[col] = budget.label() if budget is not None else "none"
    row["in_domain_tokens"] = int(row["in_domain_tokens"])
    row["pretrain_seed"] = measured.parse_settings(row["settings"]).get("pretrain.seed", "")
    for col, metric in zip(DOMAIN_COLUMNS, _DOMAIN_METRICS):
        row[col] = m.get(metric(d))
    row["generic_ppl"] = generic_ppl(m)
    row.update({col: m.get(metric) for col, metric in METRIC_COLUMNS})
    row["domain_entropy_k"] = None
    if row["domain_entropy"] is not None:
        k = m.get(R.DOMAIN_ENTROPY_K)
        k = k if k is not None else measured.entropy_clusters(row["strategy"], run.data.params)
        row["domain_entropy_k"] = None if k is None else float(k)
    row["start_ms"], row["end_ms"] = run.info.start_time, run.info.end_time
    shares = {kind: R.is_shares(m, kind) for kind in R.IS_SHARE_KINDS}
    row["is_shares"] = shares if any(shares.values()) else None
    return row


def _sort_key(r: dict[str, Any]) -> tuple:
    return (r["in_domain_tokens"], r["strategy"], budget_value(r["generic_budget"]), budget_value(r["spec_budget"]),
            r["settings"], r["domain"])


def export_rows(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every finished trial run of ``experiment`` with a test NLL, one row each, sorted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DataError(f"MLflow experiment {experiment!r} not found at {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=50000)
    rows = [row_from_run(r) for r in runs if TRIAL_TAG in r.data.tags and R.TEST_NLL in r.data.metrics]
    return sorted(rows, key=_sort_key)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))  # floats as repr: exact back
    return str(v)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return path


_TEXT = set(("run_id", "trial_key", "pretrain_seed") + TAG_COLUMNS) - {"in_domain_tokens"}


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows back from :func:`write_csv`: tags as text, ``in_domain_tokens`` and the run's
    times as int, ``is_shares`` as the dict it was, every metric as float (None where empty; a
    CSV written before a column existed reads without it)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if k in _TEXT:
                row[k] = v
            elif k in ("in_domain_tokens", "start_ms", "end_ms"):
                row[k] = int(v) if v else None
            elif k in _JSON_COLUMNS:
                row[k] = json.loads(v) if v else None
            else:
                row[k] = float(v) if v else None
        out.append(row)
    return out


def _describe(r: dict[str, Any]) -> tuple:
    return ((r["strategy"], r["generic_budget"], r["spec_budget"], r["in_domain_tokens"]), r["domain"], r["settings"],
            r.get("valid_nll"))


def selected_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the configurations are made of: where a setting is chosen on validation
    (``measured.SELECTED_ON_VALIDATION``), the winning run per domain, its ``settings`` without
    the chosen key and ``selected`` naming it."""
    return [{**r, "settings": settings, "selected": picked}
            for r, settings, picked in measured.select_on_validation(sorted(rows, key=_sort_key), _describe)]


def configs_from_rows(rows: list[dict[str, Any]]) -> list[MeasuredConfig]:
    """``measured.MeasuredConfig`` objects from CSV rows, by ``measured.load_configs``'s rules: one
    configuration per (strategy, generic budget, spec. budget, in-domain size, settings);
    generic cost the max over its trials, specialisation cost the mean over domains; only
    configurations measured on every domain; sorted by in-domain size then macro perplexity."""
    groups: dict[tuple, MeasuredConfig] = {}
    acc: dict[tuple, dict[str, list[float]]] = {}
    for r, settings, picked in measured.select_on_validation(sorted(rows, key=_sort_key), _describe):
        key = (r["strategy"], r["generic_budget"], r["spec_budget"], r["in_domain_tokens"], settings)
        c = groups.setdefault(key, MeasuredConfig(*key, params=int(r["params"]),
                                                  inference=r["inference_flops_per_token"],
                                                  costs={}, ppl={}, nll={}))
        d = r["domain"]
        c.ppl[d], c.nll[d] = r["ppl"], r["test_nll"]
        if picked:
            c.selected[d] = picked
        for col, target in (("test_nll_se", c.se), ("ppl_lo", c.ppl_lo), ("ppl_hi", c.ppl_hi),
                            ("ppl_before", c.ppl_before), ("domain_entropy", c.entropy)):
            if r.get(col) is not None:
                target[d] = r[col]
        if r.get("domain_entropy_k") is not None:
            c.entropy_k = int(r["domain_entropy_k"])
        if c.generic_ppl is None:
            c.generic_ppl = r.get("generic_ppl")
        a = acc.setdefault(key, {})
        for unit, (g, s) in _UNIT_COLUMNS.items():
            if r.get(s) is not None:
                a.setdefault(f"g:{unit}", []).append(r.get(g) or 0.0)
                a.setdefault(f"s:{unit}", []).append(r[s])
        for unit, col in _EMBED_COLUMNS.items():
            if r.get(col) is not None:
                a.setdefault(f"e:{unit}", []).append(r[col])
        for col in ("spent_generic_tokens", "spent_spec_tokens", "epochs_generic", "epochs_spec"):
            if r.get(col) is not None:
                a.setdefault(col, []).append(r[col])
    for key, c in groups.items():
        a = acc[key]
        c.costs = {u: (max(a[f"g:{u}"]), float(np.mean(a[f"s:{u}"]))) for u in COST_UNITS if f"s:{u}" in a}
        c.embed_generic = {u: max(a[f"e:{u}"]) for u in COST_UNITS if f"e:{u}" in a}
        mean = {k: (float(np.mean(v)) if v else None) for k, v in a.items()}
        c.spent_generic, c.spent_spec = mean.get("spent_generic_tokens"), mean.get("spent_spec_tokens")
        c.epochs_generic, c.epochs_spec = mean.get("epochs_generic"), mean.get("epochs_spec")
    domains = set().union(*(c.nll for c in groups.values())) if groups else set()
    configs = [c for c in groups.values() if set(c.nll) == domains]
    measured.set_seed_spread(configs)
    measured.apply_conventions(configs)
    return sorted(configs, key=lambda c: (c.in_domain, c.ppl_macro))


def incomplete_groups(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Configurations left out for missing domains: (label, domains measured)."""
    domains = sorted({r["domain"] for r in rows})
    seen: dict[tuple, set[str]] = {}
    for r in rows:
        key = (r["strategy"], r["generic_budget"], r["spec_budget"], r["in_domain_tokens"], r["settings"])
        seen.setdefault(key, set()).add(r["domain"])
    return [(f"{s} g{g} s{sp} n{n:,}" + (f" [{st}]" if st else ""), sorted(ds))
            for (s, g, sp, n, st), ds in sorted(seen.items(), key=lambda kv: str(kv[0])) if len(ds) < len(domains)]


# -- the study log's wall time per stage --------------------------------------------------

_STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) (.*)$")
# (regex on the line after its stamp, stage it opens); None closes the running stage.
_MARKERS = (
    (re.compile(r"^\[study\] corpus start"), "corpus build"),
    (re.compile(r"^\[study\] (corpus done; )?sweep start"), "sweep setup (Ray, plan, tokenizer)"),
    (re.compile(r"^\[cluster\]"), "clustering (windows, embedding, k-means, assignment)"),
    (re.compile(r"^\[resample\]"), "resampling and per-domain data (slm-is, experts)"),
    (re.compile(r"^\[sweep\] generic phase \d+/\d+: (\S+)"), "generic phase {0}"),
    (re.compile(r"^\[sweep\] \d+ trials on Ray Tune"), "trials (specialisation, on Ray Tune)"),
    (re.compile(r"^\[study\] sweep done"), None),
)
_FINISHED = re.compile(r"^\[sweep\s+\d+s\] .*\| finished ")
_FAILED = re.compile(r"^\[sweep\s+\d+s\] .*\| FAILED ")


def parse_stage_log(path: Path) -> dict[str, Any]:
    """Seconds per stage from a log whose lines start ``HH:MM:SS``: each marker line (see
    ``_MARKERS``) opens a stage that lasts until the next marker (``[study] sweep done`` only
    closes); a stage met again (a resumed sweep) adds up. A clock going backwards is midnight.
    The last stage still open runs to the last stamped line."""
    stages: dict[str, float] = {}
    open_stage, opened, last, day, prev = None, None, None, 0, None
    attempts = finished = failed = 0
    first = None
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        hh, mm, ss, text = int(m[1]), int(m[2]), int(m[3]), m[4]
        t = hh * 3600 + mm * 60 + ss
        if prev is not None and t < prev:
            day += 86400
        prev = t
        t += day
        first = t if first is None else first
        last = t
        finished += bool(_FINISHED.match(text))
        failed += bool(_FAILED.match(text))
        for pattern, stage in _MARKERS:
            hit = pattern.match(text)
            if not hit:
                continue
            name = stage.format(*hit.groups()) if stage else None
            if name == open_stage and stage is not None and not name.startswith("generic phase"):
                break  # another line of the stage already running
            if open_stage is not None:
                stages[open_stage] = stages.get(open_stage, 0.0) + t - opened
            attempts += bool(stage and "sweep start" in pattern.pattern)
            open_stage, opened = name, t
            break
    if open_stage is not None and last is not None:
        stages[open_stage] = stages.get(open_stage, 0.0) + last - opened
    return {"log": str(path), "stages": [{"stage": k, "seconds": v} for k, v in stages.items()],
            "total_seconds": sum(stages.values()), "span_seconds": (last - first) if first is not None else 0,
            "sweep_attempts": attempts, "trials_finished_lines": finished, "trials_failed_lines": failed,
            "still_running": open_stage is not None}


def stages_path(csv_path: Path) -> Path:
    """The per-stage wall times live beside the CSV: ``<csv stem>.stages.json``."""
    return csv_path.with_name(csv_path.stem + ".stages.json")


def write_stages(stages: dict[str, Any], csv_path: Path) -> Path:
    path = stages_path(csv_path)
    path.write_text(json.dumps(stages, indent=1) + "\n")
    return path


def read_stages(csv_path: Path) -> dict[str, Any] | None:
    path = stages_path(csv_path)
    return json.loads(path.read_text()) if path.is_file() else None


# -- per-sequence test NLLs (paired comparisons) -------------------------------------------

def seq_nll_path(csv_path: Path) -> Path:
    """The runs' per-sequence test NLLs live beside the CSV: ``<csv stem>.seqnll.npz``, keyed by run id."""
    return csv_path.with_name(csv_path.stem + ".seqnll.npz")


def export_seq_nll(uri: str, rows: list[dict[str, Any]], csv_path: Path) -> Path:
    """Download each row's ``model/test_seq_nll.npy`` artifact (``TrialRecord.TEST_SEQ_NLL_FILE``)
    into one compressed ``.npz`` beside the CSV; a run without it is a clear error."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            try:
                local = client.download_artifacts(r["run_id"], f"model/{R.TEST_SEQ_NLL_FILE}", tmp)
            except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
                raise DataError(f"run {r['run_id']} ({r['strategy']} on {r['domain']}): no model/{R.TEST_SEQ_NLL_FILE} "
                                f"artifact (trials logged before per-sequence NLLs existed cannot be paired): {e}")
            arrays[r["run_id"]] = np.load(local)
    path = seq_nll_path(csv_path)
    np.savez_compressed(path, **arrays)
    return path


def read_seq_nll(csv_path: Path) -> dict[str, np.ndarray] | None:
    path = seq_nll_path(csv_path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
