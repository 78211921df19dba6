"""The Meta Conversions API adapter, against the loopback Meta emulator."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

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
from destinations.meta_capi import MetaCapi
from destinations.normalize import sha256_hex
from destinations.testkit.meta import MetaEmulator
from destinations.testkit.server import send
from engine.expr import build, compile_mapping

NOW = datetime.now(UTC).replace(microsecond=0)


def meta(emulator: MetaEmulator | None = None, **settings: Any) -> MetaCapi:
    """An adapter pointed at ``emulator``, with ``settings`` on top of working defaults."""
    base: dict[str, Any] = {"pixel_id": "1234567890", "access_token": "meta-test-token"}
    if emulator is not None:
        base["endpoint"] = emulator.url
    base.update(settings)
    return MetaCapi(base)


def context(
    event: dict[str, Any] | None = None,
    event_name: str = "Purchase",
    event_time: datetime | None = None,
) -> PayloadContext:
    return PayloadContext(
        tag="meta_purchase",
        event_name=event_name,
        event_id="ord_789",
        event_time=event_time or NOW - timedelta(minutes=1),
        event=event or {},
    )


def web_mapped(**extra: Any) -> dict[str, Any]:
    """The smallest valid mapped website event, plus ``extra`` top-level fields."""
    mapped: dict[str, Any] = {
        "event_source_url": "https://shop.example/thanks",
        "user_data": {"client_user_agent": "Mozilla/5.0", "em": "a@example.com"},
        "custom_data": {"value": 10, "currency": "eur"},
    }
    mapped.update(extra)
    return mapped


def deliver(
    dest: MetaCapi, payloads: Sequence[dict[str, Any]], now: datetime = NOW
) -> list[ItemResult]:
    """build_request -> real HTTP -> read_response, for one batch."""
    items = [Item(f"d{i}", str(p["event_id"]), p) for i, p in enumerate(payloads)]
    request = dest.build_request(items, SendContext(now=now))
    return dest.read_response(send(request), items)


# -- the default mapping, end to end -------------------------------------------------------------


def test_default_mapping_of_the_canonical_event_is_accepted_by_the_emulator(
    meta_emulator: MetaEmulator, canonical_event: dict[str, Any]
) -> None:
    # Arrange
    dest = meta(meta_emulator)
    mapped = build(compile_mapping(MetaCapi.default_mapping), canonical_event)

    # Act
    payload = dest.build_payload(mapped, context(canonical_event))
    results = deliver(dest, [payload])

    # Assert
    assert results == [ItemResult.delivered()]
    (event,) = meta_emulator.events
    assert event["event_name"] == "Purchase"
    assert event["event_id"] == "ord_789"
    assert event["action_source"] == "website"
    assert event["event_source_url"] == "https://shop.example/checkout?gclid=abc"
    assert event["referrer_url"] == "https://shop.example/cart"
    assert event["user_data"] == {
        "em": sha256_hex("a@example.com"),
        "ph": sha256_hex("4915112345678"),
        "fn": sha256_hex("ada"),
        "ln": sha256_hex("lovelace"),
        "db": sha256_hex("19901210"),
        "ge": sha256_hex("f"),
        "ct": sha256_hex("berlin"),
        "st": sha256_hex("be"),
        "zp": sha256_hex("10115"),
        "country": sha256_hex("de"),
        "external_id": sha256_hex("cust_42"),
        "client_ip_address": "203.0.113.7",
        "client_user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
    }
    assert event["custom_data"] == {
        "value": 129.0,
        "currency": "EUR",
        "order_id": "ord_789",
        "contents": [{"id": "sku_1", "quantity": 1, "item_price": 129.0, "title": "Shoe"}],
        "content_ids": ["sku_1"],
        "content_type": "product",
    }


def test_external_id_falls_back_to_user_id(canonical_event: dict[str, Any]) -> None:
    # Arrange
    del canonical_event["user_data"]["external_id"]
    mapped = build(compile_mapping(MetaCapi.default_mapping), canonical_event)

    # Act
    payload = meta().build_payload(mapped, context(canonical_event))

    # Assert
    assert payload["user_data"]["external_id"] == sha256_hex("user_12345")


def test_tag_mapping_overrides_a_default_target_by_its_meta_name(
    canonical_event: dict[str, Any],
) -> None:
    # Arrange
    canonical_event["properties"]["total"] = 150
    mapping = {**MetaCapi.default_mapping, "custom_data.value": "properties.total"}

    # Act
    payload = meta().build_payload(build(compile_mapping(mapping), canonical_event), context())

    # Assert
    assert payload["custom_data"]["value"] == 150.0


# -- normalization and hashing -------------------------------------------------------------------


def test_meta_phone_is_digits_with_country_code_without_plus() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"]["ph"] = "+1 (650) 555-1212"

    # Act
    payload = meta().build_payload(mapped, context())

    # Assert
    assert payload["user_data"]["ph"] == sha256_hex("16505551212")


def test_national_phone_is_read_in_the_persons_country_before_the_default_country() -> None:
    # Arrange
    with_country = web_mapped()
    with_country["user_data"].update(ph="0151 12345678", country="DE")
    without_country = web_mapped()
    without_country["user_data"]["ph"] = "(650) 555-1212"
    dest = meta(default_country="US")

    # Act
    german = dest.build_payload(with_country, context())
    american = dest.build_payload(without_country, context())

    # Assert
    assert german["user_data"]["ph"] == sha256_hex("4915112345678")
    assert american["user_data"]["ph"] == sha256_hex("16505551212")


def test_national_phone_is_read_in_the_events_country_when_the_tag_sends_none() -> None:
    # Arrange: a tag that keeps the country out of Meta's payload
    mapped = web_mapped()
    mapped["user_data"]["ph"] = "0151 12345678"
    event = {"user_data": {"country": "DE", "phone": "0151 12345678"}}

    # Act
    user_data = meta(default_country="US").build_payload(mapped, context(event))["user_data"]

    # Assert
    assert "country" not in user_data
    assert user_data["ph"] == sha256_hex("4915112345678")


@pytest.mark.parametrize(
    ("country", "phone", "alpha2", "e164"),
    [
        # platforms.md §1.3 wants country as alpha-2, sent even for one-country shops
        ("GBR", "020 7946 0958", "gb", "442079460958"),
        # pycountry says Türkiye; a Turkish customer's national number must not be read in
        # the shop's default country (it was hashed as +49 5321234567)
        ("Turkey", "0532 123 45 67", "tr", "905321234567"),
    ],
)
def test_a_country_by_alpha3_or_usual_name_is_sent_as_alpha2_and_reads_the_phone(
    country: str, phone: str, alpha2: str, e164: str
) -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"].update(ph=phone, country=country)

    # Act
    user_data = meta(default_country="DE").build_payload(mapped, context())["user_data"]

    # Assert
    assert user_data["country"] == sha256_hex(alpha2)
    assert user_data["ph"] == sha256_hex(e164)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("94035 1234", "94035"),
        ("CA 94035", "94035"),
        ("ZIP 94035", "94035"),
        ("94035 USA", "94035"),
        ("K1A 0B1", "k1a0b1"),
        ("SW1A 1AA", "sw1a1aa"),
    ],
)
def test_a_us_zip_is_its_five_digits_and_other_codes_are_kept_under_a_us_default_country(
    raw: str, normalized: str
) -> None:
    # Arrange: platforms.md §1.3 zp: "lowercase, no spaces, no dash; US: first 5 digits only"
    mapped = web_mapped()
    mapped["user_data"]["zp"] = raw

    # Act
    user_data = meta(default_country="US").build_payload(mapped, context())["user_data"]

    # Assert: not "ca94035" or "94035usa"; and a code with letters not cut to its digits ("101")
    assert user_data["zp"] == sha256_hex(normalized)


def test_meta_keeps_gmail_dots_and_plus_tags() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"]["em"] = " John.Doe+promo@Gmail.com "

    # Act
    payload = meta().build_payload(mapped, context())

    # Assert
    assert payload["user_data"]["em"] == sha256_hex("john.doe+promo@gmail.com")


def test_prehashed_email_passes_through_lowercased() -> None:
    # Arrange
    digest = sha256_hex("a@example.com")
    mapped = web_mapped()
    mapped["user_data"]["em"] = digest.upper()

    # Act
    payload = meta().build_payload(mapped, context())

    # Assert
    assert payload["user_data"]["em"] == digest


def test_a_list_of_emails_becomes_a_list_of_hashes() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"]["em"] = ["a@example.com", "B@example.com"]

    # Act
    payload = meta().build_payload(mapped, context())

    # Assert
    assert payload["user_data"]["em"] == [sha256_hex("a@example.com"), sha256_hex("b@example.com")]


def test_ip_user_agent_fbc_and_fbp_are_never_hashed() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"].update(
        client_ip_address=" 2001:db8::1 ",
        fbc="fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890",
        fbp="fb.1.1596403881668.1116446470",
    )

    # Act
    user_data = meta().build_payload(mapped, context())["user_data"]

    # Assert
    assert user_data["client_ip_address"] == "2001:db8::1"
    assert user_data["client_user_agent"] == "Mozilla/5.0"
    assert user_data["fbc"] == "fb.1.1554763741205.AbCdEfGhIjKlMnOpQrStUvWxYz1234567890"
    assert user_data["fbp"] == "fb.1.1596403881668.1116446470"


def test_invalid_ip_address_is_left_out() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"]["client_ip_address"] = "unknown"

    # Act
    user_data = meta().build_payload(mapped, context())["user_data"]

    # Assert
    assert "client_ip_address" not in user_data


def test_an_unnormalizable_value_is_left_out_rather_than_hashed() -> None:
    # Arrange
    mapped = web_mapped()
    mapped["user_data"].update(
        em="not-an-email", ge="unknown", country="Narnia", client_ip_address="203.0.113.7"
    )

    # Act
    user_data = meta().build_payload(mapped, context())["user_data"]

    # Assert
    assert set(user_data) == {"client_user_agent", "client_ip_address"}


# -- click IDs ----------------------------------------------------------------------------------


def test_fbc_is_built_from_fbclid_with_event_time_in_ms_and_fbclid_case_kept() -> None:
    # Arrange
    event_time = NOW.replace(microsecond=123000) - timedelta(hours=1)
    expected_ms = int(event_time.timestamp()) * 1000 + 123
    mapped = web_mapped(fbclid="IwAR2xYz_AbC")

    # Act
    payload = meta().build_payload(mapped, context(event_time=event_time))

    # Assert
    assert payload["user_data"]["fbc"] == f"fb.1.{expected_ms}.IwAR2xYz_AbC"
    assert "fbclid" not in payload


def test_fbc_is_built_from_the_fbclid_query_parameter_of_the_page_url() -> None:
    # Arrange
    event_time = NOW - timedelta(hours=1)
    expected_ms = int(event_time.timestamp()) * 1000
    mapped = web_mapped(event_source_url="https://shop.example/?utm=x&fbclid=AbCdEf123")

    # Act
    payload = meta().build_payload(mapped, context(event_time=event_time))

    # Assert
    assert payload["user_data"]["fbc"] == f"fb.1.{expected_ms}.AbCdEf123"


def test_a_given_fbc_wins_over_fbclid() -> None:
    # Arrange
    mapped = web_mapped(fbclid="Other")
    mapped["user_data"]["fbc"] = "fb.1.1554763741205.Given"

    # Act
    payload = meta().build_payload(mapped, context())

    # Assert
    assert payload["user_data"]["fbc"] == "fb.1.1554763741205.Given"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fbc", "undefined"),  # a JavaScript client's String(undefined)
        ("fbc", "IwAR2xYz_AbC"),  # a bare fbclid where the cookie belongs
        ("fbc", "fb.1.1554763741.AbC"),  # the creation time in seconds
        ("fbc", "fb.1.1554763741205"),  # the cookie without its fbclid
        ("fbp", "undefined"),
        ("fbp", "fb.1.1596403881.1116446470"),
        ("fbp", "1116446470"),
    ],
)
def test_an_fbc_or_fbp_not_in_metas_format_is_left_out_and_the_event_accepted(
    meta_emulator: MetaEmulator, key: str, value: str
) -> None:
    # Arrange: Meta refuses the whole request for one ("Click ID Incorrectly Formatted")
    dest = meta(meta_emulator)
    mapped = web_mapped()
    mapped["user_data"].update({"client_ip_address": "203.0.113.7", key: value})

    # Act
    payload = dest.build_payload(mapped, context())

    # Assert
    assert key not in payload["user_data"]
    assert deliver(dest, [payload]) == [ItemResult.delivered()]


def test_an_fbc_not_in_metas_format_gives_way_to_one_built_from_fbclid() -> None:
    mapped = web_mapped(fbclid="IwAR2xYz_AbC")
    mapped["user_data"]["fbc"] = "undefined"

    payload = meta().build_payload(mapped, context())

    expected_ms = int((NOW - timedelta(minutes=1)).timestamp() * 1000)
    assert payload["user_data"]["fbc"] == f"fb.1.{expected_ms}.IwAR2xYz_AbC"


def test_no_fbc_is_built_from_an_fbclid_with_a_space_in_it(meta_emulator: MetaEmulator) -> None:
    dest = meta(meta_emulator)
    mapped = web_mapped(event_source_url="https://shop.example/?fbclid=IwAR%20AbC")

    payload = dest.build_payload(mapped, context())

    assert "fbc" not in payload["user_data"]
    assert deliver(dest, [payload]) == [ItemResult.delivered()]


def test_default_mapping_takes_fbclid_from_the_event_context(
    meta_emulator: MetaEmulator, canonical_event: dict[str, Any]
) -> None:
    # Arrange
    canonical_event["context"]["fbclid"] = "IwAR_MixedCase"
    dest = meta(meta_emulator)
    mapped = build(compile_mapping(MetaCapi.default_mapping), canonical_event)

    # Act
    payload = dest.build_payload(mapped, context(canonical_event))
    results = deliver(dest, [payload])

    # Assert
    assert payload["user_data"]["fbc"].endswith(".IwAR_MixedCase")
    assert results == [ItemResult.delivered()]


# -- platform rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (lambda m: m.pop("event_source_url"), "website events require event_source_url"),
        (lambda m: m.update(event_source_url="shop.example/x"), "event_source_url"),
        (lambda m: m["user_data"].pop("client_user_agent"), "require user_data.client_user_agent"),
        (lambda m: m.update(action_source="web"), "action_source must be one of"),
        (lambda m: m["custom_data"].pop("currency"), "Purchase events require"),
        (lambda m: m["custom_data"].update(value="lots"), "custom_data.value must be a number"),
        (lambda m: m["custom_data"].update(currency="euro"), "custom_data.currency"),
    ],
)
def test_event_breaking_a_meta_rule_is_refused_naming_the_rule(change: Any, rule: str) -> None:
    # Arrange
    mapped = web_mapped()
    change(mapped)

    # Act / Assert
    with pytest.raises(PayloadError, match=rule):
        meta().build_payload(mapped, context())


def test_action_source_comes_from_the_settings_then_the_mapping() -> None:
    # Arrange
    dest = meta(action_source="system_generated")
    mapped = {"user_data": {"em": "a@example.com"}}

    # Act
    from_settings = dest.build_payload(dict(mapped), context(event_name="Lead"))
    from_mapping = dest.build_payload(
        {**mapped, "action_source": "email"}, context(event_name="Lead")
    )

    # Assert
    assert from_settings["action_source"] == "system_generated"
    assert "event_source_url" not in from_settings
    assert from_mapping["action_source"] == "email"


def test_event_without_any_customer_information_is_refused() -> None:
    with pytest.raises(PayloadError, match="user_data needs at least one"):
        meta(action_source="other").build_payload({}, context(event_name="Lead"))


@pytest.mark.parametrize(
    "user_data",
    [
        {"client_user_agent": "Mozilla/5.0"},
        {"client_user_agent": "Mozilla/5.0", "ct": "Berlin", "country": "DE", "zp": "10115"},
        {"client_user_agent": "Mozilla/5.0", "db": "1990-12-10"},
        {"fn": "Ada", "ge": "female"},
        {"ln": "Lovelace"},
    ],
)
def test_event_with_only_an_invalid_alone_combination_is_refused_at_intake(
    user_data: dict[str, Any],
) -> None:
    # Arrange: customer information Meta takes for no event on its own (platforms.md §1.3);
    # sent, it failed the whole request, every other event of the batch with it.
    source = "website" if "client_user_agent" in user_data else "system_generated"
    mapped = web_mapped(user_data=user_data, action_source=source)

    # Act / Assert
    with pytest.raises(PayloadError, match="Meta refuses an event whose only customer"):
        meta().build_payload(mapped, context())


@pytest.mark.parametrize(
    "extra",
    [{"client_ip_address": "203.0.113.7"}, {"external_id": "cust_42"}, {"ln": "Lovelace"}],
)
def test_an_invalid_alone_combination_with_another_identifier_is_sent(
    meta_emulator: MetaEmulator, extra: dict[str, Any]
) -> None:
    # Arrange
    dest = meta(meta_emulator)
    user_data = {"client_user_agent": "Mozilla/5.0", "db": "1990-12-10", **extra}

    # Act
    results = deliver(dest, [dest.build_payload(web_mapped(user_data=user_data), context())])

    # Assert
    assert results == [ItemResult.delivered()]


def test_emulator_rejects_an_invalid_alone_combination(meta_emulator: MetaEmulator) -> None:
    # Arrange
    dest = meta(meta_emulator)
    payload = dest.build_payload(web_mapped(), context())
    payload["user_data"] = {"client_user_agent": "Mozilla/5.0", "ge": sha256_hex("f")}

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert "combination of customer information" in (result.error or "")


def test_event_older_than_seven_days_is_refused_at_intake() -> None:
    # Arrange
    old = NOW - timedelta(days=7, minutes=1)

    # Act / Assert
    with pytest.raises(PayloadError, match="within 7 days"):
        meta().build_payload(web_mapped(), context(event_time=old))


def test_physical_store_event_may_be_up_to_62_days_old() -> None:
    # Arrange
    mapped = {"action_source": "physical_store", "user_data": {"em": "a@example.com"}}
    ctx = context(event_name="Lead", event_time=NOW - timedelta(days=30))

    # Act
    payload = meta().build_payload(mapped, ctx)

    # Assert
    assert payload["action_source"] == "physical_store"
    assert meta().check_item(Item("d", "e", payload), SendContext(now=NOW)) is None


def test_check_item_gives_up_an_item_that_aged_past_seven_days_in_the_outbox() -> None:
    # Arrange
    payload = meta().build_payload(web_mapped(), context(event_time=NOW - timedelta(days=6)))
    item = Item("d1", "ord_789", payload)

    # Act
    fresh = meta().check_item(item, SendContext(now=NOW))
    stale = meta().check_item(item, SendContext(now=NOW + timedelta(days=1)))

    # Assert
    assert fresh is None
    assert stale is not None
    assert "7 days" in stale


def test_an_old_item_fails_alone_and_never_the_whole_batch(meta_emulator: MetaEmulator) -> None:
    # Arrange: two events stored a day apart, sent when only one is still young enough.
    dest = meta(meta_emulator)
    old = dest.build_payload(web_mapped(), context(event_time=NOW - timedelta(days=6, hours=23)))
    young = dest.build_payload(web_mapped(), context(event_time=NOW - timedelta(hours=1)))
    items = [Item("d1", "e1", old), Item("d2", "e2", young)]
    later = SendContext(now=NOW + timedelta(hours=2))

    # Act: what the engine does: check each item, send the ones still sendable.
    reasons = [dest.check_item(item, later) for item in items]
    sendable = [item for item, reason in zip(items, reasons, strict=True) if reason is None]
    results = dest.read_response(send(dest.build_request(sendable, later)), sendable)

    # Assert
    assert reasons[0] is not None
    assert reasons[1] is None
    assert results == [ItemResult.delivered()]


def test_the_emulator_fails_the_whole_batch_when_one_event_is_too_old(
    meta_emulator: MetaEmulator,
) -> None:
    # Arrange: the Meta behaviour that check_item protects against.
    dest = meta(meta_emulator)
    young = dest.build_payload(web_mapped(), context())
    old = {**young, "event_time": int((NOW - timedelta(days=8)).timestamp())}

    # Act
    results = deliver(dest, [young, old])

    # Assert
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.PERMANENT]
    assert "data[1]" in (results[0].error or "")
    assert meta_emulator.events == []


def test_emulator_rejects_an_unhashed_email(meta_emulator: MetaEmulator) -> None:
    # Arrange
    dest = meta(meta_emulator)
    payload = dest.build_payload(web_mapped(), context())
    payload["user_data"]["em"] = "a@example.com"

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert "user_data.em must be SHA-256" in (result.error or "")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e["user_data"].update(fbc="fb.1.1554763741.AbC"), "user_data.fbc"),
        (lambda e: e["user_data"].update(fbp="fb.1.1554763741.123"), "user_data.fbp"),
        (lambda e: e["custom_data"].pop("currency"), "Purchase events require"),
        (lambda e: e["custom_data"].update(currency="E1R"), "custom_data.currency"),
        (
            lambda e: e["custom_data"].update(contents=[{"id": "a", "quantity": 1.5}]),
            "contents[].quantity",
        ),
        (
            lambda e: e["custom_data"].update(contents=[{"id": "a", "item_price": "9.90"}]),
            "contents[].item_price",
        ),
        (lambda e: e.update(data_processing_options="LDU"), "data_processing_options must"),
        (lambda e: e.update(data_processing_options_country=1), "needs data_processing_options"),
    ],
)
def test_emulator_rejects_what_meta_documents_as_invalid(
    meta_emulator: MetaEmulator, change: Any, problem: str
) -> None:
    # Arrange: a valid event, then one documented rule broken (platforms.md §1.2-§1.5)
    dest = meta(meta_emulator)
    payload = dest.build_payload(web_mapped(), context())
    change(payload)

    # Act
    (result,) = deliver(dest, [payload])

    # Assert
    assert result.outcome is Outcome.PERMANENT
    assert problem in (result.error or "")


def test_emulator_accepts_limited_data_use_with_country_and_state(
    meta_emulator: MetaEmulator,
) -> None:
    dest = meta(meta_emulator)
    payload = dest.build_payload(
        web_mapped(
            data_processing_options=["LDU"],
            data_processing_options_country=1,
            data_processing_options_state=1000,
        ),
        context(),
    )

    assert deliver(dest, [payload]) == [ItemResult.delivered()]


@pytest.mark.parametrize(
    "fbp", ["fb.1.1596403881668.1116446470.Ag", "fb.2.1596403881668.1116446470.AQ"]
)
def test_emulator_accepts_an_fbp_with_the_parameter_builders_appendix(
    meta_emulator: MetaEmulator, fbp: str
) -> None:
    # Meta's Parameter Builder (facebook/capi-param-builder) writes _fbp cookies with a
    # language token appended, and adds one to a cookie that has none (platforms.md §1.5).
    dest = meta(meta_emulator)
    mapped = web_mapped()
    mapped["user_data"]["fbp"] = fbp
    payload = dest.build_payload(mapped, context())

    assert deliver(dest, [payload]) == [ItemResult.delivered()]
    assert meta_emulator.events[-1]["user_data"]["fbp"] == fbp


# -- the request ---------------------------------------------------------------------------------


def test_request_is_a_form_post_to_the_pixels_events_edge_of_the_default_version() -> None:
    # Arrange
    dest = meta()
    payload = dest.build_payload(web_mapped(), context())

    # Act
    request = dest.build_request([Item("d1", "ord_789", payload)], SendContext(now=NOW))

    # Assert
    assert request.method == "POST"
    assert request.url == "https://graph.facebook.com/v26.0/1234567890/events"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = parse_qs(request.body.decode())
    assert json.loads(form["data"][0]) == [payload]
    assert form["access_token"] == ["meta-test-token"]


def test_access_token_stays_out_of_the_url_and_is_redacted() -> None:
    # Arrange
    dest = meta()
    request = dest.build_request(
        [Item("d1", "ord_789", dest.build_payload(web_mapped(), context()))], SendContext(NOW)
    )

    # Act
    redacted = dest.redact(request)

    # Assert
    assert "meta-test-token" not in request.url
    assert "meta-test-token" not in redacted.body.decode()
    assert REDACTED in parse_qs(redacted.body.decode())["access_token"][0]


def test_test_event_code_setting_adds_the_field_to_the_request(
    meta_emulator: MetaEmulator,
) -> None:
    # Arrange
    dest = meta(meta_emulator, test_event_code="TEST4242")
    payload = dest.build_payload(web_mapped(), context())

    # Act
    results = deliver(dest, [payload])

    # Assert
    assert results == [ItemResult.delivered()]
    assert meta_emulator.test_event_codes == ["TEST4242"]


def test_without_test_event_code_none_is_sent(meta_emulator: MetaEmulator) -> None:
    # Arrange
    dest = meta(meta_emulator)

    # Act
    deliver(dest, [dest.build_payload(web_mapped(), context())])

    # Assert
    assert meta_emulator.test_event_codes == [None]


def test_a_full_batch_of_1000_events_is_one_accepted_request(meta_emulator: MetaEmulator) -> None:
    # Arrange
    dest = meta(meta_emulator)
    payload = dest.build_payload(web_mapped(), context())
    payloads = [{**payload, "event_id": f"e{i}"} for i in range(MetaCapi.max_batch)]

    # Act
    results = deliver(dest, payloads)

    # Assert
    assert results == [ItemResult.delivered()] * 1000
    assert len(meta_emulator.server.requests) == 1
    assert len(meta_emulator.events) == 1000


def test_more_than_1000_events_is_not_one_request() -> None:
    # Arrange
    dest = meta()
    payload = dest.build_payload(web_mapped(), context())
    items = [Item(f"d{i}", f"e{i}", payload) for i in range(1001)]

    # Act / Assert
    with pytest.raises(ValueError, match="at most 1000"):
        dest.build_request(items, SendContext(now=NOW))


# -- responses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("throttle", Outcome.RETRYABLE),
        ("transient", Outcome.RETRYABLE),
        ("server_error", Outcome.RETRYABLE),
        ("auth", Outcome.AUTH),
        ("permission", Outcome.AUTH),
    ],
)
def test_emulated_failure_is_read_as_the_right_outcome_for_every_item(
    meta_emulator: MetaEmulator, fault: Any, outcome: Outcome
) -> None:
    # Arrange
    dest = meta(meta_emulator)
    payload = dest.build_payload(web_mapped(), context())
    meta_emulator.fail_next(fault)

    # Act
    results = deliver(dest, [payload, {**payload, "event_id": "other"}])

    # Assert
    assert [r.outcome for r in results] == [outcome, outcome]


def test_wrong_access_token_is_an_auth_failure(meta_emulator: MetaEmulator) -> None:
    # Arrange
    dest = meta(meta_emulator, access_token="expired")

    # Act
    (result,) = deliver(dest, [dest.build_payload(web_mapped(), context())])

    # Assert
    assert result.outcome is Outcome.AUTH
    assert "190" in (result.error or "")


def _graph_error(code: int, status: int = 400, **extra: Any) -> HttpResponse:
    body = {"error": {"message": "m", "type": "OAuthException", "code": code, **extra}}
    return HttpResponse(status, {}, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        (HttpResponse(200, {}, b'{"events_received": 1, "fbtrace_id": "x"}'), Outcome.DELIVERED),
        (_graph_error(1), Outcome.RETRYABLE),
        (_graph_error(2, status=500), Outcome.RETRYABLE),
        (_graph_error(4), Outcome.RETRYABLE),
        (_graph_error(17, error_subcode=2446079), Outcome.RETRYABLE),
        (_graph_error(32), Outcome.RETRYABLE),
        (_graph_error(613, error_subcode=1487742), Outcome.RETRYABLE),
        (_graph_error(80004), Outcome.RETRYABLE),
        (_graph_error(100, is_transient=True), Outcome.RETRYABLE),
        (_graph_error(100, status=503), Outcome.RETRYABLE),
        (_graph_error(190, error_subcode=463), Outcome.AUTH),
        (_graph_error(10, status=403), Outcome.AUTH),
        (_graph_error(200), Outcome.AUTH),
        (_graph_error(299), Outcome.AUTH),
        (_graph_error(100), Outcome.PERMANENT),
        (_graph_error(100, error_subcode=33), Outcome.AUTH),  # a wrong pixel_id, or no access
        (_graph_error(100, error_subcode=2804003), Outcome.PERMANENT),
        (HttpResponse(200, {}, b"<html>ok</html>"), Outcome.RETRYABLE),
        (HttpResponse(200, {}, b"[1, 2]"), Outcome.RETRYABLE),
        (HttpResponse(400, {}, b'{"error": "weird"}'), Outcome.PERMANENT),
        (HttpResponse(400, {}, b"not json"), Outcome.PERMANENT),
        (HttpResponse(401, {}, b""), Outcome.AUTH),
        (HttpResponse(429, {"Retry-After": "30"}, b""), Outcome.RETRYABLE),
        (HttpResponse(502, {}, b"<html>bad gateway</html>"), Outcome.RETRYABLE),
    ],
)
def test_meta_answer_is_read_without_raising(response: HttpResponse, outcome: Outcome) -> None:
    # Arrange
    items = [Item("d1", "e1", {}), Item("d2", "e2", {})]

    # Act
    results = meta().read_response(response, items)

    # Assert
    assert [r.outcome for r in results] == [outcome, outcome]


def test_throttling_error_keeps_the_retry_after_header_and_names_the_code() -> None:
    # Arrange
    response = _graph_error(4)
    response = HttpResponse(400, {"Retry-After": "120"}, response.body)

    # Act
    (result,) = meta().read_response(response, [Item("d1", "e1", {})])

    # Assert
    assert result.retry_after == 120.0
    assert "Meta error 4" in (result.error or "")


# -- settings ------------------------------------------------------------------------------------


def test_settings_schema_accepts_the_documented_settings() -> None:
    settings = {
        "pixel_id": "1234567890",
        "access_token": "t",
        "api_version": "v25.0",
        "test_event_code": "TEST1",
        "default_country": "DE",
        "action_source": "website",
        "endpoint": "http://127.0.0.1:8080",
    }
    jsonschema.validate(settings, MetaCapi.settings_schema)


@pytest.mark.parametrize(
    "settings",
    [
        {"access_token": "t"},
        {"pixel_id": "123"},
        {"pixel_id": "123", "access_token": "t", "token": "typo"},
        {"pixel_id": "123", "access_token": "t", "action_source": "web"},
        {"pixel_id": "123", "access_token": "t", "api_version": "26"},
    ],
)
def test_settings_schema_rejects_missing_unknown_or_malformed_settings(
    settings: dict[str, Any],
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(settings, MetaCapi.settings_schema)


def test_access_token_is_a_secret_setting() -> None:
    assert MetaCapi.secret_settings == frozenset({"access_token"})


def test_adapter_meets_the_plugin_contract() -> None:
    registry = pytest.importorskip("destinations.registry")
    assert registry.check_contract("meta_capi", MetaCapi) is MetaCapi
