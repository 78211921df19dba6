"""End to end: a real ``tagrelay serve`` (gunicorn, 2 workers, delivery on) and four platforms.

The server runs as a subprocess on a rules container written into ``tmp_path``; every
destination's ``endpoint`` points at a loopback emulator started in this process (Meta CAPI,
GA4 Measurement Protocol, Google Ads API with its OAuth token endpoint, TikTok Events API).
Events go in over HTTP at ``/v1/track``; the assertions are about what each platform received.

Expected hashes are the documented vectors of reference/platforms.md §7, never computed here:
the same e-mail address and phone number hash differently for Meta, Google and TikTok.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from destinations.testkit.ga4 import GA4Emulator
from destinations.testkit.google_ads import GoogleAdsEmulator
from destinations.testkit.meta import MetaEmulator
from destinations.testkit.server import LoopbackServer, Request
from destinations.testkit.tiktok import TikTokEmulator
from tests.support.server import TagrelayServer

pytestmark = pytest.mark.slow

KEY = "sk_e2e_platforms_0123456789"
WORKERS = 2
WAIT = 30.0  # bound of every poll for deliveries
QUIET = 1.5  # after the expected requests: long enough for anything extra to show up

# -- the person and the click (platforms.md §7 vectors) ------------------------------------------

EMAIL = "  John.Doe@Gmail.com "  # a Gmail address with a dot, spaces around it
EMAIL_META_TIKTOK = "375320dd9ae7ed408002f3768e16cb5f28c861062fd50dff9a3bff62e9dce4ef"  # §7.2
EMAIL_GOOGLE = "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"  # §7.2 gmail
PHONE = "+1 (650) 555-1212"
PHONE_META = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"  # 16505551212
PHONE_E164 = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"  # +16505551212
FIRST_NAME_HASH = "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"  # " Mary "
LAST_NAME_HASH = "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"  # O'Brien
CITY_META = "e6a4de398edea64e0e057033d684bebe76c975d00b1c919471703d318fb05d7f"  # southsanfrancisco
STATE_META = "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"  # ca
ZIP_META = "1794327a4d443904421f5ca1f3d72d0a62ba2f0770d80755ec2220fc0efb052e"  # 94035
COUNTRY_META = "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"  # us
DOB_META = "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c"  # 19970216
GENDER_META = "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111"  # f
EXTERNAL_ID_HASH = "6d894aa3ee802549d7f340e7c1cf0d1c1cb14cd84f768d92ffaa6785337c4997"  # user-42

FBCLID = "IwAR2xYz_AbCdEf-GhIjKlMnOp"  # case-sensitive: must reach Meta unchanged
TTCLID = "E.C.P.CqAbCdEfGhIjKl"
GCLID = "Cj0KCQiA-Sale_1"
LEAD_GCLID = "Cj0KCQiA-Lead_1"
IP = "203.0.113.7"
UA = "Mozilla/5.0 (X11; Linux x86_64) tagrelay-e2e"
FBP = "fb.1.1732100000000.1234567890"
TTP = "2Tk3example-ttp"

GRANTED = {
    "ad_storage": "granted",
    "analytics_storage": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "denied",
}

# -- the container --------------------------------------------------------------------------------

RULES = """\
settings:
  dedup_window: 48h

destinations:
  meta:
    type: meta_capi
    pixel_id: "{meta.pixel_id}"
    access_token: {meta.access_token}
    endpoint: {meta_url}
    delivery: {{batch_wait: 0.1}}
  ga4:
    type: ga4
    measurement_id: {ga4.measurement_id}
    api_secret: {ga4.api_secret}
    endpoint: {ga4_url}
    delivery: {{batch_wait: 0.1}}
  gads:
    type: google_ads
    customer_id: "123-456-7890"
    conversion_action: "111111111"
    developer_token: {gads.developer_token}
    client_id: {gads.client_id}
    client_secret: {gads.client_secret}
    refresh_token: "{gads.refresh_token}"
    endpoint: {gads_url}
    token_endpoint: {gads_url}/token
    delivery: {{batch_wait: 0.1}}
  tiktok:
    type: tiktok
    pixel_code: {tiktok.pixel_code}
    access_token: {tiktok.access_token}
    endpoint: {tiktok_url}
    delivery: {{batch_wait: 0.1}}

variables:
  related_order: properties.related_order_id || properties.related_event_id
  remaining_value: properties.remaining_value

