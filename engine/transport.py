"""How requests travel: one pooled HTTP session per process, and the ``log:`` scheme.

Destinations build :class:`~destinations.base.HttpRequest` values; this module sends them. Like
requests' transport adapters, the URL's scheme picks the way: ``http``/``https`` go through a
pooled :class:`requests.Session`; ``log:`` is written to tagrelay's log (the ``log``
destination), so a container works with no platform account.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from typing import Any

import requests
import requests.adapters
import urllib3
import urllib3.connection

from destinations.base import HttpRequest, HttpResponse

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0  # seconds; the read timeout is each destination's own
# The most of an answer's body read, decompressed. Platforms answer in kilobytes (a Google Ads
# partial-failure answer for 2,000 rows is well under a megabyte); an endpoint that sends more
# is broken or hostile, and must not take the worker's memory with it.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
delivered_log = logging.getLogger("tagrelay.delivered")


class TransportError(Exception):
    """The request did not get an HTTP answer (timeout, refused, reset, DNS, TLS).

    Always safe to retry: platforms deduplicate by event ID, and delivery is at least once.
    The message names the failure's kind only, never the URL (which can carry secrets).
    """


class _Deadline:
    """The moment by which a request's whole answer must be in, and the connection it is on.

    Armed before the request is sent, so it covers connecting, sending, the status line and
    headers, and the body. At the deadline a timer shuts the connection's socket down in both
    directions, which ends whatever read or write the sending thread is blocked in; a connection
    still being opened then is cut as soon as it is open. The sending thread's connection finds
    its deadline through :data:`_current` (requests sends on the calling thread).
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self.cut = False  # the timer shut a connection of this request down
        self._conn: _DeadlineConnection | None = None
        self._done = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()  # first: if it cannot start, no deadline is left on the thread
        _current.deadline = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        _current.deadline = None
        with _cut_lock:
            self._done = True
            if self.expired and self._conn is None:
                # The request went on a connection of another kind (a SOCKS proxy's, say),
                # which nothing could cut: say so rather than let the deadline mean nothing.
                log.error("response deadline passed with no connection to cut")

    def attach(self, conn: _DeadlineConnection) -> None:
        """Make ``conn`` the connection this deadline cuts (it is connecting or sending)."""
        with _cut_lock:
            conn.deadline = self
            self._conn = conn
            if self.expired:
                self.cut = True
                _cut(conn)

    def _expire(self) -> None:
        with _cut_lock:
            if self._done:
                return
            self.expired = True
            conn = self._conn
            # A connection released to the pool may already carry another request: not ours.
            if conn is not None and conn.deadline is self:
                self.cut = True
                _cut(conn)


_current = threading.local()
"""``deadline``: the :class:`_Deadline` of the request the thread is sending, if any."""
_cut_lock = threading.Lock()


def _cut(conn: urllib3.connection.HTTPConnection) -> None:
    """Shut ``conn``'s socket down both ways, which ends a read or write blocked on it."""
    sock = conn.sock
    if sock is None:
        return  # not open yet (cut once it is, see _DeadlineConnection.connect) or closed
    try:
        # socket.socket's own shutdown, not ssl.SSLSocket's: that one also drops the TLS
        # state from under the thread reading it. The kernel socket is the same.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.EBADF):
            return  # the peer or the pool closed it already: the request is over
        log.error(
            "response deadline could not cut the connection",
            extra={"error_type": type(exc).__name__, "errno": exc.errno},
        )
    except Exception as exc:  # noqa: BLE001 - the timer thread must say why, in our log
        log.error(
            "response deadline could not cut the connection",
            extra={"error_type": type(exc).__name__},
        )


class _DeadlineConnection(urllib3.connection.HTTPConnection):
    """A connection that registers with the sending thread's :class:`_Deadline`."""

    deadline: _Deadline | None = None

    def connect(self) -> None:
        """Open the connection; cut it at once if its request's deadline passed meanwhile."""
        current: _Deadline | None = getattr(_current, "deadline", None)
        if current is not None:
            current.attach(self)
        super().connect()
        if current is not None:
            current.attach(self)  # cuts the new socket if the deadline passed while connecting

    def request(self, *args: Any, **kwargs: Any) -> None:
        """Send a request, under the sending thread's deadline (a pooled connection too)."""
        current: _Deadline | None = getattr(_current, "deadline", None)
        if current is not None:
            current.attach(self)
        super().request(*args, **kwargs)


class _DeadlineHTTPSConnection(_DeadlineConnection, urllib3.connection.HTTPSConnection):
    """:class:`_DeadlineConnection` over TLS."""


