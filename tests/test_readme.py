"""The README is the front door and docs/ holds the rest: every relative link in them must
reach a file that exists and, when it names a `#fragment` of a Markdown page, a heading of
that page; the README stays short enough to read."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines a reader sees as text: fenced code blocks and inline code left out (a link
    inside code is not a link)."""
    return [INLINE_CODE.sub("", line) for line in prose_lines_with_code_headings(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: Markdown links and code marks reduced to their text,
    lowercased, every character but letters, digits, `_`, `-` and spaces dropped, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page; a repeated heading gets -1, -2, … as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines_with_code_headings(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def prose_lines_with_code_headings(text: str) -> list[str]:
    """The lines outside fenced code, inline code kept (a heading's code marks are part of its
    text)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on the page that is not a URL or a mail address."""
    out = []
    for no, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), 1):
        for m in LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue
            out.append((no, target))
    return out


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    """Each relative link of the page whose file or heading is missing, as one line."""
    problems = []
    for no, target in relative_links(page):
        path_part, _, fragment = target.partition("#")
        dest = page if not path_part else (page.parent / unquote(path_part)).resolve()
        if not dest.exists():
            problems.append(f"{page.relative_to(root)}: link {target!r}: no file {dest}")
            continue
        if fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            problems.append(f"{page.relative_to(root)}: link {target!r}: no heading with anchor "
                            f"#{fragment} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(page: Path):
    assert broken_links(page) == []


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert missing == [], f"README.md does not link these docs pages: {missing}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}, details in docs/"


def test_checker_sees_a_missing_file_and_a_missing_heading(tmp_path: Path):
    """The checker itself: a link to a missing page and one to a missing heading are reported,
    a link to an existing heading (with code marks and punctuation) is not."""
    (tmp_path / "other.md").write_text("# Title\n\n## What `make demo` does, step by step\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#what-make-demo-does-step-by-step)\n[gone](nowhere.md)\n"
                    "[bad](other.md#no-such-heading)\n```\n[in code](ignored.md)\n```\n"
                    "`[inline](ignored.md)` [web](https://example.com/x.md)\n", encoding="utf-8")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 2
    assert "nowhere.md" in problems[0] and "no-such-heading" in problems[1]
