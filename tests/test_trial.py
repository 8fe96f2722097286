"""The trial record: one set of names from the writers (the phase library's metrics, the
driver's record) through MLflow to every reader (the frontier, the study's CSV export, the
serving catalog, the registry's aliases, the resampling table), and the names runs already
stored carry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slmfactory.platform.config import load_config
from slmfactory.platform.cost import SERVING_TASKS, CostRecord, ServingRates
from slmfactory.platform.stages import Stage
from slmfactory.trial import PARENT_TAG, TRIAL_TAG, Budget, TrialRecord as R, log_trial

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

STORED_METRICS = {
    # The committed study CSV's column -> the MLflow name its runs were logged under. Every
    # stored run (the committed CSVs, a running study's store, the demo's cached runs) carries
    # these names: renaming one orphans them, so a rename must fail here first.
    "ppl": "ppl/legal",
    "ppl_lo": "ppl_lo/legal",
    "ppl_hi": "ppl_hi/legal",
    "generic_ppl": "generic/generic_ppl",
    "params": "params",
    "inference_flops_per_token": "cost/inference_flops_per_token",
    "test_nll": "test_nll",
    "test_nll_se": "test_nll_se",
    "test_sequences": "test_sequences",
    "ppl_before": "test_ppl_before",
    "routed_generic_ppl": "generic/routed_generic_ppl",
    "teacher_generic_ppl": "generic/teacher_generic_ppl",
    "teacher_test_ppl": "teacher_test_ppl",
    "generic_flops": "cost/generic_flops",
    "spec_flops": "cost/spec_flops",
    "generic_device_hours": "cost/generic_device_hours",
    "spec_device_hours": "cost/spec_device_hours",
    "generic_wall_seconds": "cost/generic_wall_seconds",
    "spec_wall_seconds": "cost/spec_wall_seconds",
    "clustering_generic_flops": "cost/clustering_generic_flops",
    "clustering_generic_device_hours": "cost/clustering_generic_device_hours",
    "spent_generic_tokens": "spent/generic_tokens",
    "spent_spec_tokens": "spent/spec_tokens",
    "epochs_generic": "epochs/generic",
    "epochs_spec": "epochs/spec",
    "epochs_resampled_pretrain": "epochs/resampled_pretrain",
    "epochs_resampled_window_repeats": "epochs/resampled_window_repeats",
    "finetune_steps": "finetune_steps",
    "domain_entropy": "domain_entropy",
    "domain_entropy_k": "domain_entropy_k",
    "lora_trainable_params": "lora_trainable_params",
    "valid_nll": "valid_nll",
    "finetune_best_step": "finetune/best_step",
}
# Every name TrialRecord owns, spelled out: stored runs carry these, so a rename inside the
# record (a constant, a builder's pattern) must fail here rather than pass through every test
# that reads the name back from the record itself.
RECORD_NAMES = {
    # tags
    "STRATEGY": "strategy", "DOMAIN": "domain", "PHASE": "phase", "IN_DOMAIN_TOKENS": "in_domain_tokens",
    "GENERIC_BUDGET": "generic_budget", "SPEC_BUDGET": "spec_budget", "GENERIC_BUDGET_UNIT": "generic_budget_unit",
    "SPEC_BUDGET_UNIT": "spec_budget_unit", "SETTINGS": "settings", "DEVICE": "device",
    "GENERIC_SPENT": "generic_spent", "SPEC_SPENT": "spec_spent", "GROUP": "group",
    "TRIAL_NAME": "slmfactory.trial_name",
    # metrics
    "TEST_NLL": "test_nll", "TEST_NLL_SE": "test_nll_se", "TEST_SEQUENCES": "test_sequences",
    "TEST_PPL_BEFORE": "test_ppl_before", "PPL_MACRO": "ppl_macro", "PARAMS": "params",
    "INFERENCE_FLOPS_PER_TOKEN": "cost/inference_flops_per_token", "VALID_NLL": "valid_nll",
    "FINETUNE_STEPS": "finetune_steps", "FINETUNE_BEST_STEP": "finetune/best_step",
    "TEST_SEQ_NLL_FILE": "test_seq_nll.npy", "EPOCHS_GENERIC": "epochs/generic", "EPOCHS_SPEC": "epochs/spec",
    "EPOCHS_RESAMPLED_PRETRAIN": "epochs/resampled_pretrain",
    "EPOCHS_RESAMPLED_WINDOW_REPEATS": "epochs/resampled_window_repeats", "DOMAIN_ENTROPY": "domain_entropy",
    "DOMAIN_ENTROPY_K": "domain_entropy_k", "TEACHER_TEST_PPL": "teacher_test_ppl",
    "LORA_TRAINABLE_PARAMS": "lora_trainable_params", "EXPERT": "expert", "GENERIC_PREFIX": "generic/",
    "GENERIC_PPL": "generic/generic_ppl", "ROUTED_GENERIC_PPL": "generic/routed_generic_ppl",
    "TEACHER_GENERIC_PPL": "generic/teacher_generic_ppl", "GENERIC_VALID_NLL": "generic/generic_valid_nll",
    "IS_SHARE": "is_share", "IS_SHARE_KINDS": ("source", "collection"),
    "SERVING_MACHINE": "serving_machine",
    # curves
    "FINETUNE_VALID_NLL": "finetune/valid_nll", "FINETUNE_TRAIN_LOSS": "finetune/train_loss",
    # the parts the builders below combine
    "SIDES": ("generic", "spec"), "COST_UNITS": ("flops", "device_hours", "wall_seconds"),
    "AMORTISATION_N": (1, 7, 50), "USED": ("precision", "compile"),
}
# The driver's record for a slm-is trial on legal (``record_for``): every metric, tag and
# used-precision param name it carries.
RECORD_METRICS = {
    "ppl/legal", "ppl_lo/legal", "ppl_hi/legal", "ppl_macro", "test_nll", "test_nll_se", "test_sequences",
    "test_ppl_before", "valid_nll", "params", "finetune_steps", "finetune/best_step", "lora_trainable_params", "teacher_test_ppl",
    "domain_entropy", "domain_entropy_k", "epochs/generic", "epochs/spec", "epochs/resampled_pretrain",
    "epochs/resampled_window_repeats", "cost/inference_flops_per_token",
    "cost/generic_flops", "cost/generic_device_hours", "cost/generic_wall_seconds",
    "cost/spec_flops", "cost/spec_device_hours", "cost/spec_wall_seconds",
    "cost/clustering_generic_flops", "cost/clustering_generic_device_hours",
    "cost/paper_generic_flops", "cost/paper_generic_device_hours",
    "cost/total_flops_N1", "cost/total_flops_N7", "cost/total_flops_N50",
    "cost/paper_total_flops_N1", "cost/paper_total_flops_N7", "cost/paper_total_flops_N50",
    "spent/generic_tokens", "spent/spec_tokens",
    "generic/generic_ppl", "generic/routed_generic_ppl", "generic/teacher_generic_ppl", "generic/generic_valid_nll",
    "is_share/source/doc-debian", "is_share/source/manpages", "is_share/collection/docs",
    "serving/generate_tokens_per_s", "serving/score_tokens_per_s",
    "serving/generate_device_hours_per_mtok", "serving/score_device_hours_per_mtok",
}
RECORD_TAGS = {"strategy", "domain", "phase", "in_domain_tokens", "generic_budget", "spec_budget",
               "generic_budget_unit", "spec_budget_unit", "settings", "device", "generic_spent", "spec_spent", "group",
               "serving_machine"}
RECORD_USED_PARAMS = {"pretrain/slm.precision_used", "pretrain/slm.compile_used"}
STORED_TAGS = ("strategy", "domain", "generic_budget", "spec_budget", "in_domain_tokens", "settings")
IDENTITY_COLUMNS = ("run_id", "trial_key", "pretrain_seed", "start_ms", "end_ms")
# CSV columns holding, as JSON, every metric under one of the record's prefixes.
PREFIX_COLUMNS = {"is_shares": R.IS_SHARE}


def committed_csvs() -> list[Path]:
    return sorted((REPO / "docs").glob("study*-runs.csv"))


def record_for(cfg, domain: str, nll: float, tmp_path: Path) -> R:
    """The record the driver builds (``pipeline.trial_record``) for a slm-is-like trial on
    ``domain``: the model's metrics under the names the phase library and the strategies write,
    a generic phase with its validation figures, and an exported model folder to register."""
    from slmfactory.models.strategies.base import GenericArtifact, SpecializedModel
    from slmfactory.pipeline import trial_record

    cfg = cfg.replace(**{"data.domain": domain})
    generic_cost = CostRecord(phase="generic/slm", tokens=4000, flops=2e12, wall_seconds=30.0, device_hours=0.5,
                              extra={R.used_param("pretrain/slm", "precision"): "bf16",
                                     R.used_param("pretrain/slm", "compile"): "eager"})
    spec_cost = CostRecord(phase=f"specialize/slm/{domain}", tokens=1000, flops=3e10 if domain == "legal" else 5e10,
                           wall_seconds=4.0, device_hours=0.01)
    generic = GenericArtifact("slm", Stage.of(tmp_path, "generic", "slm", domain=domain), generic_cost,
                              {"generic_ppl": 90.0, "routed_generic_ppl": 85.0, "teacher_generic_ppl": 60.0,
                               "generic_valid_nll": 4.5, "epochs": 0.5})
    folder = tmp_path / f"model-{domain}"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    metrics = {R.TEST_NLL: nll, "test_ppl": math.exp(nll), "test_ppl_lo": math.exp(nll - 0.02),
               "test_ppl_hi": math.exp(nll + 0.02), R.TEST_NLL_SE: 0.01, R.TEST_SEQUENCES: 64.0,
               R.TEST_PPL_BEFORE: math.exp(nll + 0.5), R.VALID_NLL: nll, R.FINETUNE_STEPS: 40.0, R.FINETUNE_BEST_STEP: 0.0,
               R.EPOCHS_SPEC: 1.5, R.EPOCHS_GENERIC: 0.5, R.EPOCHS_RESAMPLED_PRETRAIN: 2.0,
               R.EPOCHS_RESAMPLED_WINDOW_REPEATS: 1.25,
               R.DOMAIN_ENTROPY: 1.25, R.DOMAIN_ENTROPY_K: 16.0, R.TEACHER_TEST_PPL: 30.0,
               R.LORA_TRAINABLE_PARAMS: 1234.0, R.clustering_cost_metric("generic", "flops"): 1e11,
               R.clustering_cost_metric("generic", "device_hours"): 0.05,
               R.is_share_metric("source", "doc-debian"): 0.75, R.is_share_metric("source", "manpages"): 0.25,
               R.is_share_metric("collection", "docs"): 1.0}
    # The serving rates as the EXPORT stage measures and writes them (phases.finish).
    rates = ServingRates(generate_tokens_per_s=500.0, score_tokens_per_s=20_000.0,
                         machine={"cpu": "Test CPU", "cores": 2, "bf16_matrix": "", "threads": 1,
                                  "measured": "2026-12-07 08:00 UTC"})
    metrics |= {R.serving_rate_metric(t): rates.tokens_per_s(t) for t in SERVING_TASKS}
    metrics |= {R.serving_cost_metric(t): rates.device_hours_per_million(t) for t in SERVING_TASKS}
    model = SpecializedModel(strategy="slm-is", domain=domain, path=folder, generic_cost=generic_cost,
                             spec_cost=spec_cost, params=123456, inference_flops_per_token=2.5e5, metrics=metrics,
                             curves={R.FINETUNE_VALID_NLL: [[1, nll + 1.0], [2, nll]]},
                             serving_rates=rates.to_dict())
    return trial_record(cfg, model, generic)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two domains' records logged by ``log_trial`` into one sqlite store."""
    tmp = tmp_path_factory.mktemp("trial")
    cfg = load_config(DEMO, {"workdir": str(tmp), "strategy.name": "slm-is", "tracking.enabled": True})
    records = {d: record_for(cfg, d, nll, tmp) for d, nll in (("legal", 3.0), ("code", 2.5))}
    run_ids = {d: log_trial(cfg, "trial-record", r.key, r) for d, r in records.items()}
    return cfg, records, run_ids


