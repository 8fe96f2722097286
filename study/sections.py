"""The sections the second study's page adds to the first's (``page.render_page``, layout
``2026-12-06``): the gates G0-G2, generic tokens per parameter and epochs, Figure 1 on the paper's
axes, what stopped each claim that did not show, and where the numbers disagree with the
paper's. Every number comes from the CSV's rows or the configurations built from them; the
wording of each sentence is chosen by a rule on those numbers.
"""

from __future__ import annotations

import math

import numpy as np

from slmfactory.analysis.measured import MeasuredConfig, pool_seeds
from slmfactory.platform.cost import PAPER
from study import claims as rc
from study import gates as gt
from study import paper_axes as pa
from study.common import hms, limit_sentence, md, section_claims, section_table4
from study.results import budget_value

# The paper's figures (docs/paper.md, /work/shared/PAPER.md) the page compares with.
PAPER_TABLE4 = {"slm_before": 33.0, "slm_1m": 18.2, "nopt_1m": 227.1, "llm_1m": 14.4}
PAPER_TABLE8 = {"slm_generic": 20.5, "mix_generic": 17.1, "pn_generic": 18.9, "slm_1m": 19.3, "mix_1m": 19.8,
                "pn_1m": 18.6}
PAPER_TOKENS_PER_PARAM_100GPUH = 100 / 2.2 * 1e9 / 126e6
FIRST_PLAN = {"slm_params": 0.12e6, "generic_tokens": (3e6, 12e6, 40e6)}
"""The recipe G0 cut (configs/study-v2.yaml's header; commit 'study v2 sized by gate G0')."""
G0_DECISION = ("G0 was taken before the first phase ran, from the dry-run and the first study's log: the first "
               "plan (a 0.12M-parameter SLM at 3M/12M/40M generic tokens, S up to 36M for slm-is) projected 1.50 "
               "cpu-2core hours of training at the bench's rates, and the first study's phases had run several "
               "times below the bench on the shared machine (its slm at 8M tokens: 8.9k tokens/s); with this page, "
               "the demo and the test suite to run in the same 3-hour session, it was cut to a 66k-parameter SLM at "
               "2M/6M/20M generic tokens (still 304 tokens per parameter), slm-is at 1.5M/6M on three domains and "
               "18M on code. The figure above is the rate the cut grid then measured.")


