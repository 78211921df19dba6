"""How requests travel: one pooled HTTP session per process, and the ``log:`` scheme.

Destinations build :class:`~destinations.base.HttpRequest` values; this module sends them. Like
requests' transport adapters, the URL's scheme picks the way: ``http``/``https`` go through a
pooled :class:`requests.Session`; ``log:`` is written to tagrelay's log (the ``log``
destination), so a container works with no platform account.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time

import requests
import requests.adapters

from destinations.base import HttpRequest, HttpResponse

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0  # seconds; the read timeout is each destination's own
delivered_log = logging.getLogger("tagrelay.delivered")


class TransportError(Exception):
    """The request did not get an HTTP answer (timeout, refused, reset, DNS, TLS).

    Always safe to retry: platforms deduplicate by event ID, and delivery is at least once.
    The message names the failure's kind only, never the URL (which can carry secrets).
    """


def _read_body(response: requests.Response, deadline: float, timeout: float) -> bytes:
    """The body of ``response``, read by ``deadline`` (``time.monotonic()``) or not at all.

    A watchdog shuts the socket's reading side at the deadline, which ends a read blocked on it.

    Raises:
        TransportError: the deadline passed first.
        requests.RequestException: the body could not be read.
    """
    cut = threading.Event()

    def shut() -> None:
        cut.set()
        with contextlib.suppress(Exception):  # already released or closed: nothing to cut
            response.raw.shutdown()

    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), shut)
    watchdog.daemon = True
    watchdog.start()
    try:
        body = response.content
    except requests.RequestException as exc:
        if cut.is_set():
            raise TransportError(f"timed out after {timeout:g}s") from exc
        raise
    finally:
        watchdog.cancel()
        response.close()
    if cut.is_set():  # a body read to the end of the connection may have been cut short
        raise TransportError(f"timed out after {timeout:g}s")
    return body


class Transport:
    """Sends requests; one instance per process is enough (it is thread-safe)."""

    def __init__(self, pool_size: int = 32, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._local_pid = -1
        self._session: requests.Session | None = None
        self._lock = threading.Lock()

    def _sess(self) -> requests.Session:
        # A session must not cross a fork: its pooled sockets would be shared by two processes.
        if self._session is None or self._local_pid != os.getpid():
            with self._lock:
                if self._session is None or self._local_pid != os.getpid():
                    session = requests.Session()
                    adapter = requests.adapters.HTTPAdapter(
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
        # The read timeout bounds each wait for data, not the answer: a body that trickles in
        # faster than that never timed out, and a request outlasting its lease was sent again
        # by the worker that took the lease over. The whole answer gets connect + read timeout.
        deadline = time.monotonic() + connect + timeout
        try:
            response = self._sess().request(
                request.method,
                request.url,
                headers=dict(request.headers),
                data=request.body,
                timeout=(connect, timeout),
                allow_redirects=False,
                stream=True,
            )
            body = _read_body(response, deadline, timeout)
        except requests.Timeout as exc:
            raise TransportError(f"timed out after {timeout:g}s") from exc
        except requests.ConnectionError as exc:
            raise TransportError(
                f"connection failed ({type(exc.__cause__ or exc).__name__})"
            ) from exc
        except requests.RequestException as exc:
            raise TransportError(f"request failed ({type(exc).__name__})") from exc
        return HttpResponse(response.status_code, dict(response.headers), body)

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