triggers:
  page_view: {{event: page_view}}
  lead: {{event: lead}}
  sale: {{event: sale, when: properties.order_id}}
  negative_follow_on:
    event: [refund, cancellation, reversal]
    when: $related_order
  full_retraction:
    event: [refund, cancellation, reversal]
    when: $related_order
    unless: $remaining_value > `0`
  partial_refund:
    event: refund
    when: [$related_order, $remaining_value > `0`]

tags:
  - {{name: meta_page_view, trigger: page_view, destination: meta, event_name: PageView,
     consent: [ad_storage, ad_user_data]}}
  - {{name: meta_lead, trigger: lead, destination: meta, event_name: Lead,
     consent: [ad_storage, ad_user_data]}}
  - {{name: meta_purchase, trigger: sale, destination: meta, event_name: Purchase,
     consent: [ad_storage, ad_user_data]}}

  - {{name: tiktok_page_view, trigger: page_view, destination: tiktok, event_name: Pageview,
     consent: [ad_storage, ad_user_data]}}
  - {{name: tiktok_lead, trigger: lead, destination: tiktok, event_name: SubmitForm,
     consent: [ad_storage, ad_user_data]}}
  - {{name: tiktok_purchase, trigger: sale, destination: tiktok, event_name: Purchase,
     consent: [ad_storage, ad_user_data]}}

  - name: ga4_lead
    trigger: lead
    destination: ga4
    event_name: generate_lead
    consent: {{require: [analytics_storage, ad_user_data], anonymous: [analytics_storage]}}
  - name: ga4_purchase
    trigger: sale
    destination: ga4
    event_name: purchase
    consent: {{require: [analytics_storage, ad_user_data], anonymous: [analytics_storage]}}
  - name: ga4_refund
    trigger: negative_follow_on
    destination: ga4
    event_name: refund
    consent: {{require: [analytics_storage, ad_user_data], anonymous: [analytics_storage]}}

  - name: gads_lead
    trigger: lead
    destination: gads
    consent: [ad_storage, ad_user_data]
    mapping:
      conversionAction: {{value: "222222222"}}
      orderId: properties.lead_id
  - {{name: gads_sale, trigger: sale, destination: gads, consent: [ad_storage, ad_user_data]}}
  - {{name: gads_retraction, trigger: full_retraction, destination: gads,
     event_name: RETRACTION, consent: [ad_storage, ad_user_data]}}
  - name: gads_restatement
    trigger: partial_refund
    destination: gads
    event_name: RESTATEMENT
    consent: [ad_storage, ad_user_data]
    mapping:
      restatementValue.adjustedValue: $remaining_value
"""

RETRY_RULES = """\
destinations:
  meta:
    type: meta_capi
    pixel_id: "{meta.pixel_id}"
    access_token: {meta.access_token}
    endpoint: {meta_url}
    delivery: {{batch_wait: 0.1}}
  tiktok:
    type: tiktok
    pixel_code: {tiktok.pixel_code}
    access_token: {tiktok.access_token}
    endpoint: {tiktok_url}
    delivery: {{batch_wait: 0.1}}
triggers:
  sale: {{event: sale}}
tags:
  - {{name: meta_purchase, trigger: sale, destination: meta, event_name: Purchase,
     consent: [ad_storage, ad_user_data]}}
  - {{name: tiktok_purchase, trigger: sale, destination: tiktok, event_name: Purchase,
     consent: [ad_storage, ad_user_data]}}
"""


# -- the server -----------------------------------------------------------------------------------


class Server(TagrelayServer):
    """The shared harness, plus the delivery rows this test reads."""

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery row of the store (read-only, beside the running server)."""
        sql = "SELECT event_id, tag, destination, status, attempts, last_error FROM deliveries"
        return [dict(r) for r in self.query(sql)]


