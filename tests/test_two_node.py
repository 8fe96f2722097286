"""The clustering pipeline on a real two-node Ray cluster on this machine (loopback):
``ray start --head`` plus a second ``ray start --address``, each with its own temp dir
and one CPU, the driver joining with ``init_ray(address=...)``.

Checks: every window embedded and assigned exactly once; assignments agree with an
in-process MiniLM + nearest centroid; and a single-node run of k-means / assignment on
the same (cached) embeddings gives the same centroids and histograms.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.local_cluster import local_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture
def two_node_cluster(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the driver sends the token too
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with local_cluster() as (address, _):
        yield address


def _shrink_corpus(cfg, generic_docs: int, keep_domains: tuple[str, ...]) -> None:
    """Keep the test short on 2 cores: fewer generic documents, two domains."""
    gen = cfg.corpus_dir / "generic" / "train.parquet"
    pq.write_table(pq.read_table(gen).slice(0, generic_docs), gen)
    for d in (cfg.corpus_dir / "domains").iterdir():
        if d.name not in keep_domains:
            shutil.rmtree(d)


def _expected_windows(cfg) -> int:
    from slmfactory.data.clustering.clusters import corpus_inputs
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    w = cfg.cluster.window_tokens
    n = 0
    for part, _, path in corpus_inputs(cfg):
        if part != "generic":
            continue  # in-domain windows live with their own assignment stage
        for ids in tok(pq.read_table(path).column("text").to_pylist(), add_special_tokens=False)["input_ids"]:
            n += -(-len(ids) // w)
    return n


@pytest.mark.timeout(900)
def test_pipeline_on_two_local_nodes_matches_single_node(two_node_cluster, tiny_root, tmp_path):
    import ray

    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.platform.config import load_config
    from slmfactory.data.clustering.minilm import encode, load_minilm
    from slmfactory.platform.runtime import init_ray
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    work = tmp_path / "two"
    shutil.copytree(tiny_root, work)
    # One embedding actor of half a CPU: the other node keeps a whole CPU, so a task
    # that asks 1 CPU (some Ray Data internals do, whatever we pass) can always run.
    cfg = load_config(TINY, {"workdir": str(work), "cluster.embed_actors": 1})
    _shrink_corpus(cfg, generic_docs=30, keep_domains=("legal", "religion"))

    init_ray(address=two_node_cluster)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2 and sum(n["Resources"].get("CPU", 0) for n in alive) == 2
    t0 = time.perf_counter()
    cl = run_clustering(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    assert ray.is_initialized(), "run_clustering must not shut down a cluster it joined"
    ray.shutdown()

    # Complete: every window of every document, once, with a valid cluster.
    t = pads.dataset(str(cl.windows_dir), format="parquet").to_table(
        columns=["window_id", "part", "tokens", "cluster"])
    assert t.num_rows == _expected_windows(cfg) == cl.meta["windows"]
    assert len(set(t.column("window_id").to_pylist())) == t.num_rows
    cluster = t.column("cluster").to_numpy()
    assert ((cluster >= 0) & (cluster < cl.k)).all()

    # Consistent: in-process MiniLM + nearest centroid gives the stored cluster.
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(t.num_rows, size=min(40, t.num_rows), replace=False))
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode([t.column("tokens")[int(i)].as_py() for i in pick], skip_special_tokens=True)
    emb = encode(load_minilm("cpu"), texts, 32)
    again = np.argmax(emb @ cl.centroids.T, axis=1)
    assert (again == cluster[pick]).mean() >= 0.9

    # Same result on one node: copy the cached embeddings into a fresh workdir so the
    # single-node run redoes sample, k-means, assignment and split (not the embedding).
    single_root = tmp_path / "single"
    shutil.copytree(work, single_root, ignore=shutil.ignore_patterns("k*-*"))
    cfg1 = cfg.replace(workdir=str(single_root), **{"cluster.embed_actors": 1})
    cl1 = run_clustering(cfg1, progress=False)  # local Ray, shut down on return
    assert not ray.is_initialized()
    assert cl1.key == cl.key and cl1.domains_key == cl.domains_key
    np.testing.assert_allclose(cl1.centroids, cl.centroids, atol=1e-5)
    for part in cl.parts:
        np.testing.assert_array_equal(cl1.counts(part), cl.counts(part))
    print(f"two-node clustering of {t.num_rows} windows: {elapsed:.1f}s")
