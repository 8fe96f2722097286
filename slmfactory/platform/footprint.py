"""Peak memory each stage needs, estimated from the recipe before anything runs (the
``sweep --dry-run`` table). Estimates, not measurements: ``bench/memory_scale.py``
measures the host side, ``bench/gpu_mfu.py`` the device side.

Host stages stream: none holds a corpus. What grows with the corpus is at most a few
integers per window (cluster ids, lengths, multiplicities), never tokens or text.
Training (per device, data parallel, bf16 autocast over fp32 weights):
- weights, gradients and the DDP bucket in fp32 plus Adam's two moments: 20 bytes per
  trained parameter (slm-pn trains its whole projected network);
- activations kept for backward: ≈ 34 · b · T · d bytes per layer in 16-bit (Korthikanti
  et al. 2022, with attention fused so no T² term), b the per-device micro-batch;
- the logits: bf16 logits, their fp32 upcast for the loss and its gradient, 10 · b · T · V.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2.0 ** 30
MINILM_PARAMS = 22.7e6
MINILM_DIM = 384
# ``cluster.embedder: hashed-tfidf``, as ``data/clustering/hashed.py`` and the clustering run it
# (the platform imports nothing above it; tests/test_footprint.py keeps these equal to theirs).
HASHED_TFIDF = "hashed-tfidf"
HASHED_FEATURES = 2 ** 15
"""Hash buckets: the idf has one float64 per bucket, the SVD basis one row of them per dimension."""
HASHED_MAX_DIM = 256
"""The most dimensions the SVD keeps."""
HASHED_FIT_WINDOWS = 20_000
"""The most generic windows the model is fitted on."""
HASHED_MIN_BATCH = 512
"""The clustering hands a hashed-tfidf actor batches of at least this many windows."""


@dataclass(frozen=True)
class StageMemory:
    stage: str
    where: str
    """``host`` (one process: a Ray Data task or actor, the driver) or ``device`` (one GPU)."""
    bytes: float
    basis: str
    """What the number grows with."""

    def line(self) -> str:
        return f"{self.stage:<34}{self.where:<8}{self.bytes / GiB:>9.2f} GiB  {self.basis}"


def train_device_bytes(trained_params: float, d_model: int, n_layers: int, vocab: int, seq_len: int,
                       micro_batch: int) -> float:
    """Peak bytes on one device while training (the module docstring's three terms)."""
    return (20.0 * trained_params + 34.0 * micro_batch * seq_len * d_model * n_layers
            + 10.0 * micro_batch * seq_len * vocab)


def embedding_dim(cluster) -> int:
    """Floats per embedded window with ``cluster.embedder`` (hashed-tfidf: at most)."""
    return HASHED_MAX_DIM if cluster.embedder == HASHED_TFIDF else MINILM_DIM


def embed_memory(cluster) -> list[StageMemory]:
    """The embedding rows of ``cluster.embedder``: one actor of its pool (and hashed-tfidf's
    fit on the driver). MiniLM: fp32 weights and one batch's activations. hashed-tfidf:
    the fitted idf and SVD basis in float64, one batch's sparse n-gram rows (at most two
    n-grams a token, 12 bytes each, three copies: counts, tf-idf, projected input) and its
    dense vectors; the fit holds its sample's text (~6 bytes a token) and sparse rows, and
    the randomized SVD's dense (windows + buckets) x (dimensions + 10) factors, three at a
    time."""
    c = cluster
    if c.embedder != HASHED_TFIDF:
        return [StageMemory("embed (per MiniLM actor)", "host",
                            4 * MINILM_PARAMS + c.embed_batch_size * min(c.window_tokens, 256) * MINILM_DIM * 4 * 8
                            + 0.5 * GiB, "MiniLM weights + one batch of windows")]
    model = 8.0 * HASHED_FEATURES * (HASHED_MAX_DIM + 1)
    batch = max(HASHED_MIN_BATCH, c.embed_batch_size)
    sparse_per_window = 3 * 12.0 * 2 * c.window_tokens
    fit_windows = min(c.sample_windows, HASHED_FIT_WINDOWS)
    return [
        StageMemory("fit hashed-tfidf (driver)", "host",
                    fit_windows * (sparse_per_window + 6.0 * c.window_tokens)
                    + 3 * 8.0 * (fit_windows + HASHED_FEATURES) * (HASHED_MAX_DIM + 10) + model + 0.2 * GiB,
                    f"the {fit_windows:,}-window fit sample and the SVD's factors"),
        StageMemory("embed (per hashed-tfidf actor)", "host",
                    model + batch * (sparse_per_window + HASHED_MAX_DIM * (8.0 + 8.0 + 4.0)) + 0.5 * GiB,
                    "hashed-tfidf idf + SVD basis + one batch of windows"),
    ]


def stage_memory(cfg, params: dict[str, float], projected_params: dict[str, float] | None = None
                 ) -> list[StageMemory]:
    """One row per stage of ``cfg``'s pipeline. ``params``: the ``slm`` and ``llm``
    parameter counts (the caller counts the real models); ``projected_params``: strategy
    family -> trained parameters beyond a plain SLM (slm-pn's whole network)."""
    c, T, V = cfg.cluster, cfg.data.seq_len, cfg.tokenizer.vocab_size
    dim = embedding_dim(c)
    generic_tokens = max(cfg.pretrain.max_tokens, *(cfg.sweep.generic_tokens or (0,)))
    windows = generic_tokens / c.window_tokens
    rows = [
        StageMemory("tokenize (per split)", "host", 256 * 64e3 * 6 + 0.3 * GiB,
                    "a batch of 256 documents and their ids; the stream is appended to disk"),
        *embed_memory(c),
        StageMemory("k-means (driver)", "host", 2 * c.sample_windows * dim * 4.0 + c.k * dim * 4.0,
                    f"the {c.sample_windows:,}-window sample x {dim} floats, twice (faiss copies)"),
        StageMemory("assign (per task)", "host", c.embed_batch_size * dim * 4.0 + c.k * dim * 4.0
                    + 0.2 * GiB, "one batch of embeddings and the centroids"),
        StageMemory("resample (driver)", "host", windows * 24.0 + 0.2 * GiB,
                    f"3 integers per generic window ({windows:,.0f} windows at {generic_tokens:,} tokens)"),
    ]
    micro = max(1, cfg.pretrain.batch_size // cfg.scaling.phase("pretrain").num_workers)
    micro_ft = max(1, cfg.finetune.batch_size // cfg.scaling.phase("finetune").num_workers)
    for key in ("slm", "llm"):
        dims, n = getattr(cfg, key).dims(), params[key]
        rows.append(StageMemory(f"pretrain {key} ({n / 1e6:,.0f}M)", "device",
                                train_device_bytes(n, dims.d_model, dims.n_layers, V, T, micro),
                                f"micro-batch {micro} x {T} per device"))
        rows.append(StageMemory(f"fine-tune {key}", "device",
                                train_device_bytes(n, dims.d_model, dims.n_layers, V, T, micro_ft),
                                f"micro-batch {micro_ft} x {T} per device"))
    dims = cfg.slm.dims()
    for family, extra in (projected_params or {}).items():
        n = params["slm"] + extra
        rows.append(StageMemory(f"pretrain {family} ({n / 1e6:,.0f}M)", "device",
                                train_device_bytes(n, dims.d_model, dims.n_layers, V, T, micro),
                                "the whole network in the optimiser; activations of one expert"))
    return rows
