"""The paired bootstrap (analysis/paired.py) on synthetic per-sequence NLLs whose structure
the test fixes: sequences of very different difficulty, shared by both sides."""

from __future__ import annotations

import numpy as np
import pytest

from slmfactory.analysis.paired import BETTER, TIE, WORSE, paired_difference
from slmfactory.models.train.evaluation import bootstrap_ppl
from slmfactory.platform.errors import DataError

T = 127  # tokens predicted per sequence


def difficulty(n=256, seed=0):
    """Per-token NLL of each sequence: spread from ~3 to ~7 (what makes unpaired intervals wide)."""
    return np.random.default_rng(seed).uniform(3.0, 7.0, size=n)


def test_paired_interval_excludes_zero_where_the_unpaired_intervals_overlap():
    base = difficulty()
    noise = np.random.default_rng(1).normal(0.0, 0.02, size=base.size)
    a, b = (base - 0.05 + noise) * T, base * T          # A is better by 0.05 nats/token on every sequence
    ia, ib = bootstrap_ppl(a, T), bootstrap_ppl(b, T)
    assert ia["hi"] > ib["lo"] and ib["hi"] > ia["lo"]  # the two unpaired intervals overlap
    d = paired_difference({"code": {"0": a}}, {"code": {"0": b}}, T)
    assert d.verdict == BETTER and d.hi < 0 < -d.lo
    assert d.delta == pytest.approx(-0.05, abs=0.01) and d.sequences == 256 and d.domains == 1 and d.seeds == 0
    assert paired_difference({"code": {"0": b}}, {"code": {"0": a}}, T).verdict == WORSE


def test_paired_interval_contains_zero_when_the_difference_is_noise():
    base = difficulty()
    rng = np.random.default_rng(2)
    a, b = (base + rng.normal(0, 0.05, base.size)) * T, (base + rng.normal(0, 0.05, base.size)) * T
    d = paired_difference({"code": {"0": a}}, {"code": {"0": b}}, T)
    assert d.verdict == TIE and d.lo < 0 < d.hi


def test_domains_average_and_seeds_pair_where_both_sides_ran_both():
    rng = np.random.default_rng(3)
    a, b = {}, {}
    for i, dom in enumerate(("code", "legal")):
        base = difficulty(seed=10 + i)
        # Seed 1 of A is worse than seed 0 by 0.2: seed spread the interval must carry.
        a[dom] = {"0": (base - 0.1) * T, "1": (base + 0.1) * T}
        b[dom] = {"0": base * T + rng.normal(0, 0.01, base.size), "1": base * T + rng.normal(0, 0.01, base.size)}
    d = paired_difference(a, b, T)
    assert d.seeds == 2 and d.domains == 2 and d.sequences == 512
    assert d.delta == pytest.approx(0.0, abs=0.005)
    # Resampling the two seeds puts the seed spread (-0.1 / +0.1) into the interval.
    assert d.lo < -0.05 and d.hi > 0.05 and d.verdict == TIE
    # One common seed only: A's seeds are averaged per sequence, sequences alone resampled.
    one = paired_difference(a, {k: {"0": v["0"]} for k, v in b.items()}, T)
    assert one.seeds == 0 and one.delta == pytest.approx(0.0, abs=0.005) and one.hi - one.lo < 0.01


def test_mismatched_samples_are_clear_errors():
    a = {"code": {"0": difficulty() * T}}
    with pytest.raises(DataError, match="different domains"):
        paired_difference(a, {"legal": {"0": difficulty() * T}}, T)
    with pytest.raises(DataError, match="not the same sample"):
        paired_difference(a, {"code": {"0": difficulty(100) * T}}, T)


def test_the_learning_rate_is_chosen_on_validation_per_domain_not_on_test():
    """Three fine-tuning learning rates on two domains: each domain keeps the run with the lowest
    validation NLL, whatever its test NLL; the configuration's settings lose the chosen key."""
    from study.results import configs_from_rows, selected_rows

    def row(domain, lr, valid, test):
        return {"strategy": "slm", "generic_budget": "6e+06T", "spec_budget": "1.5e+06T", "in_domain_tokens": 40000,
                "settings": f"finetune.lr={lr},pretrain.seed=0", "domain": domain, "valid_nll": valid,
                "test_nll": test, "ppl": float(np.exp(test)), "params": 1000.0, "inference_flops_per_token": 1.0,
                "generic_flops": 1.0, "spec_flops": 1.0}

    rows = [row("code", 0.0003, 4.0, 3.0), row("code", 0.001, 3.5, 3.9), row("code", 0.003, 3.8, 2.0),
            row("legal", 0.0003, 5.0, 4.0), row("legal", 0.001, 5.1, 4.1), row("legal", 0.003, 4.2, 4.5)]
    kept = {r["domain"]: r for r in selected_rows(rows)}
    assert kept["code"]["selected"] == "finetune.lr=0.001" and kept["legal"]["selected"] == "finetune.lr=0.003"
    (c,) = configs_from_rows(rows)
    assert c.settings == "pretrain.seed=0" and c.nll == {"code": 3.9, "legal": 4.5}
    assert c.selected == {"code": "finetune.lr=0.001", "legal": "finetune.lr=0.003"}
    with pytest.raises(DataError, match="no validation NLL"):
        selected_rows([{**rows[0], "valid_nll": None}])
