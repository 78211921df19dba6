"""The GA4 adapter against a loopback Measurement Protocol emulator (platforms.md §2, §7)."""

from __future__ import annotations

import copy
import hashlib
import json
import unicodedata
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
import requests

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
from destinations.ga4 import GA4
from destinations.testkit.ga4 import GA4Emulator
from destinations.testkit.server import LoopbackServer, Reply
from engine.expr import build, compile_mapping

NOW = datetime.now(UTC).replace(microsecond=0)

BRIEF_EVENT: dict[str, Any] = {
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
        "user_agent": "Mozilla/5.0 ...",
        "page_url": "https://shop.example/checkout?gclid=abc",
        "referrer": "...",
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


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[tuple[GA4Emulator, LoopbackServer]]:
    emulator = GA4Emulator()
    with LoopbackServer(emulator) as server:
        yield emulator, server


@pytest.fixture
def emulator(emulator_server: tuple[GA4Emulator, LoopbackServer]) -> GA4Emulator:
    emulator, server = emulator_server
    emulator.accepted.clear()
    emulator.dropped.clear()
    emulator.fail_with = None
    server.clear()
    return emulator


@pytest.fixture
def server(
    emulator_server: tuple[GA4Emulator, LoopbackServer], emulator: GA4Emulator
) -> LoopbackServer:
    return emulator_server[1]  # ``emulator`` first forgets what earlier tests sent


def ga4(server: LoopbackServer, **settings: Any) -> GA4:
    emulator = server.handler
    assert isinstance(emulator, GA4Emulator)
    base = {
        "measurement_id": emulator.measurement_id,
        "api_secret": emulator.api_secret,
        "endpoint": server.url,
    }
    return GA4({**base, **settings})


def payload_for(
    dest: GA4,
    event: dict[str, Any],
    *,
    event_name: str = "purchase",
    mapping: dict[str, Any] | None = None,
    when: datetime = NOW,
    restricted: bool = False,
    received: datetime | None = None,
) -> dict[str, Any]:
    """What the engine does at intake: default mapping + tag mapping, then build_payload."""
    fields = compile_mapping({**GA4.default_mapping, **(mapping or {})})
    ctx = PayloadContext(
        "tag", event_name, str(event.get("event_id")), when, event, restricted, received
    )
    return dest.build_payload(build(fields, event), ctx)


def deliver(dest: GA4, payloads: Sequence[dict[str, Any]]) -> list[ItemResult]:
    """What the engine does at send time: one real HTTP request, then read_response."""
    items = [Item(f"d{i}", f"e{i}", p) for i, p in enumerate(payloads)]
    request = dest.build_request(items, SendContext(now=datetime.now(UTC)))
    answer = requests.request(
        request.method, request.url, headers=dict(request.headers), data=request.body, timeout=5
    )
    response = HttpResponse(answer.status_code, dict(answer.headers), answer.content)
    return dest.read_response(response, items)


def event_with(**changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(BRIEF_EVENT)
    for path, value in changes.items():
        node = event
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return event


# -- the default mapping ----------------------------------------------------------------------


def test_brief_example_with_the_default_mapping_is_accepted_by_the_emulator(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    payload = payload_for(dest, BRIEF_EVENT)

    results = deliver(dest, [payload])

    assert results == [ItemResult.delivered()]
    assert emulator.dropped == []
    (sent,) = emulator.accepted
    assert sent["client_id"] == "vis_abc"
    assert sent["user_id"] == "user_12345"
    assert sent["name"] == "purchase"
    assert sent["params"]["transaction_id"] == "ord_789"
    assert sent["params"]["value"] == 129.0
    assert sent["params"]["currency"] == "EUR"
    assert sent["params"]["items"] == [
        {"item_id": "sku_1", "item_name": "Shoe", "price": 129.0, "quantity": 1}
    ]
    assert sent["consent"] == {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"}
    assert sent["user_data"]["address"]["country"] == "DE"
    assert sent["user_data"]["address"]["city"] == "berlin"


def test_request_carries_measurement_id_and_api_secret_as_query_parameters(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)

    deliver(dest, [payload_for(dest, BRIEF_EVENT)])

    (request,) = server.requests
    assert request.path == "/mp/collect"
    assert request.param("measurement_id") == emulator.measurement_id
    assert request.param("api_secret") == emulator.api_secret


def test_client_id_falls_back_to_visitor_id_without_a_ga_cookie(server: LoopbackServer) -> None:
    payload = payload_for(ga4(server), event_with(context__ga_client_id=None))

    assert payload["request"]["client_id"] == "vis_abc"


def test_raw_ga_cookie_value_is_reduced_to_the_client_id(server: LoopbackServer) -> None:
    event = event_with(context__ga_client_id="GA1.1.1234567890.1700000000")

    payload = payload_for(ga4(server), event)

    assert payload["request"]["client_id"] == "1234567890.1700000000"


def test_raw_session_cookie_value_is_reduced_to_the_session_id(server: LoopbackServer) -> None:
    event = event_with(context__ga_session_id="GS1.1.1700000123.4.1.1700000456.0.0.0")

    payload = payload_for(ga4(server), event)

    assert payload["event"]["params"]["session_id"] == "1700000123"


def test_event_without_client_id_or_visitor_id_is_refused_naming_the_rule(
    server: LoopbackServer,
) -> None:
    event = event_with(visitor_id=None)

    with pytest.raises(PayloadError, match="client_id is required"):
        payload_for(ga4(server), event)


def test_ip_and_user_agent_are_sent_in_clear(server: LoopbackServer) -> None:
    payload = payload_for(ga4(server), BRIEF_EVENT)

    assert payload["request"]["ip_override"] == "203.0.113.7"
    assert payload["request"]["user_agent"] == "Mozilla/5.0 ..."


# -- normalization and hashing (platforms.md §7) ----------------------------------------------


JOHN_DOE = "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"
CLOUDY = "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"
USER_NAME = "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac"
PHONE_650 = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"
PHONE_800 = "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"


@pytest.mark.parametrize(
    ("raw", "digest"),
    [
        ("  John.Doe@Gmail.com ", JOHN_DOE),
        ("John.Doe+promo@Gmail.com", JOHN_DOE),
        ("Cloudy.SanFrancisco+shopping@gmail.com", CLOUDY),
        ("user.name+NYC@Example.com", USER_NAME),
    ],
)
def test_email_is_hashed_with_google_gmail_rule_as_in_the_vectors(
    server: LoopbackServer, raw: str, digest: str
) -> None:
    payload = payload_for(ga4(server), event_with(user_data__email=raw))

    assert payload["request"]["user_data"]["sha256_email_address"] == digest


@pytest.mark.parametrize(
    ("raw", "country", "digest"),
    [("+1 (650) 555-1212", None, PHONE_650), ("(800)555-0100", "US", PHONE_800)],
)
def test_phone_is_hashed_as_e164_with_plus_as_in_the_vectors(
    server: LoopbackServer, raw: str, country: str | None, digest: str
) -> None:
    event = event_with(user_data__phone=raw, user_data__country=country)

    payload = payload_for(ga4(server), event)

    assert payload["request"]["user_data"]["sha256_phone_number"] == digest


def test_national_phone_is_read_in_the_persons_country_when_the_address_is_not_sent(
    server: LoopbackServer,
) -> None:
    # Arrange: a tag that keeps the address out of GA4; the event says where the person is
    mapped = {"client_id": "1.2", "user_data": {"sha256_phone_number": "0151 12345678"}}
    event = event_with(user_data__phone="0151 12345678", user_data__country="DE")
    ctx = PayloadContext("tag", "purchase_x", "e1", NOW, event)

    # Act
    payload = ga4(server, default_country="US").build_payload(mapped, ctx)

    # Assert
    assert payload["request"]["user_data"] == {
        "sha256_phone_number": hashlib.sha256(b"+4915112345678").hexdigest()
    }


@pytest.mark.parametrize(
    ("raw", "sent"),
    [("CA 94035", "94035"), ("ZIP 94035", "94035"), ("94035 USA", "94035"), ("K1A 0B1", "K1A 0B1")],
)
def test_us_zip_with_words_around_it_is_sent_as_its_five_digits(
    server: LoopbackServer, raw: str, sent: str
) -> None:
    event = event_with(user_data__postal_code=raw, user_data__country="US")

    payload = payload_for(ga4(server), event)

    assert payload["request"]["user_data"]["address"]["postal_code"] == sent


def test_first_name_and_street_are_hashed_as_in_the_vectors(server: LoopbackServer) -> None:
    mapping = {"user_data.address.sha256_street": {"value": "1600 Amphitheatre Pkwy."}}

    payload = payload_for(ga4(server), event_with(user_data__first_name=" Mary "), mapping=mapping)

    address = payload["request"]["user_data"]["address"]
    assert address["sha256_first_name"] == (
        "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
    )
    assert address["sha256_street"] == (
        "22b7e2d69b91e0ef4a88e81a73d897b92fd9c93ccfbe0a860f77db16c26f662e"
    )


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        # The same street typed in decomposed Unicode (é as e + U+0301) keeps its accent.
        (unicodedata.normalize("NFD", "Rue de l'Église 5"), "rue de léglise 5"),
        ("Rue de l'Église 5", "rue de léglise 5"),
        ("Main_Street 5", "mainstreet 5"),  # "_" is a symbol like any other
    ],
)
def test_street_loses_symbols_only_whatever_its_unicode_form(
    server: LoopbackServer, raw: str, normalized: str
) -> None:
    # platforms.md §2.5: "Street: remove symbols, lowercase, trim."
    mapping = {"user_data.address.sha256_street": {"value": raw}}

    payload = payload_for(ga4(server), BRIEF_EVENT, mapping=mapping)

    address = payload["request"]["user_data"]["address"]
    assert address["sha256_street"] == hashlib.sha256(normalized.encode()).hexdigest()


def test_names_lose_their_prefix_and_suffix_before_hashing(server: LoopbackServer) -> None:
    # platforms.md §3.6 (shared by GA4 user_data, §2.5): no prefixes (Mrs.) or suffixes (Jr.)
    event = event_with(user_data__first_name="Mrs. Mary", user_data__last_name="O'Brien Jr.")

    address = payload_for(ga4(server), event)["request"]["user_data"]["address"]

    assert address["sha256_first_name"] == (
        "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"  # mary
    )
    assert address["sha256_last_name"] == (
        "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"  # obrien
    )


def test_an_already_hashed_email_passes_through_unchanged(server: LoopbackServer) -> None:
    digest = "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"

    payload = payload_for(ga4(server), event_with(user_data__email=digest.upper()))

    assert payload["request"]["user_data"]["sha256_email_address"] == digest


def test_restricted_consent_drops_user_data_and_denies_the_ad_signals(
    server: LoopbackServer,
) -> None:
    payload = payload_for(ga4(server), BRIEF_EVENT, restricted=True)

    assert "user_data" not in payload["request"]
    assert payload["request"]["consent"] == {
        "ad_user_data": "DENIED",
        "ad_personalization": "DENIED",
    }


# -- platform rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_name", "rule"),
    [
        ("screen_view", "is reserved"),
        ("session_start", "is reserved"),
        ("app_store_subscription_cancel", "is reserved"),  # platforms.md §2.4
        ("app_store_subscription_renew", "is reserved"),
        ("a" * 41, "longer than 40"),
        ("2fast", "starting with a letter"),
        ("has-dash", "letters, digits and '_'"),
        ("google_thing", "reserved prefix"),
    ],
)
def test_bad_event_names_are_refused_naming_the_rule(
    server: LoopbackServer, event_name: str, rule: str
) -> None:
    with pytest.raises(PayloadError, match=rule):
        payload_for(ga4(server), BRIEF_EVENT, event_name=event_name)


@pytest.mark.parametrize(
    ("mapping", "rule"),
    [
        ({"params.ga_thing": {"value": 1}}, "reserved prefix"),
        ({"params.gclid": "context.gclid || 'x'"}, "is reserved"),
        ({"params.note": {"value": "x" * 101}}, "longer than 100"),
        ({f"params.p{i}": {"value": i} for i in range(25)}, "at most 25 params"),
        ({"params.currency": None}, "currency is required when value is set"),
        ({"params.transaction_id": None}, "transaction_id is required"),
        ({"user_properties.first_open_time": {"value": 1}}, "reserved"),
        ({"user_properties.tier": {"value": "x" * 37}}, "longer than 36"),
        ({"events": {"value": []}}, "unknown top-level field"),
    ],
)
def test_params_breaking_a_limit_are_refused_naming_the_rule(
    server: LoopbackServer, mapping: dict[str, Any], rule: str
) -> None:
    with pytest.raises(PayloadError, match=rule):
        payload_for(ga4(server), BRIEF_EVENT, mapping=mapping)


@pytest.mark.parametrize("currency", ["", "   "])
def test_blank_currency_with_a_value_is_refused_as_missing(
    server: LoopbackServer, currency: str
) -> None:
    # platforms.md §2.6: currency is required if value is set; a blank one is none, and GA4
    # answers 2xx and drops the revenue.
    event = event_with(properties__currency=currency)

    with pytest.raises(PayloadError, match="currency is required when value is set"):
        payload_for(ga4(server), event)


@pytest.mark.parametrize("currency", ["$", "€", "US Dollar", "EURO", "E1R"])
def test_currency_that_is_no_iso_4217_code_is_refused_naming_the_rule(
    server: LoopbackServer, currency: str
) -> None:
    # GA4 reads currency as a 3-letter ISO 4217 code; anything else is answered 2xx and the
    # revenue is lost without a word (the emulator drops it: see the next test).
    dest = ga4(server)
    event = event_with(properties__currency=currency)

    with pytest.raises(PayloadError, match="currency must be an ISO 4217 code"):
        payload_for(dest, event)


def test_emulator_drops_a_currency_that_is_no_iso_4217_code(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    payload = payload_for(dest, BRIEF_EVENT)
    payload["event"]["params"]["currency"] = "EURO"

    deliver(dest, [payload])

    assert emulator.accepted == []
    assert [m["fieldPath"] for m in emulator.dropped] == ["events[0].params.currency"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p["event"].update(name="app_store_subscription_renew"), "events[0].name"),
        (lambda p: p["event"]["params"]["items"][0].update(price="9.90"), "items[0].price"),
        (
            lambda p: p["request"].update(user_properties={"t" * 25: {"value": 1}}),
            "user_properties." + "t" * 25,
        ),
        (
            lambda p: p["request"].update(user_properties={"user_id": {"value": 1}}),
            "user_properties.user_id",
        ),
        (
            lambda p: p["request"].update(user_properties={"tier": {"value": "x" * 37}}),
            "user_properties.tier.value",
        ),
        (lambda p: p["request"].update(non_personalized_ads="yes"), "non_personalized_ads"),
        (
            lambda p: p["request"]["user_data"]["address"].update(city="Berlin 10"),
            "user_data.address.city",
        ),
    ],
)
def test_emulator_drops_what_ga4_documents_as_invalid(
    server: LoopbackServer, emulator: GA4Emulator, change: Any, field: str
) -> None:
    # A valid event, then one documented rule broken (platforms.md §2.3-§2.5): GA4 answers 2xx
    # and drops it, which only the emulator's record shows.
    dest = ga4(server)
    payload = payload_for(dest, BRIEF_EVENT)
    change(payload)

    deliver(dest, [payload])

    assert emulator.accepted == []
    assert field in [m["fieldPath"].removeprefix("events[0].params.") for m in emulator.dropped]


