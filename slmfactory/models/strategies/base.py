"""The strategy interface, its registry, and the pieces every strategy shares.

A strategy has two phases (PAPER.md):

- ``pretrain(ctx) -> GenericArtifact | None`` — before any domain is known; its cost is
  *generic* and shared by every domain. Cached on disk by a hash of what it depends on,
  so every domain (and every later run) reuses it.
- ``specialize(ctx, generic, domain) -> SpecializedModel`` — per domain; its cost is the
  *specialisation* cost. The result is always a plain Hugging Face causal-LM folder
  (safetensors + config + tokenizer) plus a cost record: everything served is plain.

Strategies register under the names configs use (``@register("slm")``); a test checks the
registry equals the documented list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from slmfactory.models.data import PackedBatches, save_npy_atomic, split_tokens
from slmfactory.models.launch import FitOutput, Launcher, WorkerContext
from slmfactory.models.lm import build_model, count_params
from slmfactory.models.trainer import Trainer, evaluate_nll
from slmfactory.platform.config import STRATEGY_NAMES, RunConfig, from_dict
from slmfactory.platform.cost import CostRecord, inference_flops_per_token
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.tracking import NullTracker, Tracker

STRATEGIES: dict[str, type["Strategy"]] = {}


def register(name: str) -> Callable[[type["Strategy"]], type["Strategy"]]:
    """Class decorator: make a strategy selectable as ``strategy.name: <name>``."""
    if name not in STRATEGY_NAMES:
        raise ValueError(f"strategy {name!r} is not in the documented list {STRATEGY_NAMES}")

    def deco(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def get_strategy(name: str) -> "Strategy":
    from slmfactory.models import strategies  # noqa: F401  (imports every strategy module)

    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (expected one of {sorted(STRATEGIES)})")
    return STRATEGIES[name]()


# -- artifacts ---------------------------------------------------------------------------

@dataclass
class GenericArtifact:
    """The output of a generic phase: model weights under ``dir`` and what they cost."""

    strategy: str
    dir: Path
    cost: CostRecord
    info: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        data = {"strategy": self.strategy, "cost": self.cost.to_dict(), "info": self.info}
        write_json_atomic(self.dir / "generic.json", data)

    @classmethod
    def write(cls, strategy: str, dir: Path, cost: CostRecord, info: dict[str, Any]) -> "GenericArtifact":
        """Record a finished generic phase (its ``generic.json`` marks the cache complete)."""
        art = cls(strategy=strategy, dir=dir, cost=dataclasses.replace(cost, phase=f"generic/{strategy}"), info=info)
        art.save()
        return art

    @classmethod
    def load(cls, path: Path) -> "GenericArtifact | None":
        f = Path(path) / "generic.json"
        if not f.is_file():
            return None
        data = json.loads(f.read_text())
        return cls(strategy=data["strategy"], dir=Path(path), cost=CostRecord.from_dict(data["cost"]),
                   info=data["info"])


@dataclass
class SpecializedModel:
    """A specialised small model: a plain HF folder plus its cost and quality."""

    strategy: str
    domain: str
    path: Path
    generic_cost: CostRecord | None
    spec_cost: CostRecord
    params: int
    inference_flops_per_token: float
    metrics: dict[str, float] = field(default_factory=dict)
    """``test_nll``/``test_ppl`` after specialisation, ``test_ppl_before`` before, …"""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "domain": self.domain, "path": str(self.path),
                "generic_cost": self.generic_cost.to_dict() if self.generic_cost else None,
                "spec_cost": self.spec_cost.to_dict(), "params": self.params,
                "inference_flops_per_token": self.inference_flops_per_token, "metrics": self.metrics}


# -- context -----------------------------------------------------------------------------

@dataclass
class StrategyContext:
    cfg: RunConfig
    launcher: Launcher
    tracker: Tracker = field(default_factory=NullTracker)
    log: Callable[[str], None] | None = print

    def say(self, msg: str) -> None:
        if self.log:
            self.log(msg)


class Strategy:
    name: ClassVar[str] = ""

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        raise NotImplementedError

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        raise NotImplementedError


# -- shared helpers ----------------------------------------------------------------------

def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def config_hash(*parts: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain values)."""
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TokenSource:
    """A picklable pointer to a token stream on shared storage: ``np.load(path)[start:stop]``."""

    path: str
    start: int = 0
    stop: int | None = None

    def load(self) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r")[self.start:self.stop])

    @classmethod
    def of_array(cls, array: np.ndarray, path: Path) -> "TokenSource":
        save_npy_atomic(Path(path), np.asarray(array, dtype=np.int32))
        return cls(str(path))


