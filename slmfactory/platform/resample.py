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

The selection (window ids and multiplicities) is small and made on the driver; the token
data is streamed by a Ray Data job from the assigned-windows table to parquet. Each output row
carries a random ``order`` key, so ``load_resampled_tokens`` returns a shuffled stream
(repeats of a window are not adjacent). The total variation distance reported is measured
on the written parquet against the *unrenormalised* domain histogram.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slmfactory.platform.errors import ConfigError, DataError
from slmfactory.platform.stages import Stage

RESAMPLE_VERSION = "resample-v1"


@dataclass
class ResampleResult:
    domain: str
    path: Path
    """The result folder: ``result.json`` and ``data/`` (parquet)."""
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


def _generic_index(cl) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cluster: (generic train window ids sorted, lengths incl. eos). Ids only, read
    batch by batch: the driver never loads generic tokens."""
    import pyarrow.compute as pc

    ids, lens, cluster = [], [], []
    for b in cl.generic_train_batches(["window_id", "start", "end", "cluster"]):
        ids.append(np.asarray(b.column("window_id").to_pylist(), dtype=object))
        lens.append(pc.subtract(b.column("end"), b.column("start")).to_numpy(zero_copy_only=False) + 1)
        cluster.append(b.column("cluster").to_numpy(zero_copy_only=False))
    ids = np.concatenate(ids) if ids else np.zeros(0, dtype=object)
    lens = np.concatenate(lens).astype(np.int64) if lens else np.zeros(0, dtype=np.int64)
    cluster = np.concatenate(cluster).astype(np.int64) if cluster else np.zeros(0, dtype=np.int64)
    order = np.lexsort((ids.astype(str), cluster))  # by cluster, then window id
    bounds = np.searchsorted(cluster[order], np.arange(cl.k + 1))
    return [(ids[order[a:b]], lens[order[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])]


def _select_rows(batch, sel_ids, sel_counts: np.ndarray, seed: int):
    """Repeat each selected window of ``batch`` by its multiplicity; drop the rest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from slmfactory.platform.clusters import _sample_key

    idx = pc.index_in(batch.column("window_id"), value_set=sel_ids).to_numpy(zero_copy_only=False)
    present = ~np.isnan(idx.astype(np.float64)) if idx.dtype == object else idx >= 0
    idx = np.where(present, np.nan_to_num(idx.astype(np.float64), nan=-1), -1).astype(np.int64)
    mult = np.where(idx >= 0, sel_counts[np.maximum(idx, 0)], 0)
    rows = np.repeat(np.arange(batch.num_rows), mult)
    copy = np.concatenate([np.arange(m) for m in mult if m > 0]) if rows.size else np.zeros(0, np.int64)
    cluster = pc.cast(batch.column("cluster"), pa.int32())
    batch = batch.set_column(batch.schema.get_field_index("cluster"), "cluster", cluster)
    out = batch.select(["window_id", "cluster", "tokens"]).take(pa.array(rows, pa.int64()))
    ids = out.column("window_id").to_pylist()
    order = _sample_key(seed, [f"{w}#{k}" for w, k in zip(ids, copy)])
    return (out.append_column("copy", pa.array(copy, pa.int32()))
               .append_column("order", pa.array(order, pa.float64())))