def wait_for(condition: Callable[[], bool], what: str, server: Server) -> None:
    """Poll ``condition`` for up to ``WAIT`` seconds; fail naming ``what`` if it never holds."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n--- server log ---\n{server.tail()}")


@dataclass
class Platforms:
    """The four emulators; Meta and TikTok carry their own loopback server."""

    meta: MetaEmulator
    tiktok: TikTokEmulator
    ga4: GA4Emulator
    ga4_server: LoopbackServer
    gads: GoogleAdsEmulator
    gads_server: LoopbackServer

    def rules(self, template: str) -> str:
        return template.format(
            meta=self.meta,
            meta_url=self.meta.url,
            tiktok=self.tiktok,
            tiktok_url=self.tiktok.url,
            ga4=self.ga4,
            ga4_url=self.ga4_server.url,
            gads=self.gads,
            gads_url=self.gads_server.url,
        )

    def token_requests(self) -> list[Request]:
        return [r for r in self.gads_server.requests if r.path == "/token"]

    def upload_requests(self) -> list[Request]:
        return [r for r in self.gads_server.requests if r.path != "/token"]


@contextlib.contextmanager
def running_platforms() -> Iterator[Platforms]:
    """The four emulators on loopback ports, stopped on exit."""
    ga4, gads = GA4Emulator(), GoogleAdsEmulator()
    with (
        MetaEmulator() as meta,
        TikTokEmulator() as tiktok,
        LoopbackServer(ga4) as ga4_server,
        LoopbackServer(gads) as gads_server,
    ):
        yield Platforms(meta, tiktok, ga4, ga4_server, gads, gads_server)


@contextlib.contextmanager
def running_server(rules_text: str, directory: Path) -> Iterator[Server]:
    """``tagrelay serve`` on a rules text; always stopped on exit, even if it failed to start."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / "rules.yaml"
    rules.write_text(rules_text)
    server = Server(rules, directory / "data", KEY, workers=WORKERS)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- the events -----------------------------------------------------------------------------------


def person() -> dict[str, Any]:
    return {
        "email": EMAIL,
        "phone": PHONE,
        "first_name": " Mary ",
        "last_name": "O'Brien",
        "date_of_birth": "1997-02-16",
        "gender": "Female",
        "city": "South San Francisco",
        "state": "CA",
        "postal_code": "94035-1234",
        "country": "US",
        "external_id": "user-42",
    }


