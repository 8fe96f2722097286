"""Corpus builder: layout, disjointness, determinism, manifest, user imports, bad input.

Everything runs on the committed real-text sample (slmfactory/data/corpus/sample, package data), no network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slmfactory.data.corpus import store as C
from slmfactory.data.corpus import build as B
from slmfactory.data.corpus import documents as D
from slmfactory.data.corpus import near_copies as N
from slmfactory.platform.config import CorpusConfig, RunConfig
from slmfactory.platform.errors import DataError

SAMPLE = C.SAMPLE_DIR
EXPECTED_DOMAINS = ["biomedical", "code", "dictionary", "legal", "literature", "math", "religion", "technical"]


def _cfg(workdir: Path, **corpus) -> RunConfig:
    return RunConfig(workdir=str(workdir), corpus=CorpusConfig(**corpus))


def _all_parts(corpus_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for p in sorted(corpus_dir.rglob("*.parquet")):
        out[str(p.relative_to(corpus_dir).with_suffix(""))] = pq.read_table(p).to_pylist()
    return out


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    cfg = _cfg(root)
    manifest = B.build_sample_corpus(cfg)
    return cfg, manifest


def test_sample_is_real_and_small():
    files = sorted(SAMPLE.glob("*.jsonl"))
    assert {f.stem for f in files} == {"generic", *EXPECTED_DOMAINS}
    assert sum(f.stat().st_size for f in files) <= 500_000
    for f in files:
        rows = [json.loads(line) for line in f.open(encoding="utf-8")]
        assert len(rows) >= 10, f
        assert all(r["text"].strip() and r["source"].startswith(("deb:", "pypi:")) for r in rows)
    licences = (SAMPLE / "LICENSES.md").read_text(encoding="utf-8")
    used = {json.loads(line)["source"] for f in files for line in f.open(encoding="utf-8")}
    for s in used:  # every source the sample uses has its licence listed
        assert s in licences, s


def test_layout_and_domains(sample_build):
    cfg, manifest = sample_build
    d = cfg.corpus_dir
    assert C.list_domains(d) == EXPECTED_DOMAINS
    assert (d / "generic" / "train.parquet").is_file() and (d / "generic" / "valid.parquet").is_file()
    for name in EXPECTED_DOMAINS:
        for split in ("train", "valid", "test"):
            ds = C.load_split(d, name, split)
            assert len(ds) > 0 and ds.column_names == ["doc_id", "text", "source"]
            assert manifest["parts"][f"domains/{name}/{split}"]["docs"] == len(ds)
    texts = list(C.iter_texts(d, "generic", "train"))
    assert len(texts) == manifest["parts"]["generic/train"]["docs"] > 0
    assert all(isinstance(t, str) and len(t) >= cfg.corpus.min_doc_chars for t in texts)


def test_every_document_in_exactly_one_place(sample_build):
    cfg, _ = sample_build
    parts = _all_parts(cfg.corpus_dir)
    seen_ids: dict[str, str] = {}
    seen_texts: dict[str, str] = {}
    for part, rows in parts.items():
        for r in rows:
            norm = " ".join(r["text"].split())
            assert r["doc_id"] not in seen_ids, (r["doc_id"], part, seen_ids.get(r["doc_id"]))
            assert norm not in seen_texts, (part, seen_texts.get(norm))
            seen_ids[r["doc_id"]] = part
            seen_texts[norm] = part
    # Generic receives a share of domain-kind documents, but never one also in a domain.
    generic_ids = {r["doc_id"] for p, rows in parts.items() if p.startswith("generic") for r in rows}
    domain_ids = {r["doc_id"] for p, rows in parts.items() if p.startswith("domains") for r in rows}
    assert generic_ids and domain_ids and not generic_ids & domain_ids


def test_manifest_sha256_and_counts(sample_build):
    cfg, manifest = sample_build
    on_disk = json.loads((cfg.corpus_dir / "manifest.json").read_text())
    assert on_disk["parts"] == manifest["parts"]
    for key, part in manifest["parts"].items():
        path = cfg.corpus_dir / f"{key}.parquet"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == part["sha256"], key
        texts = pq.read_table(path).column("text").to_pylist()
        assert part["bytes"] == sum(len(t.encode()) for t in texts)
        assert part["tokens_ws"] == sum(len(t.split()) for t in texts)
        assert part["sources"] and all(s["licence"] for s in part["sources"])


def test_split_is_deterministic_and_seed_dependent(sample_build, tmp_path):
    _, first = sample_build
    again = B.build_sample_corpus(_cfg(tmp_path / "a"))
    assert {k: v["sha256"] for k, v in again["parts"].items()} == \
        {k: v["sha256"] for k, v in first["parts"].items()}
    other = B.build_sample_corpus(_cfg(tmp_path / "b", seed=7))
    assert {k: v["sha256"] for k, v in other["parts"].items()} != \
        {k: v["sha256"] for k, v in first["parts"].items()}


def test_domain_selection_and_unknown_domain(tmp_path):
    m = B.build_sample_corpus(_cfg(tmp_path / "sel", domains=("legal", "math")))
    assert sorted({k.split("/")[1] for k in m["parts"] if k.startswith("domains/")}) == ["legal", "math"]
    with pytest.raises(DataError, match="unknown domain 'nosuch'"):
        B.build_sample_corpus(_cfg(tmp_path / "bad", domains=("nosuch",)))
    with pytest.raises(DataError, match="unknown domain 'nosuch'"):
        B.build_corpus(_cfg(tmp_path / "bad2", domains=("nosuch",)), progress=False)


def test_source_catalogue_has_eight_domains_with_pinned_sources():
    assert sorted(B.DOMAINS) == EXPECTED_DOMAINS
    for name, sources in B.DOMAINS.items():
        for s in sources:
            assert s.version and s.licence and s.kind in ("deb", "pypi"), (name, s)


def _write_inputs(tmp_path: Path) -> dict[str, Path]:
    """Real sample text split across the three input formats."""
    rows = {f.stem: [json.loads(line) for line in f.open(encoding="utf-8")] for f in SAMPLE.glob("*.jsonl")}
    inp = tmp_path / "in"
    (inp / "gen").mkdir(parents=True)
    # generic: half as jsonl (text field only), half as parquet
    gen = rows["generic"]
    with open(inp / "gen" / "a.jsonl", "w", encoding="utf-8") as f:
        for r in gen[: len(gen) // 2]:
            f.write(json.dumps({"text": r["text"]}) + "\n")
    pq.write_table(pa.table({"text": [r["text"] for r in gen[len(gen) // 2:]]}), inp / "gen" / "b.parquet")
    # a domain as one .txt file per document
    (inp / "law").mkdir()
    for i, r in enumerate(rows["legal"]):
        (inp / "law" / f"doc{i:02d}.txt").write_text(r["text"], encoding="utf-8")
    # a domain as parquet with its own doc_id/source columns
    pq.write_table(pa.table({"doc_id": [r["doc_id"] for r in rows["religion"]],
                             "text": [r["text"] for r in rows["religion"]],
                             "source": [r["source"] for r in rows["religion"]]}), inp / "rel.parquet")
    return {"root": inp, "legal_count": len(rows["legal"])}


def test_a_rebuild_in_the_same_workdir_replaces_every_part_whole(tmp_path):
    first = B.build_sample_corpus(_cfg(tmp_path / "w", domains=("legal", "math")))
    again = B.build_sample_corpus(_cfg(tmp_path / "w", domains=("legal",)))
    corpus_dir = _cfg(tmp_path / "w").corpus_dir
    assert C.list_domains(corpus_dir) == ["legal"]  # the dropped domain's folder went with the old parts
    assert sorted(p.name for p in corpus_dir.iterdir() if p.name.startswith(".")) == []  # no staging left
    files = sorted(str(p.relative_to(corpus_dir)) for p in corpus_dir.rglob("*.parquet"))
    assert files == sorted(f"{k}.parquet" for k in again["parts"]) and set(again["parts"]) < set(first["parts"])


def test_import_corpus_formats_and_globs(tmp_path):
    info = _write_inputs(tmp_path)
    inp = info["root"]
    cfg = _cfg(tmp_path / "w")
    m = B.import_corpus(cfg, [str(inp / "gen" / "*")], {"law": [str(inp / "law" / "*.txt")],
                                                        "bible": [str(inp / "rel.parquet")]})
    assert C.list_domains(cfg.corpus_dir) == ["bible", "law"]
    law_docs = sum(m["parts"][f"domains/law/{s}"]["docs"] for s in ("train", "valid", "test"))
    law_in_generic = len(m["parts"]) and info["legal_count"] - law_docs  # generic_share moves some
    assert law_docs >= 3 and law_in_generic >= 0
    for s in ("train", "valid", "test"):
        assert len(C.load_split(cfg.corpus_dir, "law", s)) > 0
    # .txt: one document per file, source names the file
    src = {r for r in C.load_split(cfg.corpus_dir, "law", "train")["source"]}
    assert all(s.startswith("file:doc") and s.endswith(".txt") for s in src)
    # parquet doc_id/source columns are kept
    rel = C.load_split(cfg.corpus_dir, "bible", "train")
    assert all(s.startswith("deb:sword") for s in rel["source"])
    assert m["parts"]["generic/train"]["docs"] + m["parts"]["generic/valid"]["docs"] >= 50


def test_import_errors(tmp_path):
    info = _write_inputs(tmp_path)
    inp = info["root"]
    cfg = _cfg(tmp_path / "w")
    gen = [str(inp / "gen" / "*")]
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        B.import_corpus(cfg, [str(missing)], {})
    with pytest.raises(DataError, match="no files match"):
        B.import_corpus(cfg, [str(tmp_path / "zzz" / "*.jsonl")], {})
    bad = inp / "law" / "doc03.txt"
    bad.write_bytes(b"Valid start of a licence text, then a Latin-1 byte: caf\xe9 " * 10)
    with pytest.raises(DataError, match=r"doc03\.txt: not UTF-8"):
        B.import_corpus(cfg, gen, {"law": [str(inp / "law" / "*.txt")]})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty"):
        B.import_corpus(cfg, [str(empty)], {})
    with pytest.raises(DataError, match="generic corpus: empty"):  # documents, but all too short
        B.import_corpus(cfg, [str(tmp_path / "short.jsonl")], {})
    with pytest.raises(DataError, match="no documents"):
        B.import_corpus(cfg, gen, {"tiny": [str(short)]})
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x" * 500}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nofield\.jsonl:1: expected a JSON object"):
        B.import_corpus(cfg, [str(nofield)], {})
    with pytest.raises(DataError, match="unknown domain 'x'"):
        B.import_corpus(_cfg(tmp_path / "w2", domains=("x",)), gen, {"law": [str(inp / "law" / "doc00.txt")]})
    # a failed import never leaves a half-written corpus behind
    assert not (cfg.corpus_dir / "manifest.json").exists()


def test_missing_split_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "domains" / "legal" / "train.parquet")):
        C.load_split(tmp_path, "legal", "train")
    with pytest.raises(DataError, match="train.parquet"):
        list(C.iter_texts(tmp_path, "generic", "train"))


def test_cleaning_cutting_and_dedupe(tmp_path):
    base = (SAMPLE / "literature.jsonl").open(encoding="utf-8").readline()
    text = json.loads(base)["text"]
    long_text = "\n\n".join(f"Paragraph {i}. " + text for i in range(10))
    # Distinct doc_ids, so only the text-based dedupe can catch the duplicates.
    generic = [{"doc_id": "g0", "text": long_text, "source": "t"},
               {"doc_id": "g1", "text": "  ".join(text.split(" ")), "source": "t"},  # whitespace-only dup
               {"doc_id": "g2", "text": text, "source": "u"}]
    # The domain's source differs from generic's "t": one source on both sides is one
    # collection, whose generic copy would be left out (test_generic_holds_no_domain_collection).
    # Other texts than generic's: a near copy of a domain's test document is dropped from generic.
    others = [json.loads(line)["text"] for line in (SAMPLE / "religion.jsonl").open(encoding="utf-8")][:12]
    dom = [{"text": f"Scene {i}.\n\n\n\n" + others[i], "source": "d"} for i in range(12)]
    cfg = _cfg(tmp_path, max_doc_chars=5000, generic_share=0.0)
    m = B.build_from_documents(cfg, generic, {"d": dom}, [{"source": "t", "package": "t", "version": "1",
                                                           "licence": "PD"}])
    gen = pq.read_table(cfg.corpus_dir / "generic" / "train.parquet").to_pylist() + \
        pq.read_table(cfg.corpus_dir / "generic" / "valid.parquet").to_pylist()
    assert all(len(r["text"]) <= 5000 for r in gen)
    assert len(gen) >= 3  # the long document was cut into parts; the duplicates collapsed to one
    assert sum(" ".join(r["text"].split()) == " ".join(text.split()) for r in gen) == 1
    dom_rows = [r for s in ("train", "valid", "test") for r in C.load_split(cfg.corpus_dir, "d", s)]
    assert len(dom_rows) == 12 and all("\n\n\n" not in r["text"] for r in dom_rows)
    assert m["sources"][0] == {"source": "t", "package": "t", "version": "1", "licence": "PD"}


def test_domain_cap_moves_overflow_to_generic(tmp_path):
    rows = [json.loads(line) for line in (SAMPLE / "dictionary.jsonl").open(encoding="utf-8")]
    gen = [json.loads(line) for line in (SAMPLE / "generic.jsonl").open(encoding="utf-8")]
    cfg = _cfg(tmp_path, generic_share=0.0, domain_overflow_to_generic=True)
    m = B.build_from_documents(cfg, gen, {"dictionary": rows}, [], domain_cap_bytes=12_000, progress=False)
    kept = sum(m["parts"][f"domains/dictionary/{s}"]["bytes"] for s in ("train", "valid", "test"))
    assert kept <= 12_000
    # Every document is placed once, except the sample's generic documents of the dictionary
    # domain's own sources (GCIDE, WordNet, FOLDOC, Jargon): one collection, one side.
    dict_sources = {r["source"] for r in rows}
    skipped = sum(r["source"] in dict_sources for r in gen)
    assert skipped > 0 and sum(e["docs"] for e in m["generic_excluded"]) == skipped
    total_docs = sum(p["docs"] for p in m["parts"].values())
    assert total_docs == len(rows) + len(gen) - skipped


def test_no_debian_tools_skips_debian_domains(tmp_path, monkeypatch, capsys):
    """Without apt-get the builder names the Debian domains it skips and builds the rest;
    here the PyPI fetch is stubbed to fail so nothing touches the network."""
    monkeypatch.setattr(B, "have_debian_tools", lambda: False)

    def no_network(src, cache):
        raise DataError(f"{src.source}: offline in tests")

    monkeypatch.setattr(B, "extract_cached", no_network)
    with pytest.raises(DataError, match="offline in tests"):
        B.build_corpus(_cfg(tmp_path, domains=("legal", "math")), progress=False)
    err = capsys.readouterr().err
    assert "skipping Debian-sourced domains ['math']" in err
    with pytest.raises(DataError, match="apt-get/dpkg are missing"):
        B.build_corpus(_cfg(tmp_path, domains=("math",)), progress=False)


def test_fetch_uses_cache_and_never_refetches(tmp_path, monkeypatch):
    """A rerun after a kill finds downloads, unpacked folders and extractions in the cache."""
    from slmfactory.data.corpus import sources as S

    def boom(*a, **k):
        raise AssertionError("must not run a download: the file is cached")

    monkeypatch.setattr(S.subprocess, "run", boom)
    (tmp_path / "deb").mkdir()
    deb = tmp_path / "deb" / "wordnet-base_1%3a3.0-37_all.deb"
    deb.write_bytes(b"x")
    assert S.fetch_deb("wordnet-base", "1:3.0-37", tmp_path) == deb
    (tmp_path / "pypi").mkdir()
    whl = tmp_path / "pypi" / "scancode_toolkit-32.5.0-cp311-none-any.whl"
    whl.write_bytes(b"x")
    assert S.fetch_pypi("scancode-toolkit", "32.5.0", tmp_path) == whl
    # a finished unpack folder is reused; a leftover temporary one is ignored
    (tmp_path / "unpacked" / whl.name).mkdir(parents=True)
    (tmp_path / "unpacked" / ".tmp-killed").mkdir()
    assert S.unpack(whl, tmp_path) == tmp_path / "unpacked" / whl.name
    src = B.DOMAINS["legal"][0]
    done = S.extracted_path(src, tmp_path)
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"key": "k", "text": "t"}) + "\n")
    assert S.extract_cached(src, tmp_path) == done


def test_markup_cleaners():
    from slmfactory.data.corpus import extractors as S

    html_text = S.html_to_text("<html><head><title>T</title><style>p{}</style></head><body>"
                               "<p>Prev&nbsp;Up&nbsp;Next</p><h1>Title</h1><p>A &amp; B<br>c</p>"
                               "<script>var x;</script></body></html>")
    assert html_text == "Title\n\nA & B\n\nc"
    pod = S.pod_to_text("=head1 NAME\n\nperlfoo - B<bold> and C<< $x->y >> text\n\n=begin html\n\n<p>x</p>\n\n=end html\n")
    assert "NAME" in pod and "bold and $x->y text" in pod and "<p>" not in pod
    rst = S.rst_to_text("Title\n=====\n\n.. function:: open(file)\n   :noindex:\n\n   See :func:`os.open` "
                        "and `docs <http://x>`_.\n   :const:`A` or ``B``.\n")
    assert "=====" not in rst and "open(file)" in rst and "See os.open and docs." in rst and "A or B." in rst
    gut = S.strip_gutenberg("Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody text\n"
                            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence")
    assert gut.strip() == "Body text"
    chunks = S.chunk_paragraphs("\n\n".join(["p" * 40] * 10), 100)
    assert len(chunks) == 5 and all(len(c) <= 100 for c in chunks)


def _sample_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / f"{name}.jsonl").open(encoding="utf-8")]


def _books(domain: str, sample_names: list[str], rows_per_book: int = 5) -> list[dict]:
    """Long multi-section documents (~10k chars) made of consecutive real sample texts, one
    source per book, so that a small ``max_doc_chars`` cuts every book into several parts."""
    rows = [r for n in sample_names for r in _sample_rows(n)]
    return [{"doc_id": f"{domain}-book{i:02d}", "source": f"{domain}:book{i:02d}",
             "text": "\n\n".join(r["text"] for r in rows[i * rows_per_book:(i + 1) * rows_per_book])}
            for i in range(len(rows) // rows_per_book)]


BOOK_DOMAINS = {"reference": ["biomedical", "dictionary", "legal", "math"],
                "prose": ["literature", "religion", "technical", "code"]}


def _placement(corpus_dir: Path, docs: list[dict]) -> dict[str, dict[str, int]]:
    """For every input document: the parquet part (e.g. ``domains/prose/test``) each of its
    cut parts landed in -> how many parts. Parts are traced back by text containment."""
    cleaned = {d["doc_id"]: D.clean_text(d["text"]) for d in docs}
    where: dict[str, dict[str, int]] = {d["doc_id"]: {} for d in docs}
    for part, rows in _all_parts(corpus_dir).items():
        for r in rows:
            owners = [i for i, t in cleaned.items() if r["text"] in t]
            assert len(owners) == 1, (part, r["text"][:80], owners)
            where[owners[0]][part] = where[owners[0]].get(part, 0) + 1
    return where


def test_cut_documents_stay_in_one_place(tmp_path):
    """Leakage: the parts of one long document (chapters of one book) must never be spread
    over train and test, or over a domain and generic (share, cap overflow, generic valid)."""
    gen = _sample_rows("generic")
    domains = {d: _books(d, names) for d, names in BOOK_DOMAINS.items()}
    cfg = _cfg(tmp_path, max_doc_chars=2000, generic_share=0.2, domain_overflow_to_generic=True)
    m = B.build_from_documents(cfg, gen, domains, [], domain_cap_bytes=60_000, progress=False)
    all_docs = gen + [b for books in domains.values() for b in books]
    where = _placement(cfg.corpus_dir, all_docs)
    books = [b for v in domains.values() for b in v]
    assert len(books) >= 20 and all(sum(where[b["doc_id"]].values()) >= 4 for b in books)  # really cut
    for doc_id, places in where.items():
        assert len(places) == 1, (doc_id, places)  # all parts in exactly one split of one place
    # The build exercised every route: each domain's splits, its random share and its overflow.
    for name, books_of in domains.items():
        placed = {next(iter(where[b["doc_id"]])) for b in books_of}
        assert {f"domains/{name}/{s}" for s in ("train", "valid", "test")} <= placed, placed
        assert placed & {"generic/train", "generic/valid"}, placed
        assert m["domain_to_generic"][name]["share_docs"] > 0
        assert m["domain_to_generic"][name]["overflow_docs"] > 0
        kept = sum(m["parts"][f"domains/{name}/{s}"]["bytes"] for s in ("train", "valid", "test"))
        assert kept <= 60_000


def _generic_rows(corpus_dir: Path) -> list[dict]:
    return [r for s in ("train", "valid") for r in C.load_split(corpus_dir, "generic", s)]


def test_manifest_reports_domain_to_generic(tmp_path):
    from slmfactory.platform.config import load_config
    from slmfactory.platform.errors import ConfigError

    gen = _sample_rows("generic")
    domains = {d: _books(d, names) for d, names in BOOK_DOMAINS.items()}
    # Both routes are opt-in: by default no domain text reaches generic, where importance
    # sampling would pick near-copies of the domain's test split.
    assert CorpusConfig().generic_share == 0.0 and CorpusConfig().domain_overflow_to_generic is False
    cfg = load_config(None, {"workdir": str(tmp_path / "a"), "corpus.max_doc_chars": 2000,
                             "corpus.generic_share": 0.3, "corpus.domain_overflow_to_generic": True})
    m = B.build_from_documents(cfg, gen, domains, [], domain_cap_bytes=40_000, progress=False)
    assert json.loads((cfg.corpus_dir / "manifest.json").read_text())["domain_to_generic"] == m["domain_to_generic"]
    generic = _generic_rows(cfg.corpus_dir)
    total_parts = sum(p["docs"] for p in m["parts"].values())
    for name in domains:
        rep = m["domain_to_generic"][name]
        assert set(rep) == {"share_docs", "share_bytes", "overflow_docs", "overflow_bytes",
                            "dropped_docs", "dropped_bytes"}
        mine = [r for r in generic if r["source"].startswith(f"{name}:")]
        assert rep["share_docs"] > 0 and rep["overflow_docs"] > 0 and rep["dropped_docs"] == 0
        assert rep["share_docs"] + rep["overflow_docs"] == len(mine)
        assert rep["share_bytes"] + rep["overflow_bytes"] == sum(len(r["text"].encode()) for r in mine)
    assert total_parts == len(generic) + sum(
        m["parts"][f"domains/{d}/{s}"]["docs"] for d in domains for s in ("train", "valid", "test"))

    # A recipe can keep every domain source out of generic: no share, overflow dropped.
    cfg = load_config(None, {"workdir": str(tmp_path / "b"), "corpus.max_doc_chars": 2000,
                             "corpus.generic_share": 0.0, "corpus.domain_overflow_to_generic": False})
    m = B.build_from_documents(cfg, gen, domains, [], domain_cap_bytes=40_000, progress=False)
    generic = _generic_rows(cfg.corpus_dir)
    assert not [r for r in generic if r["source"].startswith(tuple(f"{d}:" for d in domains))]
    assert m["config"]["domain_overflow_to_generic"] is False
    for name in domains:
        rep = m["domain_to_generic"][name]
        assert rep["share_docs"] == rep["overflow_docs"] == rep["overflow_bytes"] == 0
        assert rep["dropped_docs"] > 0 and rep["dropped_bytes"] > 0
        kept = sum(m["parts"][f"domains/{name}/{s}"]["docs"] for s in ("train", "valid", "test"))
        all_parts = sum(len([p for p in D.cut_text(D.clean_text(b["text"]), 2000)
                             if len(p) >= cfg.corpus.min_doc_chars]) for b in domains[name])
        assert kept + rep["dropped_docs"] == all_parts
    with pytest.raises(ConfigError, match="corpus.domain_overflow_to_generic"):
        load_config(None, {"corpus.domain_overflow_to_generic": "no"})


# -- generic text holds no domain's own sources ------------------------------------------

def test_generic_holds_no_domain_collection(sample_build):
    """By default (no share, no overflow, one collection on one side) no generic document
    comes from a built domain's collection. Today's sample generic file carries documents of
    every domain's packages (the old share and overflow), so the guard is exercised."""
    from slmfactory.data.corpus.sources import collection_of

    cfg, m = sample_build
    parts = _all_parts(cfg.corpus_dir)
    dom_sources = {r["source"] for k, rows in parts.items() if k.startswith("domains/") for r in rows}
    dom_collections = {collection_of(s) for s in dom_sources}
    generic = parts["generic/train"] + parts["generic/valid"]
    assert not [r["source"] for r in generic if r["source"] in dom_sources]
    assert not [r["source"] for r in generic if collection_of(r["source"]) in dom_collections]
    # The manifest says what was left out and why: here scancode's (legal) and GCIDE's
    # (dictionary) generic copies among others, each with its collection and domain.
    excluded = {e["source"]: e for e in m["generic_excluded"]}
    assert excluded["pypi:scancode-toolkit==32.5.0"]["collection"] == "scancode-licensedcode"
    assert excluded["pypi:scancode-toolkit==32.5.0"]["domains"] == ["legal"]
    assert excluded["deb:dict-gcide=0.48.5+nmu2"]["domains"] == ["dictionary"]
    sample_generic = _sample_rows("generic")
    assert sum(e["docs"] for e in excluded.values()) == sum(r["source"] in dom_sources for r in sample_generic)
    assert all(v == 0 for rep in m["domain_to_generic"].values() for k, v in rep.items() if not k.startswith("dropped"))
    # ... and the tiny recipes still have generic text to pretrain and cluster on.
    assert len(generic) >= 20 and sum(len(r["text"]) for r in generic) >= 40_000


