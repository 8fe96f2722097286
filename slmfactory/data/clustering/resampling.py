"""``slmfactory resample``: the SLM-is pretraining set — generic windows resampled so
that their cluster histogram matches a domain's.

The paper weights a generic example x by w(x) = P(c(x) | domain) / P(c(x) | generic);
resampling does the same exactly and without weights in the loss:

1. N = the number of windows that makes about ``tokens`` tokens (each window + eos),
   given the mean window length of each cluster and the domain's cluster mixture.
2. Per-cluster counts n_c = round(p_domain(c) · N) by largest remainder, so the counts sum
   to N and the histogram is as close to the domain's as N windows allow.
3. Inside each cluster, windows are drawn without replacement (a seeded permutation)
   until the cluster is exhausted, then with replacement: those extra draws are the
   "repeated" windows (the paper's ablation: many clusters → small clusters → repeats).
4. Clusters where the domain has mass but the generic corpus has no window cannot be
   matched; they are reported and the rest of the domain histogram is renormalised.

Memory is bounded at any corpus size. The driver reads small columns (cluster, start, end)
of the assigned-windows table one file at a time and keeps O(files x k) counts; windows are
named by their place in the table (sorted files, rows in order), never by id string, and
the selection is one int32 multiplicity per window of the clusters drawn from (O(windows)
at most, 4 bytes each). It is written per input file into the stage's folder (shared
storage), where a Ray Data task per file reads it with that file: it repeats and shuffles
its windows in chunks of ``CHUNK_WINDOWS`` and writes them to ``data/`` (parquet) and as
tokens + eos to a part file. The driver then streams every chunk, in a seeded permutation
of all chunks, into ``tokens.npy``: the SLM-is training stream, written once, memory-mapped
by training (``load_resampled_tokens``). The same seed gives the same stream: every task's
output is a function of its file, the selection and the seed, not of Ray's scheduling, and
the assigned-windows table has a canonical layout (``raydata.write_canonical``: rows
sorted by (doc_id, start), equal blocks, files ``part-<n>`` in key order), so a window's
place in it, and hence the selection and each file's chunks, are the same on a rerun. The
seed is ``cluster.seed`` mixed with the domain's name.
The histogram, tokens and total variation reported are counted on the rows written,
against the *unrenormalised* domain histogram; so is the provenance: the resampled tokens
(each window's tokens + eos, every draw counted) by the generic source each window came
from (``source_tokens``), whose shares by source and by collection ``share_metrics`` names
``is_share/source/<source>`` and ``is_share/collection/<collection>`` (each set sums to 1).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.data.clustering.clusters import source_label, total_variation
from slmfactory.data.clustering.pipeline import TASK_CPUS, ray_data_context, run_clustering
from slmfactory.data.corpus import collection_of
from slmfactory.data.tokens import NpyWriter, flatten_with_eos
from slmfactory.platform.errors import ConfigError, DataError
from slmfactory.platform.runtime import ray_session
from slmfactory.platform.stages import Stage
from slmfactory.platform.tracking import open_tracker

RESAMPLE_VERSION = "resample-v3"  # v3: resampled tokens by generic source
STREAM_FILE = "tokens.npy"
CHUNK_WINDOWS = 8192
"""Input windows per shuffled chunk (and output rows per written piece)."""


@dataclass
class ResampleResult:
    domain: str
    path: Path
    """The result folder: ``result.json``, ``data/`` (parquet) and ``tokens.npy`` (the stream)."""
    windows: int
    unique_windows: int
    repeated_windows: int
    """Draws beyond the first of a window (windows - unique_windows)."""
    tokens: int
    """Tokens in the set, one eos per window included."""
    tv_distance: float
    """0.5 · Σ|p_resampled - p_domain| over the k clusters, measured on the written data."""
    histogram: np.ndarray
    domain_histogram: np.ndarray = field(default_factory=lambda: np.zeros(0))
    k: int = 0
    missing_clusters: list[int] = field(default_factory=list)
    """Clusters with domain mass but no generic window (unmatchable)."""
    exhausted_clusters: list[int] = field(default_factory=list)
    """Clusters drawn with replacement because the domain asked for more windows than exist."""
    seconds: float = 0.0
    eos_id: int = 0
    source_tokens: dict[str, int] = field(default_factory=dict)
    """Resampled tokens (eos included, every draw counted) by the generic source of their window."""

    def source_shares(self) -> dict[str, float]:
        """Share of the resampled tokens by generic source (sums to 1), largest first."""
        total = sum(self.source_tokens.values())
        return {s: n / total for s, n in sorted(self.source_tokens.items(), key=lambda kv: (-kv[1], kv[0]))} \
            if total else {}

    def collection_shares(self) -> dict[str, float]:
        """Share of the resampled tokens by the collection of their source (sums to 1)."""
        by: dict[str, int] = {}
        for s, n in self.source_tokens.items():
            by[collection_of(s)] = by.get(collection_of(s), 0) + n
        total = sum(by.values())
        return {c: n / total for c, n in sorted(by.items(), key=lambda kv: (-kv[1], kv[0]))} if total else {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["histogram"] = np.asarray(self.histogram).tolist()
        d["domain_histogram"] = np.asarray(self.domain_histogram).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResampleResult":
        d = dict(d)
        d["path"] = Path(d["path"])
        d["histogram"] = np.asarray(d["histogram"])
        d["domain_histogram"] = np.asarray(d.get("domain_histogram", []))
        return cls(**d)

    def summary(self, top: int = 5) -> str:
        lines = [f"resampled generic data for domain '{self.domain}' (k={self.k}): {self.path}",
                 f"  windows {self.windows:,} ({self.unique_windows:,} distinct, {self.repeated_windows:,} repeated "
                 f"draws), tokens {self.tokens:,}",
                 f"  total variation to the domain histogram: {self.tv_distance:.4f}"]
        if self.missing_clusters:
            lines.append(f"  clusters with domain mass but no generic windows (renormalised away): "
                         f"{self.missing_clusters}")
        if self.exhausted_clusters:
            lines.append(f"  clusters exhausted (drawn with replacement): {self.exhausted_clusters}")
        if self.source_tokens:
            lines.append("  resampled tokens by generic source: " + ", ".join(
                f"{v:.0%} {source_label(s)}" for s, v in list(self.source_shares().items())[:top]))
        order = np.argsort(-np.asarray(self.domain_histogram), kind="stable")[:top]
        lines.append("  cluster  domain  resampled")
        for c in order:
            lines.append(f"  {int(c):>7}  {self.domain_histogram[c]:.4f}  {self.histogram[c]:.4f}")
        return "\n".join(lines)


def largest_remainder(p: np.ndarray, n: int) -> np.ndarray:
    """Integer counts summing to ``n`` that are closest to ``p · n`` (Hamilton's method)."""
    p = np.asarray(p, dtype=np.float64)
    if p.sum() <= 0 or n <= 0:
        return np.zeros(len(p), dtype=np.int64)
    quota = p / p.sum() * n
    base = np.floor(quota).astype(np.int64)
    rest = int(n - base.sum())
    if rest > 0:
        # Ties broken by cluster index so the allocation is deterministic.
        order = np.lexsort((np.arange(len(p)), -(quota - base)))
        base[order[:rest]] += 1
    return base


def _generic_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask of generic train rows, their clusters, their lengths incl. eos) of one file
    of the assigned-windows table, in row order; small columns only (no tokens)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["part", "split", "cluster", "start", "end"])
    mask = pc.and_(pc.equal(t.column("part"), "generic"), pc.equal(t.column("split"), "train"))
    mask = mask.to_numpy(zero_copy_only=False).astype(bool)
    cluster = t.column("cluster").to_numpy().astype(np.int64)[mask]
    lens = (t.column("end").to_numpy().astype(np.int64) - t.column("start").to_numpy().astype(np.int64))[mask] + 1
    return mask, cluster, lens


