"""Property: what an adapter builds from a realistic event, the platform's emulator accepts.

For Meta, GA4, Google Ads and TikTok, hypothesis makes canonical events as shops send them
(purchases, leads, refunds and page views; e-mail addresses with capitals, dots and ``+tags``;
phone numbers of many countries in the shapes people write them; names with diacritics and odd
spacing; addresses, dates of birth, genders, external IDs; IPv4 and IPv6 addresses, user agents,
page URLs carrying click IDs, click-ID fields and platform cookies; full or analytics-only
consent) and takes them down the path the server takes: :meth:`Pipeline.prepare` (validation,
the IP policy, the container's tags with each adapter's default mapping and ``build_payload``),
the stored payload's JSON round trip, then delivery's steps (``check_item``, ``batch_key``,
``split``, ``build_request``), over real HTTP to the platform's loopback emulator in
``destinations.testkit``, whose answer the adapter reads with ``read_response``.

The invariant, per tag: the adapter refuses the event at intake with a :class:`PayloadError`
naming the rule (the tag does not fire), or gives it up at send time for a window it names
(``check_item``), or the platform accepts it. Never an exception of another kind, and never a
request the platform refuses: that is a paid conversion turned into a dead letter. Batches too:
several events in the requests the adapter's own batching makes, accepted item by item.

When this fails, platforms.md says who is wrong: the adapter (it sends what the platform
refuses) or the emulator (it refuses what the platform takes, or takes what it refuses).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from destinations.base import Destination, Item, Outcome, SendContext
from destinations.testkit.ga4 import GA4Emulator
from destinations.testkit.google_ads import GoogleAdsEmulator
from destinations.testkit.meta import MetaEmulator
from destinations.testkit.server import LoopbackServer, send
from destinations.testkit.tiktok import TikTokEmulator
from engine import jsonio
from engine.batching import split_problem
from engine.pipeline import Pipeline, load_rules
from engine.rules import compile_container
from engine.rules.model import Container
from engine.store.sqlite import SQLiteStore

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))

# -- the container: every tag on its adapter's default mapping -----------------------------------

RULES = """\
destinations:
  meta:
    type: meta_capi
    pixel_id: "{meta.pixel_id}"
    access_token: {meta.access_token}
    endpoint: {meta.url}{meta_extra}
  tiktok:
    type: tiktok
    pixel_code: {tiktok.pixel_code}
    access_token: {tiktok.access_token}
    endpoint: {tiktok.url}{tiktok_extra}
  ga4:
    type: ga4
    measurement_id: {ga4.measurement_id}
    api_secret: {ga4.api_secret}
    endpoint: {ga4_url}{ga4_extra}
  gads:
    type: google_ads
    customer_id: "123-456-7890"
    conversion_action: "111111111"
    developer_token: {gads.developer_token}
    client_id: {gads.client_id}
    client_secret: {gads.client_secret}
    refresh_token: "{gads.refresh_token}"
    endpoint: {gads_url}
    token_endpoint: {gads_url}/token{gads_extra}

triggers:
  page_view: {{event: page_view}}
  lead: {{event: lead}}
  purchase: {{event: purchase}}
  refund: {{event: refund}}
  full_refund:
    event: refund
    when: properties.related_order_id
    unless: properties.remaining_value > `0`
  partial_refund:
    event: refund
    when: [properties.related_order_id, properties.remaining_value > `0`]

