"""Token streams and deterministic batches.

A split is tokenized once (documents joined by EOS) into a flat int32 array cached as
``.npy`` under ``<workdir>/tokens/``. Training batches are a pure function of the step
index (an epoch-seeded permutation of fixed-length sequences), so resuming at step s
reproduces exactly the batches an uninterrupted run would have seen, and DDP ranks take
disjoint slices of the same global batch without any coordination.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from slmfactory.data.clustering import stream_path
from slmfactory.data.corpus import iter_texts
from slmfactory.data.tokens.npy import write_tokens
from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer, tokenizer_stage
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import Stage, atomic_path, corpus_digest


def iter_token_chunks(tokenizer, texts: Iterable[str], max_tokens: int | None = None,
                      batch_docs: int = 256) -> Iterator[np.ndarray]:
    """``tokens(doc) + [eos]`` for each text, as int32 chunks of ``batch_docs`` documents,
    stopping after exactly ``max_tokens`` tokens (the last chunk is cut). Holds one batch."""
    eos = tokenizer.eos_token_id
    total = 0
    batch: list[str] = []

    def flush() -> np.ndarray:
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        batch.clear()
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        out = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        for x, end, n in zip(ids, ends, lengths):
            out[end - n:end - 1] = x
        out[ends - 1] = eos
        return out

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_docs:
            chunk = flush()
            if max_tokens is not None and total + len(chunk) >= max_tokens:
                yield chunk[:max_tokens - total]
                return
            total += len(chunk)
            yield chunk
    if batch:
        chunk = flush()
        yield chunk if max_tokens is None else chunk[:max_tokens - total]


def tokenize_texts(tokenizer, texts: Iterable[str], max_tokens: int | None = None,
                   batch_docs: int = 256) -> np.ndarray:
    """Concatenate ``tokens(doc) + [eos]`` for each text, stopping after ``max_tokens``
    (in memory: tests and benchmarks; stages stream with :func:`write_tokens`)."""
    chunks = list(iter_token_chunks(tokenizer, texts, max_tokens, batch_docs))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


TOKENS_VERSION = "tokens-v1"  # streamed since, byte for byte the same file
TOKENS_FILE = "tokens.npy"


def token_stage(cfg, part: str, split: str):
    """The token stream of ``part``/``split`` is keyed by the corpus file's content and the
    tokenizer's key: a rebuilt corpus or another tokenizer gives another stream."""
    return Stage.of(cfg.root, "tokens", f"{part}-{split}", version=TOKENS_VERSION,
                    corpus_file=corpus_digest(cfg.corpus_dir, part, split), tokenizer=tokenizer_stage(cfg))


def split_tokens(cfg, part: str, split: str, max_tokens: int | None = None) -> np.ndarray:
    """Token stream of ``part`` ("generic" or a domain) / ``split``, cached as a stage.

    Documents are in the corpus's fixed (hash-shuffled) order, so a prefix is a
    deterministic sample: a phase that needs ``max_tokens`` tokenizes only that prefix
    (the 100 MB generic split is never tokenized whole for a 3M-token budget). The stage
    records whether it holds the whole split, and is replaced by a longer prefix of the
    same stream when a later phase needs more (same key: same content where they overlap).
    """
    stage = token_stage(cfg, part, split)
    info = stage.info
    if info and (info["complete"] or (max_tokens is not None and info["tokens"] >= max_tokens)):
        tokens = np.load(stage.path(TOKENS_FILE), mmap_mode="r")
    else:
        tokenizer = load_tokenizer(ensure_tokenizer(cfg))

        def build(work: Path) -> dict:
            texts = iter_texts(cfg.corpus_dir, part, split)
            # One extra token tells "exactly the split" from "cut short". Streamed to disk a
            # batch of documents at a time: no stage holds the split.
            n = write_tokens(work / TOKENS_FILE,
                             iter_token_chunks(tokenizer, texts, None if max_tokens is None else max_tokens + 1))
            if n == 0:
                raise DataError(f"{cfg.corpus_dir}/{part}/{split}: no tokens (empty split)")
            return {"complete": max_tokens is None or n <= max_tokens, "tokens": int(n)}

        stage.build(build, replace=True)
        tokens = np.load(stage.path(TOKENS_FILE), mmap_mode="r")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return np.asarray(tokens)


@dataclass(frozen=True)
class TokenSource:
    """A picklable pointer to a token stream on shared storage, ``np.load(path)[start:stop]``,
    with the key of the stage that made it (what downstream stages key on)."""

    path: str
    key: str
    start: int = 0
    stop: int | None = None

    def load(self) -> np.ndarray:
        return np.asarray(np.load(self.path, mmap_mode="r")[self.start:self.stop])

    @classmethod
    def of_array(cls, array: np.ndarray, path: Path) -> "TokenSource":
        """Write ``array`` (a root input: tests, benchmarks) and key it by its content."""
        import hashlib

        array = np.ascontiguousarray(array, dtype=np.int32)
        save_npy_atomic(Path(path), array)
        return cls(str(path), hashlib.sha256(array.tobytes()).hexdigest()[:16])

    def identity(self) -> dict:
        """What a stage reading this source keys on: the stream's key and the slice."""
        return {"tokens": self.key, "start": self.start, "stop": self.stop}


def split_source(cfg, part: str, split: str, max_tokens: int | None = None) -> TokenSource:
    """Tokenize (once, cached) and point at ``part``/``split``'s token stream."""
    tokens = split_tokens(cfg, part, split, max_tokens)
    stage = token_stage(cfg, part, split)
    return TokenSource(str(stage.path(TOKENS_FILE)), stage.key, 0, len(tokens))


def as_sequences(tokens: np.ndarray, seq_len: int, name: str = "data") -> np.ndarray:
    """(N, seq_len) view of non-overlapping sequences; the tail shorter than seq_len is dropped."""
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"{name}: {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return np.asarray(tokens[: n * seq_len]).reshape(n, seq_len)


@dataclass
class Batch:
    """One training batch. ``input_ids``: (B, T). ``expert``: the cluster id routing the
    batch (projected networks) or -1."""

    input_ids: torch.Tensor
    expert: int = -1


class PackedBatches:
    """Step-indexed batches over fixed-length sequences.

    ``batch(step)`` returns this rank's share of global batch ``step``: sequences
    ``perm_e[i]`` for global positions ``i in [step·B, (step+1)·B)``, where epoch e's
    permutation is seeded by ``(seed, e)``.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, name: str = "train"):
        if batch_size % world_size:
            raise DataError(f"{name}: batch_size {batch_size} is not divisible by {world_size} workers")
        self.seqs = as_sequences(tokens, seq_len, name)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perm_epoch, self._perm = -1, np.arange(0)

    def __len__(self) -> int:
        return len(self.seqs)

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        per_rank = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * per_rank
        pos = np.arange(start, start + per_rank)
        n = len(self.seqs)
        out = np.empty(per_rank, dtype=np.int64)
        for j, p in enumerate(pos):
            out[j] = self._perm_for(int(p // n))[p % n]
        return out

    def batch(self, step: int) -> Batch:
        return Batch(torch.from_numpy(self.seqs[self.indices(step)].astype(np.int64)))

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def resampled_source(res) -> TokenSource:
    """A resampled set's (``data.resample.ResampleResult``) training stream as a
    ``TokenSource``, keyed by the resample stage (its folder name)."""
    path = stream_path(res)
    return TokenSource(str(path), path.parent.name)
