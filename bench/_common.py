"""Shared bench helpers: real-text tokens for a recipe, and a step timer that runs inside
whichever process trains (in-process or on a Ray worker), so Ray start-up never enters
the timed window."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "assets" / "corpus_sample"


def sample_texts() -> list[str]:
    """The committed real-text sample (all parts), else the system's licence texts."""
    texts = [json.loads(line)["text"] for f in sorted(SAMPLE.glob("*.jsonl"))
             for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts or [p.read_text(errors="replace") for p in sorted(Path("/usr/share/common-licenses").glob("*"))
                     if p.is_file()]


def real_tokens(vocab_size: int, n_tokens: int, cache: Path | None = None):
    """``(tokens, vocab)``: at least ``n_tokens`` tokens of the real-text sample under a
    byte-level BPE of ``vocab_size`` (trained once, cached under ``cache``), tiled when the
    sample is shorter. Used by ``train_throughput.py`` (model speed, not quality)."""
    import numpy as np

    from slmfactory.data.tokens.streams import tokenize_texts
    from slmfactory.data.tokens.tokenizer import load_tokenizer, train_tokenizer

    cache = Path(cache or os.environ.get("SLMFACTORY_BENCH_CACHE", "/tmp/slmfactory-bench")) / f"tok-{vocab_size}"
    texts = sample_texts()
    if not (cache / "tokenizer.json").is_file():
        train_tokenizer(texts, cache, vocab_size, 30_000_000)
    tok = load_tokenizer(cache)
    tokens = tokenize_texts(tok, texts)
    if len(tokens) < n_tokens:
        tokens = np.tile(tokens, -(-n_tokens // len(tokens)))
    return tokens[:n_tokens], len(tok)


def prepare_tokens(cfg):
    """Train ``cfg``'s tokenizer on the sample (once per workdir) and write its tokens:
    returns a ``TokenSource``. Throughput does not depend on which text it is."""
    from slmfactory.data.tokens.streams import TokenSource, tokenize_texts
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    texts = sample_texts()
    if not (cfg.corpus_dir / "manifest.json").is_file():
        build_sample_corpus(cfg)
    tokens = tokenize_texts(load_tokenizer(ensure_tokenizer(cfg)), texts)
    return TokenSource.of_array(tokens, cfg.root / "tokens" / "bench.npy")


def timed_factory(factory, timing_file: str, warmup: int):
    """Wrap a trainer factory: rank 0 times every ``train_step`` and, when ``fit`` returns,
    writes {steps timed, seconds, threads} to ``timing_file``. The first ``warmup`` steps
    (allocator, DDP bucket set-up) are left out of the window."""

    def wrapped(ctx):
        import torch

        trainer = factory(ctx)
        train_step, fit = trainer.train_step, trainer.fit
        times: list[float] = []

        def step(i: int) -> float:
            t = time.perf_counter()
            loss = train_step(i)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            return loss

        def fit_and_write(*a, **k):
            result = fit(*a, **k)
            if ctx.rank == 0:
                window = times[warmup:]
                tokens = len(window) * trainer.cfg.batch_size * trainer.seq_len  # global batch
                Path(timing_file).write_text(json.dumps({
                    "steps": len(window), "seconds": sum(window), "tokens": tokens,
                    "tokens_per_s": tokens / max(sum(window), 1e-9), "world_size": ctx.world_size,
                    "torch_threads": torch.get_num_threads(), "pid": os.getpid(),
                    "fit_wall_seconds": result.wall_seconds}))
            return result

        trainer.train_step, trainer.fit = step, fit_and_write
        return trainer

    return wrapped


# -- a workdir and window texts for the clustering benchmarks (moved out of the package) --

def bench_workdir(cfg) -> Any:
    """``cfg`` if its corpus and tokenizer exist; otherwise the same recipe on a temporary
    workdir holding the committed real-text sample (slmfactory/data/corpus/sample) and a
    tokenizer trained on it, so a benchmark runs on a fresh checkout."""
    import tempfile

    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer

    if (cfg.corpus_dir / "manifest.json").is_file():
        ensure_tokenizer(cfg)
        return cfg
    root = Path(tempfile.mkdtemp(prefix="slmf-bench-"))
    cfg = cfg.replace(workdir=str(root), **{"tracking.enabled": False})
    build_sample_corpus(cfg)
    ensure_tokenizer(cfg)
    return cfg


def sample_window_texts(cfg, n: int) -> list[str]:
    """The decoded text of the first ``n`` generic train windows (in-process; for benchmarks)."""
    import pyarrow.parquet as pq

    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    w = cfg.cluster.window_tokens
    out: list[str] = []
    from slmfactory.data.clustering.clusters import corpus_inputs

    files = [p for _, _, p in corpus_inputs(cfg)]  # generic train first, then the domains
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["text"], batch_size=256):
            ids = tok(batch.column(0).to_pylist(), add_special_tokens=False)["input_ids"]
            spans = [x[s:s + w] for x in ids for s in range(0, len(x), w)]
            out.extend(tok.batch_decode(spans, skip_special_tokens=True))
            if len(out) >= n:
                return out[:n]
    return out
