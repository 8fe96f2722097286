"""Byte-level BPE trained with ``tokenizers`` on the generic corpus, saved as a Hugging
Face tokenizer folder (``PreTrainedTokenizerFast.from_pretrained`` loads it).

Byte-level so that any UTF-8 input round-trips: a domain never meets an unknown token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from slmfactory.data.corpus import iter_texts
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import Stage, corpus_digest

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_VERSION = "bpe-v1"


def _limited(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    used = 0
    for text in texts:
        if used >= max_chars:
            return
        text = text[: max_chars - used]
        used += len(text)
        yield text


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int, max_chars: int) -> Path:
    """Train a byte-level BPE on at most ``max_chars`` characters and save it into ``out_dir``
    (a stage's work folder: publishing it atomically is the stage's job)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for t in _limited(texts, max_chars):
            seen += len(t)
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise DataError("tokenizer: no generic text to train on (is the generic corpus empty?)")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS)
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    (out_dir / "slmfactory.json").write_text(json.dumps({"vocab_size": vocab_size, "train_chars": seen}))
    return out_dir


def load_tokenizer(path: Path):
    """Load a tokenizer folder written by :func:`train_tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path}: no tokenizer here (run `slmfactory tokenizer` first)")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_stage(cfg) -> Stage:
    """The tokenizer is keyed by its config and the generic train file it learns from:
    another ``tokenizer.vocab_size`` or a rebuilt corpus gives another tokenizer."""
    return Stage.of(cfg.root, "tokenizer", "bpe", version=TOKENIZER_VERSION, config=cfg.tokenizer,
                    generic_train=corpus_digest(cfg.corpus_dir, "generic", "train"))


def ensure_tokenizer(cfg) -> Path:
    """The run's tokenizer folder, trained on its generic corpus the first time."""
    stage = tokenizer_stage(cfg)
    if not stage.done:
        stage.build(lambda work: {"tokens": len(load_tokenizer(train_tokenizer(
            iter_texts(cfg.corpus_dir, "generic", "train"), work, cfg.tokenizer.vocab_size,
            cfg.tokenizer.train_chars)))})
    return stage.dir