tags:
  - {{name: meta_page_view, trigger: page_view, destination: meta, event_name: PageView,
     consent: {consent}}}
  - {{name: meta_lead, trigger: lead, destination: meta, event_name: Lead, consent: {consent}}}
  - {{name: meta_purchase, trigger: purchase, destination: meta, event_name: Purchase,
     consent: {consent}}}

  - {{name: tiktok_page_view, trigger: page_view, destination: tiktok, event_name: Pageview,
     consent: {consent}}}
  - {{name: tiktok_lead, trigger: lead, destination: tiktok, event_name: SubmitForm,
     consent: {consent}}}
  - {{name: tiktok_purchase, trigger: purchase, destination: tiktok, event_name: Purchase,
     consent: {consent}}}

  - {{name: ga4_page_view, trigger: page_view, destination: ga4, event_name: page_view,
     consent: {analytics}}}
  - {{name: ga4_lead, trigger: lead, destination: ga4, event_name: generate_lead,
     consent: {analytics}}}
  - {{name: ga4_purchase, trigger: purchase, destination: ga4, event_name: purchase,
     consent: {analytics}}}
  - {{name: ga4_refund, trigger: refund, destination: ga4, event_name: refund,
     consent: {analytics}}}

  - name: gads_lead
    trigger: lead
    destination: gads
    consent: {consent}
    mapping: {{conversionAction: {{value: "222222222"}}}}
  - {{name: gads_purchase, trigger: purchase, destination: gads, consent: {consent}}}
  - {{name: gads_enhancement, trigger: purchase, destination: gads, event_name: ENHANCEMENT,
     consent: {consent}}}
  - {{name: gads_retraction, trigger: full_refund, destination: gads, event_name: RETRACTION,
     consent: {consent}}}
  - name: gads_restatement
    trigger: partial_refund
    destination: gads
    event_name: RESTATEMENT
    consent: {consent}
    mapping: {{restatementValue.adjustedValue: properties.remaining_value}}
"""
# The settings beside the required ones: none; a shop's country and currency; the platforms'
# test and validation modes.
VARIANTS: list[dict[str, dict[str, Any]]] = [
    {"meta": {}, "tiktok": {}, "ga4": {}, "gads": {}},
    {
        "meta": {"default_country": "DE"},
        "tiktok": {"default_country": "DE"},
        "ga4": {"default_country": "DE"},
        "gads": {"default_country": "DE", "currency": "EUR"},
    },
    {
        "meta": {"test_event_code": "TEST12345", "default_country": "US"},
        "tiktok": {"test_event_code": "TEST12345", "default_country": "US"},
        "ga4": {"validate": True},
        "gads": {"validate_only": True, "currency": "usd", "default_country": "US"},
    },
]
AD_CONSENT = "{require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}"
ANALYTICS_CONSENT = "{require: [analytics_storage, ad_user_data], anonymous: [analytics_storage]}"


@dataclass
class Platforms:
    """The four emulators, the containers pointed at them, and what the tests send through."""

    meta: MetaEmulator
    tiktok: TikTokEmulator
    ga4: GA4Emulator
    ga4_server: LoopbackServer
    gads: GoogleAdsEmulator
    gads_server: LoopbackServer
    containers: list[Container] = field(default_factory=list)
    """One per entry of :data:`VARIANTS`."""
    pipeline: Pipeline | None = None
    tokens: dict[int, str] = field(default_factory=dict)

    def rules(self, variant: dict[str, dict[str, Any]]) -> str:
        """The container's text, with each destination's extra settings of ``variant``."""

        def extra(name: str) -> str:
            return "".join(f"\n    {k}: {json.dumps(v)}" for k, v in variant[name].items())

        return RULES.format(
            meta=self.meta,
            tiktok=self.tiktok,
            ga4=self.ga4,
            gads=self.gads,
            ga4_url=self.ga4_server.url,
            gads_url=self.gads_server.url,
            meta_extra=extra("meta"),
            tiktok_extra=extra("tiktok"),
            ga4_extra=extra("ga4"),
            gads_extra=extra("gads"),
            consent=AD_CONSENT,
            analytics=ANALYTICS_CONSENT,
        )

    def token(self, adapter: Destination) -> str | None:
        """An access token for ``adapter`` from its token endpoint (the emulator's), kept."""
        request = adapter.token_request()
        if request is None:
            return None
        if id(adapter) not in self.tokens:
            self.tokens[id(adapter)] = adapter.read_token(send(request)).value
        return self.tokens[id(adapter)]


@pytest.fixture(scope="module")
def platforms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platforms]:
    """The four emulators on loopback ports, and a container sending to them per variant of
    the settings (:data:`VARIANTS`)."""
    ga4, gads = GA4Emulator(), GoogleAdsEmulator()
    with (
        MetaEmulator() as meta,
        TikTokEmulator() as tiktok,
        LoopbackServer(ga4) as ga4_server,
        LoopbackServer(gads) as gads_server,
    ):
        found = Platforms(meta, tiktok, ga4, ga4_server, gads, gads_server)
        root = tmp_path_factory.mktemp("conformance")
        for n, variant in enumerate(VARIANTS):
            path = root / f"rules{n}.yaml"
            path.write_text(found.rules(variant), encoding="utf-8")
            container, problems = compile_container(path, env={})
            assert container is not None, problems
            found.containers.append(container)
        store = SQLiteStore(Path(root) / "store.db")
        found.pipeline = Pipeline(store, load_rules(root / "rules0.yaml", interval=0))
        yield found
        for server in (meta.server, tiktok.server, ga4_server, gads_server):
            assert server.errors == [], server.errors  # an emulator that raised: its bug


