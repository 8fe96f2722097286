"""What the two study pages' sections share: markdown from a docstring, the claims in detail,
Table 4, the sentence on what an inconclusive verdict lacks, the strategies' order and h:mm:ss
(``page.py`` and ``sections.py`` both import it; neither imports the other)."""

from __future__ import annotations

import math
import re

import numpy as np

from slmfactory.analysis.measured import MeasuredConfig
from study import claims as rc

STRATEGY_ORDER = ("slm", "slm-nopt", "llm", "llm-lora", "slm-is", "slm-d", "slm-mix", "slm-pn")


def strategy_order(c: MeasuredConfig) -> tuple:
    s = STRATEGY_ORDER.index(c.strategy) if c.strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return (s, c.strategy, rc.budget_value(c.generic_budget), c.settings)


def md(doc: str) -> str:
    """A docstring as markdown: paragraphs rejoined, ``- `` bullets kept, rst roles dropped."""
    doc = re.sub(r":\w+:`([^`]+)`", r"`\1`", doc.replace("``", "`"))
    out = []
    for para in doc.strip().split("\n\n"):
        items, cur = [], []
        for line in para.splitlines():
            line = line.strip()
            if line.startswith("- ") and cur:
                items.append(" ".join(cur))
                cur = []
            cur.append(line)
        items.append(" ".join(cur))
        out.append("\n".join(items))
    return "\n\n".join(out)


def section_claims(claims: list[rc.Claim]) -> str:
    out = []
    for c in claims:
        seed = f" ({c.seed_note}: its deciding configurations ran with one seed)" if c.seed_note else ""
        out += [f"### Claim {c.number}: {c.statement}", "", f"Verdict: **{c.verdict}**{seed}.", "",
                "Rule: " + md(c.rule), ""]
        if c.parts:
            out += ["| part | verdict | seeds | reason | cells |", "|---|---|---|---|---|"]
            for p in c.parts:
                v = p.verdict + (f" (comparison alone: {p.raw})" if p.raw else "")
                why = p.reason + (f" ({p.detail})" if p.detail else "")
                out.append(f"| {p.name} | {v} | {p.seeds or '-'} | {why} | {'<br>'.join(p.cells) or '-'} |")
            out.append("")
        out += [f"- {n}" for n in c.notes] + ([""] if c.notes else [])
    return "\n".join(out)


def section_table4(configs: list[MeasuredConfig]) -> str:
    """Table 4: before -> after fine-tuning, rows (strategy, settings, generic budget),
    columns (in-domain size, spec. budget)."""
    cols = sorted({(c.in_domain, c.spec_budget) for c in configs}, key=lambda k: (k[0], rc.budget_value(k[1])))
    rows: dict[tuple, dict[tuple, MeasuredConfig]] = {}
    for c in sorted(configs, key=strategy_order):
        rows.setdefault((c.strategy, c.settings, c.generic_budget), {})[(c.in_domain, c.spec_budget)] = c
    head = ["strategy", "settings", "generic budget"] + [f"n={n:,}, s={s}" for n, s in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (s, st, g), by in rows.items():
        cells = []
        for k in cols:
            c = by.get(k)
            if c is None:
                cells.append("-")
                continue
            before = (f"{math.exp(float(np.mean(np.log(list(c.ppl_before.values()))))):.2f} → "
                      if set(c.ppl_before) == set(c.nll) else "")
            cells.append(before + ppl_iv(c))
        lines.append(f"| {s} | {st or '-'} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def limit_sentence(verdict: str) -> str:
    if "regime not reached" in verdict:
        return ("the generic budget is far below the paper's in tokens per parameter (see the decision gate); "
                "the experts' capacity cannot pay yet.")
    if "cells missing" in verdict:
        return "the grid (or the finished part of the study) lacks the cells named; rerun the page when they exist."
    if "seeds disagree" in verdict:
        return "one seed's test rejects and another's does not: the effect is not stable across pretraining seeds."
    if "overlap" in verdict or "p =" in verdict or "not significant" in verdict:
        return ("the differences are within the intervals of a small test set and few domains; more test "
                "sequences per domain or more domains would narrow them.")
    if "not the cheapest" in verdict:
        return ("even at N = 1 another small model reaches slm-is's perplexity for less (slm-is pays a resampled "
                "pretraining per domain); the paper's premise, slm-is best at large specialisation budgets (claim 1), "
                "does not hold at this scale, so there is no edge to lose.")
    if "mixed" in verdict:
        return "parts disagree: the claim holds in some cells and fails in others at this scale."
    return "see its parts."


def ppl_iv(c: MeasuredConfig) -> str:
    iv = c.interval
    return f"{c.ppl_macro:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else f"{c.ppl_macro:.2f} [n/a]"




def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
