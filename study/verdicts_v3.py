"""Study v3's verdicts: each rule of :mod:`study.rules_v3` decided by paired comparisons.

A *pick* names one side (``slm g6M s6M``; ``slm-nopt best`` = its specialisation budget chosen
per domain and seed on validation); :func:`side` finds its runs among the CSV rows whose
fine-tuning learning rate was already chosen on validation (``results.selected_rows``), and
:func:`compare` pairs two picks on a subset of domains with
:func:`slmfactory.analysis.paired.paired_difference` over the runs' per-sequence test NLLs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from slmfactory.analysis.paired import BETTER, TIE, WORSE, PairedDifference, paired_difference
from study import rules_v3 as rules
from study.claims import SIGNIFICANCE, spearman_p
from study.paper_axes import short_budget
from study.results import budget_value

CONFIRMED, REFUTED, INCONCLUSIVE, MISSING = "confirmed", "refuted", "inconclusive", "missing"


@dataclass(frozen=True)
class Pick:
    strategy: str
    generic: str | None = None
    """The generic budget as a reader writes it (``6M``); None: the strategy has no generic phase."""
    spec: str | None = None
    """The specialisation budget (``1.5M``); None: chosen per domain and seed on validation."""

    @property
    def label(self) -> str:
        if self.spec is None:
            return f"{self.strategy} best"
        return self.strategy + (f" g{self.generic}" if self.generic else "") + f" s{self.spec}"

    def matches(self, r: dict[str, Any]) -> bool:
        return (r["strategy"] == self.strategy
                and (self.generic is None or short_budget(r["generic_budget"]) == self.generic)
                and (self.spec is None or short_budget(r["spec_budget"]) == self.spec))


def seed_of(r: dict[str, Any]) -> str:
    return str(r.get("pretrain_seed") or "0")


def side(rows: list[dict], pick: Pick, domains: tuple[str, ...]) -> dict[str, dict[str, dict]] | None:
    """domain -> seed -> the pick's run there (None when a domain has none)."""
    out: dict[str, dict[str, dict]] = {}
    for d in domains:
        runs = [r for r in rows if r["domain"] == d and pick.matches(r)]
        by_seed: dict[str, dict] = {}
        for r in sorted(runs, key=lambda r: budget_value(r["spec_budget"])):
            s = seed_of(r)
            # Several specialisation budgets (pick.spec None): the lowest validation NLL wins.
            if s not in by_seed or (r.get("valid_nll") or math.inf) < (by_seed[s].get("valid_nll") or math.inf):
                by_seed[s] = r
        if not by_seed:
            return None
        out[d] = by_seed
    return out


def macro_ppl(runs: dict[str, dict[str, dict]]) -> float:
    """exp(mean over domains of the mean over seeds of the test NLL)."""
    return math.exp(float(np.mean([np.mean([r["test_nll"] for r in seeds.values()]) for seeds in runs.values()])))


@dataclass
class Comparison:
    a: Pick
    b: Pick
    domains: tuple[str, ...]
    diff: PairedDifference | None
    a_ppl: float | None = None
    b_ppl: float | None = None
    missing: str = ""

    @property
    def verdict(self) -> str:
        return self.diff.verdict if self.diff is not None else MISSING

    def short(self, name_b: str | None = None) -> str:
        """``0.91x slm [0.88, 0.94]``: A's perplexity over B's with the paired interval."""
        if self.diff is None:
            return f"{self.missing} missing"
        d = self.diff
        return f"{d.ratio:.2f}x {name_b or self.b.label} [{math.exp(d.lo):.2f}, {math.exp(d.hi):.2f}]"


