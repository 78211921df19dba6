"""Property tests: nothing a client sends makes the intake answer 500 or anything but JSON.

The container exercises every built-in adapter (payload building runs at intake), anonymous
consent forwarding and a tag dedup key, so odd events reach the whole intake path.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.app import create_app
from engine.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from engine.config import ServerKey, Settings
from engine.event import EVENT_SCHEMA
from engine.pipeline import load_rules

KEY = "sk_fuzz_0123456789"
SIGNED = ServerKey("sk_fuzz_signed_0123", "whsec_fuzz_secret")
RULES = """
destinations:
  log: {type: log}
  hook: {type: webhook, url: "https://hook.example/in", secret: "0123456789abcdef0123"}
  meta: {type: meta_capi, pixel_id: "1234567890", access_token: "EAAtoken"}
  ga4: {type: ga4, measurement_id: "G-ABC123", api_secret: "ga4secret"}
  tiktok: {type: tiktok, pixel_code: "CABCDEF123", access_token: "tt_token"}
  gads:
    type: google_ads
    customer_id: "1234567890"
    conversion_action: "987654321"
    developer_token: devtok
    client_id: cid
    client_secret: csecret
    refresh_token: rtok
variables:
  value: properties.value
triggers:
  all: {event: "*"}
  valuable: {when: "$value > `0`", unless: "properties.test"}
tags:
  - {name: log, trigger: all, destination: log}
  - {name: hook, trigger: valuable, destination: hook, dedup_key: properties.order_id}
  - {name: meta, trigger: all, destination: meta, consent: [ad_storage, ad_user_data]}
  - name: ga4
    trigger: all
    destination: ga4
    consent: {require: [ad_storage], anonymous: [analytics_storage]}
  - {name: tiktok, trigger: all, destination: tiktok}
  - {name: gads, trigger: valuable, destination: gads}
