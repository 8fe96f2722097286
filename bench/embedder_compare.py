"""MiniLM vs hashed-tfidf (``cluster.embedder``) on one corpus, side by side in one run: wall
time of the embedding, and how far the two clusterings agree on what matters downstream.

Both run the real Ray Data pipeline (``run_clustering``) from scratch on the recipe's corpus
(demo by default; the committed real-text sample when that corpus is not built, said so),
each in a fresh workdir holding links to the same corpus and tokenizer, so both embed the
same windows. Printed:

- wall seconds of windowing + embedding (generic and domains; hashed-tfidf's fit included),
  of the whole clustering, the in-process throughput on the same 512 window texts (no Ray),
  the embedders' counted FLOPs, and the ratios (how many times cheaper hashed-tfidf is);
- how well each clustering separates the generic windows' sources (AMI of cluster and source);
- agreement of the assignments: adjusted mutual information (scikit-learn) over every window
  (generic and in-domain), and over each domain's in-domain windows;
- per domain, the total variation between its two histograms once hashed-tfidf's clusters are
  matched one-to-one to MiniLM's (the matching of most shared generic windows, scipy's
  ``linear_sum_assignment``), and its entropy under each (each against its own clusters);
- per domain, the total variation between the generic *sources* importance sampling would
  draw under each (``provenance.json``'s ``expected_by_source``: comparable without matching).

    python bench/embedder_compare.py [--config configs/demo.yaml] [--workdir DIR] [--k K] [--out results.json]
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

EMBEDDERS = ("minilm", "hashed-tfidf")
THROUGHPUT_WINDOWS = 512


def _fresh_workdir(cfg, embedder: str):
    """``cfg`` with ``embedder`` on a new workdir linking the corpus and tokenizer of ``cfg``'s."""
    root = Path(tempfile.mkdtemp(prefix=f"slmf-embcmp-{embedder}-"))
    for name in ("corpus", "tokenizer"):
        if (cfg.root / name).exists():
            (root / name).symlink_to((cfg.root / name).resolve())
    return cfg.replace(workdir=str(root), **{"cluster.embedder": embedder, "tracking.enabled": False})


