"""The one trial driver (``run_trial``) behind ``slmfactory train``, every sweep trial and
so ``make demo``.

Only the driver talks to MLflow; training phases run through a launcher (in-process or
Ray Train) and come back as results and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

from slmfactory.data.corpus import list_domains, manifest_path
from slmfactory.data.corpus_build import build_corpus, corpus_is_current
from slmfactory.data.tokenizer import ensure_tokenizer
from slmfactory.models.distributed import make_launcher
from slmfactory.models.phases import trained_tokens
from slmfactory.models.strategies import get_strategy
from slmfactory.models.strategies.base import StrategyContext
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import PAPER, generic_under
from slmfactory.platform.errors import DataError
from slmfactory.platform.runtime import ray_session
from slmfactory.trial import log_trial, trial_of


def ensure_corpus(cfg: RunConfig, build: bool, log: Callable[[str], None] = print) -> None:
    # A build from the pinned packages with other settings is rebuilt where building is allowed.
    if manifest_path(cfg.corpus_dir).is_file() and (not build or corpus_is_current(cfg)):
        return
    if not build:
        raise DataError(f"{cfg.corpus_dir}: no corpus here; run `slmfactory corpus build --config ...` "
                        f"or `slmfactory corpus import ...` first")
    log(f"building the offline corpus into {cfg.corpus_dir} (first run downloads packages)")
    build_corpus(cfg)


def check_domain(cfg: RunConfig, domain: str) -> None:
    domains = list_domains(cfg.corpus_dir)
    if domain not in domains:
        raise DataError(f"data.domain: {domain!r} is not in the corpus at {cfg.corpus_dir} "
                        f"(domains: {', '.join(domains)})")


def run_trial(cfg: RunConfig, log: Callable[[str], None] | None = print, launcher=None) -> dict:
    """The one driver of a trial, behind ``train``, ``demo`` and every sweep trial: prepare
    the stages the strategy needs, pretrain (or reuse) its generic phase, specialise it on
    ``data.domain``, evaluate; returns the trial's record (what MLflow logs). Every step
    is a stage, so a rerun trains nothing that already finished."""
    ensure_corpus(cfg, build=False)
    domain = cfg.data.domain
    check_domain(cfg, domain)
    ensure_tokenizer(cfg)
    strategy = get_strategy(cfg.strategy.name)
    ctx = StrategyContext(cfg, launcher or make_launcher(cfg, log=log), log=log)
    # Clustering and resampling (cached stages) run on Ray Data inside the strategy.
    with ray_session() if "clusters" in strategy.requires else contextlib.nullcontext():
        generic = strategy.pretrain(ctx)
        model = strategy.specialize(ctx, generic, domain)
    return trial_record(cfg, model, generic)


def trial_record(cfg: RunConfig, model, generic) -> dict:
    """Tags, params, metrics (perplexity with its bootstrap interval, every cost figure,
    the budgets actually spent and the epochs over each phase's data) and curves of one
    trial. Labels carry the nominal budgets; ``spent/*`` what the trial trained."""
    trial = trial_of(cfg)
    d = model.domain
    nll = model.metrics["test_nll"]
    metrics = {f"ppl/{d}": model.metrics["test_ppl"], "test_nll": nll,
               # One domain here: exp(mean NLL) over domains is this trial's ppl; the report
               # takes the macro average over a configuration's trials.
               "ppl_macro": math.exp(nll), "params": model.params,
               "cost/inference_flops_per_token": model.inference_flops_per_token}
    if "test_ppl_lo" in model.metrics:
        metrics |= {f"ppl_lo/{d}": model.metrics["test_ppl_lo"], f"ppl_hi/{d}": model.metrics["test_ppl_hi"]}
    for side, cost in (("generic", model.generic_cost), ("spec", model.spec_cost)):
        metrics[f"cost/{side}_flops"] = cost.flops if cost is not None else 0.0
        metrics[f"cost/{side}_device_hours"] = cost.device_hours if cost is not None else 0.0
        metrics[f"cost/{side}_wall_seconds"] = cost.wall_seconds if cost is not None else 0.0
        metrics[f"spent/{side}_tokens"] = float(trained_tokens(cost))
    for n in (1, 7, 50):
        metrics[f"cost/total_flops_N{n}"] = metrics["cost/generic_flops"] + n * metrics["cost/spec_flops"]
    # cost/* are measured; cost/paper_* the paper's convention (the generic corpus's embedding is nobody's).
    for unit in ("flops", "device_hours"):
        embed = model.metrics.get(f"cost/clustering_generic_{unit}", 0.0)
        metrics[f"cost/paper_generic_{unit}"] = generic_under(PAPER, metrics[f"cost/generic_{unit}"], embed)
    for n in (1, 7, 50):
        metrics[f"cost/paper_total_flops_N{n}"] = metrics["cost/paper_generic_flops"] + n * metrics["cost/spec_flops"]
    metrics.update({k: float(v) for k, v in model.metrics.items() if isinstance(v, (int, float))
                    and k not in ("test_ppl", "test_ppl_lo", "test_ppl_hi")})
    for k, v in (generic.info.items() if generic is not None else []):
        if k.startswith(("routed_generic", "generic_valid", "generic_ppl", "teacher_generic_ppl")) \
                and isinstance(v, (int, float)):
            metrics[f"generic/{k}"] = float(v)
    tags = {"strategy": model.strategy, "domain": d, "phase": "specialize",
            "in_domain_tokens": str(cfg.data.domain_train_tokens), "generic_budget": trial.generic_label,
            "spec_budget": trial.spec.label(), "settings": trial.settings_label, "device": cfg.device.name,
            "generic_spent": f"{metrics['spent/generic_tokens']:.3g}T", "spec_spent": f"{metrics['spent/spec_tokens']:.3g}T",
            "group": f"{model.strategy} g{trial.generic_label} s{trial.spec.label()} n{cfg.data.domain_train_tokens}"
                     + (f" {trial.settings_label}" if trial.settings else "")}
    # What each training phase ran in (its precision and compile resolved: trainer.plan_execution).
    used = {k: v for cost in (model.generic_cost, model.spec_cost) if cost is not None
            for k, v in cost.extra.items() if k.endswith((".precision_used", ".compile_used"))}
    return {"name": trial.name, "key": trial.key, "tags": tags, "params": {**cfg.to_dict(), **used}, "metrics": metrics,
            "curves": model.curves, "model_path": str(model.path)}


def run_strategy(cfg: RunConfig, address: str | None = None, log: Callable[[str], None] = print) -> dict:
    """``slmfactory train``: one trial, logged to MLflow as one run, and printed."""
    # Bad input fails here, in a second, before a Ray session starts.
    ensure_corpus(cfg, build=False)
    check_domain(cfg, cfg.data.domain)
    with ray_session(address):
        record = run_trial(cfg, log=log)
    if cfg.tracking.enabled:
        log_trial(cfg, cfg.tracking.experiment, record["key"], record)
    m = record["metrics"]
    d = cfg.data.domain
    log(f"{cfg.strategy.name} on {d}: test ppl {m[f'ppl/{d}']:.2f}"
        + (f" (before fine-tuning {m['test_ppl_before']:.2f})" if "test_ppl_before" in m else ""))
    log(f"cost: generic {m['cost/generic_flops']:.3e} FLOPs, specialisation {m['cost/spec_flops']:.3e} FLOPs, "
        f"inference {m['cost/inference_flops_per_token']:.3e} FLOPs/token ({int(m['params']):,} parameters)")
    log(f"model: {record['model_path']}")
    return record
