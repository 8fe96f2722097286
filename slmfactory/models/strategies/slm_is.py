"""SLM-is: importance sampling. Once the domain is known, the generic corpus is resampled
so that its cluster histogram matches the domain's (w(x) = P(c(x)|domain)/P(c(x)|generic),
``slmfactory/data/clustering/resampling.py``), a *fresh* SLM is pretrained on the resampled tokens,
then fine-tuned on the domain data (docs/paper.md#slm-is).

Budget: everything after the domain is known is specialisation, so the sweep's spec axis
(``finetune.max_tokens``/``max_flops``) pays for both the resampled pretraining
(``strategy.slm-is.pretrain_share`` of it) and the fine-tuning (the rest); the resampled
pool holds exactly the pretraining's tokens by default (one epoch). The generic axis does
not apply: slm-is has no generic pretraining, and its only generic cost is the shared
clustering of the generic corpus (claim 4: SLM-is loses its appeal as N grows).

Provenance: the trial's metrics carry where its resampled pretraining text came from,
``is_share/source/<source>`` and ``is_share/collection/<collection>`` (shares of the
resampled tokens, each set summing to 1); the driver logs them with the trial and the
report tabulates them ("legal's resampled text: 41% doc-debian, 30% manpages, ...").
"""

from __future__ import annotations

from dataclasses import dataclass

from slmfactory.data.clustering import resample, run_clustering, share_metrics
from slmfactory.data.tokens import resampled_source
from slmfactory.models.train import (
    DomainData, budget_share, evaluate_ppl, finetune_lm, finish, lm_flops_per_token, load_lm, phase_work,
    pretrain_lm)
from slmfactory.models.strategies.base import Strategy, register
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext
from slmfactory.platform.errors import ConfigError
from slmfactory.trial import TrialRecord


@dataclass(frozen=True, kw_only=True)
class Settings:
    pretrain_share: float = 0.75
    """Share of the specialisation budget spent pretraining on the resampled generic data;
    the rest fine-tunes on the domain (early stopping may end it sooner)."""
    resample_tokens: int = 0
    """Generic tokens resampled to the domain histogram (0 = the resampled pretraining's
    tokens: one epoch; fewer means repeated data, recorded as epochs > 1)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.pretrain_share < 1.0:
            raise ConfigError(f"pretrain_share: expected in (0, 1), got {self.pretrain_share!r}")
        if self.resample_tokens < 0:
            raise ConfigError(f"resample_tokens: expected >= 0, got {self.resample_tokens!r}")


@register("slm-is", settings=Settings)
class ImportanceSampling(Strategy):
    requires = frozenset({"clusters"})
    spec_phases = ("finetune",)  # its resampled pretraining too: spec-budget work inside the trial

    def pretrain_config(self, cfg):
        """The resampled pretraining: ``pretrain_share`` of the spec budget, the pretraining's
        learning rate and batch, its warm-up scaled to these steps."""
        train, _, _ = lm_flops_per_token(cfg, "slm")
        return budget_share(cfg.pretrain, self.settings(cfg).pretrain_share, cfg.data.seq_len,
                            budget_from=cfg.finetune, warmup_from=cfg.pretrain,
                            flops_per_step=train * cfg.pretrain.batch_size * cfg.data.seq_len)

    def finetune_config(self, cfg):
        train, _, _ = lm_flops_per_token(cfg, "slm")
        return budget_share(cfg.finetune, 1.0 - self.settings(cfg).pretrain_share, cfg.data.seq_len,
                            flops_per_step=train * cfg.finetune.batch_size * cfg.data.seq_len)

    def resample_tokens(self, cfg) -> int:
        """Tokens to resample: the setting, else exactly what the pretraining will train on."""
        if self.settings(cfg).resample_tokens:
            return self.settings(cfg).resample_tokens
        pre = self.pretrain_config(cfg)
        train, _, _ = lm_flops_per_token(cfg, "slm")
        return phase_work(cfg, pre, train, 0).tokens

    def projected_work(self, cfg):
        train, _, n = lm_flops_per_token(cfg, "slm")
        return [], [phase_work(cfg, self.pretrain_config(cfg), train, n),
                    phase_work(cfg, self.finetune_config(cfg), train, n)]

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact | None:
        return None  # nothing is shared across domains

    def prepare(self, ctx: StrategyContext, domain: str) -> None:
        cfg = ctx.cfg
        resample(cfg, domain, tokens=self.resample_tokens(cfg), progress=ctx.log is not None)

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        res = resample(cfg, domain, tokens=self.resample_tokens(cfg), progress=ctx.log is not None,
                       tracker=ctx.tracker)
        # The resample stage wrote the shuffled stream as tokens.npy: training memory-maps it.
        source = resampled_source(res)
        # The fresh SLM's pretraining is specialisation cost of this domain, not generic.
        pre = pretrain_lm(ctx, "slm", source, name=f"{self.name}-{domain}", train_cfg=self.pretrain_config(cfg),
                          cost_phase=f"specialize/{self.name}/{domain}/pretrain", resources="finetune")
        data = DomainData.of(cfg, domain)
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", pre.weights()), data.test_sample())[1]
        model, fit = finetune_lm(ctx, "slm", pre.weights(), data, f"{self.name}/{domain}",
                                 train_cfg=self.finetune_config(cfg))

        return finish(ctx, self.name, domain, model, fit, None, data, before,
                      extra_spec_cost=pre.cost, clusters=run_clustering(cfg, progress=False),
                      extra_metrics={"resample_tv_distance": float(res.tv_distance),
                                     "resample_pretrain_flops": pre.cost.flops,
                                     "resample_pretrain_valid_nll": pre.info["generic_valid_nll"],
                                     TrialRecord.EPOCHS_RESAMPLED_PRETRAIN: float(pre.info.get("epochs", 0.0)),
                                     # Importance resampling draws with replacement: a window drawn
                                     # n times is read n times per pass (repeats, not fresh text).
                                     TrialRecord.EPOCHS_RESAMPLED_WINDOW_REPEATS:
                                         res.windows / max(1, res.unique_windows),
                                     **share_metrics(res)})
