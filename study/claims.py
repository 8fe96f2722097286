"""The paper's claims, each decided from measured configurations by an explicit rule.

Every claim is split into *parts* (one comparison each: an in-domain size, a strategy, a
number of domains, ...). A part compares macro perplexities through their 95% intervals
(``frontier.MeasuredConfig.interval``: exp(macro NLL ± 1.96 SE)) with :func:`compare`:

- A is *better* than B only when A's whole interval lies below B's (upper A < lower B);
  *worse* when it lies above; otherwise the intervals overlap and the part is
  **inconclusive** (a configuration without an interval makes its part inconclusive too).
- A part whose cells were not measured is *inconclusive (cells missing: ...)*.

A claim's verdict combines its parts (:func:`combine`): **confirmed** when at least one part
is confirmed and none refuted; **refuted** when at least one is refuted and none confirmed;
*inconclusive (mixed)* when parts disagree; otherwise inconclusive, with the parts' reasons.

Costs are read under the paper's convention (``platform.cost``: embedding the generic corpus
is nobody's cost, as the paper sets C_generic(slm-is) = 0); the measured convention is shown
beside in each claim's notes.

Seeds: a configuration run with two or more seeds is one configuration here
(``frontier.pool_seeds``) whose interval is the union of its seeds' intervals, so a verdict
holds for every seed's interval; a verdict whose deciding configurations ran on one seed says
so (*one seed*).

Claims 2 and 5 are about a regime (large generic pretraining, where the experts' extra
capacity pays): :func:`decision_gate` checks that the study reached it, and a part of an
expert strategy whose gate did not pass is *inconclusive (regime not reached)*, whatever its
comparison alone would say (the page shows that too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slmfactory.analysis.measured import AMORTISATION_N, EXPERT_STRATEGIES, MeasuredConfig, parse_settings, pool_seeds
from slmfactory.platform.cost import MEASURED, PAPER
from study.results import budget_value

CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive"
SIGNIFICANCE = 0.05
COST_UNIT = "flops"  # claims 1, 3 and 4 compare costs in FLOPs (device-hours are projected from them)
CONVENTION = PAPER  # claims are decided under the paper's cost convention; MEASURED is shown beside
COST_FACTOR = 2.0
"""Claim 1's equal-cost window: a rival costing at most this many times slm-is's per-domain cost."""
ENTROPY_K = 16
"""Claim 5's clustering: the entropy of each domain over a fixed k = 16 clustering."""


def seeds(c: MeasuredConfig) -> dict[str, str]:
    return {k: v for k, v in parse_settings(c.settings).items() if k.endswith("seed")}


def ppl_text(c: MeasuredConfig) -> str:
    iv = c.interval
    return f"{c.ppl_macro:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else f"{c.ppl_macro:.2f} [n/a]"


def cell(c: MeasuredConfig) -> str:
    """A deciding cell: the configuration and its macro perplexity with the 95% interval."""
    return f"{c.label} n{c.in_domain:,}: {ppl_text(c)}"


def number(c: MeasuredConfig) -> str:
    """One deciding number, short: ``slm-is 307.38 [304.22, 310.58]``."""
    return f"{c.strategy}{' (' + str(c.n_seeds) + ' seeds)' if c.seeds else ''} {ppl_text(c)}"


def compare(a: MeasuredConfig, b: MeasuredConfig) -> str:
    """``better`` (a's interval wholly below b's), ``worse`` (wholly above), ``overlap``, or
    ``unknown`` (either has no interval)."""
    ia, ib = a.interval, b.interval
    if ia is None or ib is None:
        return "unknown"
    if ia[1] < ib[0]:
        return "better"
    if ib[1] < ia[0]:
        return "worse"
    return "overlap"


@dataclass
class Part:
    name: str
    verdict: str
    reason: str
    """Short: it is what an inconclusive claim's verdict quotes."""
    cells: list[str] = field(default_factory=list)
    raw: str = ""
    """The comparison's own verdict where the gate overrode it."""
    detail: str = ""
    numbers: tuple[str, ...] = ()
    """The two numbers that decide the part (the verdict table quotes them)."""
    seeds: int = 0
    """The fewest seeds among the configurations it compares (0: not known)."""


def compared(part: Part, *configs: MeasuredConfig) -> Part:
    """``part`` with its deciding numbers and seed count from the two configurations it compares."""
    part.numbers = part.numbers or tuple(number(c) for c in configs[:2])
    part.seeds = min(c.n_seeds for c in configs) if configs else 0
    return part


