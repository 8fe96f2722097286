"""Near copies between each domain's test split and the generic corpus (MinHash).

The build's rule (step 6 in :mod:`slmfactory.data.corpus.build`): no generic document is a
near copy of a domain's test document. ``near_copies`` finds them before the generic split
is written, ``drop_near_copies`` removes them, ``near_duplicate_manifest`` is what the
manifest says about it; ``near_duplicate_report`` checks a built corpus afterwards.
Separate from the build because it is one self-contained method (datasketch MinHash and
LSH, word shingles, a threshold) that the build only calls.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from slmfactory.data.corpus.documents import Doc, bucket, nbytes
from slmfactory.data.corpus.store import split_path

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
        n_bytes += nbytes(g)
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



def drop_near_copies(generic: list[Doc], near: dict[str, list[tuple[str, str, float]]]
                     ) -> tuple[list[Doc], list[Doc]]:
    """``generic`` without every document (all its parts) that ``near_copies`` found to be
    a near copy of a test document; also returns what was removed."""
    origin_of = {d["doc_id"]: d["origin"] for d in generic}
    dropped = {origin_of[g] for hits in near.values() for _, g, _ in hits}
    removed = [d for d in generic if d["origin"] in dropped]
    return [d for d in generic if d["origin"] not in dropped], removed


def near_duplicate_manifest(near: dict[str, list[tuple[str, str, float]]], tests: dict[str, list[Doc]],
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
                      "generic_bytes": sum(nbytes(r) for r in removed if r["doc_id"] in mine),
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
