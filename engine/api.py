"""HTTP endpoints: track, batch, health, readiness.

Every error answers JSON ``{"success": false, "error": "..."}`` with a 4xx status (or 503 when the
store is down); nothing a client sends can produce a 500 or a stack trace.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected

from engine import jsonio, metrics
from engine.auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    authenticate,
    find_keys,
    presented_key,
)
from engine.config import Settings
from engine.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    StoreError,
    Unauthorized,
    UnsupportedMediaType,
)
from engine.pipeline import Pipeline
from engine.ratelimit import RateLimiter

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

_JSON_TYPES = ("application/json", "text/json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 reads as infinity, which JSON cannot carry onward
        raise BadRequest(f"the number {text[:40]} is out of range")
    return value


# The content codings of the HTTP registry that compress (RFC 9110 8.4.1, RFC 8878), and the
# zlib window bits that read those read here: gzip, and deflate, which HTTP defines as the zlib
# format (RFC 9110 8.4.1.2) and some clients send raw (told apart by the zlib header).
_COMPRESSIONS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})
_READABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


MAX_COMPRESSIONS = 2  # compressions listed in one Content-Encoding


def decode_body(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """``body`` decompressed as its ``Content-Encoding`` says (gzip or deflate, applied in the
    order listed), at most ``max_bytes`` once decompressed.

    Other words in the header (``identity``; ``utf-8``, a common slip) compress nothing: the
    body is read as sent.

    Raises:
        UnsupportedMediaType: a compression that is not read here (br, zstd, compress), or
            more than MAX_COMPRESSIONS of them.
        PayloadTooLarge: the body is over ``max_bytes`` once decompressed.
        BadRequest: the body is not what its coding says.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    applied = [c for c in codings if c in _COMPRESSIONS]
    if unread := [c for c in applied if c not in _READABLE]:
        # RFC 9110 15.5.16: an unsupported content coding is a 415.
        raise UnsupportedMediaType(
            f"Content-Encoding {unread[0][:20]} is not supported: send the body compressed "
            "with gzip or deflate, or uncompressed"
        )
    if len(applied) > MAX_COMPRESSIONS:
        # Each layer may inflate to max_bytes: a header listing gzip a thousand times cost
        # most of a second of CPU per request. Clients compress once.
        raise UnsupportedMediaType(
            f"Content-Encoding lists {len(applied)} compressions; at most {MAX_COMPRESSIONS} "
            "are read: send the body compressed once"
        )
    for coding in reversed(applied):
        body = _inflate(body, coding, max_bytes)
    return body


_FIRST_STEP, _LONGEST_STEP = 64, 16384
"""How much compressed input is given to zlib at a time, growing while a member goes on: what
is left after a gzip member's end comes back as a copy (``unused_data``), so giving each member
all the rest of the body cost time that grew with the square of the number of members."""


