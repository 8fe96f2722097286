"""SLM-mix: a hard mixture of experts. One independent SLM per generic cluster, pretrained
on that cluster's windows only; to specialise, one expert is picked and fine-tuned as a
plain SLM (docs/paper.md#slm-mix; #table-5 compares the selection rules).

Budget: the paper splits the total pretraining budget across experts. Expert c gets the
share of ``pretrain.max_tokens`` *and* of ``pretrain.max_flops`` that its cluster holds of
the generic train tokens (share_c; at least one batch), so the mixture's generic cost is
one SLM's, however the budget is given, and an expert trains as long as its cluster
would inside a single model; its warm-up is scaled to its own steps. Best-after-fine-tuning's
k fine-tunings split the specialisation budget the same way (1/k each).

Selection (``strategy.slm-mix.selection``):
- ``most-frequent``: the domain's most frequent cluster (1× fine-tuning);
- ``best-before-finetune``: lowest domain-validation NLL before fine-tuning (1× fine-tuning
  plus k validation passes, counted);
- ``best-after-finetune``: fine-tune every expert, keep the lowest validation NLL (k×).

The generic phase records the routed generic perplexity (each generic validation window
scored by its own cluster's expert, docs/paper.md#table-8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from slmfactory.data.tokens import split_source
from slmfactory.models.arch import build_model
from slmfactory.models.train import cluster_streams, expert_clusters, routed_generic_nll
from slmfactory.models.train import (
    DomainData, budget_share, evaluate_ppl, finetune_lm, finish, lm_flops_per_token, load_lm, phase_work,
    pretrain_lm, vocab_size_of)
from slmfactory.models.strategies.base import Strategy, register
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext, Weights
from slmfactory.platform.cost import (
    INFERENCE, CostRecord, Work, inference_flops_per_token, model_flop_terms, train_flops_per_token)
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.stages import Stage
from slmfactory.trial import TrialRecord

SELECTION_RULES = ("most-frequent", "best-before-finetune", "best-after-finetune")


@dataclass(frozen=True, kw_only=True)
class Settings:
    experts: int = 16
    """Number of experts = generic clusters (paper's main results: 16)."""
    selection: str = "most-frequent"
    """Which expert a domain fine-tunes: one of ``SELECTION_RULES``."""

    def __post_init__(self) -> None:
        if self.experts < 2:
            raise ConfigError(f"experts: expected >= 2, got {self.experts!r}")
        if self.selection not in SELECTION_RULES:
            raise ConfigError(f"selection: expected one of {list(SELECTION_RULES)}, got {self.selection!r}")


def expert_train_config(cfg, share: float, flops_per_step: float):
    """The pretraining settings of an expert whose cluster holds ``share`` of the generic
    tokens: that share of the token budget and of the FLOP budget (at least one step), and
    the warm-up scaled to the expert's own steps (``budget_share``), so that each expert's
    learning rate reaches its peak as the single model's does."""
    return budget_share(cfg.pretrain, share, cfg.data.seq_len, flops_per_step=flops_per_step)


def finetune_share_config(cfg, tunes: int):
    """Each of ``tunes`` fine-tunings (best-after-fine-tuning tunes every expert) gets an
    equal share of the specialisation budget: together they spend it once."""
    return budget_share(cfg.finetune, 1.0 / tunes, cfg.data.seq_len)


def slm_flops_per_step(cfg) -> float:
    """Training FLOPs of one pretraining step of the SLM (counted on the meta device), in
    the trainer's own arithmetic so that a one-step FLOP budget allows exactly one step."""
    with torch.device("meta"):
        model = build_model(cfg.slm, vocab_size_of(cfg), cfg.data.seq_len)
    return train_flops_per_token(model, cfg.data.seq_len) * (cfg.pretrain.batch_size * cfg.data.seq_len)


@register("slm-mix", settings=Settings)
class HardMixture(Strategy):
    requires = frozenset({"clusters"})
    generic_family = "slm-mix"
    generic_phases = ("experts",)
    spec_phases = ("finetune",)

    def projected_work(self, cfg):
        train, _, n = lm_flops_per_token(cfg, "slm")
        s = self.settings(cfg)
        tunes = s.experts if s.selection == "best-after-finetune" else 1
        # The experts split the generic budget (``expert_train_config``): one SLM's worth;
        # best-after-fine-tuning's k fine-tunes split the specialisation budget.
        return [phase_work(cfg, cfg.pretrain, train, n)], [phase_work(cfg, finetune_share_config(cfg, tunes), train, n)] * tunes

    def prepare(self, ctx: StrategyContext, domain: str) -> None:
        expert_clusters(ctx.cfg, self.settings(ctx.cfg).experts, domains=True)  # the domain's histogram

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        clusters = expert_clusters(cfg, self.settings(cfg).experts)
        stage = Stage.of(cfg.root, "generic", self.name, model=cfg.slm, train=cfg.pretrain,
                         seq_len=cfg.data.seq_len, clusters=clusters.key)
        cached = GenericArtifact.load(stage, cfg.device)
        if cached is not None:
            ctx.say(f"[{self.name}] reusing generic phase {stage.dir}")
            return cached
        sources = cluster_streams(cfg, clusters)
        sizes = clusters.cluster_sizes().astype(np.float64)
        valid = split_source(cfg, "generic", "valid")
        per_step = slm_flops_per_step(cfg)
        experts, cost = {}, None
        for c, src in enumerate(sources):
            if sizes[c] < cfg.data.seq_len:
                ctx.say(f"[{self.name}] cluster {c}: {int(sizes[c])} tokens, less than one sequence; no expert")
                continue
            tcfg = expert_train_config(cfg, sizes[c] / sizes.sum(), per_step)
            art = pretrain_lm(ctx, "slm", src, name=f"{self.name}-e{c}", valid=valid, train_cfg=tcfg,
                              score_generic=False, resources="experts")
            experts[c] = {"weights": stage.relative(art.weights().path), "key": art.stage.key,
                          "generic_valid_nll": art.info["generic_valid_nll"], "tokens": art.cost.tokens,
                          "epochs": art.info.get("epochs", 0.0), "warmup_steps": tcfg.warmup_steps}
            cost = art.cost if cost is None else cost + art.cost
        routed = routed_generic_nll(cfg, clusters, lambda c: load_lm(cfg, "slm", str(stage.path(experts[c]["weights"]))),
                                    experts=list(experts))
        ctx.say(f"[{self.name}] routed generic ppl {routed.get('routed_generic_ppl', float('nan')):.2f}")
        epochs = max((e["epochs"] for e in experts.values()), default=0.0)  # the most repeated expert's
        # Embedding and clustering the generic corpus is this mixture's generic cost too.
        cost = cost + clusters.embedding_cost("generic")
        return GenericArtifact.record(stage, self.name, cost, {
            "experts": {str(c): e for c, e in experts.items()}, "k": clusters.k, "epochs": epochs, **routed},
            cfg.device)

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        if generic is None:
            generic = self.pretrain(ctx)
        experts = {int(c): Weights(str(generic.stage.path(e["weights"])), e["key"])
                   for c, e in generic.info["experts"].items()}
        data = DomainData.of(cfg, domain)
        rule = self.settings(cfg).selection
        extra_cost: CostRecord | None = None
        metrics: dict[str, float] = {}
        fits = {}
        if rule == "most-frequent":
            counts = expert_clusters(cfg, self.settings(cfg).experts, domains=True).counts(domain)
            chosen = max(experts, key=lambda c: counts[c])  # among clusters that have an expert
        elif rule == "best-before-finetune":
            valid = data.valid.load()
            t0, nlls = time.perf_counter(), {}
            for c, w in experts.items():
                model = load_lm(cfg, "slm", w)
                nlls[c] = evaluate_ppl(cfg, model, valid)[0]
            chosen = min(nlls, key=nlls.get)
            # k validation passes: inference FLOPs over the validation tokens.
            n_tok = (len(valid) // cfg.data.seq_len) * cfg.data.seq_len * len(experts)
            work = Work(INFERENCE, n_tok, n_tok * inference_flops_per_token(model, cfg.data.seq_len),
                        model_flop_terms(model)[0])
            extra_cost = CostRecord.of(f"select/{self.name}/{domain}", work, time.perf_counter() - t0, cfg.device)
            metrics |= {f"valid_nll_before_e{c}": v for c, v in nlls.items()}
        else:  # best-after-finetune
            share = finetune_share_config(cfg, len(experts))
            for c, w in experts.items():
                fits[c] = finetune_lm(ctx, "slm", w, data, f"{self.name}/{domain}/e{c}", train_cfg=share)
            chosen = min(fits, key=lambda c: fits[c][1].result.best_valid_nll)
            for c, (_, fit) in fits.items():
                if c != chosen:  # every fine-tuning is specialisation cost (k×)
                    extra_cost = fit.result.cost if extra_cost is None else extra_cost + fit.result.cost
            metrics |= {f"valid_nll_after_e{c}": f.result.best_valid_nll for c, (_, f) in fits.items()}
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", experts[chosen]), data.test_sample())[1]
        model, fit = fits[chosen] if chosen in fits else \
            finetune_lm(ctx, "slm", experts[chosen], data, f"{self.name}/{domain}/e{chosen}")
        metrics[TrialRecord.EXPERT] = chosen
        return finish(ctx, self.name, domain, model, fit, generic, data, before, extra_spec_cost=extra_cost,
                      clusters=expert_clusters(cfg, self.settings(cfg).experts, domains=True),
                      extra_metrics=metrics)
