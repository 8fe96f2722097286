"""A trial: what it is, what it is called, and its one MLflow run.

A trial is (strategy, domain, generic budget, specialisation budget, in-domain size,
settings): ``settings`` are the values of ``sweep.grid``'s extra keys (seeds, ``cluster.k``,
expert counts, any strategy setting). Its run config is the base recipe with those set;
everything else (stage keys, resume, costs) follows from the config, so a trial is
reproducible on its own with ``slmfactory train`` and the overrides it prints.

The driver (:mod:`slmfactory.pipeline`) runs a trial and logs it here; sweeps plan many;
serving and reports find them again by the ``slmfactory.trial`` tag and the experiment
name. This module stands on the platform layer only.

MLflow: each trial's run is found again by its ``slmfactory.trial`` tag (the trial key), so
logging the same trial twice (a resumed sweep, a rerun) updates its one run instead of
opening another; in a sweep it is a child of the sweep's run (MLflow's
``mlflow.parentRunId`` tag: the UI folds the trials under the sweep). Tags carry what the
MLflow UI filters and groups by (strategy, domain, phase, in-domain size, generic budget);
metrics carry perplexity and every cost figure. A trial's run starts and ends when the
trial's own work did (the record's ``started_ms``/``ended_ms``), not when the driver logged
it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmfactory.platform.config import RunConfig
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.registry import strategies
from slmfactory.platform.stages import digest
from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment, register_model

TRIAL_TAG = "slmfactory.trial"
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class Budget:
    """A phase budget in tokens or in FLOPs (FLOPs compare strategies at equal cost)."""

    unit: str  # "tokens" | "flops"
    value: float

    def label(self) -> str:
        return f"{self.value:.3g}{'F' if self.unit == 'flops' else 'T'}"

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


def log_trial(cfg, experiment: str, trial_key: str, record: dict[str, Any], parent_run_id: str | None = None) -> str:
    """Log (or complete) the one run of ``trial_key``, nested under the sweep's run
    ``parent_run_id`` when given; returns its run id."""
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
        register_model(tracker, f"{experiment}-{record['tags']['domain']}", "model")
    tracker.log_dict(record, "trial.json")
    tracker.close(end_time=record.get("ended_ms"))
    return tracker.run_id
