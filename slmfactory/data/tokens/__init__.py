"""Tokens: the run's BPE tokenizer (a stage), token streams over the corpus splits and
resampled files (``TokenSource``, packed batches, splits) and the ``.npy`` writer they share.

- ``tokenizer.py``: train, cache and load the tokenizer;
- ``streams.py``: token sources, packing, budgets' slices;
- ``npy.py``: append-only ``.npy`` files written atomically.
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "npy": ("NpyWriter", "flatten_with_eos"),
    "streams": ("Batch", "PackedBatches", "TokenSource", "as_sequences", "resampled_source", "split_source",
                "tokenize_texts"),
    "tokenizer": ("ensure_tokenizer", "load_tokenizer", "tokenizer_stage"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