# -- realistic, varied events -------------------------------------------------------------------

ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}", fullmatch=True)
CLICK_ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{5,40}", fullmatch=True)

EMAILS = st.one_of(
    st.sampled_from(
        [
            "a@example.com",
            "  John.Doe@Gmail.com ",
            "John.Doe+promo@GoogleMail.com",
            "Jane.Doe+news@Example.com",
            "ZOË.Müller@Example.DE",
            "josé@correo.es",
            "user_name@sub.domain.co.uk",
            "not-an-email",
            "\u00a0a@example.com\u00a0",
            "müller@bücher.de",
            "A@EXAMPLE.COM\n",
            "",
        ]
    ),
    st.builds(
        lambda local, tag, domain, pad: f"{pad}{local}{tag}@{domain}{pad}",
        st.from_regex(r"[A-Za-z][A-Za-z0-9._]{0,12}[A-Za-z0-9]", fullmatch=True),
        st.sampled_from(["", "+shop", "+1"]),
        st.sampled_from(["gmail.com", "GMAIL.com", "example.org", "web.de", "mail.ru"]),
        st.sampled_from(["", " ", "\t"]),
    ),
)
PHONES = st.sampled_from(
    [
        "+4915112345678",
        "+49 151 12345678",
        "0151 12345678",
        "0049 151 1234 5678",
        "+1 (650) 555-1212",
        "(650) 555-1212",
        "650.555.1212",
        "+44 (0)20 7946 0958",
        "0044 20 7946 0958",
        "020 7946 0958",
        "+33 6 12 34 56 78",
        "06 12 34 56 78",
        "+81 90-1234-5678",
        "+91 98765 43210",
        "+55 11 91234-5678",
        "+61 4 1234 5678",
        "0011 61 4 1234 5678",
        "+86 138 0013 8000",
        "+7 912 345-67-89",
        "+971 50 123 4567",
        "+234 803 123 4567",
        "+49\u00a0151\u00a012345678",
        "+49-151-12345678",
        "+49 (0) 151 12345678",
        "tel:+4915112345678",
        "+٤٩١٥١١٢٣٤٥٦٧٨",
        "+1 650 555 1212 ext 5",
        "12345",
        "phone",
        "",
    ]
)
FIRST_NAMES = st.sampled_from(
    [
        *("Ada", " Mary ", "\u00a0Zoë\u00a0", "Zoë", "José", "Jean-Luc", "Ægir", "Łukasz"),
        *("  mary   ann ", "Mrs. Jane", "李", "Nguyễn Văn", "O'Neil", "Ángel", "Søren"),
        *("Çağr\u0131", "ß", "-", "", "undefined"),
    ]
)
LAST_NAMES = st.sampled_from(
    [
        *("Lovelace", "O'Brien", "Müller", "García Márquez", "van der Berg", "Smith Jr."),
        *("Dvořák", "  Ölçer  ", "정", "Nguyễn", "d'Arc", "---", ""),
    ]
)
CITIES = st.sampled_from(
    [
        *("Berlin", "South San Francisco", "São Paulo", "Zürich", "Kraków", "St. Louis"),
        *("Val-d'Or", "New York", "  MÜNCHEN ", "Île-de-France", "東京", "Frankfurt am Main"),
        *("10115 Berlin", "İstanbul", ""),
    ]
)
STATES = st.sampled_from(
    ["CA", "California", "BE", "BY", "N.Y.", "ny", "Île-de-France", "Bavaria", "NSW", "", "ZZ"]
)
POSTAL_CODES = st.sampled_from(
    [
        *("10115", "94035-1234", "940351234", "M1 1AE", "00-950", "K1A 0B1", "75001"),
        *("CA 94035", "100-0001", "2000", "", "abc"),
    ]
)
COUNTRIES = st.sampled_from(
    [
        *("DE", "de", "US", "us", "United States", "Germany", "DEU", "GB", "UK"),
        *("United Kingdom", "France", "JP", "BR", "IN", "AU", "Türkiye", "Turkey", "XK"),
        *("Atlantis", ""),
    ]
)
DATES_OF_BIRTH = st.sampled_from(
    [
        *("1990-12-10", "1997-02-16", "2/16/1997", "16.02.1997", "19970216", "1899-01-01"),
        *("1990-13-45", "10 Dec 1990", "yesterday", ""),
    ]
)
GENDERS = st.sampled_from(["female", "male", "f", "M", "Female", "non-binary", "divers", "x", ""])
EXTERNAL_IDS = st.one_of(ID, st.sampled_from([" User-42 ", "cust_42", "CUST-42", "a" * 64]))