def test_a_record_crosses_as_json_and_comes_back_equal(tmp_path):
    """What a Tune worker reports (``to_dict`` as JSON) is what the driver logs
    (``from_dict``), times included once known."""
    cfg = load_config(DEMO, {"workdir": str(tmp_path), "strategy.name": "slm-is"})
    record = record_for(cfg, "legal", 3.0, tmp_path)
    assert "started_ms" not in record.to_dict()
    record.started_ms, record.ended_ms = 1_000, 2_000
    back = R.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record
    assert back.ppl == record.metrics["ppl/legal"] == pytest.approx(math.exp(3.0))
    assert list(back.to_dict()) == ["name", "key", "tags", "params", "metrics", "curves", "model_path",
                                    "started_ms", "ended_ms"]


def test_the_driver_writes_every_name_the_readers_read(tmp_path):
    """Each name a reader looks up is in the record the driver builds, with the value the
    writer gave it."""
    cfg = load_config(DEMO, {"workdir": str(tmp_path), "strategy.name": "slm-is"})
    record = record_for(cfg, "legal", 3.0, tmp_path)
    m, t, d = record.metrics, record.tags, record.domain
    read = [R.ppl_metric(d), R.ppl_lo_metric(d), R.ppl_hi_metric(d), R.TEST_NLL, R.TEST_NLL_SE, R.TEST_SEQUENCES,
            R.TEST_PPL_BEFORE, R.PPL_MACRO, R.PARAMS, R.INFERENCE_FLOPS_PER_TOKEN, R.FINETUNE_STEPS,
            R.EPOCHS_GENERIC, R.EPOCHS_SPEC, R.EPOCHS_RESAMPLED_PRETRAIN, R.EPOCHS_RESAMPLED_WINDOW_REPEATS,
            R.DOMAIN_ENTROPY, R.DOMAIN_ENTROPY_K,
            R.TEACHER_TEST_PPL, R.LORA_TRAINABLE_PARAMS, R.GENERIC_PPL, R.ROUTED_GENERIC_PPL,
            R.TEACHER_GENERIC_PPL, R.GENERIC_VALID_NLL,
            *(R.cost_metric(side, unit) for side in R.SIDES for unit in R.COST_UNITS),
            *(R.spent_tokens_metric(side) for side in R.SIDES),
            *(R.clustering_cost_metric("generic", unit) for unit in ("flops", "device_hours")),
            *(R.paper_cost_metric("generic", unit) for unit in ("flops", "device_hours")),
            *(R.total_flops_metric(n, paper) for n in R.AMORTISATION_N for paper in (False, True))]
    assert not [name for name in read if name not in m]
    assert m[R.ppl_metric(d)] == pytest.approx(math.exp(3.0)) and m[R.ppl_lo_metric(d)] == pytest.approx(math.exp(2.98))
    assert m[R.GENERIC_PPL] == 90.0 and m[R.cost_metric("spec", "flops")] == 3e10
    assert m[R.total_flops_metric(7)] == 2e12 + 7 * 3e10
    assert m[R.total_flops_metric(7, paper=True)] == pytest.approx(2e12 - 1e11 + 7 * 3e10)
    assert R.is_shares(m, "source") == {"doc-debian": 0.75, "manpages": 0.25}
    assert not [name for name in (R.STRATEGY, R.DOMAIN, R.PHASE, R.IN_DOMAIN_TOKENS, R.GENERIC_BUDGET,
                                  R.SPEC_BUDGET, R.SETTINGS, R.DEVICE, R.GENERIC_SPENT, R.SPEC_SPENT, R.GROUP)
                if name not in t]
    assert record.params[R.used_param("pretrain/slm", "precision")] == "bf16"
    # The model-level perplexity names are the driver's input only, never logged as such.
    assert not {"test_ppl", "test_ppl_lo", "test_ppl_hi"} & set(m)