def _f(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


# -- gates --------------------------------------------------------------------------------

def section_gates(rows: list[dict], cfg, g0: gt.G0, g1: gt.G1, g2: gt.G2) -> str:
    out = [pa_md(gt.__doc__), "", "### G0: the throughput a grid is sized by", ""]
    if not g0.phases:
        out.append("No generic phase in the CSV logged its wall time and tokens: G0 cannot be read back.")
    else:
        out += ["| generic phase | params | tokens | wall time | tokens/s |", "|---|---|---|---|---|"]
        out += [f"| {p.strategy}@{p.budget} seed {p.seed} | {p.params:,.0f} | {p.tokens:,.0f} | {hms(p.seconds)} | "
                f"{p.tokens_per_s:,.0f} |" for p in g0.phases]
        out += ["", "Each phase's `generic_wall_seconds` as its trials logged it: a strategy that clusters the generic "
                "corpus (slm-mix, slm-pn) carries its share of the clustering's wall time, and slm-d its teacher's "
                "phase (tokens: student and teacher), so their tokens/s read low; a first phase includes compiling "
                "and starting up.", ""]
        if g0.tokens_per_s is not None:
            first = ", ".join(f"{p.strategy}@{p.budget} seed {p.seed}" for p in g0.first)
            rows_p = sorted(float(t.params) for t in getattr(cfg.device, "throughput", ()) or ())
            clamp = (f", its smallest row's ({rows_p[0]:,.0f} parameters): the profile has no row this small"
                     if rows_p and g0.slm_params < rows_p[0] else "")
            prof = (f"; the recipe's device profile gives {g0.profile_tokens_per_s:,.0f} tokens/s for this size"
                    f"{clamp} (measured / profile = {g0.tokens_per_s / g0.profile_tokens_per_s:.2f})"
                    if g0.profile_tokens_per_s else "")
            plan = sum(FIRST_PLAN["generic_tokens"])
            out.append(f"G0's figure: **{g0.tokens_per_s:,.0f} training tokens/s** for the {g0.slm_params:,.0f}-"
                       f"parameter SLM over its first generic phases ({first}){prof}. At that rate the first plan's "
                       f"slm phases alone ({' + '.join(f'{t / 1e6:g}M' for t in FIRST_PLAN['generic_tokens'])} = "
                       f"{plan / 1e6:g}M tokens, on a {FIRST_PLAN['slm_params'] / 1e6:g}M-parameter SLM that runs "
                       f"no faster) take at least {plan / g0.tokens_per_s / 3600:.2f} h, before the experts' phases, "
                       f"the LLM's and slm-is's per-domain pretraining. {G0_DECISION}")
        out.append(f"\nThe grid as run: {len(g0.phases)} generic phases reading {g0.grid_generic_tokens / 1e6:.1f}M "
                   f"generic tokens, {g0.measured_hours:.2f} h of measured phase wall time.")
    out += ["", "### G1: routed over dense generic perplexity (slm-mix, slm-pn against slm)", ""]
    if not g1.rows:
        out.append("No expert phase with a routed generic perplexity and a matching slm phase: "
                   + "; ".join(f"{s}: {v}" for s, v in g1.verdicts.items()))
    else:
        out += ["| strategy | generic budget | seed | routed generic ppl | slm generic ppl | ratio |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r.strategy} | {r.budget} | {r.seed} | {r.routed:.2f} | {r.dense:.2f} | {r.ratio:.3f} |"
                for r in g1.rows]
        out.append("")
        for s, v in g1.verdicts.items():
            line = f"- {s}: **{v}**"
            if v == gt.BELOW:
                line += " at the largest budget: the experts' capacity pays before fine-tuning; claims 2 and 5 are " \
                        "decided by their comparisons."
            elif v == gt.FALLING:
                b = g1.extrapolated_budget(s)
                reach = (f". A log-log line through seed 0's two ratios reaches 1 at ~{b / 1e6:.3g}M generic "
                         "tokens (two points: an extrapolation, not a prediction)." if b else ".")
                line += (": the regime is not reached at the largest budget; claims 2 and 5 read *regime not "
                         "reached* there" + reach)
            elif v == gt.NOT_FALLING:
                line += ": the ratio does not fall toward 1; claims 2 and 5 are *regime not reached*, said plainly."
            out.append(line)
    out += ["", "### G2: resampled against generic pretraining, before fine-tuning", ""]
    if g2.domain is None or not g2.pairs:
        out.append(f"G2 cannot be read: {g2.verdict}.")
        return "\n".join(out)
    out += [f"Domain **{g2.domain}** (preferred where slm-is ran at large specialisation budgets; its large budgets: "
            f"{', '.join(g2.large)}); in-domain size of slm-is's large budgets; seed 0.", "",
            "| domain | comparison | slm-is spec. budget | slm-is ppl before fine-tuning | slm generic budget | "
            "slm ppl before fine-tuning | slm-is / slm | slm-is's reads per distinct window (passes x draws) |",
            "|---|---|---|---|---|---|---|---|"]
    for d, pairs in [(g2.domain, g2.pairs)] + g2.other_domains:
        out += [f"| {d} | {p.what} budget | {p.is_spec} | {p.is_before:.2f} | {p.slm_generic} | {p.slm_before:.2f} | "
                f"{p.ratio:.3f} | {_f(p.reads_per_window)} ({_f(p.epochs_resampled)} x {_f(p.window_repeats)}) |"
                for p in pairs]
    p = g2.deciding
    share = cfg.strategy.to_tree()["slm-is"]["pretrain_share"]
    why, remedy = why_claim1_cannot(g2) if g2.verdict == gt.DOES_NOT_BEAT else ("", "")
    out.append("")
    if g2.verdict == gt.BEATS:
        out.append(f"Verdict: resampled pretraining **beats** generic pretraining on {g2.domain} ({p.what} budget: "
                   f"{p.is_before:.2f} for slm-is specialised at {p.is_spec}, {share:.0%} of it resampled pretraining, against {p.slm_before:.2f} after "
                   f"{p.slm_generic} generic tokens): claim 1's premise holds before fine-tuning.")
    else:
        out.append(f"Verdict: resampled pretraining **does not beat** generic pretraining on {g2.domain} ({p.what} "
                   f"budget: {p.is_before:.2f} for slm-is specialised at {p.is_spec}, {share:.0%} of it resampled pretraining, against {p.slm_before:.2f} after "
                   f"{p.slm_generic} generic tokens, {p.ratio:.2f}x). Claim 1 cannot show: {why}. "
                   + _cap(remedy) + ".")
    return "\n".join(out)


def why_claim1_cannot(g2: gt.G2) -> tuple[str, str]:
    """(why claim 1 cannot show when G2 fails, what would change it), from G2's numbers."""
    p = g2.deciding
    why = ("slm-is fine-tunes the same in-domain data from a worse start than slm, so its edge would have to come "
           "from fine-tuning alone, which both share")
    reads = p.reads_per_window
    if reads is not None and reads > 1:
        how = (f"{p.epochs_resampled:.2f} passes over a stream drawing each window {p.window_repeats:.2f} times"
               if p.window_repeats else f"{p.epochs_resampled:.2f} passes over its resampled set")
        remedy = (f"its pretraining read each distinct generic window {reads:.2f} times on average ({how}): the "
                  f"generic windows that match {g2.domain}'s histogram hold fewer tokens than its budget, so the "
                  "budget buys repeats, not new text; a larger generic corpus (or a finer match) would give it "
                  "fresh tokens")
    else:
        remedy = ("the resampled text is generic text whose clusters match the domain's histogram; at this scale it "
                  "teaches the SLM less about the domain's test text than the whole generic corpus does; a generic "
                  "corpus holding more of the domain's kind of text would give it closer text to resample")
    return why, remedy


def pa_md(doc: str) -> str:
    return md(doc)


# -- importance sampling's provenance -----------------------------------------------------

def section_is_provenance(rows: list[dict], top: int = 6) -> str:
    """Where slm-is drew its resampled pretraining text: per slm-is row, the shares of its tokens
    by generic source and by collection (the CSV's ``is_shares``, exported from the runs'
    ``is_share/source/*`` and ``is_share/collection/*``), the largest ``top`` of each."""
    got = [r for r in rows if r["strategy"] == "slm-is" and r.get("is_shares")]
    if not got:
        return ("No slm-is row in the CSV carries its resampled shares (the `is_shares` column, exported from the "
                "runs' `is_share/*` metrics): the provenance table is left out.")

    def line(shares: dict[str, float]) -> str:
        items = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{v:.0%} {k}" for k, v in items[:top]) + (
            f", ... (+{len(items) - top} more)" if len(items) > top else "")

    lines = ["Shares of each slm-is trial's resampled pretraining tokens, by the generic source they came from and "
             f"by collection (the largest {top}).", "",
             "| domain | in-domain | spec. budget | settings | by source | by collection |",
             "|---|---|---|---|---|---|"]
    for r in sorted(got, key=lambda r: (r["domain"], r["in_domain_tokens"], budget_value(r["spec_budget"]),
                                        r["settings"])):
        sh = r["is_shares"]
        lines.append(f"| {r['domain']} | {r['in_domain_tokens']:,} | {r['spec_budget']} | {r['settings'] or '-'} | "
                     f"{line(sh.get('source', {}))} | {line(sh.get('collection', {}))} |")
    return "\n".join(lines)


