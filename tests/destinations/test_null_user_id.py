"""A null user_id (no user signed in, see engine.event.signs_out) is no user ID to any adapter.

Intake leaves the null out of the event; an event built another way (a plugin's test, a rule
test of an older version) that still carries it must not send it, nor its fallbacks' nulls.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from destinations.base import Destination, PayloadContext
from destinations.ga4 import GA4
from destinations.meta_capi import MetaCapi
from destinations.tiktok import TikTok
from destinations.webhook import Webhook
from engine.expr import build, compile_mapping

NOW = datetime.now(UTC).replace(microsecond=0)

ADAPTERS: dict[str, Destination] = {
    "meta": MetaCapi({"pixel_id": "1234567890", "access_token": "meta-test-token"}),
    "tiktok": TikTok({"pixel_code": "CTESTPIXEL123", "access_token": "tt-token"}),
    "ga4": GA4({"measurement_id": "G-ABC123", "api_secret": "ga4-secret"}),
    "webhook": Webhook({"url": "https://hooks.example/in"}),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_null_user_id_reaches_no_platform_as_a_user(
    name: str, canonical_event: dict[str, Any]
) -> None:
    adapter = ADAPTERS[name]
    canonical_event["user_id"] = None
    del canonical_event["user_data"]["external_id"]
    ctx = PayloadContext(name, "Purchase", "ord_789", NOW - timedelta(minutes=1), canonical_event)

    payload = adapter.build_payload(
        build(compile_mapping(adapter.default_mapping), canonical_event), ctx
    )

    text = json.dumps(payload)
    assert "external_id" not in text
    assert '"user_id": null' not in text  # the webhook's user_id, if kept, is no ID either
    assert "user_id" not in payload  # GA4's: no user
