"""The Google Ads adapter against a loopback Google Ads API emulator (platforms.md §3, §6, §7)."""

from __future__ import annotations

import copy
import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from destinations.base import (
    REDACTED,
    HttpRequest,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    PayloadContext,
    PayloadError,
    SendContext,
)
from destinations.google_ads import GoogleAds, TokenError, google_time
from destinations.testkit.google_ads import GoogleAdsEmulator
from destinations.testkit.server import LoopbackServer, Reply
from engine.event import normalize
from engine.expr import build, compile_mapping
from engine.rules import compile_container

NOW = datetime.now(UTC).replace(microsecond=0)
JOHN_DOE = "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"
CLOUDY = "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"
USER_NAME = "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac"
PHONE_650 = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"
PHONE_800 = "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"
MARY = "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
OBRIEN = "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"

EVENT: dict[str, Any] = {
    "event_name": "purchase",
    "event_id": "ord_789",
    "visitor_id": "vis_abc",
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
        "city": "Berlin",
        "state": "BE",
        "postal_code": "10115",
        "country": "DE",
    },
    "context": {
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 ...",
        "page_url": "https://shop.example/checkout?gclid=abc",
        "gclid": None,
        "gbraid": None,
        "wbraid": None,
    },
    "consent": {"ad_user_data": "granted", "ad_personalization": "denied"},
}


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[GoogleAdsEmulator, LoopbackServer]]:
    emulator = GoogleAdsEmulator()
    with LoopbackServer(emulator) as server:
        yield emulator, server


@pytest.fixture
def emulator(emulator_server: tuple[GoogleAdsEmulator, LoopbackServer]) -> GoogleAdsEmulator:
    emulator, server = emulator_server
    emulator.conversions.clear()
    emulator.adjustments.clear()
    emulator.row_errors.clear()
    emulator.throttle = 0
    emulator.fail_with = None
    server.clear()
    return emulator


@pytest.fixture
def server(
    emulator_server: tuple[GoogleAdsEmulator, LoopbackServer], emulator: GoogleAdsEmulator
) -> LoopbackServer:
    return emulator_server[1]  # ``emulator`` first forgets what earlier tests sent


@pytest.fixture
def ads(server: LoopbackServer, emulator: GoogleAdsEmulator) -> GoogleAds:
    return google_ads(server, emulator)


def google_ads(server: LoopbackServer, emulator: GoogleAdsEmulator, **settings: Any) -> GoogleAds:
    base = {
        "customer_id": "123-456-7890",
        "conversion_action": "987654321",
        "developer_token": emulator.developer_token,
        "client_id": emulator.client_id,
        "client_secret": emulator.client_secret,
        "refresh_token": emulator.refresh_token,
        "endpoint": server.url,
        "token_endpoint": server.url + "/token",
    }
    return GoogleAds({**base, **settings})


def send(request: HttpRequest) -> HttpResponse:
    answer = requests.request(
        request.method, request.url, headers=dict(request.headers), data=request.body, timeout=5
    )
    return HttpResponse(answer.status_code, dict(answer.headers), answer.content)


def access_token(dest: GoogleAds) -> str:
    """What the engine does before sending: exchange the refresh token at the token endpoint."""
    return dest.read_token(send(dest.token_request())).value


def payload_for(
    dest: GoogleAds,
    event: dict[str, Any],
    *,
    event_name: str = "purchase",
    mapping: dict[str, Any] | None = None,
    when: datetime = NOW,
) -> dict[str, Any]:
    """What the engine does at intake: default mapping + tag mapping, then build_payload."""
    fields = compile_mapping({**GoogleAds.default_mapping, **(mapping or {})})
    ctx = PayloadContext("tag", event_name, str(event.get("event_id")), when, event)
    return dest.build_payload(build(fields, event), ctx)


def deliver(
    dest: GoogleAds, payloads: Sequence[dict[str, Any]], token: str | None = None
) -> list[ItemResult]:
    """What the engine does at send time: one real HTTP request, then read_response."""
    items = [Item(f"d{i}", f"e{i}", p) for i, p in enumerate(payloads)]
    ctx = SendContext(now=datetime.now(UTC), access_token=token or access_token(dest))
    return dest.read_response(send(dest.build_request(items, ctx)), items)


