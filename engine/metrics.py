"""Prometheus metrics (``GET /metrics``).

Under gunicorn every worker process counts on its own; ``tagrelay serve`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, and the endpoint
then sums what all processes wrote. Outbox depth is read from the store at scrape time, so it is
the truth across hosts too.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from engine.logs import Throttle

log = logging.getLogger(__name__)

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_INITIAL_FILE_BYTES = 1 << 16  # prometheus_client's first size of a process's file


def _allocate(fd: int, size: int) -> None:
    """Give the first ``size`` bytes of the file at ``fd`` disk blocks (growing it if shorter).

    Raises:
        OSError: the file system is full (ENOSPC, EDQUOT, EFBIG). A file system that cannot
            allocate ahead (no ``fallocate``) is left as it is.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as exc:  # AttributeError: a platform without it
        if isinstance(exc, OSError) and exc.errno in _FULL:
            raise


class _AllocatedMmapedDict(MmapedDict):
    """prometheus_client's file of one process's counts, with its disk blocks allocated before
    they are written through the memory map.

    The library sizes the file with ``truncate``, which allocates nothing, and writes through
    ``mmap``: on a full disk, a write to a page without a block is a SIGBUS, which kills the
    process. Measured: every gunicorn worker started while the disk was full (after a SIGHUP, or
    one that replaced a crashed worker) died at its first count, was started again and died
    again, and no request got an answer, not the 503 that says to retry. Allocated first, a
    full disk is an OSError when a file is made or grown, which :func:`inc` and
    :func:`observe` log as a lost count.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                try:
                    _allocate(fd, max(size, _INITIAL_FILE_BYTES))
                except OSError:
                    if size == 0:  # made here: an empty file is no file of counts to a scrape
                        os.unlink(filename)
                    raise
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]  # untyped upstream

    def _init_value(self, key: str) -> None:
        """The library's, with the file's new size allocated before it grows into it.

        Read from the library's own attributes; a version without them grows its file as it
        would have (a count is then a SIGBUS on a full disk again, never an error here).
        """
        capacity, used, file = (getattr(self, a, None) for a in ("_capacity", "_used", "_f"))
        if isinstance(capacity, int) and isinstance(used, int) and capacity > 0 and file:
            encoded = len(key.encode("utf-8"))
            entry = 4 + encoded + (8 - (encoded + 4) % 8) + 16  # as the library packs one
            grown = capacity
            while used + entry > grown:
                grown *= 2
            if grown > capacity:
                _allocate(file.fileno(), grown)
        super()._init_value(key)  # type: ignore[no-untyped-call]  # untyped upstream


# prometheus_client opens each process's files through this module-level name, when a labelled
# metric first counts (never at import), so replacing it here covers every file of the process.
_values.MmapedDict = _AllocatedMmapedDict  # type: ignore[attr-defined]  # an internal name

EVENTS = Counter(
    "tagrelay_events", "Events received, by outcome (accepted, duplicate, rejected)", ["outcome"]
)
TAGS = Counter(
    "tagrelay_tag_decisions",
    "Tag decisions on accepted events: fired, or blocked and why",
    ["tag", "outcome", "reason"],
)
DELIVERIES = Counter(
    "tagrelay_deliveries",
    "Delivery outcomes per destination (delivered, retried, dead_lettered)",
    ["destination", "outcome"],
)
REJECTED_REQUESTS = Counter(
    "tagrelay_rejected_requests", "Intake requests refused, by HTTP status", ["status"]
)
REQUEST_SECONDS = Histogram(
    "tagrelay_delivery_request_seconds",
    "Duration of one request to a destination",
    ["destination"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LATENCY_SECONDS = Histogram(
    "tagrelay_delivery_latency_seconds",
    "Time from acceptance to delivery",
    ["destination"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)


class Tally:
    """Counter increments for the intake path, added to the counters at most once a second.

    Under gunicorn every increment of a multiprocess counter writes a memory-mapped file and
    first asks the kernel for the process ID; an accepted event makes several (one per tag
    decision). Here they are summed in process and flushed together: on the first count after
    a second has passed, by a timer a second after the last count, and before a scrape of
    this process, so a scrape is at most a second behind the other processes.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: collections.Counter[tuple[Counter, tuple[str, ...]]] = collections.Counter()
        self._flushed = time.monotonic()
        self._timer: threading.Timer | None = None

    def add(self, counter: Counter, *labels: str) -> None:
        """Count one for ``counter`` with ``labels``."""
        self.add_many([(counter, labels)])

    def add_many(self, counts: Iterable[tuple[Counter, tuple[str, ...]]]) -> None:
        """Count one for each ``(counter, labels)`` (a request's counts, under one lock)."""
        with self._lock:
            pending = self._pending
            for key in counts:
                pending[key] += 1
            due = time.monotonic() - self._flushed >= self.interval
            if not due and self._timer is None:
                self._timer = threading.Timer(self.interval, self.flush)
                self._timer.daemon = True
                self._timer.start()
        if due:
            self.flush()

    def flush(self) -> None:
        """Add every pending count to its counter."""
        with self._lock:
            pending, self._pending = self._pending, collections.Counter()
            self._flushed = time.monotonic()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for (counter, labels), n in pending.items():
            inc(counter, labels, n)


TALLY = Tally()


class MetricsUnavailable(Exception):
    """The metrics directory cannot be read (``GET /metrics`` answers 503)."""


_WRITE_FAILED = Throttle()


