"""End-to-end drivers behind ``slmfactory train`` and ``slmfactory demo``.

The driver is the only process that talks to MLflow; training phases run through a
launcher (in-process or Ray Train) and come back as results and checkpoints.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from slmfactory.platform.config import RunConfig
from slmfactory.platform.errors import DataError


def ensure_corpus(cfg: RunConfig, build: bool, log: Callable[[str], None] = print) -> None:
    from slmfactory.platform.corpus import build_corpus

    if (cfg.corpus_dir / "manifest.json").is_file():
        return
    if not build:
        raise DataError(f"{cfg.corpus_dir}: no corpus here; run `slmfactory corpus build --config ...` "
                        f"or `slmfactory corpus import ...` first")
    log(f"building the offline corpus into {cfg.corpus_dir} (first run downloads packages)")
    build_corpus(cfg)


def check_domain(cfg: RunConfig, domain: str) -> None:
    from slmfactory.platform.corpus import list_domains

    domains = list_domains(cfg.corpus_dir)
    if domain not in domains:
        raise DataError(f"data.domain: {domain!r} is not in the corpus at {cfg.corpus_dir} "
                        f"(domains: {', '.join(domains)})")


def run_strategy(cfg: RunConfig, address: str | None = None, log: Callable[[str], None] = print):
    """Pretrain (or reuse) the strategy's generic phase, specialise it on ``data.domain``,
    log everything to MLflow and print the result."""
    from slmfactory.models.distributed import make_launcher
    from slmfactory.models.strategies import get_strategy
    from slmfactory.models.strategies.base import StrategyContext
    from slmfactory.platform.runtime import init_ray
    from slmfactory.platform.tokenizer import ensure_tokenizer
    from slmfactory.platform.tracking import open_tracker

    ensure_corpus(cfg, build=False)
    domain = cfg.data.domain
    check_domain(cfg, domain)
    ensure_tokenizer(cfg)
    strategy = get_strategy(cfg.strategy.name)
    launcher = make_launcher(cfg, log=log)
    if "clusters" in strategy.requires:
        # Clustering and resampling (cached) run on Ray Data inside the strategy.
        init_ray(address)
    tracker = open_tracker(cfg, f"{cfg.strategy.name}-{domain}",
                           {"strategy": cfg.strategy.name, "domain": domain, "phase": "specialize",
                            "in_domain_tokens": str(cfg.data.domain_train_tokens)})
    tracker.log_params(cfg.to_dict())
    ctx = StrategyContext(cfg, launcher, tracker, log)
    try:
        generic = strategy.pretrain(ctx)
        model = strategy.specialize(ctx, generic, domain)
    except BaseException:
        tracker.close("FAILED")
        raise
    log_specialized(tracker, model)
    tracker.close()
    log(f"{cfg.strategy.name} on {domain}: test ppl {model.metrics['test_ppl']:.2f}"
        + (f" (before fine-tuning {model.metrics['test_ppl_before']:.2f})" if "test_ppl_before" in model.metrics
           else ""))
    if model.generic_cost is not None:
        log(model.generic_cost.line())
    log(model.spec_cost.line())
    log(f"model: {model.path}")
    return model


def log_specialized(tracker, model) -> None:
    """The MLflow record of one specialised model (DESIGN.md's metric names)."""
    metrics = {f"ppl/{model.domain}": model.metrics["test_ppl"],
               "cost/spec_flops": model.spec_cost.flops,
               "cost/spec_device_hours": model.spec_cost.device_hours,
               "cost/spec_wall_seconds": model.spec_cost.wall_seconds,
               "cost/inference_flops_per_token": model.inference_flops_per_token,
               "params": model.params}
    if model.generic_cost is not None:
        metrics.update({"cost/generic_flops": model.generic_cost.flops,
                        "cost/generic_device_hours": model.generic_cost.device_hours,
                        "cost/generic_wall_seconds": model.generic_cost.wall_seconds})
    metrics.update({k: v for k, v in model.metrics.items() if isinstance(v, (int, float))})
    tracker.log_metrics(metrics)
    tracker.log_dict(model.to_dict(), "specialized_model.json")


def run_demo(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """``make demo``: corpus → tokenizer → pretrain an SLM on generic text → fine-tune it on
    one domain; print generic and domain perplexity before/after and the cost records."""
    from slmfactory.models.launch import LocalLauncher
    from slmfactory.models.strategies import get_strategy
    from slmfactory.models.strategies.base import StrategyContext, evaluate_ppl, load_lm, split_source
    from slmfactory.platform.tokenizer import ensure_tokenizer, load_tokenizer
    from slmfactory.platform.tracking import open_tracker

    t0 = time.perf_counter()
    ensure_corpus(cfg, build=True, log=log)
    domain = cfg.data.domain
    check_domain(cfg, domain)
    log(f"[demo] corpus ready ({time.perf_counter() - t0:.0f}s)")
    ensure_tokenizer(cfg)
    log(f"[demo] tokenizer: {len(load_tokenizer(ensure_tokenizer(cfg)))} tokens")
    generic_valid = split_source(cfg, "generic", "valid").load()[: cfg.pretrain.eval_tokens]
    cfg = cfg.replace(**{"strategy.name": "slm", "data.domain": domain})
    tracker = open_tracker(cfg, f"demo-slm-{domain}", {"strategy": "slm", "domain": domain, "phase": "demo"})
    tracker.log_params(cfg.to_dict())
    ctx = StrategyContext(cfg, LocalLauncher(log=log), tracker, log)
    strategy = get_strategy("slm")
    generic = strategy.pretrain(ctx)
    pretrained = load_lm(cfg, "slm", generic.weights())
    random_init = load_lm(cfg, "slm", None)
    domain_test = split_source(cfg, domain, "test").load()
    model = strategy.specialize(ctx, generic, domain)
    from transformers import AutoModelForCausalLM

    finetuned = AutoModelForCausalLM.from_pretrained(str(model.path))
    rows = {}
    for label, m in (("random init", random_init), ("pretrained SLM", pretrained),
                     (f"fine-tuned on {domain}", finetuned)):
        rows[label] = (evaluate_ppl(cfg, m, generic_valid)[1], evaluate_ppl(cfg, m, domain_test)[1])
    log("")
    log(f"{'model':<28} {'generic ppl':>12} {domain + ' test ppl':>18}")
    for label, (g, d) in rows.items():
        log(f"{label:<28} {g:>12.2f} {d:>18.2f}")
    log("")
    log("cost records:")
    log("  " + generic.cost.line())
    log("  " + model.spec_cost.line())
    log(f"  inference: {model.inference_flops_per_token:.3e} FLOPs/token, {model.params:,} parameters")
    log(f"specialised model (plain HF folder): {model.path}")
    log(f"MLflow: {cfg.tracking_uri} (mlflow ui --backend-store-uri {cfg.tracking_uri})")
    log(f"[demo] done in {time.perf_counter() - t0:.0f}s")
    log_specialized(tracker, model)
    tracker.log_metrics({"ppl_generic/pretrained": rows["pretrained SLM"][0],
                         f"ppl_before/{domain}": rows["pretrained SLM"][1]})
    tracker.close()
    return {"rows": rows, "model": model, "generic": generic,
            "improved": rows[f"fine-tuned on {domain}"][1] < rows["pretrained SLM"][1] and
            all(math.isfinite(v) for r in rows.values() for v in r)}
