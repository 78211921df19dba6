"""Consent: the three outcomes, what anonymous forwarding strips, defaults and reasons."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from destinations import registry
from destinations.base import Destination
from destinations.normalize import sha256_hex
from engine.consent import (
    TRACKING_PARAMS,
    ConsentState,
    Requirement,
    Verdict,
    strip_identifiers,
    truncate_ip,
)
from engine.event import normalize, readable_ip
from engine.rules import compile_container

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
ADS = Requirement(frozenset({"ad_storage", "ad_user_data"}))
ANALYTICS = Requirement(frozenset({"ad_storage"}), frozenset({"analytics_storage"}))


def verdict(requirement: Requirement, consent: dict[str, str], defaults: Any = None) -> Any:
    return ConsentState.of(consent, defaults or {}).decide(requirement)


def test_every_required_purpose_granted_forwards_the_full_event() -> None:
    result = verdict(ADS, {"ad_storage": "granted", "ad_user_data": "granted"})

    assert result.verdict is Verdict.FULL
    assert result.reason == "consent granted (requires ad_storage, ad_user_data)"


def test_a_tag_that_requires_nothing_always_forwards() -> None:
    result = verdict(Requirement(), {})

    assert (result.verdict, result.reason) == (Verdict.FULL, "consent granted (requires nothing)")


def test_a_denied_purpose_blocks_and_is_named() -> None:
    result = verdict(ADS, {"ad_storage": "granted", "ad_user_data": "denied"})

    assert (result.verdict, result.reason) == (Verdict.BLOCKED, "consent denied: ad_user_data")


def test_a_missing_signal_counts_as_denied_and_the_reason_says_so() -> None:
    result = verdict(ADS, {"ad_storage": "granted"})

    assert result.verdict is Verdict.BLOCKED
    assert result.reason == "consent denied: ad_user_data (no signal)"


def test_analytics_only_consent_forwards_anonymously_for_tags_that_allow_it() -> None:
    result = verdict(ANALYTICS, {"analytics_storage": "granted", "ad_storage": "denied"})

    assert result.verdict is Verdict.ANONYMOUS
    assert result.reason == "forwarded without identifiers: denied ad_storage"


def test_analytics_only_consent_blocks_tags_without_an_anonymous_mode() -> None:
    assert verdict(ADS, {"analytics_storage": "granted"}).verdict is Verdict.BLOCKED


def test_no_consent_at_all_blocks_even_the_anonymous_mode() -> None:
    assert verdict(ANALYTICS, {}).verdict is Verdict.BLOCKED


def test_a_tag_with_only_anonymous_purposes_never_sends_identifiers() -> None:
    anonymous_only = Requirement(anonymous=frozenset({"analytics_storage"}))

    granted = verdict(anonymous_only, {"analytics_storage": "granted", "ad_user_data": "granted"})
    nothing = verdict(anonymous_only, {})

    assert granted.verdict is Verdict.ANONYMOUS
    assert granted.reason == "forwarded without identifiers: the tag is anonymous only"
    assert nothing.verdict is Verdict.BLOCKED
    assert nothing.reason == "consent denied: analytics_storage (no signal)"


def test_container_defaults_fill_in_missing_signals_but_never_override_the_event() -> None:
    defaults = {"ad_storage": "granted", "ad_user_data": "granted"}

    assert verdict(ADS, {}, defaults).verdict is Verdict.FULL
    assert verdict(ADS, {"ad_user_data": "denied"}, defaults).verdict is Verdict.BLOCKED


def test_a_purpose_denied_by_default_is_told_apart_from_one_the_event_denies() -> None:
    defaults = {"ad_storage": "denied", "ad_user_data": "granted"}

    assert verdict(ADS, {}, defaults).reason == "consent denied: ad_storage (no signal)"
    assert verdict(ADS, {"ad_storage": "denied"}, defaults).reason == "consent denied: ad_storage"


# -- stripping --------------------------------------------------------------------------------

FULL_EVENT: dict[str, Any] = {
    "event_name": "purchase",
    "event_id": "o1",
    "visitor_id": "vis_1",
    "user_id": "user_1",
    "user_data": {"email": "a@example.com"},
    "properties": {"value": 10},
    "context": {
        "ip": "203.0.113.7",
        "user_agent": "UA",
        "gclid": "g1",
        "fbclid": "f1",
        "fbc": "fb.1.1.f1",
        "fbp": "fb.1.1.123",
        "ttclid": "t1",
        "msclkid": "m1",
        "page_url": "https://shop.example/p?gclid=g1&color=red&FBCLID=f1&utm_source=x",
        "referrer": "https://search.example/?q=shoes&msclkid=m1",
    },
}


def test_stripping_removes_every_identifier_and_keeps_the_rest() -> None:
    stripped = strip_identifiers(FULL_EVENT)

    assert "user_data" not in stripped
    assert "user_id" not in stripped
    assert stripped["context"] == {
        "ip": "203.0.113.0",
        "user_agent": "UA",
        "page_url": "https://shop.example/p?color=red&utm_source=x",
        "referrer": "https://search.example/?q=shoes",
    }
    assert stripped["properties"] == {"value": 10}
    assert stripped["event_id"] == "o1"


def test_stripping_removes_click_ids_and_cookies_in_any_spelling() -> None:
    context = {"GCLID": "g", "Fbclid": "f", "FBP": "fb.1.1.2", "TTCLID": "t", "scCid": "s"}

    stripped = strip_identifiers({"context": {**context, "Campaign": "spring"}})

    assert stripped["context"] == {"Campaign": "spring"}


def test_stripping_removes_context_fields_named_like_a_person_or_personal_data() -> None:
    # Other context keys are taken as sent; these reached analytics-only payloads in clear text.
    context = {
        "email": "ada@example.com",
        "customerPhone": "+4915112345678",
        "First_Name": "Ada",
        "user_id": "u1",
        "externalId": "c42",
        "customer_id": "c42",
        "billing_address": "1 Main St",
        "ip_address": "203.0.113.7",
        "member-id": "m1",
        "Username": "ada",
        "zip": "10115",
        "customer": {
            "email": "ada@example.com",
            "tier": "gold",
            "contacts": [{"phone": "+49", "role": "billing"}],
        },
        "locale": "de-DE",
        "session_id": "s1",
        "ga_client_id": "1.2",
        "screen": "1920x1080",
    }

    stripped = strip_identifiers({"context": context})

    assert stripped["context"] == {
        "customer": {"tier": "gold", "contacts": [{"role": "billing"}]},  # at any depth
        "locale": "de-DE",
        "session_id": "s1",
        "ga_client_id": "1.2",
        "screen": "1920x1080",
    }


def test_stripping_removes_ad_cookies_ips_and_advertising_ids_under_other_names() -> None:
    # These reached an analytics-only webhook payload as sent: the platforms' cookies under
    # their cookie names (`_fbp` holds what `fbp` holds; `_gcl_aw` and `_gac_*` the gclid), a
    # raw IP under a name other than `ip`, and mobile advertising IDs.
    context = {
        "ip": "203.0.113.7",
        "_fbp": "fb.1.1.123",
        "_FBC": "fb.1.1.f1",
        "_ttp": "t1",
        "_gcl_aw": "GCL.1.g1",
        "gcl_dc": "GCL.1.g2",
        "_gac_UA-1-1": "1.1.g1",
        "_uetmsclkid": "_uet-m1",
        "_rdt_uuid": "1.2",
        "client_ip": "203.0.113.8",
        "clientIP": "203.0.113.9",
        "ip_v6": "2001:db8::1",
        "x_forwarded_for": "203.0.113.10, 10.0.0.1",
        "X-Real-IP": "203.0.113.11",
        "remote_addr": "203.0.113.12",
        "forwarded": "for=203.0.113.13",
        "idfa": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
        "gaid": "38400000-8cf0-11bd-b23e-10b96e40000d",
        "advertisingId": "a1",
        "device": {"ip": "203.0.113.14", "type": "mobile"},
        "user_agent": "UA",
        "ga_client_id": "1.2",
        "_ga": "GA1.1.1.2",
        "description": "spring sale",
        "shipping_method": "express",
        "vip": True,
    }

    stripped = strip_identifiers({"context": context})

    assert stripped["context"] == {
        "ip": "203.0.113.0",
        "device": {"type": "mobile"},
        "user_agent": "UA",
        "ga_client_id": "1.2",
        "_ga": "GA1.1.1.2",  # GA's client ID, which analytics needs, as ga_client_id
        "description": "spring sale",
        "shipping_method": "express",
        "vip": True,
    }


def test_stripping_removes_click_and_recipient_ids_under_their_url_parameter_names() -> None:
    # Stripped from a URL's query, these went out whole as fields of their own.
    context = {"yclid": "y1", "irclickid": "i1", "_kx": "k1", "MC_EID": "m1", "igshid": "s1"}

    stripped = strip_identifiers({"context": {**context, "utm_source": "newsletter"}})

    assert stripped["context"] == {"utm_source": "newsletter"}


def test_stripping_removes_tracking_parameters_from_every_url_in_context() -> None:
    # Only page_url and referrer were cleaned: the same click went out in any other URL field.
    context = {
        "landing_url": "https://shop.example/?gclid=G1&utm_source=ads",
        "page": {"url": "https://shop.example/p?fbclid=F1", "search": "?ttclid=T1&q=shoes"},
        "history": ["https://shop.example/#/a?msclkid=M1", "https://shop.example/b"],
        "broken": "http://[shop.example/?gclid=G2",
        "note": "50% off? yes",
    }

    stripped = strip_identifiers({"context": context})

    assert stripped["context"] == {
        "landing_url": "https://shop.example/?utm_source=ads",
        "page": {"url": "https://shop.example/p", "search": "?q=shoes"},
        "history": ["https://shop.example/#/a", "https://shop.example/b"],
        "note": "50% off? yes",
    }


@pytest.mark.parametrize("name", ["IP", "Ip", "iP"])
def test_stripping_removes_an_ip_under_ip_in_another_case(name: str) -> None:
    # Only context.ip is truncated: "IP" went out whole, the raw address of the person.
    stripped = strip_identifiers({"context": {"ip": "203.0.113.7", name: "198.51.100.9"}})

    assert stripped["context"] == {"ip": "203.0.113.0"}


def test_stripping_does_not_change_the_stored_event() -> None:
    before = repr(FULL_EVENT)

    strip_identifiers(FULL_EVENT)

    assert repr(FULL_EVENT) == before


@pytest.mark.parametrize(
    ("ip", "truncated"),
    [
        ("203.0.113.77", "203.0.113.0"),
        (" 198.51.100.1 ", "198.51.100.0"),
        ("2001:db8:abcd:1234:5678::1", "2001:db8:abcd::"),
        ("2001:db8:abcd:ffff:ffff:ffff:ffff:ffff", "2001:db8:abcd::"),
        ("::ffff:203.0.113.7", "203.0.113.0"),
        ("::FFFF:203.0.113.7", "203.0.113.0"),
        ("::ffff:cb00:7107", "203.0.113.0"),
        ("0:0:0:0:0:ffff:203.0.113.7", "203.0.113.0"),
        ("2002:cb00:7107::1", "2002:cb00:7100::"),
        ("2002:cb00:7107:1234:5678::1", "2002:cb00:7100::"),
        ("not an ip", None),
        ("", None),
    ],
)
def test_ips_are_truncated_to_a_24_or_a_48(ip: str, truncated: str | None) -> None:
    assert truncate_ip(ip) == truncated


def test_an_ipv4_mapped_address_is_truncated_as_the_ipv4_address_it_is() -> None:
    # How a server listening on [::] sees every IPv4 client; it used to become "::".
    assert truncate_ip("::ffff:203.0.113.7") == "203.0.113.0"


def test_a_6to4_address_keeps_no_more_than_the_24_of_its_embedded_ipv4() -> None:
    client = ipaddress.IPv4Address("203.0.113.7")
    six_to_four = ipaddress.IPv6Address((0x2002 << 112) | (int(client) << 80) | 0x1234_5678)

    truncated = ipaddress.IPv6Address(truncate_ip(str(six_to_four)))

    assert truncated.sixtofour == ipaddress.IPv4Address("203.0.113.0")


def test_a_teredo_address_loses_the_clients_address_with_its_last_80_bits() -> None:
    # RFC 4380: server IPv4 in bits 32-64, the client's (inverted) in the last 32 bits.
    teredo = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert teredo.teredo is not None
    _server, client = teredo.teredo

    truncated = ipaddress.IPv6Address(truncate_ip(str(teredo)))

    assert truncated == ipaddress.IPv6Address("2001:0:4136::")
    assert truncated.teredo is not None and truncated.teredo[1] != client
    assert int(truncated) & ((1 << 80) - 1) == 0


@pytest.mark.parametrize(
    ("ip", "plain"),
    [
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("::ffff:cb00:7107", "203.0.113.7"),
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::ffff", "2001:db8::ffff"),
        ("2002:cb00:7107::1", "2002:cb00:7107::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        (" 203.0.113.7, 10.0.0.1", "203.0.113.7"),  # a copied X-Forwarded-For: the client
        # Only the first entry is the client; the later ones are proxies, never read instead.
        ("unknown, 203.0.113.7", None),
        (", 203.0.113.7", None),
        ("[2001:db8::1]:443, 10.0.0.1", "2001:db8::1"),
        ("203.0.113.7:51234, 10.0.0.1", "203.0.113.7"),
        ("203.0.113.7:51234", "203.0.113.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        # A zone is any text (an e-mail address, even): it names no part of the address.
        ("2001:db8::1%ada@example.com", "2001:db8::1"),
        ("[fe80::1%eth0]:443", "fe80::1"),
        ("::ffff:203.0.113.7, 10.0.0.1", "203.0.113.7"),
        ("not an ip", None),
        ("::ffff:not", None),
        ("203.0.113.256", None),
        ("010.0.0.1", None),  # leading zeros: octal to some readers, refused by ipaddress
        ("", None),
    ],
)
def test_an_ip_is_read_as_the_address_it_names_or_as_none(ip: str, plain: str | None) -> None:
    assert readable_ip(ip) == plain


def test_urls_without_click_ids_are_left_as_they_were() -> None:
    event = {"context": {"page_url": "https://shop.example/p", "referrer": None}}

    assert strip_identifiers(event)["context"] == event["context"]


def anonymous_url(url: str) -> str | None:
    context = strip_identifiers({"context": {"page_url": url}})["context"]
    found: str | None = context.get("page_url")
    return found


GL = "1*1x2y3z*_gcl_aw*R0NMLjE3MzIxMDAwMDAuR0NMSUQtU0VDUkVU*_ga*MTIzNDU2Nzg5MC4xNzMyMTAwMDAw"


@pytest.mark.parametrize(
    "query",
    [
        f"_gl={GL}",  # the gtag linker: a base64 gclid (_gcl_aw) and the _ga cookie
        "srsltid=AfmBOoSECRETCLICK",  # Google Merchant Center auto-tagging
        "_GL=x",
        "SrSltId=x",
        "%5Fgl=x",  # a percent-escaped key is the same key
    ],
)
def test_the_google_linker_and_shopping_click_ids_are_stripped(query: str) -> None:
    assert anonymous_url(f"https://shop.example/?{query}") == "https://shop.example/"


@pytest.mark.parametrize("param", sorted(TRACKING_PARAMS))
def test_every_tracking_parameter_is_stripped_in_any_case(param: str) -> None:
    url = f"https://shop.example/p?{param}=SECRET&color=red&{param.upper()}=SECRET2"

    assert anonymous_url(url) == "https://shop.example/p?color=red"


def test_the_deny_list_holds_the_click_linker_and_recipient_ids_it_promises() -> None:
    promised = (
        "_gl srsltid gclid gclsrc gbraid wbraid dclid msclkid twclid li_fat_id ScCid epik "
        "rdt_cid mc_eid _hsenc _hsmi yclid irclickid igshid _kx ttclid fbclid"
    )
    assert {p.lower() for p in promised.split()} <= TRACKING_PARAMS
    assert not any(p.startswith("utm_") for p in TRACKING_PARAMS)


def test_campaign_parameters_and_ordinary_ones_stay_exactly_as_written() -> None:
    url = (
        "https://shop.example/p?utm_source=news&utm_medium=email&utm_campaign=spring%20sale"
        "&gad_source=1&mc_cid=c1&q=a+b&flag&gclid=G1&_hsenc=p2&id=5"
    )

    assert anonymous_url(url) == (
        "https://shop.example/p?utm_source=news&utm_medium=email&utm_campaign=spring%20sale"
        "&gad_source=1&mc_cid=c1&q=a+b&flag&id=5"
    )


@pytest.mark.parametrize(
    ("url", "stripped"),
    [
        (f"https://shop.example/p#_gl={GL}", "https://shop.example/p"),
        ("https://shop.example/#section&_gl=x", "https://shop.example/#section"),
        ("https://shop.example/#/landing?gclid=G1&tab=2", "https://shop.example/#/landing?tab=2"),
        ("https://shop.example/#/landing?fbclid=F1", "https://shop.example/#/landing"),
        ("https://shop.example/p?a=1#reviews", "https://shop.example/p?a=1#reviews"),
        ("https://shop.example/p?a=1&amp;gclid=G1", "https://shop.example/p?a=1"),
    ],
)
def test_tracking_parameters_in_the_fragment_are_stripped_too(url: str, stripped: str) -> None:
    assert anonymous_url(url) == stripped


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1?gclid=G1",
        "http://[shop.example/landing?gclid=abc",
        "https://[shop.example]/?gclid=abc",
        "https://shop\uff03example/?gclid=abc",  # a host that NFKC turns into a "#"
    ],
)
def test_a_url_that_cannot_be_parsed_is_dropped_from_the_anonymous_view(url: str) -> None:
    event = {"context": {"page_url": url, "referrer": url, "user_agent": "UA"}}

    assert strip_identifiers(event)["context"] == {"user_agent": "UA"}


# -- through the rules ------------------------------------------------------------------------

RULES = """
settings:
  consent_defaults: {analytics_storage: granted}
