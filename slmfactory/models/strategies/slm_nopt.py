"""SLM-nopt: the small model trained on the domain data only, from random weights
(docs/paper.md#table-4: poor at 1M in-domain tokens, closes the gap at 64M).

Budget: training from scratch happens once the domain is known, so it spends the
*specialisation* budget (the sweep's spec axis, ``finetune.max_tokens``/``max_flops``),
like every strategy; it has no generic phase (the generic axis does not apply). Training
from scratch is not fine-tuning: it takes the *pretraining* learning rate and a warm-up
scaled from the pretraining's to its own steps (early stopping on the domain's
validation split still applies), each overridable under ``strategy.slm-nopt``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slmfactory.models.strategies.base import register
from slmfactory.models.strategies.slm import SmallModel
from slmfactory.models.train import GenericArtifact, StrategyContext, budget_share
from slmfactory.platform.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Settings:
    lr: float = 0.0
    """Peak learning rate (0 = ``pretrain.lr``)."""
    warmup_steps: int = -1
    """Warm-up steps (-1 = ``pretrain.warmup_steps`` scaled to this phase's steps)."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ConfigError(f"lr: expected >= 0 (0 = pretrain.lr), got {self.lr!r}")
        if self.warmup_steps < -1:
            raise ConfigError(f"warmup_steps: expected >= -1 (-1 = pretrain's), got {self.warmup_steps!r}")


@register("slm-nopt", settings=Settings)
class SmallModelNoPretraining(SmallModel):
    generic_family = None
    generic_phases = ()
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # no generic phase: C_generic = 0

    def finetune_config(self, cfg):
        s = self.settings(cfg)
        tcfg = dataclasses.replace(cfg.finetune, lr=s.lr or cfg.pretrain.lr)
        if s.warmup_steps >= 0:
            return dataclasses.replace(budget_share(tcfg, 1.0, cfg.data.seq_len), warmup_steps=s.warmup_steps)
        return budget_share(tcfg, 1.0, cfg.data.seq_len, warmup_from=cfg.pretrain)
