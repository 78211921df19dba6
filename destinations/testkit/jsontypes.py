"""JSON number types as the platforms check them: ``true`` is no number (Python's bool is an
int, so ``isinstance(True, int)`` alone would let it through)."""

from __future__ import annotations

from typing import Any


def is_number(value: Any) -> bool:
    """A JSON number: an integer or a float, not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """A JSON integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)