def test_generic_plan_keeps_each_collection_on_one_side():
    """The real build's plan: scancode's licence rules are generic text only while `legal`
    (scancode's licence texts) is not built, the SWORD modules only while `religion` is not;
    every source names its collection."""
    from slmfactory.data.corpus.sources import DOMAIN_SOURCES, GENERIC_SOURCES, generic_plan

    kept, excluded = generic_plan(["legal", "biomedical", "code"])  # the demo's domains
    assert [e["name"] for e in excluded] == ["scancode-rules"]
    assert excluded[0]["collection"] == "scancode-licensedcode" and excluded[0]["domains"] == ["legal"]
    assert "scancode-rules" not in {s.name for s in kept}
    kept, excluded = generic_plan(["religion"])
    assert {e["name"] for e in excluded} == {"sword-kjv", "sword-scofield", "strongs-greek", "strongs-hebrew"}
    every = list(GENERIC_SOURCES) + [s for v in DOMAIN_SOURCES.values() for s in v]
    assert all(s.collection and s.version and s.extractor for s in every)
    for name in DOMAIN_SOURCES:  # whatever is built, no kept generic source shares a collection
        kept, _ = generic_plan([name])
        assert not {s.collection_name for s in kept} & {s.collection_name for s in DOMAIN_SOURCES[name]}


