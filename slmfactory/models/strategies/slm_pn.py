"""SLM-pn: a projected network pretrained with one expert per generic cluster; to
specialise, the expert of the domain's most frequent cluster is instantiated as a plain
SLM and fine-tuned like ``slm`` (PAPER.md; model in ``slmfactory/models/projected.py``).

Pretraining data: the generic train windows grouped by cluster. Each step draws one
cluster with probability proportional to its token count and takes that cluster's next
batch; the draw sequence is a pure function of (seed, step), so a resumed run sees the
same batches as an uninterrupted one, and DDP ranks take disjoint slices of the same
cluster's global batch.

Generic cost = the projected network's training FLOPs: 6·N_slm per token (+ attention),
where N_slm is the size of one instantiated expert (each token passes through one expert's
W's), plus computing and back-propagating the W's once per batch (6·h·|W_mlp| per step,
spread over the batch's tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch

from slmfactory.models.data import Batch, PackedBatches
from slmfactory.models.projected import build_projected
from slmfactory.models.strategies.base import (
    DomainData, GenericArtifact, SpecializedModel, Strategy, StrategyContext, TokenSource, evaluate_ppl,
    finetune_lm, finish, generic_dir, lm_factory, register, split_source, vocab_size_of)
from slmfactory.models.trainer import Trainer
from slmfactory.platform.cost import train_flops_per_token
from slmfactory.platform.errors import DataError


class ClusterRoutedTrainer(Trainer):
    """The shared loop, with batches drawn cluster by cluster and tagged with their
    cluster id (``Batch.expert``), which the projected model uses to pick its W's."""

    def __init__(self, model, train, cfg, *, cluster_sources: list[TokenSource], **kwargs):
        super().__init__(model, train, cfg, **kwargs)
        sizes = np.array([s.stop - s.start for s in cluster_sources], dtype=np.float64)
        # A cluster shorter than one sequence cannot make a batch: it is never drawn.
        sizes[sizes < self.seq_len] = 0.0
        if sizes.sum() == 0:
            raise DataError(f"{self.phase}: no cluster holds a full sequence of {self.seq_len} tokens")
        self.cluster_batches = {c: PackedBatches(s.load(), self.seq_len, cfg.batch_size, seed=cfg.seed + c,
                                                 rank=self.rank, world_size=self.world_size,
                                                 name=f"{self.phase} cluster {c}")
                                for c, s in enumerate(cluster_sources) if sizes[c] > 0}
        self.cluster_probs = sizes / sizes.sum()
        # Precomputed for the whole run: step → cluster, and step → that cluster's own batch
        # index (how many earlier steps drew it), so batch_at(step) needs no loop state.
        rng = np.random.default_rng([cfg.seed, 7919])
        self.route = rng.choice(len(sizes), size=self.max_steps, p=self.cluster_probs)
        self.route_index = np.zeros(self.max_steps, dtype=np.int64)
        seen = np.zeros(len(sizes), dtype=np.int64)
        for s, c in enumerate(self.route):
            self.route_index[s] = seen[c]
            seen[c] += 1

    def compute_flops_per_token(self) -> float:
        # One instantiated expert's training FLOPs, plus the W computation amortised per token.
        plain = self.model.instantiate(0)
        per_token = train_flops_per_token(plain, self.seq_len)
        return per_token + self.model.projection_flops() / (self.cfg.batch_size * self.seq_len)

    def batch_at(self, step: int) -> Batch:
        c = int(self.route[step])
        b = self.cluster_batches[c].batch(int(self.route_index[step]))
        return Batch(b.input_ids, expert=c)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        x = batch.input_ids.to(self.device, non_blocking=True)   # (B, T)
        return self.step_model(input_ids=x, labels=x, expert=batch.expert).loss


def cluster_streams(clusters, out: Path) -> list[TokenSource]:
    """Every cluster's generic train tokens in one file, one ``TokenSource`` slice per
    cluster (memory-mapped by workers; nothing is copied per cluster)."""
    path = out / "cluster_tokens.npy"
    bounds = np.cumsum([0] + [int(n) for n in clusters.cluster_sizes()])  # == len(cluster_tokens(c))
    if not path.is_file():
        TokenSource.of_array(np.concatenate([clusters.cluster_tokens(c) for c in range(clusters.k)]), path)
    return [TokenSource(str(path), int(bounds[c]), int(bounds[c + 1])) for c in range(clusters.k)]


def expert_clusters(cfg):
    """The clustering whose clusters are the experts: ``strategy.experts`` clusters (the
    paper uses 16-64 experts but k = 1024 clusters for importance sampling), computed from
    the same cached embeddings, so only k-means and assignment rerun; 0 = ``cluster.k``."""
    from slmfactory.platform.clusters import run_clustering

    k = cfg.strategy.experts or cfg.cluster.k
    return run_clustering(cfg.replace(**{"cluster.k": k}) if k != cfg.cluster.k else cfg, progress=False)


@register("slm-pn")
class ProjectedNetwork(Strategy):
    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        clusters = expert_clusters(cfg)
        k = clusters.k
        s = cfg.strategy
        out = generic_dir(cfg, self.name, cfg.slm, cfg.pretrain, cfg.cluster, s.pn_capacity, s.pn_expert_dim, k,
                          clusters.dir.name)
        cached = GenericArtifact.load(out)
        if cached is not None:
            ctx.say(f"[{self.name}] reusing generic phase from {out}")
            return cached
        sources = cluster_streams(clusters, out)
        builder = functools.partial(build_projected, n_experts=k)
        phase = f"pretrain/{self.name}"
        # `train` is only the trainer's nominal stream; batches come from the cluster slices.
        factory = lm_factory(dataclasses.asdict(cfg), "slm", phase, sources[int(np.argmax(clusters.cluster_sizes()))],
                             split_source(cfg, "generic", "valid"), trainer_cls=ClusterRoutedTrainer,
                             model_builder=builder, cluster_sources=sources)
        fit = ctx.launcher.fit(factory, out, phase)
        return GenericArtifact.write(self.name, out, fit.result.cost,
                                     {"weights": str(fit.checkpoint / "model.safetensors"), "experts": k,
                                      "generic_valid_nll": fit.result.best_valid_nll, "steps": fit.result.steps,
                                      "clusters": str(clusters.dir)})

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        from safetensors.torch import load_model, save_model

        cfg = ctx.cfg
        if generic is None:
            generic = self.pretrain(ctx)
        clusters = expert_clusters(cfg)
        expert = clusters.most_frequent(domain)
        pn = build_projected(cfg, vocab_size_of(cfg), generic.info["experts"])
        load_model(pn, generic.info["weights"], device="cpu")
        plain = pn.instantiate(expert)
        del pn
        runs = cfg.root / "runs" / self.name / domain
        runs.mkdir(parents=True, exist_ok=True)
        init = runs / f"expert-{expert}.safetensors"
        save_model(plain, str(init))
        data = DomainData.of(cfg, domain)
        before = evaluate_ppl(cfg, plain, data.test.load())[1]
        model, fit = finetune_lm(ctx, "slm", str(init), data, runs, f"{self.name}/{domain}")
        return finish(ctx, self.name, domain, model, fit, generic, data, before,
                      extra_metrics={"expert": expert,
                                     "domain_share_of_expert": float(clusters.histogram(domain)[expert])})
