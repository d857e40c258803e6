"""Secrets: ``${env:NAME}`` and ``${file:/path}`` references that never show in logs or output.

A ``Secret`` keeps the *reference*, not only the value, and resolves it each time ``reveal()`` is
called: a rotated token file takes effect without a restart (a 401 makes the sink re-read it).
``str()``/``repr()`` and JSON serialisation always give ``***``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = ["MAX_SECRET_BYTES", "REFERENCE", "Secret", "SecretResolutionError"]

REFERENCE = re.compile(r"^\$\{(env|file):([^}]+)\}$")
# A credential is a line of text; more than this is a wrong path (/dev/zero, a log file).
MAX_SECRET_BYTES = 64 * 1024
MASK = "***"


class SecretResolutionError(ValueError):
    """A secret reference cannot be resolved (variable unset, file unreadable)."""


class Secret:
    __slots__ = ("_kind", "_literal", "_ref")

    def __init__(self, raw: str) -> None:
        m = REFERENCE.match(raw.strip())
        if m:
            self._kind: str = m.group(1)
            self._ref: str = m.group(2).strip()
            self._literal: str | None = None
        else:
            self._kind, self._ref, self._literal = "literal", "", raw

    @property
    def reference(self) -> str:
        """How the secret is configured, safe to show (``${env:NAME}``, ``${file:/p}``, or ***)."""
        return MASK if self._kind == "literal" else f"${{{self._kind}:{self._ref}}}"

    def reveal(self) -> str:
        """The current value. Raises SecretResolutionError naming the reference, never a value."""
        if self._literal is not None:
            return self._literal
        if self._kind == "env":
            value = os.environ.get(self._ref)
            if value is None:
                raise SecretResolutionError(f"environment variable {self._ref} is not set")
            return value
        try:
            with Path(self._ref).open("rb") as f:
                data = f.read(MAX_SECRET_BYTES + 1)  # /dev/zero must not fill the memory
        except OSError as exc:
            raise SecretResolutionError(
                f"cannot read secret file {self._ref}: {exc.strerror or exc}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretResolutionError(f"secret file {self._ref} is larger than "
                                        f"{MAX_SECRET_BYTES} bytes; is it the right file?")
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            # Never the exception's text: it quotes the raw bytes.
            raise SecretResolutionError(
                f"secret file {self._ref} is not UTF-8 text") from None

    def check(self) -> None:
        self.reveal()

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({self.reference})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Secret) and (self._kind, self._ref, self._literal)
                == (other._kind, other._ref, other._literal))

    def __hash__(self) -> int:
        return hash((self._kind, self._ref, self._literal))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any, info: core_schema.ValidationInfo) -> Secret:
            if isinstance(value, Secret):
                return value
            if not isinstance(value, str) or not value:
                raise ValueError("expected a non-empty string, ${env:NAME} or ${file:/path}")
            secret = Secret(value)
            # ``validate --no-secrets`` checks a file without the secrets at hand: the
            # reference's form is still checked (above), its value is not read.
            if (info.context or {}).get("check_references", True):
                try:
                    secret.check()
                except SecretResolutionError as exc:
                    raise ValueError(str(exc)) from None
            return secret

        return core_schema.with_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda s: s.reference, return_schema=core_schema.str_schema()),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "examples": ["${env:ERP_TOKEN}", "${file:/run/credentials/x}"]}