def event_with(**changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(EVENT)
    for path, value in changes.items():
        node = event
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return event


def row(payload: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = payload["row"]
    return result


# -- the default mapping ----------------------------------------------------------------------


def test_default_mapping_uploads_a_click_conversion_the_emulator_accepts(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = payload_for(ads, EVENT)

    results = deliver(ads, [payload])

    assert results == [ItemResult.delivered()]
    (sent,) = emulator.conversions
    assert sent["gclid"] == "abc"  # read from the page URL
    assert sent["conversionAction"] == "customers/1234567890/conversionActions/987654321"
    assert sent["orderId"] == "ord_789"
    assert sent["conversionValue"] == 129.0
    assert sent["currencyCode"] == "EUR"
    assert [set(i) for i in sent["userIdentifiers"]] == [{"hashedEmail"}, {"hashedPhoneNumber"}]
    assert sent["consent"] == {"adUserData": "GRANTED"}


def test_request_carries_bearer_token_developer_token_and_partial_failure(
    server: LoopbackServer, emulator: GoogleAdsEmulator
) -> None:
    dest = google_ads(server, emulator, login_customer_id="111-222-3333")
    emulator.login_customer_id = "1112223333"
    try:
        deliver(dest, [payload_for(dest, EVENT)])
    finally:
        emulator.login_customer_id = None

    upload = server.requests[-1]
    assert upload.path == "/v26/customers/1234567890:uploadClickConversions"
    assert (upload.header("authorization") or "").startswith("Bearer ya29.")
    assert upload.header("developer-token") == emulator.developer_token
    assert upload.header("login-customer-id") == "1112223333"
    assert upload.json()["partialFailure"] is True


def test_conversion_time_has_the_mandatory_offset_in_utc(ads: GoogleAds) -> None:
    berlin = datetime(2026, 5, 1, 14, 32, 45, tzinfo=timezone(timedelta(hours=2)))

    payload = payload_for(ads, EVENT, when=berlin)

    assert row(payload)["conversionDateTime"] == "2026-05-01 12:32:45+00:00"


# -- click IDs --------------------------------------------------------------------------------


def test_click_id_from_context_wins_over_the_page_url(ads: GoogleAds) -> None:
    payload = payload_for(ads, event_with(context__gclid="from-context"))

    assert row(payload)["gclid"] == "from-context"


def test_gclid_is_preferred_and_only_one_click_id_is_sent(ads: GoogleAds) -> None:
    event = event_with(context__gclid="g", context__gbraid="gb", context__wbraid="wb")

    sent = row(payload_for(ads, event))

    assert sent["gclid"] == "g"
    assert "gbraid" not in sent and "wbraid" not in sent


def test_gbraid_and_wbraid_are_never_sent_together(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    event = event_with(context__page_url="https://shop.example/?gbraid=gb1&wbraid=wb1")

    results = deliver(ads, [payload_for(ads, event)])

    assert results == [ItemResult.delivered()]
    assert emulator.conversions[0]["wbraid"] == "wb1"
    assert "gbraid" not in emulator.conversions[0]


def test_conversion_with_neither_click_id_nor_identifier_is_refused(ads: GoogleAds) -> None:
    event = event_with(context__page_url="https://shop.example/", user_data={})

    with pytest.raises(PayloadError, match="needs gclid, gbraid, wbraid or a hashed"):
        payload_for(ads, event)


def test_lead_without_click_id_goes_up_with_hashed_identifiers_only(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    event = event_with(context__page_url=None)

    results = deliver(ads, [payload_for(ads, event)])

    assert results == [ItemResult.delivered()]
    assert "gclid" not in emulator.conversions[0]


# -- identifiers (platforms.md §7 vectors) ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "digest"),
    [
        ("  John.Doe@Gmail.com ", JOHN_DOE),
        ("John.Doe+promo@Gmail.com", JOHN_DOE),
        ("Cloudy.SanFrancisco+shopping@gmail.com", CLOUDY),
        ("user.name+NYC@Example.com", USER_NAME),
    ],
)
def test_email_is_hashed_with_the_gmail_rule_as_in_the_vectors(
    ads: GoogleAds, raw: str, digest: str
) -> None:
    payload = payload_for(ads, event_with(user_data__email=raw))

    assert row(payload)["userIdentifiers"][0] == {"hashedEmail": digest}


@pytest.mark.parametrize(
    ("raw", "country", "digest"),
    [("+1 (650) 555-1212", None, PHONE_650), ("(800)555-0100", "US", PHONE_800)],
)
def test_phone_is_hashed_as_e164_with_plus_as_in_the_vectors(
    ads: GoogleAds, raw: str, country: str | None, digest: str
) -> None:
    event = event_with(user_data__phone=raw, user_data__country=country)

    payload = payload_for(ads, event)

    assert row(payload)["userIdentifiers"][1] == {"hashedPhoneNumber": digest}


def test_phone_without_country_code_uses_the_default_country_setting(
    server: LoopbackServer, emulator: GoogleAdsEmulator
) -> None:
    dest = google_ads(server, emulator, default_country="US")
    event = event_with(user_data__phone="(800)555-0100", user_data__country=None)

    payload = payload_for(dest, event)

    assert row(payload)["userIdentifiers"][1] == {"hashedPhoneNumber": PHONE_800}


def test_already_hashed_identifiers_pass_through_unchanged(ads: GoogleAds) -> None:
    payload = payload_for(ads, event_with(user_data__email=JOHN_DOE))

    assert row(payload)["userIdentifiers"][0] == {"hashedEmail": JOHN_DOE}


def test_of_more_than_five_identifiers_five_are_sent_the_first_phone_among_them(
    ads: GoogleAds,
) -> None:
    # Refusing the row lost the conversion, its click ID and all, for a sixth e-mail address.
    emails = [f"user{i}@example.com" for i in range(6)]
    hashed = [{"hashedEmail": hashlib.sha256(e.encode()).hexdigest()} for e in emails]
    only_emails = event_with(user_data__email=emails)
    del only_emails["user_data"]["phone"]
    with_phone = event_with(user_data__email=emails, user_data__phone="+18005550100")

    assert row(payload_for(ads, only_emails))["userIdentifiers"] == hashed[:5]
    assert row(payload_for(ads, with_phone))["userIdentifiers"] == [
        hashed[0],
        {"hashedPhoneNumber": PHONE_800},
        *hashed[1:4],
    ]


def test_a_click_conversion_leaves_the_address_out_mapped_or_default(ads: GoogleAds) -> None:
    # uploadClickConversions takes hashed email and phone only (platforms.md §3.4).
    mapping = {"userIdentifiers.addressInfo.hashedStreetAddress": {"value": "Main St 5"}}

    for sent in (row(payload_for(ads, EVENT)), row(payload_for(ads, EVENT, mapping=mapping))):
        assert [next(iter(i)) for i in sent["userIdentifiers"]] == [
            "hashedEmail",
            "hashedPhoneNumber",
        ]


def test_ad_personalization_is_never_sent_on_a_click_conversion(ads: GoogleAds) -> None:
    event = event_with(consent={"ad_user_data": "denied", "ad_personalization": "granted"})

    payload = payload_for(ads, event)

    assert row(payload)["consent"] == {"adUserData": "DENIED"}


def test_unknown_field_is_refused_before_it_sinks_a_whole_request(ads: GoogleAds) -> None:
    with pytest.raises(PayloadError, match="unknown field"):
        payload_for(ads, EVENT, mapping={"conversionValu": "properties.value"})


# -- refunds and adjustments (platforms.md §3.5, §6) ------------------------------------------


def refund_event() -> dict[str, Any]:
    event = event_with(event_name="refund", event_id="rf_1", properties__order_id="rf_1")
    event["properties"]["related_order_id"] = "ord_789"
    return event


def test_retraction_event_name_uploads_an_adjustment_for_the_original_order(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = payload_for(ads, refund_event(), event_name="RETRACTION")

    results = deliver(ads, [payload])

    assert results == [ItemResult.delivered()]
    (sent,) = emulator.adjustments
    assert sent["adjustmentType"] == "RETRACTION"
    assert sent["orderId"] == "ord_789"
    assert "restatementValue" not in sent


def test_restatement_sends_the_new_total_with_its_currency(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    mapping = {"adjustmentType": {"value": "RESTATEMENT"}, "restatementValue.adjustedValue": "`79`"}

    results = deliver(ads, [payload_for(ads, refund_event(), mapping=mapping)])

    assert results == [ItemResult.delivered()]
    assert emulator.adjustments[0]["restatementValue"] == {
        "adjustedValue": 79.0,
        "currencyCode": "EUR",
    }


def test_restatement_without_a_new_total_is_refused(ads: GoogleAds) -> None:
    with pytest.raises(PayloadError, match=r"RESTATEMENT needs restatementValue\.adjustedValue"):
        payload_for(ads, refund_event(), event_name="RESTATEMENT")


def test_restatement_value_is_refused_on_a_retraction(ads: GoogleAds) -> None:
    mapping = {"restatementValue.adjustedValue": "`79`"}

    with pytest.raises(PayloadError, match="must not be sent with RETRACTION"):
        payload_for(ads, refund_event(), event_name="RETRACTION", mapping=mapping)


def test_adjustment_without_order_id_or_gclid_pair_is_refused(ads: GoogleAds) -> None:
    event = refund_event()
    event["properties"] = {}

    with pytest.raises(PayloadError, match="needs orderId or gclidDateTimePair"):
        payload_for(ads, event, event_name="RETRACTION")


def test_enhancement_carries_address_info_to_the_adjustments_endpoint(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    mapping = {
        "userIdentifiers.addressInfo.hashedFirstName": {"value": "  Mary "},
        "userIdentifiers.addressInfo.hashedLastName": {"value": "O'Brien"},
        "userIdentifiers.addressInfo.countryCode": "user_data.country",
        "userIdentifiers.addressInfo.postalCode": "user_data.postal_code",
    }

    results = deliver(ads, [payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=mapping)])

    assert results == [ItemResult.delivered()]
    (sent,) = emulator.adjustments
    assert sent["userIdentifiers"][-1] == {
        "addressInfo": {
            "hashedFirstName": MARY,
            "hashedLastName": OBRIEN,
            "city": "berlin",  # the default mapping's, as the tag maps no city
            "state": "be",
            "postalCode": "10115",
            "countryCode": "DE",
        }
    }
    assert sent["userAgent"] == "Mozilla/5.0 ..."


def test_enhancement_sends_the_events_name_and_address_by_default(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    results = deliver(ads, [payload_for(ads, EVENT, event_name="ENHANCEMENT")])

    assert results == [ItemResult.delivered()]
    (sent,) = emulator.adjustments
    assert sent["userIdentifiers"] == [
        {"hashedEmail": hashlib.sha256(b"a@example.com").hexdigest()},
        {"hashedPhoneNumber": hashlib.sha256(b"+4915112345678").hexdigest()},
        {
            "addressInfo": {
                "hashedFirstName": hashlib.sha256(b"ada").hexdigest(),
                "hashedLastName": hashlib.sha256(b"lovelace").hexdigest(),
                "city": "berlin",
                "state": "be",
                "postalCode": "10115",
                "countryCode": "DE",
            }
        },
    ]


@pytest.mark.parametrize(
    "where", [{"country": "DE"}, {"city": "Berlin", "state": "BE", "postal_code": "10115"}]
)
def test_an_address_without_a_name_or_street_is_no_identifier(
    ads: GoogleAds, where: dict[str, str]
) -> None:
    # A place alone matches no one: an enhancement with nothing else is not sent.
    event = event_with(user_data=where)

    with pytest.raises(PayloadError, match="ENHANCEMENT needs at least one user identifier"):
        payload_for(ads, event, event_name="ENHANCEMENT")


def test_the_default_address_takes_no_place_that_email_and_phone_fill(ads: GoogleAds) -> None:
    # Five identifiers a row may carry: a tag's five e-mails and phones are not refused for
    # the address the default mapping adds.
    mapping = {
        "userIdentifiers.hashedEmail": "[user_data.email, 'b@example.com', 'c@example.com']",
        "userIdentifiers.hashedPhoneNumber": "[user_data.phone, '+4915112345679']",
    }

    sent = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=mapping))

    assert [next(iter(i)) for i in sent["userIdentifiers"]] == ["hashedEmail"] * 3 + [
        "hashedPhoneNumber"
    ] * 2


def test_a_tag_removes_the_default_address_or_part_of_it_with_null(
    write_rules: Callable[..., Path],
) -> None:
    # Through the rules compiler, whose null removes a default target and what lies below it.
    container, problems = compile_container(
        write_rules(
            """
            destinations:
              ads:
                type: google_ads
                customer_id: 123-456-7890
                conversion_action: "42"
                developer_token: t
                client_id: c
                client_secret: s
                refresh_token: r
            triggers:
              all: {event: purchase}
            tags:
              - {name: none, trigger: all, destination: ads, event_name: ENHANCEMENT,
                 consent: [], mapping: {userIdentifiers.addressInfo: null}}
              - {name: no_city, trigger: all, destination: ads, event_name: ENHANCEMENT,
                 consent: [], mapping: {userIdentifiers.addressInfo.city: null}}
            """
        ),
        {},
    )
    assert container is not None, problems
    sent = {
        d.tag: d.payload["row"]["userIdentifiers"]
        for d in container.evaluate(normalize(EVENT, NOW), now=NOW)
    }

    assert [next(iter(i)) for i in sent["none"]] == ["hashedEmail", "hashedPhoneNumber"]
    assert set(sent["no_city"][-1]["addressInfo"]) == {
        "hashedFirstName",
        "hashedLastName",
        "state",
        "postalCode",
        "countryCode",
    }


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (unicodedata.normalize("NFD", "Rue de l'Église 5"), "rue de léglise 5"),
        ("Main_Street 5", "mainstreet 5"),
    ],
)
def test_enhancement_street_loses_symbols_only_whatever_its_unicode_form(
    ads: GoogleAds, raw: str, normalized: str
) -> None:
    # platforms.md §3.6: street "lowercase, remove symbols, trim; hashed"
    mapping = {"userIdentifiers.addressInfo.hashedStreetAddress": {"value": raw}}

    sent = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=mapping))

    address = sent["userIdentifiers"][-1]["addressInfo"]
    assert address["hashedStreetAddress"] == hashlib.sha256(normalized.encode()).hexdigest()


def test_enhancement_names_lose_their_prefix_and_suffix(ads: GoogleAds) -> None:
    # platforms.md §3.6: first/last name, no prefixes (Mrs.) or suffixes (Jr.)
    mapping = {
        "userIdentifiers.addressInfo.hashedFirstName": {"value": "Mrs. Mary"},
        "userIdentifiers.addressInfo.hashedLastName": {"value": "O'Brien, Jr."},
    }

    sent = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=mapping))

    assert sent["userIdentifiers"][-1]["addressInfo"]["hashedFirstName"] == MARY
    assert sent["userIdentifiers"][-1]["addressInfo"]["hashedLastName"] == OBRIEN


