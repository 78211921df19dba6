"""``webhook``: POST events as JSON to any URL, optionally signed with HMAC-SHA256."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from destinations.base import (
    JSON_BODY,
    Destination,
    HttpRequest,
    Item,
    PayloadContext,
    PayloadError,
    SendContext,
    json_size,
)
from destinations.values import check_json

SIGNATURE_HEADER = "X-Tagrelay-Signature"

DEFAULT_BATCH_BODY_BYTES = 1_000_000
"""How long a ``batch: true`` body may grow without ``max_body_bytes``. Receivers sit behind
body-size limits that answer 413: nginx, in front of most of them, takes at most
``client_max_body_size``, 1 MiB (1,048,576 bytes) unless configured otherwise; 1,000,000 stays
under it, and under limits written as a decimal "1 MB". This is where batches are cut, not a
limit on events: the receiver's real limit is not known, so an event whose body alone is longer
goes alone, as it would without ``batch``. A receiver with a known limit (Express's
``express.json()`` takes 100 kB by default) needs ``max_body_bytes`` set to it."""
MIN_MAX_BODY_BYTES = 1024
_BATCH_FRAME = len(b'{"events":[]}')  # the body of ``batch: true`` around its payloads

# ``Bearer <token>``, ``Basic <base64>``, ``Token token=<t>``: a scheme word, then the credential.
_SCHEME_VALUE = re.compile(r"^([A-Za-z][\w-]*)\s+(\S.*)$")
MIN_PART = 6  # characters of a credential found inside a header value
_DIGIT = re.compile(r"[0-9]")
# Headers that carry no credential: their values (application/json...) stay readable in errors.
PLAIN_HEADERS = frozenset(
    {"content-type", "accept", "accept-encoding", "accept-language", "user-agent"}
)
_WORD = re.compile(r"[^\W_]")
_AUTH_PARAM = re.compile(r"[\w-]+\s*=\s*\"?([^\",\s]+)")
# Query parameters that carry a credential in webhook URLs (Zapier, Make, IFTTT, custom CRMs).
_CREDENTIAL_PARAM = re.compile(r"token|key|secret|sig|auth|pass|code|credential", re.IGNORECASE)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of t + "." + body>``.

    A receiver recomputes the HMAC over ``f"{t}.".encode() + raw_body`` with the shared secret,
    compares in constant time and rejects timestamps outside its replay window.
    """
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Webhook(Destination):
    """POST each event (or a batch, with ``batch: true``) as JSON to ``url``.

    Body: the payload object for one event; with ``batch: true``, ``{"events": [...]}`` with up
    to ``max_batch`` payloads, packed in order so that no body is longer than
    ``max_body_bytes``, or :data:`DEFAULT_BATCH_BODY_BYTES` without it (:meth:`split`). The
    default mapping is the canonical event itself, with the tag's ``event_name``. With
    ``secret`` set, every request carries ``X-Tagrelay-Signature`` (see :func:`sign`). Any 2xx
    is success; 408, 429 and 5xx are retried; 401/403 are auth failures; any other status is
    permanent, except a 413, which the delivery worker reads (a batch is sent again in halves;
    with ``Retry-After``, retried then).

    ``max_body_bytes`` is the receiver's limit, and holds for every request, batched or not: an
    event whose body, sent alone, would be longer is refused when its payload is built
    (:class:`PayloadError`: the tag does not fire, and the decision says why), never queued to
    be refused by the receiver. Without the setting no event is refused for its size (a single
    event goes as intake took it; a batched one too large for the default packing goes alone),
    since a default that refuses would refuse events the receiver may well take. Without the
    packing, one batch of 500 events over a proxy's limit was a 413, and every event of it a
    dead letter (replayed, the same again); the worker now halves such a batch, but the setting
    saves the requests that are answered 413 first.
    """

    name = "webhook"
    max_batch = 500
    secret_settings = frozenset({"secret", "headers"})
    settings_schema = {
        "type": "object",
        "required": ["url"],
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "pattern": "^https?://"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "secret": {"type": "string", "minLength": 16, "description": "HMAC signing secret"},
            "batch": {"type": "boolean", "default": False},
            "secret_url": {
                "type": "boolean",
                "default": False,
                "description": (
                    "the URL's path and query are a credential (Slack, Discord or Zapier hooks):"
                    " redacted wherever the URL is shown"
                ),
            },
            "max_body_bytes": {
                "type": "integer",
                "minimum": MIN_MAX_BODY_BYTES,
                "description": (
                    "the longest request body the receiver takes, in bytes (UTF-8), for every"
                    " request; an event whose body alone is longer is refused. Unset: batches"
                    " are cut at 1,000,000 bytes and no event is refused for its size"
                ),
            },
        },
    }
    default_mapping = {
        key: key
        for key in (
            "event_id",
            "timestamp",
            "visitor_id",
            "session_id",
            "user_id",
            "properties",
            "user_data",
            "context",
            "consent",
        )
    }

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """The mapped fields as they are, with the event's name, ID and time.

        Raises:
            PayloadError: a value JSON cannot carry (NaN, an infinity), naming its field; text
                UTF-8 cannot carry (a lone surrogate); or a body, for this event alone, longer
                than ``max_body_bytes`` (when it is set).
        """
        check_json(mapped, "")
        payload = super().build_payload(mapped, ctx)
        limit = self.max_body_bytes
        if limit is None:
            # Nothing to measure against (an encoding per event is a tenth of an event's
            # payload step); text UTF-8 cannot carry never passes intake (see api.py).
            return payload
        try:
            size = self._alone(json_size(payload))
        except ValueError:
            raise PayloadError("webhook: the event holds text UTF-8 cannot carry") from None
        if size > limit:
            raise PayloadError(
                f"webhook: the request body must be at most max_body_bytes ({limit} B); "
                f"this event alone makes {size} B"
            )
        return payload

    @property
    def max_body_bytes(self) -> int | None:
        """The ``max_body_bytes`` setting, the longest body the receiver takes; None if unset."""
        value = self.settings.get("max_body_bytes")
        return int(value) if value else None

    def _alone(self, payload_size: int) -> int:
        """The body size of a request that sends one payload of ``payload_size`` bytes."""
        return payload_size + (_BATCH_FRAME if self.settings.get("batch") else 0)

    def batch_key(self, item: Item) -> str:
        """Without ``batch: true`` every item travels alone."""
        return "" if self.settings.get("batch") else item.delivery_id

    def sends_alone(self) -> bool:
        """Without ``batch: true``: one event a request."""
        return not self.settings.get("batch")

    def split(self, items: Sequence[Item]) -> list[list[Item]]:
        """With ``batch: true``, the items packed in order into requests of at most
        ``max_batch`` events whose body is at most ``max_body_bytes`` long
        (:data:`DEFAULT_BATCH_BODY_BYTES` without the setting).

        Greedy: each event joins the current request when it still fits, else starts the next.
        The size counted is the body :meth:`build_request` sends, byte for byte (UTF-8), from
        each payload encoded once. An event that fits only alone goes alone
        (with ``max_body_bytes`` set, :meth:`build_payload` refuses one that does not fit even
        so; one queued before the limit was lowered goes alone, and :meth:`build_request`
        refuses it).
        """
        if not self.settings.get("batch"):
            return super().split(items)
        limit = self.max_body_bytes or DEFAULT_BATCH_BODY_BYTES
        requests: list[list[Item]] = []
        size = 0
        for item in items:
            try:
                item_size = json_size(dict(item.payload))
            except ValueError:  # text UTF-8 cannot carry: alone, so it fails alone
                requests.append([item])
                size = limit
                continue
            grown = size + 1 + item_size  # a comma, then the payload
            if requests and len(requests[-1]) < self.max_batch and grown <= limit:
                requests[-1].append(item)
                size = grown
            else:
                requests.append([item])
                size = _BATCH_FRAME + item_size
        return requests

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One POST with the payload, or ``{"events": [...]}`` when batching.

        Raises:
            PayloadError: the body is longer than ``max_body_bytes`` (an event queued before
                the limit was set or lowered): the receiver would refuse it, so it is not sent.
        """
        body_obj: Any = (
            {"events": [dict(i.payload) for i in items]}
            if self.settings.get("batch")
            else dict(items[0].payload)
        )
        body = JSON_BODY.encode(body_obj).encode()
        if (limit := self.max_body_bytes) is not None and len(body) > limit:
            raise PayloadError(
                f"webhook: the request body must be at most max_body_bytes ({limit} B); "
                f"this one is {len(body)} B"
            )
        headers = {"Content-Type": "application/json", "User-Agent": "tagrelay"}
        headers.update(self.settings.get("headers") or {})
        secret = self.settings.get("secret")
        if secret:
            headers[SIGNATURE_HEADER] = sign(str(secret), int(ctx.now.timestamp()), body)
        return HttpRequest("POST", str(self.settings["url"]), headers, body)

    def secrets(self) -> list[str]:
        """Everything in the settings that may be a credential, longest first.

        The signing secret; every custom header value, whole and by its credential part
        (``Bearer <token>`` also hides a bare ``<token>`` quoted in an answer, ``Basic`` also the
        decoded password); and in the URL, the password of ``user:password@`` and the values of
        query parameters named like a credential (``token``, ``api_key``, ``sig``, ...).
        """
        headers = [
            str(v)
            for k, v in (self.settings.get("headers") or {}).items()
            if v and str(k).lower() not in PLAIN_HEADERS
        ]
        values = {v for v in headers if v.strip()}
        if self.settings.get("secret"):
            values.add(str(self.settings["secret"]))
        # Parts found inside a header value: a short word ("X-Source: my site") or a fragment
        # with no letter or digit ("=") is taken for no credential: it would mangle text.
        parts = (p for v in headers for p in _header_credentials(v))
        values.update(p for p in parts if len(p) >= MIN_PART and _WORD.search(p))
        values.update(p for p in _url_credentials(self) if _WORD.search(p))
        return sorted(values, key=len, reverse=True)


def _header_credentials(value: str) -> Iterator[str]:
    """The credential inside a header value."""
    if (match := _SCHEME_VALUE.match(value.strip())) is None:
        return
    scheme, credential = match.group(1).lower(), match.group(2).strip()
    yield credential
    if scheme != "basic":  # ``Token token="abc"``: each parameter's value (base64 ends in "=")
        yield from (m.group(1) for m in _AUTH_PARAM.finditer(credential))
    else:
        try:
            decoded = base64.b64decode(credential, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return
        yield decoded
        yield decoded.partition(":")[2]


def _url_credentials(hook: Webhook) -> Iterator[str]:
    """The password and the credential-named query values of the webhook's URL.

    The password as written (percent-encoded) and as sent: ``requests`` decodes the URL's
    ``user:password@`` and sends it as ``Authorization: Basic base64(user:password)``, which a
    receiver may quote back in either form.
    """
    try:
        parts = urlsplit(str(hook.settings.get("url") or ""))
        user, password = parts.username, parts.password
    except ValueError:
        return
    if password:
        yield password
        yield unquote(password)
    if user and (not password or len(user) >= MIN_PART):  # ``https://KEY:@host`` and the like
        yield user
        yield unquote(user)
    if hook.settings.get("secret_url"):
        # The whole of what follows the host, and its token-like segments (a word such as
        # "services" is none): an answer may quote either.
        yield parts.path + (f"?{parts.query}" if parts.query else "")
        yield from (s for s in parts.path.split("/") if len(s) >= 8 and _DIGIT.search(s))
    if user or password:
        pair = f"{unquote(user or '')}:{unquote(password or '')}"
        with contextlib.suppress(UnicodeEncodeError):  # requests sends it as latin-1
            yield base64.b64encode(pair.encode("latin1")).decode("ascii")
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _CREDENTIAL_PARAM.search(name):
            yield value