def event(name: str, event_id: str, ts: int, **fields: Any) -> dict[str, Any]:
    """A canonical event with full user data, context and granted consent, unless overridden."""
    base: dict[str, Any] = {
        "event_name": name,
        "event_id": event_id,
        "timestamp": iso(ts),
        "visitor_id": "vis_e2e",
        "user_id": "cust_42",
        "user_data": person(),
        "context": {
            "ip": IP,
            "user_agent": UA,
            "page_url": "https://shop.example/account/orders",
            "referrer": "https://shop.example/",
            "fbp": FBP,
            "ttp": TTP,
            "ga_client_id": "GA1.1.1234567890.1732100000",
        },
        "consent": dict(GRANTED),
    }
    context = fields.pop("context", {})
    base.update(fields)
    base["context"].update(context)
    return base


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def google_time(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


SALE_URL = f"https://shop.example/checkout/complete?gclid={GCLID}&fbclid={FBCLID}&ttclid={TTCLID}"
GOOGLE_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d")  # offset mandatory
ITEMS = [{"id": "sku_1", "name": "Trail shoe", "price": 129.0, "quantity": 1}]


def by_id(events: list[dict[str, Any]], key: str = "event_id") -> dict[str, dict[str, Any]]:
    return {str(e.get(key)): e for e in events}


# -- the scenario: every outcome, a duplicate and a consent refusal through one server ------------

NEGATIVE = {  # event_id: (outcome, the order it undoes, refunded value)
    "rfd_1": ("refund", "ord_0999", 49.0),
    "cnl_1": ("cancellation", "ord_0998", 89.9),
    "chb_1": ("reversal", "ord_0997", 249.0),
}
FOLLOW_ONS = {*NEGATIVE, "rfd_2"}  # rfd_2: a partial refund of ord_1001


@dataclass
class Scenario:
    """What the platforms saw after the scenario ran, and what the server answered."""

    platforms: Platforms
    ts: int  # the time of the page view, lead and sales
    later: int  # the time of the refunds, cancellation and reversal
    answers: dict[str, dict[str, Any]]  # event_id -> /v1/track answer (the repeat: "again")
    deliveries: list[dict[str, Any]]  # the store's delivery rows at the end


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Run the outcomes through a real server once; the tests below read what arrived."""
    with (
        running_platforms() as platforms,
        running_server(platforms.rules(RULES), tmp_path_factory.mktemp("e2e")) as server,
    ):
        yield run_scenario(platforms, server)


def run_scenario(platforms: Platforms, server: Server) -> Scenario:
    meta, tiktok, ga4, gads = platforms.meta, platforms.tiktok, platforms.ga4, platforms.gads
    ts = int(time.time()) - 120
    later = ts + 30  # an adjustment must come after the conversion it adjusts
    answers: dict[str, dict[str, Any]] = {}

    # Phase 1: a page view, a lead and a sale.
    page_view = event(
        "page_view",
        "pv_1",
        ts,
        context={"page_url": f"https://shop.example/p/trail-shoe?fbclid={FBCLID}"},
    )
    lead = event(
        "lead",
        "lead_77",
        ts,
        properties={"lead_id": "lead_77", "value": 5, "currency": "EUR"},
        context={"page_url": f"https://shop.example/newsletter?gclid={LEAD_GCLID}"},
    )
    sale = event(
        "sale",
        "ord_1001",
        ts,
        properties={"order_id": "ord_1001", "value": 129.0, "currency": "eur", "items": ITEMS},
        context={"page_url": SALE_URL},
    )
    for e in (page_view, lead, sale):
        answers[e["event_id"]] = server.track(e)
    wait_for(
        lambda: (
            len(meta.events) >= 3
            and len(tiktok.events) >= 3
            and len(ga4.accepted) >= 2
            and len(gads.conversions) >= 2
        ),
        "page view, lead and sale at all four platforms",
        server,
    )

    # Phase 2: the sale again (same event_id), then a full refund, a cancellation, a reversal.
    answers["again"] = server.track(sale)
    for event_id, (name, order, value) in NEGATIVE.items():
        props = {"related_order_id": order, "value": value, "currency": "EUR"}
        answers[event_id] = server.track(event(name, event_id, later, properties=props))
    wait_for(
        lambda: len(gads.adjustments) >= 3 and len(ga4.accepted) >= 5,
        "three retractions at Google Ads and three refunds at GA4",
        server,
    )

    # Phase 3: a partial refund of the sale, and a sale whose buyer denied ad_user_data.
    partial = event(
        "refund",
        "rfd_2",
        later,
        properties={
            "related_order_id": "ord_1001",
            "value": 10.0,
            "remaining_value": 119.0,
            "currency": "EUR",
            "items": [{"id": "sku_socks", "name": "Socks", "price": 10.0, "quantity": 1}],
        },
    )
    denied = event(
        "sale",
        "ord_2001",
        ts,
        user_id="cust_5",
        properties={"order_id": "ord_2001", "value": 40.0, "currency": "EUR"},
        context={"page_url": SALE_URL},
        consent={
            "ad_storage": "granted",
            "analytics_storage": "granted",
            "ad_user_data": "denied",
            "ad_personalization": "denied",
        },
    )
    for e in (partial, denied):
        answers[e["event_id"]] = server.track(e)
    wait_for(
        lambda: len(gads.adjustments) >= 4 and len(ga4.accepted) >= 7,
        "the restatement at Google Ads, the partial refund and anonymous sale at GA4",
        server,
    )
    time.sleep(QUIET)  # whatever should not arrive has had time to
    return Scenario(platforms, ts, later, answers, server.deliveries())


# -- the tests ------------------------------------------------------------------------------------


def test_every_event_is_accepted_once_and_the_repeat_is_a_duplicate(scenario: Scenario) -> None:
    for event_id, answer in scenario.answers.items():
        assert answer["success"] is True
        assert answer["event_id"] == ("ord_1001" if event_id == "again" else event_id)
        assert answer["duplicate"] is (event_id == "again")


def test_meta_gets_purchase_hashed_by_meta_rules_with_fbc_from_the_fbclid(
    scenario: Scenario,
) -> None:
    meta, ts = scenario.platforms.meta, scenario.ts
    assert Counter(e["event_name"] for e in meta.events) == {
        "PageView": 1,
        "Lead": 1,
        "Purchase": 1,
    }
    purchase = by_id(meta.events)["ord_1001"]
    assert purchase["event_id"] == "ord_1001"
    assert purchase["event_name"] == "Purchase"
    assert purchase["event_time"] == ts
    assert purchase["action_source"] == "website"
    assert purchase["event_source_url"] == SALE_URL
    assert purchase["user_data"] == {
        "em": EMAIL_META_TIKTOK,  # trim + lowercase, Gmail dots kept
        "ph": PHONE_META,  # digits only, country code, no +
        "fn": FIRST_NAME_HASH,
        "ln": LAST_NAME_HASH,
        "db": DOB_META,
        "ge": GENDER_META,
        "ct": CITY_META,
        "st": STATE_META,
        "zp": ZIP_META,
        "country": COUNTRY_META,
        "external_id": EXTERNAL_ID_HASH,
        "client_ip_address": IP,  # never hashed
        "client_user_agent": UA,  # never hashed
        "fbc": f"fb.1.{ts * 1000}.{FBCLID}",  # fbclid's case kept
        "fbp": FBP,
    }
    custom = purchase["custom_data"]
    assert custom["value"] == 129.0
    assert custom["currency"] == "EUR"
    assert custom["order_id"] == "ord_1001"
    assert custom["content_ids"] == ["sku_1"]
    assert custom["contents"] == [
        {"id": "sku_1", "quantity": 1, "item_price": 129.0, "title": "Trail shoe"}
    ]
    page_view = by_id(meta.events)["pv_1"]
    assert page_view["event_name"] == "PageView"
    assert page_view["user_data"]["fbc"] == f"fb.1.{ts * 1000}.{FBCLID}"
    assert by_id(meta.events)["lead_77"]["event_name"] == "Lead"
    assert all("access_token" not in r.query for r in meta.server.requests)  # in the body


def test_meta_and_tiktok_get_nothing_for_refunds_cancellations_and_reversals(
    scenario: Scenario,
) -> None:
    assert not FOLLOW_ONS & set(by_id(scenario.platforms.meta.events))
    assert not FOLLOW_ONS & set(by_id(scenario.platforms.tiktok.events))


def test_tiktok_gets_purchase_with_e164_phone_hash_and_ttclid(scenario: Scenario) -> None:
    tiktok, ts = scenario.platforms.tiktok, scenario.ts
    assert Counter(e["event"] for e in tiktok.events) == {
        "Pageview": 1,
        "SubmitForm": 1,
        "Purchase": 1,
    }
    purchase = by_id(tiktok.events)["ord_1001"]
    assert purchase["event"] == "Purchase"
    assert purchase["event_time"] == ts
    assert purchase["user"] == {
        "email": EMAIL_META_TIKTOK,
        "phone": PHONE_E164,  # E.164 with +
        "external_id": EXTERNAL_ID_HASH,
        "ttclid": TTCLID,  # from the page URL, not hashed
        "ttp": TTP,
        "ip": IP,
        "user_agent": UA,
    }
    properties = purchase["properties"]
    assert properties["value"] == 129.0
    assert properties["currency"] == "EUR"
    assert properties["order_id"] == "ord_1001"
    assert properties["contents"] == [
        {"content_id": "sku_1", "content_name": "Trail shoe", "price": 129.0, "quantity": 1}
    ]
    assert purchase["page"] == {"url": SALE_URL, "referrer": "https://shop.example/"}
    assert {b["event_source_id"] for b in tiktok.bodies} == {tiktok.pixel_code}
    assert {b["event_source"] for b in tiktok.bodies} == {"web"}


def ga4_by_transaction(scenario: Scenario) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (e["name"], e["params"].get("transaction_id")): e
        for e in scenario.platforms.ga4.accepted
        if e["name"] in ("purchase", "refund")
    }


def test_ga4_gets_purchase_with_items_and_google_hashed_user_data(scenario: Scenario) -> None:
    assert Counter(e["name"] for e in scenario.platforms.ga4.accepted) == {
        "generate_lead": 1,
        "purchase": 2,  # ord_1001, and the anonymous ord_2001
        "refund": 4,
    }
    purchase = ga4_by_transaction(scenario)["purchase", "ord_1001"]
    assert purchase["client_id"] == "1234567890.1732100000"  # the _ga cookie's client ID
    assert purchase["user_id"] == "cust_42"
    assert purchase["timestamp_micros"] == scenario.ts * 1_000_000
    assert purchase["consent"] == {"ad_user_data": "GRANTED", "ad_personalization": "DENIED"}
    assert purchase["params"]["value"] == 129.0
    assert purchase["params"]["currency"] == "EUR"
    assert purchase["params"]["items"] == [
        {"item_id": "sku_1", "item_name": "Trail shoe", "price": 129.0, "quantity": 1}
    ]
    user_data = purchase["user_data"]
    assert user_data["sha256_email_address"] == EMAIL_GOOGLE  # Gmail: dots dropped
    assert user_data["sha256_phone_number"] == PHONE_E164
    assert user_data["address"]["sha256_first_name"] == FIRST_NAME_HASH
    assert user_data["address"]["sha256_last_name"] == LAST_NAME_HASH


def test_ga4_gets_a_refund_naming_the_related_order_for_each_negative_outcome(
    scenario: Scenario,
) -> None:
    by_transaction = ga4_by_transaction(scenario)
    for _outcome, order, value in NEGATIVE.values():
        refund = by_transaction["refund", order]
        assert refund["params"]["value"] == value
        assert refund["params"]["currency"] == "EUR"
    partial = by_transaction["refund", "ord_1001"]
    assert partial["params"]["value"] == 10.0
    assert partial["params"]["items"] == [
        {"item_id": "sku_socks", "item_name": "Socks", "price": 10.0, "quantity": 1}
    ]


def test_google_ads_exchanges_the_token_once_per_process_and_reuses_it(
    scenario: Scenario,
) -> None:
    platforms = scenario.platforms
    tokens, uploads = platforms.token_requests(), platforms.upload_requests()
    # The token cache lives in each gunicorn worker's delivery thread: at most one exchange
    # per worker, and three phases made at least three uploads.
    assert 1 <= len(tokens) <= WORKERS
    assert len(uploads) > len(tokens)
    issued = {f"Bearer ya29.emulated-{n}" for n in range(1, len(tokens) + 1)}
    assert {r.header("authorization") for r in uploads} <= issued
    assert {r.header("developer-token") for r in uploads} == {platforms.gads.developer_token}
    assert {r.path.rsplit(":", 1)[0] for r in uploads} == {"/v26/customers/1234567890"}


def test_google_ads_gets_the_sale_as_a_click_conversion_with_gmail_rule_hash(
    scenario: Scenario,
) -> None:
    gads = scenario.platforms.gads
    conversions = by_id(gads.conversions, "orderId")
    assert set(conversions) == {"ord_1001", "lead_77"}
    sale = conversions["ord_1001"]
    assert sale["gclid"] == GCLID  # read from the page URL
    assert sale["conversionAction"] == "customers/1234567890/conversionActions/111111111"
    assert GOOGLE_TIME.fullmatch(sale["conversionDateTime"])
    assert sale["conversionDateTime"] == google_time(scenario.ts)
    assert sale["conversionValue"] == 129.0
    assert sale["currencyCode"] == "EUR"
    assert sale["userIdentifiers"] == [
        {"hashedEmail": EMAIL_GOOGLE},
        {"hashedPhoneNumber": PHONE_E164},
    ]
    assert sale["consent"] == {"adUserData": "GRANTED"}
    lead = conversions["lead_77"]
    assert lead["gclid"] == LEAD_GCLID
    assert lead["conversionAction"] == "customers/1234567890/conversionActions/222222222"


def test_google_ads_retracts_refunds_cancellations_reversals_and_restates_partial_refund(
    scenario: Scenario,
) -> None:
    gads = scenario.platforms.gads
    adjustments = by_id(gads.adjustments, "orderId")
    assert len(gads.adjustments) == 4
    for _outcome, order, _value in NEGATIVE.values():
        row = adjustments[order]
        assert row["adjustmentType"] == "RETRACTION"
        assert row["conversionAction"] == "customers/1234567890/conversionActions/111111111"
        assert row["adjustmentDateTime"] == google_time(scenario.later)
        assert "restatementValue" not in row
    restatement = adjustments["ord_1001"]
    assert restatement["adjustmentType"] == "RESTATEMENT"
    assert restatement["restatementValue"] == {"adjustedValue": 119.0, "currencyCode": "EUR"}
    assert restatement["adjustmentDateTime"] == google_time(scenario.later)


def test_ad_user_data_denied_reaches_no_ad_platform_and_ga4_without_identifiers(
    scenario: Scenario,
) -> None:
    platforms = scenario.platforms
    assert "ord_2001" not in by_id(platforms.meta.events)
    assert "ord_2001" not in by_id(platforms.tiktok.events)
    assert "ord_2001" not in by_id(platforms.gads.conversions, "orderId")
    anonymous = ga4_by_transaction(scenario)["purchase", "ord_2001"]
    assert "user_data" not in anonymous
    assert "user_id" not in anonymous
    assert anonymous["consent"] == {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
    assert anonymous["ip_override"] == "203.0.113.0"  # truncated
    page_location = anonymous["params"].get("page_location", "")
    assert GCLID not in page_location
    assert FBCLID not in page_location
    assert TTCLID not in page_location


def test_repeated_sale_makes_no_second_request_anywhere(scenario: Scenario) -> None:
    platforms = scenario.platforms
    assert Counter(e["event_id"] for e in platforms.meta.events)["ord_1001"] == 1
    assert Counter(e["event_id"] for e in platforms.tiktok.events)["ord_1001"] == 1
    ga4 = Counter((e["name"], e["params"].get("transaction_id")) for e in platforms.ga4.accepted)
    assert ga4["purchase", "ord_1001"] == 1
    assert Counter(c.get("orderId") for c in platforms.gads.conversions)["ord_1001"] == 1
    sale_deliveries = [d for d in scenario.deliveries if d["event_id"] == "ord_1001"]
    assert Counter(d["destination"] for d in sale_deliveries) == {
        "meta": 1,
        "tiktok": 1,
        "ga4": 1,
        "gads": 1,
    }


def test_emulators_found_no_problem_and_every_delivery_succeeded_first_time(
    scenario: Scenario,
) -> None:
    platforms = scenario.platforms
    meta, tiktok, ga4, gads = platforms.meta, platforms.tiktok, platforms.ga4, platforms.gads
    # Meta and TikTok keep only what they accepted: every request they got was accepted.
    assert len(meta.server.requests) == len(meta.test_event_codes)
    assert len(tiktok.server.requests) == len(tiktok.bodies)
    assert ga4.dropped == []  # what /mp/collect would have dropped silently
    rows_sent = 0
    for request in platforms.upload_requests():
        body = request.json()
        rows_sent += len(body.get("conversions") or body.get("conversionAdjustments") or [])
    assert rows_sent == len(gads.conversions) + len(gads.adjustments)  # no row failed
    servers = (meta.server, tiktok.server, platforms.ga4_server, platforms.gads_server)
    assert all(s.errors == [] for s in servers)
    assert Counter(d["destination"] for d in scenario.deliveries) == {
        "meta": 3,
        "tiktok": 3,
        "ga4": 7,
        "gads": 6,
    }
    assert {(d["status"], d["attempts"]) for d in scenario.deliveries} == {("delivered", 1)}


# -- retries ---------------------------------------------------------------------------------------


def test_throttled_platform_gets_the_event_after_a_retry(tmp_path: Path) -> None:
    with running_platforms() as platforms:
        meta, tiktok = platforms.meta, platforms.tiktok
        meta.fail_next("throttle")  # Graph error code 4, is_transient
        tiktok.fail_next("throttle")  # code 40100 with HTTP 200
        with running_server(platforms.rules(RETRY_RULES), tmp_path) as server:
            sale = event(
                "sale",
                "ord_retry_1",
                int(time.time()) - 60,
                properties={"order_id": "ord_retry_1", "value": 20.0, "currency": "EUR"},
                context={"page_url": SALE_URL},
            )
            assert server.track(sale)["duplicate"] is False
            wait_for(
                lambda: len(meta.events) == 1 and len(tiktok.events) == 1,
                "the sale at Meta and TikTok after their throttling",
                server,
            )
            time.sleep(QUIET)
            deliveries = {d["destination"]: d for d in server.deliveries()}

    assert len(meta.server.requests) == 2  # throttled, then accepted
    assert len(tiktok.server.requests) == 2
    assert meta.events[0]["event_id"] == "ord_retry_1"
    assert meta.events[0]["user_data"]["em"] == EMAIL_META_TIKTOK
    assert tiktok.events[0]["event_id"] == "ord_retry_1"
    assert tiktok.events[0]["user"]["phone"] == PHONE_E164
    assert deliveries["meta"]["status"] == "delivered"
    assert deliveries["meta"]["attempts"] == 2
    assert "Meta error 4" in deliveries["meta"]["last_error"]
    assert deliveries["tiktok"]["status"] == "delivered"
    assert deliveries["tiktok"]["attempts"] == 2
    assert "40100" in deliveries["tiktok"]["last_error"]
