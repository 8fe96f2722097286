"""What the two expert strategies (SLM-mix, SLM-pn) share: their clustering and the
generic train tokens of each cluster (their routed generic perplexity is
``models/train/generic_eval.py``'s, on the same sequences as every dense model's)."""

from __future__ import annotations

from slmfactory.data.clustering import run_clustering
from slmfactory.data.tokens import NpyWriter, TokenSource
from slmfactory.platform.stages import Stage

BY_CLUSTER_VERSION = "by-cluster-v2"  # v2: streamed, in the split's stored order; bounds in the marker


def expert_clusters(cfg, k: int, domains: bool = False):
    """The generic clustering whose ``k`` clusters are the experts (the paper uses 16-64
    experts but k = 1024 clusters for importance sampling), from the same cached generic
    embeddings: only k-means reruns. ``domains``: also assign the in-domain windows (the
    specialisation side); the generic side never depends on them."""
    return run_clustering(cfg.replace(**{"cluster.k": k}) if k != cfg.cluster.k else cfg,
                          progress=False, domains=domains)


def cluster_streams(cfg, clusters) -> list[TokenSource]:
    """Every cluster's generic train tokens in one file (a stage keyed by the clustering),
    one ``TokenSource`` slice per cluster (memory-mapped by workers; nothing is copied per
    cluster). Written cluster after cluster, a batch of windows at a time."""
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
