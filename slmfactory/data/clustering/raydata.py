"""The Ray Data plumbing every clustering stage shares (and resampling, through
``ray_data_context`` and ``TASK_CPUS``): the Ray Data settings, the CPUs a task asks,
canonical writes (sorted rows cut into equal blocks, files named in key order), row
counts, the deterministic hash key and hash sample of generic train windows, and the
per-stage progress lines.

Separate from the stages (:mod:`slmfactory.data.clustering.windows` for windows and
embeddings, :mod:`slmfactory.data.clustering.pipeline` for k-means and assignment)
because it is what makes each of them reproducible, whatever Ray's scheduling (the
pipeline's docstring says how).
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np


EMBED_BLOCK_WINDOWS = 2048


# CPUs each Ray Data task asks (read, tokenize, assign, write). Small, so that on a node
# whose cores are partly held by embedding actors the tasks that feed those actors can
# still be placed: with the default of 1 CPU a 1-CPU node running a 0.5-CPU actor could
# never schedule a read task and the pipeline would wait forever.
TASK_CPUS = 0.25


TASK = {"num_cpus": TASK_CPUS}


#: The canonical order of every window table: unique per window (doc ids are unique across
#: the corpus; ``start`` orders a document's windows).
ORDER_KEYS = ["doc_id", "start"]


class Stages:
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


def sample_key(seed: int, window_ids: list[str]) -> np.ndarray:
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


def n_blocks(rows: int) -> int:
    return max(1, -(-int(rows) // EMBED_BLOCK_WINDOWS))


def write_canonical(ds, out: Path, rows: int, partition_cols: list[str] | None = None) -> None:
    """Write ``ds`` sorted by ``ORDER_KEYS``, cut into equal blocks of about
    ``EMBED_BLOCK_WINDOWS`` rows (a function of ``rows`` alone), then name the files of each
    folder ``part-<n>.parquet`` in key order: the layout is a function of the rows, not of
    Ray's scheduling or its write ids, so "sorted files, rows in order" is the key order."""
    n = n_blocks(rows)
    # The first repartition sets the sort's partition count (else Ray plans one per
    # estimated read block, 200 for any small table: 200 reduce tasks); the second cuts
    # the sorted rows into equal blocks whatever boundaries the sort sampled.
    ds.repartition(n).sort(ORDER_KEYS).repartition(n) \
        .write_parquet(str(out), partition_cols=partition_cols, ray_remote_args=TASK)
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


def generic_train(batch):
    import pyarrow.compute as pc

    return batch.filter(pc.and_(pc.equal(batch.column("part"), "generic"), pc.equal(batch.column("split"), "train")))


def _sample_batch(batch, seed: int, threshold: float, column: str = "embedding"):
    """Generic train windows whose hash key is under ``threshold``: their id, key and
    ``column`` (pyarrow in and out)."""
    import pyarrow as pa

    batch = generic_train(batch)
    key = sample_key(seed, batch.column("window_id").to_pylist())
    sel = pa.array(key < threshold)
    return pa.table({"window_id": batch.column("window_id").filter(sel),
                     "key": pa.array(key).filter(sel),
                     column: batch.column(column).filter(sel)})


def hash_sample(ds, seed: int, s: int, n_generic: int, column: str):
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


def dir_rows(path: Path) -> int:
    import pyarrow.dataset as pads

    return pads.dataset(str(path), format="parquet").count_rows() if path.is_dir() else 0

