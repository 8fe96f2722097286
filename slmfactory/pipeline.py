"""The one trial driver (``run_trial``) behind ``slmfactory train``, every sweep trial and
so ``make demo``.

Only the driver talks to MLflow; training phases run through a launcher (in-process or
Ray Train) and come back as results and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

from slmfactory.data.corpus import build_corpus, corpus_is_current, list_domains, manifest_path
from slmfactory.data.tokens import ensure_tokenizer
from slmfactory.models.strategies import get_strategy
from slmfactory.models.train import StrategyContext, make_launcher, trained_tokens
from slmfactory.platform.config import RunConfig
from slmfactory.platform.cost import PAPER, SERVING_TASKS, ServingRates, generic_under
from slmfactory.platform.errors import DataError
from slmfactory.platform.machine import describe
from slmfactory.platform.runtime import ray_session, say
from slmfactory.platform.tracking import NullTracker, Tracker
from slmfactory.trial import TrialRecord, live_trial_run, log_trial, trial_of, trial_tags


def ensure_corpus(cfg: RunConfig, build: bool, log: Callable[[str], None] = say) -> None:
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


def run_trial(cfg: RunConfig, log: Callable[[str], None] | None = say, launcher=None,
              tracker: Tracker | None = None) -> TrialRecord:
    """The one driver of a trial, behind ``train``, ``demo`` and every sweep trial: prepare
    the stages the strategy needs, pretrain (or reuse) its generic phase, specialise it on
    ``data.domain``, evaluate; returns the trial's record (what MLflow logs). Every step
    is a stage, so a rerun trains nothing that already finished. ``tracker``: the trial's
    live run (``trial.open_trial_run``), which its phases' trainers stream their curves to."""
    ensure_corpus(cfg, build=False)
    domain = cfg.data.domain
    check_domain(cfg, domain)
    ensure_tokenizer(cfg)
    strategy = get_strategy(cfg.strategy.name)
    ctx = StrategyContext(cfg, launcher or make_launcher(cfg, log=log), tracker=tracker or NullTracker(), log=log)
    # Clustering and resampling (cached stages) run on Ray Data inside the strategy.
    with ray_session() if "clusters" in strategy.requires else contextlib.nullcontext():
        generic = strategy.pretrain(ctx)
        model = strategy.specialize(ctx, generic, domain)
    return trial_record(cfg, model, generic)


