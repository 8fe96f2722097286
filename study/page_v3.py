"""Study v3's two pages, from its CSV and the runs' per-sequence NLLs alone:

- ``docs/results.md``: five sentences, the verdict table (one word and a short reason per
  claim and domain subset), a glossary, Figure 1 on the paper's axes, the fine-tuning numbers,
  the rules and the commit that fixed them; read in five minutes;
- ``docs/study-v3-log.md`` (the study log, beside it): the gates, the wall time per stage, every
  paired comparison with its sequences and seeds, the learning rates chosen on validation,
  every configuration with its unpaired interval, and the paper-axes grids as tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from study import gates as gt
from study import paper_axes as pa
from study import rules_v3 as rules
from study import verdicts_v3 as vd
from study.results import budget_value, configs_from_rows, selected_rows
from study.common import hms

LOCK = Path(__file__).with_name("rules_v3.lock")
PAPER_FINETUNE_RATIO = 0.55
"""The paper's slm test perplexity after / before fine-tuning (docs/paper.md, Table 4's 1M setting)."""
V2_FINETUNE_RATIO = 0.81
COLUMNS = tuple(rules.SUBSETS)
STRATEGY_LINES = (
    ("slm", "small model pretrained on generic text (G tokens), then fine-tuned on the domain"),
    ("slm-nopt", "the same small model trained on the domain's text only"),
    ("slm-is", "a fresh small model pretrained on generic text resampled to look like the domain, then fine-tuned"),
    ("slm-mix", "hard mixture: one small model per generic cluster; the domain's expert is fine-tuned"),
    ("slm-pn", "projected network: experts share weights; the domain's expert is instantiated and fine-tuned"),
    ("slm-d", "small model distilled from the fine-tuned large model"),
    ("llm", "the large model (5x the small one's parameters), pretrained and fine-tuned"),
)


def rules_fixed() -> dict[str, str]:
    """``commit`` and ``date`` from ``study/rules_v3.lock``."""
    out = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#") and ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def rebuild_command(config_label: str, csv_label: str) -> str:
    return f"python scripts/study_page.py -c {config_label} --from-csv {csv_label}"


def log_name(cfg) -> str:
    return f"{cfg.name}-log.md"


def bar_of(configs) -> tuple[float | None, str]:
    """The figures' bar: the macro perplexity, before any fine-tuning, of slm at its smallest
    generic budget (a generic model with no specialisation at all)."""
    slm = [c for c in configs if c.strategy == "slm" and c.ppl_before and len(c.ppl_before) == len(c.nll)]
    if not slm:
        return None, ""
    c = min(slm, key=lambda c: (budget_value(c.generic_budget), c.label))
    ppl = math.exp(sum(math.log(v) for v in c.ppl_before.values()) / len(c.ppl_before))
    return ppl, f"the generic slm g{pa.short_budget(c.generic_budget)} before fine-tuning"


def _grids(rows, configs):
    """Figure 1's grids: all six domains, then the three generic covers."""
    out = [("all six domains", None, [pa.paper_axes_grid(configs, n, k) for k in (1, 7, 50)])
           for n in sorted({c.in_domain for c in configs})]
    cov = pa.subset_configs(rows, rules.COVERED)
    out += [("the three generic covers", rules.COVERED, [pa.paper_axes_grid(cov, n, k) for k in (1, 7, 50)])
            for n in sorted({c.in_domain for c in cov})]
    return [g for g in out if g[2][0].generics and g[2][0].specs]


def figure_name(sub, n: int) -> str:
    return pa.figure_name(sub, n)


def draw_figures(rows: list[dict], fig_dir: Path) -> list[Path]:
    sel = selected_rows(rows)
    configs = configs_from_rows(sel)
    bar, bar_text = bar_of(configs)
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for what, sub, gs in _grids(sel, configs):
        title = (f"Study v3: the best small model per (generic budget G, specialisation budget S), {what}; "
                 "per-domain cost C_spec + C_generic / N (paper's convention)")
        out.append(pa.draw(gs, fig_dir / figure_name(sub, gs[0].in_domain), title, bar=bar, bar_text=bar_text))
    return out


