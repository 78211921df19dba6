"""End to end: `tagrelay serve` under gunicorn with two workers, over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from engine.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from engine.server import KEEPALIVE_REQUESTS
from tests.support.server import LOG_ALL_RULES

pytestmark = pytest.mark.slow
READ_TIMEOUT = 3  # seconds a read of a request waits for the client (default 10)

KEY = "sk_e2e_0123456789"
SIGNED_KEY, SIGNING_SECRET = "sk_e2e_signed_0123", "whsec_e2e_secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
RULES = LOG_ALL_RULES


def tagrelay_command() -> list[str]:
    script = Path(sys.executable).parent / "tagrelay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `tagrelay serve` (master and workers in their own process group)."""

    def __init__(self, rules: Path, data_dir: Path) -> None:
        self.rules, self.data_dir = rules, data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAGRELAY_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return env | {
            "TAGRELAY_RULES": str(self.rules),
            "TAGRELAY_DATA_DIR": str(self.data_dir),
            "TAGRELAY_SERVER_KEYS": f"{KEY},{SIGNED_KEY}:{SIGNING_SECRET}",
            "TAGRELAY_BIND": f"127.0.0.1:{self.port}",
            "TAGRELAY_WORKERS": "2",
            "TAGRELAY_READ_TIMEOUT": str(READ_TIMEOUT),
            "TAGRELAY_DELIVER": "false",
            "TAGRELAY_LOG_LEVEL": "WARNING",
        }

    def start(self) -> None:
        # stderr goes to a file: a pipe nobody reads would block the workers once it is full.
        self.log = self.data_dir.parent / f"server-{self.port}.log"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [*tagrelay_command(), "serve"],
                env=self.env(),
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not become ready in 30 s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def track(self, event: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(self.url + "/v1/track", json=event, headers=AUTH, timeout=10)
        assert response.status_code == 200, f"{response.text}\nserver log:\n{self.output()}"
        body: dict[str, Any] = response.json()
        return body

    def count(self, sql: str) -> Any:
        with sqlite3.connect(self.data_dir / "tagrelay.db") as db:
            return db.execute(sql).fetchone()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("e2e")
    (root / "rules.yaml").write_text(RULES)
    running = Server(root / "rules.yaml", root / "data")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_health_and_readiness_answer(server: Server) -> None:
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url + "/readyz", timeout=5).json()
    assert ready["status"] == "ready"
    assert ready["checks"]["rules"]["tags"] == 1


def test_repeats_across_many_connections_store_one_event(server: Server) -> None:
    event = {"event_name": "purchase", "event_id": "e2e-dup-1", "properties": {"value": 5}}

    results = [server.track(event) for _ in range(20)]

    assert [r["duplicate"] for r in results] == [False] + [True] * 19
    assert {r["event_id"] for r in results} == {"e2e-dup-1"}
    assert server.count("SELECT COUNT(*) FROM events WHERE event_id = 'e2e-dup-1'") == 1
    assert server.count("SELECT COUNT(*) FROM deliveries WHERE event_id = 'e2e-dup-1'") == 1


def test_concurrent_repeats_on_both_workers_accept_the_event_once(server: Server) -> None:
    event = {"event_name": "purchase", "event_id": "e2e-race-1"}

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: server.track(event), range(48)))

    assert sum(1 for r in results if not r["duplicate"]) == 1
    assert server.count("SELECT COUNT(*) FROM events WHERE event_id = 'e2e-race-1'") == 1
    assert server.count("SELECT COUNT(*) FROM deliveries WHERE event_id = 'e2e-race-1'") == 1


def test_a_batch_answers_per_event(server: Server) -> None:
    events = [{"event_name": "lead", "event_id": "e2e-b1"}, {"event_id": "e2e-b2"}]

    response = requests.post(
        server.url + "/v1/track/batch", json={"events": events}, headers=AUTH, timeout=10
    )

    body = response.json()
    assert response.status_code == 200
    assert (body["accepted"], body["rejected"]) == (1, 1)
    assert body["results"][1] == {
        "success": False,
        "error": "event_name is required (event_type is accepted as an alias)",
    }


