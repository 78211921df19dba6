"""Rate limits per key, shared by every worker process through the store.

A fixed one-minute window per key. Each process counts locally and adds its count to the
store's shared counter every ``limit / 100`` requests (at least every request for small limits,
and at least once a second), so the store sees one write per batch of requests rather than one
per request. The shared total can therefore lag by at most one unflushed batch per process: a
process never lets a key past ``limit`` by its own count, and the overshoot across processes is
bounded by ``processes * limit / 100``. Over the limit, the answer is 429 with ``Retry-After``
set to the seconds left in the window.

Keys are counted under an HMAC-SHA256 with a random secret kept in the store (see
:meth:`Store.secret`), never under the key itself or a plain hash of it: a publishable key is
public and IPv4 addresses are few, so a plain hash of the two gave the client's IP back to
anyone who tried them all. Counters are dropped once :data:`COUNTER_TTL` old, by the hourly
housekeeping, whatever the retention setting.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from dataclasses import dataclass

from engine.errors import TooManyRequests
from engine.store.base import Store

WINDOW = 60.0
FLUSH_SECONDS = 1.0
COUNTER_TTL = 600.0
"""Seconds after which a window's shared counter is dropped: only the current window is read,
and ten minutes leave room for hosts whose clocks differ."""
HMAC_KEY_NAME = "rate_limit_key"
"""The name of the store secret that counter keys are made with."""


@dataclass
class _Count:
    window: float
    pending: int = 0  # counted here, not yet added to the store
    shared: int = 0  # the store's total as of the last flush (this process's flushes included)
    flushed_at: float = 0.0


class RateLimiter:
    """``limit`` requests per minute per key; ``limit`` 0 turns limiting off."""

    def __init__(self, store: Store, limit: int) -> None:
        self.store = store
        self.limit = limit
        self.batch = max(1, limit // 100)
        self._counts: dict[str, _Count] = {}
        self._window = -math.inf  # the latest window counted here
        self._secret: bytes | None = None
        self._lock = threading.Lock()

    def counter_key(self, key: str) -> str:
        """The name ``key`` is counted under: an HMAC of it, which reveals nothing of the key
        (or of a client IP in it) without the store's secret.

        Raises:
            StoreError: the secret could not be read from the store.
        """
        secret = self._secret
        if secret is None:  # once per process; every process reads the same secret
            secret = self._secret = self.store.secret(HMAC_KEY_NAME)
        return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]

    def check(self, key: str, now: float) -> None:
        """Count one request for ``key``.

        Raises:
            TooManyRequests: the key is over its limit in this window.
            StoreError: the store could not be read or written.
        """
        if self.limit <= 0:
            return
        window = math.floor(now / WINDOW) * WINDOW
        digest = self.counter_key(key)
        with self._lock:
            if window > self._window:
                # A new minute: the counts of earlier ones are of no more use, and a key per
                # client IP would otherwise pile up here for the life of the process.
                self._counts = {k: c for k, c in self._counts.items() if c.window >= window}
                self._window = window
            count = self._counts.get(digest)
            if count is None or count.window != window:
                count = self._counts[digest] = _Count(window, flushed_at=now)
            count.pending += 1
            flush = count.pending >= self.batch or now - count.flushed_at >= FLUSH_SECONDS
            pending = count.pending if flush else 0
            if flush:
                count.pending = 0
                count.flushed_at = now
        if pending:
            total = self.store.rate_hit(digest, window, pending)
            with self._lock:
                if count.window == window:
                    count.shared = max(count.shared, total)
        if count.shared + count.pending > self.limit:
            retry = max(1, math.ceil(window + WINDOW - now))
            raise TooManyRequests(
                f"rate limit of {self.limit} requests per minute exceeded; retry in {retry} s",
                retry,
            )
