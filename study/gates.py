"""The study's gates, read back from its CSV (so they rebuild with the page):

- **G0** (sizing): measured training tokens/s of the generic phases, from each phase's wall time
  (``generic_wall_seconds``) and the tokens it read (``spent_generic_tokens``); the SLM's first
  phases, at the smallest generic budget, give the rate a grid is sized by (this study's cut was
  decided before they ran: the section says from what, and what they then measured).
- **G1** (the experts' regime): after slm and slm-mix (and slm-pn) at the two largest generic
  budgets, the routed-over-dense generic perplexity ratio ``routed_generic_ppl`` (the expert's)
  / ``generic_ppl`` (slm's, same budget and seed). Verdict per expert strategy: *below 1* at the
  largest budget for every seed (the experts' capacity pays before fine-tuning), *falling toward
  1* (above 1, lower at the largest budget than at the second for every seed: against the
  second budget's same seed, or its lowest seed where that seed did not run there), or *not
  falling*.
- **G2** (importance sampling's premise): on one domain, slm-is's perplexity before fine-tuning
  (``ppl_before``: after its resampled pretraining) at the smallest *large* specialisation budget
  (one beyond every budget slm was specialised at) against slm's ``ppl_before`` at the nearest
  generic budget, and at a specialisation budget equal to a generic budget against slm there.
  Verdict: resampled pretraining *beats* generic pretraining when slm-is's is lower at the equal
  budget (at the nearest budget when no budget is equal), else *does not beat* it.

Strict inequalities decide: these are single validation numbers, without an interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from slmfactory.analysis.measured import EXPERT_STRATEGIES
from study.results import budget_value

BELOW, FALLING, NOT_FALLING = "below 1", "falling toward 1", "not falling"
BEATS, DOES_NOT_BEAT = "beats", "does not beat"


def _seed(r: dict) -> str:
    return str(r.get("pretrain_seed") or "0")


# -- G0 -----------------------------------------------------------------------------------

@dataclass
class Phase:
    strategy: str
    budget: str
    seed: str
    params: float
    tokens: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def generic_phases(rows: list[dict]) -> list[Phase]:
    """One entry per generic phase (strategy, generic budget, pretraining seed) that logged its
    wall time and tokens, by budget then strategy; llm-lora's (llm's phase) once, as llm's; slm-d's
    not at all: its generic cost is its student's slm phase and its teacher's llm phase, each
    listed on its own (counting it too would count both twice)."""
    seen: dict[tuple, Phase] = {}
    shared = {(r["generic_budget"], _seed(r)) for r in rows if r["strategy"] == "llm"}
    for r in rows:
        if r["strategy"] == "llm-lora" and (r["generic_budget"], _seed(r)) in shared:
            continue  # llm-lora fine-tunes llm's own generic phase: one phase, listed once
        if r["strategy"] == "slm-d":
            continue
        if r["generic_budget"] in ("", "none") or not r.get("generic_wall_seconds") \
                or not r.get("spent_generic_tokens"):
            continue
        key = (r["strategy"], r["generic_budget"], _seed(r))
        if key not in seen:
            seen[key] = Phase(r["strategy"], r["generic_budget"], _seed(r), r["params"] or 0.0,
                              r["spent_generic_tokens"], r["generic_wall_seconds"])
    return sorted(seen.values(), key=lambda p: (budget_value(p.budget), p.strategy, p.seed))


@dataclass
class G0:
    phases: list[Phase]
    first: list[Phase]
    """The SLM's phases at the smallest generic budget (the gate's measurement)."""
    tokens_per_s: float | None
    profile_tokens_per_s: float | None
    slm_params: float | None
    grid_generic_tokens: float
    """Generic tokens of every generic phase of the grid (slm-size and larger)."""
    projected_hours: float | None
    """Those tokens at the measured rate of each phase's model size class (the SLM's rate for
    SLM-size phases, each larger model's own measured rate)."""
    measured_hours: float


def profile_rate(cfg, params: float) -> float | None:
    """Training tokens/s the recipe's device profile gives a model of ``params`` parameters
    (log-linear between its rows, clamped at the ends)."""
    rows = sorted((float(t.params), float(t.train_tokens_per_s)) for t in getattr(cfg.device, "throughput", ()) or ())
    if not rows:
        return None
    xs, ys = np.log([r[0] for r in rows]), [r[1] for r in rows]
    return float(np.interp(math.log(params), xs, ys))