@dataclass
class Claim:
    number: int
    statement: str
    rule: str
    parts: list[Part]
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    summary: str = ""
    """The rule in one sentence (the verdict table's)."""

    @property
    def deciding_parts(self) -> list[Part]:
        decided = [p for p in self.parts if p.verdict in (CONFIRMED, REFUTED)] or self.parts
        return decided

    @property
    def deciding_cells(self) -> list[str]:
        return [c for p in self.deciding_parts for c in p.cells]

    @property
    def numbers(self) -> tuple[str, ...]:
        """The two numbers that decide the claim: those of its first part whose verdict is the
        claim's (else its first part's)."""
        key = self.verdict.split(" ")[0]
        part = next((p for p in self.parts if p.verdict == key), self.parts[0] if self.parts else None)
        return part.numbers if part is not None else ()

    @property
    def seed_note(self) -> str:
        """``one seed`` when every deciding part compares a configuration run once, ``partly one
        seed`` when some do, else empty."""
        counts = [p.seeds for p in self.deciding_parts if p.seeds]
        if not counts or min(counts) > 1:
            return ""
        return "one seed" if max(counts) == 1 else "partly one seed"


def missing(name: str, what: str) -> Part:
    return Part(name, INCONCLUSIVE, f"cells missing: {what}")


def from_comparison(name: str, a: MeasuredConfig, b: MeasuredConfig) -> Part:
    """A part from one :func:`compare` of the claim's favourite ``a`` against its rival ``b``:
    ``better`` confirms, ``worse`` refutes, anything else is inconclusive."""
    outcome, cells = compare(a, b), [cell(a), cell(b)]
    if outcome == "better":
        part = Part(name, CONFIRMED, "intervals separate", cells)
    elif outcome == "worse":
        part = Part(name, REFUTED, "intervals separate, the other way", cells)
    else:
        part = Part(name, INCONCLUSIVE, "no interval" if outcome == "unknown" else "intervals overlap", cells)
    return compared(part, a, b)


def combine(parts: list[Part], what_missing: str = "") -> str:
    """The claim's verdict from its parts (see the module's docstring)."""
    if not parts:
        return f"{INCONCLUSIVE} (cells missing: {what_missing or 'every part'})"
    n_conf = sum(p.verdict == CONFIRMED for p in parts)
    n_ref = sum(p.verdict == REFUTED for p in parts)
    if n_conf and not n_ref:
        return CONFIRMED
    if n_ref and not n_conf:
        return REFUTED
    if n_conf and n_ref:
        return f"{INCONCLUSIVE} (mixed: {n_conf} part(s) confirmed, {n_ref} refuted)"
    reasons = list(dict.fromkeys(p.reason for p in parts))
    return f"{INCONCLUSIVE} ({'; '.join(reasons)})"


def _finish(claim: Claim, what_missing: str = "") -> Claim:
    claim.verdict = combine(claim.parts, what_missing)
    return claim


def small_params(configs: list[MeasuredConfig]) -> int | None:
    """The SLM's served size: ``slm``'s parameter count (else the smallest measured)."""
    slm = [c.params for c in configs if c.strategy == "slm"]
    return min(slm) if slm else (min(c.params for c in configs) if configs else None)


def sizes(configs: list[MeasuredConfig]) -> list[int]:
    return sorted({c.in_domain for c in configs})


def best(configs: list[MeasuredConfig]) -> MeasuredConfig | None:
    return min(configs, key=lambda c: c.ppl_macro) if configs else None


def generic_budgets(configs: list[MeasuredConfig], strategies=("slm",)) -> list[str]:
    found = {c.generic_budget for c in configs if c.strategy in strategies and c.generic_budget != "none"}
    return sorted(found, key=budget_value)


def _axes(c: MeasuredConfig) -> tuple:
    return (c.strategy, c.generic_budget, c.spec_budget, c.in_domain)


def spec_budgets(configs: list[MeasuredConfig]) -> list[str]:
    return sorted({c.spec_budget for c in configs}, key=budget_value)


# -- the decision gate --------------------------------------------------------------------

@dataclass
class Gate:
    passed: dict[str, bool | None]
    """Expert strategy -> passed (None: its cells are missing)."""
    lines: list[str]
    falls: bool | None = None
    budgets: tuple[str, str] | None = None


def _phase_ppl(configs: list[MeasuredConfig], strategy: str, budget: str) -> float | None:
    """A generic phase's validation perplexity: the strategy's run at ``budget`` with the
    lowest seeds (pretrain.seed=0 when the grid has seeds)."""
    rows = [c for c in configs if c.strategy == strategy and c.generic_budget == budget and c.generic_ppl is not None]
    rows.sort(key=lambda c: sorted(seeds(c).items()))
    return rows[0].generic_ppl if rows else None


