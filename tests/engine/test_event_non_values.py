"""Identifiers that are JavaScript non-values ("undefined", "null", "NaN", "[object Object]",
blank) are left out at intake and listed under ``dropped``; the event itself is kept."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from destinations import normalize as normalize_
from destinations.normalize import sha256_hex
from engine import identity
from engine.event import CONTEXT_IDS, normalize
from engine.rules import compile_container

NOW = datetime(2026, 11, 20, 15, 0, 0, tzinfo=UTC)
JUNK = ["undefined", "null", "NaN", "[object Object]", "", "  "]


def norm(**fields: Any) -> dict[str, Any]:
    return normalize({"event_name": "purchase", **fields}, NOW)


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize(
    "name", ["gclid", "gbraid", "wbraid", "ttclid", "msclkid", "fbc", "fbp", "ttp", "ga_client_id"]
)
def test_a_click_id_or_platform_cookie_that_is_no_value_is_left_out(name: str, junk: str) -> None:
    event = norm(context={name: junk, "page_url": "https://shop.example/"})

    assert name not in event["context"]
    assert event["context"]["page_url"] == "https://shop.example/"
    assert event["dropped"] == {f"context.{name}": junk}


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("name", ["email", "phone", "external_id", "first_name", "country"])
def test_user_data_that_is_no_value_is_left_out(name: str, junk: str) -> None:
    event = norm(user_data={name: junk, "city": "Berlin"})

    assert event["user_data"] == {"city": "Berlin"}
    assert event["dropped"] == {f"user_data.{name}": junk}


@pytest.mark.parametrize("junk", ["undefined", "null", "NaN", "[object Object]", " "])
@pytest.mark.parametrize("name", ["visitor_id", "session_id", "user_id"])
def test_a_visitor_session_or_user_id_that_is_no_value_is_left_out(name: str, junk: str) -> None:
    event = norm(**{name: junk})

    assert name not in event
    assert event["dropped"] == {name: junk}


def test_the_event_is_kept_with_its_real_identifiers() -> None:
    event = norm(
        user_id="undefined",
        visitor_id="v1",
        user_data={"email": "null", "phone": "+4915112345678"},
        context={"gclid": "undefined", "fbp": "fb.1.1732000000000.123"},
    )

    assert event["visitor_id"] == "v1"
    assert event["user_data"] == {"phone": "+4915112345678"}
    assert event["context"] == {"fbp": "fb.1.1732000000000.123"}
    assert event["dropped"] == {
        "user_id": "undefined",
        "user_data.email": "null",
        "context.gclid": "undefined",
    }


@pytest.mark.parametrize("kept", ["Null", "Nan", "nan", "None", "undefined_1", "0", "false"])
def test_names_and_other_text_are_kept(kept: str) -> None:
    event = norm(user_data={"last_name": kept}, context={"gclid": kept}, user_id=kept)

    assert event["user_data"] == {"last_name": kept}
    assert event["context"]["gclid"] == kept
    assert event["user_id"] == kept
    assert "dropped" not in event


def test_other_fields_are_not_identifiers_and_are_kept() -> None:
    event = norm(
        properties={"order_id": "undefined"},
        user_data={"loyalty_tier": "undefined"},
        context={"page_title": "null", "campaign": ""},
    )

    assert event["properties"] == {"order_id": "undefined"}
    assert event["user_data"] == {"loyalty_tier": "undefined"}
    assert event["context"] == {"page_title": "null", "campaign": ""}
    assert "dropped" not in event


def test_null_stays_absent_without_being_listed() -> None:
    event = norm(user_data={"email": None}, context={"gclid": None})

    assert "dropped" not in event


def test_the_clients_objects_are_not_changed() -> None:
    raw = {
        "event_name": "x",
        "user_id": "undefined",
        "user_data": {"email": "undefined"},
        "context": {"gclid": "null", "ip": "203.0.113.7"},
    }
    sent = copy.deepcopy(raw)

    normalize(raw, NOW)

    assert raw == sent


def test_every_remembered_identifier_is_checked() -> None:
    assert set(identity.REMEMBERED) <= CONTEXT_IDS


def test_nothing_dropped_is_remembered_for_enrichment() -> None:
    event = norm(
        visitor_id="v1",
        user_id="undefined",
        context={"gclid": "undefined", "ttclid": "abc"},
        consent={"ad_storage": "granted"},
    )

    update = identity.identity_update(event, frozenset({"ad_storage"}), NOW.timestamp())

    assert update is not None
    assert update.user_id is None
    assert dict(update.values) == {"ttclid": "abc"}


def test_a_client_cannot_send_dropped_itself() -> None:
    with pytest.raises(Exception, match="unknown field 'dropped'"):
        normalize({"event_name": "x", "dropped": {}}, NOW)


@pytest.mark.parametrize("junk", ["undefined", "null", "NaN", "%5Bobject+Object%5D", "+"])
def test_a_click_id_that_is_no_value_in_a_url_is_none(junk: str) -> None:
    url = f"https://shop.example/?gclid={junk}&ttclid={junk}&fbclid=IwAR-1"

    assert identity.click_ids_in_url(url) == {"fbclid": "IwAR-1"}
    assert normalize_.url_param(url, "gclid") is None
    assert normalize_.url_param(url, "fbclid") == "IwAR-1"


def test_a_server_events_page_url_gclid_undefined_is_not_remembered() -> None:
    event = norm(
        visitor_id="v1",
        context={"page_url": "https://shop.example/?gclid=undefined&ttclid=tt-1"},
    )

    update = identity.identity_update(event, frozenset({"ad_storage"}), NOW.timestamp())

    assert update is not None
    assert dict(update.values) == {"ttclid": "tt-1"}


def test_a_page_url_gclid_undefined_lets_the_remembered_click_through() -> None:
    event = norm(visitor_id="v1", context={"page_url": "https://shop.example/?gclid=undefined"})
    remembered = identity.Identity("v1", values={"gclid": ("Gc-real", NOW.timestamp())})

    added = identity.enrich(event, remembered, frozenset({"ad_storage"}))

    assert event["context"]["gclid"] == "Gc-real"
    assert "context.gclid" in added


PLATFORM_RULES = """
destinations:
  gads: {type: google_ads, customer_id: "123-456-7890", conversion_action: "111",
         developer_token: dt, client_id: ci, client_secret: cs, refresh_token: rt}
  tiktok: {type: tiktok, pixel_code: CABC, access_token: tiktok-token}
