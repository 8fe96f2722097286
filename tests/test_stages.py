"""Every cached stage is keyed by what changes it: a changed input recomputes exactly the
stages downstream of it, an unchanged one is reused, a finished phase never trains again."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from slmfactory.models.train.launch import LocalLauncher
from slmfactory.models.strategies.base import StrategyContext, get_strategy
from slmfactory.platform.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
DOMAIN = "legal"


class CountingLauncher(LocalLauncher):
    """The real in-process launcher, recording which phases it was asked to train."""

    def __init__(self):
        super().__init__(device="cpu", log=None)
        self.phases: list[str] = []

    def fit(self, factory, out_dir, phase, resources=None):
        self.phases.append(phase)
        return super().fit(factory, out_dir, phase, resources)


def small(work: Path, **overrides):
    """The tiny recipe with 8 pretraining and up to 4 fine-tuning steps."""
    return load_config(TINY, {"workdir": str(work), "corpus.domains": [DOMAIN],
                              "pretrain.max_tokens": 8 * 8 * 64, "pretrain.eval_every": 4,
                              "pretrain.checkpoint_every": 4, "finetune.max_tokens": 4 * 8 * 64,
                              "finetune.eval_every": 2, **overrides})


def run(cfg, strategy: str = "slm"):
    launcher = CountingLauncher()
    ctx = StrategyContext(cfg, launcher, log=None)
    s = get_strategy(strategy)
    generic = s.pretrain(ctx)
    rec = s.specialize(ctx, generic, DOMAIN)
    return launcher.phases, generic, rec


def keys(cfg) -> dict[str, str]:
    from slmfactory.data.tokens.streams import token_stage
    from slmfactory.data.tokens.tokenizer import tokenizer_stage

    return {"tokenizer": tokenizer_stage(cfg).key, "generic tokens": token_stage(cfg, "generic", "train").key,
            "domain tokens": token_stage(cfg, DOMAIN, "train").key}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A workdir after one `slm` run (corpus, tokenizer, tokens, generic phase, fine-tune)."""
    from slmfactory.data.corpus.build import build_sample_corpus

    cfg = small(tmp_path_factory.mktemp("stages") / "work")
    build_sample_corpus(cfg)
    phases, generic, rec = run(cfg)
    assert phases == ["pretrain/slm", f"finetune/slm/{DOMAIN}"]
    return cfg, generic, rec


def copy_of(cfg, tmp_path, **overrides):
    work = tmp_path / "work"
    shutil.copytree(cfg.root, work)
    return small(work, **overrides)


def test_an_unchanged_rerun_trains_nothing_and_returns_the_same_numbers(built, tmp_path):
    cfg, generic, rec = built
    again = copy_of(cfg, tmp_path)  # a moved workdir: stages refer to files relatively
    phases, generic2, rec2 = run(again)
    assert phases == []
    assert rec2.metrics["test_ppl"] == rec.metrics["test_ppl"]
    assert rec2.spec_cost.flops == rec.spec_cost.flops and rec2.spec_cost.wall_seconds == rec.spec_cost.wall_seconds
    assert generic2.cost.flops == generic.cost.flops


def test_new_fine_tuning_settings_retrain_only_the_fine_tune(built, tmp_path):
    cfg, _, rec = built
    changed = copy_of(cfg, tmp_path, **{"finetune.lr": cfg.finetune.lr / 2})
    phases, _, rec2 = run(changed)
    assert phases == [f"finetune/slm/{DOMAIN}"]
    assert keys(changed) == keys(cfg)
    assert rec2.metrics["test_ppl"] != rec.metrics["test_ppl"]


def test_another_vocab_size_retrains_tokenizer_tokens_and_every_phase(built, tmp_path):
    cfg, _, _ = built
    changed = copy_of(cfg, tmp_path, **{"tokenizer.vocab_size": 384})
    before, after = keys(cfg), keys(changed)
    assert all(before[k] != after[k] for k in before)
    phases, _, rec = run(changed)
    assert phases == ["pretrain/slm", f"finetune/slm/{DOMAIN}"]
    from slmfactory.models.train.phases import vocab_size_of

    assert vocab_size_of(changed) == 384 and rec.params < 200_000


def test_a_rebuilt_corpus_invalidates_what_reads_the_changed_files(built, tmp_path):
    from slmfactory.data.corpus.build import build_sample_corpus

    cfg, _, _ = built
    same = copy_of(cfg, tmp_path)
    build_sample_corpus(same)  # rebuilt, byte-identical: every stage is reused
    assert keys(same) == keys(cfg)
    assert run(same)[0] == []
    reseeded = same.replace(**{"corpus.seed": 1})
    build_sample_corpus(reseeded)  # other splits: other files, other tokens, other phases
    after = keys(reseeded)
    assert all(after[k] != keys(cfg)[k] for k in after)
    assert run(reseeded)[0] == ["pretrain/slm", f"finetune/slm/{DOMAIN}"]


