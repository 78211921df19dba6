"""Running the app under gunicorn, configured from :class:`~engine.config.Settings`.

The app is built once in the master (``preload_app``), which checks the rules once and fails
fast. After the fork each worker opens its own store connections and, unless delivery is turned
off (``TAGRELAY_DELIVER=false``), starts a delivery thread; the workers share the outbox through
leases. On SIGTERM gunicorn stops taking requests, and each worker lets its in-flight delivery
batches finish before it exits.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from engine import logs, metrics
from engine.app import create_app
from engine.config import Settings
from engine.delivery import DeliveryWorker
from engine.maintenance import Maintenance
from engine.pipeline import Pipeline
from engine.rules.model import MAX_TIMEOUT
from engine.transport import CONNECT_TIMEOUT


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
                worker.stop()
            metrics.TALLY.flush()  # counts not yet added to the shared counters

        def child_exit(_server: Any, worker: Any) -> None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

        options: dict[str, Any] = {
            "bind": settings.bind,
            "workers": settings.workers,
            "worker_class": "gthread",
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
            "post_fork": post_fork,
            "worker_exit": worker_exit,
            "child_exit": child_exit,
        }
        if "control_socket" in self.cfg.settings:
            # gunicorn 23+ opens a control socket at one path per user by default, which
            # several tagrelay instances on a host would fight over; keep it per instance.
            options["control_socket"] = str(settings.data_dir.resolve() / "gunicorn.ctl")
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