def compare(rows: list[dict], seq: dict[str, np.ndarray], a: Pick, b: Pick, domains: tuple[str, ...],
            tokens_per_seq: int) -> Comparison:
    sa, sb = side(rows, a, domains), side(rows, b, domains)
    if sa is None or sb is None:
        return Comparison(a, b, domains, None, missing=(a if sa is None else b).label)
    absent = [r["run_id"] for s in (sa, sb) for seeds in s.values() for r in seeds.values() if r["run_id"] not in seq]
    if absent:
        return Comparison(a, b, domains, None, missing=f"per-sequence NLLs of {len(absent)} runs")
    arrays = [{d: {s: seq[r["run_id"]] for s, r in seeds.items()} for d, seeds in x.items()} for x in (sa, sb)]
    diff = paired_difference(arrays[0], arrays[1], tokens_per_seq, replicates=rules.REPLICATES,
                             seed=rules.BOOTSTRAP_SEED, level=rules.LEVEL)
    return Comparison(a, b, domains, diff, macro_ppl(sa), macro_ppl(sb))


@dataclass
class Cell:
    word: str
    reason: str
    expected: str
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def as_expected(self) -> bool | None:
        if self.word == MISSING:
            return None
        exp = self.expected.split(" (")[0]
        if exp.startswith("not "):
            return self.word != exp[4:]
        return self.word == exp

    def text(self) -> str:
        mark = {True: "", False: " (not as expected)", None: ""}[self.as_expected]
        return f"**{self.word}**{mark}: {self.reason}"


@dataclass
class Verdict:
    rule: rules.Rule
    cells: dict[str, Cell]


SLM_IS = Pick("slm-is", None, "6M")
SLM_EQ = Pick("slm", "6M", "6M")
NOPT_BEST = Pick("slm-nopt")
SLM_TOP = Pick("slm", "6M", "1.5M")
EXPERT = {"mix": Pick("slm-mix", "6M", "1.5M"), "pn": Pick("slm-pn", "6M", "1.5M")}
SLM_D = Pick("slm-d", "2M", "1.5M")
LLM = Pick("llm", "2M", "1.5M")
SLM_SMALL_S = Pick("slm", "6M", "131k")


def _word(verdict: str, better: str, worse: str, tie: str) -> str:
    return {BETTER: better, WORSE: worse, TIE: tie}.get(verdict, MISSING)


def decide(rows: list[dict], seq: dict[str, np.ndarray], tokens_per_seq: int) -> list[Verdict]:
    """Every rule of :data:`rules_v3.RULES` on each subset its expectations name."""
    rows = [r for r in rows if r.get("test_nll") is not None]

    def cmp(a: Pick, b: Pick, domains) -> Comparison:
        return compare(rows, seq, a, b, domains, tokens_per_seq)

    out = []
    for rule in rules.RULES:
        cells = {}
        for subset, expected in rule.expect.items():
            ds = rules.SUBSETS[subset]
            kind = rule.claim.split()[-1]
            if rule.claim == "1":
                c1, c2 = cmp(SLM_IS, SLM_EQ, ds), cmp(SLM_IS, NOPT_BEST, ds)
                words = {c1.verdict, c2.verdict}
                word = (MISSING if MISSING in words else CONFIRMED if words == {BETTER}
                        else REFUTED if WORSE in words else INCONCLUSIVE)
                cell = Cell(word, f"slm-is {c1.short('slm')}; {c2.diff.ratio:.2f}x slm-nopt best"
                            if word != MISSING else f"{c1.missing or c2.missing} missing", expected, [c1, c2])
            elif rule.claim.startswith("2"):
                c = cmp(EXPERT[kind], SLM_TOP, ds)
                cell = Cell(_word(c.verdict, CONFIRMED, REFUTED, INCONCLUSIVE), f"{EXPERT[kind].strategy} {c.short('slm')}",
                            expected, [c])
            elif rule.claim == "3":
                c, llm = cmp(SLM_D, SLM_TOP, ds), cmp(SLM_D, LLM, ds)
                word = _word(c.verdict, REFUTED, CONFIRMED, CONFIRMED)
                reason = f"slm-d {c.short('slm g6M')}" + (f"; {llm.diff.ratio:.2f}x the LLM" if llm.diff else "")
                cell = Cell(word, reason, expected, [c, llm])
            elif rule.claim == "4":
                c = cmp(SLM_TOP, SLM_IS, ds)
                cell = Cell(_word(c.verdict, CONFIRMED, REFUTED, CONFIRMED), f"at N = 50, slm g6M {c.short('slm-is')}",
                            expected, [c])
            elif rule.claim == "5":
                cell = _entropy_cell(rows, ds, expected)
            elif rule.claim == "6":
                c = cmp(SLM_SMALL_S, NOPT_BEST, ds)
                cell = Cell(_word(c.verdict, CONFIRMED, REFUTED, INCONCLUSIVE), f"slm {c.short('slm-nopt best')}",
                            expected, [c])
            else:  # a rule this module does not know is a bug, not a silent gap
                raise ValueError(f"study v3: no decision for claim {rule.claim!r}")
            if cell.word == MISSING:
                cell.reason = "; ".join(f"{c.missing} missing" for c in cell.comparisons if c.diff is None) or cell.reason
            cells[subset] = cell
        out.append(Verdict(rule, cells))
    return out


