"""Every adapter reads any mapped value safely: a payload of strict JSON, or a PayloadError.

A tag can map any JSON value to any target (and JMESPath's ``to_number`` can make NaN or an
infinity), so ``build_payload`` must never raise anything but :class:`PayloadError`: any other
exception used to fail the whole request with a 500.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from destinations import normalize, registry, values
from destinations.base import Destination, Item, PayloadContext, PayloadError, SendContext
from engine.expr import build, compile_mapping
from tests.destinations.conftest import CANONICAL_EVENT

NOW = datetime.now(UTC).replace(microsecond=0)

SETTINGS: dict[str, dict[str, Any]] = {
    "meta_capi": {"pixel_id": "1234567890", "access_token": "meta-token"},
    "ga4": {"measurement_id": "G-ABC123", "api_secret": "ga4-secret"},
    "google_ads": {
        "customer_id": "123-456-7890",
        "conversion_action": "987654321",
        "developer_token": "dev-token",
        "client_id": "cid",
        "client_secret": "client-secret",
        "refresh_token": "refresh-token",
    },
    "tiktok": {"pixel_code": "CABCDEF123", "access_token": "tt-token"},
    "webhook": {"url": "https://hook.example/in"},
    "log": {},
    "slack": {"webhook_url": "https://hooks.slack.com/services/T0/B0/X0"},
}
"""Working settings of every destination registered in the development install."""

# Targets beyond the default mappings that a tag may map, including paths into lists.
EXTRA_TARGETS: dict[str, list[str]] = {
    "meta_capi": [
        "action_source",
        "custom_data",
        "custom_data.contents.0.id",
        "custom_data.contents.0.item_price",
        "custom_data.contents.0.quantity",
        "custom_data.net_revenue",
        "custom_data.num_items",
        "custom_data.predicted_ltv",
        "data_processing_options",
        "user_data",
        "user_data.lead_id",
    ],
    "ga4": [
        "client_id",
        "consent",
        "device",
        "non_personalized_ads",
        "params",
        "params.coupon",
        "params.engagement_time_msec",
        "params.items.0.item_id",
        "params.items.0.price",
        "params.items.0.quantity",
        "user_data",
        "user_data.address",
        "user_data.address.street",
        "user_location",
        "user_properties",
        "user_properties.tier",
    ],
    "google_ads": [
        "adjustmentType",
        "cartData",
        "conversionAction",
        "conversionEnvironment",
        "customVariables",
        "gclidDateTimePair",
        "gclidDateTimePair.conversionDateTime",
        "gclidDateTimePair.gclid",
        "restatementValue",
        "restatementValue.adjustedValue",
        "restatementValue.currencyCode",
        "userIdentifiers",
        "userIdentifiers.addressInfo",
        "userIdentifiers.addressInfo.city",
        "userIdentifiers.addressInfo.countryCode",
        "userIdentifiers.addressInfo.hashedFirstName",
        "userIdentifiers.addressInfo.postalCode",
        "userIdentifiers.addressInfo.state",
    ],
    "tiktok": [
        "limited_data_use",
        "page",
        "properties",
        "properties.content_ids",
        "properties.contents.0.content_id",
        "properties.contents.0.price",
        "properties.contents.0.quantity",
        "user",
        "user.city",
        "user.country",
        "user.state",
        "user.zip_code",
    ],
    "webhook": ["event_name", "properties.items.0.quantity", "properties.value"],
    "log": ["event_name", "properties.value"],
    "slack": ["fields", "fields.coupon", "fields.value"],
}
# Event names that take adapters down their different branches.
EVENT_NAMES = ["Purchase", "purchase", "refund", "Lead", "RESTATEMENT", "RETRACTION", "ENHANCEMENT"]

ODD_SCALARS = [
    "NaN",
    "nan",
    "-NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e999",
    "-1e999",
    "1e308",
    "0",
    "-5",
    " 12 ",
    "1_000",
    "0x10",
    "٣",
    "",
    " ",
    "DE",
    "Deutschland",
    "granted",
    "RETRACTION",
    "2026-01-01 10:00:00+00:00",
    "a@example.com",
    "+4915112345678",
    "https://shop.example/?gclid=g&ttclid=t&fbclid=f",
    "a" * 64,
    10**20,
    10**400,
    -(10**400),
    10**4000,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    -0.0,
]
KEYS = ["id", "quantity", "price", "item_id", "country", "value", "currency", "gclid", "url"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(ODD_SCALARS),
)
json_ish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def built_in() -> list[str]:
    return sorted(name for name in registry.registry() if name in SETTINGS)


def mapped_event(name: str) -> dict[str, Any]:
    """What the adapter's default mapping makes of the canonical event (a copy to change)."""
    cls = registry.registry()[name]
    event = copy.deepcopy(CANONICAL_EVENT)  # a mapped object can be the event's own
    return copy.deepcopy(build(compile_mapping(cls.default_mapping), event))


