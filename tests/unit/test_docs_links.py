"""The documentation points only at things that exist, and only at things in the repository.

- Every relative Markdown link in the repository's documentation (README.md, docs/, and any
  other Markdown file outside tests/) names a file or directory that exists, and a ``#anchor``
  into a Markdown file names one of its headings.
- Every repository path the documentation names in inline code (`agent/runtime/commit.py`)
  exists, so a module that moves cannot leave the docs pointing at its old place.
- No file of the repository outside tests/ (code, configuration, documentation) refers to
  design or library notes kept outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import ROOT

# Directories that hold no documentation of ours (tools, caches, virtual environments, tests).
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "tests", "build", "dist", "__pycache__",
              ".hypothesis",
              ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
# Notes that live outside the repository must not be referred to (case-insensitive).
_OUTSIDE = re.compile(r"DESIGN\.md|LIBRARIES\.md|\.\./shared", re.I)


def _markdown_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.md"):
        rel = path.relative_to(ROOT)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        found.append(path)
    return sorted(found)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor a heading gets on the usual Markdown hosts: lower case, inline markup and
    punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text(encoding="utf-8")))


DOCS = _markdown_files()


def test_the_documentation_is_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert "README.md" in names
    assert "docs/architecture.md" in names and "docs/configuration.md" in names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_existing_files(doc: Path) -> None:
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:, file: ... are not files of the repository
        file_part, _, anchor = target.partition("#")
        dest = doc if not file_part else (doc.parent / file_part).resolve()
        if not dest.exists():
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
            broken.append(f"{target}: no such file {shown}")
            continue
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: {dest.relative_to(ROOT)} has no heading #{anchor}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


# `agent/runtime/commit.py`, `tests/durability/`: inline code that names a path of the repository.
_CODE_PATH = re.compile(r"`((?:agent|buffer|config|protocols|tests|bench|systemd|docs)/"
                        r"[A-Za-z0-9_./-]*)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_paths_named_in_inline_code_exist(doc: Path) -> None:
    """A module or folder the documentation names (`agent/runtime/commit.py`) exists."""
    text = _FENCE.sub("", doc.read_text(encoding="utf-8"))
    missing = sorted({p for p in _CODE_PATH.findall(text) if not (ROOT / p).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def _repository_text_files() -> list[Path]:
    """Every text file of the repository outside tests/ (and outside tool directories)."""
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if not path.is_file() or path.stat().st_size > 2 * 2**20:
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (a database, an image): not documentation or code
        found.append(path)
    return sorted(found)


def test_no_reference_to_notes_outside_the_repository() -> None:
    """Code, configuration and docs point only at files of the repository (tests/ excepted)."""
    files = _repository_text_files()
    assert ROOT / "README.md" in files and ROOT / "pyproject.toml" in files
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in files
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if _OUTSIDE.search(line)]
    assert not hits, "references to notes outside the repository:\n  " + "\n  ".join(hits)


def test_the_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """The checker itself can fail: a missing file and a missing heading are both found."""
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n\nSee [a](missing.md), [b](#title), [c](#nope), `[d](in-code.md)`.\n"
                   "```\n[e](in-fence.md)\n```\n", encoding="utf-8")
    assert _links(doc) == ["missing.md", "#title", "#nope"]
    assert _anchors(doc) == {"title"}
    assert _slug("`agent` and *Health*, readiness") == "agent-and-health-readiness"
