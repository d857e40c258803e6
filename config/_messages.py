"""pydantic errors -> located messages a plant engineer can act on.

Each pydantic error has a ``loc`` (a path through the *validated* structure, with extra parts
for discriminated unions and ``[key]`` for errors about a mapping key). We follow it through the
plain data to the deepest path that exists in the file, which gives the line to point at:

- unknown key, wrong value, bad id: the key's own line and column;
- missing key: the line of the mapping that should contain it.

Messages never include a value from a mapping or list, and never the input of a validator
(``Secret`` validators raise value errors only), so a secret cannot leak through them.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from config._refs import field_names, type_at, type_choices
from config._yamlmarks import Key, Path

__all__ = ["Translated", "dotted", "show", "suggest", "translate"]

_QUOTED = re.compile(r"'([^']*)'")
_MISSING = object()


class Translated:
    def __init__(self, path: Path, anchor: Path, message: str) -> None:
        self.path = path  # what to print
        self.anchor = anchor  # the deepest path present in the file: where to point
        self.message = message


def dotted(path: Path, data: Any = None) -> str:
    """``sources.press.tags."press.speed".type``: keys holding dots or spaces are quoted; list
    items (known from ``data``) print as ``[i]``."""
    parts: list[str] = []
    node = data
    for key in path:
        if isinstance(node, list) and isinstance(key, int):
            item = f"[{key}]"
            if parts:
                parts[-1] += item
            else:
                parts.append(item)
        else:
            text = "null" if key is None else str(key).lower() if isinstance(key, bool) \
                else str(key)
            if not text or re.search(r"[.\s\"]", text):
                text = '"' + text.replace('"', '\\"') + '"'
            parts.append(text)
        node = _step(node, key)
    return ".".join(parts)


def _step(node: Any, key: Key) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return None


def show(value: Any) -> str:
    """A short, safe rendering of a scalar input; containers are only named."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def suggest(word: object, choices: list[str]) -> str:
    """``"; did you mean 'x'?"`` when one choice is close, else ``""``."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def translate(err: ErrorDetails, data: Any, root: type[BaseModel]) -> Translated:
    found, tail, is_key = _follow(err["loc"], data)
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    if kind == "missing":
        return Translated((*found, *tail), found, f"required key '{tail[-1] if tail else '?'}' "
                          "is missing")
    if kind == "union_tag_not_found":
        known = ", ".join(f"'{c}'" for c in type_choices(root, data, found)) or "?"
        return Translated((*found, "type"), found, f"required key 'type' is missing (one of "
                          f"{known})")
    if kind == "union_tag_invalid":
        choices = type_choices(root, data, found)
        listed = ", ".join(f"'{c}'" for c in choices)
        anchor = (*found, "type") if isinstance(value, dict) and "type" in value else found
        return Translated((*found, "type"), anchor, f"unknown type {show(ctx.get('tag'))}; "
                          f"expected {listed}{suggest(ctx.get('tag'), choices)}")
    path = (*found, *tail)
    if kind == "extra_forbidden" and found and not tail:
        names = field_names(type_at(root, data, found[:-1]))
        hint = suggest(found[-1], names)
        if not hint and names:
            hint = "; allowed keys: " + ", ".join(names)
        return Translated(path, found, f"unknown key {show(found[-1])}{hint}")
    return Translated(path, found, _message(kind, err["msg"], ctx, value, is_key))


def _follow(loc: tuple[int | str, ...], data: Any) -> tuple[Path, list[Key], bool]:
    """Split ``loc`` into the part present in ``data`` and the rest (union tags skipped)."""
    node = data
    found: list[Key] = []
    tail: list[Key] = []
    is_key = False
    for part in loc:
        if part == "[key]":
            is_key = True
            continue
        if tail:
            tail.append(part)
            continue
        key = _match(node, part)
        if key is not _MISSING:
            found.append(key)  # type: ignore[arg-type]
            node = node[key]
        elif isinstance(node, dict) and node.get("type") == part:
            # The tag pydantic adds for a discriminated union member (last in the location
            # of an error about the member as a whole, such as a missing 'host').
            continue
        else:
            tail.append(part)
    return tuple(found), tail, is_key


def _match(node: Any, part: int | str) -> object:
    if isinstance(node, dict):
        if part in node:
            return part
        for key in node:  # keys converted to text by a validator (1 -> "1")
            if str(key) == str(part):
                return key
    elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return part
    return _MISSING


def _message(kind: str, msg: str, ctx: dict[str, Any], value: Any, is_key: bool) -> str:
    got = f", got {show(value)}"
    if kind in ("enum", "literal_error"):
        choices = _QUOTED.findall(str(ctx.get("expected", "")))
        listed = ", ".join(f"'{c}'" for c in choices)
        return f"{show(value)} is not one of {listed}{suggest(value, choices)}"
    if kind in ("value_error", "assertion_error"):
        for noise in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(noise)
        return msg
    if kind == "string_type":
        quote = " (put it in quotes)" if isinstance(value, int | float) else ""
        return ("keys here must be text" if is_key else "expected text") + got + quote
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number" + got
    if kind in ("float_type", "float_parsing"):
        return "expected a number" + got
    if kind in ("bool_type", "bool_parsing"):
        return "expected true or false" + got
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "expected a mapping (key: value lines)" + got
    if kind == "path_type":
        quote = " (put it in quotes)" if isinstance(value, int | float) else ""
        return "expected a path" + got + quote
    if kind == "list_type":
        return "expected a list" + got
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        one, many = ("entry", "entries") if ctx.get("field_type") == "Dictionary" \
            else ("item", "items")
        return f"needs at least {n} {one if n == 1 else many}"
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("more than", "gt"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}{got}"
    return msg[:1].lower() + msg[1:]
