"""``log``: write each event to tagrelay's own log instead of sending it anywhere.

For trying rules out and for a default container that works with no platform account. The
payload's identifying fields are never written: the log line names the event, its ID, its tag's
platform event name and the payload's top-level fields, nothing a person can be found by.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from destinations.base import Destination, HttpRequest, Item, PayloadContext, SendContext
from destinations.values import check_json

LOG_URL = "log:tagrelay.delivered"
"""The engine's transport writes requests to this URL to the log (see engine.transport)."""


class Log(Destination):
    """Write one log line per event (JSON, no personal data). Always succeeds."""

    name = "log"
    max_batch = 500
    settings_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"level": {"enum": ["debug", "info"], "default": "info"}},
    }
    default_mapping = {"properties": "properties"}

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """The mapped fields as they are, with the event's name, ID and time.

        The values are never written out, but they are stored as the payload, which stays
        strict JSON like every other destination's.

        Raises:
            PayloadError: a value JSON cannot carry (NaN, an infinity), naming its field.
        """
        check_json(mapped, "")
        return super().build_payload(mapped, ctx)

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """A request to the ``log:`` transport carrying one summary line per item."""
        lines: list[dict[str, Any]] = [
            {
                "event_id": item.event_id,
                "event_name": item.payload.get("event_name"),
                "fields": sorted(item.payload),
            }
            for item in items
        ]
        level = str(self.settings.get("level", "info"))
        return HttpRequest(
            "POST",
            LOG_URL,
            {"X-Log-Level": level, "Content-Type": "application/json"},
            json.dumps(lines, separators=(",", ":")).encode(),
        )