def _sentences(verdicts: list[vd.Verdict], effect: dict[str, Any], n_trials: int, n_domains: int, cfg) -> list[str]:
    by = {v.rule.claim: v.cells for v in verdicts}

    def w(claim: str, subset: str = "all six") -> str:
        cell = by.get(claim, {}).get(subset)
        return cell.word if cell else vd.MISSING

    c1 = (f"Importance-sampled pretraining (slm-is) at a large specialisation budget is {w('1', 'the three generic covers')} "
          f"as the best small model on the three domains generic text covers, {w('1')} on all six, and "
          f"{w('1', 'negative controls')} on the three negative controls, where it was expected not to win.")
    experts = (f"Mixtures of experts after fine-tuning: the hard mixture's claim is {w('2 mix')}, the projected "
               f"network's {w('2 pn')}; generic pretraining beating domain-only training is {w('6')}, and "
               f"distillation losing once its teacher is paid for is {w('3')}.")
    ratio = effect["slm_ratio"]
    ft = (f"Fine-tuning now keeps the starting model when nothing beats it on validation: slm's perplexity after "
          f"fine-tuning is {ratio:.2f}x its perplexity before (the paper: {PAPER_FINETUNE_RATIO}; our previous study: "
          f"{V2_FINETUNE_RATIO})." if ratio else "No slm run recorded its perplexity before fine-tuning.")
    return [f"This study asks which way of spending a training budget gives the best small model for each of "
            f"{n_domains} domains, with a {effect['slm_params']:,}-parameter model trained on a 2-core CPU.",
            f"It ran {n_trials} trials in which every strategy that fine-tunes had the same specialisation budgets, and "
            "each verdict compares two models on the same test sequences (a paired test), by rules fixed before "
            "the first trial.",
            c1, experts, ft]


