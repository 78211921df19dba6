"""``webhook``: POST events as JSON to any URL, optionally signed with HMAC-SHA256."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from destinations.base import Destination, HttpRequest, Item, PayloadContext, SendContext
from destinations.values import check_json

SIGNATURE_HEADER = "X-Tagrelay-Signature"

# ``Bearer <token>``, ``Basic <base64>``, ``Token token=<t>``: a scheme word, then the credential.
_SCHEME_VALUE = re.compile(r"^([A-Za-z][\w-]*)\s+(\S.*)$")
MIN_PART = 6  # characters of a credential found inside a header value
_WORD = re.compile(r"[^\W_]")
_AUTH_PARAM = re.compile(r"[\w-]+\s*=\s*\"?([^\",\s]+)")
# Query parameters that carry a credential in webhook URLs (Zapier, Make, IFTTT, custom CRMs).
_CREDENTIAL_PARAM = re.compile(r"token|key|secret|sig|auth|pass|code|credential", re.IGNORECASE)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t." + body>``.

    A receiver recomputes the HMAC over ``f"{t}.".encode() + raw_body`` with the shared secret,
    compares in constant time and rejects timestamps outside its replay window.
    """
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Webhook(Destination):
    """POST each event (or a batch, with ``batch: true``) as JSON to ``url``.

    Body: the payload object for one event; with ``batch: true``, ``{"events": [...]}`` with up
    to ``max_batch`` payloads. The default mapping is the canonical event itself, with the tag's
    ``event_name``. With ``secret`` set, every request carries ``X-Tagrelay-Signature`` (see
    :func:`sign`). Any 2xx is success; 408, 429 and 5xx are retried; 401/403 are auth failures.
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
            PayloadError: a value JSON cannot carry (NaN, an infinity), naming its field.
        """
        check_json(mapped, "")
        return super().build_payload(mapped, ctx)

    def batch_key(self, item: Item) -> str:
        """Without ``batch: true`` every item travels alone."""
        return "" if self.settings.get("batch") else item.delivery_id

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One POST with the payload, or ``{"events": [...]}`` when batching."""
        body_obj: Any = (
            {"events": [dict(i.payload) for i in items]}
            if self.settings.get("batch")
            else dict(items[0].payload)
        )
        body = json.dumps(body_obj, separators=(",", ":"), ensure_ascii=False).encode()
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
        headers = [str(v) for v in (self.settings.get("headers") or {}).values() if v]
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
    """The password and the credential-named query values of the webhook's URL."""
    try:
        parts = urlsplit(str(hook.settings.get("url") or ""))
        user, password = parts.username, parts.password
    except ValueError:
        return
    if password:
        yield password
    if user and (not password or len(user) >= MIN_PART):  # ``https://KEY:@host`` and the like
        yield user
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _CREDENTIAL_PARAM.search(name):
            yield value
