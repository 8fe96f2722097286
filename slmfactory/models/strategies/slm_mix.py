"""SLM-mix: a hard mixture of experts. One independent SLM per generic cluster, pretrained
on that cluster's windows only; to specialise, one expert is picked and fine-tuned as a
plain SLM (PAPER.md; Table 5 compares the selection rules).

NOTE budget: the paper splits the total pretraining budget across experts. Here expert c
gets ``pretrain.max_tokens · share_c`` tokens (share_c = its cluster's fraction of the
generic train tokens, at least one batch), so the mixture's generic cost ≈ one SLM's,
and an expert trains as long as the time its cluster would get inside a single model.

Selection (``strategy.mix_selection``):
- ``most-frequent``: the domain's most frequent cluster (1× fine-tuning);
- ``best-before-finetune``: lowest domain-validation NLL before fine-tuning (1× fine-tuning
  plus k validation passes, counted);
- ``best-after-finetune``: fine-tune every expert, keep the lowest validation NLL (k×).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from slmfactory.models.strategies.base import (
    DomainData, GenericArtifact, SpecializedModel, Strategy, StrategyContext, evaluate_ppl,
    finetune_lm, finish, generic_dir, load_lm, pretrain_lm, register, split_source)
from slmfactory.models.strategies.slm_pn import cluster_streams, expert_clusters
from slmfactory.platform.cost import CostRecord, inference_flops_per_token


def expert_budget(cfg, share: float) -> int:
    """Tokens for an expert whose cluster holds ``share`` of the generic tokens."""
    step = cfg.pretrain.batch_size * cfg.data.seq_len
    return max(step, int(round(cfg.pretrain.max_tokens * share / step)) * step)


@register("slm-mix")
class HardMixture(Strategy):
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        clusters = expert_clusters(cfg)
        k = clusters.k
        out = generic_dir(cfg, self.name, cfg.slm, cfg.pretrain, cfg.cluster, k, clusters.dir.name)
        sources = cluster_streams(clusters, out)
        sizes = clusters.cluster_sizes().astype(np.float64)
        valid = split_source(cfg, "generic", "valid")
        experts, cost = {}, None
        for c, src in enumerate(sources):
            if sizes[c] < cfg.data.seq_len:
                ctx.say(f"[{self.name}] cluster {c}: {int(sizes[c])} tokens, less than one sequence; no expert")
                continue
            budget = expert_budget(cfg, sizes[c] / sizes.sum())
            sub = dataclasses.replace(ctx, cfg=cfg.replace(**{"pretrain.max_tokens": budget}))
            art = pretrain_lm(sub, "slm", src, key=f"{self.name}-e{c}", valid=valid)
            experts[c] = {"weights": art.info["weights"], "generic_valid_nll": art.info["generic_valid_nll"],
                          "tokens": budget}
            cost = art.cost if cost is None else cost + art.cost
        return GenericArtifact.write(self.name, out, cost,
                                     {"experts": {str(c): e for c, e in experts.items()}, "k": k,
                                      "clusters": str(clusters.dir)})

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        if generic is None:
            generic = self.pretrain(ctx)
        experts = {int(c): e for c, e in generic.info["experts"].items()}
        data = DomainData.of(cfg, domain)
        rule = cfg.strategy.mix_selection
        runs = cfg.root / "runs" / self.name / domain
        extra_cost: CostRecord | None = None
        metrics: dict[str, float] = {}
        if rule == "most-frequent":
            counts = expert_clusters(cfg).counts(domain)
            chosen = max(experts, key=lambda c: counts[c])  # among clusters that have an expert
        elif rule == "best-before-finetune":
            valid = data.valid.load()
            t0, nlls = time.perf_counter(), {}
            for c, e in experts.items():
                model = load_lm(cfg, "slm", e["weights"])
                nlls[c] = evaluate_ppl(cfg, model, valid)[0]
            chosen = min(nlls, key=nlls.get)
            # k validation passes: inference FLOPs over the validation tokens.
            n_tok = (len(valid) // cfg.data.seq_len) * cfg.data.seq_len * len(experts)
            extra_cost = CostRecord.of(f"select/{self.name}/{domain}", n_tok,
                                       n_tok * inference_flops_per_token(model, cfg.data.seq_len),
                                       time.perf_counter() - t0, cfg.device)
            metrics |= {f"valid_nll_before_e{c}": v for c, v in nlls.items()}
        elif rule == "best-after-finetune":
            fits = {}
            for c, e in experts.items():
                fits[c] = finetune_lm(ctx, "slm", e["weights"], data, runs / f"e{c}", f"{self.name}/{domain}/e{c}")
            chosen = min(fits, key=lambda c: fits[c][1].result.best_valid_nll)
            for c, (_, fit) in fits.items():
                if c != chosen:  # every fine-tuning is specialisation cost (k×)
                    extra_cost = fit.result.cost if extra_cost is None else extra_cost + fit.result.cost
            metrics |= {f"valid_nll_after_e{c}": f.result.best_valid_nll for c, (_, f) in fits.items()}
        else:  # validated by the config; kept explicit for new rules
            raise ValueError(f"strategy.mix_selection: unknown rule {rule!r}")
        weights = experts[chosen]["weights"]
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", weights), data.test.load())[1]
        if rule == "best-after-finetune":
            model, fit = fits[chosen]
        else:
            model, fit = finetune_lm(ctx, "slm", weights, data, runs / f"e{chosen}", f"{self.name}/{domain}/e{chosen}")
        metrics["expert"] = chosen
        return finish(ctx, self.name, domain, model, fit, generic, data, before, extra_spec_cost=extra_cost,
                      extra_metrics=metrics)

