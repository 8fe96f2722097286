"""A trial: what it is, what it is called, and its one MLflow run.

A trial is (strategy, domain, generic budget, specialisation budget, in-domain size,
settings): ``settings`` are the values of ``sweep.grid``'s extra keys (seeds, ``cluster.k``,
expert counts, any strategy setting). Its run config is the base recipe with those set;
everything else (stage keys, resume, costs) follows from the config, so a trial is
reproducible on its own with ``slmfactory train`` and the overrides it prints.

The driver (:mod:`slmfactory.pipeline`) runs a trial and logs it here; sweeps plan many;
serving and reports find them again by the ``slmfactory.trial`` tag and the experiment
name. This module stands on the platform layer only.

MLflow: each trial's run is found again by its ``slmfactory.trial`` tag (the trial key)
before one is created (``platform.tracking.find_or_create_run``), so a retried trial, a
resumed sweep, a rerun, or a create retried after a lost reply all land on its one run; in a
sweep it is a child of the sweep's run (MLflow's ``mlflow.parentRunId`` tag: the UI folds
the trials under the sweep). Tags carry what the MLflow UI filters and groups by (strategy,
domain, phase, in-domain size, generic budget); metrics carry perplexity and every cost
figure.

A run is live (:func:`open_trial_run`): opened RUNNING when the trial starts, with its tags
and params, its phases' curves streamed while they train; :func:`log_trial` completes it
(metrics, model, FINISHED), :func:`fail_trial_run` marks a failed attempt FAILED (a retried
attempt reopens it RUNNING). Its start is the trial's first start, its end the trial's end
(the record's ``started_ms``/``ended_ms``).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slmfactory.platform.config import RunConfig
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.registry import strategies
from slmfactory.platform.stages import digest
from slmfactory.platform.tracking import (
    MAX_BATCH_METRICS, LiveRunTracker, MlflowTracker, TrackingUnavailable, best_effort_calls, client_for,
    corpus_datasets, ensure_experiment, find_or_create_run, log_datasets, log_hf_model, register_model, runs_tagged,
    watch_system)

TRIAL_TAG = "slmfactory.trial"
ERROR_TAG = "slmfactory.error"
"""On a trial's FAILED run: the last line of the error that ended its last attempt."""
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class Budget:
    """A phase budget in tokens or in FLOPs (FLOPs compare strategies at equal cost).

    A run's tags hold it exactly (``exact()``: every token, a float's shortest repr) with its
    unit (``TrialRecord.GENERIC_BUDGET``/``_UNIT``, ``SPEC_BUDGET``/``_UNIT``);
    ``label()`` and ``short()`` are for display only: names, groups, tables. Read a run's
    budget back with :meth:`from_tags`, never from a label."""

    unit: str  # "tokens" | "flops"
    value: float

    def label(self) -> str:
        """``7.5e+05T``, ``1e+15F``: trial names and report tables (display only)."""
        return f"{self.value:.3g}{'F' if self.unit == 'flops' else 'T'}"

    def short(self) -> str:
        """``750k``, ``1e+03TF``: run names the MLflow UI shows whole (display only)."""
        flops = "F" if self.unit == "flops" else ""
        for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if self.value >= div:
                return f"{self.value / div:.3g}{suffix}{flops}"
        return f"{self.value:.3g}{flops}"

    def exact(self) -> str:
        """The budget as its tag holds it: ``750000`` tokens, ``1e+15`` FLOPs (``repr``)."""
        return str(int(self.value)) if self.unit == "tokens" else repr(float(self.value))

    @staticmethod
    def from_tags(tags: dict[str, str], side: str) -> "Budget | None":
        """The ``side`` (``generic`` or ``spec``) budget of a trial run's tags; None for a
        strategy without a generic phase. Runs logged before the exact tags existed hold
        only the label (``7.5e+05T``): read as the 3 digits it kept, the one place a label is
        parsed."""
        value = tags.get(getattr(TrialRecord, f"{side.upper()}_BUDGET"), "")
        unit = tags.get(getattr(TrialRecord, f"{side.upper()}_BUDGET_UNIT"))
        if not value or value == "none" or unit == "none":
            return None
        if unit is None:  # a label, from a run logged before the exact tags
            unit, value = ("flops" if value.endswith("F") else "tokens"), value.rstrip("TF")
        return Budget(unit, float(value))

    def overrides(self, section: str) -> dict:
        if self.unit == "tokens":
            return {f"{section}.max_tokens": int(self.value), f"{section}.max_flops": 0.0}
        # The FLOP budget decides; max_tokens (the recipe's) stays as an upper bound.
        return {f"{section}.max_flops": float(self.value)}