USER_AGENTS = st.sampled_from(
    [
        "Mozilla/5.0 (X11; Linux x86_64)",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "curl/8.5.0",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) [FBAN/FB4A;FBAV/450.0.0.0;]",
        " ",
    ]
)
IPS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(
        [
            "203.0.113.7",
            "2001:db8::1",
            "::ffff:203.0.113.7",
            "203.0.113.7, 10.0.0.1",
            "[2001:db8::1]:443",
            "203.0.113.7:51234",
            "fe80::1%eth0",
            "unknown",
            "",
        ]
    ),
)
# What a JavaScript client sends for a cookie it could not read, or one made the wrong way.
COOKIE_MISTAKES = st.sampled_from(["undefined", "null", "fb.1.1732000000.IwAR_seconds", "[object]"])
CLICK_PARAMS = ["gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid"]


@st.composite
def page_urls(draw: st.DrawFn) -> str:
    """A landing or checkout page, with click IDs in its query string (some percent-encoded)."""
    host = draw(st.sampled_from(["shop.example", "www.shop.example", "xn--mller-kva.example"]))
    path = draw(st.sampled_from(["/", "/checkout", "/p/42", "/thanks?x=1", "/süß"]))
    params = draw(st.lists(st.sampled_from([*CLICK_PARAMS, "utm_source", "q"]), max_size=3))
    query = "&".join(f"{p}={draw(CLICK_ID)}" for p in params)
    scheme = draw(st.sampled_from(["https", "https", "http"]))
    url = f"{scheme}://{host}{path}"
    if query:
        url += ("&" if "?" in url else "?") + query
    return url