def test_lowercase_currency_is_sent_as_its_iso_4217_code(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)

    deliver(dest, [payload_for(dest, event_with(properties__currency=" eur "))])

    assert emulator.dropped == []
    assert emulator.accepted[0]["params"]["currency"] == "EUR"


def test_blank_currency_without_a_value_is_left_out(server: LoopbackServer) -> None:
    event = event_with(properties__currency=" ", properties__value=None)

    payload = payload_for(ga4(server), event)

    assert "currency" not in payload["event"]["params"]


def test_long_page_location_is_truncated_to_gas_limit_instead_of_losing_the_event(
    server: LoopbackServer,
) -> None:
    event = event_with(context__page_url="https://shop.example/?q=" + "x" * 2000)

    payload = payload_for(ga4(server), event)

    assert len(payload["event"]["params"]["page_location"]) == 1000


def test_an_item_without_id_or_name_is_left_out_and_the_event_sent(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    # GA4 takes no such item; the purchase and its value are not lost for one line of a cart.
    dest = ga4(server)
    event = event_with(
        properties__items=[{"price": 1.0, "quantity": 1}, {"id": "sku_2", "price": 2.0}]
    )

    payload = payload_for(dest, event)
    results = deliver(dest, [payload])

    assert payload["event"]["params"]["items"] == [{"item_id": "sku_2", "price": 2.0}]
    assert results == [ItemResult.delivered()]


def test_refund_names_the_original_order_as_transaction_id(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    refund = event_with(event_name="refund", event_id="rf_1", properties__order_id="rf_1")
    refund["properties"]["related_order_id"] = "ord_789"

    results = deliver(dest, [payload_for(dest, refund, event_name="refund")])

    assert results == [ItemResult.delivered()]
    assert emulator.accepted[0]["name"] == "refund"
    assert emulator.accepted[0]["params"]["transaction_id"] == "ord_789"


def test_event_older_than_72_hours_fails_alone_at_send_time(server: LoopbackServer) -> None:
    dest = ga4(server)
    # Both were under 72 hours old when they were accepted, two hours ago.
    accepted = NOW - timedelta(hours=2)
    old = Item(
        "d1",
        "e1",
        payload_for(dest, BRIEF_EVENT, when=NOW - timedelta(hours=73), received=accepted),
    )
    fresh = Item(
        "d2",
        "e2",
        payload_for(dest, BRIEF_EVENT, when=NOW - timedelta(hours=71), received=accepted),
    )

    reasons = [dest.check_item(i, SendContext(now=NOW)) for i in (old, fresh)]

    assert reasons[0] is not None and "72-hour" in reasons[0]
    assert reasons[1] is None


def test_an_event_older_than_72_hours_when_it_arrives_is_refused_at_intake(
    server: LoopbackServer,
) -> None:
    # It was queued, to become a dead letter at send time, and its tag's dedup key held back a
    # later copy of the order that GA4 would have taken.
    dest = ga4(server)

    with pytest.raises(PayloadError, match="72-hour"):
        payload_for(dest, BRIEF_EVENT, when=NOW - timedelta(hours=73), received=NOW)
    payload_for(dest, BRIEF_EVENT, when=NOW - timedelta(hours=71), received=NOW)


# -- batching -----------------------------------------------------------------------------------


def test_one_request_never_mixes_client_ids(server: LoopbackServer) -> None:
    dest = ga4(server)
    first = payload_for(dest, BRIEF_EVENT)
    same = payload_for(dest, BRIEF_EVENT, event_name="add_to_cart")
    other = payload_for(dest, event_with(visitor_id="vis_other"))

    keys = [dest.batch_key(Item(f"d{i}", "e", p)) for i, p in enumerate((first, same, other))]

    assert keys[0] == keys[1]
    assert keys[0] != keys[2]


def test_twenty_five_events_of_one_client_go_in_one_accepted_request(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    payloads = [payload_for(dest, BRIEF_EVENT, event_name=f"step_{i}") for i in range(25)]

    results = deliver(dest, payloads)

    assert GA4.max_batch == 25
    assert results == [ItemResult.delivered()] * 25
    assert len(server.requests) == 1
    assert len(emulator.accepted) == 25


def engine_batches(dest: GA4, payloads: Sequence[dict[str, Any]]) -> list[list[Item]]:
    """What engine/delivery.py does with leased items: group by batch_key, then cut each group
    into requests with the adapter's split."""
    groups: dict[str, list[Item]] = {}
    for i, payload in enumerate(payloads):
        item = Item(f"d{i}", f"e{i}", payload)
        groups.setdefault(dest.batch_key(item), []).append(item)
    return [request for group in groups.values() for request in dest.split(group)]


def items_of(size: int, chunk: int = 100, char: str = "x") -> dict[str, Any]:
    """A mapping giving the event ``size`` characters ``char`` of item IDs (IDs of at most
    ``chunk``)."""
    ids = [char * min(chunk, size - start) for start in range(0, size, chunk)]
    return {"params.items": {"value": [{"item_id": i} for i in ids]}}


def body_sizes(requests: Sequence[Any]) -> list[int]:
    return [len(request.body) for request in requests]


def test_large_events_of_one_client_are_packed_into_requests_under_130_kb(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    # platforms.md §2.4: post body under 130 kB
    dest = ga4(server)
    big = [
        payload_for(dest, BRIEF_EVENT, event_name="view_item_list", mapping=items_of(19_000))
        for _ in range(8)
    ]
    small = [payload_for(dest, BRIEF_EVENT, event_name=f"step_{i}") for i in range(3)]

    batches = engine_batches(dest, big + small)
    requests_sent = [dest.build_request(batch, SendContext(now=NOW)) for batch in batches]
    results = [r for batch in batches for r in deliver(dest, [i.payload for i in batch])]

    assert max(body_sizes(requests_sent)) < 130_000
    assert results == [ItemResult.delivered()] * 11
    assert len(emulator.accepted) == 11 and emulator.dropped == []
    # five events of 22 kB fill a request (six would make 133 kB); the rest share the next
    assert [[i.delivery_id for i in b] for b in batches] == [
        [f"d{i}" for i in range(5)],
        [f"d{i}" for i in range(5, 11)],
    ]


def test_twenty_five_events_of_5_kb_go_in_the_fewest_requests_each_under_130_kb(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    payloads = [
        payload_for(
            dest, event_with(properties__order_id=f"ord_{i}"), mapping=items_of(4_000, chunk=50)
        )
        for i in range(25)
    ]

    batches = engine_batches(dest, payloads)
    results = [r for batch in batches for r in deliver(dest, [i.payload for i in batch])]

    bodies = [request.body for request in server.requests]
    events = [event["params"]["transaction_id"] for body in bodies for event in _events(body)]
    assert len(bodies) == 2  # 25 such events make about 135 kB: two requests, not 25
    assert all(len(body) < 130_000 for body in bodies)
    assert sorted(events) == sorted(f"ord_{i}" for i in range(25))  # every event, once
    assert results == [ItemResult.delivered()] * 25
    assert len(emulator.accepted) == 25 and emulator.dropped == []


def _events(body: bytes) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = json.loads(body)["events"]
    return events


def test_no_request_holds_more_than_25_events(server: LoopbackServer) -> None:
    dest = ga4(server)
    items = [Item(f"d{i}", f"e{i}", payload_for(dest, BRIEF_EVENT)) for i in range(60)]

    requests_made = dest.split(items)

    assert [len(r) for r in requests_made] == [25, 25, 10]
    assert [i for r in requests_made for i in r] == items  # in order


@pytest.mark.parametrize("validate", [False, True], ids=["collect", "validate"])
@pytest.mark.parametrize("char", ["x", "é", "€", "😀"], ids=["ascii", "2-byte", "3-byte", "4-byte"])
def test_a_request_is_filled_up_to_the_last_byte_of_the_body_sent(
    server: LoopbackServer, validate: bool, char: str
) -> None:
    # UTF-8 bytes are counted, not characters; non-ASCII request-level fields too.
    dest = ga4(server, validate=validate)
    event = event_with(user_id="Jürgen ✓", context__user_agent="Mozilla/5.0 (Ünïcødé; 😀)")
    mapping = {**items_of(20_000, chunk=1000), "params.note": {"value": "ß€😀"}}
    fixed = [
        Item(
            f"d{i}", f"e{i}", payload_for(dest, event, event_name="view_item_list", mapping=mapping)
        )
        for i in range(2)
    ]

    def items(size: int) -> list[Item]:
        """The two fixed events and one of ``size`` characters ``char`` of item IDs."""
        mapping = items_of(size, chunk=1000, char=char)
        last = payload_for(dest, event, event_name="view_item_list", mapping=mapping)
        return [*fixed, Item("d2", "e2", last)]

    def body_size(size: int) -> int:
        return len(dest.build_request(items(size), SendContext(now=NOW)).body)

    low, high = 1_000 // len(char.encode()), 100_000 // len(char.encode())
    assert len(dest.split(items(low))) == 1 and len(dest.split(items(high))) == 2
    while high - low > 1:  # the largest size that still goes in one request
        middle = (low + high) // 2
        low, high = (middle, high) if len(dest.split(items(middle))) == 1 else (low, middle)

    assert body_size(low) < 130_000 <= body_size(high)
    assert [len(r) for r in dest.split(items(high))] == [2, 1]


def test_events_that_fit_25_to_a_request_share_one_up_to_the_last_byte(
    server: LoopbackServer,
) -> None:
    dest = ga4(server, validate=True)

    def full_batch(size: int) -> tuple[bool, int]:
        """Whether 25 such events go in one request, and the size of its body."""
        mapping = items_of(size)
        payload = payload_for(dest, BRIEF_EVENT, event_name="view_item_list", mapping=mapping)
        items = [Item(f"d{i}", f"e{i}", payload) for i in range(25)]
        shared = len(dest.split(items)) == 1
        return shared, len(dest.build_request(items, SendContext(now=NOW)).body)

    low, high = 100, 10_000  # shared at low, not at high: find the largest shared size
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if full_batch(middle)[0] else (low, middle)
    shared, body = full_batch(low)

    assert shared
    assert 130_000 - 25 <= body < 130_000  # one byte more per event would not fit


def test_an_event_that_fits_only_alone_goes_alone_between_others(server: LoopbackServer) -> None:
    dest = ga4(server)
    mapping = items_of(127_000, chunk=1000)  # alone, a body of 129.8 kB
    large = payload_for(dest, BRIEF_EVENT, event_name="view_item_list", mapping=mapping)
    small = payload_for(dest, BRIEF_EVENT, event_name="add_to_cart")
    items = [Item(f"d{i}", f"e{i}", p) for i, p in enumerate((small, large, small, small))]

    requests_made = dest.split(items)

    assert [[i.delivery_id for i in r] for r in requests_made] == [["d0"], ["d1"], ["d2", "d3"]]
    sizes = body_sizes([dest.build_request(r, SendContext(now=NOW)) for r in requests_made])
    assert max(sizes) < 130_000


def test_the_largest_event_accepted_at_intake_fits_alone_even_in_validate_mode(
    server: LoopbackServer,
) -> None:
    dest = ga4(server, validate=True)

    def accepted(size: int) -> dict[str, Any] | None:
        mapping = items_of(size, chunk=1000)  # at most 200 items
        try:
            return payload_for(dest, BRIEF_EVENT, event_name="view_item_list", mapping=mapping)
        except PayloadError:
            return None

    low, high = 100, 130_000  # accepted at low, refused at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepted(middle) else (low, middle)
    largest = accepted(low)
    assert largest is not None

    body = dest.build_request([Item("d", "e", largest)], SendContext(now=NOW)).body

    assert 130_000 - 15 <= len(body) < 130_000


# -- validate mode and responses ------------------------------------------------------------


def test_validate_mode_sends_to_the_debug_endpoint_with_enforced_recommendations(
    server: LoopbackServer,
) -> None:
    dest = ga4(server, validate=True)

    results = deliver(dest, [payload_for(dest, BRIEF_EVENT)])

    assert results == [ItemResult.delivered()]
    (request,) = server.requests
    assert request.path == "/debug/mp/collect"
    assert request.json()["validation_behavior"] == "ENFORCE_RECOMMENDATIONS"


def test_validation_message_fails_only_the_event_it_names(server: LoopbackServer) -> None:
    dest = ga4(server, validate=True)
    good = payload_for(dest, BRIEF_EVENT, event_name="add_to_cart")
    bad = copy.deepcopy(good)
    bad["event"]["name"] = "_secret_name"  # a stored payload that predates a rule change

    results = deliver(dest, [good, bad])

    assert results[0] == ItemResult.delivered()
    assert results[1].outcome is Outcome.PERMANENT
    assert results[1].error is not None
    assert "NAME_INVALID" in results[1].error
    assert "_secret_name" not in results[1].error  # quoted values are hidden


def test_collect_answers_2xx_even_to_what_it_drops(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    bad = payload_for(dest, BRIEF_EVENT)
    bad["event"]["name"] = "first_visit"

    results = deliver(dest, [bad])

    assert results == [ItemResult.delivered()]  # GA's own answer: pre-send checks are the guard
    assert [m["validationCode"] for m in emulator.dropped] == ["NAME_RESERVED"]


def test_server_error_is_retryable_and_a_non_json_body_does_not_raise(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    emulator.fail_with = Reply.text("<html>backend error</html>", status=503)

    results = deliver(dest, [payload_for(dest, BRIEF_EVENT)])

    assert results[0].outcome is Outcome.RETRYABLE


def test_non_json_answer_from_the_validation_server_does_not_raise(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server, validate=True)
    emulator.fail_with = Reply.text("not json", status=200)

    results = deliver(dest, [payload_for(dest, BRIEF_EVENT)])

    assert results[0].outcome is Outcome.RETRYABLE


# -- settings and secrets -----------------------------------------------------------------------


def test_api_secret_never_appears_in_a_redacted_request(server: LoopbackServer) -> None:
    dest = ga4(server, api_secret="very-secret-value")
    item = Item("d1", "e1", payload_for(dest, BRIEF_EVENT))

    redacted = dest.redact(dest.build_request([item], SendContext(now=NOW)))

    assert "very-secret-value" not in redacted.url
    assert REDACTED in redacted.url


def test_settings_schema_refuses_unknown_settings_and_requires_the_secret() -> None:
    validator = jsonschema.Draft202012Validator(GA4.settings_schema)

    errors = list(validator.iter_errors({"measurement_id": "G-ABC", "pixel": "1"}))

    messages = " ".join(e.message for e in errors)
    assert "api_secret" in messages
    assert "pixel" in messages


def test_a_user_id_longer_than_ga4_takes_is_left_out_and_the_event_sent(
    server: LoopbackServer, emulator: GA4Emulator
) -> None:
    dest = ga4(server)
    payload = payload_for(dest, event_with(user_id="u" * 257))

    results = deliver(dest, [payload])

    assert "user_id" not in payload["request"]
    assert results == [ItemResult.delivered()]
    assert payload_for(dest, event_with(user_id="u" * 256))["request"]["user_id"] == "u" * 256