@dataclass(frozen=True)
class Trial:
    strategy: str
    domain: str
    generic: Budget | None
    """None: the strategy has no generic phase (the generic axis does not apply)."""
    spec: Budget
    in_domain: int
    settings: tuple[tuple[str, Any], ...] = ()
    """``sweep.grid``'s extra keys and their values in this trial, sorted by key."""

    @property
    def key(self) -> str:
        """Stable across runs and resumes: the MLflow run of a trial is found by it. Every
        setting that differs between trials is in it (two seeds are two trials)."""
        return digest("trial-v2", self.strategy, self.domain, self.generic, self.spec, self.in_domain,
                      [list(kv) for kv in self.settings])

    @property
    def generic_label(self) -> str:
        return self.generic.label() if self.generic is not None else "none"

    @property
    def settings_label(self) -> str:
        """``key=value`` pairs joined by ``,`` (the ``settings`` tag; empty without a grid)."""
        return ",".join(f"{k}={v}" for k, v in self.settings)

    @property
    def name(self) -> str:
        extra = "".join(f"-{k.rsplit('.', 1)[-1]}{v}" for k, v in self.settings)
        return (f"{self.strategy}-{self.domain}-g{self.generic_label}-s{self.spec.label()}"
                f"-n{self.in_domain}{extra}")

    def overrides(self) -> dict:
        return {"strategy.name": self.strategy, "data.domain": self.domain,
                "data.domain_train_tokens": self.in_domain, **dict(self.settings),
                **(self.generic.overrides("pretrain") if self.generic is not None else {}),
                **self.spec.overrides("finetune")}

    def config(self, base: RunConfig) -> RunConfig:
        return base.replace(**self.overrides())


def sweep_name(cfg: RunConfig) -> str:
    return cfg.sweep.name or cfg.name


def experiment_name(cfg: RunConfig) -> str:
    """The sweep's MLflow experiment (what ``report``, ``recommend`` and ``serve`` read)."""
    return f"{cfg.tracking.experiment}-{sweep_name(cfg)}"


def budget_of(tcfg) -> Budget:
    """The budget a TrainConfig spends: its FLOP cap if set, else its token budget."""
    return Budget("flops", float(tcfg.max_flops)) if tcfg.max_flops else Budget("tokens", float(tcfg.max_tokens))


def config_value(cfg: RunConfig, dotted: str) -> Any:
    """The value of a dotted config key (``finetune.seed``, ``strategy.slm-mix.experts``)."""
    node: Any = cfg.to_tree()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"sweep.grid.{dotted}: unknown config key")
        node = node[part]
    return node


def trial_of(cfg: RunConfig) -> Trial:
    """The trial a run config is (``slmfactory train`` logs under the same key a sweep
    would): its axes, and the values of ``sweep.grid``'s keys. A strategy without a generic
    phase (no ``generic_family``) takes no generic axis."""
    has_generic = strategies()[cfg.strategy.name].generic_family is not None
    settings = tuple((k, config_value(cfg, k)) for k in sorted(cfg.sweep.grid))
    return Trial(cfg.strategy.name, cfg.data.domain, budget_of(cfg.pretrain) if has_generic else None,
                 budget_of(cfg.finetune), cfg.data.domain_train_tokens, settings)


