"""Corpus inputs besides the pinned packages: a user's own files, and the shipped sample.

A user's files (``import_corpus`` in :mod:`slmfactory.data.corpus.build` builds from them):
``.jsonl`` (one JSON object per line with a ``"text"`` field; optional ``"doc_id"``,
``"source"``), ``.parquet`` (a ``text`` column; optional ``doc_id``/``source``), and
``.txt`` — **one document per file** (long files are cut into parts at ``max_doc_chars``).
The shipped real-text sample (``slmfactory/data/corpus/sample``, built by
``build_sample_corpus``) is in the same ``.jsonl`` format; ``write_sample`` regenerates it
from a real build. Separate from the build: reading and writing these files is format
handling, not placement.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from slmfactory.data.corpus.documents import Doc, bucket, cut_text, sha1
from slmfactory.data.corpus.store import list_domains, read_manifest, split_path
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import write_text_atomic


# --------------------------------------------------------------------------------------
# User corpora
# --------------------------------------------------------------------------------------

def expand_patterns(patterns: list[str]) -> list[Path]:
    """The files of ``patterns`` (paths or globs) in order; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pat in patterns:
        p = Path(pat).expanduser()
        if any(ch in pat for ch in "*?["):
            matches = sorted(Path(m) for m in globlib.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{pat}: no files match this pattern")
            files.extend(matches)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: file not found")
    return files


def read_user_file(path: Path) -> Iterator[Doc]:
    """The documents of one user file (``.jsonl``, ``.parquet``, ``.txt``: see the module docstring)."""
    default_source = f"file:{path.name}"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                        raise DataError(f"{path}:{i}: expected a JSON object with a string field 'text'")
                    yield {"text": r["text"], "source": str(r.get("source") or default_source),
                           **({"doc_id": str(r["doc_id"])} if r.get("doc_id") else {})}
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
    elif suffix == ".parquet":
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for non-parquet bytes
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        cols = pf.schema_arrow.names
        if "text" not in cols:
            raise DataError(f"{path}: expected a 'text' column, found {cols}")
        want = [c for c in ("text", "doc_id", "source") if c in cols]
        for batch in pf.iter_batches(columns=want, batch_size=1000):
            rows = batch.to_pydict()
            for j, text in enumerate(rows["text"]):
                if text is None:
                    continue
                d = {"text": text, "source": (rows.get("source") or [None] * len(rows["text"]))[j] or default_source}
                if rows.get("doc_id") and rows["doc_id"][j]:
                    d["doc_id"] = rows["doc_id"][j]
                yield d
    elif suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
        yield {"text": text, "source": default_source}  # one document per .txt file
    else:
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .parquet or .txt)")


# --------------------------------------------------------------------------------------
# The committed test sample, regenerated from a built corpus
# --------------------------------------------------------------------------------------

def write_sample(corpus_dir: Path, out_dir: Path, domain_bytes: int = 32_000,
                 generic_bytes: int = 125_000, piece_chars: int = 2_500) -> dict[str, int]:
    """Regenerate the committed test sample from a built corpus: for every domain (from its
    train split) and for generic, real documents taken round-robin across sources and cut
    to ~``piece_chars`` at paragraph boundaries. Returns bytes written per file."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(corpus_dir)
    sizes = {}
    for part, budget in [("generic", generic_bytes)] + [(d, domain_bytes) for d in list_domains(corpus_dir)]:
        by_source: dict[str, list[Doc]] = {}
        table = pq.read_table(split_path(corpus_dir, part, "train"))
        for row in sorted(table.to_pylist(), key=lambda r: bucket(0, "sample", r["doc_id"])):
            by_source.setdefault(row["source"], []).append(row)
        picked, total = [], 0
        queues = [by_source[s] for s in sorted(by_source)]
        while total < budget and any(queues):
            for q in queues:
                if not q or total >= budget:
                    continue
                d = q.pop(0)
                piece = cut_text(d["text"], piece_chars)[0]
                if len(piece) < 400:
                    continue
                picked.append({"doc_id": sha1(d["doc_id"] + "\0sample"), "text": piece, "source": d["source"]})
                total += len(piece.encode("utf-8"))
        path = out_dir / f"{part}.jsonl"
        write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in picked))
        sizes[path.name] = path.stat().st_size
    used = {json.loads(line)["source"] for p in out_dir.glob("*.jsonl") for line in open(p, encoding="utf-8")}
    infos = [s for s in manifest["sources"] if s["source"] in used]
    write_text_atomic(out_dir / "sources.json", json.dumps(infos, indent=1, ensure_ascii=False) + "\n")
    return sizes