def put(mapped: dict[str, Any], target: str, value: Any) -> None:
    """Set a dotted target (numbers index lists that are there), making objects on the way."""
    *parents, last = target.split(".")
    node: Any = mapped
    for key in parents:
        if key.isdigit():
            if not isinstance(node, list) or len(node) <= int(key):
                return
            node = node[int(key)]
        else:
            if not isinstance(node, dict):
                return
            if not isinstance(node.get(key), dict | list):
                node[key] = {}
            node = node[key]
    if last.isdigit():
        if isinstance(node, list) and len(node) > int(last):
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value


def context(event_name: str = "Purchase", restricted: bool = False) -> PayloadContext:
    return PayloadContext(
        "tag", event_name, "ord_789", NOW - timedelta(minutes=1), CANONICAL_EVENT, restricted, NOW
    )


def assert_payload_or_payload_error(
    adapter: Destination, mapped: dict[str, Any], ctx: PayloadContext
) -> dict[str, Any] | None:
    """Build the payload; it must be strict JSON and make a request. None: a PayloadError."""
    try:
        payload = adapter.build_payload(mapped, ctx)
    except PayloadError:
        return None
    json.dumps(payload, allow_nan=False)
    item = Item("d1", ctx.event_id, payload)
    adapter.build_request([item], SendContext(NOW, "access-token"))
    return payload


def test_every_registered_destination_is_covered() -> None:
    assert set(registry.registry()) <= set(SETTINGS)


@pytest.mark.parametrize("name", built_in())
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_any_mapped_values_give_a_json_payload_or_a_payload_error(
    name: str, data: st.DataObject
) -> None:
    cls = registry.registry()[name]
    adapter = cls(SETTINGS[name])
    targets = sorted(set(cls.default_mapping) | set(EXTRA_TARGETS[name]))
    changes = data.draw(
        st.lists(st.tuples(st.sampled_from(targets), json_ish), min_size=1, max_size=4)
    )
    event_name = data.draw(st.sampled_from(EVENT_NAMES))
    restricted = data.draw(st.booleans())
    mapped = mapped_event(name)
    for target, value in changes:
        put(mapped, target, copy.deepcopy(value))

    assert_payload_or_payload_error(adapter, mapped, context(event_name, restricted))


@pytest.mark.parametrize("name", built_in())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mapped=st.dictionaries(st.text(max_size=12), json_ish, max_size=5))
def test_any_mapped_object_gives_a_json_payload_or_a_payload_error(
    name: str, mapped: dict[str, Any]
) -> None:
    adapter = registry.registry()[name](SETTINGS[name])

    assert_payload_or_payload_error(adapter, mapped, context())


# -- the cases found by review and fuzzing, one by one -----------------------------------------


@pytest.mark.parametrize(
    ("name", "target", "value", "message"),
    [
        ("meta_capi", "custom_data.contents.0.quantity", "NaN", "contents[].quantity must be"),
        ("meta_capi", "custom_data.contents.0.quantity", "1e999", "contents[].quantity must be"),
        ("meta_capi", "custom_data.contents.0.item_price", "inf", "contents[].item_price must"),
        ("meta_capi", "custom_data.value", 10**400, "custom_data.value must be a number"),
        ("meta_capi", "custom_data.value", float("nan"), "custom_data.value must be a number"),
        ("meta_capi", "custom_data.order_id", ["o1"], "custom_data.order_id must be a string"),
        ("meta_capi", "custom_data.currency", ["EUR"], "custom_data.currency must be an ISO"),
        ("meta_capi", "custom_data.coupon", float("inf"), "custom_data.coupon must be a finite"),
        ("tiktok", "properties.contents.0.quantity", "NaN", "contents[].quantity must be"),
        ("tiktok", "properties.contents.0.price", -(10**400), "contents[].price must be"),
        ("tiktok", "page.url", {"u": 1}, "page.url must be a string or a number"),
        ("ga4", "params.items.0.quantity", "inf", "GA4: items[].quantity must be a number"),
        ("ga4", "params.value", "NaN", "GA4: params.value must be a number"),
        ("ga4", "params.transaction_id", {"id": 1}, "GA4: params.transaction_id must be a string"),
        ("ga4", "params.coupon", float("inf"), "GA4: params.coupon must be a finite number"),
        ("ga4", "user_location", {"lat": float("nan")}, "GA4: user_location.lat must be a"),
        ("google_ads", "conversionValue", "1e999", "Google Ads: conversionValue must be a"),
        ("google_ads", "conversionValue", 10**400, "Google Ads: conversionValue must be a"),
        ("google_ads", "orderId", ["a", "b"], "Google Ads: orderId must be a string"),
        ("google_ads", "gclid", {"g": 1}, "Google Ads: gclid must be a string or a number"),
        ("webhook", "properties.value", float("inf"), "properties.value must be a finite"),
        ("log", "properties.items.0.quantity", float("nan"), "properties.items[0].quantity"),
    ],
)
def test_a_value_no_platform_can_take_is_a_payload_error_naming_the_field(
    name: str, target: str, value: Any, message: str
) -> None:
    adapter = registry.registry()[name](SETTINGS[name])
    mapped = mapped_event(name)
    put(mapped, target, value)

    with pytest.raises(PayloadError) as raised:
        adapter.build_payload(mapped, context())

    assert message in str(raised.value)


