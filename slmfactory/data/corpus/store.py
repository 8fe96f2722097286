"""A built corpus, read: where its splits are, its manifest, its texts.

Layout under ``cfg.corpus_dir``::

    generic/train.parquet, generic/valid.parquet
    domains/<name>/{train,valid,test}.parquet
    manifest.json

Every parquet file has the string columns ``doc_id``, ``text`` and ``source``; the
manifest says, per file, its documents, bytes, sha256 and sources, and how the build
placed the documents (see :mod:`slmfactory.data.corpus.build`, which writes all of it:
the real build from pinned packages, user imports and the shipped sample).

Everyone who reads a corpus imports this module; only the commands that build one import
the builder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from slmfactory.platform.errors import DataError

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"

# Package data (pyproject's package-data), not a path into a checkout: an installed wheel
# builds the sample corpus too.
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def manifest_path(corpus_dir: Path) -> Path:
    return Path(corpus_dir) / MANIFEST


def read_manifest(corpus_dir: Path) -> dict[str, Any]:
    """The manifest of a built corpus (written last: it exists only for complete files)."""
    path = manifest_path(corpus_dir)
    if not path.is_file():
        raise DataError(f"{path}: corpus manifest not found (build the corpus first: slmfactory corpus)")
    return json.loads(path.read_text(encoding="utf-8"))


def split_path(corpus_dir: Path, part: str, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {list(SPLITS)}")
    base = Path(corpus_dir)
    if part == "generic":
        if split == "test":
            raise DataError(f"{base / 'generic'}: the generic corpus has only train and valid splits")
        return base / "generic" / f"{split}.parquet"
    return base / "domains" / part / f"{split}.parquet"


def _checked(corpus_dir: Path, part: str, split: str) -> Path:
    path = split_path(corpus_dir, part, split)
    if not path.is_file():
        raise DataError(f"{path}: split not found (build the corpus first: slmfactory corpus)")
    return path


def load_split(corpus_dir: Path, part: str, split: str) -> "datasets.Dataset":
    """One split as a ``datasets.Dataset`` (memory-mapped Arrow, no HF cache writes). Needs the
    ``datasets`` extra (``pip install 'slmfactory[datasets]'``); the platform itself reads splits
    with pyarrow (``iter_texts``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_split returns a datasets.Dataset and needs the `datasets` extra: "
                          "pip install 'slmfactory[datasets]'", name="datasets") from e

    path = _checked(corpus_dir, part, split)
    table = pq.read_table(path, memory_map=True)
    if table.num_rows == 0:
        raise DataError(f"{path}: split is empty")
    return datasets.Dataset(table)


def iter_texts(corpus_dir: Path, part: str, split: str) -> Iterator[str]:
    """Stream the texts of one split, a row group at a time."""
    path = _checked(corpus_dir, part, split)
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: split is empty")
    for batch in pf.iter_batches(columns=["text"], batch_size=1000):
        yield from batch.column(0).to_pylist()


def list_domains(corpus_dir: Path) -> list[str]:
    """Domain names of a built corpus (from its manifest, else from its folders)."""
    base = Path(corpus_dir)
    if manifest_path(base).is_file():
        parts = read_manifest(base)["parts"]
        return sorted({k.split("/")[1] for k in parts if k.startswith("domains/")})
    d = base / "domains"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


# --------------------------------------------------------------------------------------
# What generic holds per domain kind (docs/corpus.md's table)
# --------------------------------------------------------------------------------------

def generic_kinds_table(corpus_dir: Path, tokenizer_dir: Path | None = None) -> str:
    """Two Markdown tables from a built corpus's manifest: per domain kind, its generic
    sources with MB and whitespace words (plus BPE tokens when ``tokenizer_dir``, a trained
    tokenizer, is given: every generic document is tokenized, about a minute for 90 MB on
    2 cores) and what is missing; then per generic source, its kinds, extractor and size."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    bpe: dict[str, int] = {}
    if tokenizer_dir is not None:
        # The tokenizers library itself: slmfactory.data.tokens.tokenizer imports this module.
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        for split in ("train", "valid"):
            pf = pq.ParquetFile(split_path(corpus_dir, "generic", split))
            for batch in pf.iter_batches(columns=["text", "source"], batch_size=500):
                texts, srcs = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                for src, enc in zip(srcs, tok.encode_batch(texts, add_special_tokens=False)):
                    bpe[src] = bpe.get(src, 0) + len(enc.ids)
    tok_col = "BPE tokens | " if bpe else ""
    rows = [f"| kind | generic sources of this kind | MB | words | {tok_col}missing |",
            "|---|---|---:|---:|" + ("---:|" if bpe else "") + "---|"]
    per_source: dict[str, dict] = {}
    for kind, entry in manifest["generic_kinds"].items():
        names = ", ".join(e["name"] for e in entry["sources"]) or "none"
        tokens = sum(bpe.get(s, 0) for s in {e["source"] for e in entry["sources"]})
        rows.append(f"| {kind} | {names} | {entry['bytes'] / 1e6:.1f} | {entry['tokens_ws']:,} | "
                    + (f"{tokens:,} | " if bpe else "") + f"{entry['missing'] or '-'} |")
        for e in entry["sources"]:
            per_source.setdefault(e["name"], {**e, "kinds": []})["kinds"].append(kind)
    parts = [manifest["parts"][f"generic/{s}"] for s in ("train", "valid")]
    rows.append(f"| all generic | {len({s['source'] for p in parts for s in p['sources']})} packages | "
                f"{sum(p['bytes'] for p in parts) / 1e6:.1f} | {sum(p['tokens_ws'] for p in parts):,} | "
                + (f"{sum(bpe.values()):,} | " if bpe else "") + "- |")
    rows += ["", f"| generic source | package | kinds | extractor | MB | {tok_col}",
             "|---|---|---|---|---:|" + ("---:|" if bpe else "")]
    for name, e in sorted(per_source.items(), key=lambda kv: -kv[1]["bytes"]):
        rows.append(f"| {name} | `{e['source']}` | {', '.join(e['kinds'])} | {e['extractor']} | "
                    f"{e['bytes'] / 1e6:.2f} | " + (f"{bpe.get(e['source'], 0):,} |" if bpe else ""))
    return "\n".join(rows)


if __name__ == "__main__":  # python -m slmfactory.data.corpus.store CORPUS_DIR [TOKENIZER_DIR]
    print(generic_kinds_table(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