destinations:
  hook: {type: webhook, url: "https://hook.example/in"}
triggers:
  all: {event: "*"}
tags:
  - name: ads
    trigger: all
    destination: hook
    consent: [ad_storage, ad_user_data]
  - name: analytics
    trigger: all
    destination: hook
    consent: {require: [ad_storage], anonymous: [analytics_storage]}
  - name: anonymous_only
    trigger: all
    destination: hook
    consent: {anonymous: [analytics_storage]}
"""


def test_the_three_outcomes_through_compiled_rules(
    write_rules: Callable[..., Path],
) -> None:
    rules, _ = compile_container(write_rules(RULES), {})
    assert rules is not None

    def run(consent: dict[str, Any]) -> dict[str, Any]:
        event = normalize({**FULL_EVENT, "consent": consent}, NOW)
        return {d.tag: d for d in rules.evaluate(event, now=NOW)}

    full = run({"ad_storage": True, "ad_user_data": True})
    analytics_only = run({"ad_storage": False, "ad_user_data": False})
    nothing = run({"ad_storage": False, "analytics_storage": False})

    assert full["ads"].fired and full["analytics"].fired
    assert not full["analytics"].anonymous
    assert full["analytics"].payload is not None
    assert full["analytics"].payload["user_id"] == "user_1"

    assert not analytics_only["ads"].fired
    assert analytics_only["ads"].consent == "consent denied: ad_storage, ad_user_data"
    anon = analytics_only["analytics"]
    assert anon.fired and anon.anonymous
    assert anon.payload is not None
    assert "user_id" not in anon.payload
    assert "user_data" not in anon.payload
    assert anon.payload["context"]["ip"] == "203.0.113.0"
    assert "gclid" not in anon.payload["context"]

    assert not nothing["ads"].fired and not nothing["analytics"].fired
    # Why neither way was open: the full copy, then the copy without identifiers.
    assert nothing["analytics"].reason == (
        "consent denied: ad_storage; without identifiers: analytics_storage"
    )


def test_an_anonymous_only_tag_strips_identifiers_and_needs_its_purposes(
    write_rules: Callable[..., Path],
) -> None:
    rules, _ = compile_container(write_rules(RULES.replace("analytics_storage: granted", "")), {})
    assert rules is not None

    def run(consent: dict[str, Any]) -> Any:
        event = normalize({**FULL_EVENT, "consent": consent}, NOW)
        return {d.tag: d for d in rules.evaluate(event, now=NOW)}["anonymous_only"]

    everything = run({p: "granted" for p in ("ad_storage", "ad_user_data", "analytics_storage")})
    no_signal = run({})

    assert everything.fired and everything.anonymous
    assert everything.payload is not None
    assert "user_data" not in everything.payload and "user_id" not in everything.payload
    assert everything.payload["context"]["ip"] == "203.0.113.0"
    assert not no_signal.fired
    assert no_signal.reason == "consent denied: analytics_storage (no signal)"


# A tag that copies identifiers out of properties into a platform's own identifier fields:
# its copy without identifiers must carry none of them all the same.
IDENTIFIERS_MAPPED_RULES = """
destinations:
  meta: {type: meta_capi, pixel_id: "123", access_token: meta-token}
  ga4: {type: ga4, measurement_id: G-ABC, api_secret: ga4-secret}
  gads: {type: google_ads, customer_id: "123-456-7890", conversion_action: "111",
         developer_token: dt, client_id: ci, client_secret: cs, refresh_token: rt}
  tiktok: {type: tiktok, pixel_code: CABC, access_token: tiktok-token}
