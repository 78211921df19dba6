"""A small loopback HTTP server for platform emulators.

Each emulator is a function (or an object with ``__call__``) that takes a :class:`Request` and
returns a :class:`Reply`. :class:`LoopbackServer` runs it on ``127.0.0.1`` with an ephemeral
port in a background thread, records every request it received, and turns an exception in the
handler into a 500 reply (and keeps the exception in :attr:`LoopbackServer.errors`) so a buggy
emulator fails the test instead of hanging it.

Usage::

    def handler(request: Request) -> Reply:
        return Reply.json({"ok": True})

    with LoopbackServer(handler) as server:
        requests.post(server.url + "/v1/things", json={...}, timeout=5)
        assert server.requests[0].json() == {...}

:func:`send` delivers a destination's :class:`~destinations.base.HttpRequest` with ``requests``
and returns the :class:`~destinations.base.HttpResponse` the adapter reads, so adapter tests go
through real HTTP end to end.

This module is shared by every emulator; keep its API stable.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import requests

from destinations.base import HttpRequest, HttpResponse


@dataclass(frozen=True)
class Request:
    """One request as the emulator received it.

    Attributes:
        method: the HTTP method, upper case.
        path: the URL path, without the query string (e.g. ``/v26.0/123/events``).
        query: the query string parameters, each with all its values.
        headers: the request headers, keys lower-cased.
        body: the raw request body.
    """

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        return self.headers.get(name.lower())

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        """The body decoded as JSON, or None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    def form(self) -> dict[str, list[str]]:
        """The body decoded as ``application/x-www-form-urlencoded``."""
        return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass(frozen=True)
class Reply:
    """What the emulator answers."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
        """A JSON reply with ``Content-Type: application/json``."""
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        return cls(status, json.dumps(obj).encode(), all_headers)

    @classmethod
    def reset(cls) -> Reply:
        """No answer at all: the connection is reset (TCP RST) instead."""
        return cls(status=0)

    @classmethod
    def text(cls, text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
        """A plain-text reply (for platforms that answer HTML or text on some errors)."""
        all_headers = {"Content-Type": "text/plain; charset=utf-8"}
        all_headers.update(headers or {})
        return cls(status, text.encode(), all_headers)


Handler = Callable[[Request], Reply]
"""An emulator: a function from one request to its reply. Called from server threads."""


class LoopbackServer:
    """Runs ``handler`` on ``127.0.0.1:<ephemeral port>`` in a daemon thread.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The handler is called
    from the server's threads; emulators guard shared state with their own lock if they keep any.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._errors: list[BaseException] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> LoopbackServer:
        """Bind the port and start serving; returns self."""
        if self._httpd is not None:
            return self
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler_class(self))
        self._httpd.daemon_threads = True
        # A short poll interval makes stop() quick (the default 0.5 s adds up over many tests).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.01,), name="emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests look at ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, ``http://127.0.0.1:<port>``, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """A copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by the handler (each was answered with a 500)."""
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        """Forget the recorded requests and errors."""
        with self._lock:
            self._requests.clear()
            self._errors.clear()

    # -- internals -------------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Reply:
        with self._lock:
            self._requests.append(request)
        try:
            return self.handler(request)
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            return Reply.text(f"emulator error: {type(exc).__name__}: {exc}", status=500)


def _make_handler_class(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The body is written after the headers: with Nagle's algorithm it waited for the
        # client's delayed ACK, 40 ms on every request of a kept-alive connection.
        disable_nagle_algorithm = True

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            parts = urlsplit(self.path)
            request = Request(
                method=self.command.upper(),
                path=parts.path,
                query=parse_qs(parts.query, keep_blank_values=True),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            reply = server._dispatch(request)
            if reply.status == 0:
                # SO_LINGER with a zero timeout makes close() send RST: a "connection reset".
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command.upper() != "HEAD":
                self.wfile.write(reply.body)

        def finish(self) -> None:
            with contextlib.suppress(OSError):  # the connection was reset on purpose
                super().finish()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        def log_message(self, format: str, *args: Any) -> None:
            # Quiet: request lines would carry tokens in query strings.
            return

    return _Handler


def send(request: HttpRequest, timeout: float = 10.0) -> HttpResponse:
    """Send ``request`` over real HTTP with ``requests``; the answer as the engine would see it."""
    answer = requests.request(
        request.method,
        request.url,
        headers=dict(request.headers),
        data=request.body,
        timeout=timeout,
    )
    return HttpResponse(answer.status_code, dict(answer.headers), answer.content)


class Emulator:
    """What a platform emulator shares: a :class:`LoopbackServer` that answers through the
    emulator's ``__call__``, used as a context manager, and faults queued for the next
    requests (:meth:`fail_next`), which ``__call__`` takes with :meth:`_next_fault`.
    """

    def __init__(self) -> None:
        self._faults: list[str] = []
        self._lock = threading.Lock()
        self.server = LoopbackServer(self)

    def __call__(self, request: Request) -> Reply:
        """The platform's answer to ``request``."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.stop()

    @property
    def url(self) -> str:
        """The base URL to use as the adapter's ``endpoint`` setting."""
        return self.server.url

    def fail_next(self, fault: str, times: int = 1) -> None:
        """Answer the next ``times`` requests with ``fault`` instead of processing them."""
        with self._lock:
            self._faults.extend([fault] * times)

    def _next_fault(self) -> str | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None