@st.composite
def contexts(draw: st.DrawFn, now: datetime) -> dict[str, Any]:
    """The request's context: IP, user agent, page, click IDs and cookies, any of them absent."""
    context: dict[str, Any] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "ip": IPS,
        "user_agent": USER_AGENTS,
        "page_url": page_urls(),
        "referrer": st.sampled_from(["https://www.google.com/", "https://shop.example/cart"]),
        "gclid": CLICK_ID,
        "gbraid": CLICK_ID,
        "wbraid": CLICK_ID,
        "fbclid": CLICK_ID,
        "fbc": st.one_of(
            CLICK_ID.map(lambda c: f"fb.1.{int(now.timestamp() * 1000) - 86_400_000}.{c}"),
            CLICK_ID.map(lambda c: f"fb.1.1732000000000.{c}.Ag"),  # Meta's Parameter Builder
            CLICK_ID,  # a bare fbclid where the cookie belongs
            COOKIE_MISTAKES,
        ),
        "fbp": st.one_of(
            st.integers(10**9, 10**10).map(lambda r: f"fb.1.1732000000000.{r}"),
            st.integers(10**9, 10**10).map(lambda r: f"fb.2.1732000000000.{r}.Ag"),
            COOKIE_MISTAKES,
        ),
        "ttclid": st.one_of(CLICK_ID.map(lambda c: f"E.C.P.{c}"), CLICK_ID),
        "ttp": st.one_of(ID, COOKIE_MISTAKES),
        "ga_client_id": st.sampled_from(["GA1.1.123456789.1732000000", "987654321.1732000001"]),
        "ga_session_id": st.sampled_from(["1732000000", "GS1.1.1732000000.1.1.1732000100.0.0.0"]),
    }
    for key, strategy in optional.items():
        # The request's own IP, user agent and page are mostly there; click IDs and cookies
        # as often as not; now and then a field is sent as null.
        chance = 8 if key in ("ip", "user_agent", "page_url") else 5
        roll = draw(st.integers(0, 9))
        if roll < chance:
            context[key] = draw(strategy)
        elif roll == 9:
            context[key] = None
    return context


@st.composite
def user_datas(draw: st.DrawFn) -> dict[str, Any]:
    """What the shop knows of the person, any field absent."""
    fields: dict[str, st.SearchStrategy[Any]] = {
        "email": EMAILS,
        "phone": PHONES,
        "first_name": FIRST_NAMES,
        "last_name": LAST_NAMES,
        "date_of_birth": DATES_OF_BIRTH,
        "gender": GENDERS,
        "city": CITIES,
        "state": STATES,
        "postal_code": POSTAL_CODES,
        "country": COUNTRIES,
        "external_id": EXTERNAL_IDS,
    }
    out: dict[str, Any] = {}
    for key, strategy in fields.items():
        roll = draw(st.integers(0, 9))
        if roll < 6:
            out[key] = draw(strategy)
        elif roll == 9:
            out[key] = None  # null: the shop does not know it
    return out


PRICES = st.one_of(
    st.sampled_from([0, 0.0, 9.99, 129.0, 12.5, 1999, 0.01, "12.50", " 129 ", "1e3"]),
    st.decimals(min_value=0, max_value=10_000, places=2).map(float),
)
ITEM = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(ID, st.integers(1, 10**6)),
        "name": st.sampled_from(["Running shoe", "Trail sock", "Crème brûlée", "Schuh Größe 42"]),
        "price": PRICES,
        "quantity": st.one_of(st.integers(1, 5), st.sampled_from(["2", 1.0])),
    },
)
CURRENCIES = st.sampled_from(["EUR", "USD", "eur", " gbp ", "JPY", "BRL"])


