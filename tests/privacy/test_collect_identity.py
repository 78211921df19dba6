"""Browser collection, visitor identity and enrichment, privacy controls, rate limits, proxies."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from gunicorn.http.errors import InvalidChunkSize
from werkzeug.serving import make_server

from engine import api
from engine.app import create_app
from engine.cli import main
from engine.config import PublishableKey, ServerKey, Settings
from engine.errors import StoreError
from engine.maintenance import run_once
from engine.pipeline import Pipeline
from engine.ratelimit import RateLimiter
from engine.store.sqlite import SQLiteStore

SERVER_KEY = "sk_privacy_tests_0123456789"
PK = "pk_test_0123456789"
ORIGIN = "https://shop.example"
ALL_GRANTED = {p: "granted" for p in ("ad_storage", "analytics_storage", "ad_user_data")}

RULES = """
destinations:
  hook: {type: webhook, url: "http://127.0.0.1:9/hook"}
triggers: {all: {event: '*'}}
tags:
  - {name: to_hook, trigger: all, destination: hook}
"""


def make_app(tmp_path: Path, rules_text: str = RULES, **overrides: Any) -> Flask:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    settings = Settings(
        rules=rules,
        data_dir=tmp_path / "data",
        server_keys=(ServerKey(SERVER_KEY),),
        publishable_keys=(PublishableKey(PK, (ORIGIN,)),),
        **overrides,
    )
    return create_app(settings)


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return make_app(tmp_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def store_of(app: Flask) -> SQLiteStore:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    assert isinstance(pipeline.store, SQLiteStore)
    return pipeline.store


def collect(client: FlaskClient, event: dict[str, Any], **kwargs: Any) -> Any:
    headers = {"Origin": ORIGIN, "User-Agent": "Mozilla/5.0 test", **kwargs.pop("headers", {})}
    return client.post(
        f"/v1/collect?key={kwargs.pop('key', PK)}",
        data=json.dumps(event),
        content_type=kwargs.pop("content_type", "text/plain"),
        headers=headers,
        **kwargs,
    )


def track(client: FlaskClient, event: dict[str, Any]) -> Any:
    return client.post("/v1/track", json=event, headers={"Authorization": f"Bearer {SERVER_KEY}"})


def stored(app: Flask, event_id: str) -> dict[str, Any]:
    found = store_of(app).get_event(event_id)
    assert found is not None
    return dict(found.event)


def test_collect_sets_a_long_lived_first_party_visitor_cookie(client: FlaskClient) -> None:
    response = collect(client, {"event_name": "page_view", "consent": ALL_GRANTED})

    assert response.status_code == 200
    body = response.get_json()
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"tr_vid={body['visitor_id']};")
    for attribute in ("Max-Age=31536000", "Path=/", "HttpOnly", "SameSite=Lax", "Secure"):
        assert attribute in cookie
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"


def test_the_server_cookie_wins_over_the_visitor_id_in_the_body(client: FlaskClient) -> None:
    first = collect(client, {"event_name": "page_view"}).get_json()["visitor_id"]

    again = collect(client, {"event_name": "page_view", "visitor_id": "forged"}).get_json()

    assert again["visitor_id"] == first


def test_cookie_lifetime_and_domain_are_configurable(tmp_path: Path) -> None:
    app = make_app(tmp_path, cookie_max_age=400 * 86400, cookie_domain="shop.example")

    cookie = collect(app.test_client(), {"event_name": "page_view"}).headers["Set-Cookie"]

    assert "Max-Age=34560000" in cookie and "Domain=shop.example" in cookie


def test_a_store_outage_answer_carries_cors_so_the_page_can_read_it(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*_: Any, **__: Any) -> Any:
        raise StoreError("database is locked")

    monkeypatch.setattr(app.extensions["tagrelay.pipeline"], "accept", down)

    response = collect(client, {"event_name": "page_view"})

    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_a_disk_below_its_reserve_answers_collect_with_cors_and_retry_after(
    app: Flask, client: FlaskClient
) -> None:
    pipeline = app.extensions["tagrelay.pipeline"]
    pipeline.space.interval = 0
    pipeline.space.reserve_bytes = 64 * 2**20
    pipeline.store.free_bytes = lambda: 2**20

    response = collect(client, {"event_name": "page_view"})

    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"


def test_an_origin_not_allowed_for_the_key_is_refused_readably_and_nothing_more(
    client: FlaskClient,
) -> None:
    # The page's script reads the refusal, so it does not send the event again and again.
    response = collect(
        client, {"event_name": "page_view"}, headers={"Origin": "https://evil.example"}
    )

    assert response.status_code == 403
    assert response.get_json()["error"] == (
        "this page's origin is not allowed for the publishable key"
    )
    assert response.headers["Access-Control-Allow-Origin"] == "https://evil.example"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Access-Control-Expose-Headers" not in response.headers
    assert "Set-Cookie" not in response.headers


def test_an_unknown_publishable_key_is_refused_readably(client: FlaskClient) -> None:
    response = client.post(
        "/v1/collect?key=pk_nope",
        data=b'{"event_name": "page_view"}',
        headers={"Origin": ORIGIN, "Content-Type": "text/plain"},
    )

    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Set-Cookie" not in response.headers


def test_preflight_allows_only_the_keys_origins(client: FlaskClient) -> None:
    ok = client.options(f"/v1/collect?key={PK}", headers={"Origin": ORIGIN})
    bad = client.options(f"/v1/collect?key={PK}", headers={"Origin": "https://evil.example"})

    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Origin" not in bad.headers


def test_a_publishable_key_reaches_nothing_but_collect(client: FlaskClient) -> None:
    response = client.post(
        "/v1/track", json={"event_name": "x"}, headers={"Authorization": f"Bearer {PK}"}
    )

    assert response.status_code == 403
    assert "publishable" in response.get_json()["error"]


def test_a_server_key_is_not_a_publishable_key(client: FlaskClient) -> None:
    assert collect(client, {"event_name": "x"}, key=SERVER_KEY).status_code == 401


def test_oversized_collect_bodies_are_refused(client: FlaskClient) -> None:
    big = {"event_name": "x", "properties": {"blob": "a" * 70_000}}

    assert collect(client, big).status_code == 413


class _GunicornRequest:
    """What the server's pre_request hook notes of the gunicorn request being answered."""

    must_close = False


def test_a_collect_body_declared_over_the_limit_is_refused_unread_on_its_last_answer(
    client: FlaskClient,
) -> None:
    # Kept open, gunicorn would read on through the refused body to find the next request.
    declared, read_whole = _GunicornRequest(), _GunicornRequest()
    try:
        api.answering(declared)
        refused = collect(client, {"event_name": "x", "properties": {"blob": "a" * 70_000}})
        api.answering(read_whole)
        accepted = collect(client, {"event_name": "x"})
    finally:
        api.answering(None)

    assert (refused.status_code, declared.must_close) == (413, True)
    assert (accepted.status_code, read_whole.must_close) == (200, False)


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://elsewhere.example"}, {"X-Forwarded-For": "203.0.113.9"}],
    ids=["origin refused", "rate limited"],
)
def test_a_collect_body_declared_over_the_limit_is_refused_unread_before_anything_else(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    # A 403 or a 429 kept the connection, and gunicorn read on through the whole declared
    # body (any size) to find the next request, as /v1/track's 413 before its key prevents.
    client = make_app(tmp_path, rate_limit=1, trusted_proxies=1).test_client()
    collect(client, {"event_name": "x"}, headers={"X-Forwarded-For": "203.0.113.9"})
    declared = _GunicornRequest()
    try:
        api.answering(declared)
        big = {"event_name": "x", "properties": {"blob": "a" * 70_000}}
        refused = collect(client, big, headers=headers)
    finally:
        api.answering(None)

    assert (refused.status_code, declared.must_close) == (413, True)


class _MalformedChunks(io.RawIOBase):
    """A body as gunicorn hands a malformed chunked one to the app: reading it raises."""

    def readable(self) -> bool:
        return True

    def readinto(self, _buffer: Any) -> int:
        raise InvalidChunkSize(b"zz")


def test_a_malformed_chunked_body_is_a_400_with_cors(client: FlaskClient) -> None:
    response = client.post(
        f"/v1/collect?key={PK}",
        content_type="text/plain",
        headers={"Origin": ORIGIN},
        environ_overrides={"wsgi.input": _MalformedChunks(), "wsgi.input_terminated": True},
    )

    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json() == {"success": False, "error": "the chunked body is malformed"}
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"event_name": "page_view", "context": "junk"}, "context must be object"),
        ({"event_name": "page_view", "visitor_id": 5}, "visitor_id must be string"),
        ({"event_name": "page_view", "properties": []}, "properties must be object"),
        (["page_view"], "an event must be a JSON object"),
    ],
)
def test_collect_refuses_what_track_refuses_before_adding_its_own_fields(
    client: FlaskClient, event: Any, message: str
) -> None:
    # The server replaces the page's context IP and user agent and its visitor ID: a bad
    # value must get its error first, not be silently replaced.
    response = collect(client, event)

    assert response.status_code == 400
    assert response.get_json() == {"success": False, "error": message}
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_click_ids_are_captured_from_the_page_url_and_referrer(
    app: Flask, client: FlaskClient
) -> None:
    collect(
        client,
        {
            "event_name": "page_view",
            "event_id": "pv1",
            "consent": ALL_GRANTED,
            "context": {
                "page_url": f"{ORIGIN}/?gclid=Gc-1&ScCid=snap1",
                "referrer": "https://www.bing.com/?msclkid=ms-9&fbclid=IwAR-Mixed_Case",
            },
        },
    )

    context = stored(app, "pv1")["context"]
    assert (context["gclid"], context["sccid"], context["msclkid"]) == ("Gc-1", "snap1", "ms-9")
    assert context["fbclid"] == "IwAR-Mixed_Case"
    assert context["user_agent"] == "Mozilla/5.0 test"


@pytest.mark.parametrize("param", ["sccid", "SCCID", "ScCid"])
def test_a_click_id_parameter_is_read_in_any_case(
    app: Flask, client: FlaskClient, param: str
) -> None:
    page = {"page_url": f"{ORIGIN}/?{param}=snap1&GBRAID=gb-2"}
    collect(client, {"event_name": "page_view", "event_id": "pv2", "context": page})

    context = stored(app, "pv2")["context"]
    assert (context["sccid"], context["gbraid"]) == ("snap1", "gb-2")