def gate_g0(rows: list[dict], cfg) -> G0:
    phases = generic_phases(rows)
    slm = [p for p in phases if p.strategy == "slm"]
    first = [p for p in slm if slm and p.budget == slm[0].budget]
    rate = sum(p.tokens for p in first) / sum(p.seconds for p in first) if first else None
    params = first[0].params if first else None
    by_params: dict[float, list[Phase]] = {}
    for p in phases:
        by_params.setdefault(p.params, []).append(p)
    hours, total = 0.0, 0.0
    for ps in by_params.values():
        r = sum(p.tokens for p in ps) / sum(p.seconds for p in ps)
        tokens = sum(p.tokens for p in ps)
        total += tokens
        hours += tokens / r / 3600
    return G0(phases, first, rate, profile_rate(cfg, params) if params else None, params, total,
              hours if phases else None, sum(p.seconds for p in phases) / 3600)


# -- G1 -----------------------------------------------------------------------------------

@dataclass
class G1Row:
    strategy: str
    budget: str
    seed: str
    routed: float
    dense: float

    @property
    def ratio(self) -> float:
        return self.routed / self.dense


@dataclass
class G1:
    budgets: tuple[str, ...]
    rows: list[G1Row]
    verdicts: dict[str, str] = field(default_factory=dict)
    """Expert strategy -> BELOW / FALLING / NOT_FALLING, or a ``cells missing: ...`` text."""

    def extrapolated_budget(self, strategy: str) -> float | None:
        """Where a log-log line through seed 0's two ratios reaches 1 (generic tokens), when the
        verdict is *falling toward 1*: an extrapolation of two points, not a prediction."""
        pts = {r.budget: r.ratio for r in self.rows if r.strategy == strategy and r.seed == "0"}
        if self.verdicts.get(strategy) != FALLING or not all(b in pts for b in self.budgets[-2:]):
            return None
        (b2, r2), (b1, r1) = [(budget_value(b), pts[b]) for b in self.budgets[-2:]]
        if not (r2 > r1 > 1):
            return None
        slope = (math.log(r1) - math.log(r2)) / (math.log(b1) - math.log(b2))
        return b1 * math.exp(-math.log(r1) / slope)


def gate_g1(rows: list[dict]) -> G1:
    dense = [r for r in rows if r["strategy"] == "slm" and r.get("generic_ppl") is not None]
    budgets = tuple(sorted({r["generic_budget"] for r in dense}, key=budget_value))[-2:]
    experts = [s for s in EXPERT_STRATEGIES if any(r["strategy"] == s for r in rows)] or list(EXPERT_STRATEGIES)
    out: list[G1Row] = []
    verdicts: dict[str, str] = {}
    for s in experts:
        mine = []
        for b in budgets:
            seeds = sorted({_seed(r) for r in rows if r["strategy"] == s and r["generic_budget"] == b
                            and r.get("routed_generic_ppl") is not None})
            for seed in seeds:
                x = next(r for r in rows if r["strategy"] == s and r["generic_budget"] == b and _seed(r) == seed
                         and r.get("routed_generic_ppl") is not None)
                d = next((r for r in dense if r["generic_budget"] == b and _seed(r) == seed), None)
                if d is not None:
                    mine.append(G1Row(s, b, seed, x["routed_generic_ppl"], d["generic_ppl"]))
        out += mine
        top = [r for r in mine if budgets and r.budget == budgets[-1]]
        second = {r.seed: r for r in mine if len(budgets) == 2 and r.budget == budgets[0]}
        if len(budgets) < 2 or not top or not second:
            verdicts[s] = (f"cells missing: {s}'s routed and slm's generic ppl at two generic budgets "
                           f"(measured: {', '.join(sorted({r.budget for r in mine}, key=budget_value)) or 'none'})")
        elif all(r.ratio < 1 for r in top):
            verdicts[s] = BELOW
        elif all(r.ratio < second.get(r.seed, second[min(second)]).ratio for r in top):
            verdicts[s] = FALLING
        else:
            verdicts[s] = NOT_FALLING
    return G1(budgets, out, verdicts)