CLICK_PAIR = {
    "gclidDateTimePair.gclid": {"value": "Cj0KCQ"},
    "gclidDateTimePair.conversionDateTime": {"value": "2026-11-20 14:30:45+00:00"},
}


def test_enhancement_sends_a_gclid_pair_alongside_its_order_id(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # platforms.md §3.4: orderId required, gclidDateTimePair optional, for ENHANCEMENT
    payload = payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=CLICK_PAIR)

    results = deliver(ads, [payload])

    assert results == [ItemResult.delivered()]
    (sent,) = emulator.adjustments
    assert sent["orderId"] == "ord_789"
    assert sent["gclidDateTimePair"] == {
        "gclid": "Cj0KCQ",
        "conversionDateTime": "2026-11-20 14:30:45+00:00",
    }


def test_enhancement_sends_a_conversion_time_without_gclid_but_no_gclid_without_its_time(
    ads: GoogleAds,
) -> None:
    date_only = {"gclidDateTimePair.conversionDateTime": {"value": "2026-11-20 14:30:45+00:00"}}
    gclid_only = {"gclidDateTimePair.gclid": {"value": "Cj0KCQ"}}

    with_date = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=date_only))
    with_gclid = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=gclid_only))

    assert with_date["gclidDateTimePair"] == {"conversionDateTime": "2026-11-20 14:30:45+00:00"}
    assert "gclidDateTimePair" not in with_gclid
    assert with_gclid["orderId"] == "ord_789"


