"""The paper's claims, each decided from measured configurations by an explicit rule.

Every claim is split into *parts* (one comparison each: an in-domain size, a strategy, a
number of domains, ...). A part compares macro perplexities through their 95% intervals
(``frontier.Config.interval``: exp(macro NLL ± 1.96 SE)) with :func:`compare`:

- A is *better* than B only when A's whole interval lies below B's (upper A < lower B);
  *worse* when it lies above; otherwise the intervals overlap and the part is
  **inconclusive** (a configuration without an interval makes its part inconclusive too).
- A part whose cells were not measured is *inconclusive (cells missing: ...)*.

A claim's verdict combines its parts (:func:`combine`): **confirmed** when at least one part
is confirmed and none refuted; **refuted** when at least one is refuted and none confirmed;
*inconclusive (mixed)* when parts disagree; otherwise inconclusive, with the parts' reasons.

Claims 2 and 5 are about a regime (large generic pretraining, where the experts' extra
capacity pays): :func:`decision_gate` checks that the study reached it, and a part of an
expert strategy whose gate did not pass is *inconclusive (regime not reached)*, whatever its
comparison alone would say (the page shows that too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slmfactory.sweeps.frontier import AMORTISATION_N, EXPERT_STRATEGIES, Config, entropy_gains, parse_settings
from slmfactory.sweeps.results import budget_value

CONFIRMED, REFUTED, INCONCLUSIVE = "confirmed", "refuted", "inconclusive"
SIGNIFICANCE = 0.05
COST_UNIT = "flops"  # claims 3 and 4 compare costs in FLOPs (device-hours are measured, noisier)


def seeds(c: Config) -> dict[str, str]:
    return {k: v for k, v in parse_settings(c.settings).items() if k.endswith("seed")}


def cell(c: Config) -> str:
    """A deciding cell: the configuration and its macro perplexity with the 95% interval."""
    iv = c.interval
    ppl = f"{c.ppl_macro:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else f"{c.ppl_macro:.2f} [n/a]"
    return f"{c.label} n{c.in_domain:,}: {ppl}"


def compare(a: Config, b: Config) -> str:
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


@dataclass
class Claim:
    number: int
    statement: str
    rule: str
    parts: list[Part]
    verdict: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def deciding_cells(self) -> list[str]:
        decided = [p for p in self.parts if p.verdict in (CONFIRMED, REFUTED)] or self.parts
        return [c for p in decided for c in p.cells]


def missing(name: str, what: str) -> Part:
    return Part(name, INCONCLUSIVE, f"cells missing: {what}")


def from_comparison(name: str, outcome: str, cells: list[str]) -> Part:
    """A part from one :func:`compare` of the claim's favourite against its rival: ``better``
    confirms, ``worse`` refutes, anything else is inconclusive."""
    if outcome == "better":
        return Part(name, CONFIRMED, "intervals separate", cells)
    if outcome == "worse":
        return Part(name, REFUTED, "intervals separate, the other way", cells)
    return Part(name, INCONCLUSIVE, "no interval" if outcome == "unknown" else "intervals overlap", cells)


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


def small_params(configs: list[Config]) -> int | None:
    """The SLM's served size: ``slm``'s parameter count (else the smallest measured)."""
    slm = [c.params for c in configs if c.strategy == "slm"]
    return min(slm) if slm else (min(c.params for c in configs) if configs else None)


def sizes(configs: list[Config]) -> list[int]:
    return sorted({c.in_domain for c in configs})


def best(configs: list[Config]) -> Config | None:
    return min(configs, key=lambda c: c.ppl_macro) if configs else None


def generic_budgets(configs: list[Config], strategies=("slm",)) -> list[str]:
    found = {c.generic_budget for c in configs if c.strategy in strategies and c.generic_budget != "none"}
    return sorted(found, key=budget_value)


def _axes(c: Config) -> tuple:
    return (c.strategy, c.generic_budget, c.spec_budget, c.in_domain)


def spec_budgets(configs: list[Config]) -> list[str]:
    return sorted({c.spec_budget for c in configs}, key=budget_value)


# -- the decision gate --------------------------------------------------------------------

@dataclass
class Gate:
    passed: dict[str, bool | None]
    """Expert strategy -> passed (None: its cells are missing)."""
    lines: list[str]
    falls: bool | None = None
    budgets: tuple[str, str] | None = None


def _phase_ppl(configs: list[Config], strategy: str, budget: str) -> float | None:
    """A generic phase's validation perplexity: the strategy's run at ``budget`` with the
    lowest seeds (pretrain.seed=0 when the grid has seeds)."""
    rows = [c for c in configs if c.strategy == strategy and c.generic_budget == budget and c.generic_ppl is not None]
    rows.sort(key=lambda c: sorted(seeds(c).items()))
    return rows[0].generic_ppl if rows else None


def decision_gate(configs: list[Config]) -> Gate:
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
                    raw=part.verdict, detail=part.reason)
    return Part(part.name, INCONCLUSIVE, "regime not reached", part.cells, raw=part.verdict, detail=part.reason)


# -- the claims ---------------------------------------------------------------------------

def claim_is_best_small(configs: list[Config]) -> Claim:
    """Per in-domain size, at the largest specialisation budget: slm-is against the best
    configuration (any generic budget, any settings) of every other strategy serving at the
    SLM's size. Confirmed when slm-is's interval lies below every rival's; refuted when some
    rival's lies below slm-is's; inconclusive when they overlap."""
    claim = Claim(1, "SLM-is is the best small model (inference size = SLM) when the specialisation budget is "
                  "large", claim_is_best_small.__doc__, [])
    cap = small_params(configs)
    for n in sizes(configs):
        at = [c for c in configs if c.in_domain == n]
        top = spec_budgets(at)[-1]
        name = f"n={n:,}, spec. budget {top}"
        small = [c for c in at if c.spec_budget == top and c.params <= cap]
        is_ = best([c for c in small if c.strategy == "slm-is"])
        rivals = [best([c for c in small if c.strategy == s]) for s in sorted({c.strategy for c in small} - {"slm-is"})]
        if is_ is None or not rivals:
            claim.parts.append(missing(name, f"slm-is at {top}, n={n:,}" if is_ is None else "no rival small model"))
            continue
        outcomes = [compare(is_, r) for r in rivals]
        cells = [cell(is_)] + [cell(r) for r in rivals]
        if all(o == "better" for o in outcomes):
            claim.parts.append(Part(name, CONFIRMED, "slm-is below every rival", cells))
        elif "worse" in outcomes:
            beaten = [r for r, o in zip(rivals, outcomes) if o == "worse"]
            claim.parts.append(Part(name, REFUTED, "a rival is below slm-is: " + ", ".join(r.strategy for r in beaten),
                                    cells))
        else:
            claim.parts.append(Part(name, INCONCLUSIVE, "no interval" if "unknown" in outcomes else "intervals overlap",
                                    cells))
        llm = best([c for c in at if c.spec_budget == top and c.strategy == "llm"])
        if llm is not None:
            claim.notes.append(f"n={n:,}: slm-is vs llm (paper: slm-is beats the LLM at 1M tokens): "
                               f"{compare(is_, llm)} ({cell(is_)} vs {cell(llm)})")
    return _finish(claim, "slm-is")


def claim_experts_beat_slm(configs: list[Config], gate: Gate | None = None) -> Claim:
    """At the largest generic budget and the smallest specialisation budget, per in-domain
    size, expert strategy (slm-mix, slm-pn) and seed: the expert against slm with the same
    seeds (both serve the SLM's size: equal inference cost). Confirmed when the expert's
    interval lies below slm's, refuted when above, else inconclusive; gated by
    :func:`decision_gate`."""
    gate = gate or decision_gate(configs)
    claim = Claim(2, "SLM-mix / SLM-pn beat SLM at equal inference cost when generic pretraining is large and "
                  "specialisation small", claim_experts_beat_slm.__doc__, [])
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
            for c in sorted(xs, key=lambda c: c.settings):
                ref = next((r for r in slms if seeds(r) == seeds(c)), None)
                name = f"{x} vs slm, n={n:,}" + (f" [{c.settings}]" if c.settings else "")
                if ref is None:
                    claim.parts.append(missing(name, f"slm with {seeds(c)}"))
                    continue
                gains.setdefault((x, n), []).append(1 - c.ppl_macro / ref.ppl_macro)
                part = from_comparison(name, compare(c, ref), [cell(c), cell(ref)])
                claim.parts.append(_gated(part, x, gate))
    for (x, n), v in sorted(gains.items()):
        claim.notes.append(f"{x} gain over slm at n={n:,} (g{g}, s{s}): {sum(v) / len(v):+.1%} "
                           "(the paper: the edge shrinks as in-domain data grow)")
    return _finish(claim)


def claim_distillation_loses(configs: list[Config], ns: tuple[int, ...] = AMORTISATION_N) -> Claim:
    """Per in-domain size, slm-d configuration and N in (1, 7, 50): slm-d's per-domain cost
    C_spec + C_generic / N counts its teacher (the teacher's pretraining is in slm-d's
    generic cost, its fine-tuning in the specialisation cost). Among slm and llm
    configurations of equal or lower per-domain FLOPs, confirmed when one's interval lies
    below slm-d's; refuted when slm-d's lies below all of theirs; inconclusive otherwise
    (and when none costs as little)."""
    claim = Claim(3, "SLM-d loses once the teacher's cost is counted", claim_distillation_loses.__doc__, [])
    for d in sorted((c for c in configs if c.strategy == "slm-d" and COST_UNIT in c.costs),
                    key=lambda c: (c.in_domain, budget_value(c.generic_budget), budget_value(c.spec_budget))):
        for n in ns:
            name = f"{d.label} n{d.in_domain:,}, N={n}"
            limit = d.per_domain(n, COST_UNIT) * (1 + 1e-9)
            alts = [c for c in configs if c.strategy in ("slm", "llm") and c.in_domain == d.in_domain
                    and COST_UNIT in c.costs and c.per_domain(n, COST_UNIT) <= limit]
            if not alts:
                claim.parts.append(missing(name, f"slm/llm at <= {limit:.3g} FLOPs per domain"))
                continue
            outcomes = [compare(a, d) for a in alts]
            top = best(alts)
            if "better" in outcomes:
                winner = best([a for a, o in zip(alts, outcomes) if o == "better"])
                claim.parts.append(Part(name, CONFIRMED, "a cheaper slm/llm is below slm-d", [cell(winner), cell(d)]))
            elif all(o == "worse" for o in outcomes):
                claim.parts.append(Part(name, REFUTED, "slm-d below every slm/llm of its cost", [cell(d), cell(top)]))
            else:
                why = "no interval" if "unknown" in outcomes else "intervals overlap"
                claim.parts.append(Part(name, INCONCLUSIVE, why, [cell(d), cell(top)]))
    return _finish(claim, "slm-d")


def cheapest_reaching(configs: list[Config], target: Config, n: int) -> Config | None:
    """The configuration of the lowest per-domain cost at N domains, among those of
    ``target``'s in-domain size and served size at most its, that reach its perplexity
    (interval not wholly above ``target``'s); slm-is first on a cost tie."""
    pool = [c for c in configs if c.in_domain == target.in_domain and c.params <= target.params
            and COST_UNIT in c.costs and compare(c, target) in ("better", "overlap")]
    return min(pool, key=lambda c: (c.per_domain(n, COST_UNIT), c.strategy != "slm-is"), default=None)


def claim_is_loses_with_n(configs: list[Config], ns: tuple[int, ...] = AMORTISATION_N) -> Claim:
    """Per in-domain size and slm-is configuration: the cheapest configuration (per-domain
    FLOPs C_spec + C_generic / N) reaching slm-is's perplexity, at N = 1 and at the largest N.
    Confirmed when it is slm-is at N = 1 and another strategy at the largest N; refuted when
    slm-is is still the cheapest at the largest N; inconclusive when slm-is is not the
    cheapest even at N = 1 (no edge to lose) or has no interval."""
    claim = Claim(4, "SLM-is loses its edge as the number of domains N grows", claim_is_loses_with_n.__doc__, [])
    for t in sorted((c for c in configs if c.strategy == "slm-is" and COST_UNIT in c.costs),
                    key=lambda c: (c.in_domain, budget_value(c.spec_budget), c.settings)):
        name = f"{t.label} n{t.in_domain:,}"
        if t.interval is None:
            claim.parts.append(Part(name, INCONCLUSIVE, "no interval", [cell(t)]))
            continue
        winners = {n: cheapest_reaching(configs, t, n) for n in ns}
        story = "; ".join(f"N={n}: {w.label} ({w.per_domain(n, COST_UNIT):.3g} FLOPs/domain)"
                          for n, w in winners.items())
        first, last = winners[min(ns)], winners[max(ns)]
        cells = [cell(t)] + [cell(w) for w in {id(w): w for w in (first, last)}.values() if w is not t]
        if first.strategy != "slm-is":
            part = Part(name, INCONCLUSIVE, f"slm-is is not the cheapest reaching its ppl even at N={min(ns)}", cells)
        elif last.strategy != "slm-is":
            part = Part(name, CONFIRMED, f"cheaper than slm-is at N={max(ns)}: {last.strategy}", cells)
        else:
            part = Part(name, REFUTED, f"slm-is still the cheapest at N={max(ns)}", cells)
        part.detail = "cheapest reaching slm-is's ppl: " + story
        claim.parts.append(part)
    return _finish(claim, "slm-is with costs")


EXACT_MAX = 8


def spearman_p(x: list[float], y: list[float], fallback: float | None = None) -> float:
    """Two-sided p-value of Spearman's rho: exact over all permutations up to EXACT_MAX
    points (scipy's t approximation gives p = 0 for a perfect ranking of 3 points), else
    ``fallback`` (scipy's)."""
    from itertools import permutations

    from scipy.stats import rankdata

    n = len(x)
    if n > EXACT_MAX and fallback is not None:
        return fallback
    rx, ry = rankdata(x), rankdata(y)

    def rho(a, b) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) and np.std(b) else 0.0

    obs = abs(rho(rx, ry))
    perms = [abs(rho(rx, np.array(p))) for p in permutations(ry)]
    return sum(r >= obs - 1e-12 for r in perms) / len(perms)


def spearman_critical(n: int) -> float | None:
    """The smallest |rho| with exact p < SIGNIFICANCE for n distinct ranks (None: unreachable)."""
    from itertools import permutations

    if n < 3 or n > EXACT_MAX:
        return None
    base = np.arange(n, dtype=float)
    counts: dict[float, int] = {}
    for p in permutations(base):
        v = round(abs(float(np.corrcoef(base, np.array(p))[0, 1])), 9)
        counts[v] = counts.get(v, 0) + 1
    total = sum(counts.values())
    for v in sorted(counts):
        if sum(c for w, c in counts.items() if w >= v) / total < SIGNIFICANCE:
            return v
    return None


def claim_entropy(configs: list[Config], gate: Gate | None = None) -> Claim:
    """At the largest generic budget, per slm-mix/slm-pn configuration: Spearman's rank
    correlation between each domain's cluster entropy and the expert's gain over slm
    (1 - ppl_x / ppl_slm, same budgets and seeds; ``frontier.entropy_gains``). Confirmed when
    rho < 0 with p < 0.05 (least gain on high-entropy domains), refuted when rho > 0 with
    p < 0.05, inconclusive otherwise; gated by :func:`decision_gate`."""
    gate = gate or decision_gate(configs)
    claim = Claim(5, "SLM-mix / SLM-pn gain least on high-entropy domains", claim_entropy.__doc__, [])
    budgets = generic_budgets(configs, EXPERT_STRATEGIES)
    if not budgets:
        return _finish(claim, "slm-mix/slm-pn")
    for g in entropy_gains(configs):
        x = g["config"]
        if x.generic_budget != budgets[-1]:
            continue
        name = f"{x.label} n{x.in_domain:,}"
        domains = len(g["rows"])
        cells = [f"{x.strategy} gain on {d} (entropy {h:.3f}): {gain:+.3f}" for d, h, _, _, gain in g["rows"]]
        rho = g["spearman"]
        if rho is None or rho != rho:
            part = Part(name, INCONCLUSIVE, "no rank correlation", cells, detail=f"{domains} domains")
        else:
            p = spearman_p([r[4] for r in g["rows"]], [r[1] for r in g["rows"]], g["p"])
            cells.append(f"Spearman rho = {rho:.3f}, p = {p:.3g} ({domains} domains)")
            if p < SIGNIFICANCE:
                part = Part(name, CONFIRMED if rho < 0 else REFUTED, f"rho = {rho:.3f}, p = {p:.3g}", cells)
            else:
                part = Part(name, INCONCLUSIVE, f"rank correlation not significant (p >= {SIGNIFICANCE})", cells,
                            detail=f"rho = {rho:.3f}, p = {p:.3g}, {domains} domains")
        claim.parts.append(_gated(part, x.strategy, gate))
    return _finish(claim, "slm-mix/slm-pn with a domain entropy and a matching slm")


def claim_pretraining_helps(configs: list[Config]) -> Claim:
    """At the smallest in-domain size, per specialisation budget: slm at its largest generic
    budget (each seed) against slm-nopt at the same specialisation budget. Confirmed when
    slm's interval lies below slm-nopt's (generic pretraining pays), refuted when above,
    inconclusive otherwise. Smaller generic budgets are shown as notes."""
    claim = Claim(6, "Generic pretraining beats training on the domain only (SLM vs SLM-nopt) at small in-domain "
                  "sizes", claim_pretraining_helps.__doc__, [])
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
        for c in sorted((c for c in slms if c.generic_budget == budgets[-1]), key=lambda c: c.settings):
            claim.parts.append(from_comparison(name + (f" [{c.settings}]" if c.settings else ""), compare(c, nopt),
                                               [cell(c), cell(nopt)]))
        others = sorted((c for c in slms if c.generic_budget != budgets[-1]),
                        key=lambda c: budget_value(c.generic_budget))
        for c in others:
            claim.notes.append(f"s{s}: {cell(c)} is {compare(c, nopt)} vs {cell(nopt)}")
    return _finish(claim, "slm, slm-nopt")


def all_claims(configs: list[Config]) -> tuple[Gate, list[Claim]]:
    gate = decision_gate(configs)
    return gate, [claim_is_best_small(configs), claim_experts_beat_slm(configs, gate),
                  claim_distillation_loses(configs), claim_is_loses_with_n(configs), claim_entropy(configs, gate),
                  claim_pretraining_helps(configs)]