@dataclass
class TrialRecord:
    """One finished trial as its MLflow run holds it: tags, params, metrics, curves, the
    exported model's folder and the trial's own start and end.

    The record owns every name a trial's run carries: writers (the phase library, the
    strategies, the driver) build metrics and tags under the names below, and readers (the
    frontier, the sweep's registry aliases, the catalog, the study's CSV) look them up by the
    same names, so renaming one is one edit here. It crosses from a Tune worker to the
    driver as JSON (``to_dict``/``from_dict``) and is logged whole as the run's ``trial.json``.

    Metrics a strategy adds beyond these (an expert's validation NLL, a resampling distance)
    are logged under the name the strategy gives them."""

    name: str
    key: str
    tags: dict[str, str]
    params: dict[str, Any]
    metrics: dict[str, float]
    model_path: str
    """The exported model's folder (none there: the run logs no model)."""
    curves: dict[str, list] = field(default_factory=dict)
    """Metric name -> [(step, value)]."""
    started_ms: int | None = None
    ended_ms: int | None = None

    # -- tags: what the MLflow UI filters and groups by -----------------------------------
    STRATEGY: ClassVar[str] = "strategy"
    DOMAIN: ClassVar[str] = "domain"
    PHASE: ClassVar[str] = "phase"
    IN_DOMAIN_TOKENS: ClassVar[str] = "in_domain_tokens"
    GENERIC_BUDGET: ClassVar[str] = "generic_budget"
    """The nominal generic budget, exact (``Budget.exact``: ``750000``; ``none`` without a
    generic phase); its unit in ``GENERIC_BUDGET_UNIT``. Read it with ``Budget.from_tags``."""
    GENERIC_BUDGET_UNIT: ClassVar[str] = "generic_budget_unit"
    """``tokens``, ``flops`` or ``none`` (no generic phase)."""
    SPEC_BUDGET: ClassVar[str] = "spec_budget"
    SPEC_BUDGET_UNIT: ClassVar[str] = "spec_budget_unit"
    SETTINGS: ClassVar[str] = "settings"
    """``Trial.settings_label``: ``sweep.grid``'s keys and values in this trial."""
    DEVICE: ClassVar[str] = "device"
    GENERIC_SPENT: ClassVar[str] = "generic_spent"
    SPEC_SPENT: ClassVar[str] = "spec_spent"
    GROUP: ClassVar[str] = "group"
    TRIAL_NAME: ClassVar[str] = "slmfactory.trial_name"

    # -- metrics ------------------------------------------------------------------------
    TEST_NLL: ClassVar[str] = "test_nll"
    """Mean NLL per token on the domain's test sample (its exp is ``ppl/<domain>``)."""
    TEST_NLL_SE: ClassVar[str] = "test_nll_se"
    TEST_SEQUENCES: ClassVar[str] = "test_sequences"
    TEST_PPL_BEFORE: ClassVar[str] = "test_ppl_before"
    """Test perplexity of the model the fine-tune started from."""
    PPL_MACRO: ClassVar[str] = "ppl_macro"
    PARAMS: ClassVar[str] = "params"
    INFERENCE_FLOPS_PER_TOKEN: ClassVar[str] = "cost/inference_flops_per_token"
    VALID_NLL: ClassVar[str] = "valid_nll"
    FINETUNE_STEPS: ClassVar[str] = "finetune_steps"
    FINETUNE_BEST_STEP: ClassVar[str] = "finetune/best_step"
    """The fine-tune's step whose weights were kept: 0 when none beat the starting weights."""
    TEST_SEQ_NLL_FILE: ClassVar[str] = "test_seq_nll.npy"
    """In the exported model folder (artifact ``model/test_seq_nll.npy``): the summed NLL of
    each test-sample sequence, (n_sequences,) float64, in sample order; paired tests read it."""
    EPOCHS_GENERIC: ClassVar[str] = "epochs/generic"
    EPOCHS_SPEC: ClassVar[str] = "epochs/spec"
    EPOCHS_RESAMPLED_PRETRAIN: ClassVar[str] = "epochs/resampled_pretrain"
    EPOCHS_RESAMPLED_WINDOW_REPEATS: ClassVar[str] = "epochs/resampled_window_repeats"
    DOMAIN_ENTROPY: ClassVar[str] = "domain_entropy"
    DOMAIN_ENTROPY_K: ClassVar[str] = "domain_entropy_k"
    """How many clusters ``domain_entropy`` is over."""
    TEACHER_TEST_PPL: ClassVar[str] = "teacher_test_ppl"
    LORA_TRAINABLE_PARAMS: ClassVar[str] = "lora_trainable_params"
    EXPERT: ClassVar[str] = "expert"
    """The expert a mixture strategy specialised."""
    GENERIC_PREFIX: ClassVar[str] = "generic/"
    GENERIC_PPL: ClassVar[str] = "generic/generic_ppl"
    """The generic phase's validation perplexity (routed for the expert strategies)."""
    ROUTED_GENERIC_PPL: ClassVar[str] = "generic/routed_generic_ppl"
    TEACHER_GENERIC_PPL: ClassVar[str] = "generic/teacher_generic_ppl"
    GENERIC_VALID_NLL: ClassVar[str] = "generic/generic_valid_nll"
    IS_SHARE: ClassVar[str] = "is_share"
    """``is_share/<kind>/<name>``: shares of importance sampling's resampled tokens."""
    IS_SHARE_KINDS: ClassVar[tuple[str, ...]] = ("source", "collection")
    SERVING_MACHINE: ClassVar[str] = "serving_machine"
    """Tag: the machine the exported model's serving rates were measured on
    (``platform.machine.describe`` and the torch threads)."""

    # -- curves: metrics logged by step ------------------------------------------------
    FINETUNE_VALID_NLL: ClassVar[str] = "finetune/valid_nll"
    FINETUNE_TRAIN_LOSS: ClassVar[str] = "finetune/train_loss"
    """The generic phase's curves are ``generic/valid_history`` and ``generic/train_history``
    (``generic_metric`` of its history's name)."""

    SIDES: ClassVar[tuple[str, ...]] = ("generic", "spec")
    COST_UNITS: ClassVar[tuple[str, ...]] = ("flops", "device_hours", "wall_seconds")
    AMORTISATION_N: ClassVar[tuple[int, ...]] = (1, 7, 50)
    """The numbers of domains ``cost/total_flops_N<n>`` amortise the generic phase over."""
    USED: ClassVar[tuple[str, ...]] = ("precision", "compile")
    """``<phase>.<what>_used`` params: what each training phase ran in."""

    # -- names built from a domain, a side or a unit ---------------------------------------
    @staticmethod
    def ppl_metric(domain: str) -> str:
        """The test perplexity on ``domain`` (exp of ``test_nll``)."""
        return f"ppl/{domain}"

    @staticmethod
    def ppl_lo_metric(domain: str) -> str:
        """The lower end of the test perplexity's bootstrap interval."""
        return f"ppl_lo/{domain}"

    @staticmethod
    def ppl_hi_metric(domain: str) -> str:
        return f"ppl_hi/{domain}"

    @staticmethod
    def cost_metric(side: str, unit: str) -> str:
        """``cost/generic_flops``, ``cost/spec_device_hours``, ...: the measured cost of a side
        (``SIDES``) in a unit (``COST_UNITS``)."""
        return f"cost/{side}_{unit}"

    @staticmethod
    def paper_cost_metric(side: str, unit: str) -> str:
        """The cost under the paper's convention (the generic corpus's embedding is nobody's)."""
        return f"cost/paper_{side}_{unit}"

    @staticmethod
    def clustering_cost_metric(side: str, unit: str) -> str:
        """What embedding ``side``'s text for clustering cost (``generic`` or ``domain``)."""
        return f"cost/clustering_{side}_{unit}"

    @staticmethod
    def total_flops_metric(n: int, paper: bool = False) -> str:
        """Generic FLOPs plus ``n`` domains' specialisation FLOPs."""
        return f"cost/{'paper_' if paper else ''}total_flops_N{n}"

    @staticmethod
    def serving_rate_metric(task: str) -> str:
        """``serving/generate_tokens_per_s``: the exported model's measured rate for a task
        (``platform.cost.SERVING_TASKS``) on the machine tagged ``serving_machine``."""
        return f"serving/{task}_tokens_per_s"

    @staticmethod
    def serving_cost_metric(task: str) -> str:
        """``serving/generate_device_hours_per_mtok``: device-hours per million tokens at that
        rate (its price: times ``serving.price_per_device_hour``, applied when read)."""
        return f"serving/{task}_device_hours_per_mtok"

    @staticmethod
    def spent_tokens_metric(side: str) -> str:
        """The tokens a side actually trained on (its budget's label is the nominal one)."""
        return f"spent/{side}_tokens"

    @classmethod
    def generic_metric(cls, info_key: str) -> str:
        """A generic phase's figure (``generic_ppl``, ...) as the trial logs it."""
        return f"{cls.GENERIC_PREFIX}{info_key}"

    @classmethod
    def is_share_metric(cls, kind: str, label: str) -> str:
        return f"{cls.IS_SHARE}/{kind}/{label}"

    @classmethod
    def is_shares(cls, metrics: dict[str, float], kind: str) -> dict[str, float]:
        """{label: share} of one ``IS_SHARE_KINDS`` kind, read back from a run's metrics."""
        prefix = cls.is_share_metric(kind, "")
        return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}

    @staticmethod
    def used_param(phase: str, what: str) -> str:
        """``pretrain/slm.precision_used``: what a phase ran in (``what`` in ``USED``)."""
        return f"{phase}.{what}_used"

    @classmethod
    def is_used_param(cls, name: str) -> bool:
        return name.endswith(tuple(f".{what}_used" for what in cls.USED))

    # -- the record itself ---------------------------------------------------------------
    @property
    def domain(self) -> str:
        return self.tags[self.DOMAIN]

    @property
    def ppl(self) -> float:
        """The test perplexity on the trial's domain."""
        return self.metrics[self.ppl_metric(self.domain)]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able dict (a Tune worker's report, the run's ``trial.json``); the trial's
        times only once known."""
        out = {"name": self.name, "key": self.key, "tags": self.tags, "params": self.params,
               "metrics": self.metrics, "curves": self.curves, "model_path": self.model_path}
        out |= {k: v for k, v in (("started_ms", self.started_ms), ("ended_ms", self.ended_ms)) if v is not None}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialRecord":
        return cls(name=d["name"], key=d["key"], tags=dict(d["tags"]), params=dict(d["params"]),
                   metrics=dict(d["metrics"]), model_path=d["model_path"], curves=dict(d.get("curves", {})),
                   started_ms=d.get("started_ms"), ended_ms=d.get("ended_ms"))


def find_trial_run(client, experiment_id: str, trial_key: str):
    """The trial's run (the oldest, as :func:`find_or_create_run` keeps), or None."""
    runs = runs_tagged(client, experiment_id, TRIAL_TAG, trial_key)
    return runs[0] if runs else None