def test_the_readers_get_back_what_the_driver_logged(logged):
    """Logged through MLflow, the record reaches each reader under the same names: the
    frontier's configuration, the study's CSV row, the serving catalog, the champion alias
    and the importance-sampling table all carry the record's values."""
    from mlflow.tracking import MlflowClient

    from slmfactory.analysis.measured import load_configs
    from slmfactory.analysis.report import table_is_provenance
    from slmfactory.serving.catalog import from_mlflow
    from slmfactory.sweeps.records import update_champions
    from study import results

    cfg, records, run_ids = logged
    uri = cfg.tracking_uri
    run = MlflowClient(uri).get_run(run_ids["legal"])
    legal = records["legal"]
    assert run.data.tags[TRIAL_TAG] == legal.key and run.data.tags[R.TRIAL_NAME] == legal.name
    assert {k: run.data.tags[k] for k in legal.tags} == legal.tags
    assert {k: run.data.metrics[k] for k in legal.metrics} == legal.metrics
    curve = MlflowClient(uri).get_metric_history(run.info.run_id, R.FINETUNE_VALID_NLL)
    assert [(p.step, p.value) for p in curve] == [(1, 4.0), (2, 3.0)]
    # Logged in full: logging the same trial again finds its run by ppl_macro and adds nothing.
    assert log_trial(cfg, "trial-record", legal.key, legal) == run_ids["legal"]

    (config,) = load_configs(uri, "trial-record")
    for d, r in records.items():
        m = r.metrics
        assert config.ppl[d] == m[R.ppl_metric(d)] and config.nll[d] == m[R.TEST_NLL]
        assert (config.ppl_lo[d], config.ppl_hi[d]) == (m[R.ppl_lo_metric(d)], m[R.ppl_hi_metric(d)])
        assert config.se[d] == m[R.TEST_NLL_SE] and config.ppl_before[d] == m[R.TEST_PPL_BEFORE]
        assert config.entropy[d] == m[R.DOMAIN_ENTROPY]
    assert config.entropy_k == 16 and config.generic_ppl == 90.0 and config.params == 123456
    assert config.costs["flops"] == (2e12, pytest.approx(4e10)) and config.embed_generic["flops"] == 1e11
    assert (config.spent_generic, config.epochs_generic, config.epochs_spec) == (4000.0, 0.5, 1.5)

    rows = {r["domain"]: r for r in results.export_rows(uri, "trial-record")}
    for column, metric in results.METRIC_COLUMNS:
        assert rows["legal"][column] == legal.metrics[metric], column
    assert (rows["legal"]["ppl"], rows["legal"]["generic_ppl"]) == (legal.ppl, 90.0)
    assert rows["legal"]["domain_entropy_k"] == 16.0

    best = from_mlflow(uri, "trial-record")
    assert best["code"].test_ppl == records["code"].ppl and best["code"].params == 123456
    champions = update_champions(uri, "trial-record")
    assert champions == {"trial-record-legal": {"champion": 1}, "trial-record-code": {"champion": 1}}
    assert "75% doc-debian, 25% manpages" in table_is_provenance(uri, "trial-record")


