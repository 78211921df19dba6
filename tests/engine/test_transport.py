"""The transport against real loopback servers: the whole answer within connect + timeout, and
pooled connections reused."""

from __future__ import annotations

import gzip
import socket
import threading
import time

import pytest
import urllib3.response

from destinations.base import HttpRequest
from destinations.testkit.raw import RawServer, read_request
from engine.transport import Transport, TransportError


class KeepAliveServer(RawServer):
    """A loopback HTTP/1.1 server that keeps connections open and answers each request by the
    next of ``answers``: ``"fast"`` at once, ``"headers"`` with its header lines one byte every
    ``pause`` seconds, ``"body"`` with its body so. Counts the connections it accepted."""

    def __init__(self, answers: list[str], pause: float = 0.1) -> None:
        self.answers, self.pause = list(answers), pause
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        """Answer the connection's requests, one by one, until ``answers`` runs out."""
        with conn, conn.makefile("rb") as request:
            try:
                while self.answers:
                    if not read_request(request):
                        return  # the client closed the connection
                    self._answer(conn, self.answers.pop(0))
            except OSError:
                return  # the client gave up

    def _answer(self, conn: socket.socket, how: str) -> None:
        head = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 40 + b"\r\nContent-Length: 40\r\n\r\n"
        body = b"y" * 40
        if how == "fast":
            conn.sendall(head + body)
            return
        trickled, at_once = (head, body) if how == "headers" else (body, head)
        if how == "body":
            conn.sendall(at_once)
        for byte in trickled:
            time.sleep(self.pause)
            conn.sendall(bytes([byte]))
        if how == "headers":
            conn.sendall(at_once)


@pytest.fixture
def transport() -> Transport:
    return Transport(connect_timeout=0.5)


def send(transport: Transport, server: KeepAliveServer, timeout: float) -> float:
    """Send one request; how long it took. Raises what the transport raised."""
    started = time.monotonic()
    try:
        transport.send(HttpRequest.json_post(server.url, {"n": 1}), timeout)
    finally:
        took = time.monotonic() - started
    return took


def send_timing_out(transport: Transport, server: KeepAliveServer, timeout: float) -> float:
    """Send one request that must time out; how long it took to."""
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        send(transport, server, timeout)
    return time.monotonic() - started


def test_headers_trickling_in_past_the_deadline_time_out_within_connect_plus_timeout(
    transport: Transport,
) -> None:
    # Arrange: each header byte comes 0.1 s after the last (within the 1 s read timeout); the
    # head is about 80 bytes, so 8 s in all
    server = KeepAliveServer(["headers"])

    # Act
    took = send_timing_out(transport, server, timeout=1.0)
    server.close()

    # Assert: connect (0.5 s) + timeout (1 s), and a little slack
    assert took < 1.5 + 0.5


