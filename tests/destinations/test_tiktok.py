"""The TikTok Events API 2.0 adapter, against the loopback TikTok emulator."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest

from destinations.base import (
    REDACTED,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    PayloadContext,
    PayloadError,
    SendContext,
)
from destinations.normalize import sha256_hex
from destinations.testkit.server import send
from destinations.testkit.tiktok import TikTokEmulator
from destinations.tiktok import TikTok
from engine.expr import build, compile_mapping

NOW = datetime.now(UTC).replace(microsecond=0)


def tiktok(emulator: TikTokEmulator | None = None, **settings: Any) -> TikTok:
    """An adapter pointed at ``emulator``, with ``settings`` on top of working defaults."""
    base: dict[str, Any] = {"pixel_code": "CTESTPIXEL123", "access_token": "tt-token"}
    if emulator is not None:
        base["endpoint"] = emulator.url
    base.update(settings)
    return TikTok(base)


def context(
    event_name: str = "Purchase",
    event_time: datetime | None = None,
    event: dict[str, Any] | None = None,
) -> PayloadContext:
    return PayloadContext(
        tag="tiktok_purchase",
        event_name=event_name,
        event_id="ord_789",
        event_time=event_time or NOW - timedelta(minutes=1),
        event=event or {},
    )


def mapped_event(**user: Any) -> dict[str, Any]:
    """A small mapped event, with ``user`` fields."""
    return {
        "user": {"email": "a@example.com", "ip": "203.0.113.7", **user},
        "properties": {"value": 10, "currency": "eur"},
        "page": {"url": "https://shop.example/thanks"},
    }


def deliver(
    dest: TikTok, payloads: Sequence[dict[str, Any]], now: datetime = NOW
) -> list[ItemResult]:
    """build_request -> real HTTP -> read_response, for one batch."""
    items = [Item(f"d{i}", str(p["event_id"]), p) for i, p in enumerate(payloads)]
    request = dest.build_request(items, SendContext(now=now))
    return dest.read_response(send(request), items)


# -- the default mapping, end to end -------------------------------------------------------------


def test_default_mapping_of_the_canonical_event_is_accepted_by_the_emulator(
    tiktok_emulator: TikTokEmulator, canonical_event: dict[str, Any]
) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator)
    mapped = build(compile_mapping(TikTok.default_mapping), canonical_event)
    ctx = context()

    # Act
    payload = dest.build_payload(mapped, ctx)
    results = deliver(dest, [payload])

    # Assert
    assert results == [ItemResult.delivered()]
    (body,) = tiktok_emulator.bodies
    assert body["event_source"] == "web"
    assert body["event_source_id"] == "CTESTPIXEL123"
    assert "test_event_code" not in body
    (event,) = tiktok_emulator.events
    assert event == {
        "event": "Purchase",
        "event_time": int(ctx.event_time.timestamp()),
        "event_id": "ord_789",
        "user": {
            "email": sha256_hex("a@example.com"),
            "phone": sha256_hex("+4915112345678"),
            "external_id": sha256_hex("cust_42"),
            "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        },
        "properties": {
            "value": 129.0,
            "currency": "EUR",
            "order_id": "ord_789",
            "contents": [
                {"content_id": "sku_1", "content_name": "Shoe", "price": 129.0, "quantity": 1}
            ],
            "content_type": "product",
        },
        "page": {
            "url": "https://shop.example/checkout?gclid=abc",
            "referrer": "https://shop.example/cart",
        },
    }


def test_default_mapping_sends_ttclid_and_ttp_unhashed(
    tiktok_emulator: TikTokEmulator, canonical_event: dict[str, Any]
) -> None:
    # Arrange
    canonical_event["context"].update(ttclid="E.C.P.AbC123", ttp="2Xy_ttp.cookie")
    dest = tiktok(tiktok_emulator)
    mapped = build(compile_mapping(TikTok.default_mapping), canonical_event)

    # Act
    results = deliver(dest, [dest.build_payload(mapped, context())])

    # Assert
    assert results == [ItemResult.delivered()]
    user = tiktok_emulator.events[0]["user"]
    assert user["ttclid"] == "E.C.P.AbC123"
    assert user["ttp"] == "2Xy_ttp.cookie"


# -- normalization and hashing -------------------------------------------------------------------


def test_tiktok_phone_is_e164_with_plus() -> None:
    # Arrange
    mapped = mapped_event(phone="+1 (650) 555-1212")

    # Act
    payload = tiktok().build_payload(mapped, context())

    # Assert
    assert payload["user"]["phone"] == sha256_hex("+16505551212")


def test_national_phone_is_read_in_the_default_country() -> None:
    # Arrange
    mapped = mapped_event(phone="0151 12345678")

    # Act
    payload = tiktok(default_country="DE").build_payload(mapped, context())

    # Assert
    assert payload["user"]["phone"] == sha256_hex("+4915112345678")


@pytest.mark.parametrize("default_country", [None, "DE"])
def test_national_phone_is_read_in_the_event_country_before_the_default(
    default_country: str | None,
) -> None:
    # Arrange: the default mapping does not map user.country; the event says US
    settings = {"default_country": default_country} if default_country else {}
    event = {"user_data": {"phone": "(650) 555-1212", "country": "US"}}
    mapped = build(compile_mapping(TikTok.default_mapping), event)

    # Act
    user = tiktok(**settings).build_payload(mapped, context(event=event))["user"]

    # Assert: read as a US number, and the country itself is still not sent
    assert user["phone"] == sha256_hex("+16505551212")
    assert "country" not in user


def test_mapped_user_country_wins_over_the_event_country() -> None:
    # Arrange
    event = {"user_data": {"country": "US"}}
    mapped = mapped_event(phone="0151 12345678", country="Germany")

    # Act
    user = tiktok().build_payload(mapped, context(event=event))["user"]

    # Assert
    assert user["phone"] == sha256_hex("+4915112345678")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [("CA 94035", "94035"), ("ZIP 94035", "94035"), ("94035 USA", "94035"), ("K1A 0B1", "k1a0b1")],
)
def test_us_zip_with_words_around_it_is_its_five_digits_under_a_us_default_country(
    raw: str, normalized: str
) -> None:
    # Arrange: the person's country is unknown, the shop's default is the US
    mapped = mapped_event(zip_code=raw)

    # Act
    user = tiktok(default_country="US").build_payload(mapped, context())["user"]

    # Assert: lowercase alphanumerics for a code of another country, not its digits ("101")
    assert user["zip_code"] == sha256_hex(normalized)


def test_tiktok_email_keeps_gmail_dots() -> None:
    # Arrange
    mapped = mapped_event(email="  John.Doe@Gmail.com ")

    # Act
    payload = tiktok().build_payload(mapped, context())

    # Assert
    assert payload["user"]["email"] == (
        "375320dd9ae7ed408002f3768e16cb5f28c861062fd50dff9a3bff62e9dce4ef"
    )


def test_external_id_is_trimmed_and_keeps_its_case() -> None:
    # Arrange
    mapped = mapped_event(external_id=" User-42 ")

    # Act
    payload = tiktok().build_payload(mapped, context())

    # Assert
    assert payload["user"]["external_id"] == (
        "fafe5e551759817bdc65038b8cb1a8263b1a8b3b60c269d67ff0f8c57ae0f733"
    )


def test_prehashed_values_pass_through_lowercased() -> None:
    # Arrange
    digest = sha256_hex("+16505551212")
    mapped = mapped_event(phone=digest.upper(), email=[digest])

    # Act
    user = tiktok().build_payload(mapped, context())["user"]

    # Assert
    assert user["phone"] == digest
    assert user["email"] == [digest]


def test_mapped_name_and_address_fields_are_normalized() -> None:
    # Arrange
    mapped = mapped_event(
        first_name="Jean-Luc", zip_code="94035-1234", city="St. Louis", country="United States"
    )

    # Act
    user = tiktok().build_payload(mapped, context())["user"]

    # Assert
    assert user["first_name"] == sha256_hex("jeanluc")
    assert user["zip_code"] == sha256_hex("94035")
    assert user["city"] == "stlouis"
    assert user["country"] == "us"


# -- click IDs ----------------------------------------------------------------------------------


def test_ttclid_is_read_from_the_page_url_when_not_given() -> None:
    # Arrange
    mapped = mapped_event()
    mapped["page"]["url"] = "https://shop.example/?ttclid=E.C.P.CaseKept&x=1"

    # Act
    payload = tiktok().build_payload(mapped, context())

    # Assert
    assert payload["user"]["ttclid"] == "E.C.P.CaseKept"


def test_a_given_ttclid_wins_over_the_page_url() -> None:
    # Arrange
    mapped = mapped_event(ttclid="E.C.P.Given")
    mapped["page"]["url"] = "https://shop.example/?ttclid=E.C.P.FromUrl"

    # Act
    payload = tiktok().build_payload(mapped, context())

    # Assert
    assert payload["user"]["ttclid"] == "E.C.P.Given"


# -- platform rules -----------------------------------------------------------------------------


def test_unknown_event_source_is_refused_naming_the_rule() -> None:
    with pytest.raises(PayloadError, match="event_source must be one of"):
        tiktok(event_source="website").build_payload(mapped_event(), context())


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (lambda m: m["properties"].update(value="lots"), "properties.value must be a number"),
        (lambda m: m["properties"].update(currency="euro"), "properties.currency"),
        (lambda m: m.update(user="a@example.com"), "user must be an object"),
        (lambda m: m["properties"].update(contents="sku_1"), "properties.contents"),
    ],
)
def test_event_breaking_a_tiktok_rule_is_refused_naming_the_rule(change: Any, rule: str) -> None:
    # Arrange
    mapped = mapped_event()
    change(mapped)

    # Act / Assert
    with pytest.raises(PayloadError, match=rule):
        tiktok().build_payload(mapped, context())


def test_event_source_setting_is_sent(tiktok_emulator: TikTokEmulator) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator, event_source="crm")

    # Act
    results = deliver(dest, [dest.build_payload(mapped_event(), context(event_name="Lead"))])

    # Assert
    assert results == [ItemResult.delivered()]
    assert tiktok_emulator.bodies[0]["event_source"] == "crm"


def test_a_full_batch_of_1000_events_is_one_accepted_request(
    tiktok_emulator: TikTokEmulator,
) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator)
    payload = dest.build_payload(mapped_event(), context())
    payloads = [{**payload, "event_id": f"e{i}"} for i in range(TikTok.max_batch)]

    # Act
    results = deliver(dest, payloads)

    # Assert
    assert results == [ItemResult.delivered()] * 1000
    assert len(tiktok_emulator.server.requests) == 1


def test_more_than_1000_events_is_not_one_request() -> None:
    # Arrange
    dest = tiktok()
    payload = dest.build_payload(mapped_event(), context())
    items = [Item(f"d{i}", f"e{i}", payload) for i in range(1001)]

    # Act / Assert
    with pytest.raises(ValueError, match="at most 1000"):
        dest.build_request(items, SendContext(now=NOW))


def test_emulator_rejects_an_unhashed_email(tiktok_emulator: TikTokEmulator) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator)
    payload = dest.build_payload(mapped_event(), context())
    payload["user"]["email"] = "a@example.com"

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert "user.email" in (result.error or "")


def test_emulator_rejects_a_hashed_ip(tiktok_emulator: TikTokEmulator) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator)
    payload = dest.build_payload(mapped_event(), context())
    payload["user"]["ip"] = sha256_hex("203.0.113.7")

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert "user.ip" in (result.error or "")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e["properties"].update(currency="E1R"), "properties.currency"),
        (lambda e: e["properties"].update(content_type="sku"), "properties.content_type"),
        (
            lambda e: e["properties"].update(contents=[{"content_id": "a", "quantity": "2"}]),
            "contents[].quantity",
        ),
        (
            lambda e: e["properties"].update(contents=[{"content_id": "a", "price": "9.90"}]),
            "contents[].price",
        ),
        (lambda e: e.update(limited_data_use="true"), "limited_data_use"),
        (lambda e: e["properties"].update(contents=[{"content_id": 1}]), "content_id"),
    ],
)
def test_emulator_rejects_what_tiktok_documents_as_invalid(
    tiktok_emulator: TikTokEmulator, change: Any, problem: str
) -> None:
    # Arrange: a valid event, then one documented rule broken (platforms.md §4.2)
    dest = tiktok(tiktok_emulator)
    payload = dest.build_payload(mapped_event(), context())
    change(payload)

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert problem in (result.error or "")


# -- the request ---------------------------------------------------------------------------------


def test_request_is_a_json_post_with_the_token_in_the_access_token_header() -> None:
    # Arrange
    dest = tiktok()
    payload = dest.build_payload(mapped_event(), context())

    # Act
    request = dest.build_request([Item("d1", "ord_789", payload)], SendContext(now=NOW))

    # Assert
    assert request.method == "POST"
    assert request.url == "https://business-api.tiktok.com/open_api/v1.3/event/track/"
    assert request.headers["Access-Token"] == "tt-token"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "event_source": "web",
        "event_source_id": "CTESTPIXEL123",
        "data": [payload],
    }


def test_access_token_is_redacted() -> None:
    # Arrange
    dest = tiktok()
    request = dest.build_request(
        [Item("d1", "e1", dest.build_payload(mapped_event(), context()))], SendContext(NOW)
    )

    # Act
    redacted = dest.redact(request)

    # Assert
    assert redacted.headers["Access-Token"] == REDACTED
    assert "tt-token" not in redacted.body.decode() + redacted.url


def test_test_event_code_setting_adds_the_field_to_the_request(
    tiktok_emulator: TikTokEmulator,
) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator, test_event_code="TEST12345")

    # Act
    results = deliver(dest, [dest.build_payload(mapped_event(), context())])

    # Assert
    assert results == [ItemResult.delivered()]
    assert tiktok_emulator.bodies[0]["test_event_code"] == "TEST12345"


# -- responses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("throttle", Outcome.RETRYABLE),
        ("transient", Outcome.RETRYABLE),
        ("server_error", Outcome.RETRYABLE),
        ("auth", Outcome.AUTH),
    ],
)
def test_emulated_failure_is_read_as_the_right_outcome_for_every_item(
    tiktok_emulator: TikTokEmulator, fault: Any, outcome: Outcome
) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator)
    payload = dest.build_payload(mapped_event(), context())
    tiktok_emulator.fail_next(fault)

    # Act
    results = deliver(dest, [payload, {**payload, "event_id": "other"}])

    # Assert
    assert [r.outcome for r in results] == [outcome, outcome]


def test_wrong_access_token_is_an_auth_failure_despite_http_200(
    tiktok_emulator: TikTokEmulator,
) -> None:
    # Arrange
    dest = tiktok(tiktok_emulator, access_token="revoked")
    request = dest.build_request(
        [Item("d1", "e1", dest.build_payload(mapped_event(), context()))], SendContext(NOW)
    )

    # Act
    response = send(request)
    (result,) = dest.read_response(response, [Item("d1", "e1", {})])

    # Assert
    assert response.status == 200
    assert result.outcome is Outcome.AUTH
    assert "40105" in (result.error or "")


def _answer(code: int, status: int = 200, message: str = "m") -> HttpResponse:
    body = {"code": code, "message": message, "request_id": "r1", "data": {}}
    return HttpResponse(status, {}, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (_answer(0), Outcome.DELIVERED),
        (_answer(20001), Outcome.DELIVERED),
        (_answer(40100), Outcome.RETRYABLE),
        (_answer(40700), Outcome.RETRYABLE),
        (_answer(42900), Outcome.RETRYABLE),
        (_answer(50002), Outcome.RETRYABLE),
        (_answer(40001), Outcome.AUTH),
        (_answer(40105), Outcome.AUTH),
        (_answer(40104), Outcome.AUTH),
        (_answer(40002), Outcome.PERMANENT),
        (_answer(40000), Outcome.PERMANENT),
        (_answer(40002, status=500), Outcome.RETRYABLE),
        (HttpResponse(200, {}, b"<html>ok</html>"), Outcome.RETRYABLE),
        (HttpResponse(200, {}, b'{"code": "0"}'), Outcome.RETRYABLE),
        (HttpResponse(200, {}, b""), Outcome.RETRYABLE),
        (HttpResponse(400, {}, b"bad"), Outcome.PERMANENT),
        (HttpResponse(401, {}, b""), Outcome.AUTH),
        (HttpResponse(429, {"Retry-After": "5"}, b""), Outcome.RETRYABLE),
        (HttpResponse(503, {}, b"<html>unavailable</html>"), Outcome.RETRYABLE),
    ],
)
def test_tiktok_answer_is_read_without_raising(response: HttpResponse, outcome: Outcome) -> None:
    # Arrange
    items = [Item("d1", "e1", {}), Item("d2", "e2", {})]

    # Act
    results = tiktok().read_response(response, items)

    # Assert
    assert [r.outcome for r in results] == [outcome, outcome]


def test_partial_success_code_is_delivered_with_its_message_kept() -> None:
    # Act
    (result,) = tiktok().read_response(_answer(20001, message="partial"), [Item("d1", "e1", {})])

    # Assert
    assert result.outcome is Outcome.DELIVERED
    assert result.error == "TikTok code 20001: partial"


# -- settings ------------------------------------------------------------------------------------


def test_settings_schema_accepts_the_documented_settings() -> None:
    settings = {
        "pixel_code": "CTESTPIXEL123",
        "access_token": "t",
        "test_event_code": "TEST1",
        "default_country": "US",
        "event_source": "web",
        "endpoint": "http://127.0.0.1:8080",
    }
    jsonschema.validate(settings, TikTok.settings_schema)


@pytest.mark.parametrize(
    "settings",
    [
        {"access_token": "t"},
        {"pixel_code": "P"},
        {"pixel_code": "P", "access_token": "t", "pixel_id": "typo"},
        {"pixel_code": "P", "access_token": "t", "event_source": "website"},
    ],
)
def test_settings_schema_rejects_missing_unknown_or_malformed_settings(
    settings: dict[str, Any],
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(settings, TikTok.settings_schema)


def test_access_token_is_a_secret_setting() -> None:
    assert TikTok.secret_settings == frozenset({"access_token"})


def test_adapter_meets_the_plugin_contract() -> None:
    registry = pytest.importorskip("destinations.registry")
    assert registry.check_contract("tiktok", TikTok) is TikTok


def test_an_item_without_an_id_goes_to_tiktok_in_contents_without_one(
    tiktok_emulator: TikTokEmulator,
) -> None:
    # content_id is optional (TikTok's SDK, PixelContent): a cart line the shop sends without
    # one still carries its price and quantity, and does not sink the event.
    dest = tiktok(tiktok_emulator)
    event = mapped_event()
    event["properties"]["contents"] = [{"content_name": "Gift wrap", "price": 2.5, "quantity": 1}]
    payload = dest.build_payload(event, context())

    (result,) = deliver(dest, [payload])

    assert result.outcome is Outcome.DELIVERED
    assert payload["properties"]["contents"] == [
        {"content_name": "Gift wrap", "price": 2.5, "quantity": 1}
    ]
