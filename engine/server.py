"""Running the app under gunicorn, configured from :class:`~engine.config.Settings`.

The app is built once in the master (``preload_app``), which checks the rules once and fails
fast. After the fork each worker opens its own store connections and, unless delivery is turned
off (``TAGRELAY_DELIVER=false``), starts a delivery thread; the workers share the outbox through
leases. On SIGTERM gunicorn stops taking requests, and each worker lets its in-flight delivery
batches finish before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers import gthread
from gunicorn.workers.gthread import ThreadWorker

from engine import logs, metrics
from engine.api import answering
from engine.app import create_app
from engine.config import CONTROL_SOCKET, Settings
from engine.delivery import DeliveryWorker
from engine.maintenance import Maintenance
from engine.pipeline import Pipeline
from engine.rules.model import MAX_TIMEOUT
from engine.transport import CONNECT_TIMEOUT

log = logging.getLogger(__name__)


def start_delivery(app: Flask) -> DeliveryWorker:
    """Start a delivery worker on the app's store and live rules."""
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    worker = DeliveryWorker(pipeline.store, lambda: pipeline.rules.container)
    worker.start()
    app.extensions["tagrelay.delivery"] = worker
    return worker


def start_maintenance(app: Flask, settings: Settings) -> Maintenance:
    """Start the retention thread on the app's store."""
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    maintenance = Maintenance(pipeline.store, settings.retention_days)
    maintenance.start()
    app.extensions["tagrelay.maintenance"] = maintenance
    return maintenance


GRACEFUL_TIMEOUT = int(2 * (CONNECT_TIMEOUT + MAX_TIMEOUT) + 5)  # 75 s

# A keep-alive connection is closed after this many requests (its last answer says
# `Connection: close`), as nginx's `keepalive_requests` does. The workers share one listening
# socket and a connection stays with the worker that accepted it: a proxy's or a backend's few
# long-lived connections could all sit on one worker, the others idle (measured: half the
# throughput of two workers, in one round of three). The client reconnects, and an idle worker is
# the likelier to accept, so the load spreads over the workers within a few hundred requests.
KEEPALIVE_REQUESTS = 100
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats (the master waits 30 s)

# What a unix socket's path may hold (sun_path: 108 bytes with its terminating NUL on Linux,
# 104 on the BSDs and macOS).
_MAX_SOCKET_PATH = 103

# What gthread's handle() returns to give a connection back to its poller until the client
# sends (gunicorn 24 and later; older ones accept into the poller, and lack it).
_DEFER: object | None = getattr(gthread, "_DEFER", None)


def control_socket(data_dir: Path) -> Path | None:
    """The master's control socket, ``<data dir>/gunicorn-<master pid>.ctl``; None if too long.

    One per master, not per data directory: instances sharing a data directory, and the new
    master of a USR2 upgrade beside the old one, each keep their own (gunicorn removes the file
    at its path when it starts and again when it stops, so a shared path is taken over, then
    removed under the one still running). A socket nothing listens on any more (its master was
    killed, so it could not remove its own) is removed here. Whether one is live is asked of
    the socket itself, not of its PID: masters in containers sharing the data directory each
    see their own PIDs, so another's PID can be unknown here, or be this master's own (its name
    then gets a number: ``gunicorn-<pid>-2.ctl``).
    """
    data_dir = data_dir.resolve()
    for found in data_dir.glob("gunicorn*.ctl"):
        if CONTROL_SOCKET.fullmatch(found.name) and not _listening(found):
            with contextlib.suppress(OSError):
                found.unlink()
    path = data_dir / f"gunicorn-{os.getpid()}.ctl"
    taken = 1
    while path.exists():  # live: another namespace's master with this PID
        taken += 1
        path = data_dir / f"gunicorn-{os.getpid()}-{taken}.ctl"
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        log.warning(
            "no control socket for gunicornc: the data directory's path is too long for a unix "
            "socket's",
            extra={"socket": str(path), "max_bytes": _MAX_SOCKET_PATH},
        )
        return None
    return path