def test_a_signed_key_needs_a_valid_signature(server: Server) -> None:
    body = json.dumps({"event_name": "lead", "event_id": "e2e-signed"}).encode()
    stamp = str(int(time.time()))
    headers = {
        "Authorization": f"Bearer {SIGNED_KEY}",
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: signature(SIGNING_SECRET, stamp, body),
    }

    ok = requests.post(server.url + "/v1/track", data=body, headers=headers, timeout=10)
    unsigned = requests.post(
        server.url + "/v1/track",
        data=body,
        headers={"Authorization": f"Bearer {SIGNED_KEY}", "Content-Type": "application/json"},
        timeout=10,
    )

    assert ok.status_code == 200
    assert unsigned.status_code == 401
    assert unsigned.json()["success"] is False


def test_errors_over_http_are_json(server: Server) -> None:
    bad = requests.post(
        server.url + "/v1/track",
        data=b"{oops",
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=10,
    )
    missing = requests.get(server.url + "/nope", timeout=10)

    assert bad.status_code == 400 and bad.json()["success"] is False
    assert missing.status_code == 404 and missing.json() == {
        "success": False,
        "error": "no such endpoint",
    }


def read_answer(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer from a socket's file: its status, headers (lower-cased) and body."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def exchange(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """Send raw bytes on a keep-alive connection: the answer's status, headers and body, and
    what the server sent after it before closing (``b""``: it closed right after the answer).

    Fails (socket timeout) if the server keeps the connection open.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        stream = sock.makefile("rb")
        return *read_answer(stream), stream.read()


def post_head(extra: str) -> bytes:
    return (
        f"POST /v1/track HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is no hex number
        b"2\r\n{}XX0\r\n\r\n",  # a chunk not ended by CRLF
    ],
)
def test_a_malformed_chunked_body_is_a_json_400_that_closes_the_connection(
    server: Server, chunks: bytes
) -> None:
    # gunicorn reads a chunked body as the app reads it, and raises its own parse errors there.
    # What follows the broken framing is no request: the answer says the connection is done.
    status, headers, body, after = exchange(
        server, post_head("Transfer-Encoding: chunked\r\n") + chunks
    )

    assert status == 400 and json.loads(body) == {
        "success": False,
        "error": "the chunked body is malformed",
    }
    assert headers["connection"] == "close" and after == b""
    assert "unexpected error" not in server.output()


@pytest.mark.parametrize(
    "framing",
    [
        # declared over the 1 MB limit: refused before any of it is read
        f"Content-Length: {2 * 2**20}\r\n".encode() + b"\r\n" + b"x" * 1000,
        # chunked, over the limit once read
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"100000\r\n" + b"x" * 2**20 + b"\r\n") * 2,
    ],
    ids=["content-length", "chunked"],
)
def test_a_body_over_the_limit_is_a_413_that_closes_the_connection(
    server: Server, framing: bytes
) -> None:
    # Kept open, the server would read the refused body to find the next request behind it.
    head, _, rest = framing.partition(b"\r\n\r\n")
    status, headers, body, after = exchange(server, post_head(head.decode() + "\r\n") + rest)

    assert status == 413 and json.loads(body) == {
        "success": False,
        "error": "the body is over 1048576 bytes",
    }
    assert headers["connection"] == "close" and after == b""


@pytest.mark.parametrize(
    "framing",
    [b'Content-Length: 100\r\n\r\n{"event', b'Transfer-Encoding: chunked\r\n\r\n6\r\n{"even\r\n'],
    ids=["content-length", "chunked"],
)
def test_a_body_that_stops_arriving_is_a_408_that_closes_the_connection(
    server: Server, framing: bytes
) -> None:
    head, _, rest = framing.partition(b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT + 20) as sock:
        sock.sendall(post_head(head.decode() + "\r\n") + rest)  # and nothing more
        stream = sock.makefile("rb")
        status, headers, body = read_answer(stream)
        after = stream.read()

    assert status == 408 and json.loads(body) == {
        "success": False,
        "error": "the body stopped arriving before its end: send it whole, without pauses",
    }
    assert headers["connection"] == "close" and after == b""
    assert "unexpected error" not in server.output()


def test_clients_that_stop_mid_request_do_not_hold_the_server(server: Server) -> None:
    # Two workers of four threads: ten connections that stop part-way through their headers or
    # their body took every thread, each until its client closed it.
    stalled = []
    try:
        for n in range(10):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(post_head("Content-Length: 100\r\n") + b'{"ev' if n % 2 else b"POST /")
            stalled.append(sock)
        time.sleep(1)  # every thread waits on one of them
        started = time.monotonic()
        health = requests.get(server.url + "/healthz", timeout=2 * READ_TIMEOUT + 10)
        waited = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()

    assert health.status_code == 200 and waited < 2 * READ_TIMEOUT + 5
    assert '"level": "error"' not in server.output()