def _inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    wbits = _READABLE[coding]
    if coding == "deflate" and (
        len(body) < 2 or body[0] & 0x0F != 8 or int.from_bytes(body[:2]) % 31
    ):
        wbits = -zlib.MAX_WBITS  # raw deflate, without the zlib header
    out = bytearray()
    data = memoryview(body)
    at = 0  # where the input not yet given to zlib starts
    try:
        while True:  # gzip members may follow one another (RFC 1952 2.2); each is read
            inflater = zlib.decompressobj(wbits)
            size = _FIRST_STEP
            while not inflater.eof:
                if at >= len(data):
                    raise BadRequest(f"the {coding} body is cut short")
                step = data[at : at + size]
                size = min(size * 2, _LONGEST_STEP)
                out += inflater.decompress(step, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    raise PayloadTooLarge(f"the body is over {max_bytes} bytes once decompressed")
                # Below the limit, zlib took all of the step (no unconsumed_tail); what it did
                # not read is past the member's end.
                at += len(step) - len(inflater.unused_data)
            if at >= len(data) or wbits != _READABLE["gzip"]:
                break
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {coding} data") from exc
    if at < len(data):
        raise BadRequest(f"the {coding} body has data after its end")
    return bytes(out)


MAX_DEPTH = 64  # objects and arrays inside one another; events need a handful


def _too_deep(value: Any, limit: int) -> bool:
    """Whether the object or array ``value`` holds objects and arrays more than ``limit``
    levels deep (``value`` itself being the first). Recursion at most ``limit`` deep, into
    objects and arrays only: twice as fast as walking with a stack of its own."""
    if limit == 0:
        return True
    for child in value.values() if type(value) is dict else value:
        kind = type(child)
        if (kind is dict or kind is list) and _too_deep(child, limit - 1):
            return True
    return False


_TOO_DEEP = f"the JSON is nested too deeply (at most {MAX_DEPTH} levels)"
# A batch's body holds its events two levels down ({"events": [...]}), so that an event
# /v1/track takes does not sink its batch. Depth is a limit on the body, as JSON syntax is.
_BATCH_DEPTH = MAX_DEPTH + 2


def parse_json_body(
    body: bytes,
    content_type: str | None,
    allow_text: bool = False,
    max_depth: int = MAX_DEPTH,
    content_encoding: str | None = None,
    max_bytes: int = Settings.max_body_bytes,
) -> Any:
    """Decode a request body as strict JSON (no NaN/Infinity, finite numbers, at most
    ``max_depth`` levels of objects and arrays), decompressed first as ``content_encoding``
    says (see :func:`decode_body`; ``max_bytes`` limits the decompressed body).

    Raises:
        UnsupportedMediaType: the Content-Type is not JSON, or the compression is not read.
        PayloadTooLarge: the body is over ``max_bytes`` once decompressed.
        BadRequest: the body is not valid UTF-8 JSON, or not what its coding says.
    """
    mime = (content_type or "").split(";")[0].strip().lower()
    allowed = _JSON_TYPES + (("text/plain",) if allow_text else ())
    if mime not in allowed:
        given = f"not {mime[:60]}" if mime else "none was sent"
        raise UnsupportedMediaType(f"Content-Type must be {' or '.join(allowed)} ({given})")
    if content_encoding:
        body = decode_body(body, content_encoding, max_bytes)
    if not body:
        raise BadRequest("the request body is empty")
    value = jsonio.loads_fast(body)
    text = None
    if value is jsonio.NOT_READ:  # read by json (see jsonio): what orjson refused, or may misread
        text, value = _parse_slowly(body)
    # Counting brackets (quoted ones too) is cheap and rules out nearly every body at once.
    if (
        body.count(b"{") + body.count(b"[") > max_depth
        and type(value) in (dict, list)
        and _too_deep(value, max_depth)
    ):
        raise BadRequest(_TOO_DEEP)
    # orjson refuses a lone surrogate; json reads one, so only a text json read can hold one.
    if text is not None and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise BadRequest(
            "the body holds an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF): "
            "text that is not Unicode cannot be stored"
        )
    return value


def _parse_slowly(body: bytes) -> tuple[str, Any]:
    """``body`` as text and read by the json module, whose errors clients get."""
    try:
        text = body.decode("utf-8")
        return text, json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except UnicodeDecodeError as exc:
        raise BadRequest("the body is not valid UTF-8") from exc
    except RecursionError as exc:
        raise BadRequest(_TOO_DEEP) from exc
    except ValueError as exc:
        if str(exc).startswith("Exceeds the limit"):  # int(): a number of over 4,300 digits
            raise BadRequest("a number in the body is out of range (over 4300 digits)") from exc
        if isinstance(exc, json.JSONDecodeError):  # where, so that it can be found
            where = f"line {exc.lineno}, column {exc.colno}"
            raise BadRequest(f"the body is not valid JSON: {exc.msg} at {where}") from exc
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc


# A surrogate can only reach a decoded body through a ``\uD8xx``-style escape (UTF-8 cannot
# carry one), so bodies without such an escape, nearly all, are not looked at further.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a string anywhere in ``value`` (keys included) holds an unpaired surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        return False
    return False


def json_response(obj: Any, status: int = 200) -> Response:
    """A compact JSON answer in UTF-8. What ``jsonify`` gives, without its provider lookups,
    which cost a single-event request several times what encoding the answer does. A lone
    surrogate in an echoed text goes back escaped, as the client sent it (see jsonio.dumpb)."""
    return Response(jsonio.dumpb(obj), status, mimetype="application/json")


def _pipeline() -> Pipeline:
    pipeline: Pipeline = current_app.extensions["tagrelay.pipeline"]
    return pipeline


def _settings() -> Settings:
    settings: Settings = current_app.extensions["tagrelay.settings"]
    return settings


# The headers auth reads, by their WSGI environ names: read from the environ directly, as
# werkzeug's header view would, without building it.
_AUTH_HEADERS = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_"))
    for name in ("Authorization", TIMESTAMP_HEADER, SIGNATURE_HEADER)
)
_NO_ARGS: dict[str, str] = {}