def trial_tags(cfg: RunConfig) -> dict[str, str]:
    """The tags of ``cfg``'s trial known before it runs: all of the record's but the budgets
    it spent (``TrialRecord.GENERIC_SPENT``/``SPEC_SPENT``, set when it ends)."""
    R, trial = TrialRecord, trial_of(cfg)
    return {R.STRATEGY: cfg.strategy.name, R.DOMAIN: cfg.data.domain, R.PHASE: "specialize",
            R.IN_DOMAIN_TOKENS: str(cfg.data.domain_train_tokens),
            R.GENERIC_BUDGET: trial.generic.exact() if trial.generic is not None else "none",
            R.GENERIC_BUDGET_UNIT: trial.generic.unit if trial.generic is not None else "none",
            R.SPEC_BUDGET: trial.spec.exact(), R.SPEC_BUDGET_UNIT: trial.spec.unit,
            R.SETTINGS: trial.settings_label, R.DEVICE: cfg.device.name,
            R.GROUP: f"{cfg.strategy.name} g{trial.generic_label} s{trial.spec.label()} n{cfg.data.domain_train_tokens}"
                     + (f" {trial.settings_label}" if trial.settings else "")}


def open_trial_run(cfg: RunConfig, experiment: str, parent_run_id: str | None = None) -> LiveRunTracker:
    """The trial's one run, live, when the trial (or a retried attempt of it) starts: found by
    its key or created, nested under ``parent_run_id``, RUNNING, its tags and params logged.
    The returned tracker is the trainer's (curves streamed as they are logged); its
    ``start_time`` is the run's start (the trial's first). A run already logged in full (a
    trial a resumed sweep reruns) is left FINISHED: :func:`log_trial` then changes nothing."""
    trial = trial_of(cfg)
    client = client_for(cfg.tracking_uri)
    nested = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    tags = {TRIAL_TAG: trial.key, TrialRecord.TRIAL_NAME: trial.name, **nested, **trial_tags(cfg)}
    run = find_or_create_run(client, ensure_experiment(client, cfg.tracking_uri, experiment), TRIAL_TAG, trial.key,
                             run_name(tags), tags)
    tracker = LiveRunTracker(cfg.tracking_uri, run.info.run_id)
    tracker.start_time = run.info.start_time
    if run.info.status == "FINISHED" and TrialRecord.PPL_MACRO in run.data.metrics:
        return tracker
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")  # a retried or resumed trial's run
    tracker.set_tags(tags)
    tracker.log_params(cfg.to_dict())
    return tracker


