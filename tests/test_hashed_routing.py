"""New text reaches a hashed-tfidf clustering through the clustering's own fitted model:
``model: auto``'s routing (``catalog.router_data`` + ``engine.route_embedding`` +
``pick_domain``, what a serving replica runs) and a new domain's cluster histogram
(``instant.cluster_counts``, what ``POST /v1/domains`` and ``slmfactory specialize`` run)
agree with ``Clusters.assign_texts``. Its centroids have the SVD's 32-256 dimensions, not
MiniLM's 384: embedding new text with MiniLM cannot be compared with them.

One real clustering of the tiny corpus (real Ray Data, real scikit-learn), no server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def hashed(tiny_root, tmp_path_factory):
    """(cfg, Clusters, window texts: a few of each part's) of a hashed-tfidf clustering."""
    import ray

    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer
    from slmfactory.platform.config import load_config

    work = tmp_path_factory.mktemp("hashed-routing") / "work"
    shutil.copytree(tiny_root, work)
    cfg = load_config(TINY, {"workdir": str(work), "cluster.embedder": "hashed-tfidf"})
    try:
        cl = run_clustering(cfg, progress=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    t = pads.dataset(str(cl.domains_stage.path("windows")), format="parquet").to_table(columns=["part", "tokens"])
    parts = t.column("part").to_pylist()
    rows = [i for d in sorted(set(parts)) for i in [j for j, p in enumerate(parts) if p == d][:8]]
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode([list(t.column("tokens")[i].as_py()) for i in rows], skip_special_tokens=True)
    return cfg, cl, [x for x in texts if x.strip()]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_auto_routes_through_the_fitted_hashed_model(hashed):
    from slmfactory.data.clustering import hashed as embed_hashed
    from slmfactory.serving.catalog import router_data
    from slmfactory.serving.engine import pick_domain, route_embedding, uses_minilm

    cfg, cl, texts = hashed
    assert cl.embedder == embed_hashed.NAME and cl.centroids.shape[1] != 384
    domains = [p for p in cl.parts if p != "generic"]
    router = router_data(cfg, domains)
    assert router["embedder"] == embed_hashed.NAME and Path(router["embedder_model"]).is_file()
    assert not uses_minilm(router)  # no MiniLM needed to route
    want = cl.assign_texts(texts)
    assert len(set(want.tolist())) >= 2, "the texts fall in more than one cluster"
    for text, cluster in zip(texts, want):
        emb = route_embedding(router, [text])
        assert emb.shape == (1, cl.centroids.shape[1])
        domain, info = pick_domain(router, set(domains), emb)
        assert info["cluster"] == int(cluster)
        shares = {d: cl.histogram(d)[cluster] for d in domains}
        assert info["share"] == pytest.approx(shares[domain]) and shares[domain] == max(shares.values())


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_new_domains_histogram_uses_the_fitted_hashed_model(hashed):
    from slmfactory.data.clustering import hashed as embed_hashed
    from slmfactory.models.instant import Family, cluster_counts

    cfg, cl, texts = hashed
    # Two families on the one clustering (as slm-pn and slm-mix at the same k): one embedding.
    families = {"pn": Family("slm-pn", None, cl), "mix": Family("slm-mix", None, cl)}
    counts, flops = cluster_counts(cfg, texts, families)
    want = np.bincount(cl.assign_texts(texts), minlength=cl.k)
    assert np.array_equal(counts["pn"], want) and np.array_equal(counts["mix"], want)
    _, _, features = embed_hashed.transform(cl.hashed_model(), texts)
    assert flops == pytest.approx(embed_hashed.embedding_flops(len(texts), int(features.sum()),
                                                               int(cl.centroids.shape[1])))