"""
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> FlaskClient:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "rules.yaml").write_text(RULES)
    app: Flask = create_app(
        Settings(
            rules=root / "rules.yaml",
            data_dir=root / "data",
            server_keys=(ServerKey(KEY), SIGNED),
            deliver=False,
            # The tests of this module send well over a minute's 1,000 requests of one key.
            rate_limit=0,
        ),
        rules=load_rules(root / "rules.yaml", interval=0),
    )
    return app.test_client()


def check(response: Any) -> dict[str, Any]:
    """A JSON answer, never 500; success false exactly when the status is an error."""
    assert response.status_code != 500, response.get_data(as_text=True)
    assert response.status_code in (200, 400, 401, 403, 404, 405, 413, 415, 429, 503)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code == 200:
        assert body["success"] is True
    else:
        assert body["success"] is False
        assert isinstance(body["error"], str) and body["error"]
        assert "Traceback" not in body["error"]
    return body


PATHS = st.sampled_from(["/v1/track", "/v1/track/batch"])
AUTH = {"Authorization": f"Bearer {KEY}"}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)
maybe_text = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.sampled_from(
        [
            " A@Example.COM ",
            "+4915112345678",
            "0151 1234567",
            "1990-12-10",
            "f",
            "DE",
            "10115",
            "203.0.113.7",
            "2001:db8::1",
            "https://shop.example/p?gclid=x&fbclid=y",
            "https://shop.example/p?_gl=1*abc&srsltid=x#/route?gclid=z",
            "http://[shop.example/landing?gclid=x&fbclid=y&ttclid=z",  # unparsable
            "https://[shop.example]/?gclid=x",  # unparsable
            "::ffff:203.0.113.7",
            "2002:cb00:7107::1",
            "",
            " ",
        ]
    ),
)
user_data = st.dictionaries(
    st.sampled_from(sorted(EVENT_SCHEMA["properties"]["user_data"]["properties"])),
    maybe_text,
)
context = st.dictionaries(
    st.sampled_from(
        [
            "ip",
            "user_agent",
            "page_url",
            "referrer",
            "gclid",
            "gbraid",
            "wbraid",
            "fbclid",
            "fbc",
            "fbp",
            "ttclid",
            "ttp",
            "msclkid",
            "ga_client_id",
            "ga_session_id",
        ]
    ),
    maybe_text | json_values,
    max_size=8,
)
properties = st.fixed_dictionaries(
    {},
    optional={
        "value": json_values,
        "currency": maybe_text,
        "order_id": maybe_text,
        "test": st.booleans(),
        "items": st.lists(
            st.dictionaries(st.sampled_from(["id", "name", "price", "quantity"]), json_values),
            max_size=3,
        )
        | json_values,
    },
)
events = st.fixed_dictionaries(
    {"event_name": st.sampled_from(["purchase", "page_view", "lead", "sale", "Custom Event"])},
    optional={
        "event_id": st.text(min_size=1, max_size=12) | st.integers(),
        "timestamp": st.integers(946_684_800, 1_700_000_000) | st.text(max_size=25),
        "user_id": st.text(min_size=1, max_size=10),
        "visitor_id": st.text(min_size=1, max_size=10),
        "properties": properties,
        "user_data": user_data,
        "context": context,
        "consent": st.dictionaries(
            st.sampled_from(
                ["ad_storage", "analytics_storage", "ad_user_data", "ad_personalization"]
            ),
            st.booleans() | st.sampled_from(["granted", "denied"]),
        ),
    },
)


@FUZZ
@given(path=PATHS, body=st.binary(max_size=2000))
def test_arbitrary_bytes_never_cause_a_500(client: FlaskClient, path: str, body: bytes) -> None:
    check(client.post(path, data=body, headers=AUTH, content_type="application/json"))


@FUZZ
@given(path=PATHS, value=json_values)
def test_arbitrary_json_values_never_cause_a_500(
    client: FlaskClient, path: str, value: Any
) -> None:
    check(client.post(path, data=json.dumps(value), headers=AUTH, content_type="application/json"))


@FUZZ
@given(event=events)
def test_plausible_events_are_accepted_or_refused_with_400(
    client: FlaskClient, event: dict[str, Any]
) -> None:
    response = client.post("/v1/track", json=event, headers=AUTH)

    body = check(response)
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert body["event_id"]


@FUZZ
@given(batch=st.lists(events | json_values, min_size=1, max_size=8))
def test_a_batch_of_anything_answers_one_result_per_item(
    client: FlaskClient, batch: list[Any]
) -> None:
    response = client.post("/v1/track/batch", json={"events": batch}, headers=AUTH)

    body = check(response)
    assert response.status_code == 200
    assert len(body["results"]) == len(batch)
    assert body["accepted"] + body["rejected"] == len(batch)


header_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=60
)


@FUZZ
@given(
    path=PATHS,
    content_type=st.none() | header_text | st.sampled_from(["application/json", "text/json"]),
    authorization=st.none()
    | header_text
    | st.just(f"Bearer {KEY}")
    | st.just(f"Bearer {SIGNED.key}"),
    timestamp=st.none() | header_text | st.just(str(int(time.time()))),
    signature_value=st.none() | header_text,
    query=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
    | st.sampled_from([f"api_key={KEY}", f"api_key={KEY}&api_key=x", "api_key=", "api_key=%ff%00"]),
    body=st.binary(max_size=200) | events.map(lambda e: json.dumps(e).encode()),
)
def test_arbitrary_headers_and_query_strings_never_cause_a_500(
    client: FlaskClient,
    path: str,
    content_type: str | None,
    authorization: str | None,
    timestamp: str | None,
    signature_value: str | None,
    query: str,
    body: bytes,
) -> None:
    headers = {
        name: value
        for name, value in (
            ("Content-Type", content_type),
            ("Authorization", authorization),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, signature_value),
        )
        if value is not None
    }

    check(client.post(path, data=body, headers=headers, query_string=query))


@FUZZ
@given(body=events.map(lambda e: json.dumps(e).encode()), skew=st.integers(-400, 400))
def test_signed_requests_pass_exactly_within_the_window(
    client: FlaskClient, body: bytes, skew: int
) -> None:
    stamp = str(int(time.time()) + skew)
    headers = {
        "Authorization": f"Bearer {SIGNED.key}",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: signature("whsec_fuzz_secret", stamp, body),
    }

    response = client.post("/v1/track", data=body, headers=headers, content_type="application/json")

    check(response)
    if abs(skew) > 302:
        assert response.status_code == 401
    elif abs(skew) < 298:
        assert response.status_code in (200, 400)


timestamps = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}".format,
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 60),
        st.integers(0, 61),
        st.sampled_from(["", "Z", "z", "+00:00", "+14:00", "-23:59", "+24:00", ".999999Z"]),
    ),
)


@FUZZ
@given(timestamp=timestamps)
def test_any_timestamp_is_accepted_or_refused_with_400(client: FlaskClient, timestamp: Any) -> None:
    # Year 1 with a positive offset, 9999 with a negative one, 1e20, -1: out of range of
    # datetime one way or another, each a 400 naming the timestamp.
    response = client.post(
        "/v1/track", json={"event_name": "x", "timestamp": timestamp}, headers=AUTH
    )

    body = check(response)
    assert response.status_code in (200, 400)
    if response.status_code == 400:
        assert "timestamp" in body["error"]


escaped_text = st.lists(
    st.integers(0, 0xFFFF).map(lambda unit: f"\\u{unit:04x}") | st.text(max_size=3), max_size=6
).map("".join)


@FUZZ
@given(
    name=escaped_text,
    key=escaped_text,
    value=escaped_text,
    path=st.sampled_from(["/v1/track", "/v1/track/batch"]),
)
def test_any_escape_in_keys_and_strings_is_accepted_or_refused_with_400(
    client: FlaskClient, name: str, key: str, value: str, path: str
) -> None:
    # \u escapes of any UTF-16 code unit: lone and paired surrogates, NUL, controls.
    event = (
        f'{{"event_name": "{name}x", "properties": {{"{key}": "{value}"}},'
        f' "user_data": {{"{key}": "{value}"}}}}'
    )
    body = f'{{"events": [{event}]}}' if path.endswith("batch") else event

    response = client.post(path, data=body.encode(), headers=AUTH, content_type="application/json")

    check(response)
    assert response.status_code in (200, 400)


@FUZZ
@given(
    coding=st.lists(
        st.sampled_from(["gzip", "deflate", "x-gzip", "identity", "br", "utf-8", "GZIP", ""]),
        max_size=4,
    ).map(", ".join)
    | header_text,
    compress=st.lists(st.sampled_from(["gzip", "zlib", "raw"]), max_size=3),
    body=st.binary(max_size=100) | events.map(lambda e: json.dumps(e).encode()),
)
def test_any_content_encoding_over_any_compression_never_causes_a_500(
    client: FlaskClient, coding: str, compress: list[str], body: bytes
) -> None:
    for method in compress:
        if method == "gzip":
            body = gzip.compress(body)
        else:
            packer = zlib.compressobj(wbits=zlib.MAX_WBITS if method == "zlib" else -15)
            body = packer.compress(body) + packer.flush()
    headers = {**AUTH, "Content-Encoding": coding}

    response = client.post("/v1/track", data=body, headers=headers, content_type="application/json")

    check(response)
    assert response.status_code in (200, 400, 413, 415)