def decision_gate(configs: list[MeasuredConfig]) -> Gate:
    """Did the study reach the regime of claims 2 and 5? It passed for an expert strategy
    X when (a) slm's generic validation perplexity still falls from the second-largest to the
    largest generic budget (slm is still learning from generic data: the budget axis is
    live) and (b) X's routed generic perplexity is below slm's at the largest budget (the
    experts' capacity already pays before fine-tuning). Generic perplexities are single
    validation numbers (no interval): strict inequalities decide."""
    budgets = generic_budgets(configs)
    experts = [s for s in EXPERT_STRATEGIES if any(c.strategy == s for c in configs)] or list(EXPERT_STRATEGIES)
    if len(budgets) < 2:
        why = f"slm's generic perplexity at two generic budgets (measured: {', '.join(budgets) or 'none'})"
        return Gate({s: None for s in experts}, [f"cells missing: {why}"])
    second, top = budgets[-2], budgets[-1]
    p2, p1 = _phase_ppl(configs, "slm", second), _phase_ppl(configs, "slm", top)
    lines, passed = [], {}
    if p2 is None or p1 is None:
        return Gate({s: None for s in experts}, [f"cells missing: slm generic ppl at {second} and {top}"])
    falls = p1 < p2
    lines.append(f"(a) slm generic ppl {p2:.2f} at {second} -> {p1:.2f} at {top}: "
                 + ("still falls" if falls else "no longer falls"))
    for s in experts:
        px = _phase_ppl(configs, s, top)
        if px is None:
            passed[s] = None
            lines.append(f"(b) {s}: cells missing: routed generic ppl at {top}")
            continue
        below = px < p1
        passed[s] = falls and below
        lines.append(f"(b) {s} routed generic ppl {px:.2f} vs slm {p1:.2f} at {top}: "
                     + ("below" if below else "not below") + f" -> gate {'passed' if passed[s] else 'not passed'}")
    return Gate(passed, lines, falls, (second, top))


def _gated(part: Part, strategy: str, gate: Gate) -> Part:
    ok = gate.passed.get(strategy)
    if ok:
        return part
    if ok is None:
        return Part(part.name, INCONCLUSIVE, "cells missing: the decision gate's generic perplexities", part.cells,
                    raw=part.verdict, detail=part.reason, numbers=part.numbers, seeds=part.seeds)
    return Part(part.name, INCONCLUSIVE, "regime not reached", part.cells, raw=part.verdict, detail=part.reason,
                numbers=part.numbers, seeds=part.seeds)


# -- the claims ---------------------------------------------------------------------------

def _rank(c: MeasuredConfig) -> tuple:
    return (c.ppl_macro, c.label)