# -- G2 -----------------------------------------------------------------------------------

@dataclass
class G2Pair:
    what: str
    is_spec: str
    is_before: float
    slm_generic: str
    slm_before: float
    epochs_resampled: float | None
    """Passes over slm-is's resampled stream (``epochs_resampled_pretrain``)."""
    window_repeats: float | None = None
    """Draws per distinct window in that stream (``epochs_resampled_window_repeats``: resampling
    draws with replacement)."""

    @property
    def ratio(self) -> float:
        return self.is_before / self.slm_before

    @property
    def reads_per_window(self) -> float | None:
        """How many times its pretraining read each distinct generic window, on average."""
        if self.epochs_resampled is None:
            return None
        return self.epochs_resampled * (self.window_repeats or 1.0)


@dataclass
class G2:
    domain: str | None
    large: list[str]
    pairs: list[G2Pair]
    verdict: str
    """BEATS / DOES_NOT_BEAT, or ``cells missing: ...``."""
    deciding: G2Pair | None = None
    other_domains: list[tuple[str, list[G2Pair]]] = field(default_factory=list)


def _g2_pairs(rows: list[dict], domain: str, large: list[str], n: int) -> list[G2Pair]:
    slm = {r["generic_budget"]: r for r in rows if r["strategy"] == "slm" and r["domain"] == domain
           and r["in_domain_tokens"] == n and _seed(r) == "0" and r.get("ppl_before") is not None}
    iss = {r["spec_budget"]: r for r in rows if r["strategy"] == "slm-is" and r["domain"] == domain
           and r["in_domain_tokens"] == n and _seed(r) == "0" and r.get("ppl_before") is not None}
    if not slm:
        return []
    pairs = []
    here = [s for s in large if s in iss]
    if here:
        s = here[0]
        near = min(slm, key=lambda g: (abs(math.log(budget_value(g) / budget_value(s))), budget_value(g)))
        pairs.append(G2Pair("nearest", s, iss[s]["ppl_before"], near, slm[near]["ppl_before"],
                            iss[s].get("epochs_resampled_pretrain"), iss[s].get("epochs_resampled_window_repeats")))
    for s in here:
        eq = next((g for g in slm if budget_value(g) == budget_value(s)), None)
        if eq is not None:
            pairs.append(G2Pair("equal", s, iss[s]["ppl_before"], eq, slm[eq]["ppl_before"],
                                iss[s].get("epochs_resampled_pretrain"), iss[s].get("epochs_resampled_window_repeats")))
    return pairs


def gate_g2(rows: list[dict], prefer: str = "code") -> G2:
    slm_specs = {r["spec_budget"] for r in rows if r["strategy"] == "slm"}
    top_slm = max((budget_value(s) for s in slm_specs), default=0.0)
    is_rows = [r for r in rows if r["strategy"] == "slm-is" and r.get("ppl_before") is not None]
    large = sorted({r["spec_budget"] for r in is_rows if budget_value(r["spec_budget"]) > top_slm}, key=budget_value)
    if not large:
        return G2(None, [], [], f"cells missing: slm-is before fine-tuning at a specialisation budget above slm's "
                               f"largest ({top_slm:.3g} tokens)")
    n = min(r["in_domain_tokens"] for r in is_rows if r["spec_budget"] in large)
    count: dict[str, int] = {}
    for r in is_rows:
        if r["spec_budget"] in large and r["in_domain_tokens"] == n:
            count[r["domain"]] = count.get(r["domain"], 0) + 1
    domain = prefer if prefer in count else sorted(count, key=lambda d: (-count[d], d))[0]
    pairs = _g2_pairs(rows, domain, large, n)
    others = [(d, _g2_pairs(rows, d, large, n)) for d in sorted(count) if d != domain]
    if not pairs:
        return G2(domain, large, [], f"cells missing: slm before fine-tuning on {domain}", None, others)
    deciding = next((p for p in pairs if p.what == "equal"), pairs[0])
    verdict = BEATS if deciding.is_before < deciding.slm_before else DOES_NOT_BEAT
    return G2(domain, large, pairs, verdict, deciding, others)

