"""SLM-nopt: the small model trained on the domain data only, from random weights
(PAPER.md Table 4: poor at 1M in-domain tokens, closes the gap at 64M)."""

from __future__ import annotations

from slmfactory.models.strategies.base import GenericArtifact, StrategyContext, register
from slmfactory.models.strategies.slm import SmallModel


@register("slm-nopt")
class SmallModelNoPretraining(SmallModel):
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # no generic phase: C_generic = 0
