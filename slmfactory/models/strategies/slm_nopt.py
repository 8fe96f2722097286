"""SLM-nopt: the small model trained on the domain data only, from random weights
(PAPER.md Table 4: poor at 1M in-domain tokens, closes the gap at 64M).

Training from scratch is not fine-tuning: it takes the *pretraining* learning rate,
warm-up and budget by default (early stopping on the domain's validation split still
applies), each overridable under ``strategy.slm-nopt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slmfactory.models.strategies.base import GenericArtifact, StrategyContext, register
from slmfactory.models.strategies.slm import SmallModel
from slmfactory.platform.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Settings:
    lr: float = 0.0
    """Peak learning rate (0 = ``pretrain.lr``)."""
    warmup_steps: int = -1
    """Warm-up steps (-1 = ``pretrain.warmup_steps``)."""
    max_tokens: int = 0
    """Token budget (0 = ``pretrain.max_tokens``; early stopping usually ends it sooner)."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ConfigError(f"lr: expected >= 0 (0 = pretrain.lr), got {self.lr!r}")
        if self.warmup_steps < -1:
            raise ConfigError(f"warmup_steps: expected >= -1 (-1 = pretrain's), got {self.warmup_steps!r}")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens: expected >= 0 (0 = pretrain.max_tokens), got {self.max_tokens!r}")


@register("slm-nopt", settings=Settings)
class SmallModelNoPretraining(SmallModel):
    generic_family = None
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # no generic phase: C_generic = 0

    def finetune_config(self, cfg):
        s = self.settings(cfg)
        return dataclasses.replace(cfg.finetune, lr=s.lr or cfg.pretrain.lr,
                                   warmup_steps=cfg.pretrain.warmup_steps if s.warmup_steps < 0 else s.warmup_steps,
                                   max_tokens=s.max_tokens or cfg.pretrain.max_tokens)
