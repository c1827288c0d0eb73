"""Checkpoint configs: dataclasses written as JSON dicts and read back strictly."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def strict_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)``, refusing keys ``cls`` does not know (a checkpoint from a newer version)."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; the checkpoint is from a newer version")
    return cls(**data)
