"""Peak memory of tokenization and of SLM-is resampling at two corpus sizes (goal: the
large/small ratio <= 1.2, i.e. memory does not grow with the corpus).

The generic corpus is the committed real-text sample (slmfactory/data/corpus/sample) repeated
until its text holds ``--small-mb`` / ``--large-mb`` MB (each repeat a new document id),
written to ``generic/train.parquet`` of a workdir built from the sample (tiny recipe: a
512-token BPE, ~2 bytes of text per token, so 200 MB of text is ~100M tokens).

Each measurement runs in its own subprocess; a poller samples every 50 ms the RSS of that
process and of all its descendants (psutil), and reports

- ``driver``: the subprocess itself (where tokenization and resampling's selection run);
- ``worker``: the largest single descendant (a Ray worker running a resample task);
- ``tree``: the sum over the whole tree (driver, Ray's gcs/raylet, every worker),
  at its highest. It is set by how many workers Ray runs at once (cores / the tasks'
  0.25 CPU, ~280 MiB each), not by the corpus; with too few windows files for the small
  corpus to fill that pool, the two runs would compare 1 worker with 8.

Tokenization: ``split_tokens(cfg, "generic", "train")`` (the stage, streaming to
``tokens.npy``). Resampling: ``resample(cfg, "legal", tokens)`` for half of the generic
train tokens, on a clustering written directly from the token stream (64-token windows,
k = 64 clusters drawn at random, a skewed domain histogram): no MiniLM, which would take
hours on a CPU, and the same assigned-windows table layout the real clustering writes (files
of ``--windows-per-file`` rows: at both sizes more files than Ray runs tasks at once, so
both runs use the same number of workers).

    python bench/memory_scale.py [--small-mb 10] [--large-mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, SAMPLE  # noqa: E402
from slmfactory.data.corpus import build as corpus_build  # noqa: E402

K = 64
DOMAIN = "legal"


def _cfg(workdir: Path):
    from slmfactory.platform.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", {"workdir": str(workdir), "tracking.enabled": False,
                                                        "cluster.k": K})


def make_workdir(base: Path, root: Path, mb: int) -> Path:
    """A copy of the sample workdir whose generic train split is ``mb`` MB of repeated text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = root / f"{mb}mb"
    shutil.copytree(base, work)
    cfg = _cfg(work)
    docs = [json.loads(line) for line in (SAMPLE / "generic.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    path = cfg.corpus_dir / "generic" / "train.parquet"
    schema = pq.read_schema(path)
    target, written, rep = mb * 1_000_000, 0, 0
    # Row groups of ~1,000 documents, as the corpus builder writes them (a footer of
    # thousands of tiny row groups would itself grow with the file).
    with pq.ParquetWriter(path, schema) as w:
        while written < target:
            rows = {name: [] for name in schema.names}
            for d in (d for _ in range(max(1, -(-1000 // len(docs)))) for d in docs):
                row = {"doc_id": f"{d['doc_id']}#{rep}", "text": d["text"], "source": d.get("source", "sample")}
                for name in schema.names:
                    rows[name].append(row.get(name, d.get(name)))
                written += len(d["text"].encode("utf-8"))
                rep += 1
                if written >= target:
                    break
            w.write_table(pa.table(rows, schema=schema))
    man = cfg.corpus_dir / "manifest.json"
    data = json.loads(man.read_text())
    data["parts"]["generic/train"]["sha256"] = corpus_build._sha256(path)  # what the manifest records
    man.write_text(json.dumps(data, indent=1))
    return work


def fake_clustering(work: Path, windows_per_file: int, tokens=None) -> int:
    """Write the generic clustering and the domain assignment stages (keys as
    ``run_clustering`` computes them) from ``tokens`` (default: the generic train token
    stream), cut into windows; returns the generic train tokens (eos separators included)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slmfactory.data.tokens.streams import TOKENS_FILE, token_stage
    from slmfactory.data.clustering.clusters import (assignment_stage, corpus_inputs, domain_embedding_stage,
                                              generic_embedding_stage, kmeans_stage)
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    cfg = _cfg(work)
    w = cfg.cluster.window_tokens
    if tokens is None:
        tokens = np.load(token_stage(cfg, "generic", "train").path(TOKENS_FILE), mmap_mode="r")
    eos = int(load_tokenizer(ensure_tokenizer(cfg)).eos_token_id)
    inputs = corpus_inputs(cfg)
    km = kmeans_stage(cfg, generic_embedding_stage(cfg, inputs))
    assign = assignment_stage(cfg, km, domain_embedding_stage(cfg, inputs))
    rng = np.random.default_rng(0)

    def table(start: int, n: int, part: str, clusters: np.ndarray):
        toks = np.asarray(tokens[start * w:(start + n) * w], dtype=np.int32)
        offs = np.arange(0, n * w + 1, w, dtype=np.int32)
        return pa.table({
            "window_id": pa.array([f"{part}{start + i}:0" for i in range(n)], pa.string()),
            "doc_id": pa.array([f"{part}{start + i}" for i in range(n)], pa.string()),
            "part": pa.array([part] * n, pa.string()), "split": pa.array(["train"] * n, pa.string()),
            "start": pa.array(np.zeros(n, np.int32)), "end": pa.array(np.full(n, w, np.int32)),
            "tokens": pa.ListArray.from_arrays(pa.array(offs), pa.array(toks)),
            "cluster": pa.array(clusters.astype(np.int32))})

    n_windows = len(tokens) // w
    counts = np.zeros(K, np.int64)

    def generic(out: Path) -> dict:
        (out / "windows").mkdir()
        np.save(out / "centroids.npy", np.eye(K, 384, dtype=np.float32))
        for f, s in enumerate(range(0, n_windows, windows_per_file)):
            n = min(windows_per_file, n_windows - s)
            c = rng.integers(0, K, n)
            counts[:] += np.bincount(c, minlength=K)
            pq.write_table(table(s, n, "generic", c), out / "windows" / f"part-{f:05d}.parquet")
        return {"k": K, "config": {"k": K}, "eos_id": eos, "windows": int(n_windows), "sample_windows": 0,
                "part_counts": {"generic/train": int(n_windows)}, "generic_counts": counts.tolist(),
                "generic_cluster_tokens": (counts * (w + 1)).tolist(), "timings": {}}

    def domains(out: Path) -> dict:
        (out / "windows").mkdir()
        n = min(2000, n_windows)
        p = np.exp(-np.arange(K) / 8.0)
        c = rng.choice(K, n, p=p / p.sum())
        pq.write_table(table(0, n, DOMAIN, c), out / "windows" / "part-00000.parquet")
        return {"domains": [DOMAIN], "part_counts": {f"{DOMAIN}/train": n}, "timings": {}}

    km.build(generic)
    assign.build(domains)
    return int(n_windows * (w + 1))


# -- children: one measurement each ------------------------------------------------------

def child(kind: str, workdir: str, tokens: int) -> None:
    cfg = _cfg(Path(workdir))
    t0 = time.perf_counter()
    if kind == "tokenize":
        from slmfactory.data.tokens.streams import split_tokens

        n = len(split_tokens(cfg, "generic", "train"))
        out = {"tokens": n}
    else:
        from slmfactory.data.clustering.resampling import resample
        from slmfactory.platform.runtime import init_ray

        init_ray(num_cpus=os.cpu_count())
        t0 = time.perf_counter()
        res = resample(cfg, DOMAIN, tokens, progress=False)
        out = {"tokens": res.tokens, "windows": res.windows, "tv": res.tv_distance}
    out["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(out), flush=True)


def measure(kind: str, workdir: Path, tokens: int = 0) -> dict:
    """Run one child; poll its tree's RSS. Returns the child's result and the peaks (bytes)."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, "--workdir", str(workdir),
                             "--tokens", str(tokens)], stdout=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = {"driver": 0, "worker": 0, "tree": 0}
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        rss = {}
        for p in procs:
            try:
                rss[p.pid] = p.memory_info().rss
            except psutil.Error:
                pass
        if rss:
            peak["driver"] = max(peak["driver"], rss.get(proc.pid, 0))
            others = [v for pid, v in rss.items() if pid != proc.pid]
            peak["worker"] = max([peak["worker"], *others])
            peak["tree"] = max(peak["tree"], sum(rss.values()))
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} at {workdir} failed (exit {proc.returncode})")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, **peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-mb", type=int, default=10)
    ap.add_argument("--large-mb", type=int, default=200)
    ap.add_argument("--windows-per-file", type=int, default=2_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary workdirs")
    ap.add_argument("--child", choices=["tokenize", "resample"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.tokens)

    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer

    root = Path(tempfile.mkdtemp(prefix="slmf-memscale-"))
    try:
        base = root / "base"
        cfg = _cfg(base)
        build_sample_corpus(cfg)
        ensure_tokenizer(cfg)
        rows = {}
        for mb in (args.small_mb, args.large_mb):
            work = make_workdir(base, root, mb)
            tok = measure("tokenize", work)
            generic_tokens = fake_clustering(work, args.windows_per_file)
            res = measure("resample", work, tokens=generic_tokens // 2)
            rows[mb] = (tok, res)
            print(f"{mb} MB: tokenize {tok['tokens']:,} tokens in {tok['seconds']:.1f}s; resample "
                  f"{res['tokens']:,} tokens ({res['windows']:,} windows, TV {res['tv']:.3f}) in "
                  f"{res['seconds']:.1f}s", flush=True)
            shutil.rmtree(work, ignore_errors=True) if not args.keep else None
        s, l = rows[args.small_mb], rows[args.large_mb]
        print(f"\npeak RSS, MiB (polled every 50 ms; {os.cpu_count()} cores)")
        print(f"{'stage / processes':<28}{f'{args.small_mb} MB':>10}{f'{args.large_mb} MB':>10}{'ratio':>8}")
        mib = 1 << 20
        for name, i, key in [("tokenize: driver", 0, "driver"), ("resample: driver", 1, "driver"),
                             ("resample: largest worker", 1, "worker"), ("resample: whole tree", 1, "tree")]:
            a, b = s[i][key], l[i][key]
            print(f"{name:<28}{a / mib:>10.0f}{b / mib:>10.0f}{b / max(a, 1):>8.2f}")
        print("goal: ratio <= 1.2 on every line")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
