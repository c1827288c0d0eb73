"""Shared error types of the toolkit (data side)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing input data: the message names the file, the problem and the fix, on one line."""
