"""SLM-pn: a projected network pretrained with one expert per generic cluster; to
specialise, the expert of the domain's most frequent cluster is instantiated as a plain
SLM and fine-tuned like ``slm`` (docs/paper.md#slm-pn; model in ``slmfactory/models/arch/projected.py``).

Pretraining data: the generic train windows grouped by cluster. Each step draws one
cluster with probability proportional to its token count and takes that cluster's next
batch; the draw sequence is a pure function of (seed, step), so a resumed run sees the
same batches as an uninterrupted one, and DDP ranks take disjoint slices of the same
cluster's global batch.

Generic cost = the projected network's training FLOPs: 6·N_slm per token (+ attention),
where N_slm is the size of one instantiated expert (each token passes through one expert's
W's), plus computing and back-propagating the W's once per batch (6·h·|W_mlp| per step,
spread over the batch's tokens).

The generic phase is keyed by the generic clustering only (never by a domain), and records
the routed generic perplexity: each generic validation window scored by its own cluster's
expert (docs/paper.md#table-8).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from slmfactory.data.tokens import Batch, PackedBatches, TokenSource, split_source
from slmfactory.models.arch import build_projected
from slmfactory.models.train import cluster_streams, expert_clusters, routed_generic_nll
from slmfactory.models.train import (
    DomainData, evaluate_ppl, finetune_lm, finish, lm_factory, lm_flops_per_token, phase_work, run_phase,
    vocab_size_of)
from slmfactory.models.strategies.base import Strategy, register
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext, Trainer, Weights
from slmfactory.platform.cost import TRAIN, Work, model_flop_terms, train_flops_per_token
from slmfactory.platform.errors import ConfigError, DataError
from slmfactory.platform.stages import Stage
from slmfactory.trial import TrialRecord


PN_VERSION = "slm-pn-v2"  # v2: coefficients scaled by κ (an expert's step matches the SLM's)


@dataclass(frozen=True, kw_only=True)
class Settings:
    experts: int = 32
    """Number of experts = generic clusters (paper: 32 is the best cost/quality)."""
    capacity: int = 21
    """h, the capacity multiplier (rank of the projection tensor T): 11 / 21 give the
    paper's 756M / 1,422M parameters at 16 / 32 experts with the paper-slm preset."""
    expert_dim: int = 32
    """m, the dimension of the expert vectors E."""

    def __post_init__(self) -> None:
        for name in ("experts", "capacity", "expert_dim"):
            if getattr(self, name) < 1 or (name == "experts" and self.experts < 2):
                raise ConfigError(f"{name}: expected >= {2 if name == 'experts' else 1}, got {getattr(self, name)!r}")


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

    def data_sequences(self) -> int:
        return sum(len(b) for b in self.cluster_batches.values())

    def compute_flops_per_token(self) -> float:
        # One instantiated expert's training FLOPs, plus the W computation amortised per token.
        plain = self.model.instantiate(0)
        self.expert_params = model_flop_terms(plain)[0]
        per_token = train_flops_per_token(plain, self.seq_len)
        return per_token + self.model.projection_flops() / (self.cfg.batch_size * self.seq_len)

    def cost_work(self, tokens: int, steps: int) -> list[Work]:
        # Tokens run through one expert's size; the optimiser updates the whole network.
        return [Work(TRAIN, tokens, tokens * self.flops_per_token, self.expert_params, steps,
                     self.model.params_beyond_expert(), self.world_size)]

    def batch_at(self, step: int) -> Batch:
        c = int(self.route[step])
        b = self.cluster_batches[c].batch(int(self.route_index[step]))
        return Batch(b.input_ids, expert=c)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        x = batch.input_ids.to(self.device, non_blocking=True)   # (B, T)
        return self.step_model(input_ids=x, labels=x, expert=batch.expert).loss


