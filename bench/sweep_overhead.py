"""Ray Tune's overhead on a sweep: N trials through ``slmfactory sweep`` against the same
trials run back to back by the driver (``run_trial`` in a loop, no Tune), one run each
side, each on its own fresh copy of the same corpus and tokenizer (so both train every
phase). Prints both wall times and the ratio baseline / sweep (goal >= 0.9: Tune's
overhead under 10%).

    python bench/sweep_overhead.py                      # configs/sweep-tiny.yaml, sequential
    python bench/sweep_overhead.py --concurrent 2       # Tune running 2 trials at once
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from slmfactory.platform import runtime  # noqa: F401  (env defaults before Ray/MLflow)

REPO = Path(__file__).resolve().parents[1]


def fresh(base_cfg, template: Path, name: str):
    root = Path(tempfile.mkdtemp(prefix=f"slmf-sweep-{name}-"))
    for sub in ("corpus", "tokenizer"):
        shutil.copytree(template / sub, root / sub)
    return base_cfg.replace(workdir=str(root))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "sweep-tiny.yaml"))
    ap.add_argument("--concurrent", type=int, default=1, help="Tune trials at once (1 = same serial work)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    args = ap.parse_args()

    from slmfactory.pipeline import run_trial
    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.data.corpus.store import list_domains
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer
    from slmfactory.sweeps.plan import plan_sweep
    from slmfactory.sweeps.run import run_sweep

    base = load_config(args.config, {"sweep.max_concurrent": args.concurrent, "tracking.enabled": True,
                                     **parse_overrides(args.set)})
    template = Path(tempfile.mkdtemp(prefix="slmf-sweep-template-"))
    tcfg = base.replace(workdir=str(template))
    build_sample_corpus(tcfg)
    ensure_tokenizer(tcfg)
    plan = plan_sweep(tcfg, list_domains(tcfg.corpus_dir))
    print(f"{len(plan.trials)} trials ({', '.join(sorted({t.strategy for t in plan.trials}))} x "
          f"{', '.join(sorted({t.domain for t in plan.trials}))}), {len(plan.generic)} shared generic phase(s)")

    loop_cfg = fresh(base, template, "loop")
    t0 = time.perf_counter()
    for trial in plan.trials:  # the generic phase is trained by the first trial that needs it
        run_trial(trial.config(loop_cfg), log=None)
    loop_s = time.perf_counter() - t0

    sweep_cfg = fresh(base, template, "tune")
    t0 = time.perf_counter()
    run_sweep(sweep_cfg, log=None)  # includes Ray's start-up and the MLflow logging
    sweep_s = time.perf_counter() - t0

    print(f"driver loop, no Tune: {loop_s:7.1f}s")
    print(f"Ray Tune sweep ({args.concurrent} at a time): {sweep_s:7.1f}s")
    print(f"ratio loop / sweep = {loop_s / sweep_s:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
