"""Clustering and SLM-is resampling on the tiny real-text sample, with real Ray Data,
real MiniLM and real faiss (k = 8, 64-token windows).

One clustering run is shared by the module (embedding is the slow part); the tests that
need a different k reuse its cached embeddings, so only k-means and assignment rerun.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from slmfactory.platform.errors import ConfigError, DataError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _cfg(root: Path, **overrides):
    from slmfactory.platform.config import load_config

    return load_config(TINY, {"workdir": str(root), **overrides})


def _shutdown_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def clustered(tiny_root, tmp_path_factory):
    """(cfg, Clusters, first-run seconds) on a private copy of the tiny corpus."""
    from slmfactory.data.clustering.pipeline import run_clustering

    work = tmp_path_factory.mktemp("clusters") / "work"
    shutil.copytree(tiny_root, work)
    cfg = _cfg(work)
    t0 = time.perf_counter()
    try:
        cl = run_clustering(cfg, progress=False)
    finally:
        _shutdown_ray()
    return cfg, cl, time.perf_counter() - t0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_windows_parquet_complete_and_assigned(clustered):
    from slmfactory.data.clustering.pipeline import WINDOW_COLUMNS
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg, cl, _ = clustered
    import pyarrow as pa

    # Generic windows live with the generic clustering, in-domain ones with their assignment.
    tables = []
    for where in (cl.windows_dir, cl.domains_stage.path("windows")):
        ds = pads.dataset(str(where), format="parquet")
        assert set(WINDOW_COLUMNS) <= set(ds.schema.names)
        tables.append(ds.to_table(columns=["window_id", "doc_id", "part", "split", "start", "end", "tokens",
                                           "cluster"]))
    assert tables[0].num_rows == cl.meta["windows"] > 0
    t = pa.concat_tables(tables)
    ids = t.column("window_id").to_pylist()
    assert len(set(ids)) == len(ids), "window ids are unique"
    cluster = t.column("cluster").to_numpy()
    assert ((cluster >= 0) & (cluster < cl.k)).all(), "every window assigned to one of the k clusters"

    # Every document of every part/split is covered by its windows, span for span.
    tok = load_tokenizer(ensure_tokenizer(cfg))
    parts = set(zip(t.column("part").to_pylist(), t.column("split").to_pylist()))
    assert ("generic", "train") in parts and ("generic", "valid") in parts
    for dom in cl.domain_meta["domains"]:
        assert (dom, "train") in parts
    df = t.select(["doc_id", "part", "start", "end", "tokens"]).to_pandas()
    legal = pq.read_table(cfg.corpus_dir / "domains" / "legal" / "train.parquet").to_pandas()
    for doc_id, text in zip(legal["doc_id"][:3], legal["text"][:3]):
        ids_ = tok(text, add_special_tokens=False)["input_ids"]
        w = df[(df.doc_id == doc_id) & (df.part == "legal")].sort_values("start")
        assert w["start"].tolist() == list(range(0, len(ids_), cfg.cluster.window_tokens))
        assert np.concatenate(w["tokens"].tolist()).tolist() == ids_
        assert (w["end"] - w["start"] <= cfg.cluster.window_tokens).all()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_histograms_entropies_and_split(clustered):
    cfg, cl, _ = clustered
    assert cl.centroids.shape == (cl.k, 384) and cl.centroids.dtype == np.float32
    for part in cl.parts:
        h = cl.histogram(part)
        assert h.shape == (cl.k,)
        assert h.sum() == pytest.approx(1.0)
        e = cl.entropy(part)
        assert np.isfinite(e) and 0.0 <= e <= np.log(cl.k) + 1e-9
        assert 0 <= cl.most_frequent(part) < cl.k
    # The domain histogram counts only the first data.domain_train_tokens tokens.
    small = cl.counts("legal").sum()
    assert small <= np.ceil(cfg.data.domain_train_tokens / cfg.cluster.window_tokens) + 50
    # The per-cluster split holds exactly the generic train windows, eos after each.
    sizes = cl.cluster_sizes()
    assert sizes.shape == (cl.k,)
    assert int(np.sum(cl.counts("generic"))) == cl.meta["part_counts"]["generic/train"]
    c = int(np.argmax(sizes))
    toks = cl.cluster_tokens(c)
    assert toks.dtype == np.int32 and len(toks) == sizes[c]
    assert int((toks == cl.eos_id).sum()) == cl.counts("generic")[c]
    assert np.array_equal(cl.cluster_tokens(c, max_tokens=100), toks[:100])
    summary = cl.summary()
    assert "legal" in summary and "nats" in summary


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rerun_is_cached(clustered):
    from slmfactory.data.clustering.clusters import load_clusters
    from slmfactory.data.clustering.pipeline import run_clustering

    import ray

    cfg, cl, first = clustered
    _shutdown_ray()
    markers = {p: p.stat().st_mtime_ns for p in (cfg.root / "clusters").glob("*/stage.json")}
    again = run_clustering(cfg, progress=False)
    assert again.dir == cl.dir and again.domains_key == cl.domains_key
    assert not ray.is_initialized(), "a cached clustering starts no Ray job"
    assert {p: p.stat().st_mtime_ns for p in (cfg.root / "clusters").glob("*/stage.json")} == markers
    assert np.array_equal(load_clusters(cfg).centroids, cl.centroids)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_in_domain_size_never_touches_the_generic_clustering(clustered):
    """Another ``data.domain_train_tokens`` re-embeds and re-assigns only in-domain windows:
    the generic embeddings and k-means are reused as they are."""
    cfg, cl, _ = clustered
    from slmfactory.data.clustering.pipeline import run_clustering

    smaller = cfg.replace(**{"data.domain_train_tokens": cfg.data.domain_train_tokens // 2})
    generic_markers = {p: p.stat().st_mtime_ns for p in (cfg.root / "clusters").glob("*/stage.json")
                       if "domains" not in p.parent.name}
    try:
        cl2 = run_clustering(smaller, progress=False)
    finally:
        _shutdown_ray()
    assert cl2.key == cl.key and cl2.dir == cl.dir and np.array_equal(cl2.centroids, cl.centroids)
    assert cl2.domains_key != cl.domains_key
    assert {p: p.stat().st_mtime_ns for p in generic_markers} == generic_markers
    assert cl2.counts("legal").sum() < cl.counts("legal").sum()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_assign_texts_routes_like_the_pipeline(clustered):
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg, cl, _ = clustered
    t = pads.dataset(str(cl.windows_dir), format="parquet").to_table(
        columns=["part", "tokens", "cluster"]).slice(0, 24)
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode([list(x) for x in t.column("tokens").to_pylist()], skip_special_tokens=True)
    got = cl.assign_texts(texts)
    # Same model, same centroids; batch padding may move a borderline window.
    assert (got == t.column("cluster").to_numpy()).mean() >= 0.9


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resample_matches_domain_histogram(clustered):
    from slmfactory.data.clustering.clusters import total_variation
    from slmfactory.data.clustering.resampling import load_resampled_tokens, resample

    cfg, cl, _ = clustered
    try:
        res = resample(cfg, "legal", 30_000, progress=True)  # the CLI's path, progress lines included
    finally:
        _shutdown_ray()
    assert res.tv_distance <= 0.05
    assert res.windows == res.unique_windows + res.repeated_windows
    assert abs(res.tokens - 30_000) <= 0.1 * 30_000
    # Measured independently from the parquet written through Ray Data.
    t = pads.dataset(str(res.path / "data"), format="parquet").to_table(columns=["cluster", "window_id"])
    assert t.num_rows == res.windows
    hist = np.bincount(t.column("cluster").to_numpy(), minlength=cl.k) / t.num_rows
    assert total_variation(hist, cl.histogram("legal")) <= 0.05
    # Every resampled window is a generic train window of the cluster it claims.
    gen = pads.dataset(str(cl.windows_dir), format="parquet").to_table(
        columns=["window_id", "part", "split", "cluster"]).to_pandas()
    gen = gen[(gen.part == "generic") & (gen.split == "train")].set_index("window_id")["cluster"]
    got = t.to_pandas()
    assert (gen.loc[got["window_id"]].to_numpy() == got["cluster"].to_numpy()).all()
    # The training stream was written by the stage, memory-mapped, and holds exactly the
    # written windows (each + eos): same token multiset, windows' histogram as reported.
    stream = load_resampled_tokens(res.path)
    assert isinstance(stream, np.memmap) and (res.path / "tokens.npy").is_file()
    assert stream.dtype == np.int32 and len(stream) == res.tokens
    assert int((stream == cl.eos_id).sum()) == res.windows
    data = pads.dataset(str(res.path / "data"), format="parquet").to_table(columns=["cluster", "tokens"])
    flat = data.column("tokens").combine_chunks().flatten().to_numpy()
    vocab = int(max(stream.max(), flat.max(), cl.eos_id)) + 1
    want = np.bincount(flat, minlength=vocab)
    want[cl.eos_id] += data.num_rows
    assert np.array_equal(np.bincount(stream, minlength=vocab), want)
    assert np.allclose(np.bincount(data.column("cluster").to_numpy(), minlength=cl.k) / data.num_rows, res.histogram)
    # Shuffled: not the windows in table order (which would put a document's windows together).
    assert not np.array_equal(stream[:len(flat)][:200], flat[:200])
    from slmfactory.data.tokens.streams import resampled_source

    src = resampled_source(res)
    assert np.array_equal(src.load(), stream) and src.key == res.path.name
    assert "TV" in res.summary() or "total variation" in res.summary()
    # Rerun: the finished stage is returned as it is.
    marker = (res.path / "stage.json").stat().st_mtime_ns
    again = resample(cfg, "legal", 30_000, progress=False)
    _shutdown_ray()
    assert again.path == res.path and again.tv_distance == res.tv_distance
    assert (res.path / "stage.json").stat().st_mtime_ns == marker
    # Rebuilt from scratch with the same seed: the same stream, token for token.
    first = np.array(stream)
    shutil.rmtree(res.path)
    try:
        rebuilt = resample(cfg, "legal", 30_000, progress=False)
    finally:
        _shutdown_ray()
    assert rebuilt.path == res.path and rebuilt.windows == res.windows
    assert np.array_equal(np.asarray(load_resampled_tokens(rebuilt.path)), first)


@pytest.mark.timeout(120)
def test_largest_remainder_is_exact():
    from slmfactory.data.clustering.resampling import largest_remainder

    p = np.array([0.5, 0.3, 0.2, 0.0])
    assert largest_remainder(p, 10).tolist() == [5, 3, 2, 0]
    n = largest_remainder(np.array([1 / 3, 1 / 3, 1 / 3]), 10)
    assert n.sum() == 10 and n.max() - n.min() <= 1


@pytest.mark.timeout(60)
def test_missing_corpus_is_a_data_error(tmp_path):
    from slmfactory.data.clustering.pipeline import run_clustering

    with pytest.raises(DataError, match="corpus"):
        run_clustering(_cfg(tmp_path / "nowhere"), progress=False)


@pytest.mark.timeout(60)
def test_empty_domain_is_a_data_error(tiny_cfg):
    from slmfactory.data.clustering.pipeline import run_clustering

    empty = tiny_cfg.corpus_dir / "domains" / "hollow"
    empty.mkdir()
    src = pq.read_table(tiny_cfg.corpus_dir / "domains" / "legal" / "train.parquet")
    pq.write_table(src.slice(0, 0), empty / "train.parquet")
    with pytest.raises(DataError, match="hollow"):
        run_clustering(tiny_cfg, progress=False)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_k_larger_than_windows_is_a_data_error(clustered, tmp_path):
    """Reuses the module's cached embeddings: the error comes before Ray starts."""
    from slmfactory.data.clustering.pipeline import run_clustering

    cfg, cl, _ = clustered
    big = cfg.replace(**{"cluster.k": 4096, "cluster.sample_windows": 4096})
    with pytest.raises(DataError, match="cluster.k"):
        run_clustering(big, progress=False)
    _shutdown_ray()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unknown_domain_and_bad_tokens(clustered):
    from slmfactory.data.clustering.clusters import load_clusters
    from slmfactory.data.clustering.resampling import resample

    cfg, cl, _ = clustered
    with pytest.raises(ConfigError, match="tokens"):
        resample(cfg, "legal", 0, progress=False)
    with pytest.raises(DataError, match="atlantis"):
        load_clusters(cfg).histogram("atlantis")
    with pytest.raises(DataError, match="slmfactory cluster"):
        load_clusters(cfg.replace(**{"cluster.k": 5}))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_other_k_reuses_embeddings_and_logs_to_mlflow(clustered):
    """k = 4 on the cached embeddings; logs to a real MLflow (sqlite) run."""
    from mlflow.tracking import MlflowClient

    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.platform.tracking import open_tracker

    cfg, cl, first = clustered
    cfg4 = cfg.replace(**{"cluster.k": 4, "tracking.enabled": True})
    tracker = open_tracker(cfg4, "cluster-k4")
    try:
        cl4 = run_clustering(cfg4, progress=False, tracker=tracker)
    finally:
        tracker.close()
        _shutdown_ray()
    assert cl4.k == 4 and cl4.dir != cl.dir
    assert cl4.stage.inputs["embeddings"] == cl.stage.inputs["embeddings"]  # the same generic embeddings
    run = MlflowClient(cfg4.tracking_uri).get_run(tracker.run_id)
    assert run.data.params["cluster.k"] == "4"
    assert "entropy/legal" in run.data.metrics and "time/kmeans_s" in run.data.metrics
    arts = [a.path for a in MlflowClient(cfg4.tracking_uri).list_artifacts(tracker.run_id, "clusters")]
    assert "clusters/histograms.png" in arts
    summary = MlflowClient(cfg4.tracking_uri).download_artifacts(tracker.run_id, "clusters/histograms.json")
    assert json.loads(Path(summary).read_text())["entropy_unit"] == "nats"


