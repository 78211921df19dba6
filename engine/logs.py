"""JSON log lines for production, with redaction by design.

Messages are constant strings; variables go in ``extra`` and become JSON fields. Fields whose
names suggest secrets or personal data are never written, whatever a caller passes. Messages
that other libraries format themselves (gunicorn's "Invalid request from ip=...: <request
line>", urllib3's request lines) lose their query strings, which can carry an API key or a
platform secret, and client IPs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Any

from gunicorn import glogging

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_NEVER = frozenset(
    {
        "email",
        "phone",
        "ip",
        "user_agent",
        "token",
        "access_token",
        "api_secret",
        "secret",
        "password",
        "authorization",
        "key",
        "server_key",
        "payload",
        "body",
        "user_data",
    }
)


# A query string glued to a path or URL ("/v1/track?api_key=...", "...collect?api_secret=..."),
# and gunicorn's "ip=<client address>" (an IPv6 address holds colons, never ": ").
_QUERY = re.compile(r"(?<=\S)\?[^\s'\"]+")
_CLIENT_IP = re.compile(r"\bip=\S*?(?=: |,|\s|$)")


# gunicorn's line for a request it refused: "Invalid request from ip=<ip>: <error>", where the
# error quotes what it could not read: a request line, a header line whole ("Authorization
# Bearer <key>" with no colon), a header name or value.
_REFUSED = "Invalid request from "


def scrub(text: str) -> str:
    """``text`` without query strings, client IPs and what a refused request's line quotes."""
    if text.startswith(_REFUSED):
        quotes = [i for i in (text.find("'"), text.find('"')) if i >= 0]
        if quotes:
            text = text[: min(quotes)] + "[redacted]"
    if "?" in text:
        text = _QUERY.sub("?[redacted]", text)
    if "ip=" in text:
        text = _CLIENT_IP.sub("ip=[redacted]", text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _RESERVED or key.startswith("_"):
                continue
            out[key] = "[redacted]" if key.lower() in _NEVER else value
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type only: messages and tracebacks can carry payload data.
            out["exception"] = record.exc_info[0].__name__
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    """Send JSON lines to stderr at ``level`` (idempotent)."""
    # urllib3 logs every request line at DEBUG, with the query string that carries GA4's
    # api_secret; scrubbing would catch it, but those lines are noise for tagrelay's users too.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)


class GunicornLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's own lines (start, workers, refused requests) as JSON, scrubbed like ours.

    gunicorn writes plain-text lines of its own, among them a refused request's client IP and
    request line, API key included.
    """

    def setup(self, cfg: Any) -> None:
        """gunicorn's set-up, then our handler in place of its plain-text one."""
        super().setup(cfg)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        self.error_log.handlers[:] = [handler]

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """gunicorn's error with its exception, but a read that timed out at DEBUG.

        A client that stops part-way through its request's headers fails the read after the
        read timeout (``TAGRELAY_READ_TIMEOUT``), which gthread logs as a socket error; the
        connection is closed, and there is nothing for an operator to do (any client can cause
        it at will).
        """
        if isinstance(sys.exc_info()[1], BlockingIOError | TimeoutError):
            self.error_log.debug("a client stopped sending its request; connection closed")
            return
        self.error_log.exception(msg, *args, **kwargs)


class Throttle:
    """When a repeated condition is logged: at most once per ``interval`` seconds for each key.

    A failure that comes with every request or every event (a full disk, a store outage, a
    plugin's bug) would otherwise write a line each, thousands a second, drowning the rest of
    the log. Thread-safe; keys are few (a constant, an adapter's name).
    """

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def due(self, key: Hashable = None) -> bool:
        """Whether to log now for ``key``; if so, the next time is ``interval`` from now."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -math.inf) < self.interval:
                return False
            self._last[key] = now
            return True