@pytest.mark.parametrize("kind", ["RETRACTION", "RESTATEMENT"])
def test_refund_adjustment_with_order_id_and_gclid_pair_is_refused(
    ads: GoogleAds, kind: str
) -> None:
    # platforms.md §3.5: the conversion to change is named by one or the other, never both
    mapping = {**CLICK_PAIR, "restatementValue.adjustedValue": "`79`"}
    if kind == "RETRACTION":
        del mapping["restatementValue.adjustedValue"]

    with pytest.raises(PayloadError, match="not both"):
        payload_for(ads, refund_event(), event_name=kind, mapping=mapping)


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("2026-11-20T14:30:45.000Z", "2026-11-20 14:30:45+00:00"),  # the canonical event's form
        ("2026-11-20T15:30:45+01:00", "2026-11-20 14:30:45+00:00"),
        ("2026-11-20 15:30:45+01:00", "2026-11-20 15:30:45+01:00"),  # Google's own, kept
    ],
)
def test_gclid_pair_conversion_time_is_sent_in_googles_format(
    ads: GoogleAds, emulator: GoogleAdsEmulator, given: str, sent: str
) -> None:
    # platforms.md §3.3: "yyyy-mm-dd hh:mm:ss+|-hh:mm". The timezone offset is mandatory (§3.5:
    # a gclidDateTimePair names the conversion by its gclid and conversion time)
    mapping = {
        "orderId": None,
        "gclidDateTimePair.gclid": {"value": "Cj0KCQ"},
        "gclidDateTimePair.conversionDateTime": {"value": given},
    }
    payload = payload_for(ads, refund_event(), event_name="RETRACTION", mapping=mapping)

    results = deliver(ads, [payload])

    assert results == [ItemResult.delivered()]
    (adjustment,) = emulator.adjustments
    assert adjustment["gclidDateTimePair"] == {"gclid": "Cj0KCQ", "conversionDateTime": sent}


