"""A fake Slack incoming webhook: a real HTTP server on 127.0.0.1 that records what it receives.

A module with its own name (not ``conftest``) so test modules can import it unambiguously when
pytest collects these tests together with tagrelay's own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    """One request the fake webhook received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeSlack:
    """What the fake webhook answers next, and every request it received."""

    url: str = ""
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def answer(self, status: int, body: str, **headers: str) -> None:
        """Answer the following requests with ``status``, ``body`` and ``headers``."""
        self.status, self.body, self.headers = status, body.encode(), dict(headers)


def _handler(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            fake.received.append(
                Received(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
            )
            self.send_response(fake.status)
            self.send_header("Content-Type", "text/html")
            for name, value in fake.headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            self.wfile.write(fake.body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

    return Handler


@contextmanager
def serve() -> Iterator[FakeSlack]:
    """Run a fake webhook on an ephemeral loopback port for the duration of the block."""
    fake = FakeSlack()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    fake.url = f"http://{host!s}:{port}/services/T000/B000/XXXXSECRETXXXX"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