# -- tokens per parameter -----------------------------------------------------------------

def section_tokens_per_param(rows: list[dict]) -> str:
    seen: dict[tuple, dict] = {}
    for r in rows:
        if r["generic_budget"] in ("", "none") or not r.get("spent_generic_tokens") or not r.get("params"):
            continue
        if r["strategy"] == "slm-d":
            continue  # its generic tokens are its student's (slm's row) and its teacher's (llm's row)
        seen.setdefault((r["strategy"], r["generic_budget"], str(r.get("pretrain_seed") or "0")), r)
    lines = [f"Generic tokens per served parameter at each generic budget (the paper's 100 GPUh reference: "
             f"~{PAPER_TOKENS_PER_PARAM_100GPUH:.0f}); epochs: passes over the generic text the phase read "
             "(`epochs_generic`). slm-mix and slm-pn spread the tokens over their experts; slm-d is its student's "
             "slm row and its teacher's llm row.", "",
             "| strategy | generic budget | seed | served params | generic tokens read | tokens per parameter | "
             "epochs |", "|---|---|---|---|---|---|---|"]
    for (s, g, seed), r in sorted(seen.items(), key=lambda kv: (budget_value(kv[0][1]), kv[0][0], kv[0][2])):
        lines.append(f"| {s} | {g} | {seed} | {r['params']:,.0f} | {r['spent_generic_tokens']:,.0f} | "
                     f"{r['spent_generic_tokens'] / r['params']:.1f} | {_f(r.get('epochs_generic'))} |")
    res: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["strategy"] == "slm-is" and r.get("epochs_resampled_pretrain") is not None:
            res.setdefault((r["spec_budget"], r["in_domain_tokens"]), []).append(r)
    if res:
        lines += ["", "slm-is's resampled pretraining (per domain; spent specialisation tokens include it): passes "
                  "over its resampled stream, and draws per distinct window in that stream (resampling draws with "
                  "replacement), min-max over domains:", "",
                  "| spec. budget | in-domain | domains | spec. tokens per parameter | passes | draws per window |",
                  "|---|---|---|---|---|---|"]
        for (s, n), rs in sorted(res.items(), key=lambda kv: (budget_value(kv[0][0]), kv[0][1])):
            ep = [r["epochs_resampled_pretrain"] for r in rs]
            rep = [r["epochs_resampled_window_repeats"] for r in rs if r.get("epochs_resampled_window_repeats")]
            tpp = [r["spent_spec_tokens"] / r["params"] for r in rs if r.get("spent_spec_tokens") and r.get("params")]
            lines.append(f"| {s} | {n:,} | {len(rs)} | {_f(float(np.mean(tpp)) if tpp else None, '.1f')} | "
                         f"{min(ep):.2f}-{max(ep):.2f} | {f'{min(rep):.2f}-{max(rep):.2f}' if rep else '-'} |")
    return "\n".join(lines)