def _assignments(cl) -> dict[str, tuple[str, int]]:
    """window id -> (part, cluster) of every generic and in-domain window."""
    import pyarrow.dataset as pads

    out: dict[str, tuple[str, int]] = {}
    for where in (cl.windows_dir, cl.domains_stage.path("windows")):
        t = pads.dataset(str(where), format="parquet").to_table(columns=["window_id", "part", "cluster"])
        for w, p, c in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), t.column(2).to_pylist()):
            out[w] = (p, int(c))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--k", type=int, default=0, help="cluster.k (default: the recipe's)")
    ap.add_argument("--workdir", default="", help="where the recipe's corpus and tokenizer are (default: its own)")
    ap.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = ap.parse_args()

    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_mutual_info_score

    import pyarrow.dataset as pads

    from _common import bench_workdir, sample_window_texts
    from slmfactory.data.clustering import hashed as embed_hashed
    from slmfactory.data.clustering.pipeline import run_clustering
    from slmfactory.data.clustering.clusters import entropy, source_label, total_variation
    from slmfactory.data.clustering.minilm import encode, load_minilm, set_torch_threads
    from slmfactory.platform.config import load_config
    from slmfactory.platform.runtime import ray_session

    base = load_config(args.config, {"tracking.enabled": False, **({"workdir": args.workdir} if args.workdir else {})})
    if args.k:
        base = base.replace(**{"cluster.k": args.k})
    recipe_corpus = (base.corpus_dir / "manifest.json").is_file()
    base = bench_workdir(base)
    where = (f"recipe corpus {base.corpus_dir}" if recipe_corpus
             else f"the committed real-text sample (the recipe's corpus {args.config} is not built)")

    runs: dict[str, dict] = {}
    with ray_session():
        for name in EMBEDDERS:
            cfg = _fresh_workdir(base, name)
            t0 = time.perf_counter()
            cl = run_clustering(cfg, progress=False)
            wall = time.perf_counter() - t0
            gen, dom = cl.meta, cl.domain_meta
            embed_s = float(gen.get("embedded_generic_seconds", 0.0)) + float(dom.get("embedded_domains_seconds", 0.0))
            runs[name] = {"cl": cl, "wall": wall, "embed_s": embed_s,
                          "flops_generic": cl.embedding_cost("generic").flops,
                          "flops_domains": sum(cl.embedding_cost(d).flops for d in cl.parts[1:])}

    a, b = runs["minilm"]["cl"], runs["hashed-tfidf"]["cl"]
    # Steady-state throughput without Ray (actor start-up, sorts and writes dominate a small
    # corpus): the same generic window texts through each embedder in this process.
    texts = sample_window_texts(base, THROUGHPUT_WINDOWS)
    hashed_model = embed_hashed.load(b.stage.path(b.meta["embedder_model"]))
    minilm = load_minilm("cpu")
    set_torch_threads(None)
    encode(minilm, texts[:32], base.cluster.embed_batch_size)  # warm-up
    for name, fn in (("minilm", lambda: encode(minilm, texts, base.cluster.embed_batch_size)),
                     ("hashed-tfidf", lambda: embed_hashed.transform(hashed_model, texts))):
        t0 = time.perf_counter()
        fn()
        runs[name]["windows_per_s"] = len(texts) / (time.perf_counter() - t0)
    domains = a.parts[1:]
    n_gen = int(a.meta["part_counts"].get("generic/train", 0))
    print(f"{where}: {n_gen:,} generic train windows of <= {base.cluster.window_tokens} tokens, "
          f"{len(domains)} domains, k={a.k}, {os.cpu_count()} cores")
    print(f"{'':<26}{'minilm':>14}{'hashed-tfidf':>14}{'ratio':>10}")
    for label, key in (("embedding wall s", "embed_s"), ("clustering wall s", "wall"),
                       ("windows/s in-process", "windows_per_s"),
                       ("embedding FLOPs generic", "flops_generic"), ("embedding FLOPs domains", "flops_domains")):
        x, y = runs["minilm"][key], runs["hashed-tfidf"][key]
        # Ratios say how many times cheaper (or faster) hashed-tfidf is.
        ratio = y / max(x, 1e-30) if key == "windows_per_s" else x / max(y, 1e-30)
        print(f"{label:<26}{x:>14.4g}{y:>14.4g}{ratio:>9.1f}x")

    # Assignments of the same windows under both clusterings.
    ra, rb = _assignments(a), _assignments(b)
    ids = sorted(set(ra) & set(rb))
    parts = np.asarray([ra[w][0] for w in ids])
    ca, cb = np.asarray([ra[w][1] for w in ids]), np.asarray([rb[w][1] for w in ids])
    ami_all = float(adjusted_mutual_info_score(ca, cb))
    # Match hashed-tfidf's clusters to MiniLM's by the most shared generic windows.
    g = parts == "generic"
    overlap = np.zeros((a.k, b.k), dtype=np.int64)
    np.add.at(overlap, (ca[g], cb[g]), 1)
    rows, cols = linear_sum_assignment(-overlap)
    to_a = np.empty(b.k, dtype=np.int64)
    to_a[cols] = rows
    matched_generic = float(overlap[rows, cols].sum() / max(1, g.sum()))
    print(f"\nassignment agreement: AMI {ami_all:.3f} over {len(ids):,} windows; "
          f"{matched_generic:.1%} of generic windows in matched clusters")

    # How well each clustering separates the generic text's sources (what importance sampling
    # needs: clusters that hold one kind of text), against the same windows' sources.
    for name, cl in (("minilm", a), ("hashed-tfidf", b)):
        t = pads.dataset(str(cl.windows_dir), format="parquet").to_table(columns=["split", "source", "cluster"])
        train = np.asarray(t.column("split").to_pylist()) == "train"
        runs[name]["ami_source"] = float(adjusted_mutual_info_score(
            np.asarray(t.column("source").to_pylist())[train], t.column("cluster").to_numpy()[train]))
    print(f"clusters vs generic source (AMI over generic train windows): minilm {runs['minilm']['ami_source']:.3f}, "
          f"hashed-tfidf {runs['hashed-tfidf']['ami_source']:.3f}")

    prov = {"minilm": a.provenance()["domains"], "hashed-tfidf": b.provenance()["domains"]}
    out_rows = []
    print(f"\n{'domain':<12}{'AMI':>7}{'TV hist':>9}{'H minilm':>10}{'H hashed':>10}{'TV IS src':>11}  "
          "IS draws (minilm | hashed-tfidf)")
    for d in domains:
        m = parts == d
        ha, hb = a.histogram(d), b.histogram(d)
        hb_matched = np.zeros(a.k)
        np.add.at(hb_matched, to_a, hb)
        ea, eb = prov["minilm"][d].get("expected_by_source", {}), prov["hashed-tfidf"][d].get("expected_by_source", {})
        srcs = sorted(set(ea) | set(eb))
        tv_src = total_variation(np.array([ea.get(s, 0.0) for s in srcs]), np.array([eb.get(s, 0.0) for s in srcs]))
        row = {"domain": d, "ami": float(adjusted_mutual_info_score(ca[m], cb[m])),
               "tv_matched_histogram": total_variation(ha, hb_matched), "entropy_minilm": entropy(ha),
               "entropy_hashed": entropy(hb), "tv_is_sources": tv_src,
               "is_top_minilm": max(ea, key=ea.get) if ea else "", "is_top_hashed": max(eb, key=eb.get) if eb else ""}
        out_rows.append(row)
        print(f"{d:<12}{row['ami']:>7.3f}{row['tv_matched_histogram']:>9.3f}{row['entropy_minilm']:>10.3f}"
              f"{row['entropy_hashed']:>10.3f}{tv_src:>11.3f}  "
              f"{source_label(row['is_top_minilm'])} | {source_label(row['is_top_hashed'])}")
    mean = {k: float(np.mean([r[k] for r in out_rows])) for k in ("ami", "tv_matched_histogram", "tv_is_sources")}
    print(f"{'mean':<12}{mean['ami']:>7.3f}{mean['tv_matched_histogram']:>9.3f}{'':>20}{mean['tv_is_sources']:>11.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "where": where, "k": a.k, "generic_windows": n_gen, "cores": os.cpu_count(),
            "timings": {n: {k: v for k, v in r.items() if k != "cl"} for n, r in runs.items()},
            "ami_all": ami_all, "matched_generic": matched_generic, "domains": out_rows, "mean": mean}, indent=1))


if __name__ == "__main__":
    main()