@contextmanager
def live_trial_run(cfg: RunConfig, experiment: str, parent_run_id: str | None = None):
    """The trial's live run around its work: :func:`open_trial_run` (None when tracking is
    off), MLflow's system metrics on it while the work runs (``watch_system``), its curve
    points sent when the work ends, and FAILED when the work raises (:func:`fail_live_run`).
    All of it is best effort (``best_effort_calls``: a short retry bound, in every thread of
    this process): with the tracking server away the work runs on and ends on time, and the
    caller logs the finished trial under the full bound (``log_trial``)."""
    with best_effort_calls():
        live = None
        if cfg.tracking.enabled:
            try:
                live = open_trial_run(cfg, experiment, parent_run_id)
            except Exception as e:  # noqa: BLE001  (tracking away: train anyway; the driver logs the trial)
                print(f"[tracking] no live run for this attempt: {type(e).__name__}: {e}", file=sys.stderr)
        monitor = watch_system(live.run_id, cfg.tracking_uri) if live is not None else None
        try:
            yield live
            if live is not None:
                live.flush()
        except BaseException as e:
            fail_live_run(live, cfg, experiment, e)
            raise
        finally:
            if monitor is not None:
                monitor.finish()


def fail_live_run(live: LiveRunTracker | None, cfg: RunConfig, experiment: str, error: BaseException) -> None:
    """The attempt whose live run is ``live`` raised ``error``: its curve points sent, its run
    FAILED. Best effort: the trial's error is what the caller raises next, so a tracking
    failure here is one line on stderr, not a second traceback over the first (nothing is
    tried against a tracking server already found unreachable; a sweep marks the runs its
    trials left RUNNING when it ends)."""
    if live is None or isinstance(error, TrackingUnavailable):
        return
    try:
        live.flush()
        fail_trial_run(cfg, experiment, trial_of(cfg).key, f"{type(error).__name__}: {error}")
    except Exception as e:  # noqa: BLE001 - see above
        print(f"[tracking] could not mark run {live.run_id} FAILED: {type(e).__name__}: {e}", file=sys.stderr)