# -- Figure 1 on the paper's axes ---------------------------------------------------------

def section_generic_cost_ratios(configs: list[MeasuredConfig]) -> str:
    """Each generic-phase strategy's generic FLOPs (paper's convention) against slm's at the same
    generic budget: what the grid's placement by tokens leaves out of the x axis."""
    slm = {}
    for c in configs:
        if c.strategy == "slm" and c.has_cost(pa.COST, PAPER):
            slm[c.generic_budget] = min(c.generic(pa.COST, PAPER), slm.get(c.generic_budget, math.inf))
    seen: dict[tuple, float] = {}
    cap = rc.small_params(configs) or 0
    for c in configs:
        if c.strategy not in pa.NO_GENERIC and c.strategy != "slm" and c.generic_budget in slm and c.params <= cap \
                and c.has_cost(pa.COST, PAPER):
            seen.setdefault((c.strategy, c.generic_budget), c.generic(pa.COST, PAPER))
    if not seen:
        return ""
    cells = "; ".join(f"{s} at {g}: {v / slm[g]:.2f}x" for (s, g), v in
                      sorted(seen.items(), key=lambda kv: (kv[0][0], budget_value(kv[0][1]))))
    return (f"Generic FLOPs against slm's at the same generic budget (paper's convention): {cells}. A strategy "
            "whose ratio is above 1 paid more than the column's c_generic(G) for its place in it.")


def section_paper_axes(rows: list[dict], all_grids, fig_rel: str, configs: list[MeasuredConfig] = ()) -> str:
    out = [pa_md(pa.__doc__), ""]
    ratios = section_generic_cost_ratios(list(configs))
    if ratios:
        out += [ratios, ""]
    for sub, n, gs in all_grids:
        where = (f"all {len(gs[0].domains)} domains" if sub is None else
                 f"the {len(sub)} domain(s) {', '.join(sub)} only (configurations measured on them; macro perplexity "
                 "over them)")
        out += [f"### In-domain {n:,} tokens, {where}", "",
                f"![paper axes n{n} {'all' if sub is None else '-'.join(sub)}]({fig_rel}/{pa.figure_name(sub, n)})",
                ""]
        for g in gs:
            wins = ", ".join(f"{s} {k}" for s, k in pa.winners(g).items()) or "none"
            out += [f"N = {g.n_domains} (cells won: {wins}):", "", pa.table(g), ""]
    left = [(lab, ds) for lab, ds in _incomplete(rows)]
    if left:
        out.append("Each cell: the winner (**bold**; `sS'` when slm-is/slm-nopt enter with a larger specialisation "
                   "budget S' that fits the cell's per-domain budget) with its macro perplexity, and the next "
                   "strategy (*tie* when their 95% intervals overlap). Configurations measured on fewer domains "
                   "than a grid's are not in it: "
                   + "; ".join(f"{lab} ({', '.join(ds)})" for lab, ds in left) + ".")
    return "\n".join(out)