# -- the embedder, and where importance sampling draws from ---------------------------------

@pytest.mark.timeout(60)
def test_embedder_is_validated_and_logged(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.cluster.embedder == "minilm" and cfg.to_dict()["cluster.embedder"] == "minilm"
    hashed = _cfg(tmp_path, **{"cluster.embedder": "hashed-tfidf"})
    assert hashed.to_dict()["cluster.embedder"] == "hashed-tfidf"
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, **{"cluster.embedder": "bert"})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cluster.embedder:") and "hashed-tfidf" in msg and "'bert'" in msg


@pytest.mark.timeout(60)
def test_embedder_keys_the_clustering_stages(tiny_cfg):
    """Another embedder is another embedding, clustering and domain assignment; hashed-tfidf's
    domain embeddings key on the generic stage its model is fitted in."""
    from slmfactory.data.clustering.clusters import (
        assignment_stage, corpus_inputs, domain_embedding_stage, generic_embedding_stage, kmeans_stage)

    hashed = tiny_cfg.replace(**{"cluster.embedder": "hashed-tfidf"})
    inputs = corpus_inputs(tiny_cfg)
    stages = {}
    for name, cfg in (("minilm", tiny_cfg), ("hashed", hashed)):
        emb, demb = generic_embedding_stage(cfg, inputs), domain_embedding_stage(cfg, inputs)
        km = kmeans_stage(cfg, emb)
        stages[name] = (emb.key, demb.key, km.key, assignment_stage(cfg, km, demb).key)
        if name == "hashed":
            assert demb.inputs["fit"]["key"] == emb.key
    assert all(a != b for a, b in zip(stages["minilm"], stages["hashed"]))


