"""Schema-aware preparation of the plain YAML data before pydantic sees it.

Walks the data and the schema together (choosing the member of a discriminated union by the
data's ``type``), and:

- leaves the value of every ``Secret`` field as its reference (``${env:NAME}``/``${file:/p}``)
  so the secret is resolved by ``Secret`` itself and never copied into the config; a relative
  ``${file:...}`` becomes absolute (relative to the config file's directory);
- substitutes ``${env:NAME}`` and ``${file:/path}`` in every other string, whole or embedded
  (``$${`` writes a literal ``${``);
- makes every relative ``Path`` option absolute, relative to the config file's directory
  (``~`` is the home directory of the user running the agent).

Values under keys the schema does not know are left alone: they are errors anyway.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from config._yamlmarks import Path
from config.secrets import MAX_SECRET_BYTES, REFERENCE, Secret

__all__ = ["Prepared", "field_names", "prepare", "type_at", "type_choices"]

_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Prepared:
    """The rewritten data, the problems found (path, message), and the paths whose value could
    not be substituted (their later validation errors would only repeat the problem)."""

    def __init__(self) -> None:
        self.data: Any = None
        self.issues: list[tuple[Path, str]] = []
        self.failed: set[Path] = set()
        # Values read from ${env:}/${file:} into ordinary strings (a URL, a header): secrets
        # for redaction. Path options are not credentials and stay readable.
        self.substituted: set[str] = set()


def prepare(data: Any, root: type[BaseModel], base_dir: FsPath,
            environ: Mapping[str, str] | None = None, *,
            check_references: bool = True) -> Prepared:
    """``check_references=False`` (``validate --no-secrets``): an unset variable or unreadable
    file is not a problem; its place takes the text ``UNRESOLVED`` (the reference's syntax is
    still checked)."""
    out = Prepared()
    env = os.environ if environ is None else environ
    out.data = _Preparer(out, base_dir, env, check_references).walk(data, root, ())
    return out


def type_at(root: type[BaseModel], data: Any, path: Path) -> Any:
    """The schema type at ``path`` (union members chosen by the data), or None if unknown."""
    tp: Any = root
    node = data
    for key in path:
        tp = _child(_resolve(tp, node), key)
        if tp is None:
            return None
        node = node.get(key) if isinstance(node, dict) else (
            node[key] if isinstance(node, list) and isinstance(key, int)
            and 0 <= key < len(node) else None)
    return _resolve(tp, node)


def type_choices(root: type[BaseModel], data: Any, path: Path) -> list[str]:
    """The accepted values of ``type`` for the (possibly unresolvable) union at ``path``."""
    if not path:
        return []
    parent = type_at(root, data, path[:-1])
    tp = _child(parent, path[-1])
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    members = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    choices: list[str] = []
    for model in members:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get("type")
            if field is not None and get_origin(field.annotation) is Literal:
                choices.extend(str(a) for a in get_args(field.annotation))
    return choices


def field_names(tp: Any) -> list[str]:
    """Keys a mapping of this schema type accepts (empty when free-form or unknown)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _resolve(tp: Any, node: Any) -> Any:
    """Strip Annotated and Optional; pick a discriminated union's member by ``node['type']``."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            kind = node.get("type") if isinstance(node, dict) else None
            for model in models:
                field = model.model_fields.get("type")
                if field is not None and get_origin(field.annotation) is Literal \
                        and kind in get_args(field.annotation):
                    return model
            return None if models else tp
        else:
            return tp


def _child(tp: Any, key: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(key) if isinstance(key, str) else None
        return None if field is None else field.annotation
    origin = get_origin(tp)
    if origin is dict:
        return get_args(tp)[1]
    if origin is list and isinstance(key, int):
        return get_args(tp)[0]
    return None


def _is(tp: Any, cls: type) -> bool:
    return isinstance(tp, type) and issubclass(tp, cls)


UNRESOLVED = "UNRESOLVED"


class _Preparer:
    def __init__(self, out: Prepared, base_dir: FsPath, env: Mapping[str, str],
                 check_references: bool = True) -> None:
        self.out = out
        self.base_dir = base_dir
        self.env = env
        self.check_references = check_references

    def walk(self, node: Any, tp: Any, path: Path) -> Any:
        tp = _resolve(tp, node)
        if tp is None:
            return node
        if isinstance(node, dict):
            return {k: self.walk(v, _child(tp, k), (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [self.walk(v, _child(tp, i), (*path, i)) for i, v in enumerate(node)]
        if not isinstance(node, str):
            return node
        if _is(tp, Secret):
            return self._secret(node, path)
        values: list[str] = []
        text = self._substitute(node, path, values)
        if _is(tp, FsPath):
            if text and path not in self.out.failed:
                text = str(self._absolute(text))
        else:
            self.out.substituted.update(values)
        return text

    def _secret(self, text: str, path: Path) -> str:
        m = REFERENCE.match(text.strip())
        if m is None:
            if "${" in text:
                self._fail(path, "a secret is either exactly one reference, ${env:NAME} or "
                           "${file:/path}, or literal text without '${'")
            return text
        kind, ref = m.group(1), m.group(2).strip()
        if kind == "env":
            if not _ENV_NAME.match(ref):
                self._fail(path, f"'{ref}' is not an environment variable name")
            return text
        return f"${{file:{self._absolute(ref)}}}"

    def _substitute(self, text: str, path: Path, values: list[str]) -> str:
        if "${" not in text:
            return text

        def replace(m: re.Match[str]) -> str:
            token = m.group(0)
            if token == "$${":
                return "${"
            inner = m.group(1)
            if inner is None:
                self._fail(path, "'${' without a closing '}'; write $${ for a literal '${'")
                return token
            kind, sep, ref = inner.partition(":")
            ref = ref.strip()
            if not sep or kind not in ("env", "file") or not ref:
                self._fail(path, f"'{token}' is not a reference; write ${{env:NAME}} or "
                           "${file:/path} (or $${ for a literal '${')")
                return token
            if kind == "env":
                if not _ENV_NAME.match(ref):
                    self._fail(path, f"'{ref}' is not an environment variable name")
                    return token
                value = self.env.get(ref)
                if value is None:
                    if not self.check_references:
                        return UNRESOLVED
                    self._fail(path, f"environment variable {ref} is not set")
                    return token
                values.append(value)
                return value
            file = self._absolute(ref)
            try:
                with file.open("rb") as f:
                    data = f.read(MAX_SECRET_BYTES + 1)
            except OSError as exc:
                if not self.check_references:
                    return UNRESOLVED
                self._fail(path, f"cannot read file {file}: {exc.strerror or exc}")
                return token
            if len(data) > MAX_SECRET_BYTES:
                self._fail(path, f"file {file} is larger than {MAX_SECRET_BYTES} bytes; "
                           "a reference takes one value (is it the right file?)")
                return token
            try:
                value = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                if not self.check_references:
                    return UNRESOLVED
                self._fail(path, f"file {file} is not UTF-8 text")
                return token
            values.append(value)
            return value

        return _TOKEN.sub(replace, text)

    def _absolute(self, text: str) -> FsPath:
        p = FsPath(text).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def _fail(self, path: Path, message: str) -> None:
        self.out.issues.append((path, message))
        self.out.failed.add(path)