def _incomplete(rows: list[dict]) -> list[tuple[str, list[str]]]:
    from study.results import incomplete_groups

    return incomplete_groups(rows)


def draw_paper_axes(all_grids, fig_dir) -> list:
    paths = []
    for sub, n, gs in all_grids:
        title = (f"Winner per (generic budget, specialisation budget) at the SLM's size, in-domain {n:,} tokens, "
                 f"{'all domains' if sub is None else ', '.join(sub)}; paper's costs, C_generic / N per domain")
        paths.append(pa.draw(gs, fig_dir / pa.figure_name(sub, n), title))
    return paths


# -- what did not show, and where we disagree with the paper -------------------------------

def _slm_tpp(configs: list[MeasuredConfig], budget: str | None) -> float | None:
    c = next((c for c in configs if c.strategy == "slm" and c.generic_budget == budget and c.spent_generic), None)
    return c.spent_generic / c.params if c else None


def subset_claims(rows: list[dict], configs: list[MeasuredConfig]) -> list[tuple[tuple[str, ...], list[rc.Claim]]]:
    """Claims 1 and 4 on each domain subset where slm-is ran at a specialisation budget measured
    on that subset only (the full-domain claims cannot see it): the same rules, on the
    configurations measured on every domain of the subset, macro perplexity over it."""
    full = {(c.strategy, c.spec_budget, c.in_domain) for c in configs}
    out = []
    for sub in pa.domain_subsets(rows):
        sub_configs = pa.subset_configs(rows, sub)
        if not any(c.strategy == "slm-is" and (c.strategy, c.spec_budget, c.in_domain) not in full
                   for c in sub_configs):
            continue
        pooled = pool_seeds(sub_configs)
        out.append((sub, [rc.claim_is_best_small(pooled, generic_scale=True), rc.claim_is_loses_with_n(pooled)]))
    return out


def section_subset_claims(subsets: list[tuple[tuple[str, ...], list[rc.Claim]]], rows: list[dict] = ()) -> str:
    if not subsets:
        return ("slm-is ran at no specialisation budget measured on a subset of the domains only: claims 1 and 4 "
                "above see all of its configurations.")
    out = ["The verdict table and *Claims in detail* use the configurations measured on every domain; slm-is's "
           "large specialisation budgets ran on a subset of the domains, so claims 1 and 4 are decided again on each "
           "subset, by the same rules, among the configurations measured on all of its domains (macro perplexity "
           "over those domains only).", ""]
    for sub, claims in subsets:
        out += [f"### On {', '.join(sub)}", "",
                "| # | claim | verdict | the two deciding numbers |", "|---|---|---|---|"]
        out += [f"| {c.number} | {c.statement} | **{c.verdict}** | {' vs '.join(c.numbers) or '-'} |" for c in claims]
        out += ["", section_claims(claims).replace("### Claim", "#### Claim")]
        if rows:
            out += [f"#### Table 4 on {', '.join(sub)}", "",
                    "Each cell: macro ppl over these domains before fine-tuning → after [95% interval].", "",
                    section_table4(pa.subset_configs(list(rows), sub)), ""]
    return "\n".join(out)


