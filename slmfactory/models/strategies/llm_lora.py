"""LLM-lora: the generic-pretrained LLM fine-tuned with LoRA adapters instead of all its
weights (PAPER.md appendix: at rank 64 LoRA lands within 0.5 ppl of full fine-tuning,
at a fraction of the optimiser state). The adapters are merged before export, so the
served model is a plain Llama of the LLM's size (inference cost unchanged).

Uses peft (``LoraConfig`` on every attention and MLP projection): only the adapters
require gradients, so the trainer's default ``trainable_parameters()`` hook already
hands the optimiser the adapters alone.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from slmfactory.models.strategies.base import (
    DomainData, GenericArtifact, SpecializedModel, StrategyContext, evaluate_ppl, finish, lm_factory, load_lm,
    register, vocab_size_of)
from slmfactory.models.strategies.llm import LargeModel
from slmfactory.models.trainer import Trainer
from slmfactory.platform.cost import model_flop_terms, train_flops_per_token

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_lora(cfg, vocab_size: int, base_weights: str | None) -> torch.nn.Module:
    """The LLM with ``base_weights`` loaded, wrapped with LoRA adapters (a peft model).

    The base weights are loaded *before* wrapping: peft renames every parameter, so a plain
    checkpoint loaded afterwards would match nothing. Module-level for picklable factories.
    """
    from peft import LoraConfig, get_peft_model

    model = load_lm(cfg, "llm", base_weights)
    lora = LoraConfig(r=cfg.strategy.lora_rank, lora_alpha=cfg.strategy.lora_alpha, lora_dropout=0.0,
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


@register("llm-lora")
class LargeModelLoRA(LargeModel):
    """``pretrain`` is the `llm` strategy's (same cache key: the generic phase is shared)."""

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        data = DomainData.of(cfg, domain)
        weights = generic.info["weights"] if generic is not None else None
        before = evaluate_ppl(cfg, load_lm(cfg, "llm", weights), data.test.load())[1] if generic is not None else None
        phase = f"finetune/{self.name}/{domain}"
        builder = functools.partial(build_lora, base_weights=weights)
        factory = lm_factory(dataclasses.asdict(cfg), "llm", phase, data.train, data.valid, model_builder=builder,
                             trainer_cls=LoRATrainer)
        fit = ctx.launcher.fit(factory, cfg.root / "runs" / self.name / domain, phase)
        if fit.trainer is not None:
            peft_model = fit.trainer.model
        else:  # trained on Ray workers: rebuild the same wrapped model and load its checkpoint
            peft_model = fit.load_into(builder(cfg, vocab_size_of(cfg)))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        # Fold B·A·(alpha/r) into the frozen weights: a plain LlamaForCausalLM again.
        model = peft_model.merge_and_unload()
        return finish(ctx, self.name, domain, model, fit, generic, data, before,
                      extra_metrics={"lora_trainable_params": trainable, "lora_rank": cfg.strategy.lora_rank})