triggers:
  all: {event: "*"}
tags:
  - name: meta
    trigger: all
    destination: meta
    event_name: Purchase
    consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}
    mapping: {user_data.em: properties.crm.email, user_data.external_id: properties.crm.id,
              user_data.fbp: properties.crm.fbp, fbclid: properties.crm.fbclid}
  - name: ga4
    trigger: all
    destination: ga4
    event_name: purchase
    consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}
    mapping: {user_id: properties.crm.id,
              user_data.sha256_email_address: properties.crm.email}
  - name: gads_sale
    trigger: all
    destination: gads
    consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}
    mapping: {gclid: properties.crm.gclid, userIdentifiers.hashedEmail: properties.crm.email}
  - name: gads_refund
    trigger: all
    destination: gads
    event_name: RETRACTION
    consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}
    mapping: {orderId: null, gclidDateTimePair.gclid: properties.crm.gclid,
              gclidDateTimePair.conversionDateTime: timestamp}
  - name: tiktok
    trigger: all
    destination: tiktok
    event_name: CompletePayment
    consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}
    mapping: {user.email: properties.crm.email, user.external_id: properties.crm.id,
              user.ttclid: properties.crm.ttclid, page.url: properties.crm.landing}
"""
CRM = {
    "email": "ada@example.com",
    "id": "cust_42",
    "fbp": "fb.1.1700000000000.7",
    "fbclid": "FbClickId1",
    "gclid": "GoogleClickId1",
    "ttclid": "TikTokClickId1",
    "landing": "https://shop.example/?ttclid=TikTokClickId1",
}


def test_a_copy_without_identifiers_carries_none_that_a_mapping_copies_from_properties(
    write_rules: Callable[..., Path],
) -> None:
    rules, _ = compile_container(write_rules(IDENTIFIERS_MAPPED_RULES), {})
    assert rules is not None
    event = normalize(
        {
            "event_name": "purchase",
            "event_id": "o1",
            "visitor_id": "v1",
            "properties": {"order_id": "o1", "value": 10, "currency": "EUR", "crm": CRM},
            "context": {
                "ip": "203.0.113.7",
                "user_agent": "UA",
                "page_url": "https://shop.example/thanks",
            },
            "consent": {"analytics_storage": "granted"},
        },
        NOW,
    )

    decisions = {d.tag: d for d in rules.evaluate(event, now=NOW)}

    sent = {tag: d.payload for tag, d in decisions.items() if d.fired}
    assert all(d.anonymous for d in decisions.values())
    assert sent["meta"]["user_data"] == {
        "client_ip_address": "203.0.113.0",
        "client_user_agent": "UA",
    }
    assert "user_id" not in sent["ga4"]["request"] and "user_data" not in sent["ga4"]["request"]
    assert sent["tiktok"]["user"] == {"ip": "203.0.113.0", "user_agent": "UA"}
    # Google Ads: a conversion or a retraction by its gclid needs the click ID it may not send.
    assert "gads_sale" not in sent and "gads_refund" not in sent
    assert "needs gclid" in decisions["gads_sale"].reason
    # (The page URL is sent as the tag maps it, the author's choice; its ttclid is not read.)
    text = json.dumps({**sent, "tiktok": {**sent["tiktok"], "page": None}})
    for value in CRM.values():
        assert value not in text
    assert sha256_hex(CRM["email"]) not in text and sha256_hex(CRM["id"]) not in text


DEFAULTS_RULES = """
settings:
  consent_defaults: {ad_user_data: denied, ad_personalization: granted}
