"""A small subset of JSONPath: one value out of a parsed JSON document.

Grammar (no wildcards, filters or slices: a tag is exactly one value)::

    path    := "$" step*
    step    := "." name | "[" index "]" | "[" quoted "]"
    name    := one or more characters other than . [ ] and whitespace
    index   := optional "-" and digits       (negative counts from the end)
    quoted  := '...' or "..."                (for keys with dots, spaces, brackets)

Examples: ``$`` (the whole document), ``$.state``, ``$.data.items[0].v``, ``$['temp.c']``.
``compile_path`` runs when the configuration is validated, so a malformed path is a config error
with its position; ``extract`` raises ``LookupError`` with the step that failed.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["JsonPath", "compile_path", "extract", "format_path"]

Step = str | int
JsonPath = tuple[Step, ...]

_NAME = re.compile(r"[^.\[\]\s'\"]+")
_INDEX = re.compile(r"\[(-?\d+)\]")
_QUOTED = re.compile(r"""\[(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")\]""")


def compile_path(text: str) -> JsonPath:
    """Parse ``text``; raises ValueError naming the position of the first problem."""
    if not text.startswith("$"):
        raise ValueError(f"a JSON path starts with '$' (for example $.state), got {text!r}")
    steps: list[Step] = []
    pos = 1
    while pos < len(text):
        if text[pos] == ".":
            m = _NAME.match(text, pos + 1)
            if m is None:
                raise ValueError(f"JSON path {text!r}: expected a key after '.' at "
                                 f"position {pos + 1}")
            steps.append(m.group(0))
            pos = m.end()
            continue
        m = _INDEX.match(text, pos)
        if m is not None:
            steps.append(int(m.group(1)))
            pos = m.end()
            continue
        m = _QUOTED.match(text, pos)
        if m is not None:
            raw = m.group(1) if m.group(1) is not None else m.group(2)
            steps.append(re.sub(r"\\(.)", r"\1", raw))
            pos = m.end()
            continue
        raise ValueError(f"JSON path {text!r}: unexpected {text[pos]!r} at position {pos + 1}; "
                         "use .key, [index] or ['key']")
    return tuple(steps)


def format_path(path: JsonPath) -> str:
    out = "$"
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}"
    return out


def extract(doc: Any, path: JsonPath) -> Any:
    """The value at ``path``; LookupError says which step did not match the document."""
    # Fast path for the common case (every step matches); exact type checks keep "abc"[0]
    # and True-as-1 from sneaking through.
    node = doc
    for step in path:
        kind = type(node)
        if not ((kind is dict and type(step) is str and step in node)
                or (kind is list and type(step) is int and -len(node) <= step < len(node))):
            return _extract_slowly(doc, path)
        node = node[step]
    return node


def _extract_slowly(doc: Any, path: JsonPath) -> Any:
    node = doc
    for i, step in enumerate(path):
        if isinstance(step, int):
            if not isinstance(node, list):
                raise LookupError(f"{format_path(path[:i])} is {_kind(node)}, not an array")
            try:
                node = node[step]
            except IndexError:
                raise LookupError(f"{format_path(path[:i + 1])}: the array has "
                                  f"{len(node)} item(s)") from None
        else:
            if not isinstance(node, dict):
                raise LookupError(f"{format_path(path[:i])} is {_kind(node)}, not an object")
            if step not in node:
                raise LookupError(f"{format_path(path[:i + 1])} is missing")
            node = node[step]
    return node


def _kind(node: Any) -> str:
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, int | float):
        return "a number"
    if isinstance(node, str):
        return "a string"
    if isinstance(node, list):
        return "an array"
    return "an object"
