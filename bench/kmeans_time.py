"""k-means wall time on the recipe's corpus (demo by default), side by side with the
embedding time of the same corpus and with a plain numpy Lloyd's on the same sample.

Needs the recipe's embeddings (``slmfactory cluster`` computes and caches them); when
they are not there yet the committed real-text sample is embedded instead (said so).
Prints: sample + faiss k-means seconds, numpy Lloyd seconds, the ratio numpy / faiss,
and k-means as a fraction of the embedding stage.

    python bench/kmeans_time.py [--config configs/demo.yaml] [--k K]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--k", type=int, default=0)
    args = ap.parse_args()

    from slmfactory.platform.runtime import init_ray
    from _common import bench_workdir
    from slmfactory.data.clustering import pipeline as C, raydata
    from slmfactory.platform.config import load_config

    import numpy as np

    cfg = load_config(args.config, {"tracking.enabled": False})
    if args.k:
        cfg = cfg.replace(**{"cluster.k": args.k})
    emb_dir = None
    if (cfg.corpus_dir / "manifest.json").is_file():
        stage = C.generic_embedding_stage(cfg, C.corpus_inputs(cfg))
        if stage.done:
            emb_dir, where = stage.dir, f"recipe corpus {cfg.corpus_dir}"
    init_ray(num_cpus=os.cpu_count())
    C.ray_data_context(False)
    if emb_dir is None:
        cfg = bench_workdir(cfg.replace(workdir=tempfile.mkdtemp(prefix="slmf-bench-")))
        k = min(cfg.cluster.k, 32)
        cfg = cfg.replace(**{"cluster.k": k, "cluster.sample_windows": max(k, cfg.cluster.sample_windows)})
        C.run_clustering(cfg, progress=False, domains=False)
        emb_dir = C.generic_embedding_stage(cfg, C.corpus_inputs(cfg)).dir
        where = f"committed sample (recipe embeddings not computed), k={k}"
    meta = json.loads((emb_dir / "stage.json").read_text())["info"]
    n_gen = int(meta["counts"]["generic/train"])
    print(f"{where}: {meta['windows']:,} windows ({n_gen:,} generic), k={cfg.cluster.k}, "
          f"sample<={cfg.cluster.sample_windows:,}, {cfg.cluster.kmeans_iters} iterations, {os.cpu_count()} cores")

    stages = raydata.Stages(False)
    t0 = time.perf_counter()
    cent, n_sample = C._fit_kmeans(cfg, emb_dir, n_gen, stages)
    total = time.perf_counter() - t0
    t_fit = stages.timings["kmeans"]
    print(f"sample {stages.timings['sample']:.2f}s + faiss k-means {t_fit:.2f}s = {total:.2f}s on {n_sample:,} windows")

    # Side by side: plain numpy Lloyd's (same init = faiss's first k sample points is not
    # exposed, so random rows; same iteration count) on the same sample.
    import ray

    from slmfactory.data.clustering.minilm import from_arrow

    ds = ray.data.read_parquet(str(emb_dir / "embedded")).select_columns(
        ["window_id", "part", "split", "embedding"])
    x = np.concatenate([from_arrow(b.column("embedding")) for b in ds.map_batches(
        raydata._sample_batch, batch_format="pyarrow", fn_kwargs={"seed": cfg.cluster.seed, "threshold": 1.0})
        .iter_batches(batch_format="pyarrow", batch_size=8192)])[:n_sample]
    ray.shutdown()
    rng = np.random.default_rng(0)
    c = x[rng.choice(len(x), cfg.cluster.k, replace=False)].copy()
    t0 = time.perf_counter()
    for _ in range(cfg.cluster.kmeans_iters):
        a = np.argmax(x @ c.T, axis=1)
        for j in range(cfg.cluster.k):
            m = a == j
            if m.any():
                v = x[m].sum(0)
                c[j] = v / max(np.linalg.norm(v), 1e-12)
    t_np = time.perf_counter() - t0
    emb_s = float(meta.get("timings", {}).get("embed", float("nan")))
    print(f"numpy Lloyd's, same sample and iterations: {t_np:.2f}s")
    print(f"ratio numpy/faiss = {t_np / max(t_fit, 1e-9):.2f}; k-means (sample + fit) / embedding stage "
          f"({emb_s:.1f}s) = {total / emb_s:.4f}")


if __name__ == "__main__":
    main()