def test_the_pages_own_ip_and_user_agent_are_never_taken(app: Flask, client: FlaskClient) -> None:
    claimed = {"ip": "198.51.100.9", "user_agent": "Forged/1.0"}
    collect(
        client,
        {"event_name": "page_view", "event_id": "pv3", "consent": ALL_GRANTED, "context": claimed},
        headers={"User-Agent": ""},
        environ_base={"REMOTE_ADDR": "not an address"},
    )

    context = stored(app, "pv3")["context"]
    assert "ip" not in context
    assert "user_agent" not in context


def test_a_server_sale_is_enriched_with_the_visitors_click_ids(
    app: Flask, client: FlaskClient
) -> None:
    visitor = collect(
        client,
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {
                "page_url": f"{ORIGIN}/?gclid=Gc-1&fbclid=IwAR-Mixed_Case&ttclid=tt-1",
                "fbp": "fb.1.1700000000000.42",
            },
        },
    ).get_json()["visitor_id"]

    response = track(
        client,
        {"event_name": "sale", "event_id": "s1", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert response.status_code == 200
    event = stored(app, "s1")
    context = event["context"]
    assert context["gclid"] == "Gc-1" and context["ttclid"] == "tt-1"
    assert context["fbp"] == "fb.1.1700000000000.42"
    assert context["fbc"].startswith("fb.1.") and context["fbc"].endswith(".IwAR-Mixed_Case")
    assert "context.gclid" in event["enriched"]


def test_the_fbc_made_of_an_fbclid_keeps_the_time_it_was_first_seen_when_the_page_is_seen_again(
    app: Flask, client: FlaskClient
) -> None:
    # A landing page reloaded (or its link opened again) carries the same fbclid: the same
    # click. Its fbc was made again with the later time, as a new click: Meta read the click as
    # newer than it was, and its attribution window started again.
    landing = {
        "event_name": "page_view",
        "consent": ALL_GRANTED,
        "context": {"page_url": f"{ORIGIN}/?fbclid=IwAR-same"},
    }
    visitor = collect(client, landing).get_json()["visitor_id"]
    track(
        client,
        {"event_name": "sale", "event_id": "s1", "visitor_id": visitor, "consent": ALL_GRANTED},
    )
    first = stored(app, "s1")["context"]["fbc"]
    time.sleep(0.01)  # the fbc's time is in milliseconds

    collect(client, landing)
    track(
        client,
        {"event_name": "sale", "event_id": "s2", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert stored(app, "s2")["context"]["fbc"] == first


def test_a_click_the_event_carries_itself_is_not_replaced_by_a_remembered_older_one(
    app: Flask, client: FlaskClient
) -> None:
    # Adapters prefer fbc to fbclid and gclid to gbraid: an old fbc or gclid added from the
    # store beside the event's own new click was sent in its place, crediting the old ad.
    visitor = collect(
        client,
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {
                "page_url": f"{ORIGIN}/?gclid=Gc-old&fbclid=Fb-old&ttclid=tt-old",
                "fbp": "fb.1.1700000000000.42",
            },
        },
    ).get_json()["visitor_id"]

    track(
        client,
        {
            "event_name": "sale",
            "event_id": "s-new-click",
            "visitor_id": visitor,
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/thanks?fbclid=Fb-new&gbraid=Gb-new"},
        },
    )
    landing = collect(
        client,
        {
            "event_name": "page_view",
            "event_id": "p-new-click",
            "visitor_id": visitor,
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?fbclid=Fb-newer"},
        },
        headers={"Cookie": f"tr_vid={visitor}"},
    )

    sale = stored(app, "s-new-click")["context"]
    assert "fbc" not in sale and "fbclid" not in sale  # Meta builds fbc from the URL's fbclid
    assert "gclid" not in sale  # Google Ads sends the URL's gbraid
    assert sale["ttclid"] == "tt-old" and sale["fbp"] == "fb.1.1700000000000.42"  # still given
    assert landing.status_code == 200, landing.get_data(as_text=True)
    page = stored(app, "p-new-click")["context"]
    assert page["fbclid"] == "Fb-newer" and "fbc" not in page
    later = track(
        client,
        {"event_name": "sale", "event_id": "s-later", "visitor_id": visitor,
         "consent": ALL_GRANTED},
    )  # fmt: skip
    assert later.status_code == 200
    assert stored(app, "s-later")["context"]["fbc"].endswith(".Fb-newer")  # the newest click


def test_a_later_click_of_a_platform_is_sent_in_place_of_its_earlier_remembered_one(
    app: Flask, client: FlaskClient
) -> None:
    # A gclid, then days later a click on iOS (gbraid): both were added to the sale, and
    # Google Ads, preferring gclid, was sent the earlier click.
    for click in ("gclid=Gc-earlier", "gbraid=Gb-later"):
        visitor = collect(
            client,
            {
                "event_name": "page_view",
                "consent": ALL_GRANTED,
                "context": {"page_url": f"{ORIGIN}/?{click}&msclkid=ms-{click[:2]}"},
            },
        ).get_json()["visitor_id"]
        time.sleep(0.01)

    track(
        client,
        {"event_name": "sale", "event_id": "s", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    context = stored(app, "s")["context"]
    assert context["gbraid"] == "Gb-later" and "gclid" not in context
    assert context["msclkid"] == "ms-gb"


def test_an_fbc_cookie_of_an_earlier_click_gives_way_to_the_landing_pages_fbclid(
    app: Flask, client: FlaskClient
) -> None:
    # The page's script read the _fbc cookie of the visitor's previous Meta click before the
    # pixel wrote the new one: the landing page's event and the later sale went to Meta with
    # the earlier click's fbc (the adapter prefers fbc to fbclid), crediting the earlier ad.
    def landing(event_id: str, fbclid: str, fbc: str) -> str:
        page = {
            "event_name": "page_view",
            "event_id": event_id,
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?fbclid={fbclid}", "fbc": fbc},
        }
        visitor: str = collect(client, page).get_json()["visitor_id"]
        return visitor

    def sale(event_id: str, visitor: str) -> str:
        sale = {"event_name": "sale", "event_id": event_id, "visitor_id": visitor}
        track(client, {**sale, "consent": ALL_GRANTED})
        fbc: str = stored(app, event_id)["context"]["fbc"]
        return fbc

    visitor = landing("p1", "Fb-new", "fb.1.1700000000000.Fb-earlier")
    assert sale("s1", visitor).endswith(".Fb-new")
    time.sleep(0.01)
    landing("p2", "Fb-same", "fb.2.1700000000000.Fb-same.AbCdEfGh")  # the pixel's own cookie
    assert sale("s2", visitor) == "fb.2.1700000000000.Fb-same.AbCdEfGh"

    assert "fbc" not in stored(app, "p1")["context"]  # Meta builds it from the fbclid
    assert stored(app, "p2")["context"]["fbc"] == "fb.2.1700000000000.Fb-same.AbCdEfGh"


def test_a_click_in_the_page_url_that_no_adapter_reads_leaves_the_remembered_one(
    app: Flask, client: FlaskClient
) -> None:
    # Adapters read ?gclid= by its name as Google writes it: a ?GCLID= was taken as the
    # event's own click, kept the remembered one out, and the conversion went with none.
    visitor = remembered_visitor(client)

    track(
        client,
        {"event_name": "sale", "event_id": "s-upper", "visitor_id": visitor,
         "consent": ALL_GRANTED, "context": {"page_url": f"{ORIGIN}/thanks?GCLID=Gc-new"}},
    )  # fmt: skip

    assert stored(app, "s-upper")["context"]["gclid"] == "Gc-9"


def test_a_server_events_page_url_click_is_remembered_for_the_visitors_later_events(
    app: Flask, client: FlaskClient
) -> None:
    # A backend that tracks landings itself (no tagrelay.js) sends the page URL with its click.
    track(
        client,
        {"event_name": "page_view", "event_id": "p-srv", "visitor_id": "v_srv",
         "consent": ALL_GRANTED,
         "context": {"page_url": f"{ORIGIN}/?gclid=Gc-srv&fbclid=Fb-srv&utm_source=x"}},
    )  # fmt: skip
    track(
        client,
        {"event_name": "sale", "event_id": "s-srv", "visitor_id": "v_srv", "consent": ALL_GRANTED},
    )
    track(
        client,
        {"event_name": "page_view", "event_id": "p-denied", "visitor_id": "v_denied",
         "consent": {"analytics_storage": "granted"},
         "context": {"page_url": f"{ORIGIN}/?gclid=Gc-denied"}},
    )  # fmt: skip
    track(
        client,
        {"event_name": "sale", "event_id": "s-denied", "visitor_id": "v_denied",
         "consent": ALL_GRANTED},
    )  # fmt: skip

    sale = stored(app, "s-srv")["context"]
    assert sale["gclid"] == "Gc-srv"
    assert sale["fbc"].startswith("fb.1.") and sale["fbc"].endswith(".Fb-srv")
    assert "gclid" not in stored(app, "p-srv")["context"]  # the event itself as sent
    assert "gclid" not in stored(app, "s-denied").get("context", {})  # not without ad_storage


def test_a_server_events_referrer_click_is_remembered_after_its_page_urls(
    app: Flask, client: FlaskClient
) -> None:
    # A form's backend sends the lead with the page it was on and the landing page before it.
    track(
        client,
        {"event_name": "lead", "event_id": "l-ref", "visitor_id": "v_ref",
         "consent": ALL_GRANTED,
         "context": {"page_url": f"{ORIGIN}/contact?ttclid=tt-page",
                     "referrer": f"{ORIGIN}/landing?gclid=Gc-ref&ttclid=tt-ref"}},
    )  # fmt: skip
    track(
        client,
        {"event_name": "sale", "event_id": "s-ref", "visitor_id": "v_ref", "consent": ALL_GRANTED},
    )

    sale = stored(app, "s-ref")["context"]
    assert (sale["gclid"], sale["ttclid"]) == ("Gc-ref", "tt-page")


def test_a_server_events_referrer_click_is_sent_in_place_of_the_remembered_older_one(
    app: Flask, client: FlaskClient
) -> None:
    # The lead's backend sends the landing page of a new ad click as the referrer. That click
    # is remembered as the newest, but the lead itself was enriched with the old one.
    old = {"page_url": f"{ORIGIN}/?gclid=Gc-old&fbclid=Fb-old&ttclid=tt-old"}
    track(
        client,
        {"event_name": "page_view", "event_id": "p-old", "visitor_id": "v_rn",
         "consent": ALL_GRANTED, "context": old},
    )  # fmt: skip
    track(
        client,
        {"event_name": "lead", "event_id": "l-rn", "visitor_id": "v_rn",
         "consent": ALL_GRANTED,
         "context": {"page_url": f"{ORIGIN}/contact",
                     "referrer": f"{ORIGIN}/landing?gbraid=Gb-new&fbclid=Fb-new&msclkid=ms-1"}},
    )  # fmt: skip

    lead = stored(app, "l-rn")
    context = lead["context"]
    assert context["gbraid"] == "Gb-new" and "gclid" not in context  # Google Ads: the new click
    assert context["fbclid"] == "Fb-new" and "fbc" not in context  # Meta: fbc from the new one
    assert context["ttclid"] == "tt-old"  # no newer TikTok click: the remembered one
    assert "msclkid" not in context  # nothing of it was remembered: not copied, as before
    assert {"context.gbraid", "context.fbclid"} <= set(lead["enriched"])


def test_identify_links_a_user_id_so_a_backend_event_by_user_finds_the_clicks(
    app: Flask, client: FlaskClient
) -> None:
    collect(
        client,
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?gclid=Gc-2"},
        },
    )
    collect(client, {"event_name": "identify", "user_id": "u42", "consent": ALL_GRANTED})

    track(
        client, {"event_name": "sale", "event_id": "s2", "user_id": "u42", "consent": ALL_GRANTED}
    )

    event = stored(app, "s2")
    assert event["context"]["gclid"] == "Gc-2"
    assert event["visitor_id"].startswith("v_")


def test_a_users_sale_takes_no_clicks_from_a_browser_another_user_signed_in_on_since(
    app: Flask,
) -> None:
    # Ada's sale by user ID took the browser she was last linked to, a shared one Bob had
    # signed in on since: it carried Bob's click, IP and user agent, crediting his ad.
    own, shared = app.test_client(), app.test_client()
    visitors = [
        collect(
            client,
            {
                "event_name": "page_view",
                "user_id": "ada",
                "consent": ALL_GRANTED,
                "context": {"page_url": f"{ORIGIN}/?{click}"},
            },
        ).get_json()["visitor_id"]
        for client, click in ((own, "gclid=ada-phone"), (shared, "fbclid=ada-shared"))
    ]
    collect(
        shared,
        {
            "event_name": "page_view",
            "user_id": "bob",
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?ttclid=bob-click"},
        },
        headers={"User-Agent": "Bob's browser"},
    )

    track(own, {"event_name": "sale", "event_id": "ada", "user_id": "ada", "consent": ALL_GRANTED})
    track(own, {"event_name": "sale", "event_id": "bob", "user_id": "bob", "consent": ALL_GRANTED})

    ada = stored(app, "ada")
    assert ada["visitor_id"] == visitors[0]  # her own browser, not the one Bob is signed in on
    assert ada["context"]["gclid"] == "ada-phone" and "ttclid" not in ada["context"]
    assert ada["context"]["user_agent"] != "Bob's browser"
    bob = stored(app, "bob")
    assert bob["visitor_id"] == visitors[1] and bob["context"]["ttclid"] == "bob-click"


def test_click_ids_are_not_remembered_without_ad_storage_consent(
    app: Flask, client: FlaskClient
) -> None:
    visitor = collect(
        client,
        {
            "event_name": "page_view",
            "consent": {"analytics_storage": "granted"},
            "context": {"page_url": f"{ORIGIN}/?gclid=Gc-3"},
        },
    ).get_json()["visitor_id"]

    track(client, {"event_name": "sale", "event_id": "s3", "visitor_id": visitor})

    assert "gclid" not in stored(app, "s3").get("context", {})


def remembered_visitor(client: FlaskClient) -> str:
    """A visitor whose click ID, cookie, user agent and IP the store remembers."""
    return str(
        collect(
            client,
            {
                "event_name": "page_view",
                "consent": ALL_GRANTED,
                "context": {"page_url": f"{ORIGIN}/?gclid=Gc-9", "fbp": "fb.1.1700000000000.7"},
            },
        ).get_json()["visitor_id"]
    )


@pytest.mark.parametrize(
    ("consent", "expected"),
    [
        ({}, set()),
        ({"analytics_storage": "granted"}, set()),
        ({"ad_storage": "granted"}, {"gclid", "fbp"}),
        ({"ad_user_data": "granted"}, {"user_agent", "ip"}),
        (ALL_GRANTED, {"gclid", "fbp", "user_agent", "ip"}),
    ],
)
def test_enrichment_gives_back_only_what_the_events_own_consent_allows(
    app: Flask, client: FlaskClient, consent: dict[str, str], expected: set[str]
) -> None:
    visitor = remembered_visitor(client)

    track(
        client, {"event_name": "sale", "event_id": "e1", "visitor_id": visitor, "consent": consent}
    )

    event = stored(app, "e1")
    remembered = {"gclid", "fbp", "user_agent", "ip"}
    assert remembered & set(event.get("context", {})) == expected
    assert {f.removeprefix("context.") for f in event.get("enriched", [])} == expected


@pytest.mark.parametrize(
    ("consent", "linked"),
    [
        ({}, False),
        ({"ad_storage": "denied", "analytics_storage": "denied", "ad_user_data": "denied"}, False),
        ({"ad_storage": "granted"}, False),
        ({"analytics_storage": "granted"}, True),
        ({"ad_user_data": "granted"}, True),
    ],
)
def test_the_user_id_comes_back_only_with_consent_for_it(
    app: Flask, client: FlaskClient, consent: dict[str, str], linked: bool
) -> None:
    # It came back whatever the consent: a backend event of a browser whose person had
    # withdrawn consent carried their user ID, and Meta got it as external_id under ad_storage.
    visitor = collect(
        client, {"event_name": "identify", "user_id": "u42", "consent": ALL_GRANTED}
    ).get_json()["visitor_id"]

    track(
        client, {"event_name": "sale", "event_id": "e3", "visitor_id": visitor, "consent": consent}
    )

    event = stored(app, "e3")
    assert (event.get("user_id") == "u42") is linked
    assert ("user_id" in event.get("enriched", [])) is linked


def test_enriched_names_no_ip_that_the_ip_policy_then_dropped(
    app: Flask, client: FlaskClient
) -> None:
    visitor = remembered_visitor(client)
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    pipeline.privacy = replace(pipeline.privacy, ip_storage="drop")

    track(
        client,
        {"event_name": "sale", "event_id": "e2", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    event = stored(app, "e2")
    assert "ip" not in event["context"]
    assert "context.ip" not in event["enriched"] and "context.gclid" in event["enriched"]


def test_an_unreadable_ip_gives_way_to_the_remembered_one(app: Flask, client: FlaskClient) -> None:
    """The event's IP is read before enrichment: text that is no address counts as none, so
    the visitor's remembered IP is used (it used to block it, and was then dropped)."""
    visitor = remembered_visitor(client)
    remembered = stored_visitor_ip(app, visitor)

    track(
        client,
        {
            "event_name": "sale",
            "event_id": "e3",
            "visitor_id": visitor,
            "consent": ALL_GRANTED,
            "context": {"ip": "unknown"},
        },
    )

    event = stored(app, "e3")
    assert event["context"]["ip"] == remembered
    assert "context.ip" in event["enriched"]


def stored_visitor_ip(app: Flask, visitor: str) -> str:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    found = pipeline.store.recall(visitor, None, datetime.now(UTC).timestamp(), {}, 86400.0)
    assert found is not None and found.ip
    return str(found.ip)


def test_click_ids_older_than_their_window_are_not_used(app: Flask) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    long_ago = datetime.now(UTC) - timedelta(days=31)
    pipeline.accept(
        [
            {
                "event_name": "page_view",
                "visitor_id": "v_old",
                "consent": ALL_GRANTED,
                "context": {"gclid": "Gc-old"},
            }
        ],
        now=long_ago,
    )

    pipeline.accept([{"event_name": "sale", "event_id": "s4", "visitor_id": "v_old"}])

    assert "gclid" not in stored(app, "s4").get("context", {})


def test_a_backend_event_sent_late_is_enriched_as_of_its_own_time(app: Flask) -> None:
    # Enriched as of its arrival: a sale sent two hours late took a TikTok click seen an hour
    # after it (Google Ads refuses a click after its conversion; the platforms credit the wrong
    # ad), and one sent two days late lost a click 29 days older than the sale.
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    now = datetime.now(UTC)

    def seen(visitor: str, ago: timedelta, **clicks: str) -> None:
        page = {"event_name": "page_view", "visitor_id": visitor, "consent": ALL_GRANTED}
        pipeline.accept([{**page, "context": clicks}], now=now - ago, source="browser")

    def sale(event_id: str, visitor: str, ago: timedelta) -> dict[str, Any]:
        event = {"event_name": "sale", "event_id": event_id, "visitor_id": visitor}
        when = (now - ago).isoformat()
        pipeline.accept([{**event, "timestamp": when, "consent": ALL_GRANTED}], now=now)
        context: dict[str, Any] = stored(app, event_id).get("context", {})
        return context

    seen("v_late", timedelta(hours=3), gclid="Gc-before")
    seen("v_late", timedelta(hours=1), ttclid="tt-after")
    seen("v_old", timedelta(days=31), gclid="Gc-29-days-before")

    late = sale("late", "v_late", timedelta(hours=2))
    old = sale("old", "v_old", timedelta(days=2))

    assert late["gclid"] == "Gc-before" and "ttclid" not in late
    assert old["gclid"] == "Gc-29-days-before"


@pytest.mark.parametrize(("days_ago", "used"), [(200, False), (31, False), (29, True)])
def test_a_remembered_ip_and_user_agent_are_used_only_within_the_attribution_window(
    app: Flask, days_ago: int, used: bool
) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    now = datetime.now(UTC)
    seen = {"ip": "198.51.100.23", "user_agent": "UA-then"}
    visit = {"event_name": "page_view", "visitor_id": "v_ua", "consent": ALL_GRANTED}
    pipeline.accept([{**visit, "context": seen}], now=now - timedelta(days=days_ago))
    # Seen again since, without ad_user_data: neither is seen anew.
    pipeline.accept([{**visit, "consent": {}}], now=now - timedelta(days=1))

    sale = {"event_name": "sale", "event_id": "s5", "visitor_id": "v_ua"}
    pipeline.accept([{**sale, "consent": ALL_GRANTED}], now=now)

    context = stored(app, "s5").get("context", {})
    assert (context.get("ip"), context.get("user_agent")) == (
        (seen["ip"], seen["user_agent"]) if used else (None, None)
    )


def test_a_returning_visitors_ip_and_user_agent_stay_fresh(app: Flask) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    now = datetime.now(UTC)
    visit = {"event_name": "page_view", "visitor_id": "v_back", "consent": ALL_GRANTED}
    for days_ago in (200, 100, 20):
        seen = {"ip": "198.51.100.23", "user_agent": "UA-same"}
        pipeline.accept([{**visit, "context": seen}], now=now - timedelta(days=days_ago))

    sale = {"event_name": "sale", "event_id": "s6", "visitor_id": "v_back"}
    pipeline.accept([{**sale, "consent": ALL_GRANTED}], now=now)

    context = stored(app, "s6")["context"]
    assert (context["ip"], context["user_agent"]) == ("198.51.100.23", "UA-same")


def test_a_remembered_ip_copied_into_backend_events_still_ages_out(app: Flask) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    start = datetime.now(UTC) - timedelta(days=40)
    seen = {"ip": "198.51.100.23", "user_agent": "UA-then"}
    visit = {"event_name": "page_view", "visitor_id": "v_crm", "consent": ALL_GRANTED}
    pipeline.accept([{**visit, "event_id": "b0", "context": seen}], now=start)
    # Only backend events from then on, every two days: no IP or user agent of their own.
    for day in range(2, 40, 2):
        update = {"event_name": "crm_update", "event_id": f"k{day}", "visitor_id": "v_crm"}
        pipeline.accept([{**update, "consent": ALL_GRANTED}], now=start + timedelta(days=day))

    sale = {"event_name": "sale", "event_id": "s7", "visitor_id": "v_crm"}
    pipeline.accept([{**sale, "consent": ALL_GRANTED}])

    assert stored(app, "k20")["context"]["ip"] == "198.51.100.23"  # within its 30 days
    assert "ip" not in stored(app, "s7").get("context", {})  # the client sent it 40 days ago


@pytest.mark.parametrize(
    ("consent", "expected"),
    [
        (ALL_GRANTED, "203.0.113.77"),
        ({"analytics_storage": "granted"}, "203.0.113.0"),
        ({}, None),
    ],
)
def test_the_ip_is_kept_truncated_or_dropped_by_consent_before_storage(
    app: Flask, client: FlaskClient, consent: dict[str, str], expected: str | None
) -> None:
    track(
        client,
        {
            "event_name": "x",
            "event_id": "ip1",
            "consent": consent,
            "context": {"ip": "203.0.113.77"},
        },
    )

    assert stored(app, "ip1").get("context", {}).get("ip") == expected


def test_ip_storage_drop_never_stores_an_ip(tmp_path: Path) -> None:
    app = make_app(tmp_path, ip_storage="drop")

    track(
        app.test_client(),
        {
            "event_name": "x",
            "event_id": "ip2",
            "consent": ALL_GRANTED,
            "context": {"ip": "203.0.113.77"},
        },
    )

    assert "ip" not in stored(app, "ip2").get("context", {})


OTHER_IPS = {
    "client_ip": "203.0.113.77",
    "clientIP": "203.0.113.77",
    "x_forwarded_for": "203.0.113.77, 10.0.0.1",
    "X-Real-IP": "203.0.113.77",
    "remote_addr": "203.0.113.77",
    "device": {"ip": "2001:db8::7", "model": "Pixel"},
    "shipping": "standard",
}


@pytest.mark.parametrize(
    ("ip_storage", "consent", "kept"),
    [
        ("drop", ALL_GRANTED, False),
        ("truncate", ALL_GRANTED, False),
        ("consent", {"analytics_storage": "granted"}, False),
        ("consent", {}, False),
        ("consent", ALL_GRANTED, True),
        ("keep", {}, True),
    ],
)
def test_an_ip_under_another_name_follows_the_ip_policy(
    tmp_path: Path, ip_storage: str, consent: dict[str, str], kept: bool
) -> None:
    # Only context.ip was dropped or truncated: the same address under client_ip,
    # x_forwarded_for or remote_addr (or nested) was stored and forwarded whole.
    app = make_app(tmp_path, ip_storage=ip_storage)

    track(
        app.test_client(),
        {"event_name": "x", "event_id": "ip3", "consent": consent, "context": OTHER_IPS},
    )

    context = stored(app, "ip3")["context"]
    if kept:
        assert context == OTHER_IPS
    else:
        assert context == {"device": {"model": "Pixel"}, "shipping": "standard"}


def test_rate_limit_answers_429_with_retry_after_per_key(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limit=3)
    client = app.test_client()

    answers = [track(client, {"event_name": "x"}) for _ in range(4)]
    browser = collect(client, {"event_name": "x"})

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
    assert "rate limit" in answers[3].get_json()["error"]
    assert browser.status_code == 200  # another key, its own budget


def test_the_client_ip_comes_from_x_forwarded_for_only_behind_trusted_proxies(
    tmp_path: Path,
) -> None:
    plain = make_app(tmp_path / "a")
    proxied = make_app(tmp_path / "b", trusted_proxies=1)
    headers = {"X-Forwarded-For": "198.51.100.9, 203.0.113.5"}
    event = {"event_name": "x", "event_id": "p1", "consent": ALL_GRANTED}

    collect(plain.test_client(), event, headers=headers)
    collect(proxied.test_client(), event, headers=headers)

    assert stored(plain, "p1")["context"]["ip"] == "127.0.0.1"
    assert stored(proxied, "p1")["context"]["ip"] == "203.0.113.5"  # only the last hop is ours


# -- anonymous copies over HTTP: URLs and IPs ---------------------------------------------------

# Every built-in adapter that reads the page URL, each allowed an anonymous copy.
ANONYMOUS_RULES = """
destinations:
  ga4: {type: ga4, measurement_id: G-TEST1, api_secret: s, endpoint: "http://127.0.0.1:9"}
  meta: {type: meta_capi, pixel_id: "123", access_token: t, endpoint: "http://127.0.0.1:9"}
  tiktok: {type: tiktok, pixel_code: CTEST, access_token: t, endpoint: "http://127.0.0.1:9"}
  gads:
    type: google_ads
    customer_id: "123-456-7890"
    conversion_action: "111"
    developer_token: d
    client_id: c
    client_secret: s
    refresh_token: r
    endpoint: "http://127.0.0.1:9"
    currency: EUR
  hook: {type: webhook, url: "http://127.0.0.1:9/hook"}
triggers:
  all: {event: '*'}
tags:
  - {name: ga4, trigger: all, destination: ga4, event_name: page_view,
     consent: {require: [analytics_storage, ad_user_data], anonymous: [analytics_storage]}}
  - {name: meta, trigger: all, destination: meta, event_name: PageView,
     consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}}
  - {name: tiktok, trigger: all, destination: tiktok, event_name: ViewContent,
     consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}}
  - {name: gads, trigger: all, destination: gads,
     consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}}
  - {name: hook, trigger: all, destination: hook, consent: {anonymous: [analytics_storage]}}
"""
ANALYTICS_ONLY = {"analytics_storage": "granted"}


def outbox(app: Flask, event_id: str) -> dict[str, Any]:
    """The queued payload of each tag that fired on the event."""
    with sqlite3.connect(store_of(app).path) as db:
        rows = db.execute(
            "SELECT tag, payload FROM deliveries WHERE event_id = ?", (event_id,)
        ).fetchall()
    return {tag: json.loads(payload) for tag, payload in rows}


UNPARSABLE_URLS = [
    "http://[shop.example/landing?gclid=G-SECRET",  # "[" never closed
    "https://[shop.example]/?gclid=G-SECRET",  # no IP address in the brackets
]


@pytest.mark.parametrize("url", UNPARSABLE_URLS)
def test_an_unparsable_page_url_is_accepted_on_every_endpoint_and_left_out_of_anonymous_copies(
    tmp_path: Path, url: str
) -> None:
    app = make_app(tmp_path, ANONYMOUS_RULES)
    client = app.test_client()
    # An IP beside the user agent: Meta takes no event whose only customer information is the
    # user agent (platforms.md §1.3).
    context = {"page_url": url, "referrer": url, "user_agent": "UA", "ip": "203.0.113.7"}
    bad = {
        "event_name": "page_view",
        "visitor_id": "v_1",
        "consent": ANALYTICS_ONLY,
        "context": context,
    }

    single = track(client, {**bad, "event_id": "single"})
    batch = client.post(
        "/v1/track/batch",
        json={"events": [{"event_name": "sale", "event_id": "innocent"}, {**bad, "event_id": "b"}]},
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
    )
    browser = collect(client, {**bad, "event_id": "browser"})
    full = track(client, {**bad, "event_id": "full", "consent": ALL_GRANTED})

    assert [r.status_code for r in (single, batch, browser, full)] == [200, 200, 200, 200]
    assert batch.get_json()["accepted"] == 2
    assert stored(app, "innocent")["event_name"] == "sale"
    for event_id in ("single", "b", "browser"):
        sent = json.dumps(outbox(app, event_id))
        # Meta needs the page URL of a website event, and Google Ads a click ID: without
        # them, their anonymous copies are not sent (and the decision says why).
        assert set(outbox(app, event_id)) == {"ga4", "tiktok", "hook"}
        assert "G-SECRET" not in sent and "shop.example" not in sent
        assert stored(app, event_id)["context"]["page_url"] == url  # stored as it came
    assert "G-SECRET" in json.dumps(outbox(app, "full")["meta"])  # full consent: forwarded


def test_anonymous_copies_carry_no_linker_or_shopping_click_ids(
    tmp_path: Path,
) -> None:
    app = make_app(tmp_path, ANONYMOUS_RULES)
    client = app.test_client()
    gl = "1*1x2y3z*_gcl_aw*R0NMLjE3MzIxMDAwMDAuR0NMSUQtU0VDUkVU*_ga*MTIzNDU2Nzg5MC4xNzMyMTAwMDAw"
    queries = {
        "gl": f"_gl={gl}&utm_source=news",
        "srsltid": "srsltid=AfmBOoSECRETCLICK&utm_source=news",
        "mixed": "Gclsrc=aw.ds&wbraid=W1&_hsenc=H1&mc_eid=M1&utm_source=news",
    }

    for event_id, query in queries.items():
        collect(
            client,
            {
                "event_name": "page_view",
                "event_id": event_id,
                "consent": ANALYTICS_ONLY,
                "context": {"page_url": f"{ORIGIN}/p?{query}", "referrer": f"{ORIGIN}/#{query}"},
            },
        )

    for event_id in queries:
        sent = outbox(app, event_id)
        assert sent["ga4"]["event"]["params"]["page_location"] == f"{ORIGIN}/p?utm_source=news"
        assert sent["hook"]["context"]["page_url"] == f"{ORIGIN}/p?utm_source=news"
        assert sent["hook"]["context"]["referrer"] == f"{ORIGIN}/#utm_source=news"


def test_an_ipv4_mapped_client_address_is_kept_truncated_and_remembered_as_plain_ipv4(
    tmp_path: Path,
) -> None:
    app = make_app(tmp_path, ANONYMOUS_RULES)
    client = app.test_client()
    mapped = {"REMOTE_ADDR": "::ffff:203.0.113.7"}  # an IPv4 client of a server on [::]

    visitor = collect(
        client,
        {"event_name": "page_view", "event_id": "pv", "consent": ALL_GRANTED},
        environ_base=mapped,
    ).get_json()["visitor_id"]
    collect(
        client,
        {"event_name": "page_view", "event_id": "anon", "consent": ANALYTICS_ONLY},
        environ_base=mapped,
    )
    track(
        client,
        {"event_name": "sale", "event_id": "later", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert stored(app, "pv")["context"]["ip"] == "203.0.113.7"
    assert stored(app, "anon")["context"]["ip"] == "203.0.113.0"
    assert outbox(app, "anon")["ga4"]["request"]["ip_override"] == "203.0.113.0"
    assert stored(app, "later")["context"]["ip"] == "203.0.113.7"  # remembered plain


@pytest.mark.parametrize(
    ("forwarded_for", "ip"),
    [
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("198.51.100.9, ::ffff:203.0.113.7", "203.0.113.7"),
        ("::ffff:cb00:7107", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
    ],
)
def test_a_trusted_proxys_ipv4_mapped_forwarded_for_is_stored_as_plain_ipv4(
    tmp_path: Path, forwarded_for: str, ip: str
) -> None:
    app = make_app(tmp_path, trusted_proxies=1)

    collect(
        app.test_client(),
        {"event_name": "x", "event_id": "p1", "consent": ALL_GRANTED},
        headers={"X-Forwarded-For": forwarded_for},
    )

    assert stored(app, "p1")["context"]["ip"] == ip


def test_a_backend_events_ipv4_mapped_ip_is_stored_as_plain_ipv4(
    app: Flask, client: FlaskClient
) -> None:
    for event_id, consent in (("keep", ALL_GRANTED), ("truncate", ANALYTICS_ONLY)):
        track(
            client,
            {
                "event_name": "x",
                "event_id": event_id,
                "consent": consent,
                "context": {"ip": "::ffff:203.0.113.7"},
            },
        )

    assert stored(app, "keep")["context"]["ip"] == "203.0.113.7"
    assert stored(app, "truncate")["context"]["ip"] == "203.0.113.0"


def test_a_backend_events_ip_is_stored_as_the_address_it_names_or_not_at_all(
    app: Flask, client: FlaskClient
) -> None:
    """A copied X-Forwarded-For list, a port or text that is no address: GA4 and TikTok used
    to receive ``203.0.113.7, 10.0.0.1`` as the client's IP, as sent (Meta dropped it)."""
    for event_id, ip in (
        ("list", "203.0.113.7, 10.0.0.1"),
        ("port", "[2001:db8::7]:443"),
        ("unknown", "unknown"),
    ):
        track(
            client,
            {
                "event_name": "x",
                "event_id": event_id,
                "consent": ALL_GRANTED,
                "context": {"ip": ip},
            },
        )

    assert stored(app, "list")["context"]["ip"] == "203.0.113.7"
    assert stored(app, "port")["context"]["ip"] == "2001:db8::7"
    assert "ip" not in stored(app, "unknown")["context"]


def test_an_ipv4_client_has_one_rate_limit_however_its_address_is_written(
    tmp_path: Path,
) -> None:
    app = make_app(tmp_path, rate_limit=2, trusted_proxies=1)
    client = app.test_client()

    def from_ip(ip: str) -> int:
        answer = collect(client, {"event_name": "x"}, headers={"X-Forwarded-For": ip})
        return int(answer.status_code)

    answers = [from_ip(ip) for ip in ("198.51.100.1", "::ffff:198.51.100.1", "::ffff:c633:6401")]

    assert answers == [200, 200, 429]


@pytest.fixture
def dual_stack_url(app: Flask) -> Iterator[str]:
    """The app served over real HTTP on [::], reached over IPv4 (a dual-stack listener)."""
    try:
        server = make_server("::", 0, app)
    except OSError:
        pytest.skip("no IPv6 on this host")
    port = server.socket.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        server.server_close()
        pytest.skip("the IPv6 listener takes no IPv4 connections here (bindv6only)")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_an_ipv4_client_of_a_dual_stack_listener_is_stored_as_ipv4(
    app: Flask, dual_stack_url: str
) -> None:
    def send(event_id: str, consent: dict[str, str]) -> int:
        answer = requests.post(
            f"{dual_stack_url}/v1/collect?key={PK}",
            data=json.dumps({"event_name": "page_view", "event_id": event_id, "consent": consent}),
            headers={"Origin": ORIGIN, "Content-Type": "text/plain"},
            timeout=10,
        )
        return answer.status_code

    assert send("kept", ALL_GRANTED) == 200
    assert send("truncated", ANALYTICS_ONLY) == 200

    assert stored(app, "kept")["context"]["ip"] == "127.0.0.1"
    assert stored(app, "truncated")["context"]["ip"] == "127.0.0.0"


def test_retention_purges_old_events_and_identities_but_not_pending_ones(app: Flask) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    store = store_of(app)
    old = datetime.now(UTC) - timedelta(days=400)
    pipeline.accept(
        [
            {
                "event_name": "x",
                "event_id": "old",
                "visitor_id": "v1",
                "consent": ALL_GRANTED,
                "context": {"gclid": "g"},
            }
        ],
        now=old,
    )
    pipeline.accept([{"event_name": "x", "event_id": "new"}])
    with store._write() as db:
        db.execute("UPDATE deliveries SET status = 'delivered' WHERE event_id = 'old'")

    removed = run_once(store, retention_days=395)

    assert removed["events"] == 1 and removed["visitors"] == 1
    assert store.get_event("old") is None and store.get_event("new") is not None
    assert store.recall("v1", None, datetime.now(UTC).timestamp(), {}, 1e9) is None


def test_retention_drops_a_returning_visitors_click_ids_older_than_retention(app: Flask) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    store = store_of(app)
    now = datetime.now(UTC)
    first = {"gclid": "Gc-400-days", "ip": "198.51.100.23", "user_agent": "UA-400-days"}
    visit = {"event_name": "page_view", "visitor_id": "v_regular"}
    pipeline.accept(
        [{**visit, "consent": ALL_GRANTED, "context": first}], now=now - timedelta(days=400)
    )
    for days_ago in (300, 200, 100):  # back without ad consent: nothing new remembered
        pipeline.accept([{**visit, "consent": {}}], now=now - timedelta(days=days_ago))
    later = {"fbp": "fb.1.1.100-days"}
    pipeline.accept(
        [{**visit, "consent": ALL_GRANTED, "context": later}], now=now - timedelta(days=1)
    )
    with store._write() as db:
        db.execute("UPDATE deliveries SET status = 'delivered'")

    removed = run_once(store, retention_days=395)

    found = store.recall("v_regular", None, now.timestamp(), {}, 1e9)
    assert found is not None  # still a visitor
    assert set(found.values) == {"fbp"}
    assert (found.ip, found.user_agent) == (None, None)
    assert removed["visitors"] == 0 and removed["visitor_values"] == 3


def test_retention_drops_a_user_id_the_browser_was_last_logged_in_with_before_the_cut_off(
    app: Flask,
) -> None:
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    store = store_of(app)
    now = datetime.now(UTC)
    visit = {"event_name": "page_view", "visitor_id": "v_shared", "consent": ALL_GRANTED}
    pipeline.accept(
        [{**visit, "event_id": "login", "user_id": "ada"}], now=now - timedelta(days=400)
    )
    # Back since without logging in: each event is enriched with Ada's ID, a copy from the
    # store, not the client's word that she is still the one using the browser.
    for days_ago in (300, 200, 100, 1):
        pipeline.accept(
            [{**visit, "event_id": f"pv{days_ago}"}], now=now - timedelta(days=days_ago)
        )
    with store._write() as db:
        db.execute("UPDATE deliveries SET status = 'delivered'")

    removed = run_once(store, retention_days=395)

    assert store.recall(None, "ada", now.timestamp(), {}, 1e9) is None
    found = store.recall("v_shared", None, now.timestamp(), {}, 1e9)
    assert found is not None and found.user_id is None
    assert removed["visitors"] == 0 and removed["links"] == 1


def test_forget_erases_a_person_and_reports_what_it_removed(
    app: Flask, client: FlaskClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    visitor = collect(
        client,
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?gclid=G"},
        },
    ).get_json()["visitor_id"]
    collect(client, {"event_name": "identify", "user_id": "u7", "consent": ALL_GRANTED})
    track(client, {"event_name": "sale", "event_id": "mine", "user_id": "u7"})
    track(
        client,
        {"event_name": "lead", "event_id": "by_mail", "user_data": {"email": " Ada@Example.com "}},
    )
    track(client, {"event_name": "sale", "event_id": "someone_else", "user_id": "u8"})

    code = main(["forget", "--user-id", "u7", "--json", "--data-dir", str(tmp_path / "data")])
    by_user = json.loads(capsys.readouterr().out)
    main(["forget", "--email", "ada@example.com", "--json", "--data-dir", str(tmp_path / "data")])
    by_email = json.loads(capsys.readouterr().out)

    store = store_of(app)
    assert code == 0
    assert by_user["events"] == 3 and by_user["visitors"] == 1  # 2 collected + the sale
    assert by_user["deliveries"] == 3  # pending deliveries go too
    assert by_email["events"] == 1
    assert store.get_event("someone_else") is not None
    assert store.recall(visitor, None, datetime.now(UTC).timestamp(), {}, 1e9) is None


def _shared_browser(client: FlaskClient) -> str:
    """Ada and Bob log in, in turn, on one browser; Bob also orders from his phone and backend.

    Returns the shared browser's visitor ID.
    """
    shared = collect(
        client, {"event_name": "page_view", "event_id": "anon-before", "consent": ALL_GRANTED}
    ).get_json()["visitor_id"]
    for user in ("ada", "bob"):
        login = {"event_name": "identify", "event_id": f"{user}-login", "user_id": user}
        collect(client, {**login, "consent": ALL_GRANTED})
    # Nobody logged in: the pipeline guesses the last user of the browser (bob), unproven.
    collect(client, {"event_name": "page_view", "event_id": "anon-after", "consent": ALL_GRANTED})
    orders = [
        {"event_id": "bob-phone", "user_id": "bob", "visitor_id": "v_bobs_phone"},
        {"event_id": "bob-backend", "user_id": "bob"},
        {"event_id": "ada-backend", "user_id": "ada"},
    ]
    for order in orders:
        track(client, {"event_name": "sale", "consent": ALL_GRANTED, **order})
    return str(shared)


def _kept(app: Flask, *event_ids: str) -> dict[str, bool]:
    store = store_of(app)
    return {e: store.get_event(e) is not None for e in event_ids}


ALL_EVENTS = ("anon-before", "ada-login", "bob-login", "anon-after", "bob-phone", "bob-backend")


def test_forgetting_one_user_of_a_shared_browser_keeps_the_other_users_events(
    app: Flask, client: FlaskClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = _shared_browser(client)

    main(["forget", "--user-id", "ada", "--json", "--data-dir", str(tmp_path / "data")])

    removed = json.loads(capsys.readouterr().out)
    assert _kept(app, *ALL_EVENTS, "ada-backend") == {
        "anon-before": False,  # on Ada's browser, with no user: may be hers
        "ada-login": False,
        "bob-login": True,  # on Ada's browser, but sent as Bob's
        "anon-after": False,  # on Ada's browser, Bob only guessed
        "bob-phone": True,
        "bob-backend": True,
        "ada-backend": False,
    }
    assert removed["events"] == 4 and removed["deliveries"] == 4  # pending ones included
    assert store_of(app).depth() == {"hook": 3}  # Bob's deliveries are still to be sent
    now = datetime.now(UTC).timestamp()
    # The shared browser's identity goes (nothing in it says whose it is); Bob's phone stays.
    assert store_of(app).recall(shared, None, now, {}, 1e9) is None
    assert store_of(app).recall(None, "bob", now, {}, 1e9) is not None


def test_forgetting_a_visitor_keeps_what_its_users_did_elsewhere(
    app: Flask, client: FlaskClient
) -> None:
    shared = _shared_browser(client)

    removed = store_of(app).forget(visitor_id=shared)

    # The browser's events that no user was sent with go; its users' own stay, on the browser
    # and everywhere else (forget them by --user-id).
    assert _kept(app, *ALL_EVENTS, "ada-backend") == {
        "anon-before": False,
        "ada-login": True,
        "bob-login": True,
        "anon-after": False,
        "bob-phone": True,
        "bob-backend": True,
        "ada-backend": True,
    }
    assert removed["events"] == 2 and removed["visitors"] == 1


def test_forgetting_by_email_on_a_shared_browser_keeps_the_other_users_events(
    app: Flask, client: FlaskClient
) -> None:
    shared = _shared_browser(client)
    login = {"event_name": "identify", "event_id": "bob-again", "user_id": "bob"}
    collect(client, {**login, "consent": ALL_GRANTED})
    # Ada orders on the shared browser without logging in: Bob's ID is guessed onto her order.
    order = {"event_name": "sale", "event_id": "ada-order", "visitor_id": shared}
    track(client, {**order, "consent": ALL_GRANTED, "user_data": {"email": "ada@example.com"}})
    assert stored(app, "ada-order")["user_id"] == "bob"

    store_of(app).forget(email="ada@example.com")

    assert _kept(app, "ada-order", "bob-login", "bob-again", "bob-phone", "bob-backend") == {
        "ada-order": False,
        "bob-login": True,
        "bob-again": True,
        "bob-phone": True,
        "bob-backend": True,
    }


def test_tagrelay_js_is_served(client: FlaskClient) -> None:
    response = client.get("/tagrelay.js")

    assert response.status_code == 200
    assert response.content_type.startswith("text/javascript")
    assert b"getVisitorId" in response.data


def test_large_limits_write_the_shared_counter_once_per_batch(app: Flask) -> None:
    from engine.ratelimit import RateLimiter

    store = store_of(app)
    limiter = RateLimiter(store, limit=1000)  # batches of 10
    for _ in range(25):
        limiter.check("k", 120.0)

    rows = store._read("SELECT n FROM rate_counters")
    assert [r["n"] for r in rows] == [20]  # two flushes of 10; 5 still local


def test_processes_sharing_a_store_share_the_limit(app: Flask) -> None:
    from engine.errors import TooManyRequests
    from engine.ratelimit import RateLimiter

    store = store_of(app)
    one, two = RateLimiter(store, limit=4), RateLimiter(store, limit=4)
    for limiter in (one, two, one, two):
        limiter.check("k", 60.0)

    with pytest.raises(TooManyRequests):
        one.check("k", 61.0)
    one.check("k", 121.0)  # a new window


def test_a_rate_counter_reveals_no_client_ip(tmp_path: Path) -> None:
    import hashlib

    app = make_app(tmp_path, rate_limit=50, trusted_proxies=1, ip_storage="drop")
    collect(app.test_client(), {"event_name": "x"}, headers={"X-Forwarded-For": "198.51.100.77"})
    other = make_app(tmp_path / "other", rate_limit=50, trusted_proxies=1)
    collect(other.test_client(), {"event_name": "x"}, headers={"X-Forwarded-For": "198.51.100.77"})

    [key] = [r["key"] for r in store_of(app)._read("SELECT key FROM rate_counters")]
    [elsewhere] = [r["key"] for r in store_of(other)._read("SELECT key FROM rate_counters")]
    # Whoever knows the public key cannot try every IP against the counter: the name is keyed
    # by a random secret of the store's, which another store does not share.
    plain = hashlib.sha256(f"{PK}|198.51.100.77".encode()).hexdigest()
    assert not plain.startswith(key) and key not in plain
    assert key != elsewhere
    # The same store, opened again (another worker or host), names the counter the same.
    reopened = SQLiteStore(store_of(app).path)
    limiter = RateLimiter(reopened, limit=50)
    assert limiter.counter_key(f"{PK}|198.51.100.77") == key


def test_a_limiter_keeps_no_count_of_past_minutes_in_memory(app: Flask) -> None:
    limiter = RateLimiter(store_of(app), limit=1000)
    for n in range(20):  # twenty visitors in one minute
        limiter.check(f"{PK}|198.51.100.{n}", 60.0)

    limiter.check(f"{PK}|198.51.100.99", 125.0)  # the next minute's first

    assert len(limiter._counts) == 1


def test_stores_opened_at_once_make_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    SQLiteStore(path).close()
    stores = [SQLiteStore(path) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda s: s.secret("k"), stores))

    assert len(secrets) == 1 and len(secrets.pop()) == 32
    assert SQLiteStore(path).secret("other") != SQLiteStore(path).secret("k")


def test_a_publishable_key_is_limited_per_client_ip(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limit=2, trusted_proxies=1)
    client = app.test_client()

    def from_ip(ip: str) -> int:
        answer = collect(client, {"event_name": "x"}, headers={"X-Forwarded-For": ip})
        return int(answer.status_code)

    assert [from_ip("198.51.100.1") for _ in range(3)] == [200, 200, 429]
    assert from_ip("198.51.100.2") == 200  # another visitor of the same site


META_RULES = """
destinations:
  meta: {type: meta_capi, pixel_id: "1234567890", access_token: "EAAB-test-token-0123456789"}
triggers: {all: {event: '*'}}
tags:
  - {name: to_meta, trigger: all, destination: meta, event_name: Lead,
     consent: {require: [ad_storage, ad_user_data], anonymous: [analytics_storage]}}
"""


@pytest.mark.parametrize(
    "consent",
    [ALL_GRANTED, {"analytics_storage": "granted"}],
    ids=["full consent", "analytics only"],
)
def test_personal_data_in_the_page_url_is_neither_stored_nor_sent(
    tmp_path: Path, consent: dict[str, str]
) -> None:
    # A sign-up form sent by GET: Meta takes event_source_url in clear text.
    app = make_app(tmp_path, META_RULES)
    client = app.test_client()
    page = f"{ORIGIN}/thanks?email=ada%40example.com&phone=%2B4915112345678&utm_source=news"
    for send in (collect, track):
        # (With an IP: Meta takes no event whose only customer information is the user agent.)
        context = {"page_url": page, "user_agent": "Mozilla/5.0 test", "ip": "203.0.113.7"}
        event = {"event_name": "sign_up", "consent": consent, "context": context}
        answer = send(client, event).get_json()
        assert answer["success"] is True, answer
        kept = stored(app, answer["event_id"])
        assert kept["context"]["page_url"] == (
            f"{ORIGIN}/thanks?email=(redacted)&phone=(redacted)&utm_source=news"
        )
    with sqlite3.connect(store_of(app).path) as db:
        payloads = [row[0] for row in db.execute("SELECT payload FROM deliveries")]
    assert len(payloads) == 2
    # (Not "ada" alone: the event IDs and hashes are hex, which "ada" can be part of.)
    assert not [p for p in payloads if "ada@" in p or "ada%40" in p or "4915112345678" in p]


IDENTITY_SECRET = "idsec_0123456789abcdef"


def _hash(user_id: str, secret: str = IDENTITY_SECRET) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def test_a_browser_cannot_tie_itself_to_another_users_conversions_with_verification_on(
    tmp_path: Path,
) -> None:
    # The attack: a page claims the victim's user ID with its own click IDs, IP and user agent;
    # the victim's next backend sale was enriched with them and sent to the platforms as theirs.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    client = app.test_client()
    claim = {"event_name": "identify", "user_id": "victim_42", "consent": ALL_GRANTED}
    landing = {"page_url": f"{ORIGIN}/?gclid=ATTACKER_GCLID"}

    refused = collect(client, {**claim, "context": landing})
    forged = collect(client, {**claim, "context": landing, "user_hash": _hash("attacker")})
    sale = track(client, {"event_name": "sale", "user_id": "victim_42", "consent": ALL_GRANTED})

    assert refused.status_code == 403
    assert "user_id needs its user_hash" in refused.get_json()["error"]
    assert forged.status_code == 403
    assert forged.get_json()["error"] == "user_hash does not match user_id"
    kept = stored(app, sale.get_json()["event_id"])
    assert "gclid" not in kept.get("context", {}) and "enriched" not in kept


def test_a_user_id_with_its_hash_links_the_browser_and_the_hash_is_not_kept(
    tmp_path: Path,
) -> None:
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    client = app.test_client()
    landing = {"page_url": f"{ORIGIN}/?gclid=OWN_GCLID"}
    claim = {"event_name": "identify", "user_id": "cust_7", "consent": ALL_GRANTED}

    linked = collect(client, {**claim, "context": landing, "user_hash": _hash("cust_7").upper()})
    sale = track(client, {"event_name": "sale", "user_id": "cust_7", "consent": ALL_GRANTED})

    assert linked.status_code == 200
    assert "user_hash" not in stored(app, linked.get_json()["event_id"])
    assert stored(app, sale.get_json()["event_id"])["context"]["gclid"] == "OWN_GCLID"


def test_without_an_identity_secret_a_user_hash_is_ignored(client: FlaskClient, app: Flask) -> None:
    answer = collect(client, {"event_name": "identify", "user_id": "u1", "user_hash": "whatever"})

    assert answer.status_code == 200
    assert "user_hash" not in stored(app, answer.get_json()["event_id"])


def test_with_verification_on_a_page_cannot_take_over_a_visitor_by_naming_it(
    tmp_path: Path,
) -> None:
    # The victim's browser, signed in: its visitor is linked to the victim's user ID.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    victim = app.test_client()
    signed_in = {"event_name": "identify", "user_id": "victim_42", "consent": ALL_GRANTED}
    answer = collect(victim, {**signed_in, "user_hash": _hash("victim_42")}).get_json()
    victims_visitor = answer["visitor_id"]
    # Another browser (no cookie) names that visitor in the body, with its own click ID.
    attacker = app.test_client()
    landing = {"page_url": f"{ORIGIN}/?gclid=ATTACKER_GCLID"}
    claim = {"event_name": "page_view", "visitor_id": victims_visitor, "consent": ALL_GRANTED}
    taken = collect(attacker, {**claim, "context": landing}).get_json()
    sale = track(victim, {"event_name": "sale", "user_id": "victim_42", "consent": ALL_GRANTED})

    assert taken["visitor_id"] != victims_visitor  # a visitor of its own
    assert "user_id" not in stored(app, taken["event_id"])
    assert "gclid" not in stored(app, sale.get_json()["event_id"]).get("context", {})


def test_with_verification_on_a_client_cannot_take_over_a_visitor_with_a_cookie_it_made(
    tmp_path: Path,
) -> None:
    # Any HTTP client sends the cookies it likes: one that sent the victim's visitor ID (no
    # secret) as the visitor cookie had its click ID, IP and user agent added to the victim's
    # next backend sale.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    victim = app.test_client()
    signed_in = {"event_name": "identify", "user_id": "victim_42", "consent": ALL_GRANTED}
    answer = collect(victim, {**signed_in, "user_hash": _hash("victim_42")})
    victims_visitor = answer.get_json()["visitor_id"]
    landing = {"page_url": f"{ORIGIN}/?gclid=ATTACKER_GCLID"}
    forged = [
        collect(
            app.test_client(use_cookies=False),  # a client that sends the cookie it made up
            {"event_name": "page_view", "consent": ALL_GRANTED, "context": landing},
            headers={"Cookie": f"tr_vid={cookie}", "User-Agent": "attacker-agent"},
        ).get_json()
        for cookie in (victims_visitor, f"{victims_visitor}.{'0' * 32}")
    ]
    sale = track(victim, {"event_name": "sale", "user_id": "victim_42", "consent": ALL_GRANTED})

    assert all(f["visitor_id"] != victims_visitor for f in forged)  # visitors of their own
    context = stored(app, sale.get_json()["event_id"]).get("context", {})
    assert "gclid" not in context and context.get("user_agent") != "attacker-agent"
    again = collect(victim, {"event_name": "page_view", "consent": ALL_GRANTED})
    assert again.get_json()["visitor_id"] == victims_visitor  # its own signed cookie holds
    assert answer.headers["Set-Cookie"].startswith(f"tr_vid={victims_visitor}.")


def test_a_user_hash_the_site_made_for_a_chosen_user_id_is_no_visitor_cookie_signature(
    tmp_path: Path,
) -> None:
    # The cookie was signed with the HMAC that makes user hashes, of "visitor:" + the visitor
    # ID: a client that got the site's backend to hash a user ID of its choosing (a username
    # "visitor:<the victim's visitor ID>") held the victim's cookie signature in that hash.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    victim = app.test_client()
    signed_in = {"event_name": "identify", "user_id": "victim_42", "consent": ALL_GRANTED}
    victims_visitor = collect(victim, {**signed_in, "user_hash": _hash("victim_42")}).get_json()[
        "visitor_id"
    ]
    made_by_the_site = _hash(f"visitor:{victims_visitor}")
    forged = collect(
        app.test_client(use_cookies=False),
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?gclid=ATTACKER_GCLID"},
        },
        headers={"Cookie": f"tr_vid={victims_visitor}.{made_by_the_site[:32]}"},
    ).get_json()
    sale = track(victim, {"event_name": "sale", "user_id": "victim_42", "consent": ALL_GRANTED})

    assert forged["visitor_id"] != victims_visitor
    assert "gclid" not in stored(app, sale.get_json()["event_id"]).get("context", {})


def test_a_page_cannot_take_or_probe_a_backend_events_id(client: FlaskClient) -> None:
    """A publishable key is public: a page that sent a backend's event ID (an order ID) first
    would have the backend's sale answered as a duplicate, stored and delivered never; one
    that sent it after would learn the order exists and which tags it fired."""
    taken = collect(client, {"event_name": "page_view", "event_id": "ord_789"})
    sale = track(client, {"event_name": "purchase", "event_id": "ord_789"})
    probe = collect(client, {"event_name": "page_view", "event_id": "ord_789"})
    again = collect(client, {"event_name": "page_view", "event_id": "ord_789"})
    backend_again = track(client, {"event_name": "purchase", "event_id": "ord_789"})

    assert taken.get_json()["duplicate"] is False
    assert sale.status_code == 200 and sale.get_json()["duplicate"] is False
    assert sale.get_json()["fired"] == ["to_hook"]
    assert probe.get_json()["duplicate"] is True  # the page's own earlier copy, not the sale
    assert again.get_json()["duplicate"] is True  # a browser's retry is still a duplicate
    assert backend_again.get_json()["duplicate"] is True


def test_each_event_says_which_endpoint_took_it_and_a_client_cannot_say_so(
    client: FlaskClient, app: Flask
) -> None:
    collect(client, {"event_name": "page_view", "event_id": "from_page"})
    track(client, {"event_name": "purchase", "event_id": "from_backend"})
    claimed = track(client, {"event_name": "purchase", "source": "server"})
    claimed_by_page = collect(client, {"event_name": "purchase", "source": "server"})

    assert stored(app, "from_page")["source"] == "browser"
    assert stored(app, "from_backend")["source"] == "server"
    for answer in (claimed, claimed_by_page):
        assert answer.status_code == 400
        assert answer.get_json()["error"].startswith("source is set by tagrelay")


SERVER_COPY_RULES = """
destinations:
  hook: {type: webhook, url: "http://127.0.0.1:9/hook"}
triggers:
  purchase: {event: purchase}
  from_a_page: {event: '*', when: "source == 'browser'"}
tags:
  - name: sale
    trigger: purchase
    except: from_a_page
    destination: hook
    dedup_key: properties.order_id
"""


def test_a_tag_that_takes_no_page_copy_keeps_its_dedup_key_for_the_backend(
    tmp_path: Path,
) -> None:
    """A page (any page: the publishable key is public) that sends a purchase with a coming
    order ID claims the tag's key first, unless the tag takes only the backend's copies."""
    client = make_app(tmp_path, SERVER_COPY_RULES).test_client()
    forged = {"event_name": "purchase", "properties": {"order_id": "ord_9", "value": 0.01}}
    real = {"event_name": "purchase", "properties": {"order_id": "ord_9", "value": 129.0}}

    page = collect(client, forged).get_json()
    backend = track(client, real).get_json()
    probe = collect(client, forged | {"event_id": "probe"}).get_json()

    assert backend["fired"] == ["sale"]
    # Nor does a page learn which tags fired (the shop's tags, or that an order exists).
    assert "fired" not in page and "fired" not in probe


def test_an_ipv6_client_cannot_escape_its_rate_limit_by_moving_within_its_64(
    tmp_path: Path,
) -> None:
    """One IPv6 subscriber, one host even, holds a whole /64 and picks any address in it: a
    limit per address was none."""
    app = make_app(tmp_path, rate_limit=2, trusted_proxies=1)
    client = app.test_client()

    def from_ip(ip: str) -> int:
        answer = collect(client, {"event_name": "x"}, headers={"X-Forwarded-For": ip})
        return int(answer.status_code)

    answers = [from_ip(f"2001:db8:1:2::{n:x}") for n in range(1, 5)]

    assert answers == [200, 200, 429, 429]
    assert from_ip("2001:db8:1:3::1") == 200  # the next /64: another subscriber


def test_no_user_id_a_client_chooses_gets_it_the_key_that_signs_visitor_cookies(
    tmp_path: Path,
) -> None:
    # The key was the HMAC of a fixed label keyed with the identity secret: the user hash the
    # site made for a user ID spelt as that label was the key, and signed any visitor.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    victim = app.test_client()
    signed_in = {"event_name": "identify", "user_id": "victim_42", "consent": ALL_GRANTED}
    victims_visitor = collect(victim, {**signed_in, "user_hash": _hash("victim_42")}).get_json()[
        "visitor_id"
    ]
    for label in ("tagrelay visitor cookie", "visitor cookie", "tagrelay"):
        key = bytes.fromhex(_hash(label))  # what the site hands a user named ``label``
        signature = hmac.new(key, victims_visitor.encode(), hashlib.sha256).hexdigest()[:32]
        forged = collect(
            app.test_client(use_cookies=False),
            {"event_name": "page_view", "consent": ALL_GRANTED},
            headers={"Cookie": f"tr_vid={victims_visitor}.{signature}"},
        ).get_json()

        assert forged["visitor_id"] != victims_visitor, label


def test_a_user_the_backend_linked_stays_the_visitors_across_page_views_that_name_none(
    app: Flask, client: FlaskClient
) -> None:
    # A site whose pages never name their user links it from its backend (a server event with
    # both IDs). A page view naming no user signed that visitor out, and the backend's later
    # event naming only the visitor went to GA4, Meta and TikTok without the user.
    visitor = collect(client, {"event_name": "page_view", "consent": ALL_GRANTED}).get_json()[
        "visitor_id"
    ]
    login = {"event_name": "login", "visitor_id": visitor, "user_id": "ada", "consent": ALL_GRANTED}
    track(client, login)
    collect(client, {"event_name": "page_view", "consent": ALL_GRANTED})
    track(
        client,
        {"event_name": "sale", "event_id": "s1", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert stored(app, "s1")["user_id"] == "ada"


def test_a_pages_undefined_identifiers_are_dropped_and_the_urls_click_and_a_visitor_used(
    app: Flask, client: FlaskClient
) -> None:
    answer = collect(
        client,
        {
            "event_name": "page_view",
            "event_id": "pv-undef",
            "visitor_id": "undefined",
            "user_id": "null",
            "consent": ALL_GRANTED,
            "user_data": {"email": "undefined"},
            "context": {
                "page_url": f"{ORIGIN}/?gclid=Gc-real",
                "gclid": "undefined",
                "fbp": "undefined",
                "ga_client_id": "[object Object]",
            },
        },
    )

    assert answer.status_code == 200
    visitor = answer.get_json()["visitor_id"]
    assert visitor.startswith("v_")  # a new visitor, not one shared by every such browser
    event = stored(app, "pv-undef")
    assert event["context"]["gclid"] == "Gc-real"
    assert not {"fbp", "ga_client_id"} & set(event["context"])
    assert "user_id" not in event and not event.get("user_data")
    assert event["dropped"] == {
        "user_id": "null",
        "user_data.email": "undefined",
        "context.fbp": "undefined",
        "context.ga_client_id": "[object Object]",
    }


def test_a_backend_events_undefined_gclid_gives_way_to_the_visitors_remembered_one(
    app: Flask, client: FlaskClient
) -> None:
    visitor = collect(
        client,
        {
            "event_name": "page_view",
            "consent": ALL_GRANTED,
            "context": {"page_url": f"{ORIGIN}/?gclid=Gc-3"},
        },
    ).get_json()["visitor_id"]

    track(
        client,
        {
            "event_name": "sale",
            "event_id": "s-undef",
            "visitor_id": visitor,
            "user_id": "undefined",
            "consent": ALL_GRANTED,
            "context": {"gclid": "undefined"},
        },
    )
    track(
        client,
        {
            "event_name": "sale",
            "event_id": "s-undef2",
            "user_id": "undefined",
            "consent": ALL_GRANTED,
        },
    )

    event = stored(app, "s-undef")
    assert event["context"]["gclid"] == "Gc-3"
    assert "context.gclid" in event["enriched"]
    assert event["dropped"] == {"user_id": "undefined", "context.gclid": "undefined"}
    # No user "undefined" was linked to the visitor: another such event finds no one's clicks.
    other = stored(app, "s-undef2")
    assert "visitor_id" not in other and "gclid" not in other.get("context", {})


def test_a_user_id_that_is_no_value_needs_no_hash_with_verification_on(tmp_path: Path) -> None:
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    client = app.test_client()

    answer = collect(
        client, {"event_name": "page_view", "event_id": "pv-u", "user_id": "undefined"}
    )

    assert answer.status_code == 200
    assert "user_id" not in stored(app, "pv-u")


def test_after_logout_the_browser_and_a_guest_sale_on_it_carry_no_user_id(
    app: Flask, client: FlaskClient
) -> None:
    # tagrelay.reset() on logout: the page's later events carried no user_id, but enrichment
    # put the last user's back on each, and on a guest's sale on that computer, which went to
    # GA4 as user_id and to Meta and TikTok as external_id beside the guest's own e-mail.
    # reset() now sends "user_id": null: nobody is signed in on that browser.
    visitor = collect(
        client, {"event_name": "identify", "user_id": "ada", "consent": ALL_GRANTED}
    ).get_json()["visitor_id"]
    signed_out = {"event_name": "page_view", "event_id": "after_logout", "user_id": None}

    answer = collect(client, {**signed_out, "consent": ALL_GRANTED})
    collect(client, {"event_name": "page_view", "event_id": "no_user", "consent": ALL_GRANTED})
    track(
        client,
        {"event_name": "sale", "event_id": "guest", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert answer.status_code == 200, answer.get_json()
    for event_id in ("after_logout", "no_user", "guest"):
        event = stored(app, event_id)
        assert "user_id" not in event  # not even null: the stored event names no user
        assert "user_id" not in event.get("enriched", [])
    track(
        client, {"event_name": "sale", "event_id": "ada2", "user_id": "ada", "consent": ALL_GRANTED}
    )
    assert stored(app, "ada2")["visitor_id"] == visitor  # her link stays, for her own events
    # The next user to sign in on that browser is its user again.
    collect(client, {"event_name": "identify", "user_id": "bob", "consent": ALL_GRANTED})
    track(
        client,
        {"event_name": "sale", "event_id": "bob1", "visitor_id": visitor, "consent": ALL_GRANTED},
    )
    assert stored(app, "bob1")["user_id"] == "bob"


def test_a_sign_out_forgets_the_visitors_user_whatever_its_consent(
    app: Flask, client: FlaskClient
) -> None:
    # Forgetting the user adds nothing to what is remembered: no purpose needs granting.
    visitor = collect(
        client, {"event_name": "identify", "user_id": "ada", "consent": ALL_GRANTED}
    ).get_json()["visitor_id"]
    denied = {p: "denied" for p in ALL_GRANTED}

    collect(client, {"event_name": "logout", "user_id": None, "consent": denied})
    track(
        client,
        {"event_name": "sale", "event_id": "guest", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert "user_id" not in stored(app, "guest")


def test_a_backends_logout_with_a_null_user_id_signs_the_visitor_out(
    app: Flask, client: FlaskClient
) -> None:
    # A site whose backend links user and visitor signs them out the same way: its logout
    # endpoint sends the visitor with "user_id": null.
    visitor = collect(client, {"event_name": "page_view", "consent": ALL_GRANTED}).get_json()[
        "visitor_id"
    ]
    track(client, {"event_name": "login", "visitor_id": visitor, "user_id": "ada"})
    logout = {"event_name": "logout", "event_id": "out", "visitor_id": visitor, "user_id": None}

    answer = track(client, logout)
    collect(client, {"event_name": "page_view", "event_id": "guest_view", "consent": ALL_GRANTED})
    track(
        client,
        {"event_name": "sale", "event_id": "guest", "visitor_id": visitor, "consent": ALL_GRANTED},
    )

    assert answer.status_code == 200, answer.get_json()
    assert "user_id" not in stored(app, "out")
    for event_id in ("guest_view", "guest"):
        assert "user_id" not in stored(app, event_id)
    # Her link stays, for her own events and for `tagrelay forget --user-id`.
    ada = track(client, {"event_name": "sale", "user_id": "ada", "consent": ALL_GRANTED})
    assert stored(app, ada.get_json()["event_id"])["visitor_id"] == visitor
    removed = store_of(app).forget(user_id="ada")
    assert removed.get("visitors", 0) >= 1, removed


def test_a_null_user_id_needs_no_user_hash_with_verification_on(tmp_path: Path) -> None:
    # Nobody is signed in: there is no user ID to prove, and a page can sign out only its
    # own (signed-cookie) visitor.
    app = make_app(tmp_path, identity_secret=IDENTITY_SECRET)
    client = app.test_client()
    ada = {"event_name": "identify", "user_id": "ada", "consent": ALL_GRANTED}
    visitor = collect(client, {**ada, "user_hash": _hash("ada")}).get_json()["visitor_id"]

    answer = collect(client, {"event_name": "page_view", "user_id": None, "consent": ALL_GRANTED})
    sale = track(client, {"event_name": "sale", "visitor_id": visitor, "consent": ALL_GRANTED})

    assert answer.status_code == 200, answer.get_json()
    assert "user_id" not in stored(app, answer.get_json()["event_id"])
    assert "user_id" not in stored(app, sale.get_json()["event_id"])


def test_preview_of_a_sign_out_shows_no_user_added(app: Flask, client: FlaskClient) -> None:
    # `tagrelay preview --data-dir` enriches as intake does: a null user_id gets no user back.
    from engine.pipeline import Privacy, enrich_from_store
    from engine.preview import preview

    visitor = collect(
        client, {"event_name": "identify", "user_id": "ada", "consent": ALL_GRANTED}
    ).get_json()["visitor_id"]
    pipeline: Pipeline = app.extensions["tagrelay.pipeline"]
    store = store_of(app)

    def enricher(
        event: dict[str, Any], now: datetime, granted: frozenset[str], signed_out: bool
    ) -> list[str]:
        return enrich_from_store(store, Privacy(), event, now, granted, signed_out)

    sale = {"event_name": "sale", "visitor_id": visitor, "consent": ALL_GRANTED}
    named = preview(pipeline.rules.container, sale, enricher=enricher)["event"]
    signed_out = preview(pipeline.rules.container, {**sale, "user_id": None}, enricher=enricher)

    assert named["user_id"] == "ada" and "user_id" in named["enriched"]
    assert "user_id" not in signed_out["event"]
    assert "user_id" not in signed_out["event"].get("enriched", [])