def _generic_index(cl, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(files, k) generic train windows per file and cluster, and (k,) their tokens (eos
    included), one file at a time: O(files x k) on the driver, never a window id."""
    counts = np.zeros((len(files), cl.k), dtype=np.int64)
    tokens = np.zeros(cl.k, dtype=np.float64)
    for i, f in enumerate(files):
        _, cluster, lens = _generic_rows(f)
        counts[i] = np.bincount(cluster, minlength=cl.k)
        tokens += np.bincount(cluster, weights=lens.astype(np.float64), minlength=cl.k)
    return counts, tokens.astype(np.int64)


def _resample_file(row: dict, work: str, seed: int, eos: int, k: int) -> dict:
    """Ray Data task: the selected windows of one input file (``row["path"]``, index
    ``row["index"]``), each repeated by its multiplicity and shuffled inside chunks of
    ``CHUNK_WINDOWS`` input windows, to ``data/part-<i>.parquet`` and, as tokens + eos, to
    ``parts/<i>.npy``; chunk lengths and counts to ``parts/<i>.json``. Memory: the file's
    small columns and one chunk. Deterministic: a function of (file, selection, seed, i)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    i, path, work = int(row["index"]), str(row["path"]), Path(work)
    sel = np.load(work / "select" / f"{i:05d}.npy")
    mask, cluster, _ = _generic_rows(Path(path))
    # ``sel`` lists this file's windows cluster by cluster, each cluster in row order:
    # a row's place there is its place in the stable sort by cluster.
    place = np.empty(len(cluster), dtype=np.int64)
    place[np.argsort(cluster, kind="stable")] = np.arange(len(cluster))
    mult = np.zeros(len(mask), dtype=np.int64)
    mult[mask] = sel[place]
    del sel, place, cluster
    hist = np.zeros(k, dtype=np.int64)
    by_source: dict[str, int] = {}
    chunks: list[int] = []
    rows_out = unique = 0
    writer = None
    offset = 0
    with NpyWriter(work / "parts" / f"{i:05d}.npy") as npy:
        for j, b in enumerate(pq.ParquetFile(path).iter_batches(batch_size=CHUNK_WINDOWS,
                                                                columns=["window_id", "cluster", "tokens",
                                                                         "source"])):
            m = mult[offset:offset + b.num_rows]
            offset += b.num_rows
            if not m.any():
                continue
            take = np.repeat(np.arange(b.num_rows), m)
            copy = np.arange(len(take)) - np.repeat(np.cumsum(m) - m, m)
            perm = np.random.default_rng([seed, i, j]).permutation(len(take))
            take, copy = take[perm], copy[perm]
            # A small cluster drawn many times can multiply a chunk: write it in bounded pieces.
            for s in range(0, len(take), CHUNK_WINDOWS):
                t = b.take(pa.array(take[s:s + CHUNK_WINDOWS], pa.int64()))
                cl_col = t.column(1).cast(pa.int32())
                out = pa.table({"window_id": t.column(0), "cluster": cl_col, "tokens": t.column(2),
                                "copy": pa.array(copy[s:s + CHUNK_WINDOWS], pa.int32())})
                if writer is None:
                    (work / "data").mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(work / "data" / f"part-{i:05d}.parquet", out.schema)
                writer.write_table(out)
                toks = flatten_with_eos(t.column(2), eos)
                npy.append(toks)
                chunks.append(int(len(toks)))
                hist += np.bincount(cl_col.to_numpy(zero_copy_only=False).astype(np.int64), minlength=k)
                # Tokens per source: each window's tokens + its eos, every draw counted.
                lens = pc.add(pc.list_value_length(t.column(2)), 1).to_numpy(zero_copy_only=False)
                srcs = t.column(3).to_numpy(zero_copy_only=False).astype(str)
                for src in np.unique(srcs):
                    by_source[str(src)] = by_source.get(str(src), 0) + int(lens[srcs == src].sum())
                rows_out += t.num_rows
                unique += int((copy[s:s + CHUNK_WINDOWS] == 0).sum())
    if writer is not None:
        writer.close()
    (work / "parts" / f"{i:05d}.json").write_text(json.dumps(
        {"chunks": chunks, "hist": hist.tolist(), "rows": rows_out, "unique": unique, "sources": by_source}))
    return {"index": i, "rows": rows_out}


def _write_stream(work: Path, n_files: int, seed: int) -> int:
    """Concatenate every file's chunks, in a seeded permutation of all chunks, into
    ``work/tokens.npy`` (streamed: one chunk in memory); returns its length."""
    index = []  # (file, start, length) per chunk: O(windows / CHUNK_WINDOWS)
    for i in range(n_files):
        lengths = json.loads((work / "parts" / f"{i:05d}.json").read_text())["chunks"]
        starts = np.cumsum([0] + lengths[:-1])
        index.extend((i, int(a), int(n)) for a, n in zip(starts, lengths))
    files: dict[int, tuple[Any, int]] = {}  # file -> (open part, where its data starts)
    try:
        with NpyWriter(work / STREAM_FILE) as w:
            for c in np.random.default_rng([seed, 1]).permutation(len(index)):
                i, a, n = index[c]
                if i not in files:
                    f = open(work / "parts" / f"{i:05d}.npy", "rb")
                    np.lib.format.read_array_header_1_0(f) if np.lib.format.read_magic(f) == (1, 0) \
                        else np.lib.format.read_array_header_2_0(f)
                    files[i] = (f, f.tell())
                # Read, not memory-mapped: mapped pages of the parts would stay resident.
                f, start = files[i]
                f.seek(start + 4 * a)
                w.append(np.fromfile(f, dtype=np.int32, count=n))
    finally:
        for f, _ in files.values():
            f.close()
    return w.n


@dataclass
class _Allocation:
    """Steps 1, 2 and 4 of the module doc: how many windows to draw from each cluster."""

    p_dom: np.ndarray
    """The domain's cluster histogram (unrenormalised: what TV is measured against)."""
    files: list[Path]
    """The assigned-windows table's files, sorted: windows are named by their place in it."""
    file_counts: np.ndarray
    """(files, k) generic train windows per file and cluster."""
    sizes: np.ndarray
    """(k,) generic train windows per cluster."""
    missing: list[int]
    """Clusters with domain mass but no generic window."""
    n_windows: int
    n_c: np.ndarray
    """(k,) windows to draw per cluster; sums to ``n_windows``."""


def _allocate(cl, domain: str, tokens: int) -> _Allocation:
    """The windows per cluster that make ~``tokens`` tokens with ``domain``'s histogram."""
    dom_counts = cl.counts(domain)
    if dom_counts.sum() == 0:
        raise DataError(f"domain '{domain}': no train windows to take a histogram from")
    p_dom = dom_counts / dom_counts.sum()
    files = sorted(cl.windows_dir.rglob("*.parquet"))
    file_counts, cluster_tokens = _generic_index(cl, files)
    sizes = file_counts.sum(axis=0)
    mean_len = np.where(sizes > 0, cluster_tokens / np.maximum(sizes, 1), 0.0)
    missing = [int(c) for c in np.flatnonzero((p_dom > 0) & (sizes == 0))]
    p_eff = np.where(sizes > 0, p_dom, 0.0)
    if p_eff.sum() == 0:
        raise DataError(f"domain '{domain}': none of its clusters has generic windows")
    p_eff = p_eff / p_eff.sum()
    n_windows = max(1, int(round(int(tokens) / float((p_eff * mean_len).sum()))))
    return _Allocation(p_dom, files, file_counts, sizes, missing, n_windows, largest_remainder(p_eff, n_windows))


def _draw(alloc: _Allocation, k: int, seed: int) -> tuple[dict[int, np.ndarray], list[int]]:
    """Step 3: per cluster drawn from, the multiplicity of each of its windows (in table
    scan order: sorted files, rows in order; int32), and the clusters drawn with replacement."""
    rng = np.random.default_rng(seed)
    mult: dict[int, np.ndarray] = {}
    exhausted: list[int] = []
    for c in range(k):
        want, size = int(alloc.n_c[c]), int(alloc.sizes[c])
        if want == 0:
            continue
        counts = np.zeros(size, dtype=np.int32)
        counts[rng.permutation(size)[:want]] = 1
        if want > size:
            exhausted.append(c)
            np.add.at(counts, rng.integers(0, size, want - size), 1)
        mult[c] = counts
    return mult, exhausted


def _write_selection(work: Path, alloc: _Allocation, mult: dict[int, np.ndarray], k: int) -> None:
    """The selection, to the workers through the stage's folder (shared storage): per
    input file, its windows' multiplicities, cluster by cluster (``select/<i>.npy``)."""
    (work / "select").mkdir()
    file_counts = alloc.file_counts
    before = np.cumsum(file_counts, axis=0) - file_counts
    for i in range(len(alloc.files)):
        np.save(work / "select" / f"{i:05d}.npy", np.concatenate(
            [mult[c][before[i, c]:before[i, c] + file_counts[i, c]] if c in mult
             else np.zeros(file_counts[i, c], dtype=np.int32) for c in range(k)]
            + [np.zeros(0, dtype=np.int32)]))


def _resample_files(work: Path, files: list[Path], seed: int, cl) -> list[dict]:
    """One Ray Data task per input file (``_resample_file``); returns each file's
    ``parts/<i>.json`` (chunk lengths, histogram, rows, distinct windows, tokens by source)."""
    import ray

    (work / "parts").mkdir()
    # One task per input file (its output is a function of the file alone, so the
    # stream does not depend on Ray's block layout or scheduling). A task asks a
    # fraction of a CPU, so it is schedulable wherever trials hold a slot, but at most
    # one runs per CPU: each is CPU-bound, and 4 per core spent the job starting
    # workers (100M tokens on 2 cores: 8.3 s at 8 at once, 5.3 s at 2).
    tasks_at_once = max(1, min(len(files), int(ray.cluster_resources().get("CPU", 1))))
    ray.data.from_items([{"index": i, "path": str(f)} for i, f in enumerate(files)],
                        override_num_blocks=max(1, len(files))) \
        .map(_resample_file, num_cpus=TASK_CPUS, compute=ray.data.TaskPoolStrategy(size=tasks_at_once),
             fn_kwargs={"work": str(work), "seed": seed, "eos": cl.eos_id, "k": cl.k}) \
        .materialize()
    return [json.loads((work / "parts" / f"{i:05d}.json").read_text()) for i in range(len(files))]


def _load_result(out: Path) -> ResampleResult:
    return ResampleResult.from_dict(json.loads((out / "result.json").read_text()) | {"path": str(out)})


def _build(work: Path, out: Path, domain: str, cl, alloc: _Allocation, mult: dict[int, np.ndarray],
           exhausted: list[int], seed: int, t0: float) -> dict:
    """The stage's builder: the selected windows written and shuffled by the file tasks,
    counted, streamed into ``tokens.npy`` and checked; ``result.json`` describes them."""
    _write_selection(work, alloc, mult, cl.k)
    parts = _resample_files(work, alloc.files, seed, cl)
    hist_counts = np.sum([p["hist"] for p in parts], axis=0).astype(np.int64)
    n_rows = sum(p["rows"] for p in parts)
    n_unique = sum(p["unique"] for p in parts)
    source_tokens: dict[str, int] = {}
    for p in parts:
        for src, n in p["sources"].items():
            source_tokens[src] = source_tokens.get(src, 0) + int(n)
    if n_rows != alloc.n_windows:
        raise DataError(f"resample wrote {n_rows} windows, expected {alloc.n_windows}")
    n_tokens = _write_stream(work, len(alloc.files), seed)
    if n_tokens != sum(sum(p["chunks"]) for p in parts):
        raise DataError(f"resample stream: {n_tokens} tokens, the parts hold a different number")
    if n_tokens != sum(source_tokens.values()):
        raise DataError(f"resample provenance: {sum(source_tokens.values())} tokens by source, "
                        f"the stream holds {n_tokens}")
    shutil.rmtree(work / "select")
    shutil.rmtree(work / "parts")
    hist = hist_counts / max(1, hist_counts.sum())
    res = ResampleResult(
        domain=domain, path=out, windows=n_rows, unique_windows=n_unique,
        repeated_windows=n_rows - n_unique, tokens=n_tokens,
        tv_distance=total_variation(hist, alloc.p_dom), histogram=hist, domain_histogram=alloc.p_dom,
        k=cl.k, missing_clusters=alloc.missing, exhausted_clusters=exhausted,
        seconds=time.perf_counter() - t0, eos_id=cl.eos_id,
        source_tokens=dict(sorted(source_tokens.items())))
    (work / "result.json").write_text(json.dumps(res.to_dict(), indent=1))
    return {"windows": n_rows, "tokens": n_tokens}


def resample(cfg, domain: str, tokens: int, progress: bool = True, tracker=None) -> ResampleResult:
    """Write ~``tokens`` generic tokens whose cluster histogram matches ``domain``'s."""
    if int(tokens) <= 0:
        raise ConfigError(f"--tokens: expected a positive number of tokens, got {tokens}")
    if not domain or domain == "generic":
        raise ConfigError(f"--domain: expected a domain name, got {domain!r}")
    t0 = time.perf_counter()
    with ray_session():
        cl = run_clustering(cfg, progress=progress)
        if domain not in cl.parts:
            raise DataError(f"domain '{domain}': not in the corpus (known: {', '.join(cl.parts[1:])})")
        seed = int(cfg.cluster.seed) * 1_000_003 + zlib.crc32(domain.encode())
        stage = Stage.of(cfg.root, "resampled", f"{domain}-{int(tokens)}", version=RESAMPLE_VERSION,
                         clustering=cl.key, domains=cl.domains_key, domain=domain, tokens=int(tokens), seed=seed)
        out = stage.dir
        if stage.done:
            res = _load_result(out)
            if progress:
                print(f"[resample] cached: {out}", file=sys.stderr, flush=True)
            if tracker is not None:
                _log(res, tracker)
            return res

        alloc = _allocate(cl, domain, tokens)
        mult, exhausted = _draw(alloc, cl.k, seed)
        if progress:
            n_distinct = int(sum(int((m > 0).sum()) for m in mult.values()))
            print(f"[resample] {domain}: {alloc.n_windows:,} windows from {n_distinct:,} distinct generic windows "
                  f"({len(exhausted)} clusters exhausted, {len(alloc.missing)} unmatched) "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
        ray_data_context(progress)
        stage.build(lambda work: _build(work, out, domain, cl, alloc, mult, exhausted, seed, t0))
        res = _load_result(out)
        if progress:
            print(f"[resample] {domain}: {res.windows:,} windows, {res.tokens:,} tokens, TV {res.tv_distance:.4f} "
                  f"({res.seconds:.1f}s)", file=sys.stderr, flush=True)

    own = tracker is None and cfg.tracking.enabled
    if own:
        tracker = open_tracker(cfg, f"resample-{domain}", {"phase": "resample", "domain": domain})
    if tracker is not None:
        _log(res, tracker)
        if own:
            tracker.close()
    return res


def _result_dir(path) -> Path:
    path = Path(path)
    root = path if (path / "result.json").is_file() else path.parent
    if not (root / "result.json").is_file():
        raise DataError(f"{path}: no resampled set here (run `slmfactory resample` first)")
    return root


def load_resampled_tokens(path) -> np.ndarray:
    """The SLM-is pretraining stream: int32 tokens, windows in their shuffled order, each
    followed by eos; memory-mapped (written once, at resample time). ``path`` is a result
    folder (or its ``data/``)."""
    return np.load(_result_dir(path) / STREAM_FILE, mmap_mode="r")


def stream_path(res: ResampleResult) -> Path:
    """The SLM-is training stream's ``tokens.npy``; its stage folder's name is its key."""
    return _result_dir(res.path) / STREAM_FILE


SHARE_PREFIX = "is_share"


def metric_label(name: str) -> str:
    """``name`` as one path segment of an MLflow metric key (letters, digits, ``_ - . :`` and
    spaces; anything else becomes ``_``)."""
    return re.sub(r"[^\w.\- :]", "_", name) or "_"


def share_metrics(res: ResampleResult) -> dict[str, float]:
    """``is_share/source/<source>`` (the source's package, ``clusters.source_label``) and
    ``is_share/collection/<collection>``: the resampled tokens' shares; each set sums to 1
    (sources with one label, e.g. two versions of a package, are added up)."""
    out: dict[str, float] = {}
    for kind, shares, label in (("source", res.source_shares(), source_label),
                                ("collection", res.collection_shares(), str)):
        for name, v in shares.items():
            key = f"{SHARE_PREFIX}/{kind}/{metric_label(label(name))}"
            out[key] = out.get(key, 0.0) + float(v)
    return out


def _log(res: ResampleResult, tracker) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker.log_params({"resample.domain": res.domain, "resample.k": res.k})
    tracker.log_metrics({"resample/windows": res.windows, "resample/unique_windows": res.unique_windows,
                         "resample/repeated_windows": res.repeated_windows, "resample/tokens": res.tokens,
                         "resample/tv_distance": res.tv_distance, "resample/missing_clusters": len(res.missing_clusters),
                         "time/resample_s": res.seconds, **share_metrics(res)})
    tracker.log_dict({"domain": res.domain, "tokens": res.tokens, "source_tokens": res.source_tokens,
                      "source_shares": res.source_shares(), "collection_shares": res.collection_shares()},
                     f"resample/{res.domain}_sources.json")
    fig, ax = plt.subplots(figsize=(8, 2.5))
    x = np.arange(res.k)
    ax.bar(x - 0.2, res.domain_histogram, width=0.4, label=f"domain {res.domain}")
    ax.bar(x + 0.2, res.histogram, width=0.4, label="resampled generic")
    ax.set_xlabel("cluster")
    ax.set_title(f"TV = {res.tv_distance:.4f}", fontsize=9, loc="right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tracker.log_figure(fig, f"resample/{res.domain}_histogram.png")
    plt.close(fig)
