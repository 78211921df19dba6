"""Log lines: JSON, and nothing from other libraries' messages that should not be logged."""

from __future__ import annotations

import json
import logging

from engine import logs
from engine.logs import JsonFormatter


def test_log_lines_lose_query_strings_and_client_ips() -> None:
    record = logging.LogRecord(
        "gunicorn.error",
        logging.WARNING,
        __file__,
        1,
        "Invalid request from ip=%s: %s",
        ("2001:db8::7", "Invalid HTTP request line: 'GET /v1/track?api_key=sk_live_x'"),
        None,
    )
    line = json.loads(JsonFormatter().format(record))

    assert line["message"] == (
        "Invalid request from ip=[redacted]: Invalid HTTP request line: 'GET /v1/track?[redacted]'"
    )


def test_urllib3_request_lines_are_not_logged_even_at_debug() -> None:
    logs.configure("DEBUG")
    try:
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    finally:
        logs.configure("INFO")