# The gunicorn request this thread is answering, set by the server's ``pre_request`` hook; not
# set outside gunicorn (the test client, the CLI).
_answering = threading.local()


def answering(req: Any) -> None:
    """Note the gunicorn request this thread answers next (called by the server)."""
    _answering.req = req


def close_connection() -> None:
    """Answer with ``Connection: close`` and close the connection after the answer.

    For an answer that leaves bytes of the body unread or unreadable (its framing is broken, or
    it is over the limit: :class:`~engine.errors.BodyTooLarge`, which :func:`error_response`
    answers so): the client learns the connection is done, and the server does not read a body
    it refused to find the next request behind it.
    """
    req = getattr(_answering, "req", None)
    if req is not None:
        req.must_close = True


def read_body(cache: bool) -> bytes:
    """The request's body as the client sent it (a chunked one put together by gunicorn).

    Raises:
        BadRequest: the chunked framing is malformed, or the body ended before it said.
        RequestTimeout: the client sent nothing for a while part-way through the body (the
            server's read timeout, TAGRELAY_READ_TIMEOUT).
    """
    try:
        return request.get_data(cache=cache)
    # gunicorn reads a chunked body only as the app reads it, and raises its parse errors here:
    # they were answered as the app's own bug, a 500.
    except ParseException as exc:
        close_connection()
        raise BadRequest("the chunked body is malformed") from exc
    except (NoMoreData, ClientDisconnected, OSError) as exc:
        close_connection()
        # werkzeug reports a failed read of a body of known length as ClientDisconnected, the
        # read's own error its context; a chunked body's read fails as itself.
        failed = exc.__context__ if isinstance(exc, ClientDisconnected) else exc
        if isinstance(failed, BlockingIOError | TimeoutError):  # the socket's read timeout
            raise RequestTimeout(
                "the body stopped arriving before its end: send it whole, without pauses"
            ) from exc
        raise BadRequest("the body ended before its end") from exc


def _credentials() -> tuple[dict[str, str], Mapping[str, str]]:
    """The request's authentication headers, and its query arguments (where ``api_key`` may
    be)."""
    environ = request.environ
    headers = {
        name: value for name, key in _AUTH_HEADERS if (value := environ.get(key)) is not None
    }
    # No query string (the usual case) means no api_key: skip parsing one.
    return headers, request.args if environ.get("QUERY_STRING") else _NO_ARGS


def _authenticated_body() -> bytes:
    settings = _settings()
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        raise BodyTooLarge(f"the body is over {settings.max_body_bytes} bytes")
    headers, args = _credentials()
    presented = presented_key(headers, args)
    if presented and any(
        hmac.compare_digest(presented.encode(), pk.key.encode()) for pk in settings.publishable_keys
    ):
        raise Forbidden("a publishable key can only reach /v1/collect")
    body = read_body(cache=True)
    if len(body) > settings.max_body_bytes:  # chunked: read only up to the limit
        raise BodyTooLarge(f"the body is over {settings.max_body_bytes} bytes")
    now = time.time()
    key = authenticate(
        headers,
        args,
        body,
        settings.server_keys,
        now,
        settings.signature_window,
    )
    g.key = key
    # A signed request replayed within the window passes the signature check again: its
    # events must then be duplicates, also those that came without an event_id.
    g.signed = headers.get(SIGNATURE_HEADER) if key.signing_secret is not None else None
    limiter: RateLimiter = current_app.extensions["tagrelay.ratelimit"]
    limiter.check(key.key, now)
    return body


def _replay_safe(events: list[Any]) -> list[Any]:
    """``events``, each without an ``event_id`` given one derived from the request's signature
    and its place in the request, when the request was signed; unchanged otherwise. An
    ``event_id`` of null is left to validation, which refuses it as it does unsigned.

    A generated ID would make a replayed signed request (same body, same signature, within the
    replay window) count its events twice; derived so, the replay is a duplicate.
    """
    sent: str | None = g.get("signed")
    if not sent:
        return events
    seed = hashlib.sha256(sent.strip().lower().removeprefix("sha256=").encode()).hexdigest()
    return [
        {**raw, "event_id": "sig-" + hashlib.sha256(f"{seed}:{n}".encode()).hexdigest()[:32]}
        if isinstance(raw, dict) and "event_id" not in raw
        else raw
        for n, raw in enumerate(events)
    ]


