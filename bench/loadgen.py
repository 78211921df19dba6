"""Load generators: ``wrk`` when installed, else a small keep-alive Python client.

Both run in their own process (never in a server's), keep every connection alive, give each
request unique event IDs (every :data:`workload.PLACEHOLDER` in a body template becomes its own
ID) and stop at whichever comes first: ``max_requests`` or ``duration`` seconds.

The Python client speaks just enough HTTP/1.1 for this (Content-Length bodies, keep-alive) on
raw sockets, because ``http.client`` costs more CPU per request than a bare Flask app does, and
client and servers share the machine's cores.

Run as a script, it is the Python client: ``python bench/loadgen.py SPEC.json`` prints a JSON
result (used by :func:`run_load` when ``wrk`` is absent).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workload import NUMBER, PLACEHOLDER

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LoadSpec:
    """One measurement: where to send what, how hard and for how long."""

    host: str
    port: int
    path: str
    templates: list[str]
    headers: dict[str, str]
    duration: float
    max_requests: int
    connections: int
    threads: int
    run_id: str
    # Each connection's every nth request asks to close it (0: never), so that the connections
    # are accepted afresh and spread over the workers, also at a few requests a second.
    close_every: int = 0


@dataclass(frozen=True)
class LoadResult:
    """What one measurement gave."""

    tool: str
    requests: int
    bad: int  # non-200 answers and socket errors
    seconds: float
    p50_ms: float | None
    p99_ms: float | None

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def wrk_path() -> str | None:
    """The ``wrk`` binary, if installed."""
    return shutil.which("wrk")


def run_load(spec: LoadSpec, tool: str = "auto") -> LoadResult:
    """Drive one measurement with ``wrk`` (``auto`` when installed) or the Python client."""
    if tool == "wrk" or (tool == "auto" and wrk_path()):
        return _run_wrk(spec)
    return _run_python(spec)


# -- wrk ----------------------------------------------------------------------------------------

_LUA = """
local templates = {%(templates)s}
local ntemplates = #templates
local req_headers = {%(headers)s}
local closing_headers = {%(headers)s, ["Connection"] = "close"}
local close_every = %(close_every)d
local max_per_thread = %(max_per_thread)d
local all_threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(all_threads, thread)
end

function init(args)
  counter = 0
  responses = 0
  bad = 0
  prefix = "%(run_id)s-" .. tid .. "-"
end

function request()
  counter = counter + 1
  local body = templates[(counter %% ntemplates) + 1]
  local n = 0
  body = body:gsub("%(placeholder)s", function()
    n = n + 1
    return prefix .. counter .. "-" .. n
  end)
  body = body:gsub("%(number)s", string.format("%%07d", (tid * 1000000 + counter) %% 10000000))
  local headers = req_headers
  if close_every > 0 and counter %% close_every == 0 then headers = closing_headers end
  return wrk.format("POST", "%(path)s", headers, body)
end

function response(status, headers, body)
  responses = responses + 1
  if status ~= 200 then bad = bad + 1 end
  if responses >= max_per_thread then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local total_bad = 0
  for _, thread in ipairs(all_threads) do total_bad = total_bad + (thread:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests": %%d, "us": %%d, "bad": %%d, "sock": %%d, "p50": %%d, "p99": %%d}\\n',
    summary.requests, summary.duration, total_bad,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _lua_string(text: str) -> str:
    level = "=" * 4
    assert f"]{level}]" not in text
    return f"[{level}[{text}]{level}]"


def _run_wrk(spec: LoadSpec) -> LoadResult:
    threads = max(1, min(spec.threads, spec.connections))
    script = _LUA % {
        "templates": ",\n".join(_lua_string(t) for t in spec.templates),
        "headers": ", ".join(
            f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in spec.headers.items()
        ),
        "max_per_thread": max(1, spec.max_requests // threads),
        "run_id": spec.run_id,
        "placeholder": PLACEHOLDER,
        "number": NUMBER,
        "path": spec.path,
        "close_every": spec.close_every,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
        script_path = fh.name
    try:
        cmd = [
            str(wrk_path()),
            f"-t{threads}",
            f"-c{spec.connections}",
            f"-d{max(1, round(spec.duration))}s",
            "--timeout",
            "30s",
            "-s",
            script_path,
            f"http://{spec.host}:{spec.port}{spec.path}",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=spec.duration + 60, check=False
        )
    finally:
        os.unlink(script_path)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    data = json.loads(line[len("RESULT ") :])
    return LoadResult(
        tool="wrk",
        requests=data["requests"],
        bad=data["bad"] + data["sock"],
        seconds=data["us"] / 1e6,
        p50_ms=data["p50"] / 1000,
        p99_ms=data["p99"] / 1000,
    )


# -- the Python client --------------------------------------------------------------------------


def _run_python(spec: LoadSpec) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(asdict(spec), fh)
        spec_path = fh.name
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), spec_path],
            capture_output=True,
            text=True,
            timeout=spec.duration + 60,
            check=False,
        )
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        raise RuntimeError(f"the Python load client failed: {proc.stderr[-2000:]}")
    return LoadResult(**json.loads(proc.stdout))


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends prebuilt requests."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""
        return sock

    def roundtrip(self, request: bytes) -> int:
        """Send one request and read its answer; the status code."""
        sock = self.sock or self._connect()
        sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buf = rest[length:]
        if close:
            self.close()
        return status

    def close(self) -> None:
        """Drop the connection (the next request reconnects)."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None


def _client(spec: LoadSpec) -> dict[str, Any]:
    parts = [t.encode().split(PLACEHOLDER.encode()) for t in spec.templates]
    number = NUMBER.encode()
    head = f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in spec.headers.items()
    )
    budget = itertools.count()
    deadline = time.perf_counter() + spec.duration
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"requests": 0, "bad": 0}

    def worker(tid: int) -> None:
        conn = _Connection(spec.host, spec.port)
        mine: list[float] = []
        done = bad = 0
        for n in itertools.count():
            if next(budget) >= spec.max_requests or time.perf_counter() >= deadline:
                break
            pieces = parts[n % len(parts)]
            ids = [f"{spec.run_id}-{tid}-{n}-{i}".encode() for i in range(len(pieces) - 1)]
            body = b"".join(itertools.chain.from_iterable(zip(pieces, [*ids, b""], strict=True)))
            body = body.replace(number, b"%07d" % ((tid * 1_000_000 + n) % 10_000_000))
            last = spec.close_every and (n + 1) % spec.close_every == 0
            closing = "Connection: close\r\n" if last else ""
            request = f"{head}{closing}Content-Length: {len(body)}\r\n\r\n".encode() + body
            start = time.perf_counter()
            try:
                status = conn.roundtrip(request)
            except OSError:
                conn.close()
                bad += 1
                continue
            mine.append(time.perf_counter() - start)
            done += 1
            bad += status != 200
        conn.close()
        with lock:
            latencies.extend(mine)
            counts["requests"] += done
            counts["bad"] += bad

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(spec.connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "tool": "python",
        "requests": counts["requests"],
        "bad": counts["bad"],
        "seconds": seconds,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
    }


def main() -> None:
    """Run the Python client on the spec file named on the command line; print JSON."""
    spec = LoadSpec(**json.loads(Path(sys.argv[1]).read_text()))
    sys.stdout.write(json.dumps(_client(spec)) + "\n")


if __name__ == "__main__":
    main()
