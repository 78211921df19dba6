"""Running the app under gunicorn, configured from :class:`~engine.config.Settings`."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication

from engine import logs
from engine.app import create_app
from engine.config import Settings


class TagrelayServer(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    """A gunicorn application that builds tagrelay's app once, in the master, before forking.

    Building before the fork checks the rules once and fails fast; every worker then opens its
    own store connections (the store reconnects per process).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        """Apply tagrelay's settings to gunicorn's config."""
        options: dict[str, Any] = {
            "bind": self.settings.bind,
            "workers": self.settings.workers,
            "worker_class": "gthread",
            "threads": int(os.environ.get("TAGRELAY_THREADS", "4")),
            "preload_app": True,
            "timeout": 30,
            "graceful_timeout": 20,
            "keepalive": 5,
            "accesslog": None,
            "errorlog": "-",
            "loglevel": self.settings.log_level.lower(),
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        """The WSGI app."""
        logs.configure(self.settings.log_level)
        return create_app(self.settings)


def run(settings: Settings) -> None:
    """Serve until stopped (SIGTERM/SIGINT: graceful)."""
    TagrelayServer(settings).run()