def test_generic_holds_the_sources_of_unbuilt_domains(tmp_path):
    """Generic is every registered source whose collection is not a built domain's: the
    math manuals and the SWORD modules are generic text in a run of legal, biomedical and
    code, in the real plan and in a sample build."""
    from slmfactory.data.corpus.sources import DOMAIN_SOURCES, generic_plan

    kept, _ = generic_plan(["legal", "biomedical", "code"])
    names = {s.name for s in kept}
    for d in ("math", "religion", "literature", "dictionary", "technical"):
        assert {s.name for s in DOMAIN_SOURCES[d]} <= names, d
    assert not names & {s.name for d in ("legal", "biomedical", "code") for s in DOMAIN_SOURCES[d]}

    cfg = _cfg(tmp_path, domains=("legal", "biomedical", "code"))
    m = B.build_sample_corpus(cfg)
    generic = {r["source"] for r in _generic_rows(cfg.corpus_dir)}
    for d in ("math", "religion"):
        assert {r["source"] for r in _sample_rows(d)} <= generic, d
    assert sorted(k.split("/")[1] for k in m["parts"] if k.endswith("/test")) == ["biomedical", "code", "legal"]


def test_manifest_names_same_kind_generic_sources(tmp_path):
    """Per domain kind the manifest lists the generic sources of that kind with their
    extractor and size, and says what is missing: code has CPython's docstrings and
    technical the man pages beside them; biomedical has nothing, with the reason."""
    cfg = _cfg(tmp_path, domains=("biomedical", "code", "technical"))
    m = B.build_sample_corpus(cfg)
    kinds = m["generic_kinds"]
    assert set(kinds) == set(EXPECTED_DOMAINS)
    by_name = {k: {e["name"]: e for e in v["sources"]} for k, v in kinds.items()}
    stdlib = by_name["code"]["python-stdlib"]
    assert stdlib["extractor"].startswith("ast") and stdlib["collection"] == "cpython"
    assert stdlib["bytes"] > 0 and stdlib["docs"] > 0
    generic = _generic_rows(cfg.corpus_dir)
    assert stdlib["bytes"] == sum(len(r["text"].encode()) for r in generic if r["source"] == stdlib["source"])
    assert by_name["technical"]["manpages"]["extractor"].startswith("groff")
    assert kinds["biomedical"]["sources"] == [] and "no sizeable biomedical text" in kinds["biomedical"]["missing"]
    assert kinds["math"]["sources"] and kinds["math"]["bytes"] > 0  # an unbuilt domain's own sources
    assert kinds["code"]["missing"] == ""
    table = C.generic_kinds_table(cfg.corpus_dir)  # docs/corpus.md's table
    assert "| biomedical | none |" in table and "| python-stdlib | `deb:libpython3.11-stdlib" in table
    # The registry tags new sources of each study domain's kind from other collections.
    from slmfactory.data.corpus.sources import generic_plan

    kept, _ = generic_plan(["legal", "biomedical", "literature", "code", "dictionary", "technical"])
    of_kind = {k: {s.name for s in kept if k in s.kinds} for k in EXPECTED_DOMAINS}
    assert {"sword-kjv", "devils-dictionary"} <= of_kind["literature"]
    assert {"devils-dictionary", "vera", "strongs-greek"} <= of_kind["dictionary"]
    assert {"pandas-doc", "sklearn-doc", "python-stdlib"} <= of_kind["code"]
    assert of_kind["legal"] == {"doc-debian"} and of_kind["biomedical"] == set()


