"""Log lines: JSON, and nothing from other libraries' messages that should not be logged."""

from __future__ import annotations

import json
import logging

import pytest

from engine import logs
from engine.logs import JsonFormatter


def _formatted(message: str, *args: str) -> str:
    record = logging.LogRecord("gunicorn.error", logging.WARNING, __file__, 1, message, args, None)
    return str(json.loads(JsonFormatter().format(record))["message"])


def test_log_lines_lose_query_strings_and_client_ips() -> None:
    line = _formatted("Error handling request %s %s", "GET", "/v1/track?api_key=sk_live_x")

    assert line == "Error handling request GET /v1/track?[redacted]"


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (
            "Invalid HTTP request line: 'GET /v1/track?api_key=sk_live_x'",
            "Invalid HTTP request line: ",
        ),
        # A header line without a colon is quoted whole: a server key, an e-mail address
        ("Invalid HTTP Header: 'Authorization Bearer sk_live_x'", "Invalid HTTP Header: "),
        ('Invalid HTTP header name: "X-Email ada@example.com"', "Invalid HTTP header name: "),
        ("Invalid chunk size", "Invalid chunk size"),
    ],
)
def test_a_refused_request_line_keeps_its_error_but_not_what_the_error_quotes(
    error: str, kept: str
) -> None:
    line = _formatted("Invalid request from ip=%s: %s", "2001:db8::7", error)

    assert line == "Invalid request from ip=[redacted]: " + kept + (
        "[redacted]" if kept != error else ""
    )


def test_urllib3_request_lines_are_not_logged_even_at_debug() -> None:
    logs.configure("DEBUG")
    try:
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    finally:
        logs.configure("INFO")


def test_a_throttle_lets_each_key_through_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(60.0)

    first = [throttle.due("a"), throttle.due("a"), throttle.due("b"), throttle.due()]
    clock[0] += 59.9
    within = throttle.due("a")
    clock[0] += 0.1
    after = throttle.due("a")

    assert first == [True, False, True, True]
    assert (within, after) == (False, True)