def claim_is_best_small(configs: list[MeasuredConfig], factor: float = COST_FACTOR,
                        generic_scale: bool = False) -> Claim:
    """At N = 1 and equal per-domain cost, as the paper's Figure 1 compares: per in-domain
    size, slm-is at its largest specialisation budget S against, for every other strategy
    serving at the SLM's size, that strategy's best configuration (any budgets, any settings)
    whose per-domain cost C_generic + C_spec (paper's convention, FLOPs) is at most
    ``COST_FACTOR`` (2) times slm-is's at S: a cheaper rival fits the same budget. Confirmed
    when slm-is's interval lies below every such rival's; refuted when some rival's lies below
    slm-is's; inconclusive when they overlap, or when no rival costs that little (cells missing)."""
    # (The docstring is the rule printed on the pages, the first study's frozen.) With
    # ``generic_scale`` (the second study's page), S must be large in the paper's sense, at least
    # slm's smallest generic budget: an in-domain size where slm-is never ran that large has its
    # cells missing, with that reason, rather than a verdict on a small budget.
    claim = Claim(1, "SLM-is is the best small model (inference size = SLM) when the specialisation budget is "
                  "large", claim_is_best_small.__doc__, [],
                  summary=f"at N = 1, slm-is at the largest specialisation budget against each small rival costing "
                          f"at most {factor:g}x slm-is per domain (paper's costs): slm-is's interval below every "
                          "rival's confirms, a rival's below slm-is's refutes")
    cap = small_params(configs)
    for n in sizes(configs):
        at = [c for c in configs if c.in_domain == n and c.has_cost(COST_UNIT, CONVENTION)]
        ises = [c for c in at if c.strategy == "slm-is"]
        if not ises:
            claim.parts.append(missing(f"n={n:,}", f"slm-is at n={n:,}"))
            continue
        top = spec_budgets(ises)[-1]
        floor = generic_budgets(configs)[:1] if generic_scale else []
        if floor and budget_value(top) < budget_value(floor[0]):
            claim.parts.append(missing(f"n={n:,}", f"slm-is at a specialisation budget of generic scale "
                                                   f"(>= {floor[0]}) at n={n:,}; its largest there is {top}"))
            continue
        is_ = best([c for c in ises if c.spec_budget == top])
        limit = factor * is_.per_domain(1, COST_UNIT, CONVENTION)
        name = f"n={n:,}, slm-is at spec. budget {top}, N=1, rivals <= {limit:.3g} FLOPs/domain"
        small = [c for c in at if c.params <= cap and c.strategy != "slm-is"]

        def rivals_within(lim: float, conv: str) -> list[MeasuredConfig]:
            fit = [c for c in small if c.has_cost(COST_UNIT, conv) and c.per_domain(1, COST_UNIT, conv) <= lim]
            return [min((c for c in fit if c.strategy == s), key=_rank) for s in sorted({c.strategy for c in fit})]

        rivals = rivals_within(limit * (1 + 1e-9), CONVENTION)
        if not rivals:
            claim.parts.append(missing(name, f"a small rival costing <= {limit:.3g} FLOPs per domain"))
            continue
        outcomes = [compare(is_, r) for r in rivals]
        cells = [cell(is_) + f" ({is_.per_domain(1, COST_UNIT, CONVENTION):.3g} FLOPs/domain)"] + [
            cell(r) + f" ({r.per_domain(1, COST_UNIT, CONVENTION):.3g} FLOPs/domain)" for r in rivals]
        top_rival = min(rivals, key=_rank)
        if all(o == "better" for o in outcomes):
            part = Part(name, CONFIRMED, "slm-is below every rival of its cost", cells)
        elif "worse" in outcomes:
            beaten = [r for r, o in zip(rivals, outcomes) if o == "worse"]
            top_rival = min(beaten, key=_rank)
            part = Part(name, REFUTED, "a rival of its cost is below slm-is: " + ", ".join(r.strategy for r in beaten),
                        cells)
        else:
            part = Part(name, INCONCLUSIVE, "no interval" if "unknown" in outcomes else "intervals overlap", cells)
        claim.parts.append(compared(part, is_, top_rival))
        if is_.has_cost(COST_UNIT, MEASURED):
            m_limit = factor * is_.per_domain(1, COST_UNIT, MEASURED)
            m_rivals = rivals_within(m_limit * (1 + 1e-9), MEASURED)
            m_best = min(m_rivals, key=_rank) if m_rivals else None
            claim.notes.append(f"n={n:,}, measured costs beside: slm-is costs {m_limit / factor:.3g} FLOPs per domain "
                               f"(paper's: {limit / factor:.3g}); {len(m_rivals)} rival strategies fit "
                               f"{factor:g}x that" + (f", the best {cell(m_best)}: {compare(is_, m_best)}"
                                                      if m_best else ""))
        llm = best([c for c in at if c.spec_budget == top and c.strategy == "llm"])
        if llm is not None:
            claim.notes.append(f"n={n:,}: slm-is vs llm at the same spec. budget (paper: slm-is beats the LLM at 1M "
                               f"tokens; not at equal cost here, the LLM costs "
                               f"{llm.per_domain(1, COST_UNIT, CONVENTION):.3g} FLOPs per domain): {compare(is_, llm)} "
                               f"({cell(is_)} vs {cell(llm)})")
    return _finish(claim, "slm-is")