def split_source(cfg: RunConfig, part: str, split: str, max_tokens: int | None = None) -> TokenSource:
    """Tokenize (once, cached) and point at ``part``/``split``'s token stream."""
    tokens = split_tokens(cfg, part, split, max_tokens)
    return TokenSource(str(cfg.root / "tokens" / part / f"{split}.npy"), 0, len(tokens))


@dataclass(frozen=True)
class DomainData:
    """A domain's in-domain training set (the first ``data.domain_train_tokens``), its
    validation split (early stopping) and its test split (reported perplexity)."""

    train: TokenSource
    valid: TokenSource
    test: TokenSource

    @classmethod
    def of(cls, cfg: RunConfig, domain: str) -> "DomainData":
        return cls(train=split_source(cfg, domain, "train", cfg.data.domain_train_tokens),
                   valid=split_source(cfg, domain, "valid"),
                   test=split_source(cfg, domain, "test"))


def train_section(cfg: RunConfig, phase: str):
    """``pretrain`` or ``finetune`` TrainConfig by name (the phase's first word)."""
    return getattr(cfg, phase.split("/")[0])


def lm_factory(cfg_dict: dict, model_key: str, phase: str, train: TokenSource, valid: TokenSource | None,
               init_weights: str | None = None, trainer_cls: type[Trainer] = Trainer,
               model_builder: Callable[[RunConfig, int], torch.nn.Module] | None = None,
               **trainer_kwargs: Any) -> Callable[[WorkerContext], Trainer]:
    """A trainer factory for a causal LM phase, safe to ship to Ray workers.

    ``model_key`` picks ``cfg.slm`` or ``cfg.llm``; ``phase`` starts with ``pretrain`` or
    ``finetune`` and picks the TrainConfig; ``init_weights`` is a ``model.safetensors`` to
    start from; ``model_builder`` replaces the plain Llama (projected networks, LoRA).
    """

    def factory(worker: WorkerContext) -> Trainer:
        cfg = from_dict(cfg_dict)
        tcfg = train_section(cfg, phase)
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


def vocab_size_of(cfg: RunConfig) -> int:
    data = json.loads((cfg.tokenizer_dir / "tokenizer.json").read_text())
    return len(data["model"]["vocab"]) + sum(1 for t in data.get("added_tokens", [])
                                               if t["content"] not in data["model"]["vocab"])


def evaluate_ppl(cfg: RunConfig, model: torch.nn.Module, tokens: np.ndarray) -> tuple[float, float]:
    """(mean NLL, perplexity) of ``model`` on ``tokens`` at the run's context length."""
    device = next(model.parameters()).device
    s, n = evaluate_nll(model, tokens, cfg.data.seq_len, cfg.finetune.batch_size, device=device)
    return s / n, math.exp(s / n)


