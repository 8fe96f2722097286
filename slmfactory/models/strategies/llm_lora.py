"""LLM-lora: the generic-pretrained LLM fine-tuned with LoRA adapters instead of all its
weights (docs/paper.md#llm-lora, the paper's appendix: at rank 64 LoRA lands within 0.5 ppl of full fine-tuning,
at a fraction of the optimiser state). The adapters are merged before export, so the
served model is a plain Llama of the LLM's size (inference cost unchanged).

Uses peft (``LoraConfig`` on every attention and MLP projection): only the adapters
require gradients, so the trainer's default ``trainable_parameters()`` hook already
hands the optimiser the adapters alone.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from slmfactory.models.train import (
    DomainData, evaluate_ppl, finetune_lm, finish, lm_flops_per_token, load_lm, phase_work)
from slmfactory.models.strategies.base import register
from slmfactory.models.strategies.llm import LargeModel
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext, Trainer, Weights
from slmfactory.platform.cost import model_flop_terms, train_flops_per_token
from slmfactory.platform.errors import ConfigError
from slmfactory.trial import TrialRecord

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    rank: int = 64
    """LoRA rank (paper appendix: 64)."""
    alpha: float = 128.0
    lr: float = 1e-4
    """Peak learning rate of the adapters: LoRA trains few, freshly initialised weights
    and wants a larger step than full fine-tuning (``finetune.lr``)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank: expected >= 1, got {self.rank!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr!r}")


def build_lora(cfg, vocab_size: int, base_weights: str | None) -> torch.nn.Module:
    """The LLM with ``base_weights`` loaded, wrapped with LoRA adapters (a peft model).

    The base weights are loaded *before* wrapping: peft renames every parameter, so a plain
    checkpoint loaded afterwards would match nothing. Module-level for picklable factories.
    """
    from peft import LoraConfig, get_peft_model

    s = cfg.strategy.of("llm-lora")
    model = load_lm(cfg, "llm", base_weights)
    lora = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class LoRATrainer(Trainer):
    """The shared loop; only the FLOP count changes: frozen weights need no weight
    gradient, so they cost 4 FLOPs per parameter and token (forward 2, input gradient 2)
    instead of 6; the adapters cost the full 6."""

    def compute_flops_per_token(self) -> float:
        n_compute, _, _ = model_flop_terms(self.model)
        frozen = n_compute - sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return train_flops_per_token(self.model, self.seq_len) - 2.0 * frozen


@register("llm-lora", settings=Settings)
class LargeModelLoRA(LargeModel):
    """``pretrain`` is the `llm` strategy's (same stage key: the generic phase is shared)."""

    def projected_work(self, cfg):
        train, _, n = lm_flops_per_token(cfg, "llm")
        # Frozen weights skip their weight gradients (LoRATrainer): about 2·N less per token.
        return [phase_work(cfg, cfg.pretrain, train, n)], [phase_work(cfg, cfg.finetune, train - 2.0 * n, n)]

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        s = self.settings(cfg)
        data = DomainData.of(cfg, domain)
        weights: Weights | None = generic.weights() if generic is not None else None
        before = evaluate_ppl(cfg, load_lm(cfg, "llm", weights), data.test_sample())[1] if generic is not None else None
        # The base weights are loaded by the builder (before peft wraps the model), so the
        # phase starts from no file; its key still names them, and the LoRA settings.
        builder = functools.partial(build_lora, base_weights=weights.path if weights else None)
        peft_model, fit = finetune_lm(ctx, "llm", None, data, f"{self.name}/{domain}",
                                      train_cfg=dataclasses.replace(cfg.finetune, lr=s.lr),
                                      key_inputs={"base": weights.key if weights else None, "lora": s},
                                      model_builder=builder, trainer_cls=LoRATrainer)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        # Fold B·A·(alpha/r) into the frozen weights: a plain LlamaForCausalLM again.
        model = peft_model.merge_and_unload()
        return finish(ctx, self.name, domain, model, fit, generic, data, before,
                      extra_metrics={TrialRecord.LORA_TRAINABLE_PARAMS: trainable, "lora_rank": s.rank})