class _HandOver:
    """Pool methods that move a connection's deadline with the connection.

    A connection taken from the pool belongs to the taking thread's request at once, and one
    put back to none: a request whose timer fires after it put its connection back (its body
    read, its ``with`` not yet left) must not cut the connection another thread has taken
    meanwhile, before that thread's ``request()`` could claim it.
    """

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        with _cut_lock:
            conn.deadline = getattr(_current, "deadline", None)
        return conn

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            with _cut_lock:
                conn.deadline = None
        super()._put_conn(conn)  # type: ignore[misc]


class _DeadlineHTTPPool(_HandOver, urllib3.HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


class _DeadlineHTTPSPool(_HandOver, urllib3.HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_DEADLINE_POOLS: dict[str, type[urllib3.HTTPConnectionPool]] = {
    "http": _DeadlineHTTPPool,
    "https": _DeadlineHTTPSPool,
}


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connections a :class:`_Deadline` can cut, proxied ones too."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """Pool with :data:`_DEADLINE_POOLS` (see :meth:`requests.adapters.HTTPAdapter`)."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _DEADLINE_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        """A proxy's pool manager with :data:`_DEADLINE_POOLS` (SOCKS keeps its own)."""
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):
            manager.pool_classes_by_scheme = _DEADLINE_POOLS
        return manager


class Transport:
    """Sends requests; one instance per process is enough (it is thread-safe)."""

    def __init__(
        self,
        pool_size: int = 32,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.max_response_bytes = max_response_bytes
        self._local_pid = -1
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def _sess(self) -> requests.Session:
        # A session must not cross a fork: its pooled sockets would be shared by two processes.
        if self._session is None or self._local_pid != os.getpid():
            with self._lock:
                if self._session is None or self._local_pid != os.getpid():
                    session = requests.Session()
                    adapter = _DeadlineAdapter(
                        pool_connections=self.pool_size, pool_maxsize=self.pool_size, max_retries=0
                    )
                    session.mount("http://", adapter)
                    session.mount("https://", adapter)
                    self._session = session
                    self._local_pid = os.getpid()
        return self._session

    def send(self, request: HttpRequest, timeout: float) -> HttpResponse:
        """Send one request and return the platform's answer, whatever its status.

        Raises:
            TransportError: no HTTP answer arrived (retry is safe).
        """
        if request.url.startswith("log:"):
            return self._log(request)
        connect = min(self.connect_timeout, timeout)
        # The read timeout bounds each wait for data, not the answer: headers or a body that
        # trickle in faster than that never timed out, and a request outlasting its lease was
        # sent again by the worker that took the lease over. The whole answer, from connecting
        # to the body's last byte, gets connect + read timeout.
        deadline = _Deadline(connect + timeout)
        try:
            with deadline:
                response = self._sess().request(
                    request.method,
                    request.url,
                    headers=dict(request.headers),
                    data=request.body,
                    timeout=(connect, timeout),
                    allow_redirects=False,
                    stream=True,
                )
                try:
                    body = self._read(response)
                finally:
                    response.close()
        except requests.Timeout as exc:
            raise TransportError(f"timed out after {timeout:g}s") from exc
        except requests.ConnectionError as exc:
            if deadline.expired:
                raise TransportError(f"timed out after {timeout:g}s") from exc
            raise TransportError(
                f"connection failed ({type(exc.__cause__ or exc).__name__})"
            ) from exc
        except requests.RequestException as exc:
            if deadline.expired:
                raise TransportError(f"timed out after {timeout:g}s") from exc
            raise TransportError(f"request failed ({type(exc).__name__})") from exc
        if deadline.cut:  # a body read to the end of the connection may have been cut short
            raise TransportError(f"timed out after {timeout:g}s")
        return HttpResponse(response.status_code, dict(response.headers), body)

    def _read(self, response: requests.Response) -> bytes:
        """The answer's body, decompressed, read only as far as ``max_response_bytes``.

        A longer body is cut there (counted as it unpacks, so a small compressed bomb is
        stopped too) and its connection closed, not pooled: the status has arrived and stands,
        so a 2xx is a delivery, never sent again; an adapter that must parse the whole body
        finds it unreadable, as it would any broken answer.
        """
        cap = self.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                log.warning("answer body cut", extra={"limit_bytes": cap})
                return b"".join(chunks)[:cap]
        return b"".join(chunks)

    @staticmethod
    def _log(request: HttpRequest) -> HttpResponse:
        level = logging.DEBUG if request.headers.get("X-Log-Level") == "debug" else logging.INFO
        try:
            lines = json.loads(request.body)
        except ValueError:
            lines = []
        for line in lines if isinstance(lines, list) else []:
            delivered_log.log(level, "event delivered to log", extra={"delivery": line})
        return HttpResponse(200, {}, b"")
