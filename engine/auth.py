"""Server-key authentication and HMAC request signatures.

A request carries its server key as ``Authorization: Bearer <key>`` or ``?api_key=<key>``. Keys
are compared in constant time against every configured key (no early exit, so timing does not
reveal how much of a key matched).

A key configured with a signing secret also requires a signature: the header
``X-Tagrelay-Timestamp`` holds Unix seconds, and ``X-Tagrelay-Signature`` holds the hex
HMAC-SHA256 of ``timestamp + "." + raw body`` (optionally prefixed ``sha256=``). Timestamps more
than five minutes from the server's clock are refused, so a captured request cannot be replayed
later.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence

from engine.config import ServerKey
from engine.errors import Unauthorized

TIMESTAMP_HEADER = "X-Tagrelay-Timestamp"
SIGNATURE_HEADER = "X-Tagrelay-Signature"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``timestamp + "." + body`` with ``secret``."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _header(headers: Mapping[str, str], name: str) -> str:
    """A header's value by case-insensitive name ("" when absent)."""
    value = headers.get(name)
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), "")
    return value


def presented_key(headers: Mapping[str, str], args: Mapping[str, str]) -> str | None:
    """The key a request presents, from the Authorization header or ``api_key``."""
    auth = _header(headers, "Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Authorization must be 'Bearer <server key>'")
        return token.strip()
    key = args.get("api_key")
    return key.strip() if key else None


def find_keys(presented: str, keys: Sequence[ServerKey]) -> list[ServerKey]:
    """The configured entries equal to ``presented`` (a key may be listed once per signing
    secret, while one is rotated); compares against all keys in constant time."""
    found = []
    # Digests have one length, so neither the comparison time nor an early length mismatch
    # tells how long a configured key is.
    given = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    for candidate in keys:
        if hmac.compare_digest(given, _digest(candidate.key)):
            found.append(candidate)
    return found


@functools.lru_cache(maxsize=64)
def _digest(configured: str) -> bytes:
    """SHA-256 of a configured key (the same few keys for every request)."""
    return hashlib.sha256(configured.encode()).digest()


def authenticate(
    headers: Mapping[str, str],
    args: Mapping[str, str],
    body: bytes,
    keys: Sequence[ServerKey],
    now: float,
    window: float = 300.0,
) -> ServerKey:
    """Check a request's server key and, where the key requires it, its signature.

    Raises:
        Unauthorized: with a message that says what is missing or wrong (never the key).
    """
    presented = presented_key(headers, args)
    if not presented:
        raise Unauthorized("missing server key: send 'Authorization: Bearer <key>' or ?api_key=")
    entries = find_keys(presented, keys)
    if not entries:
        raise Unauthorized("unknown server key")
    # A key listed with a secret needs a signature, even if it is also listed without one; a
    # key listed with several (a secret being rotated) accepts a signature by any of them.
    signed = [entry for entry in entries if entry.signing_secret is not None]
    if not signed:
        return entries[0]
    timestamp = _header(headers, TIMESTAMP_HEADER).strip()
    sent = _header(headers, SIGNATURE_HEADER).strip()
    if not timestamp or not sent:
        raise Unauthorized(
            f"this key requires signed requests: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}"
        )
    try:
        stamp = float(timestamp)
    except ValueError as exc:
        raise Unauthorized(f"{TIMESTAMP_HEADER} must be Unix seconds") from exc
    if not math.isfinite(stamp):  # "nan" would pass every window comparison
        raise Unauthorized(f"{TIMESTAMP_HEADER} must be Unix seconds")
    if abs(now - stamp) > window:
        raise Unauthorized(f"{TIMESTAMP_HEADER} is outside the {int(window)}-second replay window")
    if sent.lower().startswith("sha256="):
        sent = sent[7:]
    given = sent.lower().encode("utf-8", "surrogatepass")
    matched = None
    for entry in signed:  # every secret is tried, so timing does not tell which one matched
        expected = signature(str(entry.signing_secret), timestamp, body)
        if hmac.compare_digest(expected.encode(), given):
            matched = entry
    if matched is None:
        raise Unauthorized("signature does not match the body")
    return matched