def _check_provenance(cfg, cl) -> None:
    """provenance.json, recomputed from the windows tables: per domain, its top clusters and
    their generic train windows by source (shares summing to 1, by collection too)."""
    from slmfactory.data.corpus.sources import collection_of

    prov = cl.provenance()
    assert prov == json.loads(cl.domains_stage.path("provenance.json").read_text())
    gen = pads.dataset(str(cl.windows_dir), format="parquet").to_table(
        columns=["part", "split", "source", "cluster"]).to_pandas()
    gen = gen[(gen.part == "generic") & (gen.split == "train")]
    corpus_sources = set(pq.read_table(cfg.corpus_dir / "generic" / "train.parquet", columns=["source"])
                         .column(0).to_pylist())
    assert set(gen.source) <= corpus_sources and len(set(gen.source)) > 1
    for d in cl.parts[1:]:
        e = prov["domains"][d]
        hist = cl.histogram(d)
        tops = [t["cluster"] for t in e["top_clusters"]]
        # The largest clusters of the domain, holding the stated share of its windows.
        assert tops == [int(c) for c in np.argsort(-hist, kind="stable")[:len(tops)]]
        assert e["top_share"] == pytest.approx(hist[tops].sum()) and e["windows"] == int(cl.counts(d).sum())
        assert e["top_share"] >= prov["mass"] or len(tops) == prov["max_clusters"]
        pooled = gen[gen.cluster.isin(tops)].source.value_counts(normalize=True)
        assert e["top_by_source"] == pytest.approx(pooled.to_dict())
        assert sum(e["top_by_source"].values()) == pytest.approx(1.0)
        by_coll = {}
        for s, v in e["top_by_source"].items():
            by_coll[collection_of(s)] = by_coll.get(collection_of(s), 0.0) + v
        assert e["top_by_collection"] == pytest.approx(by_coll)
        assert sum(e["expected_by_source"].values()) == pytest.approx(1.0)
        assert sum(e["expected_by_collection"].values()) == pytest.approx(1.0)
    assert "generic text in each domain's top clusters" in cl.summary()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_provenance_says_which_generic_sources_sit_in_each_domains_clusters(clustered):
    cfg, cl, _ = clustered
    _check_provenance(cfg, cl)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_hashed_tfidf_clusters_in_the_ray_data_pipeline(tiny_root, tmp_path):
    """cluster.embedder: hashed-tfidf through the real Ray Data pipeline: fitted once on the
    generic sample, every window (generic and in-domain) embedded with that model, clustered,
    assigned; its cost counted on its own FLOPs (orders of magnitude under MiniLM's)."""
    from slmfactory.data.clustering import hashed as embed_hashed
    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.data.clustering.clusters import MINILM_PARAMS, load_clusters
    from slmfactory.data.clustering.minilm import from_arrow
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    work = tmp_path / "work"
    shutil.copytree(tiny_root, work)
    cfg = _cfg(work, **{"cluster.embedder": "hashed-tfidf"})
    try:
        cl = run_clustering(cfg, progress=False)
    finally:
        _shutdown_ray()
    assert cl.embedder == "hashed-tfidf" and cl.meta["config"]["embedder"] == "hashed-tfidf"
    emb_dir = cl.stage.path(cl.meta["embedder_model"]).parent
    assert (emb_dir / embed_hashed.MODEL_FILE).is_file() and emb_dir.name.startswith("emb-generic-")
    dim = cl.meta["embed_dim"]
    assert dim == embed_hashed.fit_dim(cl.meta["embedder_fit"]["windows"]) and cl.centroids.shape == (cfg.cluster.k,
                                                                                                        dim)
    # Every window embedded as a unit vector of the model's dimension and assigned to a cluster.
    emb = pads.dataset(str(emb_dir / "embedded"), format="parquet").to_table(
        columns=["embedding", "hashed_features"])
    x = from_arrow(emb.column("embedding"))
    assert x.shape[1] == dim and np.allclose(np.linalg.norm(x, axis=1)[emb.column(1).to_numpy() > 0], 1.0, atol=1e-4)
    for part in cl.parts:
        assert cl.counts(part).sum() > 0
    assert (cl.counts("generic") > 0).sum() >= 2, "the generic windows fall in more than one cluster"
    # New texts go through the same fitted model: a window's text lands in its window's cluster
    # (a sparse row times a fixed basis: no batch effect).
    t = pads.dataset(str(cl.windows_dir), format="parquet").to_table(columns=["tokens", "cluster"]).slice(0, 32)
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode([list(v) for v in t.column("tokens").to_pylist()], skip_special_tokens=True)
    assert np.array_equal(cl.assign_texts(texts), t.column("cluster").to_numpy())
    # Its cost: the stated FLOPs on the features it read, the fit on the generic side.
    st = cl.embedding_stats("legal")
    assert cl.embedding_cost("legal").flops == pytest.approx(embed_hashed.embedding_flops(st["windows"], st["features"],
                                                                                          dim))
    gen = cl.embedding_stats("generic")
    assert cl.embedding_cost("generic").flops == pytest.approx(
        embed_hashed.embedding_flops(gen["windows"], gen["features"], dim) + cl.meta["embedder_fit"]["flops"])
    assert 0 < cl.embedding_cost("legal").flops < 2.0 * MINILM_PARAMS * st["windows"] / 100
    _check_provenance(cfg, cl)
    # load_clusters finds the same clustering again (keyed by the embedder), without Ray.
    assert load_clusters(cfg).dir == cl.dir


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_slm_is_trial_logs_where_its_resampled_text_came_from(clustered):
    """An slm-is trial, run by the trial driver and logged to a real MLflow: its resampled
    pretraining tokens' shares by generic source and by collection (each summing to 1, equal
    to the resampled set's own count), and the report's table read back from the runs."""
    from mlflow.tracking import MlflowClient

    from slmfactory.data.clustering.clusters import load_clusters, source_label
    from slmfactory.data.corpus.sources import collection_of
    from slmfactory.data.clustering.resampling import metric_label, resample
    from slmfactory.models.train.launch import LocalLauncher
    from slmfactory.models.strategies import get_strategy
    from slmfactory.pipeline import run_trial
    from slmfactory.analysis.report import table_is_provenance, write_report
    from slmfactory.trial import log_trial

    cfg, _, _ = clustered
    cfg = cfg.replace(**{"strategy.name": "slm-is", "data.domain": "legal", "finetune.max_tokens": 8 * 8 * 64,
                         "finetune.eval_every": 4, "tracking.enabled": True})
    try:
        record = run_trial(cfg, log=None, launcher=LocalLauncher(device="cpu", log=None))
        res = resample(cfg, "legal", get_strategy("slm-is").resample_tokens(cfg), progress=False)
    finally:
        _shutdown_ray()
    run_id = log_trial(cfg, "is-provenance", record.key, record)
    metrics = MlflowClient(cfg.tracking_uri).get_run(run_id).data.metrics
    by_source = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("is_share/source/")}
    by_coll = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("is_share/collection/")}
    assert sum(by_source.values()) == pytest.approx(1.0) and sum(by_coll.values()) == pytest.approx(1.0)
    # The shares are the resampled stream's own tokens by the source of their window.
    assert sum(res.source_tokens.values()) == res.tokens
    want: dict[str, float] = {}
    for s, n in res.source_tokens.items():
        want[metric_label(source_label(s))] = want.get(metric_label(source_label(s)), 0.0) + n / res.tokens
    assert by_source == pytest.approx(want)
    colls = {metric_label(collection_of(s)) for s in res.source_tokens}
    assert set(by_coll) == colls
    # Counted independently on the resampled parquet: the windows' sources, every draw.
    data = pads.dataset(str(res.path / "data"), format="parquet").to_table(columns=["window_id", "tokens"]).to_pandas()
    gen = pads.dataset(str(load_clusters(cfg).windows_dir), format="parquet").to_table(
        columns=["window_id", "source"]).to_pandas().set_index("window_id")["source"]
    data["n"] = data["tokens"].map(len) + 1
    counted = data.groupby(gen.loc[data["window_id"]].to_numpy())["n"].sum()
    assert {s: int(n) for s, n in counted.items()} == res.source_tokens
    # The report's table, read back from the run, and its section of report.md.
    table = table_is_provenance(cfg.tracking_uri, "is-provenance")
    top = max(want, key=want.get)
    assert f"legal's resampled text: {want[top]:.0%} {top}" in table
    write_report(cfg.tracking_uri, "is-provenance", cfg.root / "report", log_to_mlflow=False)
    doc = (cfg.root / "report" / "report.md").read_text()
    assert "## Where importance sampling drew its text" in doc and table in doc
