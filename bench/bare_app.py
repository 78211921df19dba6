"""The framework ceiling: a bare Flask app under exactly tagrelay's gunicorn options.

``POST /v1/track`` here only parses the JSON body and answers a small JSON object: no auth, no
validation, no rules, no store. :class:`BareServer` subclasses tagrelay's own
:class:`~engine.server.TagrelayServer` and replaces only the WSGI app it loads, so the bind,
worker class, workers, threads (``TAGRELAY_THREADS``), keep-alive and log settings are the
same by construction.

Run: ``python bench/bare_app.py --bind 127.0.0.1:8090 --workers 2``
"""

from __future__ import annotations

import argparse
from typing import Any

from flask import Flask, Response, jsonify, request

from engine import logs
from engine.config import Settings
from engine.server import TagrelayServer


def create_bare_app() -> Flask:
    """A Flask app whose track endpoint parses JSON and answers, nothing else."""
    app = Flask("bare")

    @app.post("/v1/track")
    def track() -> tuple[Response, int]:
        raw = request.get_json(force=True)
        event_id = raw.get("event_id") if isinstance(raw, dict) else None
        return jsonify({"success": True, "event_id": event_id}), 200

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify({"status": "ok"}), 200

    return app


class BareServer(TagrelayServer):
    """tagrelay's gunicorn application with the bare app in place of tagrelay's."""

    def load(self) -> Any:
        """The bare WSGI app (logging configured as tagrelay's is)."""
        logs.configure(self.settings.log_level)
        return create_bare_app()


def main() -> None:
    """Serve the bare app until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8090")
    parser.add_argument("--workers", type=int, default=Settings.workers)
    parser.add_argument("--log-level", default=Settings.log_level)
    args = parser.parse_args()
    settings = Settings(bind=args.bind, workers=args.workers, log_level=args.log_level.upper())
    BareServer(settings).run()


if __name__ == "__main__":
    main()
