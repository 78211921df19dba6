"""Rate limits per key, shared by every worker process through the store.

A fixed one-minute window per key: the store counts requests (one atomic upsert), and the
request over the limit is answered 429 with ``Retry-After`` set to the seconds left in the
window. Keys are counted under a hash, so the store never holds a key itself.
"""

from __future__ import annotations

import hashlib
import math

from engine.errors import TooManyRequests
from engine.store.base import Store

WINDOW = 60.0


class RateLimiter:
    """``limit`` requests per minute per key; ``limit`` 0 turns limiting off."""

    def __init__(self, store: Store, limit: int) -> None:
        self.store = store
        self.limit = limit

    def check(self, key: str, now: float) -> None:
        """Count one request for ``key``.

        Raises:
            TooManyRequests: the key is over its limit in this window.
        """
        if self.limit <= 0:
            return
        window = math.floor(now / WINDOW) * WINDOW
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        count = self.store.rate_hit(digest, window)
        if count > self.limit:
            retry = max(1, math.ceil(window + WINDOW - now))
            raise TooManyRequests(
                f"rate limit of {self.limit} requests per minute exceeded; retry in {retry} s",
                retry,
            )
