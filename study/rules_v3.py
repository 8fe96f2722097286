"""Study v3's decision rules, fixed before its first trial ran (``configs/study-v3.yaml``'s
header says the same in prose; ``tests/test_study.py`` checks both hold every claim).

Each claim compares named configurations by a *paired* bootstrap of the difference in mean
test NLL per token (:func:`slmfactory.analysis.paired.paired_difference`): every strategy is
scored on the same sampled test sequences of a domain, so the difference is resampled per
sequence (the same draws for both sides), per domain, and averaged over the subset's
domains; where both sides ran the same two or more seeds, seeds are resampled too.

The verdict words, for a comparison "A against B" on a subset of domains:

- ``better``: the 95% interval of NLL(A) - NLL(B) lies below 0;
- ``worse``: it lies above 0;
- ``tie``: it contains 0.

A configuration's fine-tuning learning rate, where the study ran a grid of them, is the one
with the lowest validation NLL on each domain (never the test split), and "best run" of a
strategy means best on validation too. ``RULES_FIXED`` (``study/rules_v3.lock``) names the
commit that fixed these rules; a rule changed afterwards is listed in ``CHANGED`` with its
date and reason, and the page prints both.
"""

from __future__ import annotations

from dataclasses import dataclass

COVERED = ("code", "literature", "technical")
"""The domains whose kind of text the generic corpus holds (docs/corpus.md)."""
CONTROLS = ("legal", "biomedical", "dictionary")
"""The negative controls: generic holds nothing of their kind."""
ALL_SIX = COVERED + CONTROLS
SUBSETS = {"all six": ALL_SIX, "the three generic covers": COVERED, "negative controls": CONTROLS}

LEVEL = 0.95
REPLICATES = 2000
BOOTSTRAP_SEED = 0
LR_GRID = (3e-4, 1e-3, 3e-3)
"""Fine-tuning learning rates, chosen per domain on validation where the study ran all three:
a half-decade either side of v2's single 1e-3 (the paper's pretraining lr / 3), the top one
the pretraining's own."""


@dataclass(frozen=True)
class Rule:
    claim: str
    """The claim's number and kind (``2 mix``, ``2 pn``: one verdict per expert kind)."""
    statement: str
    favourite: str
    """The configuration the claim is about: ``strategy gGENERIC sSPEC`` (budgets as labels)."""
    rivals: tuple[str, ...]
    decide: str
    """The rule, one sentence, in the verdict words above."""
    expect: dict[str, str]
    """Subset -> the outcome expected before the data (the paper's, or a control's)."""


RULES: tuple[Rule, ...] = (
    Rule("1", "slm-is is the best small model at a large specialisation budget (N = 1)",
         "slm-is s6M",
         ("slm g6M s6M (equal per-domain cost at N = 1)", "slm-nopt best run (S chosen on validation)"),
         "confirmed if slm-is is better than every rival; refuted if any rival is better than slm-is; "
         "else inconclusive",
         {"all six": "confirmed", "the three generic covers": "confirmed",
          "negative controls": "not confirmed (generic text holds nothing to resample)"}),
    Rule("2 mix", "the hard mixture beats slm at the same generic budget after fine-tuning",
         "slm-mix g6M s1.5M", ("slm g6M s1.5M",),
         "confirmed if slm-mix is better; refuted if worse; tie: inconclusive",
         {"all six": "refuted (the paper's Table 8 has slm-mix behind after fine-tuning)"}),
    Rule("2 pn", "the projected network beats slm at the same generic budget after fine-tuning",
         "slm-pn g6M s1.5M", ("slm g6M s1.5M",),
         "confirmed if slm-pn is better; refuted if worse; tie: inconclusive",
         {"all six": "confirmed (the paper's support for experts is slm-pn)"}),
    Rule("3", "distillation loses once its teacher is paid for",
         "slm-d g2M s1.5M",
         ("slm g6M s1.5M (same size, generic cost at most slm-d's, teacher included)", "llm g2M s1.5M (5x the size)"),
         "against the same-size rival: confirmed if slm-d is worse or tied, refuted if slm-d is better; "
         "the LLM is shown beside, not deciding (it serves at 5x the size)",
         {"all six": "confirmed"}),
    Rule("4", "slm-is loses its edge as the number of domains N grows",
         "slm-is s6M", ("slm g6M s1.5M (per-domain cost at N = 50: 6M / 50 + its fine-tune, below slm-is's 6M)",),
         "confirmed if at N = 50 the cheaper slm is better than slm-is or tied; refuted if slm-is is still better",
         {"all six": "confirmed", "the three generic covers": "confirmed"}),
    Rule("5", "the experts' gain over slm grows with the domain's cluster entropy (k = 16)",
         "slm-mix/slm-pn g6M s1.5M", ("slm g6M s1.5M",),
         "confirmed if Spearman's rho of (slm NLL - expert NLL) against entropy over the six domains is "
         "positive with one-sided p < 0.05; refuted if negative with p < 0.05; else inconclusive",
         {"all six": "inconclusive (6 domains give little power)"}),
    Rule("6", "generic pretraining beats training on the domain only",
         "slm g6M s131k", ("slm-nopt best run (S chosen on validation)",),
         "confirmed if slm is better; refuted if worse; tie: inconclusive",
         {"all six": "confirmed"}),
)

CHANGED: tuple[tuple[str, str, str], ...] = (
    ("2, 3, 4, 5", "2026-12-07",
     "the generic budget of the experts and of slm as their rival moved from 20M to 6M, and the LLM (slm-d's teacher) "
     "from 6M to 2M, 25 minutes into the sweep, before any trial had run (only slm's 2M and 6M generic phases had): "
     "this machine trained at 10-20k tokens/s beside the session's other work, a third of what sized the grid, and "
     "the 20M phases (60M tokens) could not finish in the session. The comparisons and decision words are unchanged; "
     "claim 2 now reads the experts below the regime v2's gate G1 found at 20M (G1 is in the study log)."),
)
"""(claim, date, what changed and why) for every rule changed after the first trial ran."""