def test_an_early_stopped_fine_tune_rerun_takes_zero_steps(built, tmp_path):
    """slm-nopt trained with Adam steps below fp32 resolution: the weights cannot change, so
    validation cannot improve on the starting weights' (step 0) and patience 1 stops at the
    next evaluation, after one step, keeping the starting weights (best step 0)."""
    cfg, _, _ = built
    nopt = copy_of(cfg, tmp_path, **{"strategy.slm-nopt.lr": 1e-30, "finetune.patience": 1,
                                     "finetune.eval_every": 1, "finetune.max_tokens": 20 * 8 * 64})
    phases, _, rec = run(nopt, "slm-nopt")
    assert phases == [f"finetune/slm-nopt/{DOMAIN}"] and rec.metrics["finetune_steps"] == 1
    assert rec.metrics["finetune/best_step"] == 0
    phases2, _, rec2 = run(nopt, "slm-nopt")
    assert phases2 == []
    assert rec2.metrics["test_ppl"] == rec.metrics["test_ppl"] and rec2.metrics["finetune_steps"] == 1
    assert rec2.spec_cost == rec.spec_cost


def test_device_hours_follow_todays_device_profile(built, tmp_path):
    cfg, generic, _ = built
    slower = copy_of(cfg, tmp_path, **{"device.mfu": cfg.device.mfu / 2, "device.name": "half"})
    phases, generic2, rec2 = run(slower)
    assert phases == []  # nothing retrained; the stored FLOPs are converted anew
    assert generic2.cost.device == "half"
    assert generic2.cost.device_hours == pytest.approx(2 * generic.cost.device_hours, rel=1e-9)
    assert math.isclose(generic2.cost.flops, generic.cost.flops)


def test_a_finished_stage_is_published_whole(tmp_path):
    from slmfactory.platform.stages import Stage

    stage = Stage.of(tmp_path, "demo", "x", a=1)
    assert Stage.of(tmp_path, "demo", "x", a=1.0).key == stage.key  # same budget, same key
    assert Stage.of(tmp_path, "demo", "x", a=2).key != stage.key

    def boom(work):
        (work / "half.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        stage.build(boom)
    assert not stage.done and not stage.dir.exists()
    info = stage.build(lambda work: (work / "out.txt").write_text("whole") and {"n": 1})
    assert stage.done and info == {"n": 1} and stage.path("out.txt").read_text() == "whole"
    assert stage.build(lambda work: pytest.fail("a finished stage is not rebuilt")) == {"n": 1}


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    from slmfactory.platform.stages import atomic_path, write_json_atomic, write_text_atomic

    dest = tmp_path / "out" / "data.json"
    write_json_atomic(dest, {"version": 1})  # creates the folder
    assert dest.read_text() == '{\n "version": 1\n}'

    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(dest) as tmp, open(tmp, "w") as f:
            f.write('{"version": 2, "half')  # a part of the new file is on disk ...
            f.flush()
            assert tmp.parent == dest.parent and tmp.is_file() and tmp != dest
            raise RuntimeError("killed mid-write")  # ... when the writer dies
    assert dest.read_text() == '{\n "version": 1\n}'
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.json"]

    write_text_atomic(dest, "é\n")  # success replaces the file whole, as UTF-8
    assert dest.read_bytes() == "é\n".encode("utf-8")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.json"]


def test_an_atomic_folder_is_published_whole_or_not_at_all(tmp_path):
    from slmfactory.platform.stages import atomic_path

    dest = tmp_path / "unpacked"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "first.txt").write_text("one")
            raise RuntimeError("killed mid-unpack")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "first.txt").write_text("one")
        assert not dest.exists()  # nothing at the destination until the block ends
    assert [p.name for p in tmp_path.iterdir()] == ["unpacked"] and (dest / "first.txt").read_text() == "one"


def test_an_atomic_folder_replaces_a_finished_one_whole(tmp_path):
    from slmfactory.platform.stages import atomic_dir, replace_dir

    dest = tmp_path / "step-00000040"
    with atomic_dir(dest) as tmp:
        (tmp / "state.json").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "model.safetensors").write_text("half")
            assert (dest / "state.json").read_text() == "first"  # the old one is served meanwhile
            raise RuntimeError("killed mid-save")
    assert [p.name for p in tmp_path.iterdir()] == [dest.name] and sorted(p.name for p in dest.iterdir()) == \
        ["state.json"]
    with atomic_dir(dest) as tmp:  # over a finished folder (os.replace alone refuses a non-empty one)
        (tmp / "state.json").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == [dest.name] and (dest / "state.json").read_text() == "second"
    # A folder built elsewhere on the same filesystem (a download) swapped in for another.
    (tmp_path / "download" / "model").mkdir(parents=True)
    (tmp_path / "download" / "model" / "weights").write_text("new")
    replace_dir(tmp_path / "download" / "model", dest)
    assert [p.name for p in dest.iterdir()] == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", dest.name]


def test_a_folder_that_cannot_be_renamed_in_leaves_the_old_one_in_place(tmp_path, monkeypatch):
    """The new folder's rename fails after the old one was moved aside (a read-only or
    full filesystem, a folder another process holds): the old one is back at ``dest``,
    whole, and the error reaches the caller."""
    import os

    from slmfactory.platform import stages

    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights").write_text("old")
    new = tmp_path / "download"
    new.mkdir()
    (new / "weights").write_text("new")
    real_replace = os.replace

    def refuse_the_new_folder(src, dst):
        if Path(src) == new:
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(stages.os, "replace", refuse_the_new_folder)
    with pytest.raises(PermissionError):
        stages.replace_dir(new, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["download", "model"]
    assert [p.name for p in dest.iterdir()] == ["weights"] and (dest / "weights").read_text() == "old"
    assert (new / "weights").read_text() == "new"
