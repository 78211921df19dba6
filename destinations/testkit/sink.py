"""A fault-injecting webhook sink: answers per a script of faults, records what arrived.

Faults: ``ok``, ``500``, ``429`` (with ``Retry-After``), ``hang`` (sleeps past the client's
timeout), ``reset`` (TCP reset, no answer), ``slow`` (answers after a delay).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from destinations.testkit.server import Reply, Request


class FaultySink:
    """The handler. ``faults`` are used one per request, then ``default`` for the rest."""

    def __init__(self, default: str = "ok", retry_after: int = 120, delay: float = 2.0) -> None:
        self.default = default
        self.faults: list[str] = []
        self.retry_after = retry_after
        self.delay = delay
        self.received: list[dict[str, Any]] = []  # payloads of answered-OK requests
        self.max_body: int | None = None  # longer request bodies are answered 413
        self._lock = threading.Lock()

    def script(self, *faults: str) -> None:
        """Use these faults for the next requests, in order."""
        with self._lock:
            self.faults.extend(faults)

    def ids(self) -> Counter[str]:
        """How many times each event ID arrived."""
        with self._lock:
            return Counter(str(p.get("event_id")) for p in self.received)

    def __call__(self, request: Request) -> Reply:
        if self.max_body is not None and len(request.body) > self.max_body:
            # As nginx answers a body over client_max_body_size, before reading it.
            return Reply.json({"error": "request entity too large"}, 413)
        with self._lock:
            fault = self.faults.pop(0) if self.faults else self.default
        if fault == "hang":
            time.sleep(self.delay)
            return Reply.json({"late": True})
        if fault == "reset":
            return Reply.reset()
        if fault == "500":
            return Reply.json({"error": "boom"}, 500)
        if fault == "413":
            return Reply.json({"error": "request entity too large"}, 413)
        if fault == "413-later":  # too large for now (RFC 9110: with Retry-After)
            return Reply.json({"error": "busy"}, 413, {"Retry-After": str(self.retry_after)})
        if fault == "401":
            return Reply.json({"error": "invalid token"}, 401)
        if fault == "429":
            return Reply.json({"error": "slow down"}, 429, {"Retry-After": str(self.retry_after)})
        if fault == "slow":
            time.sleep(self.delay)
        body = request.json()
        payloads = body["events"] if isinstance(body, dict) and "events" in body else [body]
        with self._lock:
            self.received.extend(p for p in payloads if isinstance(p, dict))
        return Reply.json({"ok": True})
