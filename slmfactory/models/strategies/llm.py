"""LLM: the large model pretrained on generic data and fully fine-tuned on the domain.
Best perplexity, but served at the large model's inference cost."""

from __future__ import annotations

from slmfactory.models.strategies.base import register
from slmfactory.models.strategies.slm import SmallModel


@register("llm")
class LargeModel(SmallModel):
    model_key = "llm"
    generic_family = "llm"
    generic_phases = ("pretrain_llm",)
    spec_phases = ("finetune_llm",)
