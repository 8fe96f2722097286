"""Every strategy on a few domains at one budget: test perplexity before and after
fine-tuning, parameters and costs — the demo-scale version of the paper's tables.

Generic phases are cached and shared across domains and strategies (slm-d reuses the slm
and llm generic runs; slm-nopt/slm-is have none), so the table costs one pretraining per
strategy family plus the per-domain specialisations.

    python bench/strategy_table.py --config configs/demo.yaml --domains legal,biomedical \\
        --set pretrain.max_tokens=600000 --set finetune.max_tokens=300000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from slmfactory.platform import runtime  # noqa: F401  (env defaults before Ray/MLflow)
from slmfactory.platform.config import load_config, parse_overrides, strategy_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--domains", default="legal,biomedical")
    ap.add_argument("--strategies", default=",".join(sorted(strategy_settings())))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = ap.parse_args()
    base = load_config(args.config, parse_overrides(args.set))

    from slmfactory.pipeline import run_strategy
    from slmfactory.trial import TrialRecord as R

    rows = []
    for domain in args.domains.split(","):
        for name in args.strategies.split(","):
            cfg = base.replace(**{"strategy.name": name, "data.domain": domain})
            t0 = time.perf_counter()
            m = run_strategy(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)).metrics
            rows.append({"strategy": name, "domain": domain, "params": int(m[R.PARAMS]),
                         "ppl_before": m.get(R.TEST_PPL_BEFORE), "ppl_after": m[R.ppl_metric(domain)],
                         "generic_flops": m[R.cost_metric("generic", "flops")],
                         "spec_flops": m[R.cost_metric("spec", "flops")],
                         "inference_flops_per_token": m[R.INFERENCE_FLOPS_PER_TOKEN],
                         "wall_s": time.perf_counter() - t0})
            print(f"done {name}/{domain} in {rows[-1]['wall_s']:.0f}s", file=sys.stderr, flush=True)
    print(f"| strategy | domain | params | test ppl before FT | test ppl after FT | generic FLOPs | spec. FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        before = f"{r['ppl_before']:.2f}" if r["ppl_before"] is not None else "–"
        print(f"| {r['strategy']} | {r['domain']} | {r['params'] / 1e6:.2f}M | {before} | {r['ppl_after']:.2f} "
              f"| {r['generic_flops']:.2e} | {r['spec_flops']:.2e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
