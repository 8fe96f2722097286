"""``slmfactory cluster``, the Ray Data pipeline: windows → embeddings (MiniLM, or hashed-tfidf) →
faiss k-means → cluster ids.

The pipeline (every stage a Ray Data job that streams parquet to parquet; the driver only
sees counts, the k-means sample and the centroids):

1. windows   read the corpus parquet, tokenize each document with the run's tokenizer,
             cut non-overlapping spans of ``cluster.window_tokens`` tokens, decode each
             span back to text (what MiniLM reads) → ``emb-<h>/windows_raw``.
2. embed     a pool of MiniLM actors (``map_batches``; a GPU each when present, a
             fraction of a CPU here) → ``emb-<h>/embedded`` (metadata + 384-d vector).
             ``cluster.embedder: hashed-tfidf``: first fit hashed n-grams + tf-idf + SVD
             on the hash sample of generic train windows (:mod:`slmfactory.data.clustering.hashed`,
             saved in the generic stage, used for the domains too), then a pool of its actors.
3. k-means   a deterministic hash sample of at most ``cluster.sample_windows`` generic
             train windows is pulled to the driver; faiss k-means (spherical: MiniLM
             vectors are unit-norm) gives the k centroids.
4. assign    a map over every embedded window: nearest centroid → ``k<k>-<h>/windows``.
5. split     the generic train windows, partitioned by cluster → ``k<k>-<h>/by_cluster``:
             the k experts' training sets of SLM-mix / SLM-pn; each cluster's generic
             windows counted by source. The domain assignment writes ``provenance.json``:
             per domain, the generic sources and collections in the clusters holding its
             text (what importance sampling can find, before any training).

Embedded windows are cached by a hash of (corpus bytes, tokenizer, window size) and the
clustering by that hash plus (k, sample, iterations, seed): changing k re-runs only k-means
and assignment; rerunning with the same inputs returns at once without starting Ray.

Reproducibility. On one machine a rerun in a fresh workdir gives the same bytes: the same
centroids, every window in the same cluster, the same per-cluster token files and (in
``resample``) the same SLM-is stream. Every order-dependent step sees a canonical order,
never Ray's scheduling: Ray Data keeps block order (``ray_data_context``:
``preserve_order``); windows are sorted by (doc_id, start) before MiniLM, so each encode
batch holds the same windows padded to the same length (a window's float embedding depends
on its batch's shape); every table the pipeline writes (embedded, windows, by_cluster) is
that sort cut into equal blocks, its files renamed ``part-<n>`` in key order
(``raydata.write_canonical``), so "sorted files, rows in order" is one order; the k-means
sample is a hash of (seed, window id), sorted by key; faiss k-means runs on one OpenMP
thread with ``cluster.seed``; the nearest centroid is an argmax over float64 scores.

What cannot be bitwise across machines: MiniLM's forward pass on CPU goes through oneDNN /
MKL kernels chosen for the CPU's instruction set (AVX2 vs AVX-512 accumulate in different
orders) and through ``torch.get_num_threads()`` (this node's cores), and a GPU runs other
kernels again; embeddings then differ in the last bits (~1e-7), and k-means, a chaotic
fixed-point iteration, can move a window near a boundary to another cluster. Such moves
are rare (windows near a Voronoi boundary) and change a domain's histogram by a window or
two; the float64 argmax keeps the assignment itself from adding more.

The result is read back through :mod:`slmfactory.data.clustering.clusters` (``Clusters``,
``load_clusters``), which also holds the stage keys this pipeline writes under.

Where each part lives: this module is the driver (``run_clustering``: stage reuse, the Ray
session, tracking) and stages 3-5 (k-means, assignment, the split by cluster); stages 1-2,
the windows and their embeddings, are :mod:`slmfactory.data.clustering.windows`; the
canonical-order machinery and the Ray Data context they all share are
:mod:`slmfactory.data.clustering.raydata`; the result's reader is its own module.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.data.clustering import hashed as embed_hashed
from slmfactory.data.clustering.clusters import (
    Clusters, assignment_stage, corpus_inputs, domain_embedding_stage, generic_embedding_stage, in_domain_counts,
    kmeans_stage, nearest_centroid, provenance)
from slmfactory.data.clustering.minilm import from_arrow
from slmfactory.data.clustering.raydata import (
    TASK_CPUS, Stages, dir_rows, generic_train, hash_sample, ray_data_context, write_canonical)
from slmfactory.data.clustering.windows import domain_doc_prefixes, embed_windows, generic_doc_fraction
from slmfactory.data.tokens import ensure_tokenizer, load_tokenizer
from slmfactory.platform.errors import DataError
from slmfactory.platform.runtime import ray_session
from slmfactory.platform.tracking import open_tracker


#: Beside the domain assignment: per domain, the generic sources of the clusters holding its text.
PROVENANCE_FILE = "provenance.json"


WINDOW_COLUMNS = ["window_id", "doc_id", "part", "split", "source", "start", "end", "tokens", "cluster"]


def _assign_batch(batch, centroids: np.ndarray):
    import pyarrow as pa

    cluster = nearest_centroid(from_arrow(batch.column("embedding")), centroids)
    return batch.drop_columns(["embedding"]).append_column("cluster", pa.array(cluster, pa.int32()))


def _check_k(cfg, n_generic: int) -> None:
    if n_generic < cfg.cluster.k:
        raise DataError(f"cluster.k = {cfg.cluster.k} is larger than the {n_generic} generic train windows; "
                        "lower cluster.k or cluster.window_tokens, or add generic data")


def _fit_kmeans(cfg, emb_dir: Path, n_generic: int, stages: Stages) -> tuple[np.ndarray, int]:
    """Stage 3: sample on the workers (hash threshold), top-up exactly on the driver."""
    import faiss
    import ray

    c = cfg.cluster
    s = min(c.sample_windows, n_generic)
    ds = ray.data.read_parquet(str(emb_dir / "embedded"), num_cpus=TASK_CPUS) \
        .select_columns(["window_id", "part", "split", "embedding"])
    picked = hash_sample(ds, c.seed, s, n_generic, "embedding")
    if picked is None:
        raise DataError("k-means: no generic train windows were embedded")
    x = np.ascontiguousarray(from_arrow(picked))
    stages.done("sample", f"{len(x):,} of {n_generic:,} generic windows for k-means")
    km = faiss.Kmeans(x.shape[1], c.k, niter=c.kmeans_iters, seed=c.seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, math.ceil(len(x) / c.k) + 1), min_points_per_centroid=1)
    # One OpenMP thread: faiss splits its sums and BLAS calls by thread count, so the same
    # sample and seed give the same centroids only at a fixed count (and k-means on at most
    # ``sample_windows`` vectors is a small part of the clustering's time).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    cent = np.asarray(km.centroids, dtype=np.float32)
    stages.done("kmeans", f"faiss k-means k={c.k}, {c.kmeans_iters} iterations on {len(x):,} x {x.shape[1]}")
    return cent, len(x)


def run_clustering(cfg, progress: bool = True, tracker=None, domains: bool = True) -> Clusters:
    """Embed and cluster the generic windows, and (``domains``) embed and assign each
    domain's in-domain windows: four stages, each reused when its inputs are unchanged
    (see the module doc)."""
    inputs = corpus_inputs(cfg)
    ensure_tokenizer(cfg)
    emb = generic_embedding_stage(cfg, inputs)
    km = kmeans_stage(cfg, emb)
    demb = domain_embedding_stage(cfg, inputs) if domains else None
    assign = assignment_stage(cfg, km, demb) if domains else None
    if km.done and (assign is None or assign.done):
        cl = Clusters(cfg, km, assign)
        if progress:
            print(f"[cluster] cached: {km.dir}", file=sys.stderr, flush=True)
        if tracker is not None:
            _log(cl, tracker)
        return cl
    if emb.done:  # embeddings cached: a k too large fails before Ray starts
        _check_k(cfg, int(emb.info["counts"].get("generic/train", 0)))

    own_tracker = tracker is None
    if own_tracker:
        tracker = open_tracker(cfg, "cluster", {"phase": "cluster", "k": str(cfg.cluster.k)})
    status = "FAILED"
    stages = Stages(progress)
    t_all = time.perf_counter()
    try:
        with ray_session():
            ray_data_context(progress)
            generic_inputs = [i for i in inputs if i[0] == "generic"]
            emb_meta = emb.build(lambda work: embed_windows(cfg, generic_inputs, work, stages,
                                                            generic_fraction=generic_doc_fraction(cfg, inputs)))
            _check_k(cfg, int(emb_meta["counts"].get("generic/train", 0)))
            km.build(lambda work: _cluster_generic(cfg, emb, km, emb_meta, stages, work))
            if assign is not None:
                domain_inputs = [i for i in inputs if i[0] != "generic"]
                hashed_model = emb.path(embed_hashed.MODEL_FILE) if cfg.cluster.embedder == embed_hashed.NAME \
                    else None
                demb_meta = demb.build(lambda work: embed_windows(cfg, domain_inputs, work, stages,
                                                                  domain_docs=domain_doc_prefixes(cfg, inputs),
                                                                  hashed_model=hashed_model))
                centroids = np.load(km.path("centroids.npy")).astype(np.float32)
                doms = sorted({p for p, _, _ in domain_inputs})
                assign.build(lambda work: _assign_domains(cfg, km, demb, demb_meta, doms, centroids, stages, work))
        cl = Clusters(cfg, km, assign)
        cl.meta["timings"]["total"] = time.perf_counter() - t_all
        _log(cl, tracker)
        status = "FINISHED"
        return cl
    finally:
        if own_tracker:
            tracker.close(status)


def _cluster_generic(cfg, emb, km, emb_meta: dict[str, Any], stages: Stages, work: Path) -> dict[str, Any]:
    """Stages 3-5 into ``work`` (the k-means stage's work folder): k-means on the generic
    embeddings of ``emb``, every generic window assigned, the generic train windows split
    by cluster; returns the stage's meta (what ``Clusters`` reads)."""
    import ray

    n_gen = int(emb_meta["counts"].get("generic/train", 0))
    stages.start()
    centroids, n_sample = _fit_kmeans(cfg, emb.dir, n_gen, stages)
    np.save(work / "centroids.npy", centroids)
    _assign(emb.dir, work, centroids)
    n_assigned = dir_rows(work / "windows")
    stages.done("assign", f"{n_assigned:,} generic windows assigned to the nearest of {cfg.cluster.k} "
                "centroids")
    if n_assigned != emb_meta["windows"]:
        raise DataError(f"assignment wrote {n_assigned} windows, expected {emb_meta['windows']}")
    by_cluster = ray.data.read_parquet(str(work / "windows"), num_cpus=TASK_CPUS) \
        .map_batches(generic_train, batch_format="pyarrow", num_cpus=TASK_CPUS)
    write_canonical(by_cluster, work / "by_cluster", n_gen, partition_cols=["cluster"])
    gen_counts, gen_tokens, gen_sources = _generic_cluster_stats(work / "by_cluster", cfg.cluster.k)
    stages.done("split", f"generic train windows split into {int((gen_counts > 0).sum())} "
                "non-empty clusters")
    hashed = cfg.cluster.embedder == embed_hashed.NAME
    return {
        "k": cfg.cluster.k,
        "config": {k: getattr(cfg.cluster, k) for k in ("k", "window_tokens", "sample_windows",
                                                          "kmeans_iters", "seed", "embedder")},
        "embedder": cfg.cluster.embedder, "embed_dim": int(centroids.shape[1]),
        # The fitted hashed-tfidf model (in the generic embedding stage), for new texts.
        "embedder_model": km.relative(emb.path(embed_hashed.MODEL_FILE)) if hashed else None,
        "embedder_fit": emb_meta.get("fit"),
        # Per generic source, its train windows per cluster: what each cluster holds.
        "generic_sources": gen_sources,
        "eos_id": int(load_tokenizer(ensure_tokenizer(cfg)).eos_token_id), "windows": n_assigned,
        "sample_windows": n_sample, "part_counts": emb_meta["counts"],
        "generic_counts": gen_counts.tolist(), "generic_cluster_tokens": gen_tokens.tolist(),
        # What the embedder read (Clusters.embedding_cost prices it): the generic
        # side, shared by every strategy built on this clustering.
        "embedded_generic": emb_meta["embedded"].get("generic", {"windows": 0, "tokens": 0,
                                                                 "tokens_sq": 0}),
        "embedded_generic_windows": int(emb_meta["embedded"].get("generic", {}).get("windows", 0)),
        "embedded_generic_tokens": int(emb_meta["embedded"].get("generic", {}).get("tokens", 0)),
        "embedded_generic_seconds": float(emb_meta.get("seconds", 0.0)),
        "timings": {**emb_meta.get("timings", {}), **stages.timings}}


def _assign_domains(cfg, km, demb, demb_meta: dict[str, Any], doms: list[str], centroids: np.ndarray,
                    stages: Stages, work: Path) -> dict[str, Any]:
    """The domain assignment into ``work``: every in-domain window of ``demb`` to its
    nearest centroid, and ``provenance.json``; returns the stage's meta."""
    stages.start()
    _assign(demb.dir, work, centroids)
    stages.done("assign-domains", f"{demb_meta['windows']:,} in-domain windows assigned")
    # What importance sampling can find, before any training: per domain, the
    # generic sources in the clusters that hold its text.
    prov = provenance({d: in_domain_counts(cfg, work / "windows", d, cfg.cluster.k) for d in doms},
                      km.info["generic_sources"])
    (work / PROVENANCE_FILE).write_text(json.dumps(prov, indent=1) + "\n")
    zero = {"windows": 0, "tokens": 0, "tokens_sq": 0}
    embedded = {d: demb_meta["embedded"].get(d, zero) for d in doms}
    return {"domains": doms, "part_counts": demb_meta["counts"],
            # Each domain's in-domain windows MiniLM embedded: its specialisation's.
            "embedded_domains": embedded,
            "embedded_domain_windows": {d: int(e["windows"]) for d, e in embedded.items()},
            "embedded_domain_tokens": {d: int(e["tokens"]) for d, e in embedded.items()},
            "embedded_domains_seconds": float(demb_meta.get("seconds", 0.0)),
            "timings": {**demb_meta.get("timings", {}), **stages.timings}}


def _assign(emb_dir: Path, out: Path, centroids: np.ndarray) -> None:
    """Stage 4: every embedded window of ``emb_dir`` → its nearest centroid (``out/windows``)."""
    import ray

    assigned = ray.data.read_parquet(str(emb_dir / "embedded"), num_cpus=TASK_CPUS) \
        .map_batches(_assign_batch, batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs={"centroids": centroids})
    # Canonical order and file names: resampling names windows by their place in this table.
    write_canonical(assigned, out / "windows", dir_rows(emb_dir / "embedded"))


def _generic_cluster_stats(by_cluster: Path, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Per-cluster generic train window counts and tokens (eos included), and per source its
    windows per cluster, from the partitioned split (partition directories are ``cluster=<c>``)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = np.zeros(k, dtype=np.int64)
    tokens = np.zeros(k, dtype=np.int64)
    sources: dict[str, np.ndarray] = {}
    for d in by_cluster.glob("cluster=*"):
        c = int(d.name.split("=", 1)[1])
        for f in d.glob("*.parquet"):
            t = pq.read_table(f, columns=["start", "end", "source"])
            counts[c] += t.num_rows
            tokens[c] += int(pc.sum(pc.subtract(t.column("end"), t.column("start"))).as_py() or 0) + t.num_rows
            for row in pc.value_counts(t.column("source")).to_pylist():
                sources.setdefault(str(row["values"]), np.zeros(k, dtype=np.int64))[c] += int(row["counts"])
    return counts, tokens, {s: v.tolist() for s, v in sorted(sources.items())}


def _summary_dict(cl: Clusters) -> dict[str, Any]:
    return {
        "k": cl.k,
        "entropy_unit": "nats",
        "parts": {p: {"windows": int(cl.counts(p).sum()), "entropy": cl.entropy(p),
                      "histogram": cl.histogram(p).tolist()} for p in cl.parts},
        "timings": cl.meta.get("timings", {}),
    }


def _log(cl: Clusters, tracker) -> None:
    """Params, entropies, counts, timings and the histogram plot (driver only)."""
    import matplotlib.pyplot as plt

    tracker.log_params({**{f"cluster.{k}": v for k, v in cl.meta["config"].items()},
                        "cluster.sample_windows_used": cl.meta["sample_windows"],
                        "cluster.windows": cl.meta["windows"],
                        "cluster.key": cl.key, "cluster.domains_key": cl.domains_key or ""})
    metrics: dict[str, float] = {}
    timings = {**cl.meta.get("timings", {}), **cl.domain_meta.get("timings", {})}
    for p in cl.parts:
        metrics[f"entropy/{p}"] = cl.entropy(p)
        metrics[f"windows/{p}"] = float(cl.counts(p).sum())
    for stage, sec in timings.items():
        metrics[f"time/{stage}_s"] = float(sec)
    tracker.log_metrics(metrics)
    tracker.log_dict(_summary_dict(cl), "clusters/histograms.json")
    if cl.domains_stage is not None:
        tracker.log_dict(cl.provenance(), f"clusters/{PROVENANCE_FILE}")
    fig = cl.histogram_figure()
    tracker.log_figure(fig, "clusters/histograms.png")
    plt.close(fig)