def test_the_names_are_the_ones_stored_runs_carry():
    """The committed study CSVs' columns and the MLflow names their runs carry: the tags are
    columns by name, and the CSV export reads each metric column from the same name the
    record writes. A renamed metric or tag fails here (and would orphan every stored run)."""
    from study import results

    csvs = committed_csvs()
    assert csvs, "no committed study CSV under docs/"
    for csv in csvs:
        header = csv.read_text().split("\n", 1)[0].split(",")
        # Every column is the run's identity, a tag or a metric of the table above (a CSV
        # exported before a metric existed lacks its column).
        assert set(STORED_TAGS) <= set(header), csv.name
        assert set(header) - set(STORED_TAGS) - set(STORED_METRICS) - set(PREFIX_COLUMNS) == set(IDENTITY_COLUMNS), \
            csv.name
    assert set(STORED_METRICS) | set(STORED_TAGS) | set(IDENTITY_COLUMNS) | set(PREFIX_COLUMNS) == set(results.COLUMNS)
    assert PREFIX_COLUMNS["is_shares"] == "is_share"
    assert (R.STRATEGY, R.DOMAIN, R.GENERIC_BUDGET, R.SPEC_BUDGET, R.IN_DOMAIN_TOKENS, R.SETTINGS) == STORED_TAGS
    assert results.TAG_COLUMNS == STORED_TAGS
    by_column = dict(results.METRIC_COLUMNS) | {"ppl": R.ppl_metric("legal"), "ppl_lo": R.ppl_lo_metric("legal"),
                                                "ppl_hi": R.ppl_hi_metric("legal"), "generic_ppl": R.GENERIC_PPL,
                                                "domain_entropy_k": R.DOMAIN_ENTROPY_K}
    assert {c: by_column[c] for c in STORED_METRICS} == STORED_METRICS


