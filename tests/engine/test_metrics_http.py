"""The ``GET /metrics`` of a ``tagrelay worker`` (``metrics.serve_metrics``)."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest

from engine import metrics
from tests.support.server import free_port


def test_a_scraper_that_resets_its_connection_is_no_traceback_and_no_client_address(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    server = metrics.serve_metrics(f"127.0.0.1:{port}", dict)
    try:
        with caplog.at_level(logging.DEBUG, logger="engine.metrics"):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET /met")
            time.sleep(0.2)  # the server is reading the request line
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # a reset, not a clean close
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()

    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr
    assert "127.0.0.1" not in stderr
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == ("DEBUG", "metrics scrape failed")
    assert record.error_type == "ConnectionResetError"
