"""Budget semantics (no Ray, no training): both axes mean the same thing for every
strategy, warm-up follows a phase's own steps, the sweep's grid keys trials by every
setting that differs, and the generic pool covers the sweep's largest budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmfactory.models.strategies import get_strategy
from slmfactory.platform.config import load_config
from slmfactory.platform.errors import ConfigError
from slmfactory.sweeps.plan import plan_sweep, size_generic_pool
from slmfactory.trial import trial_of

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def demo(**overrides):
    return load_config(DEMO, {"workdir": "/tmp/unused", **overrides})


@pytest.mark.parametrize("strategy", ["slm", "slm-nopt", "llm", "llm-lora", "slm-is", "slm-d", "slm-mix", "slm-pn"])
@pytest.mark.parametrize("spec", [32768, 131072])
def test_every_strategy_projects_its_spec_budget_within_one_step(strategy, spec):
    """The spec axis is everything a strategy trains once the domain is known (slm-is:
    resampled pretraining + fine-tune; slm-d: teacher + student; slm-nopt: from scratch):
    its training tokens add up to the label, within one step per phase. slm-is used to
    pretrain for the *generic* budget (7x slm's spend under the same label) and slm-nopt
    for its own 65,536 tokens whatever the sweep said."""
    cfg = demo(**{"strategy.name": strategy, "finetune.max_tokens": spec})
    _, work = get_strategy(strategy).projected_work(cfg)
    train = [w for w in work if w.kind == "train"]
    step = cfg.finetune.batch_size * cfg.data.seq_len
    assert spec - len(train) * step < sum(w.tokens for w in train) <= spec


@pytest.mark.parametrize("selection", ["most-frequent", "best-after-finetune"])
def test_a_mixtures_fine_tunes_split_the_spec_budget(selection):
    cfg = demo(**{"strategy.slm-mix.selection": selection, "finetune.max_tokens": 131072})
    _, work = get_strategy("slm-mix").projected_work(cfg)
    assert len(work) == (4 if selection == "best-after-finetune" else 1)
    assert sum(w.tokens for w in work) == 131072


def lr_curve(tcfg, seq_len: int) -> list[float]:
    """The trainer's learning rate at every step of a phase with these settings."""
    from types import SimpleNamespace

    from slmfactory.models.train.trainer import Trainer

    steps = tcfg.max_tokens // (tcfg.batch_size * seq_len)
    probe = SimpleNamespace(cfg=tcfg, max_steps=steps)
    return [Trainer.lr_at(probe, s) for s in range(steps)]


@pytest.mark.parametrize("share", [0.05, 0.25, 0.7])
def test_a_mixture_experts_learning_rate_reaches_its_peak(share):
    """An expert gets ``share`` of the generic budget; with the single model's 20-step
    warm-up a 5% expert (4 steps) peaked at a fifth of the learning rate."""
    from slmfactory.models.strategies.slm_mix import expert_train_config

    cfg = demo()
    tcfg = expert_train_config(cfg, share, flops_per_step=1.0)
    lrs = lr_curve(tcfg, cfg.data.seq_len)
    assert max(lrs) == pytest.approx(cfg.pretrain.lr)
    assert lrs.index(max(lrs)) < len(lrs) - 1 or len(lrs) == 1   # then it decays on its own steps


def test_slm_nopt_and_slm_is_warm_up_on_their_own_steps():
    cfg = demo(**{"finetune.max_tokens": 32768})
    nopt = get_strategy("slm-nopt").finetune_config(cfg)
    is_pre = get_strategy("slm-is").pretrain_config(cfg)
    for tcfg in (nopt, is_pre):
        assert max(lr_curve(tcfg, cfg.data.seq_len)) == pytest.approx(cfg.pretrain.lr)
    assert nopt.max_tokens == 32768 and nopt.lr == cfg.pretrain.lr


def test_slm_d_teacher_pretrains_longer_than_the_student_by_default():
    cfg = demo(**{"strategy.slm-d.teacher_pretrain_multiple": 4})
    assert get_strategy("slm-d").teacher_pretrain_config(cfg).max_tokens == 4 * cfg.pretrain.max_tokens
    default = load_config(REPO / "configs" / "tiny.yaml", {"workdir": "/tmp/unused"})
    assert get_strategy("slm-d").teacher_pretrain_config(default).max_tokens == 4 * default.pretrain.max_tokens


def test_strategies_without_a_generic_phase_are_not_multiplied_by_the_generic_axis():
    cfg = demo(**{"sweep.generic_tokens": [100000, 200000], "sweep.spec_tokens": [32768],
                  "sweep.domains": ["legal", "biomedical", "code"]})
    plan = plan_sweep(cfg, ["legal", "biomedical", "code"])
    by = {}
    for t in plan.trials:
        by.setdefault(t.strategy, []).append(t)
    assert len(by["slm-is"]) == len(by["slm-nopt"]) == 3 and len(by["slm"]) == 6
    assert all(t.generic is None and t.generic_label == "none" for t in by["slm-is"] + by["slm-nopt"])
    # The trial a run config is has the same key the plan gave it.
    t = by["slm-is"][0]
    assert trial_of(t.config(cfg)).key == t.key


def test_two_seeds_are_two_trials_keyed_apart_and_ablations_share_nothing_they_should_not():
    cfg = demo(**{"sweep.strategies": ["slm", "slm-mix"], "sweep.domains": ["legal"], "sweep.spec_tokens": [32768],
                  "sweep.grid": {"finetune.seed": [0, 1], "strategy.slm-mix.experts": [4, 8]}})
    plan = plan_sweep(cfg, ["legal"])
    keys = {t.key for t in plan.trials}
    assert len(plan.trials) == len(keys) == 2 * 2 * 2
    seeds = {t.settings_label for t in plan.trials if t.strategy == "slm"}
    assert seeds == {"finetune.seed=0,strategy.slm-mix.experts=4", "finetune.seed=1,strategy.slm-mix.experts=4",
                     "finetune.seed=0,strategy.slm-mix.experts=8", "finetune.seed=1,strategy.slm-mix.experts=8"}
    for t in plan.trials:
        tcfg = t.config(cfg)
        assert tcfg.finetune.seed == dict(t.settings)["finetune.seed"]
        assert trial_of(tcfg).key == t.key
    # A fine-tune seed shares the generic phase; a different expert count is another phase.
    phases = sorted(f"{p.family}:{p.trials}" for p in plan.generic)
    assert phases == ["slm-mix:2", "slm-mix:2", "slm:4"]


@pytest.mark.parametrize("grid, needle", [
    ({"finetune.sede": [0, 1]}, "sweep.grid.finetune.sede: unknown config key"),
    ({"pretrain.max_tokens": [1, 2]}, "sweep.grid.pretrain.max_tokens"),
    ({"finetune.seed": []}, "sweep.grid.finetune.seed"),
    ({"finetune.lr": [-1.0]}, "finetune.lr"),
])
def test_bad_grid_keys_fail_naming_the_key(grid, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        cfg = demo(**{"sweep.grid": grid})
        plan_sweep(cfg, ["legal", "biomedical", "code"])


def test_the_embedded_pool_is_sized_to_the_largest_generic_budget():
    small_pool = {"cluster.max_generic_windows": 3000}
    cfg = demo(**{"sweep.generic_tokens": [200000, 1000000], **small_pool})
    sized = size_generic_pool(cfg)
    assert sized.cluster.max_generic_windows * sized.cluster.window_tokens * 0.8 >= 1000000
    # A pool that already holds the largest budget is left as the recipe says.
    cfg = demo(**{"sweep.generic_tokens": [200000], "pretrain.max_tokens": 200000, **small_pool})
    assert size_generic_pool(cfg).cluster.max_generic_windows == 3000
    assert size_generic_pool(demo()).cluster.max_generic_windows == demo().cluster.max_generic_windows


def test_two_seeds_are_two_mlflow_runs(tmp_path):
    """``log_trial`` finds a trial's run by its key: two seeds of one configuration must not
    land in (and be skipped as) one run."""
    from mlflow.tracking import MlflowClient

    from slmfactory.trial import TrialRecord, log_trial

    cfg = demo(**{"workdir": str(tmp_path), "sweep.grid": {"finetune.seed": [0, 1]}, "strategy.name": "slm",
                  "data.domain": "legal"})
    ids = set()
    for seed in (0, 1):
        tcfg = cfg.replace(**{"finetune.seed": seed})
        trial = trial_of(tcfg)
        record = TrialRecord(name=trial.name, key=trial.key, params={"finetune.seed": seed},
                             tags={"strategy": "slm", "domain": "legal", "settings": trial.settings_label},
                             metrics={"ppl_macro": 100.0 + seed}, model_path=str(tmp_path / "none"))
        ids.add(log_trial(tcfg, "budgets", trial.key, record))
    runs = MlflowClient(cfg.tracking_uri).search_runs(
        [MlflowClient(cfg.tracking_uri).get_experiment_by_name("budgets").experiment_id])
    assert len(ids) == 2 and len(runs) == 2
    assert {r.data.tags["settings"] for r in runs} == {"finetune.seed=0", "finetune.seed=1"}
