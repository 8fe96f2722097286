"""What the two expert strategies (SLM-mix, SLM-pn) share: their clustering, the generic
train tokens of each cluster, and the *routed* generic perplexity (PAPER.md Table 8:
each generic validation window scored by the expert of its own cluster)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from slmfactory.models.data import TokenSource
from slmfactory.models.trainer import evaluate_on_trial_device

BY_CLUSTER_VERSION = "by-cluster-v2"  # v2: streamed, in the split's stored order; bounds in the marker


def expert_clusters(cfg, k: int, domains: bool = False):
    """The generic clustering whose ``k`` clusters are the experts (the paper uses 16-64
    experts but k = 1024 clusters for importance sampling), from the same cached generic
    embeddings: only k-means reruns. ``domains``: also assign the in-domain windows (the
    specialisation side); the generic side never depends on them."""
    from slmfactory.platform.clusters import run_clustering

    return run_clustering(cfg.replace(**{"cluster.k": k}) if k != cfg.cluster.k else cfg,
                          progress=False, domains=domains)


def cluster_streams(cfg, clusters) -> list[TokenSource]:
    """Every cluster's generic train tokens in one file (a stage keyed by the clustering),
    one ``TokenSource`` slice per cluster (memory-mapped by workers; nothing is copied per
    cluster). Written cluster after cluster, a batch of windows at a time."""
    from slmfactory.platform.npy import NpyWriter
    from slmfactory.platform.stages import Stage

    stage = Stage.of(cfg.root, "tokens", "generic-by-cluster", version=BY_CLUSTER_VERSION, clusters=clusters.key)

    def build(work) -> dict:
        bounds = [0]
        with NpyWriter(work / "cluster_tokens.npy") as w:
            for c in range(clusters.k):
                for chunk in clusters.iter_cluster_tokens(c):
                    w.append(chunk)
                bounds.append(w.n)
        return {"bounds": bounds}

    bounds = stage.build(build)["bounds"]
    path = str(stage.path("cluster_tokens.npy"))
    return [TokenSource(path, stage.key, int(bounds[c]), int(bounds[c + 1])) for c in range(clusters.k)]


def routed_generic_nll(cfg, clusters, expert_model: Callable[[int], torch.nn.Module],
                       experts: list[int] | None = None) -> dict[str, float]:
    """Generic validation NLL with each window scored by its own cluster's expert.

    The first ``pretrain.eval_tokens`` tokens of generic validation windows (window-id
    order) are grouped by cluster; each group, joined by eos, is scored by
    ``expert_model(c)``. A cluster without an expert (a mixture skips clusters too small
    to train) is scored by the expert of the nearest centroid that has one.
    """
    have = sorted(experts) if experts is not None else list(range(clusters.k))
    if not have:
        return {}
    sim = clusters.centroids @ clusters.centroids[have].T                     # (k, |have|)
    route = {c: (c if c in have else have[int(np.argmax(sim[c]))]) for c in range(clusters.k)}
    streams = clusters.generic_valid_streams(cfg.pretrain.eval_tokens)          # cluster -> tokens
    by_expert: dict[int, list[np.ndarray]] = {}
    for c, toks in streams.items():
        by_expert.setdefault(route[c], []).append(toks)
    total, n = 0.0, 0
    for e, parts in sorted(by_expert.items()):
        toks = np.concatenate(parts)
        if len(toks) < cfg.data.seq_len:
            continue  # not one full sequence: nothing to score at this context
        s, k = evaluate_on_trial_device(expert_model(e).eval(), toks, cfg.data.seq_len, cfg.pretrain.batch_size)
        total, n = total + s, n + k
    if n == 0:
        return {}
    return {"routed_generic_valid_nll": total / n, "routed_generic_ppl": math.exp(total / n),
            "routed_generic_tokens": float(n)}