@pytest.mark.parametrize("given", ["2026-11-20T14:30:45", "1795185045", "20 Nov 2026"])
def test_gclid_pair_conversion_time_without_an_offset_is_refused_naming_the_format(
    ads: GoogleAds, given: str
) -> None:
    mapping = {
        "orderId": None,
        "gclidDateTimePair.gclid": {"value": "Cj0KCQ"},
        "gclidDateTimePair.conversionDateTime": {"value": given},
    }

    with pytest.raises(PayloadError, match=r"conversionDateTime must be yyyy-mm-dd hh:mm:ss"):
        payload_for(ads, refund_event(), event_name="RETRACTION", mapping=mapping)


def test_enhancement_gclid_pair_conversion_time_is_sent_in_googles_format(
    ads: GoogleAds,
) -> None:
    mapping = {"gclidDateTimePair.conversionDateTime": {"value": "2026-11-20T14:30:45Z"}}

    sent = row(payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=mapping))

    assert sent["gclidDateTimePair"] == {"conversionDateTime": "2026-11-20 14:30:45+00:00"}


def test_click_conversions_and_adjustments_never_share_a_request(ads: GoogleAds) -> None:
    conversion = Item("d1", "e1", payload_for(ads, EVENT))
    retraction = Item("d2", "e2", payload_for(ads, refund_event(), event_name="RETRACTION"))

    assert ads.batch_key(conversion) != ads.batch_key(retraction)


# -- responses --------------------------------------------------------------------------------


