"""Shared pieces of the configuration schema (leaf of the config package)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from config.units import Duration

__all__ = ["Backoff", "Strict", "check_id"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=False)


def check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise ValueError(
            f"{what} '{value}' may only contain letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit")
    return value


class Backoff(Strict):
    initial: Duration = Field(0.5, description="First reconnect delay.")
    max: Duration = Field(30.0, description="Longest reconnect delay (exponential growth, "
                          "full jitter).")