@register("slm-pn", settings=Settings)
class ProjectedNetwork(Strategy):
    requires = frozenset({"clusters"})
    generic_family = "slm-pn"
    generic_phases = ("experts",)
    spec_phases = ("finetune",)

    def projected_work(self, cfg):
        # Each token passes one instantiated expert (the W's computed once per batch are
        # a small extra, counted by the trainer when it runs); the optimiser updates the
        # whole projected network every step.
        train, _, n = lm_flops_per_token(cfg, "slm")
        with torch.device("meta"):
            extra = build_projected(cfg, cfg.tokenizer.vocab_size, self.settings(cfg).experts).params_beyond_expert()
        return [phase_work(cfg, cfg.pretrain, train, n, optimizer_extra_params=extra, resources="experts")], \
            [phase_work(cfg, cfg.finetune, train, n)]

    def prepare(self, ctx: StrategyContext, domain: str) -> None:
        expert_clusters(ctx.cfg, self.settings(ctx.cfg).experts, domains=True)  # the domain's histogram

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        s = self.settings(cfg)
        clusters = expert_clusters(cfg, s.experts)
        valid = split_source(cfg, "generic", "valid")
        stage = Stage.of(cfg.root, "generic", self.name, version=PN_VERSION, model=cfg.slm, settings=s, train=cfg.pretrain,
                         seq_len=cfg.data.seq_len, clusters=clusters.key, valid=valid.identity())
        cached = GenericArtifact.load(stage, cfg.device)
        if cached is not None:
            ctx.say(f"[{self.name}] reusing generic phase {stage.dir}")
            return cached
        sources = cluster_streams(cfg, clusters)
        builder = functools.partial(build_projected, n_experts=clusters.k)
        phase = f"pretrain/{self.name}"
        # `train` is only the trainer's nominal stream; batches come from the cluster slices.
        factory = lm_factory(cfg.to_tree(), "slm", phase, sources[int(np.argmax(clusters.cluster_sizes()))],
                             valid, trainer_cls=ClusterRoutedTrainer, model_builder=builder,
                             cluster_sources=sources)
        fit = run_phase(ctx, Stage.of(cfg.root, "train", phase, generic=stage.key), factory, phase,
                        resources="experts")
        pn = fit.load_into(builder(cfg, vocab_size_of(cfg)))
        routed = routed_generic_nll(cfg, clusters, pn.instantiate)
        ctx.say(f"[{self.name}] routed generic ppl {routed.get('routed_generic_ppl', float('nan')):.2f}")
        # Embedding and clustering the generic corpus is this network's generic cost too.
        return GenericArtifact.record(stage, self.name, fit.result.cost + clusters.embedding_cost("generic"), {
            "weights": stage.relative(fit.checkpoint / "model.safetensors"), "experts": clusters.k,
            "generic_valid_nll": fit.result.best_valid_nll, "steps": fit.result.steps, "epochs": fit.result.epochs,
            **routed}, cfg.device)

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        from safetensors.torch import load_model, save_model

        cfg = ctx.cfg
        if generic is None:
            generic = self.pretrain(ctx)
        clusters = expert_clusters(cfg, self.settings(cfg).experts, domains=True)
        expert = clusters.most_frequent(domain)
        pn = build_projected(cfg, vocab_size_of(cfg), generic.info["experts"])
        load_model(pn, generic.weights().path, device="cpu")
        plain = pn.instantiate(expert)
        del pn
        init = Stage.of(cfg.root, "generic", f"{self.name}-expert", generic=generic.stage, expert=expert)
        init.build(lambda work: save_model(plain, str(work / "model.safetensors")))
        data = DomainData.of(cfg, domain)
        before = evaluate_ppl(cfg, plain, data.test_sample())[1]
        model, fit = finetune_lm(ctx, "slm", Weights(str(init.path("model.safetensors")), init.key), data,
                                 f"{self.name}/{domain}")
        return finish(ctx, self.name, domain, model, fit, generic, data, before, clusters=clusters,
                      extra_metrics={TrialRecord.EXPERT: expert,
                                     "domain_share_of_expert": float(clusters.histogram(domain)[expert])})