def test_generic_source_budget(tmp_path):
    """``corpus.generic_source_max_bytes`` bounds each generic source (whole documents,
    hash-chosen), says what it left out, and is part of the real build's key."""
    from slmfactory.platform.config import load_config
    from slmfactory.platform.errors import ConfigError

    cfg = _cfg(tmp_path / "a", domains=("legal",), generic_source_max_bytes=6_000)
    m = B.build_sample_corpus(cfg)
    sizes: dict[str, int] = {}
    for r in _generic_rows(cfg.corpus_dir):
        sizes[r["source"]] = sizes.get(r["source"], 0) + len(r["text"].encode())
    assert sizes and max(sizes.values()) <= 6_000
    assert m["generic_capped"] and all(v["dropped_bytes"] > 0 and v["kept_bytes"] == sizes[k]
                                       for k, v in m["generic_capped"].items())
    whole = B.build_sample_corpus(_cfg(tmp_path / "b", domains=("legal",)))
    assert whole["generic_capped"] == {}
    assert whole["parts"]["generic/train"]["bytes"] > m["parts"]["generic/train"]["bytes"]
    assert B.build_key(cfg) != B.build_key(_cfg(tmp_path / "a", domains=("legal",)))
    assert B.build_key(cfg) == B.build_key(_cfg(tmp_path / "elsewhere", domains=("legal",),
                                                generic_source_max_bytes=6_000, cache_dir="/other"))
    assert B.corpus_is_current(cfg)  # the sample has no build key: it is kept as it is
    manifest_path = cfg.corpus_dir / "manifest.json"
    on_disk = json.loads(manifest_path.read_text())
    # A package build from before build keys (it has a domain cap) is stale; a keyed one is
    # current only under the settings it was built with.
    manifest_path.write_text(json.dumps({**on_disk, "config": {**on_disk["config"], "domain_cap_bytes": 12}}))
    assert not B.corpus_is_current(cfg)
    manifest_path.write_text(json.dumps({**on_disk, "build_key": B.build_key(cfg)}))
    assert B.corpus_is_current(cfg)
    assert not B.corpus_is_current(_cfg(tmp_path / "a", domains=("legal",), generic_source_max_bytes=7_000))
    with pytest.raises(ConfigError, match="corpus.generic_source_max_bytes"):
        load_config(None, {"corpus.generic_source_max_bytes": -1})