def test_the_resampling_shares_are_written_under_the_records_name():
    """``is_share/*`` is written on the data layer (the resampler, below the record): its
    prefix is the record's."""
    from slmfactory.data.clustering.resampling import SHARE_PREFIX

    assert SHARE_PREFIX == R.IS_SHARE
    assert R.is_share_metric("source", "x") == "is_share/source/x"


def test_every_name_the_record_owns_is_the_stored_one():
    """Each constant and each name builder of TrialRecord against its literal spelling (and
    a constant added to the record must be pinned here too)."""
    assert {k: v for k, v in vars(R).items() if k.isupper()} == RECORD_NAMES
    assert (TRIAL_TAG, PARENT_TAG) == ("slmfactory.trial", "mlflow.parentRunId")
    built = [
        (R.ppl_metric("legal"), "ppl/legal"), (R.ppl_lo_metric("legal"), "ppl_lo/legal"),
        (R.ppl_hi_metric("legal"), "ppl_hi/legal"),
        (R.cost_metric("generic", "flops"), "cost/generic_flops"),
        (R.cost_metric("spec", "device_hours"), "cost/spec_device_hours"),
        (R.cost_metric("spec", "wall_seconds"), "cost/spec_wall_seconds"),
        (R.paper_cost_metric("generic", "flops"), "cost/paper_generic_flops"),
        (R.paper_cost_metric("generic", "device_hours"), "cost/paper_generic_device_hours"),
        (R.clustering_cost_metric("generic", "flops"), "cost/clustering_generic_flops"),
        (R.clustering_cost_metric("domain", "device_hours"), "cost/clustering_domain_device_hours"),
        (R.total_flops_metric(7), "cost/total_flops_N7"),
        (R.total_flops_metric(50, paper=True), "cost/paper_total_flops_N50"),
        (R.spent_tokens_metric("generic"), "spent/generic_tokens"),
        (R.spent_tokens_metric("spec"), "spent/spec_tokens"),
        (R.generic_metric("generic_ppl"), "generic/generic_ppl"),
        (R.generic_metric("valid_history"), "generic/valid_history"),
        (R.is_share_metric("source", "doc-debian"), "is_share/source/doc-debian"),
        (R.serving_rate_metric("generate"), "serving/generate_tokens_per_s"),
        (R.serving_cost_metric("score"), "serving/score_device_hours_per_mtok"),
        (R.used_param("pretrain/slm", "precision"), "pretrain/slm.precision_used"),
        (R.used_param("specialize/slm/legal", "compile"), "specialize/slm/legal.compile_used"),
    ]
    assert [(name, literal) for name, literal in built if name != literal] == []
    assert R.is_used_param("pretrain/slm.precision_used") and R.is_used_param("x.compile_used")
    assert not R.is_used_param("pretrain/slm.precision")
    assert R.is_shares({"is_share/source/a": 0.5, "is_share/collection/b": 1.0}, "source") == {"a": 0.5}


