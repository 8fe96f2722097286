"""Ray Train launcher on a real local Ray instance (no mocks): 2-worker DDP, a worker
SIGKILLed mid-run and restarted from its checkpoint, and 1-worker == in-process.

One Ray instance serves the module (start-up is ~10 s on 2 cores) and is shut down at the
end; every run uses the tiny recipe on real text from ``slmfactory/data/corpus/sample``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
from pathlib import Path

import pytest

from slmfactory.models.train.launch import LocalLauncher
from slmfactory.data.tokens.streams import TokenSource
from slmfactory.models.train.phases import lm_factory, vocab_size_of
from slmfactory.platform.config import load_config

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
PHASE = "pretrain/x"


def _texts(cfg) -> list[str]:
    """Real text: every train split of the committed corpus sample, read through the corpus
    module (a broken reader fails the test rather than being read around)."""
    from slmfactory.data.corpus.store import iter_texts, list_domains

    texts = list(iter_texts(cfg.corpus_dir, "generic", "train"))
    for d in list_domains(cfg.corpus_dir):
        texts += list(iter_texts(cfg.corpus_dir, d, "train"))
    return texts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(cfg, train source, valid source): tokenizer trained on real text, tokens on disk."""
    from slmfactory.data.tokens.streams import tokenize_texts
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("dist")
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides={"workdir": str(root)})
    build_sample_corpus(cfg)
    texts = _texts(cfg)
    tokens = tokenize_texts(load_tokenizer(ensure_tokenizer(cfg)), texts)
    n_valid = 8192
    assert len(tokens) > 4 * n_valid, f"too little sample text ({len(tokens)} tokens)"
    train = TokenSource.of_array(tokens[:-n_valid], root / "tokens" / "train.npy")
    valid = TokenSource.of_array(tokens[-n_valid:], root / "tokens" / "valid.npy")
    return cfg, train, valid


@pytest.fixture(scope="module")
def ray_instance():
    from slmfactory.platform.runtime import ray_session

    # Ship this module's helpers (the kill hook) by value: Ray workers cannot import tests/.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_session(num_cpus=2):
        yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _scaled(cfg, workers: int):
    return cfg.replace(**{"scaling.num_workers": workers, "scaling.cpus_per_worker": 1.0,
                          "scaling.max_failures": 2})


def _ray_fit(cfg, train, valid, out_dir, workers: int, factory_wrapper=None):
    from slmfactory.models.train.distributed import RayLauncher

    cfg = _scaled(cfg, workers)
    factory = lm_factory(dataclasses.asdict(cfg), "slm", PHASE, train, valid)
    if factory_wrapper is not None:
        factory = factory_wrapper(factory)
    return RayLauncher(cfg.scaling, log=None).fit(factory, out_dir, PHASE)