@st.composite
def properties(draw: st.DrawFn, name: str, order: str) -> dict[str, Any]:
    """An event's business properties: a purchase's order, a lead's form, a refund's order."""
    props: dict[str, Any] = {}
    # Mostly with a value, its currency mostly with it.
    if (name in ("purchase", "lead") or draw(st.booleans())) and draw(st.integers(0, 9)):
        props["value"] = draw(PRICES)
        if draw(st.integers(0, 9)):
            props["currency"] = draw(CURRENCIES)
    if name == "purchase":
        props["order_id"] = order if draw(st.integers(0, 4)) else int(order.rsplit("-", 1)[1])
        props["items"] = draw(st.lists(ITEM, max_size=4))
        if draw(st.booleans()):
            props["coupon"] = "WINTER10"
    elif name == "lead":
        props["form"] = draw(st.sampled_from(["newsletter", "contact", "quote"]))
    elif name == "refund":
        props["related_order_id"] = draw(st.sampled_from([order, f"ord_{draw(ID)}"]))
        if draw(st.booleans()):
            props["remaining_value"] = draw(st.sampled_from([0, 10.0, 99.5]))
    elif name == "page_view":
        props["page_title"] = draw(st.sampled_from(["Running shoes", "Schuhe \u2013 Größe 42"]))
    return props


FULL_CONSENT = {
    "ad_storage": "granted",
    "analytics_storage": "granted",
    "ad_user_data": "granted",
    "ad_personalization": "denied",
}
ANALYTICS_ONLY = {"ad_storage": "denied", "analytics_storage": True, "ad_user_data": False}


@st.composite
def events(draw: st.DrawFn, now: datetime, serial: int) -> dict[str, Any]:
    """One canonical event as a shop's backend or page sends it to ``/v1/track``."""
    name = draw(st.sampled_from(["purchase", "purchase", "lead", "refund", "page_view"]))
    order = f"ord-{serial}"
    # Mostly just now; some sent late by a backend's batch (hours or days); a few from a clock
    # a little ahead.
    age = draw(
        st.one_of(
            st.integers(0, 600),
            st.integers(0, 600),
            st.integers(600, 9 * 86400),
            st.integers(-300, 0),
        )
    )
    when = now - timedelta(seconds=age)
    stamp = draw(
        st.sampled_from(
            [
                when.isoformat().replace("+00:00", "Z"),
                when.astimezone(timezone(timedelta(hours=2))).isoformat(),
                int(when.timestamp()),
            ]
        )
    )
    event: dict[str, Any] = {
        "event_name": name,
        "event_id": f"evt-{serial}" if draw(st.integers(0, 4)) else serial,
        "timestamp": stamp,
        "properties": draw(properties(name, order)),
        "context": draw(contexts(now)),
    }
    if draw(st.integers(0, 4)):
        event["visitor_id"] = f"vis_{draw(ID)}"
    if draw(st.booleans()):
        event["user_id"] = f"user_{draw(ID)}"
    if name != "page_view" or draw(st.booleans()):
        event["user_data"] = draw(user_datas())
    event["consent"] = draw(st.sampled_from([FULL_CONSENT, FULL_CONSENT, ANALYTICS_ONLY]))
    return event


# -- the path the server takes ------------------------------------------------------------------


@dataclass
class Fired:
    """A fired tag's stored item, and the destination it goes to."""

    tag: str
    destination: str
    item: Item


def intake(platforms: Platforms, container: Container, raw: dict[str, Any]) -> list[Fired]:
    """What ``/v1/track`` does with ``raw``: the tags that fired, with their stored payloads.

    A tag that did not fire for an invalid payload must say why with its PayloadError: an
    adapter's other exceptions come out as ``invalid payload: <type> failed: <Exception>``.
    """
    assert platforms.pipeline is not None
    now = datetime.now(UTC)
    accepted = platforms.pipeline.prepare(json.loads(json.dumps(raw)), container, now, False)
    fired = []
    for decision in accepted.decisions:
        if decision.fired:
            assert decision.payload is not None
            # Stored as JSON in the outbox and read back by the delivery worker.
            payload = jsonio.loads(jsonio.dumps(decision.payload))
            event_id = str(accepted.event["event_id"])
            item = Item(f"{decision.tag}:{event_id}", event_id, payload)
            fired.append(Fired(decision.tag, decision.destination, item))
            note(f"fired {decision.tag}")
            continue
        reason = decision.reason
        assert not re.search(r"^invalid payload: \S+ failed: ", reason), (decision.tag, reason)
        if reason.startswith("invalid payload:"):
            assert len(reason) > len("invalid payload: ") + 10, reason  # a message naming a rule
            note(f"refused {decision.tag}: {_gist(reason)}")
    return fired