def test_connections_that_send_nothing_take_no_thread(server: Server) -> None:
    # gunicorn 24+ gave each new connection a thread that waited 5 s for its first bytes: forty
    # connections that sent nothing kept /healthz waiting about 25 s on two workers of four.
    idle = []
    try:
        for _ in range(40):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(0.5)
        started = time.monotonic()
        health = requests.get(server.url + "/healthz", timeout=60)
        waited = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()

    assert health.status_code == 200 and waited < 5  # it was about 25 s


def test_a_refused_request_that_was_read_whole_keeps_its_connection(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        too_many = json.dumps({"events": [{"event_name": "x"}] * 101}).encode()
        refusals = [
            (b"/v1/track", b"{oops", 400),
            (b"/v1/track/batch", too_many, 413),  # read whole, then counted
            (b"/v1/track", b"{oops", 400),
        ]
        for path, body, expected in refusals:  # all on one connection
            request = post_head(f"Content-Length: {len(body)}\r\n").replace(b"/v1/track", path)
            sock.sendall(request + body)
            status, headers, _ = read_answer(stream)
            assert (status, headers["connection"]) == (expected, "keep-alive")


def test_a_keep_alive_connection_is_closed_after_its_hundredth_request(server: Server) -> None:
    # The client then reconnects, and may land on another worker: long-lived connections from
    # a proxy do not all stay on the worker that first accepted them.
    answers: list[tuple[int, str | None]] = []
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        for _ in range(KEEPALIVE_REQUESTS):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, headers, _ = read_answer(stream)
            answers.append((status, headers.get("connection")))
        after = stream.read()  # the server closed its end: end of file, not another answer

    assert answers[:-1] == [(200, "keep-alive")] * (KEEPALIVE_REQUESTS - 1)
    assert answers[-1] == (200, "close")
    assert after == b""


def test_a_worker_tells_the_master_it_is_alive_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gthread beat on every pass of its loop: a utime() system call per request or more.
    from gunicorn.workers.gthread import ThreadWorker

    from engine import server as serving

    beats: list[float] = []
    monkeypatch.setattr(ThreadWorker, "notify", lambda self: beats.append(time.monotonic()))
    worker = object.__new__(serving._Worker)

    for _ in range(1000):
        worker.notify()
    assert len(beats) == 1
    monkeypatch.setattr(serving, "HEARTBEAT_INTERVAL", 0.0)  # as if a second had passed
    worker.notify()
    assert len(beats) == 2


def test_the_server_refuses_to_start_on_an_invalid_container(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("trigger: all", "trigger: al"))
    server = Server(rules, tmp_path / "data")

    done = subprocess.run(
        [*tagrelay_command(), "serve"],
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert f"{rules}:7:30: error: tag log_all: unknown trigger 'al'" in done.stderr
    assert "refusing to start" in done.stderr


def test_dedup_holds_across_a_restart(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    server = Server(rules, tmp_path / "data")
    event = {"event_name": "purchase", "event_id": "e2e-restart-1"}
    server.start()
    try:
        first = server.track(event)
    finally:
        server.stop()

    server.start()
    try:
        again = server.track(event)
    finally:
        server.stop()

    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert server.count("SELECT COUNT(*) FROM events WHERE event_id = 'e2e-restart-1'") == 1


def test_gunicorn_logs_a_refused_request_as_json_without_its_key_or_client_ip(
    server: Server,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # A request line gunicorn refuses (no HTTP version), with a key in its query string.
        sock.sendall(b"GET /v1/track?api_key=sk_live_LEAKED_IN_LOGS\r\n\r\n")
        sock.recv(4096)
    deadline = time.monotonic() + 10
    while "Invalid request" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)

    log = server.log.read_text()
    refused = [line for line in log.splitlines() if "Invalid request" in line]
    assert refused, log[-2000:]
    assert all(json.loads(line)["logger"] == "gunicorn.error" for line in refused)
    assert "LEAKED_IN_LOGS" not in log and "ip=127.0.0.1" not in log
