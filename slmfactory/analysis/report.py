"""``slmfactory report``: the sweep's report folder (``report.md``, its tables and the
figures) and the recommendation table, from the configurations
:mod:`slmfactory.analysis.measured` reads back from MLflow (which also defines a
configuration, its interval and its costs) and the frontier over them (:mod:`slmfactory.analysis.frontier`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmfactory.analysis.figures import figure1, plot_amortisation, plot_costs, pyplot
from slmfactory.analysis.frontier import (
    distinct_labels,
    entropy_gains,
    figure1_grid,
    fmt,
    macro_cell,
    macro_of,
    ppl_cell,
)
from slmfactory.analysis.measured import (
    AMORTISATION_N,
    COST_UNITS,
    EXPERT_STRATEGIES,
    UNIT_LABEL,
    MeasuredConfig,
    has_seeds,
    load_configs,
    parse_settings,
)
from slmfactory.platform.cost import CONVENTION_DOC, COST_CONVENTIONS, MEASURED, PAPER
from slmfactory.platform.tracking import MlflowTracker, client_for, ensure_experiment
from slmfactory.trial import Budget, TrialRecord

REPORT_TAG = "slmfactory.report"


def _domain_cell(c: MeasuredConfig, d: str) -> str:
    iv = (c.ppl_lo[d], c.ppl_hi[d]) if d in c.ppl_lo and d in c.ppl_hi else None
    return ppl_cell(c.ppl[d], iv)


def _budget_cell(nominal: str, spent: float | None) -> str:
    return nominal + (f" ({spent:.3g} T spent)" if spent is not None else "")


def serving_unit(price_per_device_hour: float = 0.0) -> str:
    """The unit serving costs are shown in: device-hours, or their price at the recipe's
    ``serving.price_per_device_hour``."""
    return f"price at {price_per_device_hour:g} / device-hour" if price_per_device_hour > 0 else "device-hours"


def serving_cell(c: MeasuredConfig, price_per_device_hour: float = 0.0) -> str:
    """``generate / score`` cost per million tokens (``-`` where not measured)."""
    return " / ".join(fmt(c.serving_cost(t, price_per_device_hour)) if c.has_serving_cost(t) else "-"
                      for t in ("generate", "score"))


def markdown(configs: list[MeasuredConfig], n_domains: int | None = None, price_per_device_hour: float = 0.0) -> str:
    """Every configuration per in-domain size: settings, nominal and spent budgets, macro
    perplexity with its interval (and the seed spread where the sweep has seeds),
    per-domain perplexity with its bootstrap interval, costs and C(N) for N in AMORTISATION_N,
    and the measured serving cost per million generated / scored tokens (in device-hours, or
    priced at ``price_per_device_hour``), with the machine it was measured on."""
    domains = sorted(configs[0].nll)
    seeds = has_seeds(configs)
    out = []
    for n in sorted({c.in_domain for c in configs}):
        rows = [c for c in configs if c.in_domain == n]
        head = (["strategy", "settings", "generic budget", "spec. budget", "params", "macro ppl [95%]"]
                + (["seed spread"] if seeds else []) + domains
                + ["epochs g/s", "generic FLOPs measured / paper", "spec. FLOPs / domain",
                   "generic dev-h measured / paper", "spec. dev-h / domain", "inference FLOPs / token"]
                + [f"C({k}) FLOPs measured / paper" for k in AMORTISATION_N]
                + [f"serving cost / M tokens generate / score ({serving_unit(price_per_device_hour)})"])
        out += [f"### In-domain size {n:,} tokens ({len(domains)} domains: {', '.join(domains)})", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in rows:
            cells = ([c.strategy, c.settings or "-", _budget_cell(c.generic_budget, c.spent_generic),
                      _budget_cell(c.spec_budget, c.spent_spec), f"{c.params / 1e6:.2f}M", f"**{macro_cell(c)}**"]
                     + ([fmt(c.seed_spread)] if seeds else []) + [_domain_cell(c, d) for d in domains]
                     + [f"{fmt(c.epochs_generic)}/{fmt(c.epochs_spec)}", _both(c, "flops", c.generic),
                        fmt(c.spec("flops")), _both(c, "device_hours", c.generic), fmt(c.spec("device_hours")),
                        fmt(c.inference)] + [_both(c, "flops", lambda u, conv, k=k: c.total(k, u, conv))
                                             for k in AMORTISATION_N]
                     + [serving_cell(c, price_per_device_hour)])
            out.append("| " + " | ".join(cells) + " |")
        machines = sorted({c.serving_machine for c in rows if c.serving_machine})
        if machines:
            out += ["", "Serving costs: each domain model's tokens/s measured once at export (scoring: batched "
                    "forward passes; generation: one greedy stream), on " + "; ".join(machines)
                    + " (docs/costs.md#serving-cost)."]
        out.append("")
    return "\n".join(out)


def _both(c: MeasuredConfig, unit: str, get) -> str:
    """``measured / paper`` of a cost (one value where the conventions agree)."""
    values = [fmt(get(unit, conv)) if c.has_cost(unit, conv) else "-" for conv in (MEASURED, PAPER)]
    return values[0] if values[0] == values[1] else " / ".join(values)


def table_before_after(configs: list[MeasuredConfig]) -> str:
    """The paper's Table 4 (docs/paper.md#table-4), its analogue: macro perplexity before and after fine-tuning, per
    configuration and in-domain size (strategies with a generic initialisation only)."""
    lines = ["| in-domain tokens | strategy | settings | generic budget | spec. budget | before fine-tuning | "
             "after fine-tuning | change |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(configs, key=lambda c: (c.in_domain, c.strategy, c.generic_budget, c.spec_budget, c.settings)):
        if set(c.ppl_before) != set(c.nll):
            continue  # no generic init (slm-nopt) or an older run
        before = macro_of(c.ppl_before)
        lines.append(f"| {c.in_domain:,} | {c.strategy} | {c.settings or '-'} | {c.generic_budget} | "
                     f"{c.spec_budget} | {before:.2f} | {c.ppl_macro:.2f} | {c.ppl_macro / before - 1:+.1%} |")
    return "\n".join(lines)


def table_generic(configs: list[MeasuredConfig]) -> str:
    """The paper's Table 8 (docs/paper.md#table-8), its analogue: generic validation perplexity of each generic phase
    (routed for slm-mix/slm-pn: each sequence scored by its cluster's expert), by generic
    budget. A phase is shared by its configurations: one value per (strategy, settings, budget)."""
    phases: dict[tuple[str, str], dict[str, float]] = {}
    for c in configs:
        if c.generic_ppl is None or c.generic_budget == "none":
            continue
        # Fine-tuning and in-domain data settings come after the generic phase: they do not
        # make another phase (finetune.seed=1 shares seed 0's pretraining).
        rest = ",".join(f"{k}={v}" for k, v in sorted(parse_settings(c.settings).items())
                        if not k.startswith(("finetune.", "data.")))
        phases.setdefault((c.strategy, rest), {}).setdefault(c.generic_budget, c.generic_ppl)
    value = {c.generic_budget: c.budgets[0].value for c in configs if c.budgets[0] is not None}
    budgets = sorted({b for v in phases.values() for b in v}, key=lambda b: value[b])
    lines = ["| strategy | settings | " + " | ".join(f"generic ppl at {b}" for b in budgets) + " |",
             "|" + "---|" * (2 + len(budgets))]
    for (s, rest), by in sorted(phases.items()):
        name = s + (" (routed)" if s in EXPERT_STRATEGIES else "")
        lines.append(f"| {name} | {rest or '-'} | " + " | ".join(f"{by[b]:.2f}" if b in by else "-" for b in budgets)
                     + " |")
    return "\n".join(lines)


def table_entropy(configs: list[MeasuredConfig]) -> str:
    parts = []
    for g in entropy_gains(configs):
        x, slm = g["config"], g["slm"]
        parts += [f"**{x.label}** vs **{slm.label}**, in-domain {x.in_domain:,} tokens", "",
                  "| domain | cluster entropy (nats) | slm ppl | " + f"{x.strategy} ppl | gain over slm |",
                  "|---|---|---|---|---|"]
        parts += [f"| {d} | {h:.3f} | {ps:.2f} | {px:.2f} | {gain:+.3f} |" for d, h, ps, px, gain in g["rows"]]
        if g["spearman"] is not None:
            parts.append(f"\nSpearman rank correlation of gain with entropy: rho = {g['spearman']:.3f} "
                         f"(p = {g['p']:.3g}, {len(g['rows'])} domains)")
        else:
            parts.append(f"\nSpearman rank correlation: needs >= 3 domains ({len(g['rows'])} here)")
        parts.append("")
    return "\n".join(parts) or "(no slm-mix/slm-pn configuration with a logged domain entropy and a matching slm)"


def table_is_provenance(uri: str, experiment: str, top: int = 6) -> str:
    """Where importance sampling drew its text: per finished ``slm-is`` trial run (domain,
    in-domain size, spec. budget, settings), the shares of its resampled pretraining tokens by
    generic source and by collection, read back from the runs' ``is_share/source/*`` and
    ``is_share/collection/*`` metrics ("legal's resampled text: 41% doc-debian, 30% manpages, ...")."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED' and "
                              f"tags.{TrialRecord.STRATEGY} = 'slm-is'", max_results=50000) if exp is not None else []
    rows, R = [], TrialRecord
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        by = {kind: R.is_shares(m, kind) for kind in R.IS_SHARE_KINDS}
        if R.DOMAIN in t and by["source"]:
            spec = Budget.from_tags(t, "spec")
            rows.append((t[R.DOMAIN], int(t.get(R.IN_DOMAIN_TOKENS, 0)), spec.value if spec else 0.0,
                         spec.label() if spec else "", t.get(R.SETTINGS, ""), by))
    if not rows:
        return "(no finished slm-is trial with logged resampled shares)"

    def line(shares: dict[str, float]) -> str:
        items = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{v:.0%} {k}" for k, v in items[:top]) + (f", ... (+{len(items) - top} more)"
                                                                   if len(items) > top else "")

    lines = ["| domain | in-domain | spec. budget | settings | resampled text by source | by collection |",
             "|---|---|---|---|---|---|"]
    for d, n, _, spec, settings, by in sorted(rows, key=lambda r: r[:5]):
        lines.append(f"| {d} | {n:,} | {spec} | {settings or '-'} | {d}'s resampled text: {line(by['source'])} | "
                     f"{line(by['collection'])} |")
    return "\n".join(lines)


def recommendation_table(configs: list[MeasuredConfig], cost: str = "flops", inference_caps: tuple = (),
                         convention: str = PAPER) -> str:
    """For each N in AMORTISATION_N, in-domain size, inference class and per-domain budget
    bin (costs under ``convention``): the best fitting configuration with its interval, C(N),
    the runner-up (best of another strategy) and whether the two tie."""
    unit = f"{UNIT_LABEL[cost]}, {convention} costs"
    lines = [f"| domains N | in-domain | inference class | per-domain budget ({unit}) | recommended | "
             f"macro ppl [95%] | C(N) {unit} | runner-up | tie |", "|---|---|---|---|---|---|---|---|---|"]
    for n in AMORTISATION_N:
        for size in sorted({c.in_domain for c in configs}):
            caps, edges, cells = figure1_grid(configs, size, n, cost, inference_caps, convention)
            budget_labels = distinct_labels(edges, prefix="<= ")
            for cap, row in zip(caps, cells):
                for label, rec in zip(budget_labels, row):
                    b, r = rec.best, rec.runner_up
                    if b is None:
                        lines.append(f"| {n} | {size:,} | <= {cap / 1e6:.3g}M | {label} | none fits | - | - | - | - |")
                        continue
                    lines.append(f"| {n} | {size:,} | <= {cap / 1e6:.3g}M | {label} | {b.label} | {macro_cell(b)} | "
                                 f"{fmt(b.total(n, cost, convention))} | "
                                 + (f"{r.label} ({macro_cell(r)})" if r else "-")
                                 + f" | {'**tie**' if rec.tie else 'no'} |")
    return "\n".join(lines)


def write_report(uri: str, experiment: str, out: Path, inference_caps: tuple = (),
                 log_to_mlflow: bool = True, price_per_device_hour: float = 0.0) -> dict[str, Any]:
    """Tables and plots into ``out`` (and, logged, to the experiment's report run); serving
    costs priced at ``price_per_device_hour`` (0: in device-hours)."""
    _, plt = pyplot()
    configs = load_configs(uri, experiment)
    out.mkdir(parents=True, exist_ok=True)
    units = [u for u in COST_UNITS if any(u in c.costs and c.spec(u) > 0 for c in configs)]
    files = []
    for size in sorted({c.in_domain for c in configs}):
        for cost in units:
            for conv in COST_CONVENTIONS:
                for n in AMORTISATION_N:
                    for draw in (plot_costs, figure1):
                        fig, path = draw(configs, size, n, cost, out, inference_caps, conv)
                        plt.close(fig)
                        files.append(path)
                fig, path = plot_amortisation(configs, size, cost, out, conv)
                plt.close(fig)
                files.append(path)
    table = markdown(configs, price_per_device_hour=price_per_device_hour)
    rec = "\n\n".join(f"### Per-domain budget in {UNIT_LABEL[u]}, {conv} costs\n\n"
                      f"{recommendation_table(configs, u, inference_caps, conv)}"
                      for u in units for conv in COST_CONVENTIONS)
    doc = (f"# Sweep report: {experiment}\n\n"
           f"Macro perplexity = exp(mean over domains of the test NLL); 95% interval exp(NLL ± 1.96 SE), "
           f"SE = sqrt(sum of the domains' bootstrap SE^2) / D; per-domain cells: the bootstrap percentile "
           f"interval over test sequences. A **tie**: the winner's interval overlaps the runner-up's.\n\n"
           f"Costs under two conventions (docs/costs.md): *paper*, {CONVENTION_DOC[PAPER]}; *measured*, "
           f"{CONVENTION_DOC[MEASURED]}.\n\n"
           f"{table}\n\n## Recommendation\n\n{rec}\n\n"
           f"## Perplexity before and after fine-tuning (the paper's Table 4, docs/paper.md#table-4)\n\n{table_before_after(configs)}\n\n"
           f"## Generic perplexity of each generic phase (the paper's Table 8, docs/paper.md#table-8)\n\n{table_generic(configs)}\n\n"
           f"## Cluster entropy and the experts' gain over slm\n\n{table_entropy(configs)}\n\n"
           f"## Where importance sampling drew its text (slm-is: shares of the resampled pretraining tokens)\n\n"
           f"{table_is_provenance(uri, experiment)}\n\n"
           + "\n".join(f"![{p.stem}]({p.name})" for p in files) + "\n")
    (out / "report.md").write_text(doc)
    files.append(out / "report.md")
    if log_to_mlflow:
        client = client_for(uri)
        exp_id = ensure_experiment(client, uri, experiment)
        old = client.search_runs([exp_id], filter_string=f"tags.`{REPORT_TAG}` = '1'", max_results=1)
        tracker = MlflowTracker(uri, experiment, "report", {REPORT_TAG: "1"},
                                run_id=old[0].info.run_id if old else None)
        tracker.log_artifact(out, "report")
        tracker.close()
    return {"configs": configs, "files": files, "table": table, "recommendation": rec}
