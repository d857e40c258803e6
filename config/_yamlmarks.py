"""YAML text -> plain Python data plus a line/column mark for every key path.

ruamel.yaml's round-trip loader (YAML 1.2: ``on``/``NO`` stay text, ``0755`` is decimal) keeps
the position of every key and item. We copy its output into plain ``dict``/``list``/``str``/
``int``/``float``/``bool``/``None`` so pydantic sees ordinary data, and record where each path
came from so later errors can point at the line a plant engineer has to fix.

Marks are 1-based ``(line, column)``. For a mapping entry the mark is the key's position; for a
list item it is the item's position; the empty path ``()`` is the document start.

Limits against hostile or broken files (each a located ``YamlIssue``, never a crash):
``MAX_DEPTH`` levels of nesting (the parser's recursion would otherwise end in RecursionError),
``MAX_VALUES`` values after aliases are expanded (an alias bomb of a few hundred bytes would
otherwise expand to gigabytes). The file size is limited by the loader.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

__all__ = ["MAX_DEPTH", "MAX_VALUES", "Key", "Mark", "Marks", "Path", "YamlIssue", "parse_yaml"]

MAX_DEPTH = 64
MAX_VALUES = 250_000

Key = str | int | float | bool | None
Path = tuple[Key, ...]
Mark = tuple[int, int]
Marks = dict[Path, Mark]


class YamlIssue(Exception):
    """One problem found while reading the YAML (syntax or an unsupported construct)."""

    def __init__(self, path: Path, message: str, mark: Mark | None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.mark = mark


def parse_yaml(text: str) -> tuple[Any, Marks, list[YamlIssue]]:
    """Parse one YAML document. Syntax errors raise ``YamlIssue``; constructs we do not accept
    (custom tags, binary, complex keys, recursive aliases) are returned as issues next to the
    data, with the offending value replaced by ``None``."""
    deep = _too_deep(text)
    if deep is not None:
        raise YamlIssue((), f"nested more than {MAX_DEPTH} levels deep", deep)
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        raise _syntax_issue(exc) from exc
    except YAMLError as exc:  # unmarked errors are rare (reader-level problems)
        raise YamlIssue((), f"invalid YAML: {exc}", None) from exc
    except RecursionError:  # the pre-check missed a way of nesting: still a clear error
        raise YamlIssue((), f"nested more than {MAX_DEPTH} levels deep", None) from None
    walker = _Walker()
    root = (1, 1)
    if isinstance(doc, CommentedMap | CommentedSeq):
        root = (doc.lc.line + 1, doc.lc.col + 1)
    try:
        data = walker.plain(doc, (), root)
    except _Stop as stop:
        raise stop.issue from None
    return data, walker.marks, walker.issues


def _too_deep(text: str) -> Mark | None:
    """Where flow brackets or block indentation nest deeper than ``MAX_DEPTH``, roughly (quoted
    text and comments are skipped); None when the text is shallow enough. The parser recurses
    once per level, so this runs before it."""
    indents: list[int] = []
    flow = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if flow == 0:  # block context: the indentation is the nesting
            while indents and indents[-1] >= indent:
                indents.pop()
            indents.append(indent)
            rest, items = stripped, 0
            while rest.startswith("- ") or rest == "-":
                items += 1
                rest = rest[2:].lstrip(" ")
            if len(indents) + items > MAX_DEPTH:
                return (number, indent + 1)
        quote = ""
        for column, ch in enumerate(stripped, start=indent + 1):
            if quote:
                if ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (column == indent + 1 or line[column - 2] == " "):
                break
            elif ch in "[{":
                flow += 1
                if len(indents) + flow > MAX_DEPTH:
                    return (number, column)
            elif ch in "]}":
                flow = max(0, flow - 1)
    return None


class _Stop(Exception):
    def __init__(self, issue: YamlIssue) -> None:
        super().__init__(issue.message)
        self.issue = issue


def _syntax_issue(exc: MarkedYAMLError) -> YamlIssue:
    mark = exc.problem_mark or exc.context_mark
    where = (mark.line + 1, mark.column + 1) if mark is not None else None
    if isinstance(exc, DuplicateKeyError):
        # ruamel's problem text quotes the values too; a duplicate is about the key alone.
        problem = str(exc.problem or "")
        key = problem.split('"')[1] if problem.count('"') >= 2 else "?"
        return YamlIssue((), f"duplicate key '{key}'; each key may appear only once in a "
                         "mapping", where)
    parts = [p for p in (exc.context, exc.problem) if p]
    message = "invalid YAML: " + ", ".join(parts)
    if str(exc.context or "").startswith("while") and exc.context_mark is not None \
            and exc.problem_mark is not None and exc.context_mark.line != exc.problem_mark.line:
        message += f" (started on line {exc.context_mark.line + 1})"
    return YamlIssue((), message, where)


class _Walker:
    def __init__(self) -> None:
        self.marks: Marks = {}
        self.issues: list[YamlIssue] = []
        self._stack: set[int] = set()  # ids of containers being copied: catches alias loops
        self._values = 0

    def plain(self, node: Any, path: Path, mark: Mark) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:
            raise _Stop(YamlIssue(path, f"the configuration expands to more than {MAX_VALUES} "
                                  "values (aliases that refer to aliases?)", mark))
        if len(path) > MAX_DEPTH:
            raise _Stop(YamlIssue(path, f"nested more than {MAX_DEPTH} levels deep", mark))
        self.marks.setdefault(path, mark)
        if isinstance(node, CommentedMap | CommentedSeq):
            if id(node) in self._stack:
                self.issues.append(YamlIssue(path, "an alias refers to the mapping or list that "
                                             "contains it", mark))
                return None
            self._stack.add(id(node))
            try:
                if isinstance(node, CommentedMap):
                    return self._mapping(node, path, mark)
                return self._sequence(node, path, mark)
            finally:
                self._stack.discard(id(node))
        return self._scalar(node, path, mark)

    def _mapping(self, node: CommentedMap, path: Path, mark: Mark) -> dict[Key, Any]:
        out: dict[Key, Any] = {}
        for key, value in node.items():
            key_mark = _mark(node, "key", key) or mark
            if not isinstance(key, str | int | float | bool) and key is not None:
                self.issues.append(YamlIssue(path, "keys must be plain text or numbers, not "
                                             "lists or mappings", key_mark))
                continue
            plain_key = self._scalar(key, path, key_mark)
            out[plain_key] = self.plain(value, (*path, plain_key), key_mark)
        return out

    def _sequence(self, node: CommentedSeq, path: Path, mark: Mark) -> list[Any]:
        return [self.plain(item, (*path, i), _mark(node, "item", i) or mark)
                for i, item in enumerate(node)]

    def _scalar(self, node: Any, path: Path, mark: Mark) -> Any:
        # bool before int: bool is an int subclass (and so is ruamel's ScalarBoolean).
        if node is None or type(node) is bool:
            return node
        if isinstance(node, str):
            return str(node)
        if isinstance(node, bool):
            return bool(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if isinstance(node, dt.date):  # ruamel resolves timestamps; keep them as text
            return node.isoformat()
        if isinstance(node, TaggedScalar):
            what = f"YAML tag '{node.tag}'"
        elif isinstance(node, bytes):
            what = "binary data (!!binary)"
        else:
            what = f"a value of type {type(node).__name__}"
        self.issues.append(YamlIssue(path, f"{what} is not supported here; write plain text, "
                                     "numbers, true/false, lists or mappings", mark))
        return None


def _mark(node: CommentedMap | CommentedSeq, kind: str, index: Any) -> Mark | None:
    try:
        line, col = node.lc.key(index) if kind == "key" else node.lc.item(index)
    except (KeyError, IndexError, TypeError):
        return None  # merged (<<) keys have no mark of their own: use the parent's
    return (line + 1, col + 1)