def test_partial_failure_fails_only_the_row_it_names(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payloads = [payload_for(ads, event_with(properties__order_id=f"o{i}")) for i in range(3)]
    emulator.row_errors["o1"] = ("conversionUploadError", "UNPARSEABLE_GCLID")

    results = deliver(ads, payloads)

    assert results[0] == results[2] == ItemResult.delivered()
    assert results[1].outcome is Outcome.PERMANENT
    assert "UNPARSEABLE_GCLID" in (results[1].error or "")
    assert [c["orderId"] for c in emulator.conversions] == ["o0", "o2"]


def test_a_conversion_sent_again_after_its_answer_was_lost_is_delivered_not_dead(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # Delivery is at least once: a timeout, a reset or a killed worker after Google took the
    # upload sends it again, and Google refuses the row as a conversion it already has.
    payloads = [payload_for(ads, event_with(properties__order_id=f"o{i}")) for i in range(2)]
    deliver(ads, payloads[:1])  # uploaded; its answer never reached the worker

    results = deliver(ads, payloads)

    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert "ORDER_ID_ALREADY_IN_USE" in (results[0].error or "")
    assert [c["orderId"] for c in emulator.conversions] == ["o0", "o1"]


def test_a_conversion_without_order_id_sent_again_is_delivered_not_dead(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = payload_for(ads, event_with(properties__order_id=None))
    deliver(ads, [payload])  # uploaded; its answer never reached the worker

    (again,) = deliver(ads, [payload])

    assert again.outcome is Outcome.DELIVERED
    assert "CLICK_CONVERSION_ALREADY_EXISTS" in (again.error or "")
    assert len(emulator.conversions) == 1


def restatement(ads: GoogleAds, new_total: float, when: datetime) -> dict[str, Any]:
    """A partial refund of ord_789 restating it to ``new_total``, dated ``when``."""
    mapping = {"restatementValue.adjustedValue": f"`{new_total}`"}
    return payload_for(ads, refund_event(), event_name="RESTATEMENT", mapping=mapping, when=when)


def test_a_retraction_sent_again_after_its_answer_was_lost_is_delivered_not_dead(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # Google took the first upload; the retry is refused as CONVERSION_ALREADY_RETRACTED.
    payload = payload_for(ads, refund_event(), event_name="RETRACTION")
    deliver(ads, [payload])  # retracted; its answer never reached the worker

    (again,) = deliver(ads, [payload])

    assert again.outcome is Outcome.DELIVERED
    assert "CONVERSION_ALREADY_RETRACTED" in (again.error or "")
    assert len(emulator.adjustments) == 1
    assert emulator.order_value("ord_789") == 0.0


def test_a_restatement_sent_again_after_its_answer_was_lost_is_delivered_not_dead(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = restatement(ads, 79.0, NOW)
    deliver(ads, [payload])  # restated; its answer never reached the worker

    (again,) = deliver(ads, [payload])

    assert again.outcome is Outcome.DELIVERED
    assert "MORE_RECENT_RESTATEMENT_FOUND" in (again.error or "")
    assert emulator.order_value("ord_789") == 79.0


def test_an_older_restatement_retried_after_a_newer_one_leaves_the_newer_total(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # Two partial refunds: the first (new total 119) failed and is retried after the second
    # (new total 100) went through. Each carries the order's whole new total: 100 is right.
    first = restatement(ads, 119.0, NOW - timedelta(hours=1))
    second = restatement(ads, 100.0, NOW)
    deliver(ads, [second])

    (late,) = deliver(ads, [first])

    assert late.outcome is Outcome.DELIVERED
    assert emulator.order_value("ord_789") == 100.0


def test_an_adjustment_of_a_retracted_conversion_is_delivered_not_dead(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # A partial refund retried after the order's cancellation retracted it: nothing changes a
    # retracted conversion, and the retraction is what the order's history ends in.
    deliver(ads, [payload_for(ads, refund_event(), event_name="RETRACTION")])

    (late,) = deliver(ads, [restatement(ads, 50.0, NOW - timedelta(hours=1))])

    assert late.outcome is Outcome.DELIVERED
    assert "CONVERSION_ALREADY_RETRACTED" in (late.error or "")
    assert emulator.order_value("ord_789") == 0.0


def _partial_answer(errors: list[dict[str, Any]], results: list[dict[str, Any]] | None) -> Any:
    body: dict[str, Any] = {
        "partialFailureError": {
            "code": 3,
            "message": "row errors",
            "details": [{"@type": "GoogleAdsFailure", "errors": errors}],
        }
    }
    if results is not None:
        body["results"] = results
    return HttpResponse(200, {"Content-Type": "application/json"}, json.dumps(body).encode())


_UNNAMED = {"errorCode": {"conversionUploadError": "CONVERSION_PRECEDES_EVENT"}, "message": "x"}
_NAMED = {
    **_UNNAMED,
    "errorCode": {"conversionUploadError": "CLICK_CONVERSION_ALREADY_EXISTS"},
    "location": {"fieldPathElements": [{"fieldName": "conversions", "index": 2}]},
}


def test_an_error_naming_no_row_sinks_only_the_rows_without_a_result(ads: GoogleAds) -> None:
    # A failed row has an empty result at its index: a row with a full result was uploaded,
    # whatever an error that names no row says (were the errors' row paths misread, say).
    items = [Item(f"d{i}", f"e{i}", payload_for(ads, EVENT)) for i in range(3)]
    answer = _partial_answer([_UNNAMED, _NAMED], [{"gclid": "a"}, {}, {}])

    results = ads.read_response(answer, items)

    assert results[0] == ItemResult.delivered()
    assert results[1].outcome is Outcome.PERMANENT
    assert "CONVERSION_PRECEDES_EVENT" in (results[1].error or "")
    assert "CLICK_CONVERSION_ALREADY_EXISTS" in (results[2].error or "")


def test_without_results_an_error_naming_no_row_fails_every_row_a_named_one_its_own(
    ads: GoogleAds,
) -> None:
    items = [Item(f"d{i}", f"e{i}", payload_for(ads, EVENT)) for i in range(3)]

    results = ads.read_response(_partial_answer([_UNNAMED, _NAMED], None), items)

    assert ["CONVERSION_PRECEDES_EVENT" in (r.error or "") for r in results] == [True, True, False]
    assert "CLICK_CONVERSION_ALREADY_EXISTS" in (results[2].error or "")


def test_too_recent_click_is_retried_after_six_hours(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    emulator.row_errors["ord_789"] = ("conversionUploadError", "TOO_RECENT_EVENT")

    (result,) = deliver(ads, [payload_for(ads, EVENT)])

    assert result.outcome is Outcome.RETRYABLE
    assert result.retry_after == 6 * 3600


def test_invalid_hash_comes_back_as_a_permanent_row_failure(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = payload_for(ads, EVENT)
    payload["row"]["userIdentifiers"][0]["hashedEmail"] = "A" * 64  # upper case: not accepted

    (result,) = deliver(ads, [payload])

    assert result.outcome is Outcome.PERMANENT
    assert "INVALID_USER_IDENTIFIER" in (result.error or "")


def test_quota_exhaustion_is_retryable_with_the_platform_delay(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    emulator.throttle = 1

    results = deliver(ads, [payload_for(ads, EVENT)] * 2)

    assert [r.outcome for r in results] == [Outcome.RETRYABLE] * 2
    assert results[0].retry_after == 30.0
    assert "RESOURCE_EXHAUSTED" in (results[0].error or "")


def test_unknown_access_token_is_an_auth_failure(ads: GoogleAds) -> None:
    (result,) = deliver(ads, [payload_for(ads, EVENT)], token="ya29.expired")

    assert result.outcome is Outcome.AUTH
    assert "UNAUTHENTICATED" in (result.error or "")


def test_request_level_error_naming_a_row_fails_that_row_and_retries_the_others(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    failure = {
        "errorCode": {"fieldError": "INVALID_VALUE"},
        "message": "bad value",
        "location": {"fieldPathElements": [{"fieldName": "conversions", "index": 1}]},
    }
    error = {"code": 400, "status": "INVALID_ARGUMENT", "message": "invalid", "details": [
        {"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
         "errors": [failure]}]}  # fmt: skip
    emulator.fail_with = Reply.json({"error": error}, status=400)

    results = deliver(ads, [payload_for(ads, EVENT)] * 3)

    assert [r.outcome for r in results] == [
        Outcome.RETRYABLE,
        Outcome.PERMANENT,
        Outcome.RETRYABLE,
    ]


def _request_error(http: int, status: str, *codes: dict[str, str]) -> Reply:
    """A whole-request failure whose GoogleAdsErrors (one per ``errorCode``) name no row."""
    errors = [{"errorCode": code, "message": "failed"} for code in codes]
    error = {"code": http, "status": status, "message": "failed", "details": [
        {"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
         "errors": errors, "requestId": "r1"}]}  # fmt: skip
    return Reply.json({"error": error}, status=http)


def test_a_request_level_wait_of_hours_is_not_shortened_by_a_retry_after_header(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    code = {"conversionUploadError": "TOO_RECENT_CONVERSION_ACTION"}
    reply = _request_error(400, "INVALID_ARGUMENT", code)
    emulator.fail_with = replace(reply, headers={**reply.headers, "Retry-After": "30"})

    (result,) = deliver(ads, [payload_for(ads, EVENT)])

    assert (result.outcome, result.retry_after) == (Outcome.RETRYABLE, 6 * 3600)


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        # platforms.md §3.7: retryable, whatever status carries them
        (_request_error(409, "ABORTED", {"databaseError": "CONCURRENT_MODIFICATION"}), "retry"),
        (_request_error(400, "INVALID_ARGUMENT", {"internalError": "TRANSIENT_ERROR"}), "retry"),
        (_request_error(400, "INVALID_ARGUMENT", {"internalError": "INTERNAL_ERROR"}), "retry"),
        (_request_error(409, "ABORTED", {"internalError": "DEADLINE_EXCEEDED"}), "retry"),
        # one that clears with time, as it does when it names a row
        (
            _request_error(
                400, "INVALID_ARGUMENT", {"conversionUploadError": "TOO_RECENT_CONVERSION_ACTION"}
            ),
            "retry",
        ),
        # 425 Too Early, as 408 and 429 (README "Delivery")
        (_request_error(425, "FAILED_PRECONDITION", {"requestError": "UNKNOWN"}), "retry"),
        # the rest stays permanent: an error no retry clears, also beside a transient one
        (_request_error(400, "INVALID_ARGUMENT", {"requestError": "INVALID_INPUT"}), "final"),
        (_request_error(409, "ABORTED", {"requestError": "INVALID_INPUT"}), "final"),
        (
            _request_error(
                400,
                "INVALID_ARGUMENT",
                {"internalError": "TRANSIENT_ERROR"},
                {"fieldError": "REQUIRED"},
            ),
            "final",
        ),
    ],
    ids=[
        "409 CONCURRENT_MODIFICATION",
        "400 TRANSIENT_ERROR",
        "400 INTERNAL_ERROR",
        "409 DEADLINE_EXCEEDED",
        "400 TOO_RECENT_CONVERSION_ACTION",
        "425",
        "400 INVALID_INPUT",
        "409 INVALID_INPUT",
        "400 TRANSIENT_ERROR and REQUIRED",
    ],
)
def test_request_level_error_naming_no_row_is_retried_only_when_transient(
    ads: GoogleAds, emulator: GoogleAdsEmulator, reply: Reply, outcome: str
) -> None:
    emulator.fail_with = reply

    results = deliver(ads, [payload_for(ads, EVENT)] * 3)

    expected = Outcome.RETRYABLE if outcome == "retry" else Outcome.PERMANENT
    assert [r.outcome for r in results] == [expected] * 3


@pytest.mark.parametrize(
    "code",
    [
        {"authorizationError": "DEVELOPER_TOKEN_NOT_APPROVED"},
        {"authenticationError": "CUSTOMER_NOT_FOUND"},
    ],
    ids=["authorizationError", "authenticationError"],
)
def test_refused_credentials_naming_no_row_are_an_auth_failure_whatever_the_status(
    ads: GoogleAds, emulator: GoogleAdsEmulator, code: dict[str, str]
) -> None:
    # An operator must act: an auth failure is retried each minute and pauses the destination;
    # read as permanent it would turn every row of a backlog into a dead letter.
    emulator.fail_with = _request_error(400, "INVALID_ARGUMENT", code, {"fieldError": "REQUIRED"})

    results = deliver(ads, [payload_for(ads, EVENT)] * 2)

    assert [r.outcome for r in results] == [Outcome.AUTH] * 2


@pytest.mark.parametrize(
    ("status", "outcome"), [(502, Outcome.RETRYABLE), (200, Outcome.RETRYABLE)]
)
def test_non_json_answer_does_not_raise(
    ads: GoogleAds, emulator: GoogleAdsEmulator, status: int, outcome: Outcome
) -> None:
    emulator.fail_with = Reply.text("<html>proxy error</html>", status=status)

    (result,) = deliver(ads, [payload_for(ads, EVENT)])

    assert result.outcome is outcome


def test_validate_only_is_checked_by_google_and_stores_nothing(
    server: LoopbackServer, emulator: GoogleAdsEmulator
) -> None:
    dest = google_ads(server, emulator, validate_only=True)

    results = deliver(dest, [payload_for(dest, EVENT)])

    assert results == [ItemResult.delivered()]
    assert server.requests[-1].json()["validateOnly"] is True
    assert emulator.conversions == []


def test_emulator_refuses_more_than_two_thousand_rows_as_the_api_does(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    payload = payload_for(ads, EVENT)

    results = deliver(ads, [payload] * 2001)

    assert GoogleAds.max_batch == 2000
    assert results[0].outcome is Outcome.PERMANENT
    assert "TOO_MANY_CONVERSIONS_IN_REQUEST" in (results[0].error or "")


def test_emulator_refuses_a_second_row_of_the_same_order_in_one_request(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # platforms.md §3.3: one conversion per order ID per conversion action
    payload = payload_for(ads, EVENT)

    results = deliver(ads, [payload, payload])

    assert results[0] == ItemResult.delivered()
    assert results[1].outcome is Outcome.PERMANENT
    assert "DUPLICATE_ORDER_ID" in (results[1].error or "")
    assert len(emulator.conversions) == 1


def test_emulator_refuses_an_adjustment_dated_before_its_conversion(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # platforms.md §3.5: adjustmentDateTime must be after the conversion
    later = {
        "orderId": None,
        "gclidDateTimePair.gclid": {"value": "Cj0KCQ"},
        "gclidDateTimePair.conversionDateTime": {"value": google_time(NOW + timedelta(hours=1))},
    }
    payload = payload_for(ads, EVENT, event_name="RETRACTION", mapping=later)

    (result,) = deliver(ads, [payload])

    assert result.outcome is Outcome.PERMANENT
    assert "ADJUSTMENT_PRECEDES_CONVERSION" in (result.error or "")
    assert emulator.adjustments == []


def test_emulator_refuses_an_enhancement_without_its_order_id(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    # platforms.md §3.4: an ENHANCEMENT's orderId is required (the tag's transaction ID); a
    # gclidDateTimePair goes alongside it, never in its place.
    pair = {"gclidDateTimePair.conversionDateTime": {"value": google_time(NOW)}}
    payload = payload_for(ads, EVENT, event_name="ENHANCEMENT", mapping=pair)
    del payload["row"]["orderId"]

    (result,) = deliver(ads, [payload])

    assert result.outcome is Outcome.PERMANENT
    assert "MISSING_ORDER_ID_FOR_WEBPAGE" in (result.error or "")
    assert emulator.adjustments == []


def test_emulator_refuses_a_restatement_currency_that_is_no_iso_code(
    ads: GoogleAds, emulator: GoogleAdsEmulator
) -> None:
    mapping = {"restatementValue.adjustedValue": {"value": 50}}
    payload = payload_for(ads, EVENT, event_name="RESTATEMENT", mapping=mapping)
    payload["row"]["restatementValue"]["currencyCode"] = "eur"

    (result,) = deliver(ads, [payload])

    assert result.outcome is Outcome.PERMANENT
    assert "INVALID_CURRENCY_CODE" in (result.error or "")


def test_conversion_older_than_ninety_days_fails_alone_at_send_time(ads: GoogleAds) -> None:
    old = Item("d1", "e1", payload_for(ads, EVENT, when=NOW - timedelta(days=91)))
    fresh = Item("d2", "e2", payload_for(ads, EVENT, when=NOW - timedelta(days=89)))

    reasons = [ads.check_item(i, SendContext(now=NOW)) for i in (old, fresh)]

    assert reasons[0] is not None and "90 days" in reasons[0]
    assert reasons[1] is None


def test_enhancement_older_than_24_hours_is_given_up_at_send_time(ads: GoogleAds) -> None:
    # platforms.md §3.4: enhanced conversions for web are sent within 24 hours
    stale = payload_for(ads, EVENT, event_name="ENHANCEMENT", when=NOW - timedelta(hours=25))
    fresh = payload_for(ads, EVENT, event_name="ENHANCEMENT", when=NOW - timedelta(hours=23))

    reasons = [
        ads.check_item(Item(f"d{i}", "e", p), SendContext(now=NOW))
        for i, p in enumerate((stale, fresh))
    ]

    assert reasons[0] is not None and "ENHANCEMENT older than 24 hours" in reasons[0]
    assert reasons[1] is None


def test_enhancement_age_counts_from_a_mapped_conversion_time(ads: GoogleAds) -> None:
    conversion = (NOW - timedelta(hours=30)).strftime("%Y-%m-%d %H:%M:%S+00:00")
    mapping = {"gclidDateTimePair.conversionDateTime": {"value": conversion}}
    payload = payload_for(
        ads, EVENT, event_name="ENHANCEMENT", mapping=mapping, when=NOW - timedelta(hours=1)
    )

    reason = ads.check_item(Item("d1", "e1", payload), SendContext(now=NOW))

    assert reason is not None and "24 hours" in reason


def test_refund_adjustments_keep_the_54_day_window(ads: GoogleAds) -> None:
    month_old = payload_for(
        ads, refund_event(), event_name="RETRACTION", when=NOW - timedelta(days=30)
    )
    too_old = payload_for(
        ads, refund_event(), event_name="RETRACTION", when=NOW - timedelta(days=55)
    )

    reasons = [
        ads.check_item(Item("d", "e", p), SendContext(now=NOW)) for p in (month_old, too_old)
    ]

    assert reasons[0] is None
    assert reasons[1] is not None and "54 days" in reasons[1]


# -- OAuth, settings and secrets ----------------------------------------------------------------


def test_token_exchange_returns_the_access_token_and_its_lifetime(ads: GoogleAds) -> None:
    token = ads.read_token(send(ads.token_request()))

    assert token.value.startswith("ya29.")
    assert token.expires_in == 3599


def test_refused_refresh_token_is_an_auth_error_without_secrets(
    server: LoopbackServer, emulator: GoogleAdsEmulator
) -> None:
    dest = google_ads(server, emulator, refresh_token="1//revoked-token")

    with pytest.raises(TokenError) as raised:
        dest.read_token(send(dest.token_request()))

    assert raised.value.outcome is Outcome.AUTH
    assert "invalid_grant" in str(raised.value)
    assert "revoked-token" not in str(raised.value)


@pytest.mark.parametrize("status", [408, 425, 429, 503])
def test_token_exchange_that_may_succeed_later_is_retryable(ads: GoogleAds, status: int) -> None:
    answer = HttpResponse(status, {"Content-Type": "application/json"}, b'{"error": "busy"}')

    with pytest.raises(TokenError) as raised:
        ads.read_token(answer)

    assert raised.value.outcome is Outcome.RETRYABLE


def test_secrets_never_appear_in_redacted_requests(ads: GoogleAds) -> None:
    upload = ads.build_request(
        [Item("d1", "e1", payload_for(ads, EVENT))], SendContext(now=NOW, access_token="ya29.x")
    )
    exchange = ads.token_request()

    shown = [ads.redact(upload), ads.redact(exchange)]

    text = " ".join(f"{r.url} {dict(r.headers)} {r.body.decode()}" for r in shown)
    for secret in ("dev-token-123", "client-secret-xyz", "1//refresh-token-abc", "ya29.x"):
        assert secret not in text
    assert REDACTED in text


def test_settings_schema_marks_secrets_and_refuses_unknown_settings() -> None:
    validator = jsonschema.Draft202012Validator(GoogleAds.settings_schema)

    errors = list(validator.iter_errors({"customer_id": "123-456-7890", "pixel_id": "1"}))

    assert "pixel_id" in " ".join(e.message for e in errors)
    assert GoogleAds.secret_settings == {"developer_token", "client_secret", "refresh_token"}