destinations:
  ga4: {type: ga4, measurement_id: G-ABC, api_secret: ga4-secret}
  gads: {type: google_ads, customer_id: "123-456-7890", conversion_action: "111",
         developer_token: dt, client_id: ci, client_secret: cs, refresh_token: rt}
  hook: {type: webhook, url: "https://crm.example/in"}
triggers:
  all: {event: "*"}
tags:
  - {name: ga4, trigger: all, destination: ga4, event_name: sign_up,
     consent: [analytics_storage]}
  - {name: gads, trigger: all, destination: gads, consent: [ad_storage]}
  - {name: hook, trigger: all, destination: hook}
  - {name: ga4_anonymous, trigger: all, destination: ga4, event_name: sign_up,
     consent: {anonymous: [analytics_storage]}}
"""


@pytest.mark.parametrize(
    ("stated", "ad_user_data", "ad_personalization"),
    [
        ({}, "DENIED", "GRANTED"),  # the container's defaults
        ({"ad_user_data": "granted"}, "GRANTED", "GRANTED"),  # what the event states wins
        ({"ad_personalization": False}, "DENIED", "DENIED"),
    ],
)
def test_the_platforms_consent_fields_take_the_containers_defaults_for_what_the_event_leaves_out(
    write_rules: Callable[..., Path],
    stated: dict[str, Any],
    ad_user_data: str,
    ad_personalization: str,
) -> None:
    # The tags decided with the defaults, but GA4 and Google Ads were sent the event's consent
    # as it came: no field for a purpose it left out, whatever the container declared for it.
    rules, _ = compile_container(write_rules(DEFAULTS_RULES), {})
    assert rules is not None
    event = normalize(
        {
            "event_name": "sign_up",
            "event_id": "e1",
            "visitor_id": "v1",
            "context": {"gclid": "gclid-1"},
            "user_data": {"email": "a@example.com"},
            "consent": {"ad_storage": "granted", "analytics_storage": "granted", **stated},
        },
        NOW,
    )

    sent = {d.tag: d.payload for d in rules.evaluate(event, now=NOW) if d.fired}

    assert sent["ga4"]["request"]["consent"] == {
        "ad_user_data": ad_user_data,
        "ad_personalization": ad_personalization,
    }
    assert sent["gads"]["row"]["consent"] == {"adUserData": ad_user_data}
    assert sent["hook"]["consent"]["ad_user_data"] == ad_user_data.lower()
    # A copy without identifiers still says DENIED, whatever the defaults.
    assert sent["ga4_anonymous"]["request"]["consent"] == {
        "ad_user_data": "DENIED",
        "ad_personalization": "DENIED",
    }
    # The event (as stored) keeps the purposes it stated, and only those.
    assert set(event["consent"]) == {"ad_storage", "analytics_storage", *stated}


def test_the_defaults_a_mapping_reads_are_copied_for_each_event(
    write_rules: Callable[..., Path],
) -> None:
    rules, _ = compile_container(write_rules(DEFAULTS_RULES), {})
    assert rules is not None
    first, second = (
        normalize({"event_name": "x", "event_id": f"e{i}", "consent": {}}, NOW) for i in (1, 2)
    )
    one = next(d for d in rules.evaluate(first, now=NOW) if d.tag == "hook").payload
    one["consent"]["ad_user_data"] = "granted"  # an adapter that edits what it was handed

    other = next(d for d in rules.evaluate(second, now=NOW) if d.tag == "hook").payload

    assert other["consent"]["ad_user_data"] == "denied"
    assert first["consent"] == {}


class HashingPlugin(Destination):
    """A third-party plugin that names its hashed targets and keeps the default
    ``build_payload``, which passes the mapped values on (it reads no ``ctx.restricted``)."""

    name = "hashing_plugin"
    hashed_fields = frozenset({"user.email_sha256", "user.phone_sha256"})
    personal_homes = {"email": "user.email_sha256", "phone": "user.phone_sha256"}
    default_mapping = {"value": "properties.value", "user.phone_sha256": "user_data.phone"}

    def build_request(self, items: Any, ctx: Any) -> Any:
        raise NotImplementedError


def test_a_plugins_copy_without_identifiers_carries_none_of_its_hashed_fields(
    write_rules: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mapping from properties filled the plugin's identifier fields of an anonymous copy:
    # the README's "stay empty whatever a mapping puts there" held for the built-ins alone.
    monkeypatch.setattr(registry, "registry", lambda: {"hashing_plugin": HashingPlugin})
    rules, problems = compile_container(
        write_rules(
            """
            destinations:
              hp: {type: hashing_plugin}
            triggers:
              all: {event: "*"}
            tags:
              - name: hp
                trigger: all
                destination: hp
                consent: {require: [ad_storage], anonymous: [analytics_storage]}
                mapping: {user.email_sha256: properties.crm.email, user.tier: properties.tier}
            """
        ),
        {},
    )
    assert rules is not None, problems
    crm = {"email": "ada@example.com"}
    event = normalize(
        {
            "event_name": "purchase",
            "properties": {"value": 10, "tier": "gold", "crm": crm},
            "consent": {"analytics_storage": "granted"},
        },
        NOW,
    )

    (decision,) = rules.evaluate(event, now=NOW)

    assert decision.fired and decision.anonymous
    assert decision.payload is not None
    assert decision.payload["user"] == {"tier": "gold"}
    assert decision.payload["value"] == 10
    assert event["properties"]["crm"] == {"email": "ada@example.com"}  # the event is unchanged
