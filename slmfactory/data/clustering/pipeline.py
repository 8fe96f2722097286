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
(``_write_canonical``), so "sorted files, rows in order" is one order; the k-means sample is
a hash of (seed, window id), sorted by key; faiss k-means runs on one OpenMP thread with
``cluster.seed``; the nearest centroid is an argmax over float64 scores.

What cannot be bitwise across machines: MiniLM's forward pass on CPU goes through oneDNN /
MKL kernels chosen for the CPU's instruction set (AVX2 vs AVX-512 accumulate in different
orders) and through ``torch.get_num_threads()`` (this node's cores), and a GPU runs other
kernels again; embeddings then differ in the last bits (~1e-7), and k-means, a chaotic
fixed-point iteration, can move a window near a boundary to another cluster. Such moves
are rare (windows near a Voronoi boundary) and change a domain's histogram by a window or
two; the float64 argmax keeps the assignment itself from adding more.

The result is read back through :mod:`slmfactory.data.clustering.clusters` (``Clusters``,
``load_clusters``), which also holds the stage keys this pipeline writes under.

Why one file of ~610 lines: the five stages above share the canonical-order machinery
and the Ray Data context, and read in pipeline order; the result's reader is its own
module.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.data.clustering import hashed as embed_hashed
from slmfactory.data.clustering.clusters import (
    Clusters, assignment_stage, corpus_inputs, domain_embedding_stage, generic_embedding_stage, in_domain_counts,
    kmeans_stage, nearest_centroid, provenance)
from slmfactory.data.clustering.minilm import embed_dataset, from_arrow
from slmfactory.data.tokens import ensure_tokenizer, load_tokenizer
from slmfactory.platform.errors import DataError
from slmfactory.platform.runtime import ray_session
from slmfactory.platform.tracking import open_tracker


PREFIX_BYTES_PER_TOKEN = 6


#: Beside the domain assignment: per domain, the generic sources of the clusters holding its text.
PROVENANCE_FILE = "provenance.json"


EMBED_BLOCK_WINDOWS = 2048


# CPUs each Ray Data task asks (read, tokenize, assign, write). Small, so that on a node
# whose cores are partly held by embedding actors the tasks that feed those actors can
# still be placed: with the default of 1 CPU a 1-CPU node running a 0.5-CPU actor could
# never schedule a read task and the pipeline would wait forever.
TASK_CPUS = 0.25


_TASK = {"num_cpus": TASK_CPUS}


WINDOW_COLUMNS = ["window_id", "doc_id", "part", "split", "source", "start", "end", "tokens", "cluster"]


#: The canonical order of every window table: unique per window (doc ids are unique across
#: the corpus; ``start`` orders a document's windows).
ORDER_KEYS = ["doc_id", "start"]


class _Stages:
    """One stderr line per stage with counts and seconds (the CLI's progress)."""

    def __init__(self, enabled: bool, prefix: str = "cluster"):
        self.enabled = enabled
        self.prefix = prefix
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def running(self) -> float:
        """Seconds since the current stage started."""
        return time.perf_counter() - self._t0

    def done(self, stage: str, what: str) -> float:
        dt = time.perf_counter() - self._t0
        self.timings[stage] = dt
        if self.enabled:
            print(f"[{self.prefix}] {stage}: {what} ({dt:.1f}s)", file=sys.stderr, flush=True)
        self._t0 = time.perf_counter()
        return dt


def _sample_key(seed: int, window_ids: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per window, a pure function of (seed, window id): the
    k-means sample does not depend on block layout, node count or scheduling."""
    out = np.empty(len(window_ids), dtype=np.float64)
    for i, w in enumerate(window_ids):
        h = hashlib.blake2b(f"{seed}:{w}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2.0**64
    return out


def ray_data_context(progress: bool) -> None:
    """The Ray Data settings of every clustering and resampling job: progress bars or not,
    quiet logs, and ``preserve_order`` (blocks leave each operator in the order they came
    in, so a rerun sees the same rows in the same blocks whatever the scheduling)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(progress)
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = True


def _n_blocks(rows: int) -> int:
    return max(1, -(-int(rows) // EMBED_BLOCK_WINDOWS))


def _write_canonical(ds, out: Path, rows: int, partition_cols: list[str] | None = None) -> None:
    """Write ``ds`` sorted by ``ORDER_KEYS``, cut into equal blocks of about
    ``EMBED_BLOCK_WINDOWS`` rows (a function of ``rows`` alone), then name the files of each
    folder ``part-<n>.parquet`` in key order: the layout is a function of the rows, not of
    Ray's scheduling or its write ids, so "sorted files, rows in order" is the key order."""
    n = _n_blocks(rows)
    # The first repartition sets the sort's partition count (else Ray plans one per
    # estimated read block, 200 for any small table: 200 reduce tasks); the second cuts
    # the sorted rows into equal blocks whatever boundaries the sort sampled.
    ds.repartition(n).sort(ORDER_KEYS).repartition(n) \
        .write_parquet(str(out), partition_cols=partition_cols, ray_remote_args=_TASK)
    _canonical_names(out)


def _canonical_names(out: Path) -> None:
    """Rename every folder's parquet files ``part-00000.parquet``, ... by their first row's
    (doc_id, start); empty files go. Each file holds a run of the sorted rows, so the
    files' order by first key is the rows' order."""
    import pyarrow.parquet as pq

    for folder in sorted({f.parent for f in out.rglob("*.parquet")}):
        keyed = []
        for f in folder.glob("*.parquet"):
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows == 0:
                f.unlink()
                continue
            first = pf.read_row_group(0, columns=ORDER_KEYS).slice(0, 1).to_pylist()[0]
            keyed.append(((str(first["doc_id"]), int(first["start"])), f))
        keyed.sort()
        tmp = [f.rename(f.with_name(f".canon-{i:05d}.parquet")) for i, (_, f) in enumerate(keyed)]
        for i, f in enumerate(tmp):
            f.rename(f.with_name(f"part-{i:05d}.parquet"))


def domain_doc_prefixes(cfg, inputs: list[tuple[str, str, Path]]) -> dict[str, list[str]]:
    """Per domain, the doc ids of the train documents that can fall inside the first
    ``data.domain_train_tokens`` tokens (corpus order); windows outside the prefix are
    never embedded. English BPE averages ~4 bytes per token, so documents are taken until
    their UTF-8 bytes reach ``PREFIX_BYTES_PER_TOKEN`` x the budget (1.5x margin);
    ``Clusters.counts`` warns if a domain's embedded windows still fall short."""
    import pyarrow.parquet as pq

    budget = cfg.data.domain_train_tokens * PREFIX_BYTES_PER_TOKEN
    out: dict[str, list[str]] = {}
    for part, split, path in inputs:
        if part == "generic":
            continue
        ids: list[str] = []
        used = 0
        table = pq.read_table(path, columns=["doc_id", "text"])
        for doc_id, text in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()):
            ids.append(str(doc_id))
            used += len((text or "").encode("utf-8"))
            if used >= budget:
                break
        out[part] = ids
    return out


def generic_doc_fraction(cfg, inputs: list[tuple[str, str, Path]]) -> float:
    """Fraction of generic documents (hash-chosen) to window so that about
    ``cluster.max_generic_windows`` windows result (1.0 = all)."""
    cap = cfg.cluster.max_generic_windows
    if not cap:
        return 1.0
    import pyarrow.parquet as pq

    path = next(p for part, _, p in inputs if part == "generic")
    md = pq.read_metadata(path)
    text_bytes = sum(md.row_group(i).column(j).total_uncompressed_size
                     for i in range(md.num_row_groups) for j in range(md.num_columns)
                     if md.schema.column(j).name == "text")
    # ~4 bytes per BPE token on English text; windows are window_tokens long.
    est_windows = max(1.0, text_bytes / 4.0 / cfg.cluster.window_tokens)
    return min(1.0, cap / est_windows)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str):
    tok = _TOKENIZERS.get(path)
    if tok is None:
        tok = _TOKENIZERS[path] = load_tokenizer(Path(path))
    return tok


def _part_split(path: str) -> tuple[str, str]:
    p = Path(path)
    split = p.stem
    if p.parent.name == "generic":
        return "generic", split
    return p.parent.name, split


def make_windows(batch, tokenizer_dir: str, window_tokens: int, generic_fraction: float = 1.0,
                 domain_docs: dict[str, list[str]] | None = None, seed: int = 0):
    """pyarrow batch of documents (doc_id, text, path) → one row per window.

    Documents outside the embedded subset are dropped first: generic train ones whose hash
    key is at or above ``generic_fraction``, domain ones outside ``domain_docs[domain]``.
    """
    import pyarrow as pa

    tok = _tokenizer(tokenizer_dir)
    doc_ids = batch.column("doc_id").to_pylist()
    texts = batch.column("text").to_pylist()
    paths = batch.column("path").to_pylist()
    sources = batch.column("source").to_pylist()
    keys = _sample_key(seed + 7919, [str(d) for d in doc_ids]) if generic_fraction < 1.0 else None
    allowed = {k: set(v) for k, v in (domain_docs or {}).items()}
    keep = []
    for i, (doc_id, path) in enumerate(zip(doc_ids, paths)):
        part, split = _part_split(path)
        if part == "generic":  # the cap thins generic *train* only; validation is kept whole
            keep.append(keys is None or split != "train" or keys[i] < generic_fraction)
        else:
            keep.append(part not in allowed or str(doc_id) in allowed[part])
    doc_ids = [d for d, k in zip(doc_ids, keep) if k]
    texts = [t for t, k in zip(texts, keep) if k]
    paths = [p for p, k in zip(paths, keep) if k]
    sources = [s for s, k in zip(sources, keep) if k]
    enc = tok([t or "" for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    cols: dict[str, list] = {k: [] for k in ("window_id", "doc_id", "part", "split", "source", "start", "end",
                                             "tokens")}
    for doc_id, path, source, ids in zip(doc_ids, paths, sources, enc):
        part, split = _part_split(path)
        for i, s in enumerate(range(0, len(ids), window_tokens)):
            span = ids[s:s + window_tokens]
            cols["window_id"].append(f"{doc_id}:{i}")
            cols["doc_id"].append(str(doc_id))
            cols["part"].append(part)
            cols["split"].append(split)
            # Where the window's text came from: the provenance of what importance sampling draws.
            cols["source"].append(str(source or "unknown"))
            cols["start"].append(s)
            cols["end"].append(s + len(span))
            cols["tokens"].append(np.asarray(span, dtype=np.int32))
    text = tok.batch_decode(cols["tokens"], skip_special_tokens=True) if cols["tokens"] else []
    return pa.table({
        "window_id": pa.array(cols["window_id"], pa.string()),
        "doc_id": pa.array(cols["doc_id"], pa.string()),
        "part": pa.array(cols["part"], pa.string()),
        "split": pa.array(cols["split"], pa.string()),
        "source": pa.array(cols["source"], pa.string()),
        "start": pa.array(cols["start"], pa.int32()),
        "end": pa.array(cols["end"], pa.int32()),
        "tokens": pa.array(cols["tokens"], pa.list_(pa.int32())),
        "text": pa.array(text, pa.string()),
    })


def _generic_train(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.and_(pc.equal(batch.column("part"), "generic"), pc.equal(batch.column("split"), "train")))


def _sample_batch(batch, seed: int, threshold: float, column: str = "embedding"):
    """Generic train windows whose hash key is under ``threshold``: their id, key and
    ``column`` (pyarrow in and out)."""
    import pyarrow as pa

    batch = _generic_train(batch)
    key = _sample_key(seed, batch.column("window_id").to_pylist())
    sel = pa.array(key < threshold)
    return pa.table({"window_id": batch.column("window_id").filter(sel),
                     "key": pa.array(key).filter(sel),
                     column: batch.column(column).filter(sel)})


def _hash_sample(ds, seed: int, s: int, n_generic: int, column: str):
    """``column`` of the ``s`` generic train windows of ``ds`` with the smallest hash keys (a
    pure function of (seed, window id)), in key order (a pyarrow array). Filtered on the
    workers by a threshold, topped up exactly on the driver."""
    import pyarrow as pa

    # Over-sample a little so the exact ``s`` smallest keys are (almost) always inside.
    threshold = 1.0 if s >= n_generic else min(1.0, 1.2 * s / n_generic + 64.0 / n_generic)

    def collect(thr: float):
        picked = ds.map_batches(_sample_batch, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                fn_kwargs={"seed": seed, "threshold": thr, "column": column})
        keys, values = [], []
        for b in picked.iter_batches(batch_format="pyarrow", batch_size=4096):
            keys.append(b.column("key").to_numpy())
            values.extend(b.column(column).chunks if isinstance(b.column(column), pa.ChunkedArray)
                          else [b.column(column)])
        return (np.concatenate(keys) if keys else np.zeros(0)), values

    key, values = collect(threshold)
    if len(key) < s:  # the hash sample came out short (small corpora): take every window
        key, values = collect(1.0)
    if not values:
        return None
    order = np.argsort(key, kind="stable")[:s]
    return pa.chunked_array(values).combine_chunks().take(pa.array(order, pa.int64()))


def _assign_batch(batch, centroids: np.ndarray):
    import pyarrow as pa

    cluster = nearest_centroid(from_arrow(batch.column("embedding")), centroids)
    return batch.drop_columns(["embedding"]).append_column("cluster", pa.array(cluster, pa.int32()))


def _dir_rows(path: Path) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet").count_rows() if path.is_dir() else 0


def _part_counts(path: Path) -> dict[str, int]:
    """Windows per ``part/split`` in the parquet folder ``path``."""
    import pyarrow.dataset as pads

    counts: dict[str, int] = {}
    for b in pads.dataset(str(path), format="parquet").to_batches(columns=["part", "split"]):
        parts = b.column(0).to_numpy(zero_copy_only=False)
        splits = b.column(1).to_numpy(zero_copy_only=False)
        for key, n in zip(*np.unique(np.char.add(np.char.add(parts.astype(str), "/"), splits.astype(str)),
                                     return_counts=True)):
            counts[str(key)] = counts.get(str(key), 0) + int(n)
    return counts


def _embed_windows(cfg, inputs, out: Path, stages: _Stages, generic_fraction: float = 1.0,
                   domain_docs: dict[str, list[str]] | None = None, hashed_model: Path | None = None) -> dict[str, Any]:
    """Stages 1-2 for ``inputs`` into ``out`` (a stage's work folder); returns its meta.

    ``cluster.embedder: hashed-tfidf``: the generic stage (``hashed_model`` None) first fits
    the model on its hash sample of generic train windows and saves it in ``out``; the domain
    stage embeds with the generic stage's ``hashed_model``."""
    import ray

    stages.start()
    files = [str(p.resolve()) for _, _, p in inputs]
    docs = ray.data.read_parquet(files, include_paths=True, num_cpus=TASK_CPUS) \
        .select_columns(["doc_id", "text", "source", "path"])
    windows = docs.map_batches(make_windows, batch_format="pyarrow", batch_size=64, num_cpus=TASK_CPUS,
                               fn_kwargs={"tokenizer_dir": str(ensure_tokenizer(cfg).resolve()),
                                          "window_tokens": cfg.cluster.window_tokens,
                                          "generic_fraction": generic_fraction,
                                          "domain_docs": domain_docs or {},
                                          "seed": cfg.cluster.seed})
    windows.write_parquet(str(out / "windows_raw"), ray_remote_args=_TASK)
    counts = _part_counts(out / "windows_raw")
    n_gen = counts.get("generic/train", 0)
    stages.done("windows", f"{sum(counts.values()):,} windows of <= {cfg.cluster.window_tokens} tokens "
                f"({n_gen:,} generic train)")
    for part, split, _ in inputs:
        if split == "train" and counts.get(f"{part}/train", 0) == 0:
            raise DataError(f"domain '{part}': empty (its train documents have no tokens)")

    c = cfg.cluster
    # Blocks of ~EMBED_BLOCK_WINDOWS windows: the window stage may write one big file, and
    # one block would mean one actor call for the whole corpus (no streaming, no progress,
    # no spreading over several actors / GPUs).
    n_windows = sum(counts.values())
    # Sorted first, so each block and each encode batch holds the same windows on a rerun
    # (a window's float embedding depends on its batch's padded shape).
    raw = ray.data.read_parquet(str(out / "windows_raw"), num_cpus=TASK_CPUS) \
        .repartition(_n_blocks(n_windows)).sort(ORDER_KEYS).repartition(_n_blocks(n_windows))
    meta: dict[str, Any] = {"embedder": c.embedder}
    if c.embedder == embed_hashed.NAME:
        if hashed_model is None:  # the generic stage: fit once, on the generic sample
            hashed_model, meta["fit"] = _fit_hashed(cfg, out, counts.get("generic/train", 0))
            meta["model"] = embed_hashed.MODEL_FILE
            stages.done("fit", f"hashed-tfidf fitted on {meta['fit']['windows']:,} generic windows "
                        f"({meta['fit']['dim']} dimensions)")
        meta["dim"] = embed_hashed.dim_of(embed_hashed.load(hashed_model))
        embedded = embed_hashed.embed_dataset(raw, hashed_model,
                                              batch_size=max(embed_hashed.MIN_BATCH, c.embed_batch_size),
                                              actors=c.embed_actors, actor_cpus=c.embed_actor_cpus)
        what = "hashed-tfidf"
    else:
        # Rows per actor call: several encode batches, so MiniLM's length sort inside
        # ``encode`` pads as little as one plain ``encode`` over everything would.
        embedded = embed_dataset(raw, batch_size=c.embed_batch_size, actors=c.embed_actors,
                                 actor_cpus=c.embed_actor_cpus)
        what = "MiniLM"
    _write_canonical(embedded, out / "embedded", n_windows)
    n = _dir_rows(out / "embedded")
    stages.done("embed", f"{n:,} windows embedded with {what} ({c.embed_actors} actor(s) x "
                f"{c.embed_actor_cpus} CPU; {n / max(stages.running(), 1e-9):.1f} windows/s)")
    shutil.rmtree(out / "windows_raw", ignore_errors=True)
    own = ("windows", "fit", "embed") if "fit" in meta else ("windows", "embed")
    return {**meta, "counts": counts, "windows": n, "timings": dict(stages.timings),
            "embedded": _embedding_stats(out / "embedded", c.embedder),
            # This stage's own seconds: the fit only where this stage fitted (``stages`` outlives it).
            "seconds": float(sum(stages.timings.get(k, 0.0) for k in own))}


def _fit_hashed(cfg, out: Path, n_generic: int) -> tuple[Path, dict[str, Any]]:
    """The hashed-tfidf model fitted on the hash sample of generic train windows (the
    k-means sample's seed and key, at most min(``cluster.sample_windows``,
    ``embed_hashed.FIT_WINDOWS``) windows), saved as ``out/embed_hashed.MODEL_FILE``."""
    import ray

    s = min(cfg.cluster.sample_windows, embed_hashed.FIT_WINDOWS, n_generic)
    ds = ray.data.read_parquet(str(out / "windows_raw"), num_cpus=TASK_CPUS) \
        .select_columns(["window_id", "part", "split", "text"])
    picked = _hash_sample(ds, cfg.cluster.seed, s, n_generic, "text")
    texts = picked.to_pylist() if picked is not None else []
    model = embed_hashed.fit(texts, seed=cfg.cluster.seed)
    path = embed_hashed.save(model, out / embed_hashed.MODEL_FILE)
    _, ngrams, features = embed_hashed.transform(model, texts)
    dim = embed_hashed.dim_of(model)
    return path, {"windows": len(texts), "dim": dim, "ngrams": int(ngrams.sum()), "features": int(features.sum()),
                  "flops": embed_hashed.fit_flops(len(texts), int(features.sum()), dim)}


def _embedding_stats(path: Path, embedder: str = "minilm") -> dict[str, dict[str, int]]:
    """Per part (generic, or a domain): what the embedder read. MiniLM: windows, word pieces
    (``tokens``) and Σ tokens² (attention); hashed-tfidf: windows, word n-grams (``tokens``)
    and non-zero hashed features (``features``: what its FLOPs are counted on)."""
    import pyarrow.dataset as pads

    hashed = embedder == embed_hashed.NAME
    cols = ["part", "hashed_ngrams", "hashed_features"] if hashed else ["part", "minilm_tokens"]
    out: dict[str, dict[str, int]] = {}
    for b in pads.dataset(str(path), format="parquet").to_batches(columns=cols):
        parts = b.column(0).to_numpy(zero_copy_only=False).astype(str)
        toks = b.column(1).to_numpy(zero_copy_only=False).astype(np.int64)
        extra = b.column(2).to_numpy(zero_copy_only=False).astype(np.int64) if hashed else toks * toks
        for p in np.unique(parts):
            sel = parts == p
            e = out.setdefault(str(p), {"windows": 0, "tokens": 0, "features" if hashed else "tokens_sq": 0})
            e["windows"] += int(sel.sum())
            e["tokens"] += int(toks[sel].sum())
            e["features" if hashed else "tokens_sq"] += int(extra[sel].sum())
    return out


def _check_k(cfg, n_generic: int) -> None:
    if n_generic < cfg.cluster.k:
        raise DataError(f"cluster.k = {cfg.cluster.k} is larger than the {n_generic} generic train windows; "
                        "lower cluster.k or cluster.window_tokens, or add generic data")


def _fit_kmeans(cfg, emb_dir: Path, n_generic: int, stages: _Stages) -> tuple[np.ndarray, int]:
    """Stage 3: sample on the workers (hash threshold), top-up exactly on the driver."""
    import faiss
    import ray

    c = cfg.cluster
    s = min(c.sample_windows, n_generic)
    ds = ray.data.read_parquet(str(emb_dir / "embedded"), num_cpus=TASK_CPUS) \
        .select_columns(["window_id", "part", "split", "embedding"])
    picked = _hash_sample(ds, c.seed, s, n_generic, "embedding")
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
    stages = _Stages(progress)
    t_all = time.perf_counter()
    try:
        with ray_session():
            ray_data_context(progress)
            generic_inputs = [i for i in inputs if i[0] == "generic"]
            emb_meta = emb.build(lambda work: _embed_windows(cfg, generic_inputs, work, stages,
                                                             generic_fraction=generic_doc_fraction(cfg, inputs)))
            _check_k(cfg, int(emb_meta["counts"].get("generic/train", 0)))
            km.build(lambda work: _cluster_generic(cfg, emb, km, emb_meta, stages, work))
            if assign is not None:
                domain_inputs = [i for i in inputs if i[0] != "generic"]
                hashed_model = emb.path(embed_hashed.MODEL_FILE) if cfg.cluster.embedder == embed_hashed.NAME \
                    else None
                demb_meta = demb.build(lambda work: _embed_windows(cfg, domain_inputs, work, stages,
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


def _cluster_generic(cfg, emb, km, emb_meta: dict[str, Any], stages: _Stages, work: Path) -> dict[str, Any]:
    """Stages 3-5 into ``work`` (the k-means stage's work folder): k-means on the generic
    embeddings of ``emb``, every generic window assigned, the generic train windows split
    by cluster; returns the stage's meta (what ``Clusters`` reads)."""
    import ray

    n_gen = int(emb_meta["counts"].get("generic/train", 0))
    stages.start()
    centroids, n_sample = _fit_kmeans(cfg, emb.dir, n_gen, stages)
    np.save(work / "centroids.npy", centroids)
    _assign(emb.dir, work, centroids)
    n_assigned = _dir_rows(work / "windows")
    stages.done("assign", f"{n_assigned:,} generic windows assigned to the nearest of {cfg.cluster.k} "
                "centroids")
    if n_assigned != emb_meta["windows"]:
        raise DataError(f"assignment wrote {n_assigned} windows, expected {emb_meta['windows']}")
    by_cluster = ray.data.read_parquet(str(work / "windows"), num_cpus=TASK_CPUS) \
        .map_batches(_generic_train, batch_format="pyarrow", num_cpus=TASK_CPUS)
    _write_canonical(by_cluster, work / "by_cluster", n_gen, partition_cols=["cluster"])
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
                    stages: _Stages, work: Path) -> dict[str, Any]:
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
    _write_canonical(assigned, out / "windows", _dir_rows(emb_dir / "embedded"))


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