def regime_text(configs: list[MeasuredConfig], g1: gt.G1, cfg) -> str:
    """What stops a claim whose gate did not pass, from the numbers: the SLM's generic tokens
    per parameter against the paper's 100-GPUh reference, and (when that is not far off) the
    experts' share of them and their routed / dense ratio at the largest budget."""
    tpp = max((c.spent_generic / c.params for c in configs if c.strategy == "slm" and c.spent_generic), default=None)
    if tpp is None:
        return "the SLM's generic tokens per parameter are not in the CSV; see the gates."
    ref = PAPER_TOKENS_PER_PARAM_100GPUH
    text = (f"the largest generic budget gives {tpp:.0f} generic tokens per SLM parameter, {tpp / ref:.2f} of the "
            f"paper's 100-GPUh reference (~{ref:.0f}); ")
    if tpp / ref < 0.5:
        return text + ("far below it: more generic tokens per parameter (a larger generic corpus, or a smaller SLM) "
                       "would approach the regime.")
    k = (cfg.strategy.to_tree().get("slm-mix", {}) or {}).get("experts")
    top = [r.ratio for r in g1.rows if g1.budgets and r.budget == g1.budgets[-1]]
    text += "near it, so the SLM's tokens per parameter are not what stops the experts here"
    if k:
        text += (f": each of the {k} experts reads about 1/{k} of the generic tokens (~{tpp / k:.0f} per parameter; "
                 f"the paper's 16 experts at 100 GPUh read ~{ref / 16:.0f} each)")
    if top:
        text += f", and their routed generic perplexity is still {min(top):.2f}-{max(top):.2f}x slm's (G1)"
    return text + "."


def limit_for(rows: list[dict], configs: list[MeasuredConfig], cfg):
    """``page.limit_sentence`` with the regime sentence computed from this study's numbers."""
    g1 = gt.gate_g1(rows)

    top_is = max((budget_value(c.spec_budget) for c in configs if c.strategy == "slm-is"), default=None)

    def limit(verdict: str) -> str:
        if "regime not reached" in verdict:
            return regime_text(configs, g1, cfg)
        if "not the cheapest" in verdict and top_is is not None:
            # On every domain slm-is ran only at its small budgets; its large ones are on subsets.
            return (f"at the specialisation budgets slm-is ran on every domain (at most {top_is:.3g} tokens, of "
                    "which its resampled pretraining is a share) another small model reaches its perplexity for "
                    "less, so there is no edge to lose there; where it ran at budgets of generic scale (the "
                    "domain-subset sections) it has the edge at N = 1.")
        return limit_sentence(verdict)

    return limit


def verdict_lines(g0: gt.G0, g1: gt.G1, g2: gt.G2, subsets) -> str:
    """The gates' verdicts and the subset claims' in a few lines under the verdict table."""
    out = ["Gates (section *Gates G0, G1, G2*): "
           + "; ".join([f"G0 {g0.tokens_per_s:,.0f} training tokens/s" if g0.tokens_per_s else "G0 not readable"]
                       + [f"G1 {s}: {v}" for s, v in g1.verdicts.items()]
                       + [f"G2 ({g2.domain or '-'}): resampled pretraining {g2.verdict}"
                          + (" generic pretraining" if g2.verdict in (gt.BEATS, gt.DOES_NOT_BEAT) else "")]) + "."]
    for sub, claims in subsets:
        out.append(f"On {', '.join(sub)} only, where slm-is ran at its large budgets (section *Claims 1 and 4 where "
                   "slm-is ran at large budgets*): " + "; ".join(f"claim {c.number} **{c.verdict}**" for c in claims)
                   + ".")
    return "\n\n".join(out)


