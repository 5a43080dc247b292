"""Build a settings dataclass from a config mapping, rejecting unknown keys by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """``cls(**values)`` after checking every key is a field of ``cls`` (a typo is an error,
    never a silently ignored setting). ``what`` names the config node in the message."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = set(map(str, values)) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(known)}")
    return cls(**{str(k): v for k, v in values.items()})
