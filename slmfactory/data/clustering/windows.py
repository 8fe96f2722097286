"""Stages 1-2 of the clustering pipeline: which documents are windowed, the windows
(tokenized, cut into spans of ``cluster.window_tokens``, decoded back to text) and their
embeddings (MiniLM, or hashed-tfidf fitted here on the generic hash sample), written as
the embedding stage's ``embedded`` table.

Separate from :mod:`slmfactory.data.clustering.pipeline` (k-means, assignment and the
driver, ``run_clustering``) because these stages are the text side: tokenizer, embedders
and their cost statistics; k-means only reads the vectors they write.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.data.clustering import hashed as embed_hashed
from slmfactory.data.clustering.minilm import embed_dataset
from slmfactory.data.clustering.raydata import (
    ORDER_KEYS, TASK, TASK_CPUS, Stages, dir_rows, hash_sample, n_blocks, sample_key, write_canonical)
from slmfactory.data.tokens import ensure_tokenizer, load_tokenizer
from slmfactory.platform.errors import DataError


PREFIX_BYTES_PER_TOKEN = 6


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
    keys = sample_key(seed + 7919, [str(d) for d in doc_ids]) if generic_fraction < 1.0 else None
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


def embed_windows(cfg, inputs, out: Path, stages: Stages, generic_fraction: float = 1.0,
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
    windows.write_parquet(str(out / "windows_raw"), ray_remote_args=TASK)
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
        .repartition(n_blocks(n_windows)).sort(ORDER_KEYS).repartition(n_blocks(n_windows))
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
    write_canonical(embedded, out / "embedded", n_windows)
    n = dir_rows(out / "embedded")
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
    picked = hash_sample(ds, cfg.cluster.seed, s, n_generic, "text")
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