def test_near_copy_planted_in_generic_is_caught_and_dropped(tmp_path, monkeypatch):
    """0 near copies of a domain's test documents in generic is the rule, whatever generic's
    size: a generic copy of one legal test document with two words changed (Jaccard of
    5-gram sets ~0.97, far above 0.5; MinHash is seeded, so the outcome is fixed) is found
    and dropped from generic, even when generic is larger than the byte bound under which
    the on-disk report scans everything (here lowered to 20 kB)."""
    monkeypatch.setattr(N, "NEAR_DUP_MAX_GENERIC_BYTES", 20_000)
    legal = _sample_rows("legal")
    generic = [r for r in _sample_rows("generic") if not r["source"].startswith("pypi:scancode")]
    cfg = _cfg(tmp_path / "a")
    m = B.build_from_documents(cfg, generic, {"legal": legal}, [], progress=False)
    rep = m["near_duplicates"]["legal"]
    test_rows = C.load_split(cfg.corpus_dir, "legal", "test").to_list()
    assert rep["test_docs"] == len(test_rows) >= 1 and rep["near_dup_docs"] == 0
    assert rep["method"]["num_perm"] == 128 and rep["method"]["threshold"] == 0.5
    assert "datasketch" in rep["method"]["library"] and rep["method"]["generic_fraction_scanned"] == 1.0
    assert json.loads((cfg.corpus_dir / "manifest.json").read_text())["near_duplicates"] == m["near_duplicates"]
    kept_before = m["parts"]["generic/train"]["docs"] + m["parts"]["generic/valid"]["docs"]
    assert rep["method"]["generic_docs_scanned"] == kept_before + rep["removed_from_generic"]["generic_docs"]

    target = max(test_rows, key=lambda r: len(r["text"]))
    words = target["text"].split(" ")
    assert len(words) > 200
    words[10], words[-10] = "PLANTED", "EDIT"
    planted = {"doc_id": "planted-copy", "text": " ".join(words), "source": "file:planted.jsonl"}
    cfg = _cfg(tmp_path / "b")
    m = B.build_from_documents(cfg, generic + [planted], {"legal": legal}, [], progress=False)
    rep = m["near_duplicates"]["legal"]
    assert rep["near_dup_docs"] == 0 and rep["fraction"] == 0.0
    removed = rep["removed_from_generic"]
    assert removed["generic_docs"] >= 1 and removed["test_docs_matched"] >= 1
    assert (target["doc_id"], "planted-copy") in {(t, g) for t, g, _ in removed["examples"]}
    written = _generic_rows(cfg.corpus_dir)
    assert "planted-copy" not in {r["doc_id"] for r in written} and len(written) == kept_before
    # The written corpus, checked on its own with every generic byte scanned: no near copy.
    after = N.near_duplicate_report(cfg.corpus_dir, ["legal"], max_generic_bytes=10**12)
    assert after["legal"]["near_dup_docs"] == 0 and after["legal"]["method"]["generic_fraction_scanned"] == 1.0


def test_extractors_parse_markup_with_lxml():
    """HTML and SWORD's OSIS/ThML/TEI go through lxml's parsers: an XML declaration, comments,
    nested navigation and notes go, entities (HTML's named ones in ThML too) are decoded."""
    from slmfactory.data.corpus import extractors as X

    page = ('<?xml version="1.0" encoding="utf-8"?><!DOCTYPE html><html><head><title>T</title></head><body>'
            '<nav><ul><li>Home</li></ul></nav><!-- c --><h2>Caf&eacute; &lt;b&gt;</h2><div>one<p>two</p>three</div>'
            '</body></html>')
    assert X.html_to_text(page) == "Café <b>\n\none\n\ntwo\n\nthree"
    assert X.html_to_text("") == "" and X.html_to_text.tool.startswith("lxml.html")
    osis = ('<verse>In the beginning<note type="x">a footnote</note> God&nbsp;created &amp; made'
            '<lb/>the heaven.</verse><div type="x">Next &lt;para&gt;</div>')
    text = X.osis_to_text(osis)
    assert "footnote" not in text and "God\u00a0created & made" in text
    assert "\n\nthe heaven." in text and "Next <para>" in text