def _listening(path: Path) -> bool:
    """Whether a master listens on the unix socket at ``path`` (a refused connection: none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except TimeoutError:  # its backlog full: busy, so alive
            return True
        except OSError:  # refused, or no socket at all
            return False
    return True


class _Arbiter(Arbiter):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's master loop, which also keeps the master's copy of the rules current.

    Every worker is forked from the master: at start, and again after a crash, a timeout or a
    SIGHUP. With the rules the master compiled at start, such a worker served those instead of
    the last good ones the others serve (and kept them while the files on disk do not check).
    """

    def manage_workers(self) -> None:
        """Reload the master's rules when due (every turn of the loop), then gunicorn's."""
        self.app.refresh_rules()
        super().manage_workers()


class _Worker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's gthread worker, which stops the app's delivery as it leaves its loop, and
    closes its listening sockets at once when its master is gone (see set_accept_enabled).

    A stopping worker lets its delivery requests in flight finish, which can take longer than
    the master's worker timeout (30 s) with a destination's `timeout` of 25 s or more. The
    master watches the workers a SIGHUP restarts meanwhile and kills a silent one, its leases
    held, their requests then sent again. gunicorn closes the worker's heartbeat file before
    its ``worker_exit`` hook runs, so delivery stops here, beating, while the file is open.
    """

    _beaten = float("-inf")  # when notify last told the master this worker is alive
    # How long one read of a request's headers or body may wait for the client's next bytes
    # (Settings.read_timeout), as nginx's client_header_timeout and client_body_timeout: gthread
    # reads them with blocking reads in its threads (workers x threads of them, 8 by default),
    # so without a limit that many connections that stopped mid-request held every thread, and
    # nothing was answered, not even /healthz, until the client closed them. SO_RCVTIMEO's
    # timeval (seconds, microseconds); set per server by _worker_class.
    _read_timeout = struct.pack("ll", Settings.read_timeout, 0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timed: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # read timeout set

    def enqueue_req(self, conn: Any) -> None:
        """gthread's, with each blocking read of the connection limited to the read timeout.

        The limit is the socket's own (``SO_RCVTIMEO``), which gthread's switches between
        blocking and non-blocking mode leave in place: a read that waits longer fails with
        EAGAIN, a header read's closes the connection and a body read's is answered 408 (see
        :func:`engine.api.read_body`). Set once per connection, not for each of its requests.
        """
        if conn.sock not in self._timed:
            with contextlib.suppress(OSError):  # a connection closed meanwhile: gthread sees it
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._read_timeout)
                self._timed.add(conn.sock)
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        """gthread's, for a new connection only once its client has sent something.

        gunicorn 24 and later hand each connection to a thread as soon as it is accepted, and
        the thread waits up to 5 s for the client's first bytes before it gives the connection
        back to the poller: forty connections that sent nothing kept every thread of two
        workers busy, and /healthz waiting, for 25 s. Such a connection now waits in the poller
        at once, on no thread, as it did in gunicorn 23, and is closed after the keep-alive
        timeout (5 s) if nothing comes.
        """
        if (
            _DEFER is not None
            and not conn.initialized
            and not conn.data_ready
            and not conn.wait_for_data(0)
        ):
            return _DEFER
        return super().handle(conn)

    def notify(self) -> None:
        """gunicorn's heartbeat, at most once a second.

        gthread beats on every pass of its event loop, a system call (``utime`` of the
        heartbeat file) per request or more; the master only looks for a worker silent for its
        timeout (30 s).
        """
        now = time.monotonic()
        if now - self._beaten >= HEARTBEAT_INTERVAL:
            self._beaten = now
            super().notify()

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's, and once the master is gone (``kill -9``), the listening sockets closed.

        gthread closes them only after its graceful wait for the connections it has, up to the
        graceful timeout (75 s) while clients keep sending on them; meanwhile the next ``serve``
        could not bind its port. A master that is alive keeps its own copies, for new workers.
        """
        super().set_accept_enabled(enabled)
        if not enabled and self.ppid != os.getppid():
            for listener in self.sockets:
                listener.close()

    def run(self) -> None:
        """gthread's loop and its graceful wait for requests, then delivery's stop."""
        try:
            super().run()
        finally:
            app = self.wsgi if isinstance(self.wsgi, Flask) else None
            delivery = app.extensions.get("tagrelay.delivery") if app is not None else None
            if delivery is not None:
                delivery.stop(heartbeat=self.notify)


