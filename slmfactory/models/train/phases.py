"""The phase library every strategy builds from: pretrain or fine-tune a language model
as a stage (``pretrain_lm``, ``finetune_lm``, ``run_phase`` through the launcher), split a
phase budget (``budget_share``), evaluate it (``evaluate_ppl``, ``test_perplexity``), load it
(``load_lm``) and export it as a plain Hugging Face folder (``export_hf``, ``finish``).
The artifacts the phases hand on are ``artifacts.py``'s; a strategy's file composes these phases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slmfactory.data.tokens import PackedBatches, TokenSource, as_sequences, ensure_tokenizer, split_source
from slmfactory.models.arch import build_model, count_params
from slmfactory.models.train.artifacts import GenericArtifact, SpecializedModel, StrategyContext, Weights
from slmfactory.models.train.generic_eval import generic_nll
from slmfactory.models.train.launch import FitOutput, WorkerContext
from slmfactory.models.train.evaluation import bootstrap_ppl, evaluate_on_trial_device, sequence_nlls
from slmfactory.models.train.execution import autocast_for, eval_device
from slmfactory.models.train.trainer import TrainResult, Trainer
from slmfactory.platform.config import RunConfig, TrainConfig, from_dict
from slmfactory.platform.cost import (
    SERVING_TASKS, CostRecord, ServingRates, TRAIN, Work, inference_flops_per_token, model_flop_terms,
    train_flops_per_token)
from slmfactory.platform.stages import Stage
from slmfactory.trial import TrialRecord



GENERIC_VERSION = "generic-v2"  # v2: epochs and the generic sample's perplexity recorded
EXPORT_VERSION = "export-v4"  # v4: the serving rates measured (serving_rate); v3: the per-sequence test NLLs
# (paired tests); v2: a seeded sample, bootstrap
FINETUNE_VERSION = "finetune-v2"  # v2: early stopping validates the starting weights and can return them
TEST_SAMPLE_SEED = 0
"""The test sample's seed: fixed, so every strategy, budget and rerun scores the same
sequences of a domain's test split."""


@dataclass(frozen=True)
class DomainData:
    """A domain's in-domain training set (the first ``data.domain_train_tokens``), its
    validation split (early stopping) and its test split (reported perplexity).

    The test *sample* is ``data.test_tokens // data.seq_len`` sequences drawn without
    replacement across the whole test split (seeded, sorted back into split order), not
    the split's first tokens: a prefix is a handful of documents, a sample spans them all.
    """

    train: TokenSource
    valid: TokenSource
    test: TokenSource
    test_tokens: int = 0
    seq_len: int = 0

    @classmethod
    def of(cls, cfg: RunConfig, domain: str) -> "DomainData":
        return cls(train=split_source(cfg, domain, "train", cfg.data.domain_train_tokens),
                   valid=split_source(cfg, domain, "valid"), test=split_source(cfg, domain, "test"),
                   test_tokens=cfg.data.test_tokens, seq_len=cfg.data.seq_len)

    def test_sample(self) -> np.ndarray:
        """The sampled test sequences, flattened in order ((n · seq_len,) int32): what
        every perplexity of this domain is measured on."""
        seqs = as_sequences(self.test.load(), self.seq_len, "test")                   # (N, T)
        n = self.test_tokens // self.seq_len if self.test_tokens else len(seqs)
        if n < len(seqs):
            pick = np.sort(np.random.default_rng(TEST_SAMPLE_SEED).choice(len(seqs), size=n, replace=False))
            seqs = seqs[pick]
        return np.ascontiguousarray(seqs).reshape(-1)

    def test_identity(self) -> dict:
        """What a stage scoring the test sample keys on."""
        return {**self.test.identity(), "sample": "seeded-sequences-v1", "seed": TEST_SAMPLE_SEED,
                "tokens": self.test_tokens, "seq_len": self.seq_len}


