"""The canonical event: validation, the event_type alias, timestamps, IDs and consent values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from engine.errors import BadRequest
from engine.event import normalize, parse_timestamp, signs_out, simulated_source

NOW = datetime(2026, 11, 20, 15, 0, 0, tzinfo=UTC)


def norm(**fields: Any) -> dict[str, Any]:
    return normalize({"event_name": "purchase", **fields}, NOW)


def error_of(raw: Any) -> str:
    with pytest.raises(BadRequest) as info:
        normalize(raw, NOW)
    return str(info.value)


def test_minimal_event_gets_an_id_and_the_time_of_receipt() -> None:
    event = normalize({"event_name": "page_view"}, NOW)

    assert event["event_name"] == "page_view"
    assert len(event["event_id"]) == 32
    assert event["timestamp"] == "2026-11-20T15:00:00.000Z"


def test_generated_event_ids_are_unique() -> None:
    ids = {normalize({"event_name": "x"}, NOW)["event_id"] for _ in range(200)}

    assert len(ids) == 200


def test_empty_event_id_is_rejected_rather_than_silently_replaced() -> None:
    assert error_of({"event_name": "x", "event_id": ""}) == "event_id is too short"


def test_integer_event_id_is_kept_as_text() -> None:
    assert norm(event_id=12345)["event_id"] == "12345"


def test_event_type_is_an_alias_of_event_name() -> None:
    event = normalize({"event_type": "sale", "event_id": "o1"}, NOW)

    assert event["event_name"] == "sale"
    assert "event_type" not in event


def test_event_type_beside_the_same_event_name_is_taken_and_a_different_one_refused() -> None:
    # A different one used to be dropped without a word: a purchase sent as whatever
    # event_name said.
    event = normalize({"event_name": "purchase", "event_type": "purchase"}, NOW)

    assert event["event_name"] == "purchase"
    assert "event_type" not in event
    assert error_of({"event_name": "page_view", "event_type": "purchase"}) == (
        "event_name and event_type differ ('page_view' and 'purchase'): send one name "
        "(event_type is an alias of event_name)"
    )


def test_event_without_a_name_names_the_alias_in_its_error() -> None:
    assert error_of({"event_id": "a"}) == (
        "event_name is required (event_type is accepted as an alias)"
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "an event must be a JSON object"),
        ("purchase", "an event must be a JSON object"),
        (None, "an event must be a JSON object"),
        ({"event_name": ""}, "event_name is too short"),
        ({"event_name": "x" * 257}, "event_name is too long"),
        ({"event_name": 5}, "event_name must be string"),
        ({"event_name": "x", "colour": "red"}, "unknown field 'colour' in event"),
        ({"event_name": "x", "properties": []}, "properties must be object"),
        ({"event_name": "x", "user_data": {"email": 5}}, "user_data.email must be string or null"),
        ({"event_name": "x", "context": {"ip": 5}}, "context.ip must be string or null"),
        ({"event_name": "x", "event_id": 1.5}, "event_id must be string or integer"),
        ({"event_name": "x", "event_id": True}, "event_id must be string or integer"),
        (
            {"event_name": "x", "consent": {"ad_storage": "yes"}},
            "consent.ad_storage must be 'granted', 'denied', a boolean or null",
        ),
        ({"event_name": "x", "timestamp": None}, "timestamp must be string or number"),
        ({"event_name": "x", "user_id": ""}, "user_id is too short"),
        ({"event_name": "x", "user_id": "u" * 257}, "user_id is too long"),
        ({"event_name": "x", "user_id": 42}, "user_id must be string or null"),
    ],
)
def test_invalid_events_are_rejected_with_a_message_naming_the_field(
    raw: Any, message: str
) -> None:
    assert error_of(raw) == message


def test_a_null_user_id_says_nobody_is_signed_in_and_is_left_out() -> None:
    # "user_id": null (tagrelay.js after reset(), a backend's logout): the event names no
    # user, for the store and every tag; signs_out tells the pipeline to forget the visitor's.
    raw = {"event_name": "page_view", "visitor_id": "v1", "user_id": None}

    for source in ("server", "browser"):
        event = normalize(raw, NOW, source=source)
        assert "user_id" not in event
    assert raw["user_id"] is None  # what the client sent stays as sent
    assert signs_out(raw)
    assert not signs_out({"event_name": "page_view"})  # no user_id: not a sign-out
    assert not signs_out({"event_name": "page_view", "user_id": "u1"})
    assert norm(user_id="u1")["user_id"] == "u1"


def test_user_data_fields_may_be_null() -> None:
    event = norm(user_data={"email": None, "phone": "+4915112345678"})

    assert event["user_data"] == {"email": None, "phone": "+4915112345678"}


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-11-20T14:30:45Z", "2026-11-20T14:30:45.000Z"),
        ("2026-11-20T14:30:45+02:00", "2026-11-20T12:30:45.000Z"),
        ("2026-11-20T09:30:45.123-05:00", "2026-11-20T14:30:45.123Z"),
        ("2026-11-20T14:30:45", "2026-11-20T14:30:45.000Z"),  # no offset: taken as UTC
        (" 2026-11-20T14:30:45Z ", "2026-11-20T14:30:45.000Z"),
        (1795185045, "2026-11-20T14:30:45.000Z"),
        (1795185045.5, "2026-11-20T14:30:45.500Z"),
    ],
)
def test_timestamps_are_stored_in_utc_with_a_z(sent: Any, stored: str) -> None:
    assert norm(timestamp=sent)["timestamp"] == stored


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (1795185045000, "timestamp looks like milliseconds; send Unix seconds"),
        ("20 Nov 2026", "timestamp must be ISO 8601 (e.g. 2026-11-20T14:30:45Z)"),
        ("1795703445", "timestamp: Unix seconds must be a JSON number, not a string"),
        (True, "timestamp must be an ISO 8601 string or Unix seconds"),
        ("1999-12-31T23:59:59Z", "timestamp is before the year 2000"),
        (0, "timestamp is before the year 2000"),
        (-5, "timestamp is before the year 2000"),
        ("0001-01-01T00:00:00+01:00", "timestamp is out of range"),
        ("9999-12-31T23:59:59-14:00", "timestamp is out of range"),
        (1e300, "timestamp is out of range"),
        (float("nan"), "timestamp is out of range"),
    ],
)
def test_unreadable_timestamps_are_rejected(sent: Any, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_timestamp(sent, NOW)

    assert str(info.value) == message


def test_timestamp_up_to_an_hour_ahead_is_accepted_for_clock_skew() -> None:
    ahead = (NOW + timedelta(minutes=59)).timestamp()

    assert norm(timestamp=ahead)["timestamp"] == "2026-11-20T15:59:00.000Z"


def test_timestamp_more_than_an_hour_in_the_future_is_rejected() -> None:
    ahead = (NOW + timedelta(hours=1, seconds=1)).isoformat()

    with pytest.raises(BadRequest, match="more than an hour in the future"):
        norm(timestamp=ahead)


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (True, "granted"),
        (False, "denied"),
        ("granted", "granted"),
        ("denied", "denied"),
        ("GRANTED", "granted"),  # as Google's Ads API writes them
        ("Denied", "denied"),
    ],
)
def test_consent_values_become_granted_or_denied(sent: Any, stored: str) -> None:
    event = norm(consent={"ad_storage": sent, "custom_purpose": sent})

    assert event["consent"] == {"ad_storage": stored, "custom_purpose": stored}


def test_a_consent_purpose_of_null_is_taken_as_not_sent() -> None:
    # A consent platform's undecided purpose: the whole event was refused for it.
    event = norm(consent={"ad_storage": None, "analytics_storage": "granted"})

    assert event["consent"] == {"analytics_storage": "granted"}


def test_normalize_does_not_change_what_the_client_sent() -> None:
    raw = {"event_type": "x", "consent": {"ad_storage": True}}

    normalize(raw, NOW)

    assert raw == {"event_type": "x", "consent": {"ad_storage": True}}


def test_the_source_is_the_endpoints_and_never_the_clients() -> None:
    assert normalize({"event_name": "x"})["source"] == "server"
    assert normalize({"event_name": "x"}, source="browser")["source"] == "browser"
    with pytest.raises(BadRequest, match=r"^source is set by tagrelay"):
        normalize({"event_name": "x", "source": "server"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"event_name": "x"}, ({"event_name": "x"}, "server")),
        ({"event_name": "x", "source": "browser"}, ({"event_name": "x"}, "browser")),
        ({"event_name": "x", "source": "server"}, ({"event_name": "x"}, "server")),
        (["not an event"], (["not an event"], "server")),  # refused later, by normalize
    ],
)
def test_a_preview_or_rule_test_event_may_say_which_endpoint_it_stands_for(
    raw: Any, expected: tuple[Any, str]
) -> None:
    assert simulated_source(raw) == expected


@pytest.mark.parametrize("source", ["phone", None, 1, "Browser"])
def test_a_simulated_source_is_server_or_browser(source: Any) -> None:
    with pytest.raises(BadRequest, match=r"^source must be 'server' or 'browser'"):
        simulated_source({"event_name": "x", "source": source})