def kill_once(factory, marker: str, rank: int, at_step: int):
    """Wrap a trainer factory: on the first attempt only (``marker`` absent), ``rank``
    SIGKILLs its own process as it starts step ``at_step``, i.e. after the previous
    checkpoint was reported and a few steps of work that the restart must redo."""

    def wrapped(ctx):
        trainer = factory(ctx)
        train_step = trainer.train_step

        def step_or_die(step: int) -> float:
            if ctx.rank == rank and not os.path.exists(marker):
                if step == at_step:
                    Path(marker).write_text(f"pid {os.getpid()} killed at step {step}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
            elif ctx.rank == rank and not os.path.exists(marker + ".resumed"):
                # The restarted group: record where it picked up (the reported checkpoint).
                Path(marker + ".resumed").write_text(str(step))
            return train_step(step)

        trainer.train_step = step_or_die
        return trainer

    return wrapped


@pytest.fixture(scope="module")
def ddp_run(data, ray_instance, tmp_path_factory):
    """The uninterrupted 2-worker run: the DDP test's subject and the kill test's baseline."""
    cfg, train, valid = data
    return _ray_fit(cfg, train, valid, tmp_path_factory.mktemp("ddp"), workers=2)


@pytest.mark.timeout(300)
def test_two_worker_ddp_trains_and_its_weights_load(data, ddp_run):
    from slmfactory.models.arch.lm import build_model
    from slmfactory.models.train.evaluation import evaluate_nll

    cfg, _, valid = data
    res = ddp_run.result
    assert res.steps == cfg.pretrain.max_tokens // (cfg.pretrain.batch_size * cfg.data.seq_len) == 40
    assert res.tokens == 40 * 8 * 64
    assert res.cost is not None and res.cost.workers == 2 and res.cost.tokens == res.tokens
    # The loss drops well below chance (ln 512 ≈ 6.24) and validation improves.
    assert res.train_loss < 0.9 * math.log(cfg.tokenizer.vocab_size)
    (s0, nll0), (s1, nll1) = res.valid_history[0], res.valid_history[-1]
    assert (s0, s1) == (20, 40) and nll1 < nll0
    # The final checkpoint is a plain folder whose weights reproduce the last validation.
    assert (ddp_run.checkpoint / "model.safetensors").is_file()
    model = ddp_run.load_into(build_model(cfg.slm, vocab_size_of(cfg), cfg.data.seq_len))
    s, n = evaluate_nll(model, valid.load()[:cfg.pretrain.eval_tokens], cfg.data.seq_len,
                        cfg.pretrain.batch_size)
    assert s / n == pytest.approx(nll1, abs=1e-4)


@pytest.mark.timeout(360)
def test_killed_worker_restarts_from_checkpoint(data, ddp_run, tmp_path):
    cfg, train, valid = data
    marker = tmp_path / "killed"
    # Step 25 = five steps after the step-20 checkpoint: rank 0 (the checkpoint owner) dies.
    out = _ray_fit(cfg, train, valid, tmp_path / "run", workers=2,
                   factory_wrapper=lambda f: kill_once(f, str(marker), rank=0, at_step=25))
    assert marker.is_file(), "the worker was never killed"
    # Identical losses alone would not prove a resume (a restart from scratch is also
    # deterministic): the new group's first step must follow the step-20 checkpoint.
    assert (tmp_path / "killed.resumed").read_text() == "20"
    base, killed = ddp_run.result.train_loss, out.result.train_loss
    print(f"\nuninterrupted train loss {base:.6f}  killed+restarted {killed:.6f}  "
          f"rel diff {abs(killed - base) / base:.2e}")
    assert out.result.steps == ddp_run.result.steps == 40
    assert abs(killed - base) / base < 0.01
    assert out.result.valid_history[-1][1] == pytest.approx(ddp_run.result.valid_history[-1][1], rel=0.01)


@pytest.mark.timeout(300)
def test_one_ray_worker_matches_local_launcher(data, ray_instance, tmp_path):
    cfg, train, valid = data
    local = LocalLauncher(device="cpu", log=None).fit(
        lm_factory(dataclasses.asdict(cfg), "slm", PHASE, train, valid), tmp_path / "local", PHASE)
    ray_out = _ray_fit(cfg, train, valid, tmp_path / "ray", workers=1)
    print(f"\nlocal train loss {local.result.train_loss:.6f}  ray(1) {ray_out.result.train_loss:.6f}")
    assert ray_out.result.steps == local.result.steps
    assert ray_out.result.train_loss == pytest.approx(local.result.train_loss, abs=1e-4)
    assert ray_out.result.best_valid_nll == pytest.approx(local.result.best_valid_nll, abs=1e-4)


def test_run_name_is_a_folder_name():
    from slmfactory.models.train.distributed import run_name

    assert run_name("pretrain/slm") == "pretrain-slm"
    assert run_name("finetune/pn:legal x") == "finetune-pn-legal-x"
    assert run_name("///") == "train"


def failing_factory(ctx):
    raise ValueError("deliberate factory failure on the worker")


@pytest.mark.timeout(180)
def test_failure_after_max_failures_is_a_clear_error(data, ray_instance, tmp_path):
    from slmfactory.models.train.distributed import DistributedTrainingError, RayLauncher

    cfg = data[0].replace(**{"scaling.num_workers": 1, "scaling.max_failures": 0})
    with pytest.raises(DistributedTrainingError, match="deliberate factory failure"):
        RayLauncher(cfg.scaling, log=None).fit(failing_factory, tmp_path, PHASE)
