"""``make demo``: the whole platform on one recipe, end to end: it runs the sweep (``sweeps``)
and reads it back (``analysis``), the two packages beside each other that only this driver
and the cli join."""

from __future__ import annotations

import time
from typing import Callable

from slmfactory.analysis.report import write_report
from slmfactory.data.tokens import ensure_tokenizer
from slmfactory.pipeline import ensure_corpus
from slmfactory.platform.config import RunConfig
from slmfactory.platform.runtime import say
from slmfactory.sweeps.records import log_report_to_sweep
from slmfactory.sweeps.run import run_sweep


def run_demo(cfg: RunConfig, log: Callable[[str], None] = say) -> dict:
    """``make demo``: the whole platform. Corpus -> tokenizer -> clusters -> the recipe's
    sweep (Ray Tune, MLflow) -> report (tables, plots) -> recommendation."""
    t0 = time.perf_counter()
    ensure_corpus(cfg, build=True, log=log)
    log(f"[demo] corpus ready ({time.perf_counter() - t0:.0f}s)")
    ensure_tokenizer(cfg)
    outcome = run_sweep(cfg, resume=False, log=log)
    out = cfg.root / "reports" / outcome.plan.name
    report = write_report(cfg.tracking_uri, outcome.experiment, out, cfg.sweep.inference_caps,
                          price_per_device_hour=cfg.serving.price_per_device_hour)
    if cfg.tracking.enabled:
        log_report_to_sweep(cfg.tracking_uri, outcome.experiment, out, report)
    log("")
    log(report["table"])
    log("Recommendation (from the measured frontier):")
    log(report["recommendation"])
    log("")
    log(f"[demo] done in {time.perf_counter() - t0:.0f}s: {len(outcome.plan.trials)} trials, "
        f"{len(outcome.plan.generic)} shared generic phases")
    log(f"plots and tables: {out} (report.md)")
    log(f"browse in MLflow: slmfactory ui -c configs/{cfg.name}.yaml   (experiment {outcome.experiment!r})")
    log(f"serve each domain's best model (OpenAI-compatible, http://127.0.0.1:{cfg.serving.port}/v1): make serve")
    return {"outcome": outcome, "report": report, "seconds": time.perf_counter() - t0}
