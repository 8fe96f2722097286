"""The study behind docs/results.md (configs/study.yaml) plans what its claims need, and
``sweep.only`` — the per-strategy restriction it relies on — keeps exactly the trials it
names and rejects what it cannot mean. No Ray, no training: the plan and its dry-run text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from slmfactory.platform.config import load_config
from slmfactory.platform.errors import ConfigError
from slmfactory.sweeps.plan import describe, hours, plan_sweep

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs" / "study.yaml"
DOMAINS = ["legal", "biomedical", "literature", "code", "dictionary", "technical"]


def dry_run(cfg, plan) -> tuple[str, float, float]:
    """The dry-run's text and its projected generic and specialisation device-hours."""
    generic_h = sum(hours(p.work, cfg.device) for p in plan.generic)
    spec_h = sum(hours(w, cfg.device) for w in plan.spec_work.values())
    return describe(plan, cfg), generic_h, spec_h


@pytest.fixture(scope="module")
def study():
    cfg = load_config(STUDY, {"tracking.enabled": False})
    return cfg, plan_sweep(cfg, DOMAINS)


def test_the_study_plans_each_strategy_where_its_claims_need_it(study):
    cfg, plan = study
    per_strategy = Counter(t.strategy for t in plan.trials)
    # 6 domains x 2 spec budgets x 2 in-domain sizes = 24 cells per (strategy, generic budget);
    # slm/mix/pn at 3 generic budgets plus a second pretraining seed at the largest (40k
    # in-domain tokens only: 12 cells); llm, llm-lora at the largest; slm-d at 2M (its
    # teacher is the LLM's 8M phase, 4x); slm-is and slm-nopt take no generic axis.
    assert per_strategy == {"slm": 84, "slm-mix": 84, "slm-pn": 84, "llm": 24, "llm-lora": 24, "slm-d": 24,
                            "slm-is": 24, "slm-nopt": 24}
    assert len(plan.trials) == 372
    assert {t.domain for t in plan.trials} == set(DOMAINS)
    seeds = Counter((t.strategy, dict(t.settings)["pretrain.seed"], t.generic_label) for t in plan.trials
                    if t.strategy in ("slm", "slm-mix", "slm-pn"))
    assert seeds[("slm", 1, "8e+06T")] == 12 and seeds[("slm", 1, "2e+06T")] == 0
    assert {t.generic_label for t in plan.trials if t.strategy in ("llm", "llm-lora")} == {"8e+06T"}
    assert {t.generic_label for t in plan.trials if t.strategy == "slm-d"} == {"2e+06T"}
    assert {t.generic_label for t in plan.trials if t.strategy in ("slm-is", "slm-nopt")} == {"none"}


def test_the_study_shares_its_generic_phases(study):
    cfg, plan = study
    phases = Counter(f"{p.family}@{p.budget.label()}" for p in plan.generic)
    # One phase per (family, budget, seed): slm/mix/pn x 3 budgets + their seed-1 8M phase,
    # the LLM's 8M phase (llm-lora fine-tunes it too) and slm-d's (its stages reuse the
    # LLM's 8M and slm's 2M phases: same stage keys).
    assert sum(phases.values()) == 14
    assert phases["slm@8e+06T"] == phases["slm-mix@8e+06T"] == phases["slm-pn@8e+06T"] == 2
    assert phases["llm@8e+06T"] == 1 and phases["slm-d@2e+06T"] == 1
    llm = next(p for p in plan.generic if p.family == "llm")
    assert llm.trials == 48  # llm and llm-lora share it


def test_the_study_dry_run_projects_its_hours(study):
    cfg, plan = study
    text, generic_h, spec_h = dry_run(cfg, plan)
    assert text.startswith("sweep 'study': 372 trials, 14 shared generic phases")
    # The projection prices FLOPs on cpu-2core at its nominal MFU; the study's measured wall
    # time is in docs/results.md. It must stay a CPU-sized study: under 2 device-hours.
    assert 0.3 < generic_h < 1.5 and 0.05 < spec_h < 0.5
    assert f"all {generic_h + spec_h:.2f} cpu-2core hours" in text


def _tiny(**sweep):
    return load_config(REPO / "configs" / "tiny.yaml", {"workdir": "/tmp/unused", "tracking.enabled": False,
                                                        **{f"sweep.{k}": v for k, v in sweep.items()}})


