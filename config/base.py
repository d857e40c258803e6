"""Shared pieces of the configuration schema (leaf of the config package)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from config.units import Duration

__all__ = ["Backoff", "ComponentId", "Strict", "check_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=False)


def check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(
            f"{what} '{value}' may only contain letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit")
    return value


def _component_id(value: str) -> str:
    return check_id(value, "id")


# The key type of the sources/machines/sinks maps: a bad id is reported at the key itself.
ComponentId = Annotated[str, AfterValidator(_component_id),
                        WithJsonSchema({"type": "string", "pattern": _ID.pattern})]


class Backoff(Strict):
    initial: Duration = Field(0.5, description="First reconnect delay.")
    max: Duration = Field(30.0, description="Longest reconnect delay (exponential growth, "
                          "full jitter).")
