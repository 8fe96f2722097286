"""The study's results page (``docs/results.md``) and its figures, from the CSV alone.

:func:`render_page` turns CSV rows (``results.read_csv``) and the recipe into the page's
markdown; the same rows always give the same bytes (the page is tested that way). Figures are
drawn by ``report``'s own plotting functions (plus one for LoRA) when a figure folder is given;
their names are fixed in advance, so the page's text does not depend on drawing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.analysis import figures, measured, report
from slmfactory.analysis.figures import pyplot
from slmfactory.analysis.measured import AMORTISATION_N, COST_UNITS, UNIT_LABEL, MeasuredConfig
from slmfactory.platform.cost import CONVENTION_DOC, MEASURED
from slmfactory.platform.cost import PAPER as PAPER_COSTS
from slmfactory.platform.errors import DataError
from slmfactory.trial import experiment_name
from study import claims as rc
from study import paper_axes, sections
from study.common import hms, limit_sentence, md, ppl_iv, section_claims, section_table4, strategy_order
from study.results import configs_from_rows, fill_entropy_k, incomplete_groups

# The paper's scale (docs/paper.md#paper-settings): parameters, training throughput (A100 GPU-hours per 1B tokens), budgets.
PAPER = {"slm_params": 126e6, "llm_params": 771e6, "gpuh_per_btok": 2.2, "generic_gpuh": (10, 100, 600, 650),
         "spec_gpuh": (0.3, 120), "in_domain": (1e6, 8e6, 64e6), "domains": 9, "k": 1024, "mix_experts": 16,
         "pn_experts": 32, "test_docs": 20000}



def _g(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3g}" if x else "0")


def cost_units(configs: list[MeasuredConfig]) -> list[str]:
    return [u for u in COST_UNITS if any(u in c.costs and c.spec(u) > 0 for c in configs)]


def figure_names(configs: list[MeasuredConfig]) -> list[tuple[str, tuple]]:
    """(file name, what to draw) of every figure, in page order: under the paper's cost
    convention in every cost unit, then under the measured one in FLOPs (the claims' unit)."""
    out = []
    for conv, units in ((PAPER_COSTS, cost_units(configs)), (MEASURED, [u for u in cost_units(configs) if u == "flops"])):
        for n in rc.sizes(configs):
            for cost in units:
                out += [(f"figure1_n{n}_N{k}_{cost}{figures.file_suffix(conv)}.png", ("figure1", n, k, cost, conv))
                        for k in AMORTISATION_N]
                out.append((f"amortisation_n{n}_{cost}{figures.file_suffix(conv)}.png", ("amortisation", n, cost, conv)))
    return out


def draw_figures(configs: list[MeasuredConfig], fig_dir: Path, caps: tuple = (), rows: list[dict] | None = None
                 ) -> list[Path]:
    """Every figure the page links; ``rows`` (the CSV's, layout ``2026-12-06``): also Figure 1 on
    the paper's axes."""
    _, plt = pyplot()
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, what in figure_names(configs):
        if what[0] == "figure1":
            fig, path = figures.figure1(configs, what[1], what[2], what[3], fig_dir, caps, what[4])
        else:
            fig, path = figures.plot_amortisation(configs, what[1], what[2], fig_dir, what[3])
        plt.close(fig)
        if path.name != name:
            path.replace(fig_dir / name)
        paths.append(fig_dir / name)
    if lora_pairs(configs):
        fig = plot_lora(configs)
        fig.savefig(fig_dir / "lora_vs_full.png", dpi=100)
        plt.close(fig)
        paths.append(fig_dir / "lora_vs_full.png")
    if rows is not None:
        paths += sections.draw_paper_axes(paper_axes.grids(rows, configs), fig_dir)
    return paths


# -- sections -----------------------------------------------------------------------------

def section_verdicts(gate: rc.Gate, claims: list[rc.Claim]) -> str:
    """One line per claim: its verdict (with *one seed* where its deciding configurations ran
    once), the two numbers that decide it, and its rule in one sentence."""
    lines = ["| # | claim | verdict | the two deciding numbers | rule |", "|---|---|---|---|---|"]
    for c in claims:
        seed = f" ({c.seed_note})" if c.seed_note else ""
        numbers = " vs ".join(c.numbers) or "-"
        lines.append(f"| {c.number} | {c.statement} | **{c.verdict}**{seed} | {numbers} | {c.summary} |")
    return "\n".join(lines)


def section_costs(configs: list[MeasuredConfig]) -> str:
    """The two cost conventions and what separates them: the generic corpus's embedding."""
    out = [f"- *{PAPER_COSTS}* (claims are decided under it): {CONVENTION_DOC[PAPER_COSTS]}.",
           f"- *{MEASURED}* (shown beside): {CONVENTION_DOC[MEASURED]}.", "",
           "Only the strategies that cluster the generic corpus (slm-is, slm-mix, slm-pn) differ, by the generic "
           "embedding in their generic cost (FLOPs, one row per generic phase; per-domain costs of every "
           "configuration under both conventions are in claim 1's and claim 4's cells and notes; `docs/costs.md`):", "",
           "| strategy | generic budget | generic embedding | generic, measured | generic, paper |", "|---|---|---|---|---|"]
    seen = set()
    for c in sorted(configs, key=lambda c: strategy_order(c)):
        key = (c.strategy, c.generic_budget)
        if not c.embed_generic.get("flops") or key in seen:
            continue
        seen.add(key)
        out.append(f"| {c.strategy} | {c.generic_budget} | {_g(c.embed_generic['flops'])} | "
                   f"{_g(c.generic('flops', MEASURED))} | {_g(c.generic('flops', PAPER_COSTS))} |")
    if not seen:
        out.append("| (no configuration clusters the generic corpus: the two conventions agree) | | | | |")
    return "\n".join(out)


def section_entropy_source(configs: list[MeasuredConfig], filled: int) -> str:
    """Where claim 5's k = 16 entropy comes from, and what is missing."""
    ent = rc.entropy_k16(configs)
    lines = [f"Claim 5 reads each domain's entropy over a fixed k = {rc.ENTROPY_K} clustering of the generic corpus "
             "(`study.claims.entropy_k16`): the `domain_entropy` of trials whose `domain_entropy_k` is "
             f"{rc.ENTROPY_K}. slm-is logs the domain's entropy over the recipe's `cluster.k` clustering; slm-mix and "
             "slm-pn over their experts' (k = experts), which is not used."]
    if filled:
        lines.append(f"The CSV predates the `domain_entropy_k` column: for {filled} rows it is filled from the recipe "
                     "(`results.fill_entropy_k`: slm-mix/slm-pn `strategy.<name>.experts`, otherwise `cluster.k`, "
                     "with the row's settings applied).")
    if not ent:
        lines.append(f"\nNo trial in the CSV logged a k = {rc.ENTROPY_K} entropy: claim 5 is inconclusive (cells "
                     "missing); the page does not invent one.")
        return "\n".join(lines)
    domains = sorted({d for v in ent.values() for d in v})
    lines += ["", "| in-domain | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for n, by in sorted(ent.items()):
        lines.append(f"| {n:,} | " + " | ".join(f"{by[d]:.3f}" if d in by else "-" for d in domains) + " |")
    return "\n".join(lines)


def section_gate(gate: rc.Gate, configs: list[MeasuredConfig]) -> str:
    out = ["Rule: " + md(rc.decision_gate.__doc__), ""]
    out += [f"- {line}" for line in gate.lines]
    failed = [s for s, ok in gate.passed.items() if ok is False]
    unknown = [s for s, ok in gate.passed.items() if ok is None]
    if unknown:
        out.append(f"\nThe gate cannot be evaluated for {', '.join(unknown)} (cells missing): its parts of claims 2 "
                   "and 5 are *inconclusive (cells missing)*.")
    if not failed:
        if not unknown:
            out.append("\nThe gate passed for every expert strategy: claims 2 and 5 are decided by their comparisons.")
        return "\n".join(out)
    cap = rc.small_params(configs)
    slm = [c for c in configs if c.strategy == "slm" and c.spent_generic]
    tpp = max((c.spent_generic / c.params for c in slm), default=None)
    paper = 100 / PAPER["gpuh_per_btok"] * 1e9 / PAPER["slm_params"]
    out.append(f"\nNot passed for {', '.join(failed)}: its parts of claims 2 and 5 are *inconclusive (regime not "
               "reached)*, not refuted. What would reach it:")
    if tpp is not None:
        out.append(f"- more generic tokens per SLM parameter: the largest budget gives {tpp:.1f} tokens per parameter "
                   f"({cap / 1e6:.2f}M parameters); the paper's Table 8 reference (100 GPUh) gives ~{paper:.0f}, its "
                   "600 GPUh ~" + f"{600 / PAPER['gpuh_per_btok'] * 1e9 / PAPER['slm_params']:.0f}. A fresh (not "
                   "repeated) generic corpus at least that large, or a smaller SLM.")
    if gate.falls is False:
        out.append("- slm's generic perplexity no longer falls: the largest budget adds nothing to slm (repeated "
                   "epochs over a small generic corpus, or a learning-rate schedule that has ended); extend the "
                   "corpus rather than the budget.")
    out.append("- experts that see enough of their clusters' data: each of the k experts trains on ~1/k of the "
               "generic tokens, so the experts need k times slm's budget before their capacity pays.")
    return "\n".join(out)



def lora_pairs(configs: list[MeasuredConfig]) -> list[tuple[MeasuredConfig, MeasuredConfig]]:
    """(llm, llm-lora) at the same budgets, in-domain size and seeds."""
    out = []
    for lo in sorted((c for c in configs if c.strategy == "llm-lora"), key=lambda c: (c.in_domain, c.spec_budget)):
        full = next((c for c in configs if c.strategy == "llm" and (c.generic_budget, c.spec_budget, c.in_domain)
                     == (lo.generic_budget, lo.spec_budget, lo.in_domain) and rc.seeds(c) == rc.seeds(lo)), None)
        if full is not None:
            out.append((full, lo))
    return out


def section_lora(configs: list[MeasuredConfig], rows: list[dict], fig_rel: str = "results") -> str:
    pairs = lora_pairs(configs)
    if not pairs:
        return "No llm-lora configuration with a matching llm: inconclusive (cells missing: llm-lora, llm)."
    d = len(pairs[0][0].nll)
    trainable = {}
    for r in rows:
        if r["strategy"] == "llm-lora" and r.get("lora_trainable_params"):
            trainable[(r["generic_budget"], r["spec_budget"], r["in_domain_tokens"])] = r["lora_trainable_params"]
    lines = [f"Paper (appendix): LoRA (rank 64) lands within 0.5 ppl of full fine-tuning. Total specialisation cost = "
             f"per-domain cost × {d} domains.", "",
             "| generic | spec. budget | in-domain | llm (full) | llm-lora | difference | intervals | "
             f"spec. FLOPs full / LoRA (all {d} domains) | spec. device-h full / LoRA | LoRA trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for full, lo in pairs:
        tp = trainable.get((lo.generic_budget, lo.spec_budget, lo.in_domain))
        lines.append(f"| {lo.generic_budget} | {lo.spec_budget} | {lo.in_domain:,} | {ppl_iv(full)} | {ppl_iv(lo)} | "
                     f"{lo.ppl_macro - full.ppl_macro:+.2f} | {rc.compare(lo, full)} | "
                     f"{_g(d * full.spec('flops'))} / {_g(d * lo.spec('flops'))} | "
                     f"{_g(d * full.spec('device_hours'))} / {_g(d * lo.spec('device_hours'))} | "
                     f"{'-' if tp is None else f'{tp:,.0f} of {lo.params:,}'} |")
    return "\n".join(lines) + f"\n\n![LoRA beside full fine-tuning]({fig_rel}/lora_vs_full.png)"


def plot_lora(configs: list[MeasuredConfig]):
    _, plt = pyplot()
    units = [u for u in cost_units(configs)]
    fig, axes = plt.subplots(1, len(units), figsize=(6 * len(units), 4.2), squeeze=False)
    for ax, unit in zip(axes[0], units):
        for i, s in enumerate(("llm", "llm-lora")):
            pts = sorted((c for c in configs if c.strategy == s and unit in c.costs), key=lambda c: c.spec(unit))
            for c in pts:
                iv = c.interval
                err = [[c.ppl_macro - iv[0]], [iv[1] - c.ppl_macro]] if iv else None
                ax.errorbar(len(c.nll) * c.spec(unit), c.ppl_macro, yerr=err, fmt="o" if s == "llm" else "s",
                            color=f"C{i}", ms=5, capsize=3, label=s if c is pts[0] else None)
                ax.annotate(f"n{c.in_domain // 1000}k s{c.spec_budget}", (len(c.nll) * c.spec(unit), c.ppl_macro),
                            fontsize=6, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"total specialisation {UNIT_LABEL[unit]} (all domains)")
        ax.set_ylabel("macro perplexity (95% interval)")
        ax.legend(fontsize=7)
    fig.suptitle("LoRA beside full fine-tuning of the LLM")
    fig.tight_layout()
    return fig


def section_seeds(configs: list[MeasuredConfig]) -> str:
    groups: dict[tuple, list[MeasuredConfig]] = {}
    for c in configs:
        groups.setdefault(c.replicate_key, []).append(c)
    reps = [sorted(v, key=lambda c: c.settings) for v in groups.values() if len(v) > 1]
    if not reps:
        return "The grid has no configuration run with two seeds (no `*seed` setting varies)."
    lines = ["A configuration run with two or more seeds enters the claims as one configuration "
             "(`frontier.pool_seeds`): its macro perplexity is exp(mean over seeds of the macro NLL) and its interval "
             "the union of the seeds' 95% intervals (lowest lower to highest upper bound), at least as wide as the "
             "seeds' spread.", "",
             "| strategy | generic | spec. | in-domain | per seed: macro ppl [95%] | spread (sd, ddof=1) | "
             "max - min | seeds' intervals | pooled: macro ppl [union of the seeds' intervals] |",
             "|---|---|---|---|---|---|---|---|---|"]
    pooled = {c.replicate_key: c for c in measured.pool_seeds(configs)}
    for v in sorted(reps, key=lambda v: strategy_order(v[0]) + (v[0].in_domain, rc.budget_value(v[0].spec_budget))):
        c0 = v[0]
        per = "<br>".join(f"{','.join(f'{k}={x}' for k, x in rc.seeds(c).items())}: {ppl_iv(c)}" for c in v)
        spread = max(c.ppl_macro for c in v) - min(c.ppl_macro for c in v)
        sep = "overlap" if all(measured.overlaps(a, b) for a in v for b in v if a is not b) else "separate"
        lines.append(f"| {c0.strategy} | {c0.generic_budget} | {c0.spec_budget} | {c0.in_domain:,} | {per} | "
                     f"{_g(c0.seed_spread)} | {spread:.2f} | {sep} | {ppl_iv(pooled[c0.replicate_key])} |")
    return "\n".join(lines)


def section_scale(configs: list[MeasuredConfig], cfg, claims: list[rc.Claim], limit=None) -> str:
    """The gap to the paper's scale; ``limit(verdict)``: what stops an inconclusive claim
    (default :func:`limit_sentence`, the first study's wording)."""
    limit = limit or limit_sentence
    cap = rc.small_params(configs)
    llm = sorted({c.params for c in configs if c.strategy == "llm"})
    tok_per_param = lambda tokens: tokens / PAPER["slm_params"]  # noqa: E731
    paper_tok = lambda gpuh: gpuh / PAPER["gpuh_per_btok"] * 1e9  # noqa: E731
    d = len(configs[0].nll)
    strat = cfg.strategy.to_tree()
    lines = ["| quantity | this study | the paper | ratio |", "|---|---|---|---|",
             f"| SLM parameters (served) | {cap / 1e6:.3g}M | 126M | 1/{PAPER['slm_params'] / cap:,.0f} |"]
    if llm:
        lines.append(f"| LLM parameters (LLM / SLM) | {llm[-1] / 1e6:.3g}M ({llm[-1] / cap:.1f}x) | 771M (6.1x) | "
                     f"1/{PAPER['llm_params'] / llm[-1]:,.0f} |")
    for g in rc.generic_budgets(configs):
        slm = [c for c in configs if c.strategy == "slm" and c.generic_budget == g and c.spent_generic]
        if slm:
            ours = slm[0].spent_generic / slm[0].params
            ep = slm[0].epochs_generic
            lines.append(f"| generic tokens per SLM parameter at {g} | {ours:.1f} ({_g(ep)} passes over the generic "
                         "text it read: no repeats) "
                         f"| {tok_per_param(paper_tok(10)):.0f} to {tok_per_param(paper_tok(650)):,.0f} "
                         f"(10 to 650 GPUh) | {ours / tok_per_param(paper_tok(100)):.3f} of 100 GPUh's |")
    ex = strat.get("slm-mix", {}).get("experts")
    if ex:
        lines.append(f"| experts (slm-mix / slm-pn), clusters k | {ex} / {strat.get('slm-pn', {}).get('experts')}, "
                     f"k = {cfg.cluster.k} | {PAPER['mix_experts']} / {PAPER['pn_experts']}, k = {PAPER['k']} | - |")
    for n in rc.sizes(configs):
        lines.append(f"| in-domain tokens per SLM parameter (n={n:,}) | {n / cap:.3f} | "
                     f"{PAPER['in_domain'][0] / PAPER['slm_params']:.4f} to "
                     f"{PAPER['in_domain'][-1] / PAPER['slm_params']:.2f}"
                     " (1M to 64M) | - |")
    specs = [c.spent_spec / c.params for c in configs if c.strategy == "slm" and c.spent_spec]
    if specs:
        lines.append(f"| specialisation tokens per SLM parameter | {min(specs):.3g} to {max(specs):.3g} | "
                     f"{tok_per_param(paper_tok(0.3)):.2f} to {tok_per_param(paper_tok(120)):.0f} "
                     "(0.3 to 120 GPUh) | - |")
    lines.append(f"| domains | {d} | {PAPER['domains']} | - |")
    lines.append(f"| test set per domain | {cfg.data.test_tokens:,} tokens | {PAPER['test_docs']:,} documents | - |")
    widths = [(c.interval[1] - c.interval[0]) / 2 / c.ppl_macro for c in configs if c.interval]
    out = ["\n".join(lines), ""]
    if widths:
        out.append(f"- Interval width: the median macro-perplexity interval is ±{np.median(widths):.1%} of the value; "
                   "differences smaller than about twice that cannot separate configurations.")
    crit = rc.spearman_critical(d, one_sided=True)
    if crit is not None:
        out.append(f"- With {d} domains, claim 5's one-sided test reaches p < {rc.SIGNIFICANCE} (exact) only at "
                   f"rho <= -{crit:.3f}, in every seed: an almost monotone ranking "
                   f"(the paper has {PAPER['domains']} domains).")
    elif d <= rc.EXACT_MAX:
        out.append(f"- With {d} domains no Spearman correlation can reach one-sided p < {rc.SIGNIFICANCE}: claim 5 "
                   "cannot be decided.")
    for c in claims:
        if c.verdict.startswith(rc.INCONCLUSIVE):
            out.append(f"- Claim {c.number} is {c.verdict}: " + limit(c.verdict))
    return "\n".join(out)



def section_wall_time(stages: dict[str, Any] | None, rows: list[dict]) -> str:
    out = []
    if stages:
        state = "still running when parsed" if stages.get("still_running") else "finished"
        out += [f"From `{stages['log']}` (stage markers; {stages['sweep_attempts']} sweep attempt(s), {state}; "
                f"{stages['trials_finished_lines']} trials finished, {stages['trials_failed_lines']} failed):", "",
                "| stage | wall time (h:mm:ss) |", "|---|---|"]
        out += [f"| {s['stage']} | {hms(s['seconds'])} |" for s in stages["stages"]]
        out += [f"| **total** | **{hms(stages['total_seconds'])}** |", ""]
    else:
        out += ["No study log was parsed (`--log PATH` writes the per-stage times beside the CSV).", ""]
    times = [(r["start_ms"], r["end_ms"]) for r in rows if r.get("start_ms") and r.get("end_ms")]
    if times:
        span = (max(e for _, e in times) - min(s for s, _ in times)) / 1000
        busy = sum(e - s for s, e in times) / 1000
        out.append(f"From the CSV: the trial runs span {hms(span)} (first start to last end; the shared generic "
                   f"phases are in the trials' generic cost, not in this span) and add up to {hms(busy)} of "
                   "trial time.")
    return "\n".join(out)


def section_appendix(configs: list[MeasuredConfig], rows: list[dict]) -> str:
    lines = ["| strategy | settings | generic | spec. | in-domain | params | macro ppl [95%] | generic FLOPs | "
             "spec. FLOPs / domain | generic dev-h | spec. dev-h / domain | generic ppl | generic FLOPs, paper |",
             "|" + "---|" * 13]
    for c in sorted(configs, key=lambda c: (c.in_domain,) + strategy_order(c) + (rc.budget_value(c.spec_budget),)):
        lines.append(f"| {c.strategy} | {c.settings or '-'} | {c.generic_budget} | {c.spec_budget} | {c.in_domain:,} | "
                     f"{c.params:,} | {ppl_iv(c)} | {_g(c.generic('flops'))} | {_g(c.spec('flops'))} | "
                     f"{_g(c.generic('device_hours'))} | {_g(c.spec('device_hours'))} | "
                     f"{'-' if c.generic_ppl is None else f'{c.generic_ppl:.2f}'} | "
                     f"{_g(c.generic('flops', PAPER_COSTS)) if c.has_cost('flops', PAPER_COSTS) else '-'} |")
    left = incomplete_groups(rows)
    if left:
        lines += ["", f"Left out (not measured on every domain yet): {len(left)} configuration(s): "
                  + "; ".join(f"{lab} ({len(ds)} domain(s))" for lab, ds in left) + "."]
    return "\n".join(lines)


V2 = "2026-12-06"
LAYOUTS = (V2, "2026-12-01")
"""Page layouts of this module, each a study's page as it was published, frozen so that it still
rebuilds byte for byte from its CSV: ``2026-12-06`` (the second study's sections: gates G0-G2,
Figure 1 on the paper's axes, tokens per parameter, what did not show) and ``2026-12-01`` (the
first study's). The third study's page is :mod:`study.page_v3` (``scripts/study_page.py``'s default)."""
DEFAULT_PAGE = "docs/results.md"


def rebuild_command(config_label: str, csv_label: str, page_label: str = DEFAULT_PAGE,
                    layout: str = V2) -> str:
    """The command that rebuilds a page from its CSV (``--out`` left out at its default)."""
    return (f"python scripts/study_page.py -c {config_label} --from-csv {csv_label}"
            + (f" --out {page_label}" if page_label != DEFAULT_PAGE else "") + f" --layout {layout}")


def render_page(rows: list[dict], cfg, csv_label: str, config_label: str, stages: dict[str, Any] | None = None,
                fig_rel: str = "results", page_label: str = DEFAULT_PAGE, layout: str = V2) -> str:
    """The page's markdown; figures are linked as ``<fig_rel>/<name>.png`` (``fig_rel``: the
    page's stem, where ``scripts/study_page.py`` draws them); ``page_label`` and ``layout`` (see
    :data:`LAYOUTS`) are named in the header's rebuild command."""
    if layout not in LAYOUTS:
        raise DataError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    filled_rows, filled = fill_entropy_k(rows, cfg)
    configs = configs_from_rows(filled_rows)
    if not configs:
        raise DataError("no configuration measured on every domain in the CSV")
    gate, claims = rc.all_claims(configs, generic_scale=layout == V2)
    domains = sorted(configs[0].nll)
    names = figure_names(configs)
    figs = "\n".join(f"![{name[:-4]}]({fig_rel}/{name})" for name, what in names if what[-1] == PAPER_COSTS)
    figs_measured = "\n".join(f"![{name[:-4]}]({fig_rel}/{name})" for name, what in names if what[-1] == MEASURED)
    caps = tuple(cfg.sweep.inference_caps)
    rec = report.recommendation_table(configs, "flops", caps, PAPER_COSTS)
    rec_measured = report.recommendation_table(configs, "flops", caps, MEASURED)
    parts = [
        "# Results: reproducing Grangier et al. (arXiv 2402.01093) with slmfactory", "",
        f"> **Generated — do not edit.** `{rebuild_command(config_label, csv_label, page_label, layout)}` "
        f"rebuilds this page and its figures (`{fig_rel}/*.png`) from `{csv_label}` alone: {len(rows)} trial runs, "
        f"{len(configs)} configurations measured on all {len(domains)} domains ({', '.join(domains)}). The CSV is "
        f"exported from MLflow experiment `{experiment_name(cfg)}` at `{cfg.tracking_uri}` by "
        f"`python scripts/study_page.py -c {config_label} --export {csv_label}"
        + (f" --log {stages['log']}" if stages else "") + "`.", "",
        "Macro perplexity = exp(mean over domains of the test NLL); its 95% interval is exp(NLL ± 1.96 SE) with "
        "SE = sqrt(sum of the domains' bootstrap SE²) / D (`frontier.MeasuredConfig.interval`). Cells read "
        "`<strategy> g<generic budget> s<spec. budget> [settings] n<in-domain tokens>: ppl [95% interval]`.", "",
        "## Verdicts", "", "Costs under the paper's convention (measured beside, in each claim's notes); a "
        "configuration with two seeds counts with the union of their intervals; *one seed*: the deciding "
        "configurations ran once. Every cell is in *Claims in detail*, per part.", "",
        section_verdicts(gate, claims), "",
        "## How a verdict is decided", "", md(rc.__doc__.split("\n\n", 1)[1]), "",
        "## Costs: the paper's convention and the measured one", "", section_costs(configs), "",
        "## Decision gate (claims 2 and 5)", "", section_gate(gate, configs), "",
        "## Claim 5's entropy: a fixed k = 16 clustering", "", section_entropy_source(configs, filled), "",
        "## Claims in detail", "", section_claims(claims),
        "## Perplexity before and after fine-tuning (the paper's Table 4, docs/paper.md#table-4)", "",
        "Each cell: macro ppl before fine-tuning → after [95% interval] (no before for slm-nopt).", "",
        section_table4(configs), "",
        "## Generic perplexity of each generic phase (the paper's Table 8, docs/paper.md#table-8)", "",
        "Validation perplexity on generic data after the generic phase (routed for slm-mix/slm-pn: each sequence "
        "scored by its cluster's expert); one validation number, no interval.", "",
        report.table_generic(configs), "",
        "## Figure 1 and amortisation (N = 1, 7, 50; FLOPs and device-hours; paper's costs)", "",
        "Figure 1: the winning strategy per inference class and per-domain budget (C_spec + C_generic / N) bin; "
        "amortisation: C(N) = C_generic + N C_spec of each strategy's best configuration. Costs under the paper's "
        "convention; the measured convention's figures (FLOPs) follow.", "", figs, "",
        "<details><summary>Figure 1 as a table (FLOPs, paper's costs)</summary>", "", rec, "", "</details>", "",
        "### The same under measured costs (FLOPs)", "", figs_measured, "",
        "<details><summary>Figure 1 as a table (FLOPs, measured costs)</summary>", "", rec_measured, "", "</details>",
        "",
        "## LoRA beside full fine-tuning", "", section_lora(configs, rows, fig_rel), "",
        "## Seed spread", "", section_seeds(configs), "",
        "## Where the gap to the paper's scale limits a conclusion", "",
        section_scale(configs, cfg, claims, None if layout == "2026-12-01" else sections.limit_for(rows, configs, cfg)),
        "",
        "## Wall time of the study", "", section_wall_time(stages, rows), "",
        "## Appendix: every configuration", "", section_appendix(configs, rows), ""]
    if layout == V2:
        parts = _with_current_sections(parts, filled_rows, configs, cfg, claims, fig_rel)
    return "\n".join(parts)


def rule_changed_note(configs: list[MeasuredConfig]) -> str:
    """Claim 1's floor on slm-is's budget came after this study's data: said, with what the
    rule printed before it gives on the same data."""
    from slmfactory.analysis.measured import pool_seeds

    before = rc.claim_is_best_small(pool_seeds(configs), generic_scale=False)
    stopped = " vs ".join(before.numbers) or "no deciding cells"
    return ("**A rule changed after the data (said on 2026-12-07).** Claim 1's floor (slm-is decided only at a "
            "specialisation budget of generic scale, at least slm's smallest generic budget) was added on 2026-12-06, "
            "after this study's trials ran: at 16k-131k tokens slm-is's resampled pretraining is a few hundred steps "
            "and says nothing of importance sampling. Under the rule this page printed before it (and the first "
            f"study used), the all-domain verdict would be *{before.verdict}* ({stopped}). The third study fixed its "
            "rules before its first trial (its page: `docs/results.md`).")


EARLIER_PAGES = (("results-2026-12-01.md", "configs/study.yaml", "the first study, 2026-12-01"),)


def _with_current_sections(parts: list[str], rows: list[dict], configs: list[MeasuredConfig], cfg,
                           claims: list[rc.Claim], fig_rel: str) -> list[str]:
    """The first study's sections with the second study's inserted: the gates after the costs,
    tokens per parameter after Table 8, Figure 1 on the paper's axes after Figure 1, and what
    did not show and the disagreements with the paper after the scale gap."""
    g0, g1, g2 = sections.g_all(rows, cfg)
    grids = paper_axes.grids(rows, configs)
    subsets = sections.subset_claims(rows, configs)

    def before(header: str, *new: str) -> None:
        i = next(k for k, x in enumerate(parts) if x.startswith(header))
        parts[i:i] = list(new)

    before("## How a verdict is decided", sections.verdict_lines(g0, g1, g2, subsets), "",
           rule_changed_note(configs), "")
    before("## Decision gate (claims 2 and 5)", "## Gates G0, G1, G2: how the grid was sized and which regimes it "
           "reached", "", sections.section_gates(rows, cfg, g0, g1, g2), "")
    before("## Perplexity before and after fine-tuning", "## Claims 1 and 4 where slm-is ran at large budgets "
           "(domain subsets)", "", sections.section_subset_claims(subsets, rows), "",
           "## Importance sampling: where slm-is's resampled text came from", "",
           sections.section_is_provenance(rows), "")
    before("## Figure 1 and amortisation", "## Generic tokens per parameter and epochs", "",
           sections.section_tokens_per_param(rows), "")
    before("## LoRA beside full fine-tuning", "## Figure 1 on the paper's axes: generic x specialisation budget at "
           "the SLM's size (N = 1, 7, 50)", "", sections.section_paper_axes(rows, grids, fig_rel, configs), "")
    before("## Wall time of the study", "## The claims that did not show: what stops each, and what would reach it",
           "", sections.section_shortfall(claims, configs, g1, g2, subsets, sections.limit_for(rows, configs, cfg)), "",
           "## Where our numbers disagree with the paper's, and by how much", "",
           sections.section_against_paper(configs, g1, grids), "")
    phases = [p for p in g0.phases]
    if phases:
        before("## Appendix: every configuration",
               f"The generic phases by the CSV (each phase's own wall time, G0's table): {len(phases)} phases, "
               f"{hms(sum(p.seconds for p in phases))} in all, inside the sweep's time above.", "")
    earlier = "; ".join(f"[{page}]({page}) ({what}, `{recipe}`)" for page, recipe, what in EARLIER_PAGES)
    parts[4:4] = [f"Earlier studies, on their own pages: {earlier}.", ""]
    return parts
