"""``webhook``: POST events as JSON to any URL, optionally signed with HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from destinations.base import Destination, HttpRequest, Item, PayloadContext, SendContext
from destinations.values import check_json

SIGNATURE_HEADER = "X-Tagrelay-Signature"


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
        """The signing secret and every custom header value (they often carry tokens)."""
        values = [str(v) for v in (self.settings.get("headers") or {}).values() if v]
        if self.settings.get("secret"):
            values.append(str(self.settings["secret"]))
        return sorted(values, key=len, reverse=True)
