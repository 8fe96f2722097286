"""The trainer on real text: the loss drops, resume is exact, early stopping keeps the best."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slmfactory.data.tokens.streams import PackedBatches, split_tokens
from slmfactory.models.arch.lm import build_model
from slmfactory.models.train.trainer import Trainer


class Recording(Trainer):
    """Records every step's loss; optionally dies right after a given step (a kill)."""

    die_after: int | None = None

    def train_step(self, step):
        if self.die_after is not None and step == self.die_after:
            raise KeyboardInterrupt("simulated kill")
        loss = super().train_step(step)
        self.losses[step] = loss
        return loss


def make(cfg, out_dir, cls=Recording, **train_overrides):
    tcfg = cfg.replace(**{f"pretrain.{k}": v for k, v in train_overrides.items()}).pretrain
    tokens = split_tokens(cfg, "generic", "train")
    valid = split_tokens(cfg, "generic", "valid")
    model = build_model(cfg.slm, 512, cfg.data.seq_len, seed=0)
    tr = cls(model, PackedBatches(tokens, cfg.data.seq_len, tcfg.batch_size, seed=1), tcfg,
             seq_len=cfg.data.seq_len, valid=valid, out_dir=out_dir, log=None)
    tr.losses = {}
    return tr


def test_loss_drops_on_real_text(tiny_cfg, tmp_path):
    tr = make(tiny_cfg, tmp_path / "a")
    first = tr.evaluate(max_tokens=4096)
    res = tr.fit()
    assert res.steps == tiny_cfg.pretrain.max_tokens // (8 * 64)
    assert res.best_valid_nll < first - 0.5, (first, res.best_valid_nll)
    assert np.mean([tr.losses[s] for s in range(5)]) > res.train_loss + 0.5
    assert math.isclose(res.flops, res.tokens * tr.flops_per_token)
    assert res.cost.tokens == res.tokens and res.cost.wall_seconds > 0


def test_resume_after_kill_gives_the_same_next_step_loss(tiny_cfg, tmp_path):
    full = make(tiny_cfg, tmp_path / "full")
    full.fit()
    killed = make(tiny_cfg, tmp_path / "killed")
    killed.die_after = 21  # checkpoint_every = 20: the step-20 checkpoint exists, step 21 is lost
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = make(tiny_cfg, tmp_path / "killed")
    assert resumed.resume() and resumed.step == 20
    resumed.fit(resume=False)
    # Steps 20.. replay exactly: same batches (step-indexed), same Adam moments.
    assert resumed.losses[20] == pytest.approx(full.losses[20], abs=1e-6)
    assert resumed.losses[39] == pytest.approx(full.losses[39], abs=1e-5)
    for name, p in resumed.model.state_dict().items():
        torch.testing.assert_close(p, full.model.state_dict()[name], atol=1e-5, rtol=1e-5)


def test_checkpoints_are_safetensors_and_torn_ones_are_ignored(tiny_cfg, tmp_path):
    tr = make(tiny_cfg, tmp_path / "c")
    tr.fit()
    root = tmp_path / "c" / "checkpoints"
    latest = tr.latest_checkpoint()
    assert latest.name == "step-00000040" and (latest / "model.safetensors").is_file()
    assert not list(root.rglob("*.pt")) and not list(root.rglob("*.bin"))
    # A half-written checkpoint from a killed save never becomes `latest`.
    (root / ".step-00000060.1-0badc0de.tmp").mkdir()
    again = make(tiny_cfg, tmp_path / "c")
    assert again.resume() and again.step == 40


