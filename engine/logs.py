"""JSON log lines for production, with redaction by design.

Messages are constant strings; variables go in ``extra`` and become JSON fields. Fields whose
names suggest secrets or personal data are never written, whatever a caller passes.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
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
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)
