"""When to try a destination again: backoff between attempts, and a circuit breaker that pauses
a destination that keeps failing (used by :mod:`engine.delivery`)."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped; ``Retry-After`` wins when longer."""

    base: float = 1.0
    cap: float = 3600.0

    def delay(self, attempt: int, retry_after: float | None = None, floor: float = 0.0) -> float:
        """Seconds before attempt number ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.cap, self.base * 2 ** min(attempt - 1, 30))
        jittered = ceiling / 2 + random.uniform(0, ceiling / 2)
        return float(max(jittered, retry_after or 0.0, floor))


@dataclass
class CircuitBreaker:
    """Pauses a destination that keeps failing; lets one probe through after ``cooldown``.

    Closed: everything flows. After ``threshold`` consecutive failed requests it opens for
    ``cooldown`` seconds (doubling on each failed probe up to ``max_cooldown``); then one
    request is let through (half-open), and its success closes the circuit.

    Every ``now`` is a reading of a monotonic clock (:func:`time.monotonic`), and so is
    ``open_until``: the pause is timed in seconds that pass, whatever the wall clock does. On
    the wall clock, a step back (NTP, an operator) kept a destination paused for as long as the
    step, though its platform was back; the outbox's schedule, shared by processes, stays on
    the wall clock.
    """

    threshold: int = 5
    cooldown: float = 10.0
    max_cooldown: float = 300.0
    failures: int = 0
    open_until: float = 0.0
    current_cooldown: float = 0.0
    probing: bool = False
    probes: int = 0  # probes let through so far: the number of the latest
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def allow(self, now: float) -> bool:
        """Whether a request may go now (``now``: :func:`time.monotonic`)."""
        return self.admit(now)[0]

    def admit(self, now: float) -> tuple[bool, int]:
        """Whether a batch may go now, and if it is the probe, its number (0: no probe).

        Decided together, so that another thread's success between two questions cannot make a
        batch taken for the probe; the number lets :meth:`end_probe` end that probe's turn
        only, never a later one's (``now``: :func:`time.monotonic`).
        """
        with self._lock:
            if self.failures < self.threshold:
                return True, 0
            if now < self.open_until or self.probing:
                return False, 0
            self.probing = True
            self.probes += 1
            return True, self.probes

    def end_probe(self, number: int | None = None) -> None:
        """The probe let through ended without a request to judge it by (its items were all
        settled before sending, or taken by another worker): let another go. With ``number``
        (from :meth:`admit`), only if no later probe has begun meanwhile."""
        with self._lock:
            if number is None or number == self.probes:
                self.probing = False

    def record(self, ok: bool, now: float) -> None:
        """Count a request's outcome (``now``: :func:`time.monotonic`).

        The pause starts when the circuit opens and doubles on a failed probe: once per probe,
        however many of its requests fail, and not for the requests of batches that were
        already under way when it opened.
        """
        with self._lock:
            probing, self.probing = self.probing, False
            if ok:
                self.failures = 0
                self.current_cooldown = 0.0
                return
            self.failures += 1
            if self.failures == self.threshold or (probing and self.failures > self.threshold):
                self.current_cooldown = min(
                    self.max_cooldown, max(self.cooldown, self.current_cooldown * 2)
                )
                self.open_until = now + self.current_cooldown

    @property
    def is_open(self) -> bool:
        """Whether the destination is paused."""
        return self.failures >= self.threshold