def section_shortfall(claims: list[rc.Claim], configs: list[MeasuredConfig], g1: gt.G1, g2: gt.G2,
                      subsets: list[tuple[tuple[str, ...], list[rc.Claim]]] = (), limit=None) -> str:
    limit = limit or limit_sentence
    out = []
    for c in claims:
        if c.verdict == rc.CONFIRMED:
            continue
        numbers = " vs ".join(c.numbers) or "no deciding cells"
        part = next((p for p in c.parts if p.verdict == c.verdict.split(" ")[0]), c.parts[0] if c.parts else None)
        why = f" ({part.reason}{'; comparison alone: ' + part.raw if part and part.raw else ''})" if part else ""
        text = f"**Claim {c.number} ({c.verdict}).** Stopped by: {numbers}{why}. "
        for sub, sub_claims in subsets:
            sc = next((x for x in sub_claims if x.number == c.number), None)
            if sc is not None:
                text += (f"On {', '.join(sub)} (slm-is at its large budgets): {sc.verdict}"
                         + (f", {' vs '.join(sc.numbers)}" if sc.numbers else "") + ". ")
        if c.number in (1, 4) and g2.deciding is not None:
            p = g2.deciding
            text += (f"G2 on {g2.domain}: slm-is starts fine-tuning at {p.is_before:.2f} (specialised at {p.is_spec}, "
                     f"part of it resampled pretraining), slm at {p.slm_before:.2f} after {p.slm_generic} generic tokens ({p.ratio:.2f}x). ")
            if g2.verdict == gt.DOES_NOT_BEAT:
                why, remedy = why_claim1_cannot(g2)
                text += (f"What would reach it: resampled pretraining that starts below generic pretraining at equal "
                         f"tokens ({why}). {_cap(remedy)}.")
            elif any(x.number == c.number and x.verdict == rc.CONFIRMED for _, xs in subsets for x in xs):
                held = [", ".join(sub) for sub, xs in subsets
                        if any(x.number == c.number and x.verdict == rc.CONFIRMED for x in xs)]
                text += ("What would reach it on every domain: resampled pretraining already starts lower (G2), and "
                         f"where slm-is ran at specialisation budgets of generic scale ({'; '.join(held)}) the claim "
                         "is confirmed; this grid gave those budgets to a subset of the domains only (the recipe's "
                         "header says why), so on all six slm-is has only its small budgets.")
            else:
                text += "What would reach it: resampled pretraining already starts lower (G2); " + limit(c.verdict)
        elif c.number in (2, 5) and g1.rows:
            top = g1.budgets[-1]
            ratios = ", ".join(f"{r.strategy} seed {r.seed} {r.ratio:.2f}" for r in g1.rows if r.budget == top)
            tpp = _slm_tpp(configs, top)
            text += (f"G1 at {top} ({_f(tpp, '.0f')} generic tokens per SLM parameter): routed / dense generic ppl "
                     f"{ratios}. ")
            extra = [f"{s} at ~{b / 1e6:.3g}M generic tokens ({b / _params(configs):.0f} per parameter)"
                     for s in g1.verdicts if (b := g1.extrapolated_budget(s))]
            if c.verdict == rc.REFUTED and all(r.ratio < 1 for r in g1.rows if r.budget == top):
                # The regime was reached (G1 below 1) and the experts still lose after fine-tuning.
                text += ("What stops it is not the regime: before fine-tuning the experts' routed generic perplexity "
                         "is below slm's (G1), and after fine-tuning the one expert a domain gets, pretrained on "
                         "its cluster's share of the generic tokens, is behind slm. The paper's Table 8 has the "
                         "same sign for slm-mix after fine-tuning (see *Where our numbers disagree*); a win would "
                         "need the routed advantage to survive fine-tuning on the domain.")
            else:
                text += "What would reach it: " + (
                    "a routed / dense ratio below 1, which a log-log line through seed 0's two ratios puts at "
                    + "; ".join(extra) + ". " if extra else "") + _cap(limit(c.verdict))
        else:
            text += "What would reach it: " + limit(c.verdict)
        out.append(text)
    return "\n\n".join(out) if out else "Every claim showed (confirmed)."


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _params(configs: list[MeasuredConfig]) -> float:
    return float(rc.small_params(configs) or 1)


def _gmean(values: dict[str, float]) -> float:
    return math.exp(float(np.mean(np.log(list(values.values())))))


