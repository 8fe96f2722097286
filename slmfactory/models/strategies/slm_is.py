"""SLM-is: importance sampling. Once the domain is known, the generic corpus is resampled
so that its cluster histogram matches the domain's (w(x) = P(c(x)|domain)/P(c(x)|generic),
``slmfactory/platform/resample.py``), a *fresh* SLM is pretrained on the resampled tokens,
then fine-tuned on the domain data (PAPER.md).

No generic phase: C_generic = 0 and the resampling pretraining is specialisation cost, paid
per domain (claim 4: SLM-is loses its appeal as the number of domains grows).
"""

from __future__ import annotations

from dataclasses import dataclass

from slmfactory.models.strategies.base import (
    DomainData, GenericArtifact, SpecializedModel, Strategy, StrategyContext, evaluate_ppl, finetune_lm, finish,
    lm_flops_per_token, load_lm, phase_work, pretrain_lm, register)
from slmfactory.platform.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Settings:
    resample_tokens: int = 0
    """Generic tokens resampled to the domain histogram (0 = ``pretrain.max_tokens``)."""

    def __post_init__(self) -> None:
        if self.resample_tokens < 0:
            raise ConfigError(f"resample_tokens: expected >= 0, got {self.resample_tokens!r}")


@register("slm-is", settings=Settings)
class ImportanceSampling(Strategy):
    requires = frozenset({"clusters"})

    def projected_work(self, cfg):
        train, _, n = lm_flops_per_token(cfg, "slm")
        return [], [phase_work(cfg, cfg.pretrain, train, n), phase_work(cfg, cfg.finetune, train, n)]

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # nothing is shared across domains

    def prepare(self, ctx: StrategyContext, domain: str) -> None:
        from slmfactory.platform.resample import resample

        cfg = ctx.cfg
        resample(cfg, domain, tokens=self.settings(cfg).resample_tokens or cfg.pretrain.max_tokens,
                 progress=ctx.log is not None)

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        from slmfactory.models.data import resampled_source
        from slmfactory.platform.resample import resample

        cfg = ctx.cfg
        n_tokens = self.settings(cfg).resample_tokens or cfg.pretrain.max_tokens
        res = resample(cfg, domain, tokens=n_tokens, progress=ctx.log is not None, tracker=ctx.tracker)
        # The resample stage wrote the shuffled stream as tokens.npy: training memory-maps it.
        source = resampled_source(res)
        # The fresh SLM's pretraining is specialisation cost of this domain, not generic.
        pre = pretrain_lm(ctx, "slm", source, name=f"{self.name}-{domain}",
                          cost_phase=f"specialize/{self.name}/{domain}/pretrain")
        data = DomainData.of(cfg, domain)
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", pre.weights()), data.test.load())[1]
        model, fit = finetune_lm(ctx, "slm", pre.weights(), data, f"{self.name}/{domain}")
        return finish(ctx, self.name, domain, model, fit, None, data, before,
                      extra_spec_cost=pre.cost,
                      extra_metrics={"resample_tv_distance": float(res.tv_distance),
                                     "resample_pretrain_flops": pre.cost.flops,
                                     "resample_pretrain_valid_nll": pre.info["generic_valid_nll"]})

