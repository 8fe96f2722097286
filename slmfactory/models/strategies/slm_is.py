"""SLM-is: importance sampling. Once the domain is known, the generic corpus is resampled
so that its cluster histogram matches the domain's (w(x) = P(c(x)|domain)/P(c(x)|generic),
``slmfactory/platform/resample.py``), a *fresh* SLM is pretrained on the resampled tokens,
then fine-tuned on the domain data (PAPER.md).

No generic phase: C_generic = 0 and the resampling pretraining is specialisation cost, paid
per domain (claim 4: SLM-is loses its appeal as the number of domains grows).
"""

from __future__ import annotations


from slmfactory.models.strategies.base import (
    DomainData, GenericArtifact, SpecializedModel, Strategy, StrategyContext, TokenSource, evaluate_ppl,
    finetune_lm, finish, load_lm, pretrain_lm, register)


@register("slm-is")
class ImportanceSampling(Strategy):
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # nothing is shared across domains

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        from slmfactory.platform.resample import load_resampled_tokens, resample

        cfg = ctx.cfg
        n_tokens = cfg.strategy.resample_tokens or cfg.pretrain.max_tokens
        res = resample(cfg, domain, tokens=n_tokens, progress=ctx.log is not None, tracker=ctx.tracker)
        runs = cfg.root / "runs" / self.name / domain
        # The result folder's name carries the domain, the token count and the clustering's
        # hash; naming the stream after it keys the pretraining cache (stop=None: by path) to
        # exactly this resampled set.
        stream = runs / f"resampled-{res.path.name}.npy"
        source = TokenSource(str(stream)) if stream.is_file() else \
            TokenSource.of_array(load_resampled_tokens(res.path), stream)
        # The fresh SLM's pretraining is specialisation cost of this domain, not generic.
        pre = pretrain_lm(ctx, "slm", source, key=f"{self.name}-{domain}",
                          cost_phase=f"specialize/{self.name}/{domain}/pretrain")
        data = DomainData.of(cfg, domain)
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", pre.info["weights"]), data.test.load())[1]
        model, fit = finetune_lm(ctx, "slm", pre.info["weights"], data, runs, f"{self.name}/{domain}")
        return finish(ctx, self.name, domain, model, fit, None, data, before,
                      extra_spec_cost=pre.cost,
                      extra_metrics={"resample_tv_distance": float(res.tv_distance),
                                     "resample_pretrain_flops": pre.cost.flops,
                                     "resample_pretrain_valid_nll": pre.info["generic_valid_nll"]})