def claim_experts_beat_slm(configs: list[MeasuredConfig], gate: Gate | None = None) -> Claim:
    """At the largest generic budget and the smallest specialisation budget, per in-domain
    size and expert strategy (slm-mix, slm-pn): the expert against slm run with the same
    seeds (both serve the SLM's size: equal inference cost; two seeds pooled into one
    interval). Confirmed when the expert's interval lies below slm's, refuted when above,
    else inconclusive; gated by :func:`decision_gate`."""
    gate = gate or decision_gate(configs)
    claim = Claim(2, "SLM-mix / SLM-pn beat SLM at equal inference cost when generic pretraining is large and "
                  "specialisation small", claim_experts_beat_slm.__doc__, [],
                  summary="at the largest generic and smallest specialisation budget, the expert's interval below "
                          "slm's (same seeds) confirms, above refutes; only where the decision gate passed")
    budgets = generic_budgets(configs, ("slm",) + EXPERT_STRATEGIES)
    if not budgets or not any(c.strategy in EXPERT_STRATEGIES for c in configs):
        return _finish(claim, "slm and slm-mix/slm-pn")
    g, s = budgets[-1], spec_budgets(configs)[0]
    gains: dict[tuple[str, int], list[float]] = {}
    present = [x for x in EXPERT_STRATEGIES if any(c.strategy == x for c in configs)]
    for x in present:  # an expert strategy outside the grid is no missing cell
        for n in sizes(configs):
            xs = [c for c in configs if _axes(c) == (x, g, s, n)]
            slms = [c for c in configs if _axes(c) == ("slm", g, s, n)]
            if not xs or not slms:
                claim.parts.append(missing(f"{x}, n={n:,}", f"{x if not xs else 'slm'} at g{g} s{s} n{n:,}"))
                continue
            for c in sorted(xs, key=lambda c: c.label):
                ref = next((r for r in slms if (seeds(r), r.seeds) == (seeds(c), c.seeds)), None)
                tag = c.settings + (f"; {c.n_seeds} seeds" if c.seeds else "")
                name = f"{x} vs slm, n={n:,}" + (f" [{tag}]" if tag else "")
                if ref is None:
                    claim.parts.append(missing(name, f"slm with the seeds of {c.label}"))
                    continue
                gains.setdefault((x, n), []).append(1 - c.ppl_macro / ref.ppl_macro)
                claim.parts.append(_gated(from_comparison(name, c, ref), x, gate))
    for (x, n), v in sorted(gains.items()):
        claim.notes.append(f"{x} gain over slm at n={n:,} (g{g}, s{s}): {sum(v) / len(v):+.1%} "
                           "(the paper: the edge shrinks as in-domain data grow)")
    return _finish(claim)


def claim_distillation_loses(configs: list[MeasuredConfig], ns: tuple[int, ...] = AMORTISATION_N) -> Claim:
    """Per in-domain size, slm-d configuration and N in (1, 7, 50): slm-d's per-domain cost
    C_spec + C_generic / N counts its teacher (the teacher's pretraining is in slm-d's
    generic cost, its fine-tuning in the specialisation cost). Among slm and llm
    configurations of equal or lower per-domain FLOPs (paper's convention; none of the three
    clusters, so the measured one is the same), confirmed when one's interval lies below
    slm-d's; refuted when slm-d's lies below all of theirs; inconclusive otherwise (and when
    none costs as little)."""
    claim = Claim(3, "SLM-d loses once the teacher's cost is counted", claim_distillation_loses.__doc__, [],
                  summary="per N, a slm or llm of at most slm-d's per-domain cost (teacher counted) with its interval "
                          "below slm-d's confirms; slm-d below all of them refutes")
    for d in sorted((c for c in configs if c.strategy == "slm-d" and c.has_cost(COST_UNIT, CONVENTION)),
                    key=lambda c: (c.in_domain, budget_value(c.generic_budget), budget_value(c.spec_budget))):
        for n in ns:
            name = f"{d.label} n{d.in_domain:,}, N={n}"
            limit = d.per_domain(n, COST_UNIT, CONVENTION) * (1 + 1e-9)
            alts = [c for c in configs if c.strategy in ("slm", "llm") and c.in_domain == d.in_domain
                    and c.has_cost(COST_UNIT, CONVENTION) and c.per_domain(n, COST_UNIT, CONVENTION) <= limit]
            if not alts:
                claim.parts.append(missing(name, f"slm/llm at <= {limit:.3g} FLOPs per domain"))
                continue
            outcomes = [compare(a, d) for a in alts]
            top = best(alts)
            if "better" in outcomes:
                winner = best([a for a, o in zip(alts, outcomes) if o == "better"])
                claim.parts.append(compared(Part(name, CONFIRMED, "a cheaper slm/llm is below slm-d",
                                                 [cell(winner), cell(d)]), winner, d))
            elif all(o == "worse" for o in outcomes):
                claim.parts.append(compared(Part(name, REFUTED, "slm-d below every slm/llm of its cost",
                                                 [cell(d), cell(top)]), d, top))
            else:
                why = "no interval" if "unknown" in outcomes else "intervals overlap"
                claim.parts.append(compared(Part(name, INCONCLUSIVE, why, [cell(d), cell(top)]), d, top))
    return _finish(claim, "slm-d")


def cheapest_reaching(configs: list[MeasuredConfig], target: MeasuredConfig, n: int,
                      convention: str = CONVENTION) -> MeasuredConfig | None:
    """The configuration of the lowest per-domain cost at N domains (under ``convention``),
    among those of ``target``'s in-domain size and served size at most its, that reach its
    perplexity (interval not wholly above ``target``'s); slm-is first on a cost tie."""
    pool = [c for c in configs if c.in_domain == target.in_domain and c.params <= target.params
            and c.has_cost(COST_UNIT, convention) and compare(c, target) in ("better", "overlap")]
    return min(pool, key=lambda c: (c.per_domain(n, COST_UNIT, convention), c.strategy != "slm-is"), default=None)


