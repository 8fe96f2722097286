"""SLM: a small model pretrained on generic data, then fine-tuned on the domain with early
stopping on the domain's validation split (docs/paper.md#slm, the baseline of every comparison)."""

from __future__ import annotations

from slmfactory.data.tokens import split_source
from slmfactory.models.train import (
    DomainData, evaluate_ppl, finetune_lm, finish, lm_flops_per_token, load_lm, phase_work, pretrain_lm)
from slmfactory.models.strategies.base import Strategy, register
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext


@register("slm")
class SmallModel(Strategy):
    model_key = "slm"
    generic_family = "slm"
    generic_phases = ("pretrain",)
    spec_phases = ("finetune",)

    def projected_work(self, cfg):
        train, _, n = lm_flops_per_token(cfg, self.model_key)
        generic = [phase_work(cfg, cfg.pretrain, train, n)] if self.generic_family else []
        return generic, [phase_work(cfg, self.finetune_config(cfg), train, n)]

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        # The generic budget is a token count; the prefix of the generic stream is enough.
        return pretrain_lm(ctx, self.model_key, split_source(cfg, "generic", "train", cfg.pretrain.max_tokens),
                           name=self.model_key)

    def finetune_config(self, cfg):
        """The fine-tuning settings (``finetune``; strategies with their own override this)."""
        return cfg.finetune

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        data = DomainData.of(ctx.cfg, domain)
        weights = generic.weights() if generic is not None else None
        before = evaluate_ppl(ctx.cfg, load_lm(ctx.cfg, self.model_key, weights), data.test_sample())[1] \
            if generic is not None else None
        model, fit = finetune_lm(ctx, self.model_key, weights, data, f"{self.name}/{domain}",
                                 train_cfg=self.finetune_config(ctx.cfg))
        return finish(ctx, self.name, domain, model, fit, generic, data, before)