@bp.post("/v1/track")
def track() -> tuple[Response, int]:
    """Accept one event."""
    body = _authenticated_body()
    raw = parse_json_body(
        body,
        request.content_type,
        content_encoding=request.content_encoding,
        max_bytes=_settings().max_body_bytes,
    )
    outcome = _pipeline().accept(_replay_safe([raw]))[0]
    if outcome.accepted is None:
        raise BadRequest(outcome.error or "invalid event")
    return json_response(outcome.as_json()), 200


@bp.post("/v1/track/batch")
def track_batch() -> tuple[Response, int]:
    """Accept up to 100 events; one result per event."""
    body = _authenticated_body()
    raw = parse_json_body(
        body,
        request.content_type,
        max_depth=_BATCH_DEPTH,
        content_encoding=request.content_encoding,
        max_bytes=_settings().max_body_bytes,
    )
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        raise BadRequest('the body must be {"events": [...]}')
    if extra := sorted(set(raw) - {"events"}):
        raise BadRequest(f"unknown field {extra[0]!r} in batch")
    items = raw["events"]
    limit = _settings().max_batch_events
    if len(items) > limit:
        raise PayloadTooLarge(f"a batch holds at most {limit} events, got {len(items)}")
    if not items:
        raise BadRequest("the batch has no events")
    outcomes = _pipeline().accept(_replay_safe(items))
    results = [o.as_json() for o in outcomes]
    accepted = sum(1 for o in outcomes if o.accepted is not None)
    return json_response(
        {
            "success": True,
            "accepted": accepted,
            "rejected": len(items) - accepted,
            "results": results,
        }
    ), 200


@bp.get("/metrics")
def metrics_page() -> Response | tuple[Response, int]:
    """Prometheus metrics, to a request with a server key.

    The server that takes ``/v1/collect`` faces the internet, and the counts tell anyone who
    reads them a shop's sales as they happen. A key's signing secret is not asked for: a
    scraper sends a fixed header and cannot sign.

    Raises:
        Unauthorized: no server key.
    """
    headers, args = _credentials()
    presented = presented_key(headers, args)
    if not presented or not find_keys(presented, _settings().server_keys):
        raise Unauthorized("/metrics needs a server key: send 'Authorization: Bearer <server key>'")
    try:
        pipeline = _pipeline()
        body, content_type = metrics.render(
            metrics.depth_of_each(
                pipeline.store.depth, lambda: pipeline.rules.container.destinations
            )
        )
    except metrics.MetricsUnavailable as exc:
        return json_response({"success": False, "error": str(exc)}), 503
    return Response(body, 200, content_type=content_type)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Liveness: the process answers."""
    return json_response({"status": "ok"}), 200


_REFUSED_RELOAD = (
    "the last change to the rules was refused; the server's log says why, and so does this "
    "answer to a request with a server key"
)


def _holds_server_key() -> bool:
    """Whether the request carries a valid server key (and its signature, if the key needs one;
    here of an empty body)."""
    settings = _settings()
    headers, args = _credentials()
    try:
        authenticate(
            headers, args, b"", settings.server_keys, time.time(), settings.signature_window
        )
    except Unauthorized:
        return False
    return True


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: the store answers and rules are loaded."""
    checks: dict[str, Any] = {}
    ready = True
    try:
        _pipeline().store.ping()
        checks["store"] = "ok"
    except StoreError:
        checks["store"] = "unreachable"
        ready = False
    space = _pipeline().space
    if space.reserve_bytes > 0:
        # Below the reserve intake refuses events: a load balancer sends them elsewhere.
        low = space.low
        checks["disk"] = "below the reserve (TAGRELAY_MIN_FREE_MB): intake refused" if low else "ok"
        ready = ready and not low
    holder = _pipeline().rules
    container = holder.container
    checks["rules"] = {"tags": len(container.tags), "fingerprint": container.fingerprint[:12]}
    if holder.last_error:
        # The problems name rule files, lines and environment variables: said to a server
        # key's holder; a load balancer (or anyone) learns only that a change was refused.
        checks["rules"]["reload_error"] = (
            holder.last_error if _holds_server_key() else _REFUSED_RELOAD
        )
    return json_response({"status": "ready" if ready else "not ready", "checks": checks}), (
        200 if ready else 503
    )


def error_response(exc: RequestError) -> tuple[Response, int]:
    """The JSON answer for a request error."""
    metrics.inc(metrics.REJECTED_REQUESTS, (str(exc.status),))
    if isinstance(exc, BodyTooLarge):
        close_connection()
    response = json_response({"success": False, "error": str(exc)})
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response, exc.status