def _gist(reason: str) -> str:
    """The start of a refusal, without the values it quotes (for hypothesis' statistics)."""
    return re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "…", reason.removeprefix("invalid payload: "))[:60]


def deliver(platforms: Platforms, container: Container, fired: Sequence[Fired]) -> None:
    """Send the items as the delivery worker does, each destination's together: checked,
    grouped by batch key, split into requests, built, sent to the emulator and read back.
    Every item must be delivered, or given up by ``check_item`` with a reason."""
    by_destination: dict[str, list[Fired]] = {}
    for one in fired:
        by_destination.setdefault(one.destination, []).append(one)
    for name, chosen in by_destination.items():
        adapter = container.destinations[name].adapter
        ctx = SendContext(datetime.now(UTC), platforms.token(adapter))
        groups: dict[str, list[Item]] = {}
        tags = {id(one.item): one.tag for one in chosen}
        for one in chosen:
            problem = adapter.check_item(one.item, ctx)
            if problem:
                assert isinstance(problem, str), problem
                note(f"given up at send time {one.tag}: {_gist(problem)}")
                continue
            groups.setdefault(adapter.batch_key(one.item), []).append(one.item)
        for items in groups.values():
            requests = adapter.split(items)
            assert split_problem(requests, items, adapter.max_batch) is None
            for request_items in requests:
                dropped = len(platforms.ga4.dropped)
                request = adapter.build_request(request_items, ctx)
                results = adapter.read_response(send(request), request_items)
                assert len(results) == len(request_items)
                note(f"{name}: a request of {min(len(request_items), 3)}+ item(s)")
                for item, result in zip(request_items, results, strict=True):
                    assert result.outcome is Outcome.DELIVERED, (
                        tags[id(item)],
                        result.error,
                        item.payload,
                    )
                if name == "ga4":  # GA4 answers 2xx to anything: what it dropped says more
                    assert platforms.ga4.dropped[dropped:] == [], (
                        platforms.ga4.dropped[dropped:],
                        [item.payload for item in request_items],
                    )


@st.composite
def containers_and_events(draw: st.DrawFn, count: int) -> tuple[int, list[dict[str, Any]]]:
    now = datetime.now(UTC)
    which = draw(st.integers(0, len(VARIANTS) - 1))
    return which, [draw(events(now, serial)) for serial in range(count)]


CONFORMANCE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@CONFORMANCE
@given(case=containers_and_events(1))
def test_an_event_is_refused_at_intake_or_accepted_by_every_platform(
    platforms: Platforms, case: tuple[int, list[dict[str, Any]]]
) -> None:
    which, (raw,) = case
    container = platforms.containers[which]

    fired = intake(platforms, container, raw)

    for one in fired:
        deliver(platforms, container, [one])


@settings(CONFORMANCE, max_examples=max(EXAMPLES // 3, 10))
@given(data=st.data())
def test_several_events_in_one_request_are_accepted_item_by_item(
    platforms: Platforms, data: st.DataObject
) -> None:
    which, raws = data.draw(containers_and_events(data.draw(st.integers(2, 8))))
    container = platforms.containers[which]
    # A visitor's events share GA4's client (one client per request): some share a visitor.
    shared = data.draw(st.sampled_from([None, "vis_shared"]))
    # A backend sends an order's events at once: some share their time too.
    stamp = data.draw(st.sampled_from([None, raws[0]["timestamp"]]))
    for raw in raws:
        if shared is not None:
            raw["visitor_id"] = shared
            raw["context"].pop("ga_client_id", None)
        if stamp is not None:
            raw["timestamp"] = stamp

    fired = [one for raw in raws for one in intake(platforms, container, raw)]

    deliver(platforms, container, fired)