def resample(cfg, domain: str, tokens: int, progress: bool = True, tracker=None) -> ResampleResult:
    """Write ~``tokens`` generic tokens whose cluster histogram matches ``domain``'s."""
    from slmfactory.platform.clusters import _ray_data_context, run_clustering, total_variation
    from slmfactory.platform.runtime import ray_session

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
            res = ResampleResult.from_dict(json.loads((out / "result.json").read_text()) | {"path": str(out)})
            if progress:
                print(f"[resample] cached: {out}", file=sys.stderr, flush=True)
            if tracker is not None:
                _log(res, tracker)
            return res

        dom_counts = cl.counts(domain)
        if dom_counts.sum() == 0:
            raise DataError(f"domain '{domain}': no train windows to take a histogram from")
        p_dom = dom_counts / dom_counts.sum()
        index = _generic_index(cl)
        sizes = np.array([len(ids) for ids, _ in index], dtype=np.int64)
        mean_len = np.array([lens.mean() if len(lens) else 0.0 for _, lens in index])
        missing = [int(c) for c in np.flatnonzero((p_dom > 0) & (sizes == 0))]
        p_eff = np.where(sizes > 0, p_dom, 0.0)
        if p_eff.sum() == 0:
            raise DataError(f"domain '{domain}': none of its clusters has generic windows")
        p_eff = p_eff / p_eff.sum()
        n_windows = max(1, int(round(int(tokens) / float((p_eff * mean_len).sum()))))
        n_c = largest_remainder(p_eff, n_windows)

        rng = np.random.default_rng(seed)
        sel_ids: list[np.ndarray] = []
        sel_counts: list[np.ndarray] = []
        exhausted: list[int] = []
        for c in range(cl.k):
            want, (ids, _) = int(n_c[c]), index[c]
            if want == 0:
                continue
            counts = np.zeros(len(ids), dtype=np.int64)
            perm = rng.permutation(len(ids))
            counts[perm[:want]] += 1
            if want > len(ids):
                exhausted.append(c)
                np.add.at(counts, rng.integers(0, len(ids), want - len(ids)), 1)
            keep = counts > 0
            sel_ids.append(ids[keep])
            sel_counts.append(counts[keep])
        all_ids = np.concatenate(sel_ids)
        all_counts = np.concatenate(sel_counts)
        if progress:
            print(f"[resample] {domain}: {n_windows:,} windows from {len(all_ids):,} distinct generic windows "
                  f"({len(exhausted)} clusters exhausted, {len(missing)} unmatched) "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

        import pyarrow as pa
        import ray

        _ray_data_context(progress)

        def write(tmp: Path) -> dict:
            # Read the assigned-windows table (a few large files) rather than ``by_cluster``
            # (one file per cluster): Ray Data pays ~0.15 s per file here, 64 files ~10 s.
            # Only generic train ids are selected, so other windows drop out in ``_select_rows``.
            ds = ray.data.read_parquet(str(cl.windows_dir)).select_columns(["window_id", "tokens", "cluster"])
            ds.map_batches(_select_rows, batch_format="pyarrow",
                           fn_kwargs={"sel_ids": pa.array(all_ids.tolist(), pa.string()),
                                      "sel_counts": all_counts, "seed": seed}) \
                .write_parquet(str(tmp / "data"))
            hist_counts, n_rows, n_tokens, n_unique = _measure(tmp / "data", cl.k)
            if n_rows != n_windows:
                raise DataError(f"resample wrote {n_rows} windows, expected {n_windows}")
            hist = hist_counts / max(1, hist_counts.sum())
            res = ResampleResult(
                domain=domain, path=out, windows=n_rows, unique_windows=n_unique,
                repeated_windows=n_rows - n_unique, tokens=n_tokens,
                tv_distance=total_variation(hist, p_dom), histogram=hist, domain_histogram=p_dom,
                k=cl.k, missing_clusters=missing, exhausted_clusters=exhausted,
                seconds=time.perf_counter() - t0, eos_id=cl.eos_id)
            (tmp / "result.json").write_text(json.dumps(res.to_dict(), indent=1))
            return {"windows": n_rows, "tokens": n_tokens}

        stage.build(write)
        res = ResampleResult.from_dict(json.loads((out / "result.json").read_text()) | {"path": str(out)})
        if progress:
            print(f"[resample] {domain}: {res.windows:,} windows, {res.tokens:,} tokens, TV {res.tv_distance:.4f} "
                  f"({res.seconds:.1f}s)", file=sys.stderr, flush=True)

    own = tracker is None and cfg.tracking.enabled
    if own:
        from slmfactory.platform.tracking import open_tracker

        tracker = open_tracker(cfg, f"resample-{domain}", {"phase": "resample", "domain": domain})
    if tracker is not None:
        _log(res, tracker)
        if own:
            tracker.close()
    return res


def _measure(data_dir: Path, k: int) -> tuple[np.ndarray, int, int, int]:
    """Histogram, rows, tokens (eos included) and distinct windows of the written set,
    read column by column (never the whole set at once)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    counts = np.zeros(k, dtype=np.int64)
    rows = toks = 0
    firsts = 0
    for b in pads.dataset(str(data_dir), format="parquet").to_batches(columns=["cluster", "tokens", "copy"]):
        counts += np.bincount(b.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64), minlength=k)
        rows += b.num_rows
        toks += int(pc.sum(pc.list_value_length(b.column("tokens"))).as_py() or 0) + b.num_rows
        firsts += int(pc.sum(pc.equal(b.column("copy"), 0)).as_py() or 0)
    return counts, rows, toks, firsts


def load_resampled_tokens(path) -> np.ndarray:
    """The SLM-is pretraining stream: int32 tokens, windows in their shuffled order, each
    followed by eos. ``path`` is a result folder (or its ``data/``)."""
    import pyarrow.dataset as pads

    path = Path(path)
    root = path if (path / "result.json").is_file() else path.parent
    if not (root / "result.json").is_file():
        raise DataError(f"{path}: no resampled set here (run `slmfactory resample` first)")
    eos = int(json.loads((root / "result.json").read_text())["eos_id"])
    t = pads.dataset(str(root / "data"), format="parquet").to_table(columns=["order", "tokens"])
    t = t.take(np.argsort(t.column("order").to_numpy(), kind="stable"))
    toks = t.column("tokens").combine_chunks()
    flat = toks.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    offs = (toks.offsets.to_numpy() - toks.offsets[0].as_py()).astype(np.int64)
    n = len(toks)
    out = np.empty(len(flat) + n, dtype=np.int32)
    out[np.repeat(np.arange(n), np.diff(offs)) + np.arange(len(flat))] = flat
    out[offs[1:] + np.arange(n)] = eos
    return out


def _log(res: ResampleResult, tracker) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker.log_params({"resample.domain": res.domain, "resample.k": res.k})
    tracker.log_metrics({"resample/windows": res.windows, "resample/unique_windows": res.unique_windows,
                         "resample/repeated_windows": res.repeated_windows, "resample/tokens": res.tokens,
                         "resample/tv_distance": res.tv_distance, "resample/missing_clusters": len(res.missing_clusters),
                         "time/resample_s": res.seconds})
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