def _worker_class(read_timeout: int) -> type[_Worker]:
    """The worker class, its connections' reads limited to ``read_timeout`` seconds."""
    timeval = struct.pack("ll", read_timeout, 0)
    return type("_Worker", (_Worker,), {"_read_timeout": timeval})


class TagrelayServer(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """A gunicorn application serving tagrelay (and delivering, per worker)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: Flask | None = None
        super().__init__()

    def load_config(self) -> None:
        """Apply tagrelay's settings to gunicorn's config."""
        settings = self.settings

        def post_fork(_server: Any, _worker: Any) -> None:
            if self.app is None:
                return
            start_maintenance(self.app, settings)
            if settings.deliver:
                start_delivery(self.app)

        def worker_exit(_server: Any, _worker: Any) -> None:
            worker = self.app.extensions.get("tagrelay.delivery") if self.app else None
            if worker is not None:
                worker.stop()  # stopped already by _Worker.run, unless that failed
            metrics.TALLY.flush()  # counts not yet added to the shared counters

        def child_exit(_server: Any, worker: Any) -> None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

        def pre_request(_worker: Any, req: Any) -> None:
            answering(req)
            if req.req_number >= KEEPALIVE_REQUESTS:  # the connection's nth request
                req.must_close = True

        options: dict[str, Any] = {
            "bind": settings.bind,
            "workers": settings.workers,
            "worker_class": _worker_class(settings.read_timeout),
            "threads": settings.threads,
            "preload_app": True,
            "timeout": 30,
            # Long enough for a delivery's last request (a token, then the send, each with its
            # connect and read timeouts); workers with nothing in flight stop at once.
            "graceful_timeout": GRACEFUL_TIMEOUT,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "logger_class": logs.GunicornLogger,
            "loglevel": settings.log_level.lower(),
            "pre_request": pre_request,
            "post_fork": post_fork,
            "worker_exit": worker_exit,
            "child_exit": child_exit,
        }
        if "control_socket" in self.cfg.settings:
            # gunicorn 25.1+ opens a control socket (for `gunicornc`) at one path per user;
            # several tagrelay instances on a host would take it from each other.
            logs.configure(settings.log_level)
            socket_path = control_socket(settings.data_dir)
            if socket_path is None:
                options["control_socket_disable"] = True
            else:
                options["control_socket"] = str(socket_path)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """The WSGI app (built once, in the master)."""
        logs.configure(self.settings.log_level)
        self.app = create_app(self.settings)
        return self.app

    def refresh_rules(self) -> None:
        """Reload the rules if they changed and are due a check, as a worker does."""
        if self.app is not None:
            pipeline: Pipeline = self.app.extensions["tagrelay.pipeline"]
            pipeline.rules.container  # noqa: B018 - reading it reloads when due

    def run(self) -> None:
        """Serve until stopped, through :class:`_Arbiter` in place of gunicorn's own."""
        try:
            _Arbiter(self).run()
        except RuntimeError as exc:  # the master could not start (a bind, say): said plainly
            print(f"tagrelay serve: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)


def run(settings: Settings) -> None:
    """Serve until stopped (SIGTERM/SIGINT: graceful)."""
    TagrelayServer(settings).run()