def test_the_driver_records_every_name_as_stored_runs_carry_it(tmp_path):
    """The record the driver builds carries exactly these metric, tag and param names, spelled
    out: a rename in the record or in the driver's assembly fails here."""
    cfg = load_config(DEMO, {"workdir": str(tmp_path), "strategy.name": "slm-is"})
    record = record_for(cfg, "legal", 3.0, tmp_path)
    assert set(record.metrics) == RECORD_METRICS
    assert set(record.tags) == RECORD_TAGS
    assert {k for k in record.params if k.endswith("_used")} == RECORD_USED_PARAMS
    assert set(record.curves) == {"finetune/valid_nll"}
    assert record.tags["phase"] == "specialize"


@pytest.mark.parametrize("budget", [Budget("tokens", 750_000.0), Budget("tokens", 1_048_577.0),
                                    Budget("flops", 3.123456789e14), Budget("flops", 1e15)])
def test_a_runs_tags_hold_its_budgets_exactly_and_labels_only_display_them(tiny_cfg, budget):
    """The tags hold every token (``1048577``, which ``1.05e+06T`` does not), the FLOPs
    as their shortest repr, and the unit; ``Budget.from_tags`` gives back the same budget;
    the label and the run name's short form are display only."""
    from slmfactory.trial import Trial, run_name, trial_tags

    trial = Trial("slm", "legal", budget, Budget("tokens", 65_537.0), 20_000)
    tags = trial_tags(trial.config(tiny_cfg))
    assert tags[R.GENERIC_BUDGET] == (str(int(budget.value)) if budget.unit == "tokens" else repr(budget.value))
    assert tags[R.GENERIC_BUDGET_UNIT] == budget.unit and tags[R.SPEC_BUDGET] == "65537"
    assert Budget.from_tags(tags, "generic") == budget and Budget.from_tags(tags, "spec").value == 65_537
    assert run_name(tags).startswith(f"slm legal {budget.short()}/65.5k")
    nopt = trial_tags(Trial("slm-nopt", "legal", None, budget, 20_000).config(tiny_cfg))
    assert nopt[R.GENERIC_BUDGET] == nopt[R.GENERIC_BUDGET_UNIT] == "none"
    assert Budget.from_tags(nopt, "generic") is None
    # A run logged before the exact tags: its label, read once, where it is read.
    assert Budget.from_tags({R.SPEC_BUDGET: "1.5e+06T"}, "spec") == Budget("tokens", 1.5e6)
