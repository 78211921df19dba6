"""Browser collection: ``POST /v1/collect``, the visitor cookie, CORS, and ``/tagrelay.js``.

Browsers authenticate with a publishable key (``?key=``) that reaches nothing else, from the
origins that key allows. Bodies may be ``text/plain`` JSON, so ``navigator.sendBeacon`` and
``fetch`` without a CORS preflight both work. When tagrelay is served from the site's own
subdomain (a CNAME such as ``t.shop.example``), the visitor cookie it sets is a first-party,
server-set cookie, which browsers do not cap at 7 days as they cap cookies set by scripts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from destinations.values import no_value
from engine import event as events
from engine.api import error_response, parse_json_body, read_body
from engine.config import PublishableKey, Settings
from engine.errors import BadRequest, BodyTooLarge, Forbidden, RequestError, Unauthorized
from engine.event import readable_ip
from engine.identity import as_collected
from engine.pipeline import Pipeline
from engine.ratelimit import RateLimiter

bp = Blueprint("collect", __name__)

MAX_COLLECT_BYTES = 64 * 1024  # a browser event is small; a large body is a mistake or abuse


def _settings() -> Settings:
    settings: Settings = current_app.extensions["tagrelay.settings"]
    return settings


def _key() -> PublishableKey:
    presented = request.args.get("key", "")
    if not presented:
        raise Unauthorized("missing publishable key: send ?key=<publishable key>")
    found = None
    for candidate in _settings().publishable_keys:
        if hmac.compare_digest(presented.encode(), candidate.key.encode()):
            found = candidate
    if found is None:
        raise Unauthorized("unknown publishable key")
    return found


def _origin() -> str | None:
    origin = request.headers.get("Origin")
    return origin.rstrip("/") if origin and origin != "null" else None


def _cors(response: Response, key: PublishableKey | None) -> Response:
    origin = _origin()
    if key is not None and origin and key.allows(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        # Readable by the page's script, which waits as long before it tries again (a 429, a
        # 503 while the store is down).
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.headers["Vary"] = "Origin"
    return response


def _readable_refusal(response: Response) -> None:
    """Let a page read that its key or its origin was refused (401, 403), and nothing else.

    Without it the browser hides the answer from the page's script, which cannot tell it from
    no answer at all and sends each event again, some nine requests, all refused; with it the
    script stops at the first, and says why on the console (``debug``). The answer holds only
    the reason: no cookie, and no header exposed.
    """
    origin = _origin()
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"  # fetch sends cookies
        response.headers["Vary"] = "Origin"


@bp.after_request
def _cors_on_every_answer(response: Response) -> Response:
    """CORS on the answers the app's error handlers make too (503 when the store is down), so
    the page's script can read why, and retry; and on refusals of the key or the origin, so it
    can read that it should not."""
    if request.method == "POST" and "Access-Control-Allow-Origin" not in response.headers:
        _cors(response, g.get("collect_key"))
        if response.status_code in (401, 403) and "Access-Control-Allow-Origin" not in (
            response.headers
        ):
            _readable_refusal(response)
    return response


@bp.route("/v1/collect", methods=["OPTIONS"])
def preflight() -> Response:
    """CORS preflight: allowed origins of the key get POST with Content-Type."""
    response = Response(status=204)
    try:
        key = _key()
    except RequestError:
        return response  # no allowance: the browser refuses the request itself
    _cors(response, key)
    if "Access-Control-Allow-Origin" in response.headers:
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


@bp.post("/v1/collect")
def collect() -> tuple[Response, int]:
    """Accept one event from a browser; set or refresh the visitor cookie."""
    key: PublishableKey | None = None
    try:
        length = request.content_length
        if length is not None and length > MAX_COLLECT_BYTES:
            # Before the key, the origin and the rate limit, as /v1/track's: refused there
            # (401, 403, 429), the body stayed unread on an open connection, and gunicorn read
            # on through all of it, whatever its size, to find the next request.
            with contextlib.suppress(RequestError):
                key = _key()  # for CORS only: the page's script can read why
            raise BodyTooLarge(f"a collected event is at most {MAX_COLLECT_BYTES} bytes")
        key = g.collect_key = _key()
        if not key.allows(_origin()):
            raise Forbidden("this page's origin is not allowed for the publishable key")
        limiter: RateLimiter = current_app.extensions["tagrelay.ratelimit"]
        # A publishable key is shared by every visitor of a site: its limit applies per client
        # IP, so one abusive client is throttled without silencing the whole site.
        limiter.check(f"{key.key}|{_rate_subject(_client_ip())}", time.time())
        body = read_body(cache=False)
        if len(body) > MAX_COLLECT_BYTES:  # chunked: maybe read only up to a limit
            raise BodyTooLarge(f"a collected event is at most {MAX_COLLECT_BYTES} bytes")
        raw = parse_json_body(
            body,
            request.content_type,
            allow_text=True,
            content_encoding=request.content_encoding,
            max_bytes=MAX_COLLECT_BYTES,
        )
        raw = _verified_user(raw)
        # Checked as the page sent it, before the server's own fields replace the page's: a
        # page's bad context or visitor ID gets the error /v1/track gives, not a silent fix.
        events.validate(raw)
        visitor_id = _visitor_id(raw)
        event = _from_browser(raw, visitor_id)
        pipeline: Pipeline = current_app.extensions["tagrelay.pipeline"]
        # Its source, browser, keeps the page's event IDs apart from the backend's: any page can
        # send any ID, and a backend's order ID sent first would make its sale a duplicate.
        outcome = pipeline.accept([event], source="browser")[0]
        if outcome.accepted is None:
            raise BadRequest(outcome.error or "invalid event")
    except RequestError as exc:
        response, status = error_response(exc)
        return _cors(response, key), status
    answer = outcome.as_json()
    # Which tags fired is the server's business: any page (the key is public) learnt from it
    # the shop's tags and, where a tag's dedup key kept its copy back, that an order exists.
    answer.pop("fired", None)
    answer["visitor_id"] = visitor_id
    response = jsonify(answer)
    _set_cookie(response, visitor_id)
    return _cors(response, key), 200


def _verified_user(raw: Any) -> Any:
    """The event without its ``user_hash``, once that proves the page may name its ``user_id``.

    Any page can claim any ``user_id``, and a user ID names a person to every platform and
    links the browser to them: later server events for that user are enriched with the
    browser's click IDs, IP and user agent. With ``TAGRELAY_IDENTITY_SECRET`` set, the page must
    send ``user_hash``, the hex HMAC-SHA256 of the user ID keyed with that secret, which only
    the site's backend can make; without it, ``user_hash`` is ignored.

    Raises:
        Forbidden: the secret is set and the user ID comes without its hash, or with another.
    """
    if not isinstance(raw, dict) or ("user_hash" not in raw and "user_id" not in raw):
        return raw
    raw = dict(raw)
    given = raw.pop("user_hash", None)
    secret = _settings().identity_secret
    user_id = raw.get("user_id")
    if secret is None or user_id is None or no_value(user_id):
        return raw  # a user ID "undefined" names no one: dropped at intake, never linked
    expected = hmac.new(secret.encode(), str(user_id).encode(), hashlib.sha256).hexdigest()
    if not isinstance(given, str) or not hmac.compare_digest(
        given.strip().lower().encode("utf-8", "surrogatepass"), expected.encode()
    ):
        raise Forbidden(
            "user_id needs its user_hash (identity verification is on): the hex HMAC-SHA256 "
            "of the user ID keyed with TAGRELAY_IDENTITY_SECRET, made by your backend"
            if given is None
            else "user_hash does not match user_id"
        )
    return raw


def _visitor_id(raw: dict[str, Any]) -> str:
    """The server's cookie first (the page cannot forge it), then the event's, else new.

    With identity verification on, the cookie alone, and only as the server signed it: a
    visitor ID is no secret (every answer and the page's storage hold it, GA4 gets it as
    client_id), and a client that named another browser's, in the body or in a cookie of its
    own making (any HTTP client sends what cookies it likes), would be enriched with its user
    and would write its own click IDs, IP and user agent into that visitor, for the user's next
    server event to carry. A JavaScript non-value (``undefined``, ``null``...) is none.
    """
    settings = _settings()
    cookie = request.cookies.get(settings.cookie_name)
    claimed = None
    if settings.identity_secret is None:
        claimed = raw.get("visitor_id")
    elif cookie is not None:
        cookie = _signed_visitor(cookie, settings.identity_secret)
    for candidate in (cookie, claimed):
        # A claimed "undefined" (a page's storage read before it was set) is no visitor: taken,
        # every such browser would be one visitor, each enriched with the others' clicks.
        if (
            isinstance(candidate, str)
            and 0 < len(candidate) <= 128
            and candidate.isprintable()
            and not no_value(candidate)
        ):
            return candidate
    return "v_" + secrets.token_urlsafe(18)


@functools.cache
def _visitor_key(secret: str) -> bytes:
    """The key of visitor cookie signatures, derived from the identity secret: not the secret
    itself, whose HMACs the site's backend hands out as user hashes, of user IDs that may be
    chosen by their users (a username ``visitor:<someone's visitor ID>``). The secret is the
    message here, not the key: an HMAC keyed with the secret, of any label, is a user hash the
    site would give out for a user ID spelt as that label, and with it the key."""
    return hmac.new(b"tagrelay visitor cookie", secret.encode(), hashlib.sha256).digest()


def _visitor_signature(visitor_id: str, secret: str) -> str:
    """What the visitor cookie carries after its visitor ID when identity verification is on:
    an HMAC-SHA256 of the ID under a key derived from the identity secret, which only the
    server can make."""
    mac = hmac.new(
        _visitor_key(secret), visitor_id.encode("utf-8", "surrogatepass"), hashlib.sha256
    )
    return mac.hexdigest()[:32]


def _signed_visitor(cookie: str, secret: str) -> str | None:
    """The visitor ID of a cookie ``<visitor ID>.<signature>`` the server set; None for any
    other (unsigned, signed with another secret, or made up)."""
    visitor_id, dot, signature = cookie.rpartition(".")
    if not dot or not hmac.compare_digest(
        signature.encode("utf-8", "surrogatepass"),
        _visitor_signature(visitor_id, secret).encode(),
    ):
        return None
    return visitor_id


def _client_ip() -> str | None:
    """The client's IP address: behind trusted proxies, the one they name (``ProxyFix``).

    An IPv4-mapped address is read as the IPv4 address it is: a server listening on ``[::]``
    sees every IPv4 client as ``::ffff:203.0.113.7``, and so may a proxy's header.
    """
    remote = request.remote_addr
    return readable_ip(remote) if remote else None


def _rate_subject(ip: str | None) -> str | None:
    """Whom a publishable key's rate limit counts: an IPv4 client by its address, an IPv6
    client by its /64, which one subscriber (one host, even) holds whole and picks any
    address of: counted per address, it had no limit."""
    if ip is None or ":" not in ip:
        return ip
    try:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    except ValueError:
        return ip


def _from_browser(raw: dict[str, Any], visitor_id: str) -> dict[str, Any]:
    """The event as the server sees it: as rule tests and previews take a page's event
    (:func:`~engine.identity.as_collected`: the click IDs of its URLs, a clock ahead of the
    server's), with its visitor and the request's IP and user agent."""
    event = dict(as_collected(raw, datetime.now(UTC)))
    event["visitor_id"] = visitor_id
    # The page's own claims of its IP and user agent are never taken, even when the request
    # tells neither: a page could name anyone's.
    context = {
        k: v for k, v in (event.get("context") or {}).items() if k not in ("ip", "user_agent")
    }
    client_ip = _client_ip()
    if client_ip:
        context["ip"] = client_ip
    if request.user_agent.string:
        context["user_agent"] = request.user_agent.string[:1000]
    event["context"] = context
    return event


def _set_cookie(response: Response, visitor_id: str) -> None:
    settings = _settings()
    secret = settings.identity_secret
    response.set_cookie(
        settings.cookie_name,
        visitor_id if secret is None else f"{visitor_id}.{_visitor_signature(visitor_id, secret)}",
        max_age=settings.cookie_max_age,
        path="/",
        domain=settings.cookie_domain,
        secure=settings.cookie_secure,
        httponly=True,
        samesite="Lax",
    )


@functools.cache
def _script() -> bytes:
    return resources.files("engine").joinpath("static/tagrelay.js").read_bytes()


@bp.get("/tagrelay.js")
def script() -> Response:
    """The browser script (read once per process)."""
    try:
        text = _script()
    except FileNotFoundError:
        return Response("// tagrelay.js is not installed\n", 404, content_type="text/javascript")
    response = Response(text, 200, content_type="text/javascript; charset=utf-8")
    response.headers["Cache-Control"] = "public, max-age=3600"
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response