def trial_record(cfg: RunConfig, model, generic) -> TrialRecord:
    """Tags, params, metrics (perplexity with its bootstrap interval, every cost figure,
    the budgets actually spent and the epochs over each phase's data) and curves of one
    trial. Labels carry the nominal budgets; ``spent/*`` what the trial trained."""
    R = TrialRecord
    trial = trial_of(cfg)
    d = model.domain
    nll = model.metrics[R.TEST_NLL]
    metrics = {R.ppl_metric(d): model.metrics["test_ppl"], R.TEST_NLL: nll,
               # One domain here: exp(mean NLL) over domains is this trial's ppl; the report
               # takes the macro average over a configuration's trials.
               R.PPL_MACRO: math.exp(nll), R.PARAMS: model.params,
               R.INFERENCE_FLOPS_PER_TOKEN: model.inference_flops_per_token}
    if "test_ppl_lo" in model.metrics:
        metrics |= {R.ppl_lo_metric(d): model.metrics["test_ppl_lo"], R.ppl_hi_metric(d): model.metrics["test_ppl_hi"]}
    for side, cost in zip(R.SIDES, (model.generic_cost, model.spec_cost)):
        for unit in R.COST_UNITS:
            metrics[R.cost_metric(side, unit)] = getattr(cost, unit) if cost is not None else 0.0
        metrics[R.spent_tokens_metric(side)] = float(trained_tokens(cost))
    generic_flops, spec_flops = R.cost_metric("generic", "flops"), R.cost_metric("spec", "flops")
    for n in R.AMORTISATION_N:
        metrics[R.total_flops_metric(n)] = metrics[generic_flops] + n * metrics[spec_flops]
    # cost/* are measured; cost/paper_* the paper's convention (the generic corpus's embedding is nobody's).
    for unit in ("flops", "device_hours"):
        embed = model.metrics.get(R.clustering_cost_metric("generic", unit), 0.0)
        metrics[R.paper_cost_metric("generic", unit)] = generic_under(PAPER, metrics[R.cost_metric("generic", unit)],
                                                                      embed)
    for n in R.AMORTISATION_N:
        metrics[R.total_flops_metric(n, paper=True)] = (metrics[R.paper_cost_metric("generic", "flops")]
                                                        + n * metrics[spec_flops])
    metrics.update({k: float(v) for k, v in model.metrics.items() if isinstance(v, (int, float))
                    and k not in ("test_ppl", "test_ppl_lo", "test_ppl_hi")})
    for k, v in (generic.info.items() if generic is not None else []):
        if k.startswith(("routed_generic", "generic_valid", "generic_ppl", "teacher_generic_ppl")) \
                and isinstance(v, (int, float)):
            metrics[R.generic_metric(k)] = float(v)
    spent_generic, spent_spec = metrics[R.spent_tokens_metric("generic")], metrics[R.spent_tokens_metric("spec")]
    tags = {**trial_tags(cfg), R.GENERIC_SPENT: f"{spent_generic:.3g}T", R.SPEC_SPENT: f"{spent_spec:.3g}T"}
    if model.serving_rates:
        rates = ServingRates.of(model.serving_rates)
        # The machine, not the minute: configurations measured on one machine share one tag
        # (when is in the model folder's slmfactory.json and /v1/models).
        tags[R.SERVING_MACHINE] = f"{describe(rates.machine)}, {rates.machine.get('threads', '?')} torch thread(s)"
    # What each training phase ran in (its precision and compile resolved: trainer.plan_execution).
    used = {k: v for cost in (model.generic_cost, model.spec_cost) if cost is not None
            for k, v in cost.extra.items() if R.is_used_param(k)}
    return TrialRecord(name=trial.name, key=trial.key, tags=tags, params={**cfg.to_dict(), **used}, metrics=metrics,
                       model_path=str(model.path), curves=model.curves)


def run_strategy(cfg: RunConfig, address: str | None = None, log: Callable[[str], None] = say) -> TrialRecord:
    """``slmfactory train``: one trial, logged to MLflow as one run, and printed."""
    # Bad input fails here, in a second, before a Ray session starts.
    ensure_corpus(cfg, build=False)
    check_domain(cfg, cfg.data.domain)
    with live_trial_run(cfg, cfg.tracking.experiment) as live, ray_session(address):
        started = live.start_time if live is not None else int(time.time() * 1000)
        record = run_trial(cfg, log=log, tracker=live)
    record.started_ms, record.ended_ms = started, int(time.time() * 1000)
    if live is not None:
        log_trial(cfg, cfg.tracking.experiment, record.key, record)
    m, R = record.metrics, TrialRecord
    log(f"{cfg.strategy.name} on {cfg.data.domain}: test ppl {record.ppl:.2f}"
        + (f" (before fine-tuning {m[R.TEST_PPL_BEFORE]:.2f})" if R.TEST_PPL_BEFORE in m else ""))
    log(f"cost: generic {m[R.cost_metric('generic', 'flops')]:.3e} FLOPs, "
        f"specialisation {m[R.cost_metric('spec', 'flops')]:.3e} FLOPs, "
        f"inference {m[R.INFERENCE_FLOPS_PER_TOKEN]:.3e} FLOPs/token ({int(m[R.PARAMS]):,} parameters)")
    if R.serving_rate_metric("generate") in m:
        price = cfg.serving.price_per_device_hour
        log("serving: " + ", ".join(
            f"{task} {m[R.serving_rate_metric(task)]:,.0f} tokens/s = {m[R.serving_cost_metric(task)]:.3g} device-hours"
            + (f" ({m[R.serving_cost_metric(task)] * price:.3g} at {price:g}/device-hour)" if price > 0 else "")
            + " per million tokens" for task in SERVING_TASKS) + f" on {record.tags.get(R.SERVING_MACHINE, '?')}")
    log(f"model: {record.model_path}")
    return record
