"""``create_app()``: Flask wiring only."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from engine import api, collect, metrics
from engine.config import Settings, ensure_server_key, load_settings
from engine.errors import DiskLow, RequestError, StoreError
from engine.pipeline import Pipeline, Privacy, RulesHolder, load_rules
from engine.ratelimit import RateLimiter
from engine.store.base import Store
from engine.store.sqlite import SQLiteStore

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    store: Store | None = None,
    rules: RulesHolder | None = None,
) -> Flask:
    """Build the WSGI app.

    Args:
        settings: server settings; read from the environment when omitted.
        store: the store; the SQLite store at ``settings.database_path`` when omitted.
        rules: the live rules; compiled from ``settings.rules`` when omitted.

    Raises:
        RulesError: the rules do not check (the server must not start on them).
        ConfigError: the settings are unusable.
    """
    settings = settings or load_settings()
    settings, _ = ensure_server_key(settings)
    rules = rules or load_rules(settings.rules, settings.reload_interval)
    store = store or SQLiteStore(settings.database_path, settings.sqlite_sync)

    privacy = Privacy(
        settings.ip_storage,
        settings.click_id_window,
        redact_query_params=settings.redact_query_params,
    )
    # No static folder: Flask's default is <root path>/static/, and the root path of an app
    # named after no module is the working directory, whose static/ it served to anyone.
    app = Flask("tagrelay", static_folder=None)
    if settings.trusted_proxies > 0:
        # The client IP is taken from X-Forwarded-For only as far as the configured number of
        # proxies in front of us appended to it; anything further left is client-supplied.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies
        )
    # The body limit is enforced by the endpoints (with a JSON 413), before parsing.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]  # flask's DefaultJSONProvider has it
    app.extensions["tagrelay.settings"] = settings
    pipeline = Pipeline(store, rules, privacy, reserve_bytes=settings.min_free_mb * 2**20)
    app.extensions["tagrelay.pipeline"] = pipeline
    app.extensions["tagrelay.ratelimit"] = RateLimiter(store, settings.rate_limit)
    app.register_blueprint(api.bp)
    app.register_blueprint(collect.bp)

    @app.errorhandler(RequestError)
    def request_error(exc: RequestError) -> tuple[Response, int]:
        return api.error_response(exc)

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError) -> tuple[Response, int]:
        metrics.inc(metrics.REJECTED_REQUESTS, ("503",))
        if isinstance(exc, DiskLow):  # logged by the pipeline, once a minute
            response = jsonify({"success": False, "error": str(exc)})
            response.headers["Retry-After"] = "30"
            return response, 503
        pipeline.outage.refused(exc)
        response = jsonify({"success": False, "error": "the event store is unavailable; retry"})
        response.headers["Retry-After"] = "5"
        return response, 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 400
        message = {
            404: "no such endpoint",
            405: "method not allowed",
            413: f"the body is over {settings.max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        if status == 413:  # a chunked body over the limit, cut off while being read
            api.close_connection()
        return jsonify({"success": False, "error": message}), status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        # A bug of ours, never the client's input: log the type (not the data) and say little.
        log.error("unexpected error", exc_info=exc, extra={"error_type": type(exc).__name__})
        return jsonify({"success": False, "error": "internal error"}), 500

    return app