@pytest.mark.parametrize("country", [49, 4.9, ["DE"], {"code": "DE"}, True, float("nan")])
def test_a_ga4_address_country_that_is_not_text_is_left_out(country: Any) -> None:
    adapter = registry.registry()["ga4"](SETTINGS["ga4"])
    mapped = mapped_event("ga4")
    mapped["user_data"]["address"]["country"] = country

    payload = adapter.build_payload(mapped, context())

    address = payload["request"]["user_data"]["address"]
    assert "country" not in address
    assert address["city"] == "berlin"


@pytest.mark.parametrize("country", [49, ["DE"], {"code": "DE"}])
def test_a_google_ads_country_that_is_not_text_reads_phone_numbers_without_one(
    country: Any,
) -> None:
    adapter = registry.registry()["google_ads"](SETTINGS["google_ads"])
    mapped = {
        "orderId": "ord_789",
        "userIdentifiers": {
            "hashedPhoneNumber": "+4915112345678",
            "addressInfo": {
                "hashedLastName": "Lovelace",
                "countryCode": country,
                "city": "Berlin",
                "state": ["BE"],
            },
        },
    }

    payload = adapter.build_payload(mapped, context("ENHANCEMENT"))

    identifiers = payload["row"]["userIdentifiers"]
    assert {"hashedPhoneNumber": normalize.sha256_hex("+4915112345678")} in identifiers
    last_name = normalize.sha256_hex("lovelace")
    assert {"addressInfo": {"hashedLastName": last_name, "city": "berlin"}} in identifiers


def test_numbers_written_as_text_are_still_read() -> None:
    adapter = registry.registry()["meta_capi"](SETTINGS["meta_capi"])
    mapped = mapped_event("meta_capi")
    mapped["custom_data"]["value"] = " 129.5 "
    mapped["custom_data"]["contents"][0]["quantity"] = "2"

    payload = adapter.build_payload(mapped, context())

    assert payload["custom_data"]["value"] == 129.5
    assert payload["custom_data"]["contents"][0]["quantity"] == 2


# -- destinations.values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3, 3.0),
        (2.5, 2.5),
        (" 7 ", 7.0),
        ("-1e3", -1000.0),
        (True, None),
        (None, None),
        ("NaN", None),
        ("-inf", None),
        ("1e999", None),
        (float("nan"), None),
        (float("inf"), None),
        (10**400, None),
        ([1], None),
        ({"v": 1}, None),
        ("seven", None),
    ],
)
def test_finite_float_reads_numbers_and_refuses_the_rest(
    value: Any, expected: float | None
) -> None:
    assert values.finite_float(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ord_1", "ord_1"),
        (42, "42"),
        (10**400, "1" + "0" * 400),
        (1.5, "1.5"),
        (float("inf"), None),
        (float("nan"), None),
        (True, None),
        (None, None),
        ([1], None),
        ({}, None),
    ],
)
def test_scalar_text_is_text_only_for_strings_and_finite_numbers(
    value: Any, expected: str | None
) -> None:
    assert values.scalar_text(value) == expected


def test_check_json_names_the_first_value_json_cannot_carry() -> None:
    value = {"a": [1, {"b": "x", "c": math.inf}], "d": math.nan}

    with pytest.raises(PayloadError, match=r"^custom\.a\[1\]\.c must be a finite number$"):
        values.check_json(value, "custom")


def test_check_json_refuses_python_values_that_are_not_json() -> None:
    with pytest.raises(PayloadError, match=r"^x\.when is not a JSON value$"):
        values.check_json({"when": datetime.now(UTC)}, "x")


def test_check_json_reads_values_nested_deeper_than_the_recursion_limit() -> None:
    def nested(leaf: Any) -> Any:
        value: Any = [0.5, "x", {"y": leaf}]
        for _ in range(1500):  # the intake takes events nested nearly a thousand levels deep
            value = [value]
        return value

    values.check_json(nested(1.5), "x")
    with pytest.raises(PayloadError, match=r"\[2\]\.y must be a finite number$"):
        values.check_json(nested(math.nan), "x")


def test_check_json_takes_mapping_and_sequence_subclasses() -> None:
    from collections import OrderedDict

    from destinations.values import check_json

    check_json(OrderedDict(a=1), "x")
    check_json({"a": OrderedDict(b=[1.5])}, "x")
    with pytest.raises(PayloadError, match=r"x\.a\.b must be a finite number"):
        check_json({"a": OrderedDict(b=float("nan"))}, "x")
