"""``python scripts/results.py -c configs/study.yaml``: the study's results page.

Step 1 (export, unless ``--from-csv``): every finished trial run of the recipe's MLflow
experiment into a CSV (``--export``, default ``docs/<name>-runs.csv``); with ``--log``, the
study log's wall time per stage into ``<csv stem>.stages.json`` beside it.
Step 2 (page): ``--out`` (default ``docs/results.md``) and its figures (``<out stem>/`` beside
it, e.g. ``docs/results/``) from that CSV alone, in a ``--layout``: ``current`` (the second
study's page) or ``2026-12-01`` (the first study's page, ``docs/results-2026-12-01.md``, frozen).
The logic is in ``study/`` beside this folder (``study.results`` / ``claims`` / ``page``,
``gates`` / ``paper_axes`` / ``sections``), outside the wheel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The study's write-up is not in the wheel: import it from the checkout this script is in.
sys.path.insert(0, str(REPO))


def label(path: Path) -> str:
    """A path as the page shows it: relative to the repository when inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", required=True, help="the study's recipe (configs/study.yaml)")
    ap.add_argument("--export", type=Path,
                    help="write the MLflow trial runs to this CSV (default docs/<name>-runs.csv)")
    ap.add_argument("--from-csv", type=Path, help="skip MLflow: build the page from this CSV")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results.md", help="the page (figures in <out stem>/)")
    ap.add_argument("--log", type=Path,
                    help="the study's log (lines stamped HH:MM:SS, or == <ISO>Z markers): wall time per stage")
    ap.add_argument("--layout", default="current", choices=("current", "2026-12-01"),
                    help="the page's sections: current, or the first study's frozen page (2026-12-01)")
    ap.add_argument("--no-figures", action="store_true", help="write the page only")
    args = ap.parse_args(argv)
    if args.export and args.from_csv:
        ap.error("--export and --from-csv exclude each other")

    from slmfactory.platform.config import load_config
    from slmfactory.trial import experiment_name
    from study import page as results_page
    from study import results, stage_times

    cfg = load_config(args.config)
    if args.from_csv:
        csv_path = args.from_csv
    else:
        csv_path = args.export or REPO / "docs" / f"{cfg.name}-runs.csv"
        rows = results.export_rows(cfg.tracking_uri, experiment_name(cfg))
        results.write_csv(rows, csv_path)
        print(f"exported {len(rows)} trial runs of {experiment_name(cfg)!r} to {csv_path}")
    rows = results.read_csv(csv_path)
    if args.log:
        # A log without per-line stamps closes its last stage at the last trial's end.
        ends = [r["end_ms"] for r in rows if r.get("end_ms")]
        stages = stage_times.parse_log(args.log, max(ends) / 1000 if ends else None)
        where = results.write_stages(stages, csv_path)
        print(f"wall time per stage ({stages['total_seconds'] / 3600:.2f} h) -> {where}")
    if not results.configs_from_rows(rows):
        print(f"results: {csv_path} has {len(rows)} trial runs and no configuration measured on every domain yet: "
              "no page written", file=sys.stderr)
        return 1
    page = results_page.render_page(rows, cfg, csv_label=label(csv_path), config_label=label(Path(args.config)),
                                    stages=results.read_stages(csv_path), fig_rel=args.out.stem,
                                    page_label=label(args.out), layout=args.layout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    if not args.no_figures:
        configs = results.configs_from_rows(rows)
        figs = results_page.draw_figures(configs, args.out.parent / args.out.stem, tuple(cfg.sweep.inference_caps),
                                         rows=rows if args.layout == "current" else None)
        print(f"wrote {len(figs)} figures to {args.out.parent / args.out.stem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
