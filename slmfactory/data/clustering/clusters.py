"""A finished clustering, as everything downstream reads it: the stage keys of the
embedding, k-means and domain-assignment stages, the :class:`Clusters` reader (centroids,
per-cluster token streams, domain histograms and entropies, the embedding's cost) and
:func:`load_clusters`. How a clustering is made (Ray Data, MiniLM, faiss) is
:mod:`slmfactory.data.clustering.pipeline`; models, serving and reports only read.

Which windows: generic train (all, or a hash-chosen ~``cluster.max_generic_windows``),
and each domain's in-domain training set: the train documents covering the first
``data.domain_train_tokens`` tokens. A domain's histogram is taken over exactly those
first tokens' windows (the in-domain set the paper's strategies see). Entropies are
in nats (natural log); the maximum at k clusters is ln k.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from slmfactory.data.clustering import hashed as embed_hashed
from slmfactory.data.clustering.minilm import embed_precision, encode, load_minilm, pick_device
from slmfactory.data.corpus import collection_of
from slmfactory.data.tokens import flatten_with_eos, tokenizer_stage
from slmfactory.platform.cost import INFERENCE, CostRecord, Work
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import Stage, corpus_digest


CODE_VERSION = "clusters-v6"  # v6: windows carry their source; cluster.embedder


#: MiniLM (all-MiniLM-L6-v2): parameters (22.7M, the embedding tables included), layers,
#: width; ``Clusters.embedding_cost`` prices its forward passes with them.
MINILM_PARAMS = 22_713_216


MINILM_LAYERS = 6


MINILM_DIM = 384


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (0·log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def _normalise(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    s = counts.sum()
    return counts / s if s > 0 else counts


def corpus_inputs(cfg) -> list[tuple[str, str, Path]]:
    """``(part, split, path)`` of every corpus file the clustering reads (generic train and
    valid, each domain's train), with clear errors for a missing corpus or an empty domain."""
    import pyarrow.parquet as pq

    root = cfg.corpus_dir
    gen = root / "generic" / "train.parquet"
    if not root.is_dir():
        raise DataError(f"corpus {root}: not found (run `slmfactory corpus` first)")
    if not gen.is_file():
        raise DataError(f"corpus {root}: generic/train.parquet not found (run `slmfactory corpus` first)")
    if pq.read_metadata(gen).num_rows == 0:
        raise DataError(f"corpus {root}: generic/train.parquet has no documents")
    out: list[tuple[str, str, Path]] = [("generic", "train", gen)]
    # Generic validation windows are embedded and assigned too: the routed generic
    # perplexity of the expert strategies scores each by its own cluster's expert.
    if (root / "generic" / "valid.parquet").is_file():
        out.append(("generic", "valid", root / "generic" / "valid.parquet"))
    ddir = root / "domains"
    names = sorted(p.name for p in ddir.iterdir() if p.is_dir()) if ddir.is_dir() else []
    if not names:
        raise DataError(f"corpus {root}: no domains under {ddir}")
    for name in names:
        train = ddir / name / "train.parquet"
        if not train.is_file() or pq.read_metadata(train).num_rows == 0:
            raise DataError(f"domain '{name}': empty (no documents in {train}); "
                            "remove the folder or rebuild the corpus")
        # Only the in-domain training set is clustered: histograms, expert choice and
        # resampling all read it, and nothing reads domain valid/test windows.
        out.append((name, "train", train))
    return out


def _digests(cfg, inputs: list[tuple[str, str, Path]]) -> dict[str, str]:
    return {f"{part}/{split}": corpus_digest(cfg.corpus_dir, part, split) for part, split, _ in inputs}


def _embedder_key(cfg) -> dict[str, Any]:
    """What the embedding depends on beyond the windows: the embedder, and for hashed-tfidf
    its shape and fit sample (min(sample_windows, FIT_WINDOWS) hash-chosen generic windows)."""
    c = cfg.cluster
    if c.embedder != embed_hashed.NAME:
        # MiniLM embeds in bf16 on CPUs with bf16 matrix units (``embed.embed_precision``).
        return {"embedder": c.embedder, "precision": embed_precision(pick_device())}
    E = embed_hashed
    return {"embedder": c.embedder, "hashed": {
        "features": E.N_FEATURES, "ngrams": E.NGRAMS, "dim": [E.MIN_DIM, E.DIM, E.WINDOWS_PER_DIM],
        "svd_iters": E.SVD_ITERS, "fit_windows": min(c.sample_windows, E.FIT_WINDOWS)}}


def generic_embedding_stage(cfg, inputs) -> Stage:
    """Embeddings of the generic windows: keyed by the generic files, the tokenizer, the
    windowing and the embedder, never by a domain or the in-domain size."""
    c = cfg.cluster
    return Stage.of(cfg.root, "clusters", "emb-generic", version=CODE_VERSION,
                    files=_digests(cfg, [i for i in inputs if i[0] == "generic"]), tokenizer=tokenizer_stage(cfg),
                    window_tokens=c.window_tokens, max_generic_windows=c.max_generic_windows, seed=c.seed,
                    **_embedder_key(cfg))


def kmeans_stage(cfg, embeddings: Stage) -> Stage:
    """The generic clustering: centroids, assigned generic windows, per-cluster split."""
    c = cfg.cluster
    return Stage.of(cfg.root, "clusters", f"k{c.k}", embeddings=embeddings, k=c.k, sample=c.sample_windows,
                    iters=c.kmeans_iters, seed=c.seed)


def domain_embedding_stage(cfg, inputs) -> Stage:
    """Embeddings of each domain's in-domain training windows (its first
    ``data.domain_train_tokens`` tokens): the only clustering work the in-domain size changes."""
    # hashed-tfidf embeds the domains with the model fitted in the generic stage: keyed on it.
    fitted = {"fit": generic_embedding_stage(cfg, inputs)} if cfg.cluster.embedder == embed_hashed.NAME else {}
    return Stage.of(cfg.root, "clusters", "emb-domains", version=CODE_VERSION,
                    files=_digests(cfg, [i for i in inputs if i[0] != "generic"]), tokenizer=tokenizer_stage(cfg),
                    window_tokens=cfg.cluster.window_tokens, domain_train_tokens=cfg.data.domain_train_tokens,
                    **_embedder_key(cfg), **fitted)


def assignment_stage(cfg, clustering: Stage, domain_embeddings: Stage) -> Stage:
    """Each in-domain window assigned to the nearest generic centroid."""
    return Stage.of(cfg.root, "clusters", f"k{cfg.cluster.k}-domains", clustering=clustering,
                    embeddings=domain_embeddings)


def nearest_centroid(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2 = highest dot product, all vectors unit-norm).

    Scored in float64: the products of float32 inputs are exact there, so the scores do
    not depend on how many rows a batch has (BLAS picks its kernels by shape) closely
    enough to flip an argmax, and the assignment is a function of the embedding alone."""
    if len(emb) == 0:
        return np.zeros(0, dtype=np.int32)
    scores = np.asarray(emb, np.float64) @ np.asarray(centroids, np.float64).T
    return np.argmax(scores, axis=1).astype(np.int32)


def domain_windows_in(cfg, windows_dir: Path, domain: str, split: str = "train"):
    """``domain``'s windows of ``split`` in the assigned-windows folder ``windows_dir``
    (metadata + cluster, no tokens) as pandas, in corpus order (document order of the split
    file, then position)."""
    import pandas as pd
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    flt = (pc.field("part") == domain) & (pc.field("split") == split)
    cols = ["window_id", "doc_id", "start", "end", "cluster"]
    batches = [b.to_pandas() for b in pads.dataset(str(windows_dir), format="parquet").to_batches(columns=cols,
                                                                                                   filter=flt)]
    df = pd.concat(batches, ignore_index=True) if batches else pd.DataFrame(columns=cols)
    src = cfg.corpus_dir / "domains" / domain / f"{split}.parquet"
    if src.is_file():
        order = {d: i for i, d in enumerate(pq.read_table(src, columns=["doc_id"]).column(0).to_pylist())}
        df["doc_pos"] = df["doc_id"].map(order).fillna(len(order)).astype(np.int64)
    else:
        df["doc_pos"] = 0
    return df.sort_values(["doc_pos", "doc_id", "start"], kind="stable").reset_index(drop=True)


def in_domain_counts(cfg, windows_dir: Path, domain: str, k: int, df=None) -> np.ndarray:
    """(k,) cluster counts of ``domain``'s train windows within its first
    ``data.domain_train_tokens`` tokens (corpus order): the domain's histogram."""
    df = domain_windows_in(cfg, windows_dir, domain, "train") if df is None else df
    lengths = (df["end"] - df["start"]).to_numpy()
    before = np.cumsum(lengths) - lengths  # tokens preceding each window
    df = df[before < cfg.data.domain_train_tokens]
    return np.bincount(df["cluster"].to_numpy(dtype=np.int64), minlength=k)


#: A domain's top clusters: the fewest (largest first) holding this share of its windows, at
#: most ``PROVENANCE_TOP`` of them.
PROVENANCE_MASS = 0.8
PROVENANCE_TOP = 8


def _shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {s: w / total for s, w in sorted(weights.items(), key=lambda kv: (-kv[1], kv[0])) if w > 0} if total else {}


def _by_collection(by_source: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s, w in by_source.items():
        out[collection_of(s)] = out.get(collection_of(s), 0.0) + w
    return _shares(out)


def provenance(domain_counts: dict[str, np.ndarray], generic_sources: dict[str, list[int]]) -> dict[str, Any]:
    """Per domain, what importance sampling can find in generic text, from the cluster counts
    alone (no training): its top clusters (the fewest holding ``PROVENANCE_MASS`` of its
    windows, at most ``PROVENANCE_TOP``), each with its generic windows by source; the share of
    generic windows by source and by collection pooled over those clusters (``top_by_source``,
    ``top_by_collection``); and ``expected_by_source`` / ``_by_collection``: Σ_c p_domain(c) ·
    share of source s among cluster c's generic windows, over the clusters that have generic
    windows, i.e. what resampling to the domain's histogram draws, in windows.
    ``unmatched``: the domain's share in clusters without any generic window."""
    names = sorted(generic_sources)
    per = np.asarray([generic_sources[s] for s in names], dtype=np.float64).reshape(len(names), -1)  # (S, k)
    size = per.sum(axis=0)                                                                        # (k,)
    out: dict[str, Any] = {"mass": PROVENANCE_MASS, "max_clusters": PROVENANCE_TOP, "domains": {}}
    for d, counts in sorted(domain_counts.items()):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.sum() == 0:
            out["domains"][d] = {"windows": 0}
            continue
        p = counts / counts.sum()
        order = [int(c) for c in np.argsort(-p, kind="stable") if p[c] > 0]
        top, held = [], 0.0
        for c in order[:PROVENANCE_TOP]:
            top.append(c)
            held += p[c]
            if held >= PROVENANCE_MASS:
                break
        pooled = {s: float(per[i, top].sum()) for i, s in enumerate(names)}
        matched = size > 0
        w = np.where(matched, p, 0.0)
        expected = {}
        if w.sum() > 0:
            w = w / w.sum()
            frac = np.divide(per, size, out=np.zeros_like(per), where=size > 0)              # (S, k)
            expected = {s: float((frac[i] * w).sum()) for i, s in enumerate(names)}
        top_by_source = _shares(pooled)
        out["domains"][d] = {
            "windows": int(counts.sum()),
            "top_clusters": [{"cluster": c, "domain_share": float(p[c]), "generic_windows": int(size[c]),
                              "by_source": _shares({s: float(per[i, c]) for i, s in enumerate(names)})}
                             for c in top],
            "top_share": float(held), "top_generic_windows": int(size[top].sum()),
            "top_by_source": top_by_source, "top_by_collection": _by_collection(top_by_source),
            "expected_by_source": _shares(expected), "expected_by_collection": _by_collection(_shares(expected)),
            "unmatched": float(p[~matched].sum())}
    return out


def source_label(source: str) -> str:
    """A source string as a reader names it: ``deb:manpages=6.03-2`` → ``manpages``,
    ``pypi:scancode-toolkit==32.5.0`` → ``scancode-toolkit``, ``file:x.jsonl`` → ``x.jsonl``."""
    kind, sep, rest = source.partition(":")
    if not sep or kind not in ("deb", "pypi", "file"):
        return source
    return rest if kind == "file" else rest.split("=", 1)[0]


def shares_line(shares: dict[str, float], top: int = 5, label=source_label) -> str:
    """``41% doc-debian, 30% manpages, ... (+3 more)`` from a share dict."""
    items = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{v:.0%} {label(s)}" for s, v in items[:top])
    return text + (f" (+{len(items) - top} more)" if len(items) > top else "") if items else "-"


class Clusters:
    """A finished clustering on disk: the generic stage (centroids, assigned generic
    windows, per-cluster split) and, when asked for, the domain assignment stage."""

    def __init__(self, cfg, stage: Stage, domains: Stage | None = None):
        self.cfg = cfg
        if not stage.done:
            raise DataError(f"{stage.dir}: no finished clustering here (run `slmfactory cluster`)")
        self.stage, self.domains_stage = stage, domains
        self.dir = stage.dir
        self._warned_short: set[str] = set()
        self.meta: dict[str, Any] = stage.info
        self.domain_meta: dict[str, Any] = domains.info if domains is not None else {}
        self.k: int = int(self.meta["k"])
        self.centroids: np.ndarray = np.load(self.dir / "centroids.npy").astype(np.float32)
        self.eos_id: int = int(self.meta["eos_id"])
        self._hist: dict[str, np.ndarray] = {}
        self._model = None

    @property
    def key(self) -> str:
        """The generic clustering's key (what generic phases built on it key on)."""
        return self.stage.key

    @property
    def domains_key(self) -> str | None:
        """The domain assignment's key (histograms depend on it), if attached."""
        return self.domains_stage.key if self.domains_stage is not None else None

    # paths
    @property
    def windows_dir(self) -> Path:
        return self.dir / "windows"

    @property
    def by_cluster_dir(self) -> Path:
        return self.dir / "by_cluster"

    @property
    def parts(self) -> list[str]:
        return ["generic"] + list(self.domain_meta.get("domains", []))

    def _scan(self, columns: list[str], flt=None, domains: bool = False) -> Iterator[Any]:
        import pyarrow.dataset as pads

        where = self.domains_stage.path("windows") if domains else self.windows_dir
        ds = pads.dataset(str(where), format="parquet")
        yield from ds.to_batches(columns=columns, filter=flt)

    def generic_train_batches(self, columns: list[str]) -> Iterator[Any]:
        """``columns`` of the generic train windows (the resampling and experts' pool)."""
        import pyarrow.compute as pc

        yield from self._scan(columns, (pc.field("part") == "generic") & (pc.field("split") == "train"))

    def domain_windows(self, domain: str, split: str = "train"):
        """The domain's windows of ``split`` (metadata + cluster, no tokens) as pandas,
        in corpus order (document order of the split file, then position)."""
        self._check_part(domain)
        return domain_windows_in(self.cfg, self.domains_stage.path("windows"), domain, split)

    def _check_part(self, part: str) -> None:
        if part not in self.parts:
            raise DataError(f"domain '{part}': not in this clustering (known: {', '.join(self.parts)})")

    def generic_valid_streams(self, max_tokens: int) -> dict[int, np.ndarray]:
        """Per cluster, the generic validation windows' tokens, each followed by eos: the
        first ``max_tokens`` tokens of windows in window-id order (deterministic). Ids and
        lengths are read first; tokens only for the windows inside the budget."""
        import pyarrow as pa
        import pyarrow.compute as pc

        valid = (pc.field("part") == "generic") & (pc.field("split") == "valid")
        ids, lens = [], []
        for b in self._scan(["window_id", "start", "end"], valid):
            ids.extend(b.column("window_id").to_pylist())
            lens.append(pc.subtract(b.column("end"), b.column("start")).to_numpy(zero_copy_only=False) + 1)
        if not ids:
            return {}
        order = sorted(range(len(ids)), key=ids.__getitem__)
        lens = np.concatenate(lens).astype(np.int64)[order]
        before = np.cumsum(lens) - lens
        chosen = pa.array([ids[i] for i, b in zip(order, before) if b < max_tokens], pa.string())
        rows = {}
        for b in self._scan(["window_id", "cluster", "tokens"], valid & pc.field("window_id").isin(chosen)):
            for w, c, t in zip(b.column("window_id").to_pylist(), b.column("cluster").to_pylist(),
                               b.column("tokens").to_numpy(zero_copy_only=False)):
                rows[w] = (int(c), t)
        out: dict[int, list[np.ndarray]] = {}
        for w in chosen.to_pylist():
            c, t = rows[w]
            out.setdefault(c, []).append(np.append(np.asarray(t, dtype=np.int32), np.int32(self.eos_id)))
        return {c: np.concatenate(t).astype(np.int32) for c, t in sorted(out.items())}

    def counts(self, part: str) -> np.ndarray:
        """(k,) window counts of ``part`` (generic: all generic train windows; a domain:
        its train windows within the first ``data.domain_train_tokens`` tokens)."""
        self._check_part(part)
        if part == "generic":
            if "generic_counts" in self.meta:
                return np.asarray(self.meta["generic_counts"], dtype=np.int64)
            c = np.zeros(self.k, dtype=np.int64)
            for b in self.generic_train_batches(["cluster"]):
                c += np.bincount(b.column(0).to_numpy(), minlength=self.k)
            return c
        df = self.domain_windows(part, "train")
        embedded = int((df["end"] - df["start"]).sum())
        if embedded < self.cfg.data.domain_train_tokens and part not in self._warned_short:
            self._warned_short.add(part)
            print(f"[cluster] note: domain '{part}' has {embedded:,} embedded train tokens, fewer "
                  f"than data.domain_train_tokens={self.cfg.data.domain_train_tokens:,}", file=sys.stderr)
        return in_domain_counts(self.cfg, self.domains_stage.path("windows"), part, self.k, df=df)

    def histogram(self, part: str) -> np.ndarray:
        if part not in self._hist:
            self._hist[part] = _normalise(self.counts(part))
        return self._hist[part]

    def entropy(self, part: str) -> float:
        """Entropy of ``part``'s cluster histogram in nats (max ln k)."""
        return entropy(self.histogram(part))

    def most_frequent(self, domain: str) -> int:
        return int(np.argmax(self.counts(domain)))

    def iter_cluster_tokens(self, cluster: int, batch_windows: int = 8192) -> Iterator[np.ndarray]:
        """int32 chunks of the generic train windows of ``cluster``, each window followed by
        eos, in the split's canonical order (files ``part-<n>`` in name order, rows in
        order: sorted by (doc_id, start), a document's windows in sequence; the same on
        every rerun). One batch in memory."""
        import pyarrow.parquet as pq

        if not 0 <= cluster < self.k:
            raise DataError(f"cluster {cluster}: out of range 0..{self.k - 1}")
        d = self.by_cluster_dir / f"cluster={cluster}"
        for f in sorted(d.glob("*.parquet")) if d.is_dir() else []:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_windows, columns=["tokens"]):
                if b.num_rows:
                    yield flatten_with_eos(b.column(0), self.eos_id)

    def cluster_tokens(self, cluster: int, max_tokens: int | None = None) -> np.ndarray:
        """int32 token ids of the generic train windows of ``cluster``, each followed by
        eos, in the order of ``iter_cluster_tokens``; at most ``max_tokens`` of them (in
        memory: training streams reads ``cluster_streams``' memory-mapped file instead)."""
        out: list[np.ndarray] = []
        n = 0
        for chunk in self.iter_cluster_tokens(cluster):
            out.append(chunk)
            n += len(chunk)
            if max_tokens is not None and n >= max_tokens:
                break
        toks = np.concatenate(out) if out else np.zeros(0, dtype=np.int32)
        return toks if max_tokens is None else toks[:max_tokens]

    def cluster_sizes(self) -> np.ndarray:
        """(k,) generic train tokens per cluster, eos separators included (so
        ``cluster_sizes()[c] == len(cluster_tokens(c))``)."""
        return np.asarray(self.meta["generic_cluster_tokens"], dtype=np.int64)

    def embedding_stats(self, part: str) -> dict[str, int]:
        """What MiniLM embedded for ``part``: ``windows``, ``tokens`` (MiniLM word pieces,
        [CLS]/[SEP] included, after its 256-piece truncation; padding excluded) and
        ``tokens_sq`` (the sum over windows of tokens², for attention). ``generic``: every
        generic window embedded (train windows for k-means and the experts' pool, valid
        windows for routed perplexity); a domain: its in-domain training windows."""
        self._check_part(part)
        if part == "generic":
            stats = self.meta.get("embedded_generic")
        else:
            stats = self.domain_meta.get("embedded_domains", {}).get(part)
        if stats is None:
            raise DataError(f"{self.dir}: this clustering predates embedding statistics; rerun `slmfactory cluster`")
        return {k: int(v) for k, v in stats.items()}

    @property
    def embedder(self) -> str:
        return str(self.meta.get("embedder", "minilm"))

    def embedding_cost(self, part: str, profile=None):
        """The embedder's inference cost of embedding ``part``'s windows as a
        :class:`slmfactory.platform.cost.CostRecord` (phase ``embed/<part>``).

        MiniLM: FLOPs = 2 · MINILM_PARAMS · tokens + 2 · layers · d · Σ tokens² (per token,
        2·N plus attention over its window's T tokens, as ``platform/cost.py`` counts 2·L·T·d).
        hashed-tfidf: ``embed_hashed.embedding_flops`` on the non-zero n-gram features (tf-idf
        and the sparse projection, ~2·dim per feature), the generic part plus the fit
        (``embed_hashed.fit_flops``: idf and the randomized SVD on the generic sample).
        Wall seconds are the stage's measured windowing + (fit +) embedding time (the generic
        part: the generic embedding stage; a domain: the domain stage's, split by tokens).
        ``profile``: the device profile for device-hours (default: ``cfg.device``). The
        generic part is shared by every strategy that needs the clustering; a domain's
        part belongs to that domain's specialisation."""
        st = self.embedding_stats(part)
        if self.embedder == embed_hashed.NAME:
            dim = int(self.meta["embed_dim"])
            flops = embed_hashed.embedding_flops(st["windows"], st["features"], dim)
            if part == "generic" and self.meta.get("embedder_fit"):
                flops += float(self.meta["embedder_fit"]["flops"])
            work = Work(INFERENCE, st["tokens"], flops, float(embed_hashed.parameters(dim)))
        else:
            flops = 2.0 * MINILM_PARAMS * st["tokens"] + 2.0 * MINILM_LAYERS * MINILM_DIM * st["tokens_sq"]
            work = Work(INFERENCE, st["tokens"], flops, float(MINILM_PARAMS))
        if part == "generic":
            wall = float(self.meta.get("embedded_generic_seconds", 0.0))
        else:
            total = sum(int(v["tokens"]) for v in self.domain_meta.get("embedded_domains", {}).values())
            wall = float(self.domain_meta.get("embedded_domains_seconds", 0.0)) * st["tokens"] / max(1, total)
        return CostRecord.of(f"embed/{part}", work, wall, profile if profile is not None else self.cfg.device,
                             windows=st["windows"])

    @property
    def embedder_path(self) -> Path | None:
        """The fitted hashed-tfidf model this clustering embedded with (None for MiniLM):
        new text compared with ``centroids`` must be embedded by it."""
        if self.embedder != embed_hashed.NAME:
            return None
        return self.stage.path(self.meta["embedder_model"])

    def hashed_model(self):
        """The fitted hashed-tfidf model (loaded once per ``Clusters``)."""
        if self.embedder != embed_hashed.NAME:
            raise DataError(f"{self.dir}: this clustering embedded with {self.embedder}, not {embed_hashed.NAME}")
        if self._model is None:
            self._model = embed_hashed.load(self.embedder_path)
        return self._model

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, dim) embeddings of new texts by the clustering's embedder in this process
        (MiniLM, or the fitted hashed-tfidf model): comparable with ``centroids``."""
        if self.embedder == embed_hashed.NAME:
            return embed_hashed.transform(self.hashed_model(), list(texts))[0]
        if self._model is None:
            self._model = load_minilm()
        return encode(self._model, list(texts), self.cfg.cluster.embed_batch_size)

    def assign_texts(self, texts: list[str]) -> np.ndarray:
        """Cluster ids for new texts: ``embed_texts``, nearest centroid."""
        return nearest_centroid(self.embed_texts(texts), self.centroids)

    def provenance(self) -> dict[str, Any]:
        """Per domain, the generic sources and collections in the clusters that hold its text
        (see :func:`provenance`), as the domain assignment stage wrote it."""
        if self.domains_stage is None:
            raise DataError(f"{self.dir}: provenance needs the domain assignment (load_clusters(cfg, domains=True))")
        path = self.domains_stage.path("provenance.json")
        if not path.is_file():
            raise DataError(f"{path}: not found; rerun `slmfactory cluster`")
        import json

        return json.loads(path.read_text())

    def summary(self, top: int = 3) -> str:
        lines = [f"clusters: k={self.k}  dir={self.dir}",
                 f"entropy in nats (max ln {self.k} = {math.log(self.k):.2f}); domain histograms over the "
                 f"first {self.cfg.data.domain_train_tokens:,} train tokens",
                 f"{'part':<16}{'windows':>10}{'entropy':>9}  top clusters (share)"]
        for part in self.parts:
            c = self.counts(part)
            p = _normalise(c)
            best = np.argsort(-p, kind="stable")[:top]
            tops = "  ".join(f"{int(j)}:{p[j]:.2f}" for j in best if p[j] > 0)
            lines.append(f"{part:<16}{int(c.sum()):>10}{entropy(p):>9.3f}  {tops}")
        if self.domains_stage is not None and self.domains_stage.path("provenance.json").is_file():
            prov = self.provenance()
            lines.append(f"generic text in each domain's top clusters (the fewest holding {prov['mass']:.0%} of "
                         "its windows), by source:")
            for d, e in prov["domains"].items():
                if e.get("windows"):
                    lines.append(f"  {d:<14} {len(e['top_clusters'])} clusters, {e['top_share']:.0%} of its windows, "
                                 f"{e['top_generic_windows']:,} generic: {shares_line(e['top_by_source'])}")
        return "\n".join(lines)

    def histogram_figure(self):
        """A bar chart per part (generic and each domain), for MLflow and reports."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        parts = self.parts
        fig, axes = plt.subplots(len(parts), 1, figsize=(8, 1.6 * len(parts) + 0.5), sharex=True, squeeze=False)
        for ax, part in zip(axes[:, 0], parts):
            ax.bar(np.arange(self.k), self.histogram(part), width=1.0, color="C0" if part == "generic" else "C1")
            ax.set_ylabel(part, rotation=0, ha="right", fontsize=8)
            ax.set_title(f"H = {self.entropy(part):.2f} nats", fontsize=8, loc="right")
        axes[-1, 0].set_xlabel(f"cluster (k = {self.k})")
        fig.tight_layout()
        return fig


def load_clusters(cfg, domains: bool = True) -> Clusters:
    """The finished clustering for ``cfg``'s inputs and cluster config (with the domain
    assignment unless ``domains`` is false)."""
    inputs = corpus_inputs(cfg)
    stage = kmeans_stage(cfg, generic_embedding_stage(cfg, inputs))
    dom = assignment_stage(cfg, stage, domain_embedding_stage(cfg, inputs)) if domains else None
    if not stage.done or (dom is not None and not dom.done):
        raise DataError(f"clusters for this corpus and cluster config not computed yet ({stage.dir}); "
                        "run `slmfactory cluster` first")
    return Clusters(cfg, stage, dom)