def claim_is_loses_with_n(configs: list[MeasuredConfig], ns: tuple[int, ...] = AMORTISATION_N) -> Claim:
    """Per in-domain size and slm-is configuration, on the paper's costs (embedding the
    generic corpus is nobody's cost, so C_generic(slm-is) = 0): the cheapest configuration
    (per-domain FLOPs C_spec + C_generic / N) reaching slm-is's perplexity, at N = 1 and at
    the largest N. Confirmed when it is slm-is at N = 1 and another strategy at the largest N;
    refuted when slm-is is still the cheapest at the largest N; inconclusive when slm-is is
    not the cheapest even at N = 1 (no edge to lose) or has no interval. The same under the
    measured convention is shown beside."""
    claim = Claim(4, "SLM-is loses its edge as the number of domains N grows", claim_is_loses_with_n.__doc__, [],
                  summary="on the paper's costs, slm-is the cheapest to reach its perplexity at N = 1 and another "
                          "strategy at the largest N confirms; slm-is still the cheapest there refutes")
    for t in sorted((c for c in configs if c.strategy == "slm-is" and c.has_cost(COST_UNIT, CONVENTION)),
                    key=lambda c: (c.in_domain, budget_value(c.spec_budget), c.settings)):
        name = f"{t.label} n{t.in_domain:,}"
        if t.interval is None:
            claim.parts.append(compared(Part(name, INCONCLUSIVE, "no interval", [cell(t)]), t))
            continue

        def story(conv: str) -> tuple[dict[int, MeasuredConfig], str]:
            winners = {n: cheapest_reaching(configs, t, n, conv) for n in ns}
            return winners, "; ".join(f"N={n}: {w.label} ({w.per_domain(n, COST_UNIT, conv):.3g} FLOPs/domain)"
                                      for n, w in winners.items())

        winners, text = story(CONVENTION)
        first, last = winners[min(ns)], winners[max(ns)]
        cells = [cell(t)] + [cell(w) for w in {id(w): w for w in (first, last)}.values() if w is not t]
        if first.strategy != "slm-is":
            part = Part(name, INCONCLUSIVE, f"slm-is is not the cheapest reaching its ppl even at N={min(ns)}", cells)
            other = first
        elif last.strategy != "slm-is":
            part = Part(name, CONFIRMED, f"cheaper than slm-is at N={max(ns)}: {last.strategy}", cells)
            other = last
        else:
            part = Part(name, REFUTED, f"slm-is still the cheapest at N={max(ns)}", cells)
            other = last
        part.detail = "cheapest reaching slm-is's ppl (paper's costs): " + text
        part.numbers = (f"slm-is {t.per_domain(min(ns), COST_UNIT, CONVENTION):.3g} FLOPs/domain at N={min(ns)}",
                        f"{other.strategy} {other.per_domain(min(ns) if other is first else max(ns), COST_UNIT, CONVENTION):.3g}"
                        f" at N={min(ns) if other is first else max(ns)}")
        claim.parts.append(compared(part, t, other))
        if all(c.has_cost(COST_UNIT, MEASURED) for c in configs if c.in_domain == t.in_domain):
            claim.notes.append(f"{name}, measured costs beside: " + story(MEASURED)[1])
    return _finish(claim, "slm-is with costs")


EXACT_MAX = 8


def spearman_p(x: list[float], y: list[float], fallback: float | None = None, alternative: str = "two-sided") -> float:
    """p-value of Spearman's rho: exact over all permutations up to EXACT_MAX points (scipy's
    t approximation gives p = 0 for a perfect ranking of 3 points), else ``fallback``
    (scipy's). ``alternative``: ``two-sided`` (|rho| at least the observed), ``less`` (rho at
    most the observed: the one-sided test of rho < 0) or ``greater``."""
    from itertools import permutations

    from scipy.stats import rankdata

    n = len(x)
    if n > EXACT_MAX and fallback is not None:
        return fallback
    rx, ry = rankdata(x), rankdata(y)

    def rho(a, b) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) and np.std(b) else 0.0

    obs = rho(rx, ry)
    perms = [rho(rx, np.array(p)) for p in permutations(ry)]
    if alternative == "less":
        hits = sum(r <= obs + 1e-12 for r in perms)
    elif alternative == "greater":
        hits = sum(r >= obs - 1e-12 for r in perms)
    else:
        hits = sum(abs(r) >= abs(obs) - 1e-12 for r in perms)
    return hits / len(perms)


