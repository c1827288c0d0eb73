"""Shared error types of the toolkit (data side)."""

from __future__ import annotations

__all__ = ["DataError", "sample_failure"]


class DataError(ValueError):
    """Bad or missing input data: the message names the file, the problem and the fix, on one line."""


def sample_failure(exc: BaseException) -> str:
    """What a per-sample failure record says: a DataError's own message (it names the file and the fix),
    any other exception as ``Type: message``."""
    return str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