def test_a_save_that_fails_keeps_the_checkpoint_it_would_replace(tiny_cfg, tmp_path, monkeypatch):
    import safetensors.torch

    tr = make(tiny_cfg, tmp_path / "c")
    tr.fit()
    root = tmp_path / "c" / "checkpoints"
    before = {p.name: p.read_bytes() for p in (root / "step-00000040").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        tr.save_checkpoint()  # the same step again: it would replace step-00000040
    # The finished checkpoint is untouched, `latest` still names it, nothing half-written is left.
    assert {p.name: p.read_bytes() for p in (root / "step-00000040").iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000040"]
    assert make(tiny_cfg, tmp_path / "c").resume()


def test_a_save_clears_the_staging_folders_a_killed_save_left(tiny_cfg, tmp_path):
    """A save killed while building its folder leaves ``.step-*.tmp``; one killed between
    its two renames leaves the replaced checkpoint as ``.step-*.old``. The next complete
    save removes both: they would pile up, a model's size each, over a long run."""
    tr = make(tiny_cfg, tmp_path / "c")
    root = tmp_path / "c" / "checkpoints"
    tr.step = 20
    tr.save_checkpoint()
    for leftover in (".step-00000040.4242-0badc0de.tmp", ".step-00000020.4242-0badf00d.old"):
        (root / leftover).mkdir()
        (root / leftover / "model.safetensors").write_bytes(b"\0" * 64)
    tr.step = 40
    tr.save_checkpoint()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000040"]
    assert tr.latest_checkpoint() == root / "step-00000040"


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tiny_cfg, tmp_path):
    """``latest`` names a checkpoint that is gone (a re-save of the same step killed between
    its renames) or is missing itself: resume takes the newest complete ``step-*`` folder,
    not one without its ``state.json`` (a removal cut short), instead of starting over."""
    import json
    import shutil

    tr = make(tiny_cfg, tmp_path / "c")
    root = tmp_path / "c" / "checkpoints"
    tr.step = 20
    tr.save_checkpoint()
    shutil.copytree(root / "step-00000020", root / "step-00000010")
    state = json.loads((root / "step-00000010" / "state.json").read_text())
    (root / "step-00000010" / "state.json").write_text(json.dumps({**state, "step": 10}))
    shutil.copytree(root / "step-00000020", root / "step-00000030")
    (root / "step-00000030" / "state.json").unlink()
    (root / "latest").write_text("step-00000040")
    again = make(tiny_cfg, tmp_path / "c")
    assert again.latest_checkpoint() == root / "step-00000020"
    assert again.resume() and again.step == 20
    (root / "latest").unlink()
    assert make(tiny_cfg, tmp_path / "c").latest_checkpoint() == root / "step-00000020"
    for complete in ("step-00000010", "step-00000020"):
        shutil.rmtree(root / complete)
    assert make(tiny_cfg, tmp_path / "c").latest_checkpoint() is None


class ScriptedValidation(Recording):
    """Validation losses come from a script the test controls (a model's numerics decide
    nothing), and the weights seen at each validation are kept to compare against."""

    script: list[float] = []

    def evaluate(self, tokens=None, max_tokens=None):
        if tokens is not None or max_tokens != self.cfg.eval_tokens:
            return super().evaluate(tokens, max_tokens)
        i = len(self.history)
        self.snapshots[self.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.script[i]


def scripted(cfg, out_dir, script):
    tr = make(cfg, out_dir, cls=ScriptedValidation, eval_every=5, patience=2, max_tokens=100 * 8 * 64,
              checkpoint_every=0)
    tr.script, tr.snapshots = script, {}
    return tr


def test_early_stopping_restores_the_best_weights(tiny_cfg, tmp_path):
    # The starting weights are validated first (step 0); validation then improves twice and
    # worsens twice: patience 2 stops at step 20 with the weights of the best (step 10).
    tr = scripted(tiny_cfg, tmp_path / "e", [6.0, 5.0, 4.0, 4.5, 4.6] + [9.0] * 20)
    res = tr.fit()
    assert res.stopped_early and res.steps == 20 and res.best_valid_nll == 4.0 and res.best_step == 10
    assert [s for s, _ in res.valid_history] == [0, 5, 10, 15, 20]
    for name, value in tr.model.state_dict().items():
        assert torch.equal(value, tr.snapshots[10][name]), name
    assert not torch.equal(tr.snapshots[10]["model.embed_tokens.weight"], tr.snapshots[20]["model.embed_tokens.weight"])


def test_a_fine_tune_that_only_hurts_returns_the_starting_weights_bitwise(tiny_cfg, tmp_path):
    """No step beats the starting weights on validation: the phase returns them exactly,
    says best_step 0, and is charged the steps it ran before early stopping ended it."""
    tr = scripted(tiny_cfg, tmp_path / "h", [4.0] + [4.5 + 0.1 * i for i in range(30)])
    start = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    res = tr.fit()
    assert res.best_step == 0 and res.best_valid_nll == 4.0 and res.stopped_early
    assert res.steps == 10 and res.tokens == 10 * 8 * 64 and res.cost.tokens == res.tokens
    assert tr.losses  # it did train, and moved the weights, before giving them back
    assert not torch.equal(tr.snapshots[10]["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    for name, value in tr.model.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_early_stopping_ends_a_fine_tune_long_before_a_large_budget(tiny_cfg, tmp_path):
    """A budget of 100 steps, validation best at step 5: early stopping ends the phase at
    step 15 and the cost charged is those 15 steps' tokens and FLOPs, not the budget's."""
    tr = scripted(tiny_cfg, tmp_path / "b", [6.0, 5.0] + [5.5] * 40)
    res = tr.fit()
    assert tr.max_steps == 100
    assert res.stopped_early and res.steps == 15 and res.best_step == 5
    assert res.cost.tokens == 15 * 8 * 64 and res.cost.flops == pytest.approx(15 * 8 * 64 * tr.flops_per_token)


def test_a_finished_phase_is_not_trained_again(tiny_cfg, tmp_path):
    """An early-stopped phase resumed from its final checkpoint trains zero steps and gives
    back the same result and cost (it used to train on from the restored best weights)."""
    first = scripted(tiny_cfg, tmp_path / "f", [6.0, 5.0, 4.0, 4.5, 4.6] + [9.0] * 20)
    res = first.fit()
    again = scripted(tiny_cfg, tmp_path / "f", [9.0] * 40)
    res2 = again.fit()
    assert again.losses == {}  # zero new steps
    assert res2 == res and res2.cost.flops == res.cost.flops and res2.cost.wall_seconds == res.cost.wall_seconds
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, first.model.state_dict()[name]), name


def test_budget_smaller_than_a_step_is_a_clear_error(tiny_cfg, tmp_path):
    from slmfactory.platform.errors import DataError

    with pytest.raises(DataError, match="less than one step"):
        make(tiny_cfg, tmp_path / "x", max_tokens=10)


@pytest.mark.slow  # torch.compile (inductor) builds its kernels first: ~40 s
def test_compiled_training_matches_eager(tiny_cfg, tmp_path):
    """``pretrain.compile`` changes kernels, not results: same per-step losses as eager."""
    # fp32 on both sides: under ``precision: auto`` a compiled phase may pick bf16.
    eager = make(tiny_cfg, tmp_path / "eager", max_tokens=6 * 8 * 64, checkpoint_every=0, eval_every=0,
                 compile="", precision="fp32")
    eager.fit()
    compiled = make(tiny_cfg, tmp_path / "compiled", max_tokens=6 * 8 * 64, checkpoint_every=0, eval_every=0,
                    compile="default", precision="fp32")
    assert compiled.step_model is not compiled.model  # the compiled wrapper trains ...
    compiled.fit()
    assert compiled.losses.keys() == eager.losses.keys() == set(range(6))
    for step in range(6):
        assert compiled.losses[step] == pytest.approx(eager.losses[step], abs=1e-4), step
    # ... and the plain module it wraps holds the trained weights that are saved.
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        assert torch.allclose(p, q, atol=1e-4)


def test_a_phase_that_repeats_its_data_reports_its_epochs(tiny_cfg, tmp_path):
    """Three passes' worth of budget over a pool of 12 sequences: epochs = 3 (a fresh pool
    would be below 1): the number the report and the dry-run flag."""
    tcfg = tiny_cfg.replace(**{"pretrain.max_tokens": 9 * 4 * 64, "pretrain.batch_size": 4,
                               "pretrain.eval_every": 0, "pretrain.checkpoint_every": 0}).pretrain
    tokens = split_tokens(tiny_cfg, "generic", "train")[:12 * 64]                 # 12 sequences
    model = build_model(tiny_cfg.slm, 512, 64, seed=0)
    res = Trainer(model, PackedBatches(tokens, 64, 4, seed=1), tcfg, seq_len=64, log=None).fit()
    assert res.steps == 9 and res.epochs == pytest.approx(3.0)
    big = split_tokens(tiny_cfg, "generic", "train")
    res = Trainer(build_model(tiny_cfg.slm, 512, 64, seed=0), PackedBatches(big, 64, 4, seed=1), tcfg,
                  seq_len=64, log=None).fit()
    assert res.epochs == pytest.approx(9 * 4 / (len(big) // 64)) and res.epochs < 1


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_sequences():
    from slmfactory.models.train.evaluation import bootstrap_ppl

    rng = np.random.default_rng(3)
    few = rng.gamma(4.0, 30.0, size=20)          # summed NLL of 20 sequences of 63 predictions
    many = rng.gamma(4.0, 30.0, size=2000)
    a, b = bootstrap_ppl(few, 63), bootstrap_ppl(many, 63)
    for r, seqs in ((a, few), (b, many)):
        assert r["lo"] < r["ppl"] < r["hi"]
        assert r["ppl"] == pytest.approx(math.exp(seqs.sum() / (len(seqs) * 63)))
    assert (b["hi"] - b["lo"]) < (a["hi"] - a["lo"]) / 4      # ~ 1/sqrt(n): 10x narrower
    assert bootstrap_ppl(few, 63) == a                        # seeded: the same interval every time
    same = bootstrap_ppl(np.full(50, 100.0), 63)               # no spread, no interval
    assert same["lo"] == pytest.approx(same["hi"]) == pytest.approx(same["ppl"])


def test_sequence_nlls_add_up_to_the_evaluated_nll(tiny_cfg):
    from slmfactory.models.train.evaluation import evaluate_nll, sequence_nlls

    tokens = split_tokens(tiny_cfg, "generic", "train")[:20 * 64]
    model = build_model(tiny_cfg.slm, 512, 64, seed=0)
    per_seq = sequence_nlls(model, tokens, 64, batch_size=8)
    total, n = evaluate_nll(model, tokens, 64, batch_size=8)
    assert per_seq.shape == (20,) and n == 20 * 63
    assert per_seq.sum() == pytest.approx(total, rel=1e-5)