def _write_failed(exc: Exception) -> None:
    """Report a metrics write that failed, at most once a minute."""
    if _WRITE_FAILED.due():
        log.error(
            "metrics cannot be written (their directory is gone, or its disk is full); counts "
            "are lost until they can be",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )


def inc(counter: Counter, labels: tuple[str, ...], amount: float = 1) -> None:
    """``counter.labels(*labels).inc(amount)``; a failure is logged, never raised.

    Under gunicorn a count writes a file in ``PROMETHEUS_MULTIPROC_DIR``: if that directory
    went away, the request or delivery being counted has already happened, and must not fail.
    """
    try:
        counter.labels(*labels).inc(amount)
    except OSError as exc:
        _write_failed(exc)


def observe(histogram: Histogram, labels: tuple[str, ...], value: float) -> None:
    """``histogram.labels(*labels).observe(value)``; a failure is logged, never raised."""
    try:
        histogram.labels(*labels).observe(value)
    except OSError as exc:
        _write_failed(exc)


@functools.lru_cache(maxsize=1024)
def reason_kind(reason: str) -> str:
    """A bounded label for a decision's reason (the full text is stored with the event)."""
    for prefix, kind in (
        ("consent", "consent"),
        ("blocked by exception", "exception"),
        ("duplicate", "dedup"),
        ("invalid payload", "invalid_payload"),
        ("tag is disabled", "disabled"),
        ("destination", "disabled"),
    ):
        if reason.startswith(prefix):
            return kind
    return "trigger"


class OutboxCollector(Collector):
    """Outbox depth per destination, read from the store when scraped."""

    def __init__(self, depth: Callable[[], dict[str, int]]) -> None:
        self._depth = depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the depth gauge (nothing when the store cannot be read)."""
        gauge = GaugeMetricFamily(
            "tagrelay_outbox_depth",
            "Undelivered deliveries per destination",
            labels=["destination"],
        )
        try:
            depth = self._depth()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is down
            depth = {}
        for destination, count in sorted(depth.items()):
            gauge.add_metric([destination], count)
        yield gauge


def depth_of_each(
    depth: Callable[[], dict[str, int]], destinations: Callable[[], Iterable[str]]
) -> Callable[[], dict[str, int]]:
    """``depth`` with a 0 for every configured destination that has nothing waiting: a series
    that is absent rather than 0 leaves an alert such as ``tagrelay_outbox_depth > 1000`` with
    nothing to compare, and a graph with a gap."""

    def each() -> dict[str, int]:
        return {**dict.fromkeys(destinations(), 0), **depth()}

    return each


def render(depth: Callable[[], dict[str, int]]) -> tuple[bytes, str]:
    """The metrics page and its content type."""
    TALLY.flush()
    registry = CollectorRegistry()
    if directory := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if not os.path.isdir(directory):
            # The server's own directory under <data dir>/metrics/, or the operator's: named
            # alike, since serve sets PROMETHEUS_MULTIPROC_DIR for its workers itself.
            raise MetricsUnavailable(
                "metrics unavailable: the directory the workers write their counts to is missing"
            )
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
        body = generate_latest(registry) + generate_latest(_with(OutboxCollector(depth)))
        return body, CONTENT_TYPE_LATEST
    registry.register(OutboxCollector(depth))
    try:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    except OSError as exc:  # a file removed while it was read
        raise MetricsUnavailable(f"metrics unavailable: {exc.strerror or exc}") from exc


def _with(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


class _MetricsHandler(BaseHTTPRequestHandler):
    """``GET /metrics`` of a process that serves no other HTTP (``tagrelay worker``)."""

    timeout = 10  # a client that stalls holds the one serving thread this long at most

    depth: Callable[[], dict[str, int]] = dict

    def do_GET(self) -> None:  # the name http.server dispatches to
        """The metrics page; 404 for any other path, 503 while metrics cannot be read."""
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            body, content_type = render(self.depth)
        except MetricsUnavailable as exc:
            self._answer(503, f"{exc}\n".encode(), "text/plain; charset=utf-8")
            return
        self._answer(200, body, content_type)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Not logged: a line per scrape says nothing, and would carry the scraper's IP."""


class _MetricsServer(HTTPServer):
    """An HTTP server for either address family, one request at a time (scrapes come one by
    one, and one thread keeps one store connection for the outbox depth), without the look-up
    of the host's full name at bind (which waits on DNS, for a name nothing here uses)."""

    def __init__(self, address: tuple[str, int], handler: type, family: socket.AddressFamily):
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """Bind; the name is the address as given."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One JSON line, with the error's type only: socketserver printed a traceback and
        the client's address to stderr (a scraper that reset its connection, say)."""
        error = sys.exc_info()[0]
        error_type = error.__name__ if error else "unknown"
        if error is not None and issubclass(error, OSError):  # the client went away
            log.debug("metrics scrape failed", extra={"error_type": error_type})
        else:
            log.error("metrics scrape failed", extra={"error_type": error_type})


def serve_metrics(bind: str, depth: Callable[[], dict[str, int]]) -> HTTPServer:
    """Serve ``GET /metrics`` on ``bind`` (``HOST:PORT``) from a daemon thread; the caller
    stops it with ``shutdown()``.

    Raises:
        OSError: the address cannot be bound.
    """
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    handler = type("MetricsHandler", (_MetricsHandler,), {"depth": staticmethod(depth)})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server: HTTPServer = _MetricsServer((host, int(port)), handler, family)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