def budget_share(tcfg: TrainConfig, share: float, seq_len: int, budget_from: TrainConfig | None = None,
                 warmup_from: TrainConfig | None = None, flops_per_step: float = 0.0) -> TrainConfig:
    """``tcfg`` with ``share`` of the budget of ``budget_from`` (default ``tcfg``): that
    share of its tokens and of its FLOPs (at least one step), and the warm-up of
    ``warmup_from`` (default ``tcfg``) scaled to the new phase's own steps.

    Several phases that split one budget (the experts of a mixture, slm-is's resampled
    pretraining and fine-tuning, slm-d's teacher and student, best-after-fine-tuning's k
    fine-tunes) each get a ``budget_share``. The warm-up is scaled by the new phase's steps
    over ``warmup_from``'s, and kept below the phase's steps, so its learning rate reaches
    its peak (a full warm-up on a tenth of the steps never would).
    """
    budget = budget_from or tcfg
    per_step = tcfg.batch_size * seq_len
    tokens = max(per_step, int(budget.max_tokens * share) // per_step * per_step)
    flops = max(flops_per_step, budget.max_flops * share) if budget.max_flops > 0 else 0.0
    steps = tokens // per_step
    if flops > 0 and flops_per_step > 0:
        steps = max(1, min(steps, int(flops // flops_per_step)))
    src = warmup_from or tcfg
    warmup = 0
    if src.warmup_steps > 0:
        src_steps = max(1, src.max_tokens // (src.batch_size * seq_len))
        warmup = max(1, min(max(steps - 1, 1), round(src.warmup_steps * steps / src_steps)))
    return dataclasses.replace(tcfg, max_tokens=tokens, max_flops=flops, warmup_steps=warmup)


def trained_tokens(cost: CostRecord | None) -> int:
    """Tokens a cost record's *training* work processed (a teacher's forward passes over
    the same tokens are not counted twice)."""
    if cost is None:
        return 0
    return int(sum(w["tokens"] for w in cost.work if w.get("kind") == TRAIN)) if cost.work else cost.tokens


def lm_flops_per_token(cfg: RunConfig, model_key: str) -> tuple[float, float, int]:
    """(training, inference) FLOPs per token and compute parameters of ``cfg.<model_key>``
    at the configured vocabulary, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(getattr(cfg, model_key), cfg.tokenizer.vocab_size, cfg.data.seq_len)
    return (train_flops_per_token(model, cfg.data.seq_len), inference_flops_per_token(model, cfg.data.seq_len),
            model_flop_terms(model)[0])


def phase_work(cfg: RunConfig, tcfg: TrainConfig, flops_per_token: float, params: float,
               optimizer_extra_params: float = 0.0, kind: str = TRAIN, resources: str = "") -> Work:
    """The work of a phase run to its budget (the trainer's own step arithmetic);
    ``kind=INFERENCE`` is a forward pass over the same tokens (a teacher's); ``resources``:
    the phase's kind in ``scaling`` (its data-parallel workers price the all-reduce)."""
    workers = (cfg.scaling.phase(resources) if resources else cfg.scaling.default()).num_workers
    per_step = tcfg.batch_size * cfg.data.seq_len
    steps = tcfg.max_tokens // per_step
    if tcfg.max_flops > 0:
        steps = min(steps, int(tcfg.max_flops // (flops_per_token * per_step)))
    return Work(kind, steps * per_step, float(steps * per_step * flops_per_token), params,
                steps if kind == TRAIN else 0, optimizer_extra_params, workers)


def train_section(cfg: RunConfig, phase: str) -> TrainConfig:
    """``pretrain`` or ``finetune`` TrainConfig by name (the phase's first word)."""
    return getattr(cfg, phase.split("/")[0])


def lm_factory(cfg_dict: dict, model_key: str, phase: str, train: TokenSource, valid: TokenSource | None,
               init_weights: str | None = None, trainer_cls: type[Trainer] = Trainer,
               model_builder: Callable[[RunConfig, int], torch.nn.Module] | None = None,
               train_cfg: TrainConfig | None = None, **trainer_kwargs: Any) -> Callable[[WorkerContext], Trainer]:
    """A trainer factory for a causal LM phase, safe to ship to Ray workers.

    ``model_key`` picks ``cfg.slm`` or ``cfg.llm``; ``train_cfg`` is the phase's settings
    (default: ``pretrain`` or ``finetune`` by the phase's first word); ``init_weights`` is a
    ``model.safetensors`` to start from; ``model_builder`` replaces the plain Llama
    (projected networks, LoRA).
    """

    def factory(worker: WorkerContext) -> Trainer:
        cfg = from_dict(cfg_dict)
        tcfg = train_cfg or train_section(cfg, phase)
        vocab = vocab_size_of(cfg)
        model = (model_builder(cfg, vocab) if model_builder is not None
                 else build_model(getattr(cfg, model_key), vocab, cfg.data.seq_len, seed=tcfg.seed))
        if init_weights:
            from safetensors.torch import load_model

            # strict=False: a wrapped model (LoRA) may add parameters the file lacks.
            load_model(model, init_weights, strict=model_builder is None, device="cpu")
        model.to(worker.device)
        batches = PackedBatches(train.load(), cfg.data.seq_len, tcfg.batch_size, seed=tcfg.seed,
                                rank=worker.rank, world_size=worker.world_size, name=f"{phase} train")
        return trainer_cls(model, batches, tcfg, seq_len=cfg.data.seq_len,
                           valid=valid.load() if valid is not None else None, out_dir=worker.out_dir,
                           phase=phase, profile=cfg.device, rank=worker.rank, world_size=worker.world_size,
                           ddp_model=worker.wrap(model), device=worker.device, log=worker.log, **trainer_kwargs)

    return factory


def run_phase(ctx: StrategyContext, stage: Stage, factory: Callable[[WorkerContext], Trainer],
              phase: str, resources: str | None = None) -> FitOutput:
    """Train one phase inside its stage, on the resources of its kind (``resources``: a key
    of ``config.PHASES``, e.g. ``pretrain``). A killed phase resumes from the checkpoints in
    the stage's work folder; a finished stage returns its stored result at once, with zero
    new steps (an early-stopped fine-tune stays stopped)."""
    if stage.done:
        ctx.say(f"[{phase}] finished earlier: {stage.dir}")
    else:
        def build(work: Path) -> dict:
            work = work.resolve()
            fit = ctx.launcher.fit(factory, work, phase, resources=resources)
            return {"result": fit.result.to_dict(), "checkpoint": str(fit.checkpoint.resolve().relative_to(work))}

        stage.build(build, resumable=True)
    info = stage.info
    return FitOutput(result=TrainResult.from_dict(info["result"], ctx.cfg.device),
                     checkpoint=stage.path(info["checkpoint"]), stage_key=stage.key)


def vocab_size_of(cfg: RunConfig) -> int:
    data = json.loads((ensure_tokenizer(cfg) / "tokenizer.json").read_text())
    return len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                               if t["content"] not in data["model"]["vocab"])


def evaluate_ppl(cfg: RunConfig, model: torch.nn.Module, tokens: np.ndarray,
                 device: torch.device | str | None = None) -> tuple[float, float]:
    """(mean NLL, perplexity) of ``model`` on ``tokens`` at the run's context length, on
    ``device`` (default: the trial's, its GPU when it has one) with the trainer's mixed
    precision; the model is moved there for the pass and back after."""
    s, n = evaluate_on_trial_device(model, tokens, cfg.data.seq_len, cfg.finetune.batch_size, device)
    return s / n, math.exp(s / n)


def test_perplexity(cfg: RunConfig, model: torch.nn.Module, tokens: np.ndarray,
                    device: torch.device | str | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` on a test sample with its bootstrap interval over the
    sample's sequences (``trainer.bootstrap_ppl``), on the trial's device; ``seq_nll`` holds
    the (n_sequences,) per-sequence NLLs the interval resampled (what paired tests compare)."""
    device = torch.device(device) if device is not None else eval_device()
    was = next(model.parameters()).device
    model.to(device)
    try:
        per_seq = sequence_nlls(model, tokens, cfg.data.seq_len, cfg.finetune.batch_size, device,
                                autocast_for(device))
    finally:
        model.to(was)
    return {**bootstrap_ppl(per_seq, cfg.data.seq_len - 1), "seq_nll": per_seq}


def export_hf(cfg: RunConfig, model: torch.nn.Module, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``model`` into ``out_dir`` (a stage's work folder) as a plain HF folder:
    safetensors, config, tokenizer, ``slmfactory.json``; ``AutoModelForCausalLM.from_pretrained``
    loads it."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in ensure_tokenizer(cfg).iterdir():
        if f.is_file() and f.name not in ("slmfactory.json", "stage.json"):
            shutil.copy2(f, out_dir / f.name)
    (out_dir / "slmfactory.json").write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def pretrain_lm(ctx: StrategyContext, model_key: str, tokens: TokenSource, name: str,
                valid: TokenSource | None = None, cost_phase: str | None = None,
                train_cfg: TrainConfig | None = None, score_generic: bool = True,
                resources: str | None = None) -> GenericArtifact:
    """Pretrain ``cfg.<model_key>`` on ``tokens`` with ``train_cfg`` (default ``cfg.pretrain``)
    on the resources of ``scaling.<resources>`` (default ``pretrain``, ``pretrain_llm`` for the LLM),
    as a generic stage keyed by the model, the training settings and the data. Records
    the epochs it made over ``tokens`` and (``score_generic``) the final weights' generic
    perplexity on the sample every generic phase is scored on (``models/train/generic_eval.py``)."""
    cfg = ctx.cfg
    tcfg = train_cfg or cfg.pretrain
    if valid is None:
        valid = split_source(cfg, "generic", "valid")
    stage = Stage.of(cfg.root, "generic", name, version=GENERIC_VERSION, model=getattr(cfg, model_key), train=tcfg,
                     seq_len=cfg.data.seq_len, tokens=tokens.identity(), valid=valid.identity(),
                     score_generic=score_generic)
    cached = GenericArtifact.load(stage, cfg.device)
    if cached is not None:
        ctx.say(f"[{name}] reusing generic phase {stage.dir}")
        return cached
    phase = f"pretrain/{name}"
    fit = run_phase(ctx, Stage.of(cfg.root, "train", phase, generic=stage.key),
                    lm_factory(cfg.to_tree(), model_key, phase, tokens, valid, train_cfg=tcfg, tracker=ctx.tracker),
                    phase,
                    resources=resources or ("pretrain" if model_key == "slm" else "pretrain_llm"))
    weights = fit.checkpoint / "model.safetensors"
    scored = generic_nll(cfg, lambda _: load_lm(cfg, model_key, str(weights))) if score_generic else {}
    return GenericArtifact.record(stage, name, fit.result.cost,
                                  {"weights": stage.relative(weights), "generic_valid_nll": fit.result.best_valid_nll,
                                   "steps": fit.result.steps, "epochs": fit.result.epochs, "model": model_key,
                                   "valid_history": fit.result.valid_history,
                                   "train_history": fit.result.train_history, **scored}, cfg.device, phase=cost_phase)


def finetune_lm(ctx: StrategyContext, model_key: str, init: Weights | None, data: DomainData,
                name: str, train_cfg: TrainConfig | None = None, key_inputs: dict | None = None,
                model_builder: Callable[[RunConfig, int], torch.nn.Module] | None = None,
                resources: str | None = None, **factory_kwargs: Any) -> tuple[torch.nn.Module, FitOutput]:
    """Fine-tune ``cfg.<model_key>`` from ``init`` on the domain with early stopping, on the
    resources of ``scaling.<resources>`` (default ``finetune``, ``finetune_llm`` for the LLM).

    The phase is a stage keyed by everything the result depends on (starting weights'
    key, model, fine-tuning settings, in-domain data, ``key_inputs`` for what the trainer
    adds), so a killed fine-tune resumes, a finished one is reused with zero new steps,
    and a changed generic phase or budget never resumes a stale checkpoint.
    """
    cfg = ctx.cfg
    tcfg = train_cfg or cfg.finetune
    phase = f"finetune/{name}"
    stage = Stage.of(cfg.root, "train", phase, version=FINETUNE_VERSION, init=init.key if init else None,
                     model=getattr(cfg, model_key),
                     train=tcfg, seq_len=cfg.data.seq_len, data=[data.train.identity(), data.valid.identity()],
                     extra=key_inputs or {})
    factory = lm_factory(cfg.to_tree(), model_key, phase, data.train, data.valid,
                         init_weights=init.path if init else None, train_cfg=tcfg, model_builder=model_builder,
                         **{"tracker": ctx.tracker, **factory_kwargs})
    fit = run_phase(ctx, stage, factory, phase,
                    resources=resources or ("finetune" if model_key == "slm" else "finetune_llm"))
    model = model_builder(cfg, vocab_size_of(cfg)) if model_builder is not None else \
        build_model(getattr(cfg, model_key), vocab_size_of(cfg), cfg.data.seq_len)
    return fit.load_into(model), fit


def load_lm(cfg: RunConfig, model_key: str, weights: Weights | str | None) -> torch.nn.Module:
    model = build_model(getattr(cfg, model_key), vocab_size_of(cfg), cfg.data.seq_len)
    if weights:
        from safetensors.torch import load_model

        load_model(model, weights.path if isinstance(weights, Weights) else weights, device="cpu")
    return model


def finish(ctx: StrategyContext, strategy: str, domain: str, model: torch.nn.Module, fit: FitOutput,
           generic: GenericArtifact | None, data: DomainData, before_ppl: float | None,
           extra_spec_cost: CostRecord | None = None, extra_metrics: dict | None = None,
           clusters=None) -> SpecializedModel:
    """Evaluate on the domain's test sample and export the plain HF folder (a stage keyed by
    the final training run: a rerun reuses both); return the record.

    ``clusters``: the clustering a strategy needed. Embedding the domain's windows is
    specialisation cost (it happens once the domain's data arrive); embedding the generic
    corpus is generic cost, charged here to a strategy with no generic phase (slm-is; the
    experts' generic phases carry it themselves). The domain's cluster entropy is logged.
    """
    cfg, R = ctx.cfg, TrialRecord
    spec_cost = dataclasses.replace(fit.result.cost, phase=f"specialize/{strategy}/{domain}")
    if extra_spec_cost is not None:
        spec_cost = spec_cost + extra_spec_cost
    generic_cost = generic.cost if generic else None
    if clusters is not None:
        embed_generic, embed_domain = clusters.embedding_cost("generic"), clusters.embedding_cost(domain)
        spec_cost = spec_cost + embed_domain
        if generic is None:
            generic_cost = embed_generic
        extra_metrics = {R.DOMAIN_ENTROPY: float(clusters.entropy(domain)),
                         R.DOMAIN_ENTROPY_K: float(clusters.cfg.cluster.k),
                         R.clustering_cost_metric("generic", "flops"): embed_generic.flops,
                         R.clustering_cost_metric("generic", "device_hours"): embed_generic.device_hours,
                         R.clustering_cost_metric("domain", "flops"): embed_domain.flops, **(extra_metrics or {})}
    stage = Stage.of(cfg.root, "models", f"{strategy}/{domain}", version=EXPORT_VERSION, weights=fit.stage_key,
                     test=data.test_identity())

    def export(work: Path) -> dict:
        plain = model.cpu().eval()
        test = test_perplexity(cfg, plain, data.test_sample())
        info = {"test_nll": test["nll"], "test_ppl": test["ppl"], "test_nll_se": test["se"],
                "test_ppl_lo": test["lo"], "test_ppl_hi": test["hi"], "test_sequences": test["sequences"],
                "params": count_params(plain),
                "inference_flops_per_token": inference_flops_per_token(plain, cfg.data.seq_len)}
        meta = {"strategy": strategy, "domain": domain, **info,
                "generic_cost": generic_cost.to_dict() if generic_cost else None, "spec_cost": spec_cost.to_dict()}
        export_hf(cfg, plain, work, meta)
        np.save(work / R.TEST_SEQ_NLL_FILE, np.asarray(test["seq_nll"], dtype=np.float64))
        if cfg.serving.cost_measure_s > 0:
            # The folder as `serve` loads it, timed once here (models/train/serving_rate.py says why).
            from slmfactory.models.train.serving_rate import measure_folder

            info["serving_rates"] = measure_folder(work, cfg.serving.cost_measure_s).to_dict()
            (work / "slmfactory.json").write_text(json.dumps({**meta, "serving_rates": info["serving_rates"]},
                                                             indent=2, default=str))
        return info

    info = stage.build(export)
    # test_ppl (and its interval) become the trial record's ppl/<domain> (pipeline.trial_record).
    metrics = {R.TEST_NLL: info["test_nll"], "test_ppl": info["test_ppl"], R.VALID_NLL: fit.result.best_valid_nll,
               R.FINETUNE_STEPS: fit.result.steps, R.FINETUNE_BEST_STEP: fit.result.best_step,
               R.EPOCHS_SPEC: fit.result.epochs, **(extra_metrics or {})}
    rates = ServingRates.of(info.get("serving_rates"))
    if rates is not None:
        for task in SERVING_TASKS:
            metrics |= {R.serving_rate_metric(task): rates.tokens_per_s(task),
                        R.serving_cost_metric(task): rates.device_hours_per_million(task)}
    metrics |= {R.TEST_NLL_SE: info["test_nll_se"], "test_ppl_lo": info["test_ppl_lo"],
                "test_ppl_hi": info["test_ppl_hi"], R.TEST_SEQUENCES: info["test_sequences"]}
    if generic is not None and "epochs" in generic.info:
        metrics[R.EPOCHS_GENERIC] = float(generic.info["epochs"])
    if before_ppl is not None:
        metrics[R.TEST_PPL_BEFORE] = before_ppl
    curves = {R.FINETUNE_VALID_NLL: fit.result.valid_history, R.FINETUNE_TRAIN_LOSS: fit.result.train_history}
    if generic is not None:
        curves |= {R.generic_metric(k): generic.info[k] for k in ("valid_history", "train_history")
                   if k in generic.info}
    record = SpecializedModel(strategy=strategy, domain=domain, path=stage.dir,
                              generic_cost=generic_cost, spec_cost=spec_cost,
                              params=info["params"], inference_flops_per_token=info["inference_flops_per_token"],
                              metrics=metrics, curves=curves,
                              serving_rates=rates.to_dict() if rates is not None else None)
    ctx.say(f"[{strategy}/{domain}] test ppl {info['test_ppl']:.2f}" +
            (f" (before fine-tuning {before_ppl:.2f})" if before_ppl is not None else "") + f" → {stage.dir}")
    return record
