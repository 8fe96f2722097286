"""``python scripts/study_page.py -c configs/study.yaml``: the study's results page.

Step 1 (export, unless ``--from-csv``): every finished trial run of the recipe's MLflow
experiment into a CSV (``--export``, default ``docs/<name>-runs.csv``); with ``--log``, the
study log's wall time per stage into ``<csv stem>.stages.json`` beside it.
With the default layout (``v3``) the export also downloads every run's per-sequence test NLLs
into ``<csv stem>.seqnll.npz`` (the paired tests read them).
Step 2 (page): ``--out`` (default ``docs/results.md``) and its figures (``<out stem>/`` beside
it, e.g. ``docs/results/``) from that CSV alone, in a ``--layout``: ``v3`` (the third study's
page and its study log ``<name>-log.md`` beside it: ``study.page_v3``), or a dated study's
frozen page: ``2026-12-06`` (the second, ``docs/results-2026-12-06.md``), ``2026-12-01`` (the
first, ``docs/results-2026-12-01.md``). The logic is in ``study/`` beside this folder
(``study.results`` / ``rules_v3`` / ``verdicts_v3`` / ``page_v3``; the dated pages' ``claims`` /
``page`` / ``gates`` / ``paper_axes`` / ``sections``, and ``common``, what both share), outside
the wheel.
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
    ap.add_argument("--layout", default="v3", choices=("v3", "2026-12-06", "2026-12-01"),
                    help="the page: v3 (the third study's, with its study log), or a dated study's frozen page")
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
        if args.layout == "v3":
            print(f"per-sequence test NLLs -> {results.export_seq_nll(cfg.tracking_uri, rows, csv_path)}")
    rows = results.read_csv(csv_path)
    if args.log:
        # A log without per-line stamps closes its last stage at the last trial's end.
        ends = [r["end_ms"] for r in rows if r.get("end_ms")]
        stages = stage_times.parse_log(args.log, max(ends) / 1000 if ends else None)
        where = results.write_stages(stages, csv_path)
        print(f"wall time per stage ({stages['total_seconds'] / 3600:.2f} h) -> {where}")
    if args.layout == "v3":
        return write_v3(rows, cfg, csv_path, args)
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
                                         rows=rows if args.layout == "2026-12-06" else None)
        print(f"wrote {len(figs)} figures to {args.out.parent / args.out.stem}")
    return 0


def write_v3(rows, cfg, csv_path: Path, args) -> int:
    """The third study's page and its study log (``study.page_v3``), from the CSV and the runs'
    per-sequence NLLs beside it."""
    from study import page_v3, results

    seq = results.read_seq_nll(csv_path)
    if seq is None:
        print(f"results: {results.seq_nll_path(csv_path)} is missing: the paired verdicts need the runs' per-sequence "
              "NLLs (export from MLflow without --from-csv writes it)", file=sys.stderr)
        return 1
    page, log = page_v3.render_pages(rows, seq, cfg, csv_label=label(csv_path), config_label=label(Path(args.config)),
                                     stages=results.read_stages(csv_path), fig_rel=args.out.stem)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    log_path = args.out.parent / page_v3.log_name(cfg)
    log_path.write_text(log)
    print(f"wrote {args.out} and {log_path}")
    if not args.no_figures:
        figs = page_v3.draw_figures(rows, args.out.parent / args.out.stem)
        print(f"wrote {len(figs)} figures to {args.out.parent / args.out.stem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
