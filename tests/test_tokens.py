"""Token streams written to disk a batch of documents at a time are the in-memory
tokenization of the same documents, prefix semantics included."""

from __future__ import annotations

import numpy as np
import pytest


def _texts_and_tokenizer(cfg):
    from slmfactory.data.corpus.store import iter_texts
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer, load_tokenizer

    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = list(iter_texts(cfg.corpus_dir, "generic", "train"))
    return tok, texts


def _reference(tok, texts):
    """The obvious definition: every document's ids, then eos, concatenated."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(x + [tok.eos_token_id], dtype=np.int32) for x in ids])


def test_streamed_split_equals_in_memory_tokenization(tiny_cfg):
    from slmfactory.data.tokens.streams import TOKENS_FILE, split_source, split_tokens, token_stage

    tok, texts = _texts_and_tokenizer(tiny_cfg)
    ref = _reference(tok, texts)
    whole = split_tokens(tiny_cfg, "generic", "train")
    assert whole.dtype == np.int32 and np.array_equal(whole, ref)
    stage = token_stage(tiny_cfg, "generic", "train")
    assert stage.info == {"complete": True, "tokens": len(ref)}
    on_disk = np.load(stage.path(TOKENS_FILE), mmap_mode="r")  # what TokenSource maps
    assert isinstance(on_disk, np.memmap) and np.array_equal(on_disk, ref)
    src = split_source(tiny_cfg, "generic", "train")
    assert np.array_equal(src.load(), ref)


def test_a_prefix_is_the_streams_prefix_and_grows_in_place(tiny_cfg):
    from slmfactory.data.tokens.streams import split_tokens, token_stage

    tok, texts = _texts_and_tokenizer(tiny_cfg)
    ref = _reference(tok, texts)
    n = 1000  # cuts a document (and a batch of documents) in the middle
    first = split_tokens(tiny_cfg, "generic", "train", max_tokens=n)
    assert np.array_equal(first, ref[:n])
    stage = token_stage(tiny_cfg, "generic", "train")
    assert stage.info == {"complete": False, "tokens": n + 1}  # one token of slack says "cut short"
    # A longer prefix replaces the stage with the same stream, longer.
    more = split_tokens(tiny_cfg, "generic", "train", max_tokens=5 * n)
    assert np.array_equal(more, ref[:5 * n]) and stage.info["tokens"] == 5 * n + 1
    # A budget past the end holds the whole split and says so.
    everything = split_tokens(tiny_cfg, "generic", "train", max_tokens=len(ref) + 10)
    assert np.array_equal(everything, ref) and stage.info == {"complete": True, "tokens": len(ref)}


@pytest.mark.parametrize("max_tokens", [None, 0, 1, 257, 4096])
@pytest.mark.parametrize("batch_docs", [1, 3, 256])
def test_chunks_do_not_depend_on_batching(tiny_cfg, max_tokens, batch_docs):
    from slmfactory.data.tokens.streams import iter_token_chunks, tokenize_texts

    tok, texts = _texts_and_tokenizer(tiny_cfg)
    texts = texts[:20]
    ref = _reference(tok, texts)
    want = ref if max_tokens is None else ref[:max_tokens]
    got = np.concatenate(list(iter_token_chunks(tok, texts, max_tokens, batch_docs)) or [np.zeros(0, np.int32)])
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert np.array_equal(tokenize_texts(tok, texts, max_tokens, batch_docs), want)


def test_npy_writer_appends_and_fixes_the_header(tmp_path):
    from slmfactory.data.tokens.npy import NpyWriter

    parts = [np.arange(5, dtype=np.int32), np.zeros(0, np.int32), np.arange(10**6, dtype=np.int32) * 3]
    with NpyWriter(tmp_path / "t.npy") as w:
        for p in parts:
            w.append(p)
    got = np.load(tmp_path / "t.npy", mmap_mode="r")
    assert got.dtype == np.int32 and got.shape == (10**6 + 5,)
    assert np.array_equal(got, np.concatenate(parts))
    # An empty stream is a valid empty array.
    with NpyWriter(tmp_path / "e.npy"):
        pass
    assert np.load(tmp_path / "e.npy").shape == (0,)
