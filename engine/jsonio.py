"""JSON in and out of the hot paths: orjson where it gives the standard library's answer, the
standard library where it does not.

orjson parses and writes JSON several times faster than the ``json`` module, which on the
single-event intake path is about a tenth of a request's CPU (the body, the stored event, each
tag's payload, the answer). It is stricter than ``json`` and differs in a few answers, so every
call falls back to ``json`` where they could differ, and the result is the one ``json`` gives:

- **Reading.** Whatever orjson refuses is read again by ``json``, which then gives the error
  (or the value: ``json`` accepts a lone surrogate escape, which orjson refuses). orjson reads
  an integer outside 64 bits as a float, losing digits, so a text with a run of 19 or more
  digits is read by ``json`` alone.
- **Writing.** What orjson refuses (a lone surrogate, an integer past 64 bits, a key that is not
  a string) is written by ``json``. orjson writes NaN and the infinities as ``null`` where
  ``json`` writes ``NaN``/``Infinity``; callers that must refuse them check first (see
  ``destinations.values.check_json``). Floats may be written in another, equal form (``1e-7``
  for ``1e-07``), and a few non-JSON types that ``json`` refuses (``uuid.UUID``, ``enum.Enum``,
  dataclasses, ``datetime``) are written by orjson instead of refused.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# An integer below -2**63 (19 digits) or above 2**64 - 1 (20 digits) is read by orjson as a float,
# losing digits, so a text with a run of 19 digits is left to json. Quoted digits count too: such
# texts are merely read more slowly. Found by mapping every digit to "0" and searching for 19 of
# them: a regular expression (\d{19}) takes ~50 times longer.
_ZEROED = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII = json.JSONEncoder(separators=(",", ":"))


NOT_READ: Any = object()
"""What :func:`loads_fast` returns for a text it leaves to ``json``."""


def loads_fast(raw: bytes) -> Any:
    """orjson's reading of ``raw`` where it is ``json``'s, else :data:`NOT_READ` (malformed
    JSON included): the caller then reads it with ``json``, which gives the value or the error.

    A value read here holds no NaN, infinity or lone surrogate (orjson refuses them all).
    """
    if _LONG_RUN not in raw.translate(_ZEROED):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return NOT_READ


def loads(data: bytes | str) -> Any:
    """``json.loads(data)``, faster.

    Raises:
        ValueError: as ``json.loads`` (a ``json.JSONDecodeError`` for malformed JSON).
        UnicodeDecodeError: ``data`` is bytes that are not UTF-8.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    value = loads_fast(raw)
    if value is NOT_READ:
        value = json.loads(data)
    return value


def dumps(value: Any) -> str:
    """Compact JSON text, not ASCII-escaped (``json.dumps(value, ensure_ascii=False,
    separators=(",", ":"))``; see the module docstring for where the two differ).

    Raises:
        TypeError: a value JSON cannot hold.
        ValueError, RecursionError: as ``json.dumps``.
    """
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError:
        return _COMPACT.encode(value)


def dumpb(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes; what orjson refuses is written ASCII-escaped by ``json``
    (a lone surrogate goes out as the ``\\uD800``-style escape a client sent).

    Raises:
        TypeError: a value JSON cannot hold.
        ValueError, RecursionError: as ``json.dumps``.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return _ASCII.encode(value).encode("ascii")
