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
    from slmfactory.data.cluster_pipeline import run_clustering

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
    from slmfactory.data.cluster_pipeline import WINDOW_COLUMNS
    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

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
    from slmfactory.data.clusters import load_clusters
    from slmfactory.data.cluster_pipeline import run_clustering

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
    from slmfactory.data.cluster_pipeline import run_clustering

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
    from slmfactory.data.tokenizer import ensure_tokenizer, load_tokenizer

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
    from slmfactory.data.clusters import total_variation
    from slmfactory.data.resample import load_resampled_tokens, resample

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
    from slmfactory.data.tokens import resampled_source

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
    from slmfactory.data.resample import largest_remainder

    p = np.array([0.5, 0.3, 0.2, 0.0])
    assert largest_remainder(p, 10).tolist() == [5, 3, 2, 0]
    n = largest_remainder(np.array([1 / 3, 1 / 3, 1 / 3]), 10)
    assert n.sum() == 10 and n.max() - n.min() <= 1


@pytest.mark.timeout(60)
def test_missing_corpus_is_a_data_error(tmp_path):
    from slmfactory.data.cluster_pipeline import run_clustering

    with pytest.raises(DataError, match="corpus"):
        run_clustering(_cfg(tmp_path / "nowhere"), progress=False)


@pytest.mark.timeout(60)
def test_empty_domain_is_a_data_error(tiny_cfg):
    from slmfactory.data.cluster_pipeline import run_clustering

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
    from slmfactory.data.cluster_pipeline import run_clustering

    cfg, cl, _ = clustered
    big = cfg.replace(**{"cluster.k": 4096, "cluster.sample_windows": 4096})
    with pytest.raises(DataError, match="cluster.k"):
        run_clustering(big, progress=False)
    _shutdown_ray()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unknown_domain_and_bad_tokens(clustered):
    from slmfactory.data.clusters import load_clusters
    from slmfactory.data.resample import resample

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

    from slmfactory.data.cluster_pipeline import run_clustering
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