def export_hf(cfg: RunConfig, model: torch.nn.Module, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``model`` as a plain HF folder (safetensors, config, tokenizer, slmfactory.json)
    atomically: ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in cfg.tokenizer_dir.iterdir():
        if f.is_file() and f.name != "slmfactory.json":
            shutil.copy2(f, tmp / f.name)
    (tmp / "slmfactory.json").write_text(json.dumps(meta, indent=2, default=str))
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def generic_dir(cfg: RunConfig, key: str, *parts: Any) -> Path:
    """Where a generic phase caches its result, keyed by what it depends on."""
    return cfg.root / "generic" / f"{key}-{config_hash(cfg.tokenizer, cfg.data.seq_len, *parts)}"


def pretrain_lm(ctx: StrategyContext, model_key: str, tokens: TokenSource, key: str,
                valid: TokenSource | None = None, cost_phase: str | None = None) -> GenericArtifact:
    """Pretrain ``cfg.<model_key>`` on ``tokens`` with ``cfg.pretrain`` (cached by config)."""
    cfg = ctx.cfg
    out = generic_dir(cfg, key, getattr(cfg, model_key), cfg.pretrain, tokens.stop - tokens.start
                      if tokens.stop is not None else tokens.path)
    cached = GenericArtifact.load(out)
    if cached is not None:
        ctx.say(f"[{key}] reusing generic phase from {out}")
        return cached
    if valid is None:
        valid = split_source(cfg, "generic", "valid")
    fit = ctx.launcher.fit(lm_factory(dataclasses.asdict(cfg), model_key, f"pretrain/{key}", tokens, valid),
                           out, f"pretrain/{key}")
    cost = dataclasses.replace(fit.result.cost, phase=cost_phase or f"generic/{key}")
    art = GenericArtifact(strategy=key, dir=out, cost=cost,
                          info={"weights": str(fit.checkpoint / "model.safetensors"),
                                "generic_valid_nll": fit.result.best_valid_nll,
                                "steps": fit.result.steps, "model": model_key})
    art.save()
    return art


def finetune_lm(ctx: StrategyContext, model_key: str, init_weights: str | None, data: DomainData,
                out_dir: Path, phase: str, **factory_kwargs: Any) -> tuple[torch.nn.Module, FitOutput]:
    """Fine-tune ``cfg.<model_key>`` from ``init_weights`` on the domain with early stopping.

    The run folder is keyed by everything the result depends on (starting weights, model,
    fine-tuning config, in-domain data), so a killed fine-tune resumes, a finished one is
    reused, and a changed generic phase or budget never resumes a stale checkpoint.
    """
    cfg = ctx.cfg
    init_stamp = None
    if init_weights:
        st = Path(init_weights).stat()
        init_stamp = [init_weights, st.st_size, st.st_mtime_ns]
    out_dir = Path(out_dir) / config_hash(init_stamp, getattr(cfg, model_key), cfg.finetune, cfg.data,
                                          sorted((k, getattr(v, "__qualname__", repr(v))) for k, v in factory_kwargs.items()))
    factory = lm_factory(dataclasses.asdict(cfg), model_key, f"finetune/{phase}", data.train, data.valid,
                         init_weights=init_weights, **factory_kwargs)
    fit = ctx.launcher.fit(factory, out_dir, f"finetune/{phase}")
    model = fit.trainer.model if fit.trainer is not None else fit.load_into(
        build_model(getattr(cfg, model_key), vocab_size_of(cfg), cfg.data.seq_len))
    return model, fit


def load_lm(cfg: RunConfig, model_key: str, weights: str | None) -> torch.nn.Module:
    model = build_model(getattr(cfg, model_key), vocab_size_of(cfg), cfg.data.seq_len)
    if weights:
        from safetensors.torch import load_model

        load_model(model, weights, device="cpu")
    return model


def finish(ctx: StrategyContext, strategy: str, domain: str, model: torch.nn.Module, fit: FitOutput,
           generic: GenericArtifact | None, data: DomainData, before_ppl: float | None,
           extra_spec_cost: CostRecord | None = None, extra_metrics: dict | None = None) -> SpecializedModel:
    """Evaluate on the domain's test split, export the plain HF folder, return the record."""
    cfg = ctx.cfg
    model = model.cpu().eval()
    test_nll, test_ppl = evaluate_ppl(cfg, model, data.test.load())
    spec_cost = dataclasses.replace(fit.result.cost, phase=f"specialize/{strategy}/{domain}")
    if extra_spec_cost is not None:
        spec_cost = spec_cost + extra_spec_cost
    metrics = {"test_nll": test_nll, "test_ppl": test_ppl, "valid_nll": fit.result.best_valid_nll,
               "finetune_steps": fit.result.steps, **(extra_metrics or {})}
    if before_ppl is not None:
        metrics["test_ppl_before"] = before_ppl
    inf = inference_flops_per_token(model, cfg.data.seq_len)
    record = SpecializedModel(strategy=strategy, domain=domain, path=Path(), generic_cost=generic.cost if generic
                              else None, spec_cost=spec_cost, params=count_params(model),
                              inference_flops_per_token=inf, metrics=metrics)
    out = cfg.root / "models" / strategy / domain
    record.path = export_hf(cfg, model, out, record.to_dict() | {"path": str(out)})
    write_json_atomic(out.parent / f"{domain}.json", record.to_dict())
    ctx.say(f"[{strategy}/{domain}] test ppl {test_ppl:.2f}" +
            (f" (before fine-tuning {before_ppl:.2f})" if before_ppl is not None else "") + f" → {out}")
    return record