def against_paper(configs: list[MeasuredConfig], g1: gt.G1, all_grids) -> list[tuple[str, float, float | None, str]]:
    """(quantity, the paper's figure, ours or None, the cells ours is read from)."""
    pooled = pool_seeds(configs)
    if not pooled:
        return []
    n0 = rc.sizes(pooled)[0]
    at = [c for c in pooled if c.in_domain == n0]
    s0 = rc.spec_budgets(at)[0] if at else None
    top = rc.generic_budgets(at)[-1] if rc.generic_budgets(at) else None

    def one(strategy, g=None, s=s0):
        return rc.best([c for c in at if c.strategy == strategy and c.spec_budget == s
                        and (g is None or c.generic_budget == g)])

    slm, nopt, llm = one("slm", top), one("slm-nopt"), one("llm")
    out = []
    where = f"n{n0:,}, s{s0}"
    P4, P8 = PAPER_TABLE4, PAPER_TABLE8
    if slm:
        if nopt:
            out.append(("Table 4: slm-nopt / slm after fine-tuning (paper: 1M tokens)", P4["nopt_1m"] / P4["slm_1m"],
                        nopt.ppl_macro / slm.ppl_macro, f"{where}, slm g{top}"))
        if llm:
            out.append(("Table 4: llm / slm after fine-tuning", P4["llm_1m"] / P4["slm_1m"],
                        llm.ppl_macro / slm.ppl_macro, f"{where}, llm g{llm.generic_budget}, slm g{top}"))
        if set(slm.ppl_before) == set(slm.nll):
            out.append(("Table 4: slm after / before fine-tuning", P4["slm_1m"] / P4["slm_before"],
                        slm.ppl_macro / _gmean(slm.ppl_before), f"{where}, g{top}"))
    for r_key, strategy in (("mix", "slm-mix"), ("pn", "slm-pn")):
        rows = [r for r in g1.rows if r.strategy == strategy and g1.budgets and r.budget == g1.budgets[-1]]
        if rows:
            out.append((f"Table 8: {strategy} routed / slm generic ppl (paper: 100 GPUh)",
                        P8[f"{r_key}_generic"] / P8["slm_generic"], float(np.mean([r.ratio for r in rows])),
                        f"g{g1.budgets[-1]}, mean over {len(rows)} seed(s)"))
        x = one(strategy, top)
        if x and slm:
            out.append((f"Table 8: {strategy} / slm after fine-tuning (paper: 100 GPUh, 1M tokens)",
                        P8[f"{r_key}_1m"] / P8["slm_1m"], x.ppl_macro / slm.ppl_macro, f"{where}, g{top}"))
    return out


def section_against_paper(configs: list[MeasuredConfig], g1: gt.G1, all_grids) -> str:
    rows = against_paper(configs, g1, all_grids)
    lines = ["Ratios, so that scale drops out: the paper's from its Tables 4 and 8 (docs/paper.md), ours from the "
             "configurations named (seeds pooled). *Same side*: both ratios on the same side of 1 (the same "
             "strategy wins); *ours / paper*: how far our ratio is from the paper's.", "",
             "| quantity | paper | ours | ours / paper | same side of 1 | read from |", "|---|---|---|---|---|---|"]
    for q, paper, ours, where in rows:
        same = "-" if ours is None else ("yes" if (paper - 1) * (ours - 1) > 0 else "**no**")
        lines.append(f"| {q} | {paper:.3f} | {_f(ours, '.3f')} | {_f(None if ours is None else ours / paper, '.2f')} "
                     f"| {same} | {where} |")
    lines += ["", "Figure 1 (the paper: at a small inference budget, importance sampling wins where the specialisation "
              "budget is large, projected networks / mixtures where both budgets are small). Ours, at N = 1 on the "
              "paper's axes, largest generic budget:", ""]
    for sub, n, gs in all_grids:
        g = gs[0]
        if not g.generics or not g.specs:
            continue
        top = g.generics[-1]
        small, large = g.cells[(top, g.specs[0])], g.cells[(top, g.specs[-1])]
        if small.best is None and large.best is None:
            continue
        scope = "all domains" if sub is None else ", ".join(sub)
        lines.append(f"- n{n:,}, {scope}: smallest S ({g.specs[0]}): {pa.cell_text(small)}; largest S "
                     f"({g.specs[-1]}): {pa.cell_text(large)}. "
                     + _figure1_agreement(small, large))
    return "\n".join(lines)


def _figure1_agreement(small: pa.AxesCell, large: pa.AxesCell) -> str:
    parts = []
    if small.best is not None:
        ok = small.best.strategy in ("slm-mix", "slm-pn")
        parts.append("small S " + ("agrees (an expert strategy wins)" if ok else
                                   f"disagrees ({small.best.strategy} wins, the paper has slm-pn / slm-mix)"))
    if large.best is not None:
        ok = large.best.strategy == "slm-is"
        parts.append("large S " + ("agrees (slm-is wins)" if ok else
                                   f"disagrees ({large.best.strategy} wins, the paper has slm-is)"))
    return "; ".join(parts) + "."


def g_all(rows: list[dict], cfg) -> tuple[gt.G0, gt.G1, gt.G2]:
    return gt.gate_g0(rows, cfg), gt.gate_g1(rows), gt.gate_g2(rows)