def spearman_critical(n: int, one_sided: bool = False) -> float | None:
    """The smallest |rho| with exact p < SIGNIFICANCE for n distinct ranks (None: unreachable);
    ``one_sided``: for the test of rho < 0 (or of rho > 0) alone."""
    from itertools import permutations

    if n < 3 or n > EXACT_MAX:
        return None
    base = np.arange(n, dtype=float)
    counts: dict[float, int] = {}
    for p in permutations(base):
        v = round(float(np.corrcoef(base, np.array(p))[0, 1]), 9)
        v = v if one_sided else abs(v)
        counts[v] = counts.get(v, 0) + 1
    total = sum(counts.values())
    for v in sorted(w for w in counts if w >= 0):
        if sum(c for w, c in counts.items() if w >= v) / total < SIGNIFICANCE:
            return v
    return None


def entropy_k16(configs: list[MeasuredConfig], k: int = ENTROPY_K) -> dict[int, dict[str, float]]:
    """in-domain size -> domain -> the domain's entropy over a clustering of ``k`` clusters
    (``MeasuredConfig.entropy_k``), from any configuration that logged it; one clustering per
    in-domain size (the first configuration in label order wins a disagreement)."""
    out: dict[int, dict[str, float]] = {}
    for c in sorted(configs, key=lambda c: c.label):
        if c.entropy_k == k and c.entropy:
            got = out.setdefault(c.in_domain, {})
            for d, h in c.entropy.items():
                got.setdefault(d, h)
    return out


def claim_entropy(configs: list[MeasuredConfig], gate: Gate | None = None) -> Claim:
    """At the largest generic budget, per slm-mix/slm-pn configuration (strategy,
    specialisation budget, in-domain size) and each of its seeds: each domain's gain over slm
    (1 - ppl_x / ppl_slm, same budgets and seed) against the domain's entropy over a fixed
    k = 16 clustering of the generic corpus (``ENTROPY_K``; the same for both strategies,
    not the expert's own assignment, where a domain that matches no cluster looks broad).
    The test, fixed before the run: a one-sided exact permutation test of Spearman's rho,
    H1: rho < 0 (the experts gain least on high-entropy domains), at p < 0.05. Confirmed when
    every seed rejects H0 (rho < 0, p < 0.05); refuted when every seed's opposite one-sided
    test (rho > 0) rejects; inconclusive otherwise, including when the seeds disagree. A part
    run with one seed is decided on it and says so. Gated by :func:`decision_gate`."""
    gate = gate or decision_gate(configs)
    claim = Claim(5, "SLM-mix / SLM-pn gain least on high-entropy domains", claim_entropy.__doc__, [],
                  summary=f"one-sided exact Spearman test of the expert's gain over slm against the domain's k = "
                          f"{ENTROPY_K} cluster entropy (H1: rho < 0, p < {SIGNIFICANCE}); every seed must agree")
    budgets = generic_budgets(configs, EXPERT_STRATEGIES)
    if not budgets:
        return _finish(claim, "slm-mix/slm-pn")
    entropies = entropy_k16(configs)
    groups: dict[tuple, list[MeasuredConfig]] = {}
    for x in configs:
        if x.strategy in EXPERT_STRATEGIES and x.generic_budget == budgets[-1]:
            groups.setdefault((x.strategy, x.spec_budget, x.in_domain, x.replicate_key[-1]), []).append(x)
    for (strategy, spec, n, rest), xs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][0],
                                                                                  budget_value(kv[0][1]), kv[0][3])):
        xs = sorted(xs, key=lambda c: c.settings)
        name = f"{strategy} g{budgets[-1]} s{spec} n{n:,}" + (f" [{rest}]" if rest else "") + \
            f" ({len(xs)} seed{'s' if len(xs) > 1 else ''})"
        ent = entropies.get(n)
        if not ent:
            claim.parts.append(missing(name, f"the domains' k = {ENTROPY_K} entropy at n={n:,}"))
            continue
        cells, tests, numbers = [], [], []
        for x in xs:
            slm = next((c for c in configs if c.strategy == "slm" and _axes(c)[1:] == _axes(x)[1:]
                        and seeds(c) == seeds(x)), None)
            tag = ",".join(f"{k}={v}" for k, v in seeds(x).items()) or "one run"
            if slm is None:
                tests.append(None)
                cells.append(f"{tag}: cells missing (slm with the same seed)")
                continue
            rows = [(d, ent[d], 1 - x.ppl[d] / slm.ppl[d]) for d in sorted(ent) if d in x.ppl and d in slm.ppl]
            cells += [f"{tag}: gain on {d} (k={ENTROPY_K} entropy {h:.3f}): {g:+.3f}" for d, h, g in rows]
            if len(rows) < 3:
                tests.append(None)
                continue
            gains_, hs = [r[2] for r in rows], [r[1] for r in rows]
            from scipy.stats import spearmanr

            rho = float(spearmanr(gains_, hs).statistic) if np.std(gains_) and np.std(hs) else 0.0
            p_less = spearman_p(gains_, hs, alternative="less")
            p_greater = spearman_p(gains_, hs, alternative="greater")
            tests.append((rho, p_less, p_greater))
            cells.append(f"{tag}: Spearman rho = {rho:.3f}, one-sided p(rho < 0) = {p_less:.3g} ({len(rows)} domains)")
            numbers.append(f"{tag}: rho = {rho:.3f}, p = {p_less:.3g}")
        if any(t is None for t in tests):
            part = Part(name, INCONCLUSIVE, "cells missing: a seed without a matching slm or 3 domains", cells)
        elif all(t[1] < SIGNIFICANCE for t in tests):
            part = Part(name, CONFIRMED, f"every seed: rho < 0, one-sided p < {SIGNIFICANCE}", cells)
        elif all(t[2] < SIGNIFICANCE for t in tests):
            part = Part(name, REFUTED, f"every seed: rho > 0, one-sided p < {SIGNIFICANCE}", cells)
        elif any(t[1] < SIGNIFICANCE or t[2] < SIGNIFICANCE for t in tests):
            part = Part(name, INCONCLUSIVE, "seeds disagree", cells)
        else:
            part = Part(name, INCONCLUSIVE, f"rank correlation not significant (one-sided p >= {SIGNIFICANCE})",
                        cells)
        part.numbers = tuple(numbers[:2])
        part.seeds = len(xs)
        claim.parts.append(_gated(part, strategy, gate))
    return _finish(claim, f"slm-mix/slm-pn with a k = {ENTROPY_K} domain entropy and a matching slm")