def fail_trial_run(cfg: RunConfig, experiment: str, trial_key: str, why: str = "") -> str | None:
    """Mark the trial's run FAILED if it is RUNNING (its attempt failed or was killed; a
    retried attempt reopens it), with the error's last line as tag ``slmfactory.error``.
    Returns its run id, or None when it has no running run."""
    client = client_for(cfg.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run = find_trial_run(client, exp.experiment_id, trial_key) if exp is not None else None
    if run is None or run.info.status != "RUNNING":
        return None
    if why:
        client.set_tag(run.info.run_id, ERROR_TAG, why[:5000])
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def run_name(tags: dict[str, str]) -> str:
    """``slm-is legal 200k/32.8k``: strategy, domain, generic/specialisation budget of a
    trial's tags (the full trial name stays in the ``slmfactory.trial_name`` tag)."""
    t, R = tags, TrialRecord
    generic, spec = Budget.from_tags(t, "generic"), Budget.from_tags(t, "spec")
    return (f"{t[R.STRATEGY]} {t[R.DOMAIN]} {generic.short() if generic else '-'}/{spec.short() if spec else '-'}"
            + (f" {t[R.SETTINGS]}" if t.get(R.SETTINGS) else ""))


MODEL_ARTIFACT = "model"
"""The run's artifact holding the exported folder, an MLflow model (``runs:/<run>/model``):
its files under ``model/`` as before (``model/test_seq_nll.npy``, ``from_mlflow``)."""


def trial_datasets(record: TrialRecord) -> list[tuple[str, str]]:
    """``(corpus part, context)`` of each split a trial read: its domain's train, valid and
    test splits (``training``, ``validation``, ``test``), and the generic corpus's train and
    valid splits when it trained on generic text (a generic phase spent tokens, or slm-is
    pretrained on generic text resampled)."""
    R, d = TrialRecord, record.domain
    generic = (record.metrics.get(R.spent_tokens_metric("generic"), 0.0) > 0
               or R.EPOCHS_RESAMPLED_PRETRAIN in record.metrics)
    return ([("generic/train", "training"), ("generic/valid", "validation")] if generic else []) + \
        [(f"domains/{d}/train", "training"), (f"domains/{d}/valid", "validation"), (f"domains/{d}/test", "test")]


def log_trial(cfg, experiment: str, trial_key: str, record: TrialRecord, parent_run_id: str | None = None) -> str:
    """Log (or complete) the one run of ``trial_key``, nested under the sweep's run
    ``parent_run_id`` when given; returns its run id.

    The run's inputs are the corpus splits the trial read (:func:`trial_datasets`: name,
    the manifest's digest, the source packages, a ``training``/``validation``/``test``
    context); its ``model`` artifact is the exported model folder as an MLflow model
    (``log_hf_model``: a pyfunc that completes prompts, one copy of the weights), registered
    as a version of ``<experiment>-<domain>``."""
    client = client_for(cfg.tracking_uri)
    nested = {PARENT_TAG: parent_run_id} if parent_run_id else {}
    tags = {TRIAL_TAG: trial_key, TrialRecord.TRIAL_NAME: record.name, **nested, **record.tags}
    run = find_or_create_run(client, ensure_experiment(client, cfg.tracking_uri, experiment), TRIAL_TAG, trial_key,
                             run_name(record.tags), tags, start_time=record.started_ms)
    if run.info.status == "FINISHED" and TrialRecord.PPL_MACRO in run.data.metrics:
        return run.info.run_id  # logged in full already
    tracker = MlflowTracker(cfg.tracking_uri, experiment, run_name(record.tags), run_id=run.info.run_id)
    tracker.set_tags(tags)
    tracker.log_params(record.params)
    # Final metrics stamped at the trial's end: the UI's time axes are the trial's own.
    tracker.log_metrics(record.metrics, timestamp=record.ended_ms)
    log_curves(tracker.client, run, record.curves)
    datasets = corpus_datasets(cfg.corpus_dir, [part for part, _ in trial_datasets(record)])
    log_datasets(tracker, [(datasets[part], context) for part, context in trial_datasets(record) if part in datasets])
    model = Path(record.model_path)
    if record.model_path and model.is_dir():
        log_hf_model(tracker, model, MODEL_ARTIFACT)  # the exported folder as an MLflow model, one copy
        register_model(tracker, f"{experiment}-{record.domain}", MODEL_ARTIFACT)
    tracker.log_dict(record.to_dict(), "trial.json")
    tracker.close(end_time=record.ended_ms)
    return tracker.run_id


def log_curves(client, run, curves: dict[str, list]) -> None:
    """The record's curves (metric -> [(step, value)]) into ``run``, in batches, each point
    whose step the run's history of that metric lacks (a rerun, or a curve the trainer
    already streamed under this name, adds nothing twice)."""
    from mlflow.entities import Metric

    now, points = int(time.time() * 1000), []
    for name, curve in curves.items():
        logged = ({m.step for m in client.get_metric_history(run.info.run_id, name)}
                  if name in run.data.metrics else set())
        points += [Metric(name, float(value), now, int(step)) for step, value in curve if int(step) not in logged]
    for i in range(0, len(points), MAX_BATCH_METRICS):
        client.log_batch(run.info.run_id, metrics=points[i:i + MAX_BATCH_METRICS])
