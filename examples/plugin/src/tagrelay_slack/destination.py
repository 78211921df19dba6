"""The ``slack`` destination: one Slack message per event, through an incoming webhook."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from destinations.base import (
    Destination,
    HttpRequest,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    PayloadContext,
    PayloadError,
    SendContext,
    status_result,
)

DEFAULT_TEMPLATE = "*$event_name* $order $value $currency"
"""The message when the rules set no ``template``: e.g. ``*sale* ord_42 129.0 EUR``."""

MAX_TEXT = 4000
"""Slack shows at most about 4,000 characters of ``text``; longer messages are cut."""

# Slack's incoming-webhook errors that only an operator can fix: the webhook was revoked
# (404 no_service), its channel is gone (404 channel_not_found, 410 channel_is_archived) or
# posting is not allowed (403 action_prohibited). Retrying the same request will not help.
_OPERATOR_STATUSES = frozenset({403, 404, 410})
_SPACES = re.compile(r"[ \t]{2,}")


class _Blank(dict[str, str]):
    """Template values where a name with no value reads as an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn gives a meaning to (``&``, ``<``, ``>``)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Slack(Destination):
    """Post each event as a message to a Slack incoming webhook (``POST <webhook_url>``).

    Settings: ``webhook_url`` (secret: the URL itself is the credential), ``template`` (the
    message, with ``$name`` placeholders; default :data:`DEFAULT_TEMPLATE`), and ``username``
    and ``icon_emoji`` (honoured by legacy webhooks only).

    Placeholders: ``$event_name`` (the tag's event name), ``$event_id``, ``$timestamp`` and
    every ``fields.<name>`` the mapping produces. A placeholder with no value is left empty.
    Values are escaped for Slack's mrkdwn; the template is not, so it may use ``*bold*``.

    Default mapping (target -> canonical event)::

        fields.order      properties.related_order_id || properties.order_id
        fields.value      properties.value
        fields.currency   properties.currency

    No personal data is in the default mapping: a channel is read by many people. A tag can
    add fields (``fields.coupon: properties.coupon``) and use them in its destination's
    template.

    Responses: any 2xx is delivered; 429 and 5xx are retried (``Retry-After`` honoured);
    403, 404 and 410 mean the webhook or its channel is gone (``AUTH``: an operator must act);
    other 4xx (``invalid_payload``, ``no_text``) are permanent.
    """

    name: ClassVar[str] = "slack"
    max_batch: ClassVar[int] = 1  # an incoming webhook takes one message per request
    secret_settings: ClassVar[frozenset[str]] = frozenset({"webhook_url"})
    settings_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["webhook_url"],
        "additionalProperties": False,
        "properties": {
            "webhook_url": {
                "type": "string",
                "pattern": "^https?://",
                "description": "The incoming webhook URL (https://hooks.slack.com/services/...).",
            },
            "template": {
                "type": "string",
                "minLength": 1,
                "default": DEFAULT_TEMPLATE,
                "description": "The message text with $placeholders.",
            },
            "username": {"type": "string", "minLength": 1},
            "icon_emoji": {"type": "string", "pattern": "^:[a-z0-9_+-]+:$"},
        },
    }
    default_mapping: ClassVar[Mapping[str, str]] = {
        "fields.order": "properties.related_order_id || properties.order_id",
        "fields.value": "properties.value",
        "fields.currency": "properties.currency",
    }

    def __init__(self, settings: Mapping[str, Any]) -> None:
        """Keep the settings and check the template once, when the rules load.

        Raises:
            ValueError: the template has a ``$`` that starts no valid placeholder.
        """
        super().__init__(settings)
        self.template = string.Template(str(self.settings.get("template") or DEFAULT_TEMPLATE))
        if not self.template.is_valid():
            raise ValueError("template: a $ must start a placeholder ($name or ${name}; $$ for $)")

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """The Slack message body: ``{"text": ..., "username"?: ..., "icon_emoji"?: ...}``.

        Raises:
            PayloadError: ``fields`` is not an object, or the message comes out empty.
        """
        fields = mapped.get("fields") or {}
        if not isinstance(fields, Mapping):
            raise PayloadError("Slack: fields must be an object")
        values = _Blank(
            {k: escape(_text(v)) for k, v in fields.items() if v is not None and k.isidentifier()}
        )
        values.update(
            event_name=escape(ctx.event_name),
            event_id=escape(ctx.event_id),
            timestamp=ctx.event_time.isoformat().replace("+00:00", "Z"),
        )
        text = _SPACES.sub(" ", self.template.substitute(values)).strip()
        if not text:
            raise PayloadError("Slack: the message text is empty (check the template)")
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 1] + "…"
        payload: dict[str, Any] = {"text": text}
        for key in ("username", "icon_emoji"):
            if self.settings.get(key):
                payload[key] = str(self.settings[key])
        return payload

    # -- delivery -------------------------------------------------------------------------------

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One JSON POST of the single item's message to the webhook URL."""
        if len(items) != 1:
            raise ValueError("Slack incoming webhooks take exactly one message per request")
        return HttpRequest.json_post(str(self.settings["webhook_url"]), dict(items[0].payload))

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """Slack answers in plain text (``ok``, ``invalid_payload``, ``no_service``, ...)."""
        result = status_result(response)
        if response.status in _OPERATOR_STATUSES:
            reason = f"Slack HTTP {response.status}: {response.excerpt(200)}".strip()
            result = ItemResult(Outcome.AUTH, reason)
        return [result] * len(items)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