def verdict_table(verdicts: list[vd.Verdict]) -> list[str]:
    out = ["| claim | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for v in verdicts:
        cells = [v.cells[c].text() if c in v.cells else "not tested" for c in COLUMNS]
        out.append(f"| {v.rule.claim}: {v.rule.statement} | " + " | ".join(cells) + " |")
    return out


def render_pages(rows: list[dict], seq: dict, cfg, csv_label: str, config_label: str,
                 stages: dict[str, Any] | None, fig_rel: str) -> tuple[str, str]:
    """(docs/results.md, the study log page) from the CSV rows and per-sequence NLLs."""
    sel = selected_rows(rows)
    configs = configs_from_rows(sel)
    tokens = cfg.data.seq_len - 1
    verdicts = vd.decide(sel, seq, tokens)
    effect = vd.finetune_effect(sel)
    slm_params = next((int(r["params"]) for r in sel if r["strategy"] == "slm"), 0)
    effect["slm_params"] = slm_params
    domains = sorted({r["domain"] for r in rows})
    fixed = rules_fixed()
    changed = [f"- claim {c}, changed {d}: {why}" for c, d, why in rules.CHANGED] or ["- none"]
    log = log_name(cfg)
    bar, bar_text = bar_of(configs)
    figs = _grids(sel, configs)
    page = [f"# What the third study found ({config_label}, {_date(rows)})", "",
            f"> **Generated — do not edit.** `{rebuild_command(config_label, csv_label)}` rebuilds this page, "
            f"[{log}]({log}) and the figures (`{fig_rel}/*.png`) from `{csv_label}` and the runs' per-sequence test "
            f"NLLs beside it ({len(rows)} trial runs, {len(domains)} domains).", ""]
    page += _sentences(verdicts, effect, len(rows), len(domains), cfg) + [""]
    page += ["## Verdicts", "",
             "Each cell: the verdict, then the paired perplexity ratio (first model over the rival) with its 95% "
             "interval. *better*/*worse*: the interval excludes 1; otherwise a tie.", ""]
    page += verdict_table(verdicts) + [""]
    page += [f"The rules were fixed in commit `{fixed.get('commit', '?')[:10]}` on {fixed.get('date', '?')[:10]}, "
             f"before the first trial (`study/rules_v3.py`, the recipe's header). Rules changed after the data:"]
    page += changed + [""]
    page += ["## Glossary", ""]
    page += [f"- **{s}**: {t}." for s, t in STRATEGY_LINES]
    page += ["- **G**: generic pretraining tokens, paid once and shared by every domain. **S**: specialisation "
             "tokens per domain, a budget; fine-tuning stops early when validation stops improving, and a run is "
             "charged what it spent.",
             "- **N**: the number of domains sharing one generic model; at N = 50 each domain carries a fiftieth of G.",
             "- **Paired test**: both models scored on the same test sequences; the interval is of their difference.",
             "- **Best run** / **learning rate**: chosen per domain on the validation split, never on test.",
             "- **Negative controls**: legal, biomedical, dictionary: generic text holds nothing of their kind.",
             "- **Gate**: a check that the grid reached the regime a claim needs (the study log).", ""]
    page += ["## Figure 1 on the paper's axes", ""]
    for what, sub, gs in figs:
        page += [f"![Figure 1, {what}]({fig_rel}/{figure_name(sub, gs[0].in_domain)})", ""]
    if bar is not None:
        page += [f"One colour per strategy in every figure. A cell is blank when its winner is not better than "
                 f"{bar_text} (macro perplexity {bar:.1f}): no strategy earned it. The paper's axes price S as "
                 f"the budget; the study log's tables price what was spent.", ""]
    page += ["## Fine-tuning", ""]
    if effect["slm_ratio"]:
        page.append(f"- slm after / before fine-tuning: **{effect['slm_ratio']:.2f}** (geometric mean over "
                    f"{effect['slm_runs']} runs; {effect['slm_worse_after']} worse after). The paper: "
                    f"{PAPER_FINETUNE_RATIO}; study v2: {V2_FINETUNE_RATIO}.")
    kept = ", ".join(f"{s} {k}/{n}" for s, (k, n) in sorted(effect["kept_start"].items()))
    page.append(f"- Fine-tunes that kept their starting weights (best step 0): {kept or 'none recorded'}.")
    page.append("- Learning rates chosen on validation: " + _lr_summary(sel) + ".")
    page += ["", "## Read more", "",
             f"- [{log}]({log}): gates, wall time, every paired comparison, every configuration.",
             "- [results-2026-12-06.md](results-2026-12-06.md): study v2, whose grid decided three of its verdicts; "
             "[results-2026-12-01.md](results-2026-12-01.md): the first study.", ""]
    return "\n".join(page), _log_page(rows, sel, configs, verdicts, cfg, stages, figs, config_label, csv_label)


def _date(rows: list[dict]) -> str:
    from datetime import datetime, timezone

    ends = [r["end_ms"] for r in rows if r.get("end_ms")]
    return datetime.fromtimestamp(max(ends) / 1000, timezone.utc).strftime("%Y-%m-%d") if ends else "not run"


def _lr_summary(sel: list[dict]) -> str:
    """Per configuration that ran more than one learning rate: how many domains chose each."""
    counts: dict[str, dict[str, int]] = {}
    for r in sel:
        if r.get("selected"):
            lr = r["selected"].split("=", 1)[1]
            g = "" if r["generic_budget"] == "none" else f" g{pa.short_budget(r['generic_budget'])}"
            key = f"{r['strategy']}{g} s{pa.short_budget(r['spec_budget'])} {r['settings']}".strip()
            counts.setdefault(key, {}).setdefault(lr, 0)
            counts[key][lr] += 1
    return "; ".join(f"{k}: " + ", ".join(f"{lr} x{n}" for lr, n in sorted(v.items(), key=lambda kv: float(kv[0])))
                     for k, v in sorted(counts.items())) or "no grid ran"


def g1_rows(rows: list[dict]) -> list[tuple[str, str, str, float, float]]:
    """(expert strategy, generic budget, seed, its routed generic ppl, slm's generic ppl there)."""
    dense = {(r["generic_budget"], vd.seed_of(r)): r["generic_ppl"] for r in rows
             if r["strategy"] == "slm" and r.get("generic_ppl")}
    seen = {}
    for r in rows:
        key = (r["strategy"], r["generic_budget"], vd.seed_of(r))
        if r["strategy"] in ("slm-mix", "slm-pn") and r.get("generic_ppl") and (key[1], key[2]) in dense:
            seen.setdefault(key, (r["generic_ppl"], dense[(key[1], key[2])]))
    return [(*k, *v) for k, v in sorted(seen.items())]


def _log_page(rows, sel, configs, verdicts, cfg, stages, figs, config_label, csv_label) -> str:
    out = [f"# Study v3's log ({config_label})", "",
           f"> **Generated — do not edit**, with [results.md](results.md) by "
           f"`{rebuild_command(config_label, csv_label)}`.", "",
           "## Wall time per stage", ""]
    if stages:
        out += ["| stage | wall time |", "|---|---|"]
        out += [f"| {s['stage']} | {hms(s['seconds'])} |" for s in stages["stages"]]
        out += ["", f"Total {hms(stages['total_seconds'])}; {stages.get('trials_finished_lines', 0)} trials finished, "
                f"{stages.get('trials_failed_lines', 0)} failed, {stages.get('sweep_attempts', 1)} sweep start(s).", ""]
    else:
        out += ["No log was parsed for this CSV.", ""]
    g0 = gt.gate_g0(rows, cfg)
    out += ["## G0: throughput", "", "| generic phase | params | tokens | wall time | tokens/s |", "|---|---|---|---|---|"]
    out += [f"| {p.strategy} g{pa.short_budget(p.budget)} seed {p.seed} | {p.params:,.0f} | {p.tokens:,.0f} | "
            f"{hms(p.seconds)} | {p.tokens_per_s:,.0f} |" for p in g0.phases]
    if g0.tokens_per_s and g0.profile_tokens_per_s:
        out += ["", f"The SLM's first phases: {g0.tokens_per_s:,.0f} tokens/s on this study's machine (a 2-core AMD "
                f"EPYC with AVX-512 and avx512_bf16, where `auto` ran this 32-wide model in fp32; the 6M phases partly "
                f"beside other work, one torch thread after the log's restart); the recipe's device profile (v2's "
                f"2-core Xeon) gives "
                f"{g0.profile_tokens_per_s:,.0f} (measured / profile {g0.tokens_per_s / g0.profile_tokens_per_s:.2f})."]
    out += ["", "## G1: the experts' regime (routed over dense generic perplexity)", "",
            "| strategy | G | seed | routed generic ppl | slm generic ppl | ratio |", "|---|---|---|---|---|---|"]
    out += [f"| {s} | {pa.short_budget(g)} | {seed} | {routed:.2f} | {dense:.2f} | {routed / dense:.3f} |"
            for s, g, seed, routed, dense in g1_rows(rows)]
    out += ["", "Below 1: the experts' routed capacity pays before fine-tuning. Study v2 measured 1.11 (mix) and "
            "1.01 (pn) at 6M and 0.86-0.93 at 20M.", ""]
    out += ["## Every paired comparison", "",
            "| claim | subset | A | B | A ppl | B ppl | A / B paired [95%] | sequences | seeds paired |",
            "|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        for subset, cell in v.cells.items():
            for c in cell.comparisons:
                if c.diff is None:
                    out.append(f"| {v.rule.claim} | {subset} | {c.a.label} | {c.b.label} | - | - | {c.missing} missing | - | - |")
                    continue
                d = c.diff
                out.append(f"| {v.rule.claim} | {subset} | {c.a.label} | {c.b.label} | {c.a_ppl:.2f} | {c.b_ppl:.2f} | "
                           f"{d.ratio:.3f} [{math.exp(d.lo):.3f}, {math.exp(d.hi):.3f}] | {d.sequences:,} | "
                           f"{d.seeds or 'averaged'} |")
    out += ["", "Claim 5 (entropy) per domain: " + "; ".join(
        f"{k}: " + ", ".join(f"{d} H={e:.2f} gain {g:+.3f}" for d, e, g in (vd.entropy_gains(sel, p, rules.ALL_SIX) or []))
        for k, p in vd.EXPERT.items()) + ".", ""]
    out += ["## Learning rates chosen on validation", "", _lr_summary(sel) + ".", ""]
    out += ["## Every configuration (unpaired 95% intervals, for display)", "",
            "| strategy | G | S | seeds | macro ppl [95%] | spent S tokens | best step 0 |", "|---|---|---|---|---|---|---|"]
    kept = {}
    for r in sel:
        key = (r["strategy"], r["generic_budget"], r["spec_budget"], r["settings"])
        k, n = kept.get(key, (0, 0))
        kept[key] = (k + int(r.get("finetune_best_step") == 0), n + 1)
    for c in sorted(configs, key=lambda c: (c.strategy, budget_value(c.generic_budget), budget_value(c.spec_budget),
                                            c.settings)):
        iv = c.interval
        k, n = kept.get((c.strategy, c.generic_budget, c.spec_budget, c.settings), (0, 0))
        out.append(f"| {c.strategy} | {pa.short_budget(c.generic_budget)} | {pa.short_budget(c.spec_budget)} | "
                   f"{c.settings or '-'} | {c.ppl_macro:.2f}" + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "")
                   + f" | {c.spent_spec or 0:,.0f} | {k}/{n} |")
    out += ["", "## Figure 1's grids as tables", ""]
    for what, sub, gs in figs:
        for g in gs:
            out += [f"{what}, N = {g.n_domains}:", "", pa.table(g), ""]
    return "\n".join(out)