def test_only_keeps_the_trials_any_of_its_restrictions_keeps():
    cfg = _tiny(strategies=["slm", "llm", "slm-is"], domains=["a", "b"], generic_tokens=[1000, 4000],
                spec_tokens=[100, 200], grid={"pretrain.seed": [0, 1]},
                only={"llm": {"generic_tokens": [4000], "pretrain.seed": [0]},
                      "slm": [{"pretrain.seed": [0]}, {"pretrain.seed": [1], "generic_tokens": [4000], "domains": ["a"]}],
                      "slm-is": {"spec_tokens": [200], "pretrain.seed": [0]}})
    trials = plan_sweep(cfg, ["a", "b"]).trials
    got = Counter((t.strategy, t.generic_label, dict(t.settings)["pretrain.seed"]) for t in trials)
    assert got == {("slm", "1e+03T", 0): 4, ("slm", "4e+03T", 0): 4, ("slm", "4e+03T", 1): 2,
                   ("llm", "4e+03T", 0): 4, ("slm-is", "none", 0): 2}
    assert {t.spec.value for t in trials if t.strategy == "slm-is"} == {200}
    assert {t.domain for t in trials if dict(t.settings)["pretrain.seed"] == 1} == {"a"}
    # Unrestricted strategies cross everything; a restriction never adds a trial.
    free = plan_sweep(_tiny(strategies=["slm"], domains=["a", "b"], generic_tokens=[1000, 4000],
                            spec_tokens=[100, 200]), ["a", "b"]).trials
    assert len(free) == 8


@pytest.mark.parametrize("only, message", [
    ({"llm": {"generic_tokens": [4000]}}, "sweep.only.llm: expected a strategy listed in sweep.strategies"),
    ({"slm": {"generic_tokens": [3000]}}, "sweep.only.slm.generic_tokens[0]: expected one of the axis' own values"),
    ({"slm": {"finetune.lr": [0.1]}}, "sweep.only.slm.finetune.lr: expected one of domains, generic_tokens"),
    ({"slm": [{"generic_tokens": [1000]}, {}]}, "sweep.only.slm[1]: expected a mapping of axes to value lists"),
    ({"slm": {"spec_tokens": []}}, "sweep.only.slm.spec_tokens: expected a non-empty list of values"),
])
def test_only_rejects_what_it_cannot_mean(only, message):
    with pytest.raises(ConfigError) as e:
        _tiny(strategies=["slm"], generic_tokens=[1000, 4000], spec_tokens=[100], only=only)
    assert message in str(e.value)


STUDY_V2 = REPO / "configs" / "study-v2.yaml"


@pytest.fixture(scope="module")
def study_v2():
    cfg = load_config(STUDY_V2, {"tracking.enabled": False})
    return cfg, plan_sweep(cfg, DOMAINS)


def test_study_v2_reaches_the_capacity_limited_regime(study_v2):
    """The experts can only pay where the SLM is capacity-limited: the largest generic budget
    gives at least 300 tokens per SLM parameter (the first study reached 30.5), and the
    mixture and projected network run at the two largest budgets with a second seed at the top."""
    from slmfactory.models.arch.lm import build_model, count_params

    cfg, plan = study_v2
    slm_params = count_params(build_model(cfg.slm, cfg.tokenizer.vocab_size, cfg.data.seq_len))
    top = max(cfg.sweep.generic_tokens)
    assert top / slm_params >= 300
    budgets = {(t.strategy, t.generic_label, dict(t.settings)["pretrain.seed"]) for t in plan.trials
               if t.strategy in ("slm-mix", "slm-pn")}
    assert budgets == {(s, g, 0) for s in ("slm-mix", "slm-pn") for g in ("6e+06T", "2e+07T")} | \
        {("slm-mix", "2e+07T", 1), ("slm-pn", "2e+07T", 1)}


def test_study_v2_gives_importance_sampling_budgets_of_generic_scale(study_v2):
    """slm-is (and slm-nopt beside it) take specialisation budgets of 1/4 and 1 x the 6M
    generic budget on the domains whose kind generic holds, and 3 x on code, so at N = 1 it
    meets slm at equal per-domain cost; every other strategy keeps the small budgets."""
    cfg, plan = study_v2
    per_strategy = Counter(t.strategy for t in plan.trials)
    # 6 domains x 2 spec x 2 in-domain = 24 cells per (strategy, generic budget); slm at 3
    # budgets + its seed-1 top (12); mix/pn at 2 + seed 1 (12); slm-is/nopt 24 small + 3 domains x 2 large + code at 3x.
    assert per_strategy == {"slm": 84, "slm-mix": 60, "slm-pn": 60, "slm-nopt": 31, "slm-is": 31,
                            "llm": 24, "llm-lora": 24, "slm-d": 24}
    large = {(t.domain, t.spec.value) for t in plan.trials if t.strategy == "slm-is" and t.spec.value > 131072}
    assert large == {(d, s) for d in ("code", "literature", "technical") for s in (1_500_000, 6_000_000)} | \
        {("code", 18_000_000)}
    assert max(t.spec.value for t in plan.trials if t.strategy not in ("slm-is", "slm-nopt")) == 131072