def claim_pretraining_helps(configs: list[MeasuredConfig]) -> Claim:
    """At the smallest in-domain size, per specialisation budget: slm at its largest generic
    budget against slm-nopt at the same specialisation budget. Confirmed when slm's interval
    lies below slm-nopt's (generic pretraining pays), refuted when above, inconclusive
    otherwise. Smaller generic budgets are shown as notes."""
    claim = Claim(6, "Generic pretraining beats training on the domain only (SLM vs SLM-nopt) at small in-domain "
                  "sizes", claim_pretraining_helps.__doc__, [],
                  summary="at the smallest in-domain size, slm at its largest generic budget below slm-nopt at the "
                          "same specialisation budget confirms, above refutes")
    if not configs:
        return _finish(claim, "slm, slm-nopt")
    n = sizes(configs)[0]
    at = [c for c in configs if c.in_domain == n]
    budgets = generic_budgets(at)
    for s in spec_budgets(at):
        nopt = best([c for c in at if c.strategy == "slm-nopt" and c.spec_budget == s])
        slms = [c for c in at if c.strategy == "slm" and c.spec_budget == s]
        name = f"n={n:,}, spec. budget {s}"
        if nopt is None or not budgets or not [c for c in slms if c.generic_budget == budgets[-1]]:
            claim.parts.append(missing(name, ("slm-nopt" if nopt is None else "slm") + f" at s{s} n{n:,}"))
            continue
        for c in sorted((c for c in slms if c.generic_budget == budgets[-1]), key=lambda c: c.label):
            tag = "; ".join(x for x in (c.settings, f"{c.n_seeds} seeds" if c.seeds else "") if x)
            claim.parts.append(from_comparison(name + (f" [{tag}]" if tag else ""), c, nopt))
        others = sorted((c for c in slms if c.generic_budget != budgets[-1]),
                        key=lambda c: budget_value(c.generic_budget))
        for c in others:
            claim.notes.append(f"s{s}: {cell(c)} is {compare(c, nopt)} vs {cell(nopt)}")
    return _finish(claim, "slm, slm-nopt")


def all_claims(configs: list[MeasuredConfig], generic_scale: bool = False) -> tuple[Gate, list[Claim]]:
    """Every claim: the gate and claim 5 on the configurations as run (claim 5 tests each seed),
    the others on the seeds pooled (``frontier.pool_seeds``); ``generic_scale``: see
    ``claim_is_best_small``."""
    gate = decision_gate(configs)
    pooled = pool_seeds(configs)
    return gate, [claim_is_best_small(pooled, generic_scale=generic_scale), claim_experts_beat_slm(pooled, gate),
                  claim_distillation_loses(pooled), claim_is_loses_with_n(pooled), claim_entropy(configs, gate),
                  claim_pretraining_helps(pooled)]
