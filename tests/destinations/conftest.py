"""Fixtures for the destination adapter tests: one loopback emulator per platform."""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root must be importable (``destinations``, ``engine``, ``destinations.testkit``)
# when pytest is run as ``.venv/bin/pytest`` without an installed package. Setting
# ``pythonpath = ["."]`` in pyproject's pytest options would make this unnecessary.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import copy  # noqa: E402 - after the path set-up above
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from destinations.testkit.meta import MetaEmulator  # noqa: E402
from destinations.testkit.tiktok import TikTokEmulator  # noqa: E402

CANONICAL_EVENT: dict[str, Any] = {
    "event_name": "purchase",
    "event_id": "ord_789",
    "timestamp": "2026-11-20T14:30:45Z",
    "visitor_id": "vis_abc",
    "session_id": "sess_123",
    "user_id": "user_12345",
    "properties": {
        "order_id": "ord_789",
        "value": 129.0,
        "currency": "EUR",
        "items": [{"id": "sku_1", "name": "Shoe", "price": 129.0, "quantity": 1}],
        "related_order_id": None,
    },
    "user_data": {
        "email": "a@example.com",
        "phone": "+4915112345678",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "date_of_birth": "1990-12-10",
        "gender": "female",
        "city": "Berlin",
        "state": "BE",
        "postal_code": "10115",
        "country": "DE",
        "external_id": "cust_42",
    },
    "context": {
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "page_url": "https://shop.example/checkout?gclid=abc",
        "referrer": "https://shop.example/cart",
        "gclid": None,
        "gbraid": None,
        "wbraid": None,
        "fbclid": None,
        "fbc": None,
        "fbp": None,
        "ttclid": None,
        "ttp": None,
        "msclkid": None,
        "ga_client_id": None,
        "ga_session_id": None,
    },
    "consent": {
        "ad_storage": "granted",
        "analytics_storage": "granted",
        "ad_user_data": "granted",
        "ad_personalization": "denied",
    },
}
"""The canonical event of BRIEF.md, as a client would send it."""


@pytest.fixture
def meta_emulator() -> Iterator[MetaEmulator]:
    """A running Meta Conversions API emulator."""
    with MetaEmulator() as emulator:
        yield emulator


@pytest.fixture
def tiktok_emulator() -> Iterator[TikTokEmulator]:
    """A running TikTok Events API emulator."""
    with TikTokEmulator() as emulator:
        yield emulator


@pytest.fixture
def canonical_event() -> dict[str, Any]:
    """A fresh copy of BRIEF.md's canonical event."""
    return copy.deepcopy(CANONICAL_EVENT)