def test_study_v2_dry_run_projects_its_hours(study_v2):
    cfg, plan = study_v2
    text, generic_h, spec_h = dry_run(cfg, plan)
    assert text.startswith("sweep 'study-v2': 338 trials, 12 shared generic phases")
    # Priced on the measured cpu-2core rows: a study of a few hours on this machine, not days.
    assert 0.1 < generic_h < 2.0 and 0.05 < spec_h < 2.0
    assert f"all {generic_h + spec_h:.2f} cpu-2core hours" in text


STUDY_V3 = REPO / "configs" / "study-v3.yaml"


@pytest.fixture(scope="module")
def study_v3():
    cfg = load_config(STUDY_V3, {"tracking.enabled": False})
    return cfg, plan_sweep(cfg, DOMAINS)


def test_study_v3_gives_every_fine_tuning_strategy_the_same_large_budgets(study_v3):
    """The symmetric axis: slm, slm-mix and slm-pn at S = 1.5M and 6M on all six domains, as
    slm-is (6M, two seeds, three domains of them the negative controls) and slm-nopt; the
    learning-rate grid at 1.5M for slm and the experts; 186 trials."""
    cfg, plan = study_v3
    per_strategy = Counter(t.strategy for t in plan.trials)
    assert per_strategy == {"slm": 60, "slm-mix": 30, "slm-pn": 30, "slm-nopt": 24, "slm-is": 18,
                            "llm": 12, "slm-d": 12}
    for strategy in ("slm", "slm-mix", "slm-pn", "slm-nopt"):
        large = {(t.domain, t.spec.value) for t in plan.trials if t.strategy == strategy and t.spec.value >= 1_500_000}
        assert large == {(d, s) for d in DOMAINS for s in (1_500_000, 6_000_000)}, strategy
    is_large = {(t.domain, dict(t.settings)["pretrain.seed"]) for t in plan.trials
                if t.strategy == "slm-is" and t.spec.value == 6_000_000}
    assert is_large == {(d, seed) for d in DOMAINS for seed in (0, 1)}
    lrs = {(t.strategy, t.generic_label): set() for t in plan.trials}
    for t in plan.trials:
        if t.spec.value == 1_500_000:
            lrs[(t.strategy, t.generic_label)].add(dict(t.settings)["finetune.lr"])
    grid = {0.0003, 0.001, 0.003}
    assert lrs[("slm", "6e+06T")] == lrs[("slm-mix", "6e+06T")] == lrs[("slm-pn", "6e+06T")] == grid
    assert lrs[("slm", "2e+06T")] == lrs[("llm", "2e+06T")] == lrs[("slm-d", "2e+06T")] == {0.001}


def test_study_v3_dry_run_projects_its_hours(study_v3):
    cfg, plan = study_v3
    text, generic_h, spec_h = dry_run(cfg, plan)
    assert text.startswith("sweep 'study-v3': 186 trials, 7 shared generic phases")
    # Budgets priced as if spent (early stopping spends less): under the 1.5 h the study is sized for.
    assert 0.05 < generic_h < 0.5 and 0.1 < spec_h < 1.0 and generic_h + spec_h < 1.5
    assert f"all {generic_h + spec_h:.2f} cpu-2core hours" in text


def test_study_v3_rules_are_in_the_recipe_and_were_fixed_before_its_trials():
    """Every claim of study/rules_v3.py is stated in the recipe's header (claim, its comparison and
    the expected outcome), with the negative controls named; the lock names the commit that fixed
    them, and the rules file is unchanged since then (where git history is there to ask)."""
    import subprocess

    from study import rules_v3
    from study.page_v3 import rules_fixed

    header = "\n".join(line[2:] for line in STUDY_V3.read_text().splitlines() if line.startswith("#"))
    flat = " ".join(header.split())
    for rule in rules_v3.RULES:
        number = rule.claim.split()[0]
        assert f"Claim {number}" in flat, rule.claim
        for name in [*rule.favourite.split()[0].split("/"), *(r.split()[0] for r in rule.rivals)]:
            assert name in flat, (rule.claim, name)
    assert all(d in flat for d in rules_v3.CONTROLS) and "NOT confirmed on the negative controls" in flat
    assert rules_v3.RULES[0].expect["negative controls"].startswith("not confirmed")
    fixed = rules_fixed()
    assert len(fixed["commit"]) == 40 and fixed["date"].startswith("2026-12-07")
    # Changed after the lock, before any trial ran: said with its date and reason.
    assert [c[:2] for c in rules_v3.CHANGED] == [("2, 3, 4, 5", "2026-12-07")]
    git = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", fixed["commit"]], capture_output=True)
    if git.returncode == 0:  # a clone with history: the rules are the ones that commit fixed
        changed = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", fixed["commit"], "--",
                                  "study/rules_v3.py"], capture_output=True)
        assert changed.returncode == 0 or rules_v3.CHANGED, "study/rules_v3.py changed after its lock, CHANGED says nothing"