def test_a_body_trickling_in_past_the_deadline_times_out_without_urllib3_response_shutdown(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: HTTPResponse.shutdown came with urllib3 2.3; the deadline must not need it
    monkeypatch.delattr(urllib3.response.HTTPResponse, "shutdown", raising=False)
    server = KeepAliveServer(["body"])

    # Act
    took = send_timing_out(transport, server, timeout=1.0)
    server.close()

    # Assert
    assert took < 1.5 + 0.5


def test_pooled_connection_is_reused_and_its_next_request_has_a_deadline_too(
    transport: Transport,
) -> None:
    # Arrange
    server = KeepAliveServer(["fast", "fast", "headers"])

    # Act
    send(transport, server, timeout=1.0)
    send(transport, server, timeout=1.0)
    took = send_timing_out(transport, server, timeout=1.0)
    server.close()

    # Assert: one connection for all three, and the third cut at its own deadline
    assert server.connections == 1
    assert took < 1.5 + 0.5


def test_a_deadline_that_passed_does_not_cut_the_next_request_on_the_connection(
    transport: Transport,
) -> None:
    # Arrange: a request answered well within its deadline, then another on the same
    # connection that outlives the first one's deadline
    server = KeepAliveServer(["fast", "body"], pause=0.02)

    # Act: the second answer takes 0.8 s, past the first request's deadline (0.5 + 0.3 s)
    send(transport, server, timeout=0.3)
    took = send(transport, server, timeout=1.0)
    server.close()

    # Assert
    assert server.connections == 1
    assert 0.7 < took < 1.5


def test_a_deadline_never_cuts_the_pooled_connection_another_request_has_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's timer fires after A put its connection back and B took it, before B's request()
    claimed it: it used to cut B's connection (B failed, A reported a timeout and was sent
    again). The two gaps are real; the sleeps only widen them."""
    import requests.models

    from engine import transport

    server = KeepAliveServer(["fast", "fast"])
    close, get = requests.models.Response.close, transport._DeadlineHTTPPool._get_conn

    def slow_close(self: requests.models.Response) -> None:
        close(self)
        if threading.current_thread().name == "A":
            time.sleep(1.0)  # A: connection back in the pool, still inside its deadline

    def slow_get(self: transport._DeadlineHTTPPool, timeout: float | None = None) -> object:
        conn = get(self, timeout)
        if threading.current_thread().name == "B":
            time.sleep(1.0)  # B: connection taken, its request not yet sent
        return conn

    monkeypatch.setattr(requests.models.Response, "close", slow_close)
    monkeypatch.setattr(transport._DeadlineHTTPPool, "_get_conn", slow_get)
    sender = Transport(connect_timeout=0.3)
    results: dict[str, str] = {}

    def send(name: str, timeout: float) -> None:
        try:
            results[name] = str(sender.send(HttpRequest.json_post(server.url, {}), timeout).status)
        except TransportError as exc:
            results[name] = str(exc)

    a = threading.Thread(target=send, args=("A", 0.3), name="A")
    a.start()
    time.sleep(0.1)
    b = threading.Thread(target=send, args=("B", 5.0), name="B")
    b.start()
    a.join()
    b.join()

    assert results == {"A": "200", "B": "200"}


class OneAnswerServer(RawServer):
    """Answers every request with ``head`` (header lines, no blank line) and ``body``, then
    closes the connection."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head, self.body = head, body
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        """Read the request's head and body, answer, close."""
        with conn, conn.makefile("rb") as request:
            read_request(request)
            try:
                conn.sendall(self.head + b"\r\n" + self.body)
            except OSError:
                return  # the client stopped reading


def _answering(body: bytes, *headers: bytes) -> OneAnswerServer:
    lines = [b"HTTP/1.1 200 OK", b"Connection: close", *headers]
    return OneAnswerServer(b"".join(line + b"\r\n" for line in lines), body)


def test_an_answer_within_the_cap_is_read_whole() -> None:
    server = _answering(b"z" * 1000, b"Content-Length: 1000")
    response = Transport(max_response_bytes=1000).send(HttpRequest.json_post(server.url, {}), 5)
    assert response.status == 200
    assert response.body == b"z" * 1000


@pytest.mark.parametrize("framing", [b"Content-Length: 5000", None], ids=["length", "unframed"])
def test_an_answer_over_the_cap_is_cut_there_and_its_status_stands(
    framing: bytes | None,
) -> None:
    # A 2xx stays a delivery: read as a failure, a webhook got the event again at each retry.
    server = _answering(b"z" * 5000, *([framing] if framing else []))

    response = Transport(max_response_bytes=1000).send(HttpRequest.json_post(server.url, {}), 5)

    assert (response.status, response.body) == (200, b"z" * 1000)


def test_a_small_compressed_answer_that_unpacks_past_the_cap_is_cut_there() -> None:
    bomb = gzip.compress(b"\0" * 200_000)
    assert len(bomb) < 1000
    server = _answering(bomb, b"Content-Encoding: gzip", f"Content-Length: {len(bomb)}".encode())

    response = Transport(max_response_bytes=1000).send(HttpRequest.json_post(server.url, {}), 5)

    assert response.body == b"\0" * 1000


def test_the_default_cap_is_megabytes() -> None:
    assert Transport().max_response_bytes == 8 * 1024 * 1024
