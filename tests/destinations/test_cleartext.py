"""Personal data never reaches an ad platform in clear text (destinations/cleartext.py).

Each adapter hashes e-mail addresses, phone numbers, names and dates of birth in its own fields
and passes every other mapped value on as it was mapped. A mapping that names the wrong target
(Meta's ``user_data.email`` instead of ``user_data.em``) used to send the address itself; the
adapters now refuse such a payload, naming the field and where the data belongs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from destinations import cleartext, registry
from destinations.base import PayloadError
from tests.destinations.test_payload_values import SETTINGS, context, mapped_event, put

DIGEST = hashlib.sha256(b"ada@example.com").hexdigest()
AD_PLATFORMS = ("meta_capi", "tiktok", "ga4", "google_ads")


def adapter(name: str) -> Any:
    return registry.registry()[name](SETTINGS[name])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("email", "email"),
        ("E-Mail", "email"),
        ("emailAddress", "email"),
        ("customer_email", "email"),
        ("em", "email"),
        ("phoneNumber", "phone"),
        ("mobileNumber", "phone"),
        ("customer_phone", "phone"),
        ("billing_first_name", "first_name"),
        ("billingLastName", "last_name"),
        ("shipping-street", "street"),
        ("customer_dob", "date_of_birth"),
        ("ph", "phone"),
        ("first_name", "first_name"),
        ("givenName", "first_name"),
        ("surname", "last_name"),
        ("DOB", "date_of_birth"),
        ("birthday", "date_of_birth"),
        ("street_address", "street"),
        ("full name", "full_name"),
    ],
)
def test_field_names_of_personal_data_are_recognized(name: str, kind: str) -> None:
    assert cleartext.kind_of(name) == kind


@pytest.mark.parametrize(
    "name",
    [
        "city",
        "state",
        "region",
        "postal_code",
        "country",
        "value",
        "email_hash",
        "sha256_em",
        "mobile",  # a device flag, as often as not
        "is_mobile",
        "phone_verified",
        "email_opt_in",
        "item_em",
        "voicemail",
        "content_name",
        "ip_address",
    ],
)
def test_places_and_other_fields_are_not_personal_data_by_name(name: str) -> None:
    assert cleartext.kind_of(name) is None


@pytest.mark.parametrize(
    ("payload", "found"),
    [
        ({"user": {"email": "a@example.com"}}, ("user.email", "email", True)),
        ({"x": [{"note": "Write to Ada.L+shop@example.co.uk"}]}, None),  # not only an address
        ({"x": [{"note": " Ada.L+shop@example.co.uk "}]}, ("x[0].note", "email", False)),
        ({"phone": 4915112345678}, ("phone", "phone", True)),
        ({"phones": ["+4915112345678", DIGEST]}, ("phones", "phone", True)),
        ({"em": DIGEST.upper(), "ph": [DIGEST, None, ""]}, None),
        ({"email": None, "first_name": ""}, None),
        ({"url": "https://shop.example/?e=a@example.com", "city": "Berlin"}, None),
        ({"creative_name": "hero@2x.jpg", "banner": "promo@3x.webp"}, None),  # file names
        ({"phone": True, "email": False, "tel": 1, "dob": 0}, None),  # flags and small numbers
        ({"dob": 19901210}, ("dob", "date_of_birth", True)),
        ({"phone": [["+15551234567"]]}, ("phone", "phone", True)),  # nested lists too
        ({"first_name": [[DIGEST], ["Jane"]]}, ("first_name", "first_name", True)),
    ],
)
def test_find_names_the_first_clear_text_personal_data(
    payload: dict[str, Any], found: tuple[str, str, bool] | None
) -> None:
    assert cleartext.find(payload) == found


def test_the_cache_of_field_names_stays_bounded() -> None:
    for i in range(10_000):
        cleartext.kind_of(f"field_{i}")
    assert len(cleartext._KIND_CACHE) <= 4096


@pytest.mark.parametrize("name", AD_PLATFORMS)
def test_the_default_mapping_of_a_full_event_passes(name: str) -> None:
    """No false alarm on what the adapters build themselves from the canonical event, which
    holds every kind of personal data."""
    dest = adapter(name)
    dest.build_payload(mapped_event(name), context())


# (adapter, mapping target, value, the field the message names, where it belongs)
LEAKS = [
    ("meta_capi", "user_data.email", "a@example.com", "user_data.email", "user_data.em"),
    ("meta_capi", "email", "a@example.com", "email", "user_data.em"),
    ("meta_capi", "custom_data.buyer", "a@example.com", "custom_data.buyer", "user_data.em"),
    ("meta_capi", "user_data.phone", "+4915112345678", "user_data.phone", "user_data.ph"),
    ("meta_capi", "user_data.lead", {"dob": "1990-12-10"}, "user_data.lead.dob", "user_data.db"),
    (
        "meta_capi",
        "custom_data.contents",
        [{"id": "sku_1", "buyer": "a@example.com"}],
        "custom_data.contents[].buyer",
        "user_data.em",
    ),
    ("tiktok", "user.em", "a@example.com", "user.em", "user.email"),
    ("tiktok", "properties.phone", "+4915112345678", "properties.phone", "user.phone"),
    ("tiktok", "page.contact", "a@example.com", "page.contact", "user.email"),
    ("tiktok", "phone_number", "+4915112345678", "phone_number", "user.phone"),
    ("ga4", "params.email", "a@example.com", "params.email", "sha256_email_address"),
    ("ga4", "params.first_name", "Ada", "params.first_name", "sha256_first_name"),
    ("ga4", "client_id", "a@example.com", "client_id", "sha256_email_address"),
    (
        "ga4",
        "params.items",
        [{"item_id": "sku_1", "buyer": "a@example.com"}],
        "params.items[0].buyer",
        "sha256_email_address",
    ),
    ("ga4", "user_properties", {"mail": "a@example.com"}, "user_properties.mail", "sha256_"),
    (
        "google_ads",
        "customVariables",
        [{"conversionCustomVariable": "x", "value": "a@example.com"}],
        "customVariables[0].value",
        "hashedEmail",
    ),
    # IDs the adapters build from what is mapped: an order ID "must not contain PII"
    # (platforms.md §3.3), and a mapping such as `properties.order_id || user_data.email`
    # puts an address there
    ("meta_capi", "event_id", "a@example.com", "event_id", "user_data.em"),
    ("meta_capi", "custom_data.order_id", "a@example.com", "custom_data.order_id", "user_data.em"),
    (
        "meta_capi",
        "custom_data.content_ids",
        ["sku_1", "a@example.com"],
        "custom_data.content_ids[]",
        "user_data.em",
    ),
    # and the click and session IDs they build on: fbc from fbclid, Google's click IDs
    ("meta_capi", "fbclid", "a@example.com", "fbclid", "user_data.em"),
    ("ga4", "params.session_id", "a@example.com", "params.session_id", "sha256_email_address"),
    ("google_ads", "gclid", "a@example.com", "gclid", "hashedEmail"),
    ("google_ads", "gbraid", "a@example.com", "gbraid", "hashedEmail"),
    ("tiktok", "event_id", "a@example.com", "event_id", "user.email"),
    ("tiktok", "properties.order_id", "a@example.com", "properties.order_id", "user.email"),
    (
        "tiktok",
        "properties.content_ids",
        ["sku_1", "a@example.com"],
        "properties.content_ids[]",
        "user.email",
    ),
    (
        "ga4",
        "params.transaction_id",
        "a@example.com",
        "params.transaction_id",
        "sha256_email_address",
    ),
    ("google_ads", "orderId", "a@example.com", "orderId", "hashedEmail"),
]


@pytest.mark.parametrize(("name", "target", "value", "field", "home"), LEAKS)
def test_personal_data_passed_on_in_clear_text_is_refused(
    name: str, target: str, value: Any, field: str, home: str
) -> None:
    mapped = mapped_event(name)
    put(mapped, target, value)
    with pytest.raises(PayloadError, match="in clear text") as caught:
        adapter(name).build_payload(mapped, context())
    message = str(caught.value)
    assert message.startswith(f"{field} would send"), message
    assert home in message
    assert "a@example.com" not in message and "4915112345678" not in message  # never echoed


# Fields the adapters send as they are (identifiers such as cookies), filled by a mapping that
# falls back to an address (``context.fbp || user_data.email``).
CLEAR_IDENTIFIERS = [
    ("meta_capi", "user_data.fbp", "user_data.em"),
    ("meta_capi", "user_data.client_user_agent", "user_data.em"),
    ("tiktok", "user.ttp", "user.email"),
    ("ga4", "user_agent", "user_data.sha256_email_address"),
]


@pytest.mark.parametrize(("name", "target", "home"), CLEAR_IDENTIFIERS)
def test_an_address_in_a_clear_text_identifier_is_refused(
    name: str, target: str, home: str
) -> None:
    mapped = mapped_event(name)
    put(mapped, target, "Ada@Example.com")
    with pytest.raises(PayloadError, match=f"^{target} would send an e-mail address") as caught:
        adapter(name).build_payload(mapped, context())
    assert home in str(caught.value)


@pytest.mark.parametrize("kind", ["RETRACTION", "RESTATEMENT", "ENHANCEMENT"])
def test_google_ads_refuses_an_address_as_the_order_id_of_an_adjustment(kind: str) -> None:
    mapped = mapped_event("google_ads")
    mapped.update(adjustmentType=kind, orderId="a@example.com", restatementValue={})
    if kind == "RESTATEMENT":
        mapped["restatementValue"] = {"adjustedValue": 10}
    with pytest.raises(PayloadError, match=r"^orderId would send an e-mail address"):
        adapter("google_ads").build_payload(mapped, context(kind))


def test_google_ads_refuses_an_address_as_the_user_agent_of_an_enhancement() -> None:
    mapped = mapped_event("google_ads")
    mapped.update(adjustmentType="ENHANCEMENT", userAgent="a@example.com")
    with pytest.raises(PayloadError, match=r"^userAgent would send an e-mail address"):
        adapter("google_ads").build_payload(mapped, context("ENHANCEMENT"))


def test_fields_of_a_whole_object_named_like_personal_data_are_refused() -> None:
    """``custom_data: properties`` passes on what the shop put there, under any name."""
    mapped = mapped_event("meta_capi")
    put(mapped, "custom_data.billing_first_name", "Ada")
    with pytest.raises(PayloadError, match=r"^custom_data\.billing_first_name would send"):
        adapter("meta_capi").build_payload(mapped, context())


def test_ga4_leaves_out_a_user_id_that_is_an_email_address_and_sends_the_event() -> None:
    mapped = mapped_event("ga4")
    mapped["user_id"] = "Ada@Example.com"
    payload = adapter("ga4").build_payload(mapped, context())
    assert "user_id" not in payload["request"]
    assert "Ada@Example.com" not in repr(payload)
    mapped["user_id"] = "cust_42"
    assert adapter("ga4").build_payload(mapped, context())["request"]["user_id"] == "cust_42"


def test_flags_and_file_names_under_such_names_are_passed_on() -> None:
    mapped = mapped_event("meta_capi")
    put(mapped, "custom_data.mobile", True)
    put(mapped, "custom_data.phone", False)
    put(mapped, "custom_data.banner", "hero@2x.jpg")
    payload = adapter("meta_capi").build_payload(mapped, context())
    assert payload["custom_data"]["banner"] == "hero@2x.jpg"


def test_meta_refuses_the_whole_user_data_of_the_event() -> None:
    mapped = mapped_event("meta_capi")
    mapped["user_data"] = {"email": "a@example.com", "client_user_agent": "Mozilla/5.0"}
    with pytest.raises(PayloadError, match=r"^user_data\.email would send an e-mail address"):
        adapter("meta_capi").build_payload(mapped, context())


def test_a_digest_under_a_name_of_personal_data_is_passed_on() -> None:
    mapped = mapped_event("meta_capi")
    put(mapped, "custom_data.email", DIGEST)
    payload = adapter("meta_capi").build_payload(mapped, context())
    assert payload["custom_data"]["email"] == DIGEST


def test_a_url_holding_an_address_in_its_query_is_passed_on() -> None:
    """The page's own URL is the page's: an address in its query string is not refused here."""
    mapped = mapped_event("tiktok")
    put(mapped, "page.url", "https://shop.example/thanks?email=a@example.com")
    payload = adapter("tiktok").build_payload(mapped, context())
    assert payload["page"]["url"].endswith("a@example.com")


@pytest.mark.parametrize("name", ["webhook", "log"])
def test_our_own_kinds_of_destination_send_what_they_are_given(name: str) -> None:
    mapped = {"user_data": {"email": "a@example.com"}}
    payload = adapter(name).build_payload(mapped, context())
    assert payload["user_data"]["email"] == "a@example.com"


def test_each_adapters_hashed_fields_are_the_fields_it_hashes() -> None:
    """hashed_fields (what `tagrelay check` allows personal data in) matches the adapters."""
    for name in AD_PLATFORMS:
        cls = registry.registry()[name]
        assert set(cls.personal_homes.values()) <= cls.hashed_fields, name
        for target in cls.hashed_fields:
            mapped = mapped_event(name)
            put(mapped, target, "Ada@Example.com")
            kind = None
            if name == "google_ads" and ".addressInfo." in target:
                kind = mapped["adjustmentType"] = "ENHANCEMENT"  # click conversions send none
            payload = adapter(name).build_payload(mapped, context(kind) if kind else context())
            sent = _at(payload, target, name)
            assert (sent is None and kind is None) or _all_digests(sent), (name, target, sent)


def test_google_ads_hashes_the_address_fields_it_names() -> None:
    mapped = mapped_event("google_ads")
    mapped["adjustmentType"] = "ENHANCEMENT"
    for target in ("hashedFirstName", "hashedLastName", "hashedStreetAddress"):
        put(mapped, f"userIdentifiers.addressInfo.{target}", "Ada Lovelace")
    put(mapped, "userIdentifiers.addressInfo.countryCode", "DE")
    payload = adapter("google_ads").build_payload(mapped, context("ENHANCEMENT"))
    assert "Ada" not in repr(payload) and "Lovelace" not in repr(payload)


def _at(payload: dict[str, Any], target: str, name: str) -> Any:
    """The value a payload sends for a mapping target (None if it sends none)."""
    node: Any = payload["request"] if name == "ga4" else payload
    if name == "google_ads":
        node = payload["row"]
    for key in target.split("."):
        if isinstance(node, list):  # Google Ads: one identifier per entry
            node = next((n for n in node if isinstance(n, dict) and key in n), None)
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _all_digests(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return all(isinstance(v, str) and len(v) == 64 and int(v, 16) >= 0 for v in items)