def entropy_gains(rows: list[dict], expert: Pick, domains: tuple[str, ...]) -> list[tuple[str, float, float]] | None:
    """(domain, k = 16 entropy, slm NLL - expert NLL) per domain; None when a cell is missing."""
    ent = {r["domain"]: r["domain_entropy"] for r in rows
           if r["strategy"] == "slm-is" and r.get("domain_entropy") is not None
           and int(r.get("domain_entropy_k") or 0) == 16}
    e, s = side(rows, expert, domains), side(rows, SLM_TOP, domains)
    if e is None or s is None or any(d not in ent for d in domains):
        return None
    return [(d, ent[d], float(np.mean([r["test_nll"] for r in s[d].values()])
                              - np.mean([r["test_nll"] for r in e[d].values()]))) for d in domains]


def _entropy_cell(rows: list[dict], domains: tuple[str, ...], expected: str) -> Cell:
    parts, words = [], []
    for kind, pick in EXPERT.items():
        pts = entropy_gains(rows, pick, domains)
        if pts is None:
            return Cell(MISSING, f"{pick.label} or the k = 16 entropy missing", expected)
        x, y = [p[1] for p in pts], [p[2] for p in pts]
        rho = float(spearmanr(x, y).statistic)
        p_gt, p_lt = spearman_p(x, y, alternative="greater"), spearman_p(x, y, alternative="less")
        words.append(CONFIRMED if rho > 0 and p_gt < SIGNIFICANCE else
                     REFUTED if rho < 0 and p_lt < SIGNIFICANCE else INCONCLUSIVE)
        parts.append(f"{kind} rho {rho:+.2f} (p {min(p_gt, p_lt):.2f})")
    word = words[0] if len(set(words)) == 1 else INCONCLUSIVE
    return Cell(word, "; ".join(parts), expected)


def finetune_effect(rows: list[dict]) -> dict[str, Any]:
    """slm's test perplexity after / before fine-tuning (geometric mean over its runs), and how
    many fine-tunes of each strategy kept the starting weights (best_step 0)."""
    slm = [r for r in rows if r["strategy"] == "slm" and r.get("ppl_before") and r.get("ppl")]
    ratio = math.exp(float(np.mean([math.log(r["ppl"] / r["ppl_before"]) for r in slm]))) if slm else None
    worse = sum(r["ppl"] > r["ppl_before"] for r in slm)
    kept: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r.get("finetune_best_step") is None:
            continue
        k, n = kept.get(r["strategy"], (0, 0))
        kept[r["strategy"]] = (k + int(r["finetune_best_step"] == 0), n + 1)
    return {"slm_ratio": ratio, "slm_runs": len(slm), "slm_worse_after": worse, "kept_start": kept}
