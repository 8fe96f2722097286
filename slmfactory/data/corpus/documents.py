"""A corpus document and the rules applied to each one: cleaning, cutting, dedupe, and
the hash that places it.

Steps 1 and 2 of the build (:mod:`slmfactory.data.corpus.build`, whose docstring states
every placement rule) and the helpers every other corpus module shares: ``Doc``, ``bucket``
(all placement decides by it), ``sha1`` (document ids), ``nbytes``. Separate from the build
so that the near-copy check and the user-file readers can use them without importing it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from typing import Any

from slmfactory.platform.errors import DataError

#: A document: ``doc_id``, ``text``, ``source``; after ``prepare`` also ``origin`` (the id
#: of the document a part was cut from), which placement uses and the parquet files omit.
Doc = dict[str, str]


_WS = re.compile(r"[ \t\f\v\r\u00a0]+")


def clean_text(text: str) -> str:
    """Normalise whitespace but keep paragraph structure (models learn from newlines)."""
    text = text.replace("\r\n", "\n").replace("\ufeff", "")
    text = text.replace("\x00", "")
    lines = [_WS.sub(" ", ln).strip() for ln in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def cut_text(text: str, max_chars: int) -> list[str]:
    """Cut at paragraph (else line, else hard) boundaries into parts <= max_chars."""
    if len(text) <= max_chars:
        return [text]
    parts, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, start + max_chars // 2, end)
                if cut != -1:
                    end = cut
                    break
        piece = text[start:end].strip()
        if piece:
            parts.append(piece)
        start = end
    return parts


def sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


def _dedupe_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()


def bucket(seed: int, purpose: str, doc_id: str) -> float:
    """A uniform number in [0, 1) from (seed, purpose, doc_id): deterministic placement."""
    h = hashlib.blake2b(f"{seed}\0{purpose}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def prepare(docs: Iterable[Doc], cfg_c: Any, seen_text: set[bytes], seen_id: set[str],
            where: str) -> Iterator[Doc]:
    """Clean, cut and dedupe one stream of documents.

    Every part carries ``origin``, the id of the document it was cut from, so that
    placement can keep the parts of one document together (dedupe stays per part)."""
    for d in docs:
        if "text" not in d or not isinstance(d["text"], str):
            raise DataError(f"{where}: document without a string 'text' field")
        source = str(d.get("source") or "unknown")
        text = clean_text(d["text"])
        parts = cut_text(text, cfg_c.max_doc_chars)
        base = d.get("doc_id") or sha1(f"{source}\0{' '.join(text.split())}")
        for i, part in enumerate(parts):
            if len(part) < cfg_c.min_doc_chars:
                continue
            doc_id = base if len(parts) == 1 else sha1(f"{base}\0part{i}")
            key = _dedupe_key(part)
            if key in seen_text or doc_id in seen_id:
                continue
            seen_text.add(key)
            seen_id.add(doc_id)
            yield {"doc_id": doc_id, "text": part, "source": source, "origin": base}


def nbytes(d: Doc) -> int:
    return len(d["text"].encode("utf-8"))