triggers:
  all: {event: "*"}
tags:
  - {name: gads, trigger: all, destination: gads}
  - {name: tiktok, trigger: all, destination: tiktok, event_name: CompletePayment}
"""


def test_google_ads_gets_the_hashed_email_and_no_gclid_undefined(
    write_rules: Callable[..., Path],
) -> None:
    rules, _ = compile_container(write_rules(PLATFORM_RULES), {})
    assert rules is not None
    event = norm(
        event_id="o1",
        user_id="undefined",
        properties={"order_id": "o1", "value": 10, "currency": "EUR"},
        user_data={"email": "ada@example.com", "external_id": "null", "phone": "undefined"},
        context={"gclid": "undefined", "ttclid": "NaN", "ip": "203.0.113.7", "user_agent": "UA"},
        consent={p: "granted" for p in ("ad_storage", "ad_user_data", "analytics_storage")},
    )

    sent = {d.tag: d.payload for d in rules.evaluate(event, now=NOW) if d.fired}

    conversion = sent["gads"]["row"]
    assert "gclid" not in conversion
    assert conversion["userIdentifiers"] == [{"hashedEmail": sha256_hex("ada@example.com")}]
    user = sent["tiktok"]["user"]
    assert not {"external_id", "phone", "ttclid"} & set(user)
    assert user["email"] == sha256_hex("ada@example.com")
