"""The HTTP intake through Flask's test client: statuses, JSON errors, batches, duplicates."""

from __future__ import annotations

import gzip
import json
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from engine import api, metrics
from engine.api import parse_json_body
from engine.app import create_app
from engine.auth import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from engine.config import ServerKey, Settings
from engine.errors import StoreError, UnsupportedMediaType
from engine.pipeline import load_rules

KEY = "sk_test_0123456789"
SIGNED_KEY = ServerKey("sk_signed_0123456789", "whsec_0123456789")
AUTH = {"Authorization": f"Bearer {KEY}"}
RULES = """
destinations:
  log: {type: log}
triggers:
  all: {event: "*"}
  purchase: {event: purchase}
tags:
  - {name: log_all, trigger: all, destination: log}
  - {name: log_purchase, trigger: purchase, destination: log, consent: [ad_storage]}
"""


@pytest.fixture
def app(tmp_path: Path, write_rules: Callable[..., Path]) -> Flask:
    container = write_rules(RULES)
    settings = Settings(
        rules=container,
        data_dir=tmp_path / "data",
        server_keys=(ServerKey(KEY), SIGNED_KEY),
        deliver=False,
    )
    return create_app(settings, rules=load_rules(container, interval=0))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def db(tmp_path: Path) -> Callable[[str], list[tuple[Any, ...]]]:
    def query(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(tmp_path / "data" / "tagrelay.db") as conn:
            return conn.execute(sql).fetchall()

    return query


def post(client: FlaskClient, path: str, body: Any, **kwargs: Any) -> Any:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    kwargs.setdefault("content_type", "application/json")
    return client.post(path, data=data, headers=headers, **kwargs)


def assert_error(response: Any, status: int, message: str | None = None) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    assert "Traceback" not in body["error"]
    if message is not None:
        assert body["error"] == message


# -- /v1/track --------------------------------------------------------------------------------


def test_an_event_is_accepted_with_the_tags_that_fired(client: FlaskClient) -> None:
    response = post(
        client,
        "/v1/track",
        {"event_name": "purchase", "event_id": "o1", "consent": {"ad_storage": "granted"}},
    )

    assert response.status_code == 200
    assert response.get_json() == {
        "success": True,
        "event_id": "o1",
        "duplicate": False,
        "fired": ["log_all", "log_purchase"],
    }


def test_an_event_without_an_id_gets_one(client: FlaskClient) -> None:
    response = post(client, "/v1/track", {"event_type": "page_view"})

    assert response.status_code == 200
    assert len(response.get_json()["event_id"]) == 32


def test_a_repeat_returns_the_original_result_and_stores_nothing_new(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    first = post(client, "/v1/track", {"event_name": "purchase", "event_id": "o1"}).get_json()

    again = post(
        client,
        "/v1/track",
        {"event_name": "purchase", "event_id": "o1", "consent": {"ad_storage": "granted"}},
    ).get_json()

    assert again == {**first, "duplicate": True}
    assert db("SELECT COUNT(*) FROM events") == [(1,)]
    assert db("SELECT COUNT(*) FROM deliveries") == [(1,)]


def test_an_event_is_committed_before_it_is_acknowledged(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    post(client, "/v1/track", {"event_name": "lead", "event_id": "l1"})

    assert db("SELECT event_id, event_name FROM events") == [("l1", "lead")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b"{not json",
            "the body is not valid JSON: Expecting property name enclosed in double quotes at "
            "line 1, column 2",
        ),
        (b'{"event_name": "x",\n "a": }', "the body is not valid JSON: Expecting value at line 2"),
        (b"", "the request body is empty"),
        (b'{"event_name": NaN}', "the body is not valid JSON: NaN is not valid JSON"),
        (b"\xff\xfe", "the body is not valid UTF-8"),
        (b"[" * 100_000, "the JSON is nested too deeply"),
        (b"[]", "an event must be a JSON object"),
        (b'{"event_id": "x"}', "event_name is required (event_type is accepted as an alias)"),
        (b'{"event_name": "x", "price": 1}', "unknown field 'price' in event"),
        (
            b'{"event_name": "x", "timestamp": 1795185045000}',
            "timestamp looks like milliseconds; send Unix seconds",
        ),
        (
            b'{"event_name": "x", "properties": {"value": 1e400}}',
            "the number 1e400 is out of range",
        ),
        (
            b'{"event_name": "x", "properties": {"x": ' + b"[" * 980 + b"]" * 980 + b"}}",
            "the JSON is nested too deeply (at most 64 levels)",
        ),
        (
            b'{"event_name": "x", "event_id": 1.0}',
            "event_id must be a string or a whole number written without a decimal point or an "
            "exponent",
        ),
        (
            b'{"event_name": "x", "event_id": ' + b"9" * 300 + b"}",
            "event_id must be a string or a whole number of at most 256 digits",
        ),
        (
            b'{"event_name": "x", "properties": {"n": ' + b"7" * 5000 + b"}}",
            "a number in the body is out of range (over 4300 digits)",
        ),
        (
            b'{"event_name": "x", "timestamp": 1795185045000000}',
            "timestamp looks like microseconds; send Unix seconds",
        ),
        (
            b'{"event_name": "x", "event_id": "a\\ud800b"}',
            "the body holds an unpaired UTF-16 surrogate escape",
        ),
        (
            b'{"event_name": "x", "properties": {"\\udfff": 1}}',
            "the body holds an unpaired UTF-16 surrogate escape",
        ),
        (  # both: the depth is told, as before bodies were read with orjson first
            b'{"event_name": "x", "p": ' + b"[" * 100 + b'"\\ud800"' + b"]" * 100 + b"}",
            "the JSON is nested too deeply (at most 64 levels)",
        ),
    ],
)
def test_bad_bodies_get_400_with_a_clear_message(
    client: FlaskClient, body: bytes, message: str
) -> None:
    response = post(client, "/v1/track", body)

    assert_error(response, 400)
    assert response.get_json()["error"].startswith(message)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_body_that_is_not_declared_json_gets_415(client: FlaskClient, content_type: str) -> None:
    response = post(client, "/v1/track", {"event_name": "x"}, content_type=content_type)

    given = f"not {content_type}" if content_type else "none was sent"
    assert_error(response, 415, f"Content-Type must be application/json or text/json ({given})")


def test_json_with_a_charset_parameter_is_accepted(client: FlaskClient) -> None:
    response = post(
        client, "/v1/track", {"event_name": "x"}, content_type="application/json; charset=utf-8"
    )

    assert response.status_code == 200


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),  # HTTP's deflate: the zlib format
        ("deflate", _raw_deflate),  # what some clients send as deflate
        ("gzip, identity", gzip.compress),
        ("deflate, gzip", lambda data: gzip.compress(zlib.compress(data))),  # in the order applied
        ("gzip", lambda data: gzip.compress(data[:20]) + gzip.compress(data[20:])),  # 2 members
    ],
)
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/track", {"event_name": "x", "event_id": "z1"}),
     ("/v1/track/batch", {"events": [{"event_name": "x", "event_id": "z1"}]})],
    ids=["track", "batch"],
)  # fmt: skip
def test_a_gzip_or_deflate_body_is_read_decompressed(
    client: FlaskClient,
    db: Callable[[str], list[tuple[Any, ...]]],
    coding: str,
    pack: Callable[[bytes], bytes],
    path: str,
    body: Any,
) -> None:
    # gzip used to get "the body is not valid UTF-8".
    data = pack(json.dumps(body).encode())
    response = post(client, path, data, headers={"Content-Encoding": coding})

    assert response.status_code == 200, response.get_data(as_text=True)
    assert db("SELECT event_id FROM events") == [("z1",)]


def test_a_compressed_batch_is_limited_by_its_decompressed_size(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    padded = {"event_name": "x", "properties": {"note": " " * 1_048_576}}
    bomb = gzip.compress(json.dumps(padded).encode())
    assert len(bomb) < 10_000

    response = post(client, "/v1/track", bomb, headers={"Content-Encoding": "gzip"})

    assert_error(response, 413, "the body is over 1048576 bytes once decompressed")
    assert db("SELECT count(*) FROM events") == [(0,)]


def test_a_body_of_many_gzip_members_is_read_in_time_that_grows_with_its_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each member used to be given all the rest of the body, which zlib gave back as a copy:
    # a 1 MB body of 52,000 empty members took a second of CPU, the GIL held.
    given = [0]
    real = zlib.decompressobj

    class Counted:
        def __init__(self, wbits: int) -> None:
            self._inflater = real(wbits)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inflater, name)

        def decompress(self, data: Any, max_length: int = 0) -> bytes:
            given[0] += len(data)
            return self._inflater.decompress(data, max_length)

    monkeypatch.setattr(api.zlib, "decompressobj", Counted)
    members = 5_000
    body = gzip.compress(b"[1]", mtime=0) + gzip.compress(b"", mtime=0) * members

    assert api.parse_json_body(body, "application/json", content_encoding="gzip") == [1]
    assert given[0] <= 16 * len(body)


ONE = b'{"event_name": "x"}'


@pytest.mark.parametrize(
    ("coding", "data", "message"),
    [
        ("br", ONE,
         "Content-Encoding br is not supported: send the body compressed with gzip or deflate, "
         "or uncompressed"),
        ("zstd", b"(\xb5/\xfd", None),
        ("gzip", ONE, "the body is not valid gzip data"),
        ("gzip", gzip.compress(ONE)[:-6], "the gzip body is cut short"),
        ("gzip", gzip.compress(ONE) + b"junk", "the body is not valid gzip data"),
        ("deflate", zlib.compress(ONE) + b"junk",
         "the deflate body has data after its end"),
        ("deflate", b"", "the deflate body is cut short"),
    ],
)  # fmt: skip
def test_a_body_that_is_not_what_its_coding_says_is_refused_and_not_read(
    client: FlaskClient,
    db: Callable[[str], list[tuple[Any, ...]]],
    coding: str,
    data: bytes,
    message: str | None,
) -> None:
    response = post(client, "/v1/track", data, headers={"Content-Encoding": coding})

    assert_error(response, 400 if coding in ("gzip", "deflate") else 415, message)
    assert db("SELECT count(*) FROM events") == [(0,)]


def test_more_compressions_than_clients_apply_are_refused_before_any_is_read(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    # Each layer may inflate to the 1 MB limit: a thousand cost most of a second per request.
    data = ONE
    for _ in range(3):
        data = gzip.compress(data)

    response = post(client, "/v1/track", data, headers={"Content-Encoding": "gzip, gzip, gzip"})
    twice = post(
        client,
        "/v1/track",
        gzip.compress(gzip.compress(ONE)),
        headers={"Content-Encoding": "gzip, gzip"},
    )

    assert_error(
        response,
        415,
        "Content-Encoding lists 3 compressions; at most 2 are read: send the body compressed once",
    )
    assert twice.status_code == 200
    assert db("SELECT count(*) FROM events") == [(1,)]


@pytest.mark.parametrize("coding", ["identity", "utf-8"])
def test_a_content_encoding_that_compresses_nothing_is_read_as_sent(
    client: FlaskClient, coding: str
) -> None:
    response = post(client, "/v1/track", {"event_name": "x"}, headers={"Content-Encoding": coding})

    assert response.status_code == 200


def test_no_key_gets_401(client: FlaskClient) -> None:
    response = client.post("/v1/track", json={"event_name": "x"})

    assert_error(
        response, 401, "missing server key: send 'Authorization: Bearer <key>' or ?api_key="
    )


def test_an_unknown_key_gets_401(client: FlaskClient) -> None:
    response = post(
        client, "/v1/track", {"event_name": "x"}, headers={"Authorization": "Bearer no"}
    )

    assert_error(response, 401, "unknown server key")


def test_the_key_may_come_as_a_query_parameter(client: FlaskClient) -> None:
    response = client.post(f"/v1/track?api_key={KEY}", json={"event_name": "x"})

    assert response.status_code == 200


def test_a_signed_request_is_accepted_and_a_tampered_one_refused(client: FlaskClient) -> None:
    body = b'{"event_name": "purchase"}'
    stamp = str(int(time.time()))
    headers = {
        "Authorization": f"Bearer {SIGNED_KEY.key}",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: "sha256=" + signature("whsec_0123456789", stamp, body),
    }

    ok = client.post("/v1/track", data=body, headers=headers, content_type="application/json")
    tampered = client.post(
        "/v1/track",
        data=body.replace(b"purchase", b"refund"),
        headers=headers,
        content_type="application/json",
    )

    assert ok.status_code == 200
    assert_error(tampered, 401, "signature does not match the body")


def _signed(body: bytes, stamp: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {SIGNED_KEY.key}",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: "sha256=" + signature("whsec_0123456789", stamp, body),
    }


def test_a_compressed_signed_request_is_signed_as_sent(client: FlaskClient) -> None:
    body = gzip.compress(b'{"event_name": "purchase"}')
    stamp = str(int(time.time()))
    plain = b'{"event_name": "purchase"}'

    ok = post(
        client, "/v1/track", body, headers={**_signed(body, stamp), "Content-Encoding": "gzip"}
    )
    inner = post(
        client, "/v1/track", body, headers={**_signed(plain, stamp), "Content-Encoding": "gzip"}
    )

    assert ok.status_code == 200, ok.get_data(as_text=True)
    assert_error(inner, 401, "signature does not match the body")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/track", b'{"event_name": "purchase"}'),
        ("/v1/track/batch", b'{"events": [{"event_name": "purchase"}, {"event_name": "lead"}]}'),
    ],
    ids=["track", "batch"],
)
def test_a_signed_request_replayed_within_the_window_is_a_duplicate_without_event_ids(
    client: FlaskClient, path: str, body: bytes
) -> None:
    # The signature holds for the whole window: an event given a fresh ID each time was
    # counted again by every replay of the same request.
    headers = _signed(body, str(int(time.time())))

    first = client.post(path, data=body, headers=headers, content_type="application/json")
    again = client.post(path, data=body, headers=headers, content_type="application/json")

    def results(response: Any) -> list[dict[str, Any]]:
        answer: dict[str, Any] = response.get_json()
        found: list[dict[str, Any]] = answer.get("results", [answer])
        return found

    assert [r.get("duplicate", False) for r in results(first)] == [False] * len(results(first))
    assert [r["duplicate"] for r in results(again)] == [True] * len(results(first))
    ids = [r["event_id"] for r in results(first)]
    assert [r["event_id"] for r in results(again)] == ids and len(set(ids)) == len(ids)


def test_an_event_id_of_null_gets_the_same_400_signed_or_not(client: FlaskClient) -> None:
    # A signed request used to take it as absent and derive an ID; unsigned, it is refused.
    body = b'{"event_name": "purchase", "event_id": null}'
    unsigned = post(client, "/v1/track", body)
    signed = client.post(
        "/v1/track",
        data=body,
        headers=_signed(body, str(int(time.time()))),
        content_type="application/json",
    )

    assert_error(unsigned, 400, "event_id must be string or integer")
    assert_error(signed, 400, "event_id must be string or integer")


def test_the_same_events_signed_anew_are_new_events(client: FlaskClient) -> None:
    body = b'{"event_name": "purchase"}'
    first = client.post("/v1/track", data=body, headers=_signed(body, str(int(time.time()))),
                        content_type="application/json")  # fmt: skip
    later = client.post("/v1/track", data=body, headers=_signed(body, str(int(time.time()) - 1)),
                        content_type="application/json")  # fmt: skip

    assert later.get_json()["event_id"] != first.get_json()["event_id"]
    assert not later.get_json().get("duplicate")


def test_a_body_over_one_megabyte_gets_413(client: FlaskClient) -> None:
    body = json.dumps({"event_name": "x", "properties": {"blob": "a" * 1_048_576}})

    assert_error(post(client, "/v1/track", body), 413, "the body is over 1048576 bytes")


def test_a_body_of_exactly_one_megabyte_is_read(client: FlaskClient) -> None:
    head = '{"event_name": "x", "properties": {"blob": "'
    body = head + "a" * (1_048_576 - len(head) - 3) + '"}}'
    assert len(body) == 1_048_576

    assert post(client, "/v1/track", body).status_code == 200


def test_the_size_limit_applies_before_authentication(client: FlaskClient) -> None:
    response = client.post("/v1/track", data=b"x" * 1_048_577, content_type="application/json")

    assert_error(response, 413)


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("get", "/v1/track", 405, "method not allowed"),
        ("post", "/v1/nothing", 404, "no such endpoint"),
        ("get", "/", 404, "no such endpoint"),
        ("post", "/healthz", 405, "method not allowed"),
    ],
)
def test_unknown_routes_and_methods_answer_json(
    client: FlaskClient, method: str, path: str, status: int, message: str
) -> None:
    assert_error(getattr(client, method)(path), status, message)


def test_files_in_the_working_directorys_static_folder_are_not_served(
    tmp_path: Path, write_rules: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Flask serves <root path>/static/ by default, and an app named "tagrelay" (no such module)
    # has the working directory as its root path: tagrelay serve, started where a static/
    # folder is, served its files to anyone.
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "backup.sql").write_text("INSERT INTO customers ...")
    monkeypatch.chdir(tmp_path)
    container = write_rules(RULES)
    settings = Settings(
        rules=container, data_dir=tmp_path / "data", server_keys=(ServerKey(KEY),), deliver=False
    )
    client = create_app(settings, rules=load_rules(container, interval=0)).test_client()

    assert_error(client.get("/static/backup.sql"), 404, "no such endpoint")


def test_the_store_being_down_gets_503_with_retry_after(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.extensions["tagrelay.pipeline"].store

    def broken(*_: Any) -> Any:
        raise StoreError("disk I/O error")

    monkeypatch.setattr(store, "accept_many", broken)

    before = metrics.REJECTED_REQUESTS.labels("503")._value.get()

    response = post(client, "/v1/track", {"event_name": "x"})

    assert_error(response, 503, "the event store is unavailable; retry")
    assert response.headers["Retry-After"] == "5"
    # The refusal an operator most needs to alert on is counted like the others.
    assert metrics.REJECTED_REQUESTS.labels("503")._value.get() == before + 1


def test_intake_stops_below_the_disk_reserve_and_readiness_says_so(
    tmp_path: Path,
    write_rules: Callable[..., Path],
    db: Callable[[str], list[tuple[Any, ...]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk fails delivery's outcomes too, and a delivered item whose outcome cannot be
    # recorded is sent again: intake stops first, leaving the rest to delivery.
    container = write_rules(RULES)
    settings = Settings(
        rules=container,
        data_dir=tmp_path / "data",
        server_keys=(ServerKey(KEY),),
        deliver=False,
        min_free_mb=64,
    )
    app = create_app(settings, rules=load_rules(container, interval=0))
    client = app.test_client()
    pipeline = app.extensions["tagrelay.pipeline"]
    pipeline.space.interval = 0  # asked on every request here
    free = [10 * 2**20]
    pipeline.store.free_bytes = lambda: free[0]

    with caplog.at_level("ERROR"):
        one = post(client, "/v1/track", {"event_name": "x", "event_id": "low-1"})
        many = post(client, "/v1/track/batch", {"events": [{"event_name": "x"}]})
    ready = client.get("/readyz")

    for refused in (one, many):
        assert_error(
            refused, 503, "the server's disk is nearly full: nothing was accepted; retry later"
        )
        assert refused.headers["Retry-After"] == "30"
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["disk"].startswith("below the reserve")
    assert db("SELECT count(*) FROM events") == [(0,)]
    refusals = [r for r in caplog.records if "below its reserve" in r.getMessage()]
    assert len(refusals) == 1  # once a minute, not once a request
    assert (refusals[0].free_mb, refusals[0].min_free_mb) == (10, 64)

    free[0] = 2**30  # room again
    assert post(client, "/v1/track", {"event_name": "x", "event_id": "low-1"}).status_code == 200
    assert client.get("/readyz").get_json()["checks"]["disk"] == "ok"


def test_no_disk_reserve_means_no_check(app: Flask, client: FlaskClient) -> None:
    pipeline = app.extensions["tagrelay.pipeline"]
    pipeline.space.reserve_bytes = 0
    pipeline.store.free_bytes = lambda: 0

    assert post(client, "/v1/track", {"event_name": "x"}).status_code == 200
    assert "disk" not in client.get("/readyz").get_json()["checks"]


# -- /v1/track/batch --------------------------------------------------------------------------


def test_a_batch_answers_one_result_per_event_and_a_bad_one_sinks_nothing(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    events = [
        {"event_name": "lead", "event_id": "b1"},
        {"event_id": "b2"},
        "not an event",
        {"event_name": "lead", "event_id": "b1"},
        {"event_name": "lead", "event_id": "b3"},
    ]

    response = post(client, "/v1/track/batch", {"events": events})

    body = response.get_json()
    assert response.status_code == 200
    assert (body["success"], body["accepted"], body["rejected"]) == (True, 3, 2)
    assert body["results"] == [
        {"success": True, "event_id": "b1", "duplicate": False, "fired": ["log_all"]},
        {
            "success": False,
            "error": "event_name is required (event_type is accepted as an alias)",
        },
        {"success": False, "error": "an event must be a JSON object"},
        {"success": True, "event_id": "b1", "duplicate": True, "fired": ["log_all"]},
        {"success": True, "event_id": "b3", "duplicate": False, "fired": ["log_all"]},
    ]
    assert db("SELECT event_id FROM events ORDER BY seq") == [("b1",), ("b3",)]


def _nested(levels: int) -> dict[str, Any]:
    """An event that is ``levels`` levels of objects and arrays deep, itself included."""
    value: Any = 1
    for _ in range(levels - 2):  # the event and its properties are two of them
        value = [value]
    return {"event_name": "deep", "properties": {"a": value}}


def test_an_event_track_takes_does_not_sink_its_batch(client: FlaskClient) -> None:
    assert post(client, "/v1/track", _nested(64)).status_code == 200
    assert_error(post(client, "/v1/track", _nested(65)), 400, _TOO_DEEP)
    events = [{"event_name": "lead", "event_id": "d1"}, _nested(64)]

    response = post(client, "/v1/track/batch", {"events": events})

    assert response.status_code == 200
    assert [r["success"] for r in response.get_json()["results"]] == [True, True]
    # An event deeper than /v1/track takes makes the body too deep, as bad JSON syntax would.
    assert_error(post(client, "/v1/track/batch", {"events": [_nested(65)]}), 400, _TOO_DEEP)


_TOO_DEEP = "the JSON is nested too deeply (at most 64 levels)"


PLATFORM_RULES = """
destinations:
  log: {type: log}
  meta: {type: meta_capi, pixel_id: "1234567890", access_token: meta-token}
  tiktok: {type: tiktok, pixel_code: CABCDEF123, access_token: tt-token}
  ga4: {type: ga4, measurement_id: G-ABC123, api_secret: ga4-secret}
triggers:
  all: {event: "*"}
tags:
  - {name: log_all, trigger: all, destination: log}
  - {name: meta_purchase, trigger: all, destination: meta, event_name: Purchase}
  - {name: tiktok_purchase, trigger: all, destination: tiktok, event_name: CompletePayment}
  - {name: ga4_purchase, trigger: all, destination: ga4}
"""


def sale(event_id: str, quantity: Any = 1) -> dict[str, Any]:
    return {
        "event_name": "purchase",
        "event_id": event_id,
        "properties": {
            "order_id": event_id,
            "value": 10.0,
            "currency": "EUR",
            "items": [{"id": "sku_1", "price": 10.0, "quantity": quantity}],
        },
        "user_data": {"email": "ada@example.com"},
        "context": {"page_url": "https://shop.example/thanks", "user_agent": "Mozilla/5.0"},
        "visitor_id": "v1",
    }


@pytest.mark.parametrize("quantity", ["NaN", "1e999", "inf"])
def test_a_quantity_no_platform_can_take_leaves_those_tags_unfired_not_a_500(
    tmp_path: Path, write_rules: Callable[..., Path], quantity: str
) -> None:
    container = write_rules(PLATFORM_RULES)
    settings = Settings(
        rules=container, data_dir=tmp_path / "data", server_keys=(ServerKey(KEY),), deliver=False
    )
    client = create_app(settings, rules=load_rules(container, interval=0)).test_client()

    single = post(client, "/v1/track", sale("o1", quantity))
    batch = post(client, "/v1/track/batch", {"events": [sale("o2"), sale("o3", quantity)]})

    assert single.status_code == 200, single.get_data(as_text=True)
    assert single.get_json()["fired"] == ["log_all"]
    assert batch.status_code == 200, batch.get_data(as_text=True)
    results = batch.get_json()["results"]
    assert results[0]["fired"] == ["log_all", "meta_purchase", "tiktok_purchase", "ga4_purchase"]
    assert (results[1]["success"], results[1]["event_id"]) == (True, "o3")
    assert results[1]["fired"] == ["log_all"]
    with sqlite3.connect(tmp_path / "data" / "tagrelay.db") as conn:
        [(stored,)] = conn.execute("SELECT decisions FROM events WHERE event_id = 'o1'")
    reasons = {d["tag"]: d["reason"] for d in json.loads(stored)}
    assert reasons["meta_purchase"] == (
        "invalid payload: custom_data.contents[].quantity must be a number"
    )
    assert reasons["tiktok_purchase"] == (
        "invalid payload: properties.contents[].quantity must be a number"
    )
    assert reasons["ga4_purchase"] == "invalid payload: GA4: items[].quantity must be a number"


def test_a_batch_of_exactly_100_events_is_accepted(client: FlaskClient) -> None:
    events = [{"event_name": "x", "event_id": f"e{i}"} for i in range(100)]

    response = post(client, "/v1/track/batch", {"events": events})

    assert response.status_code == 200
    assert response.get_json()["accepted"] == 100


def test_a_batch_over_100_events_gets_413_and_stores_nothing(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    events = [{"event_name": "x"} for _ in range(101)]

    response = post(client, "/v1/track/batch", {"events": events})

    assert_error(response, 413, "a batch holds at most 100 events, got 101")
    assert db("SELECT COUNT(*) FROM events") == [(0,)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"event_name": "x"}], 'the body must be {"events": [...]}'),
        ({"events": {"event_name": "x"}}, 'the body must be {"events": [...]}'),
        ({"event_name": "x"}, 'the body must be {"events": [...]}'),
        ({"events": []}, "the batch has no events"),
        ({"events": [{"event_name": "x"}], "sent_at": 1}, "unknown field 'sent_at' in batch"),
    ],
)
def test_a_malformed_batch_gets_400(client: FlaskClient, body: Any, message: str) -> None:
    assert_error(post(client, "/v1/track/batch", body), 400, message)


def test_a_batch_body_over_one_megabyte_gets_413(client: FlaskClient) -> None:
    events = [{"event_name": "x", "properties": {"blob": "a" * 20_000}} for _ in range(60)]

    assert_error(post(client, "/v1/track/batch", {"events": events}), 413)


# -- health -----------------------------------------------------------------------------------


def test_healthz_answers_without_a_key(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, ""),
        ({"Authorization": "Bearer sk_wrong_0123456789"}, ""),
        ({"Authorization": "Basic c2s6"}, ""),
        ({}, "?api_key=sk_wrong_0123456789"),
    ],
    ids=["none", "unknown key", "not bearer", "unknown api_key"],
)
def test_metrics_are_refused_without_a_server_key(
    client: FlaskClient, headers: dict[str, str], query: str
) -> None:
    # The server that takes /v1/collect faces the internet: its counts are a shop's sales.
    answer = client.get("/metrics" + query, headers=headers)

    assert answer.status_code == 401
    assert answer.get_json()["success"] is False
    assert b"tagrelay_events_total" not in answer.get_data()


@pytest.mark.parametrize("key", [KEY, SIGNED_KEY.key], ids=["key", "signed key, unsigned"])
def test_metrics_answer_a_server_key_without_a_signature(client: FlaskClient, key: str) -> None:
    # A scraper sends a fixed header: it cannot sign, so a signing key's secret is not asked.
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})

    assert answer.status_code == 200
    assert b"tagrelay_events_total" in answer.get_data()


def test_readyz_reports_the_store_and_the_rules(client: FlaskClient) -> None:
    response = client.get("/readyz")

    body = response.get_json()
    assert response.status_code == 200
    assert body["status"] == "ready"
    assert body["checks"]["store"] == "ok"
    assert body["checks"]["rules"]["tags"] == 2


def test_readyz_reports_a_refused_reload_but_stays_ready(
    app: Flask, client: FlaskClient, write_rules: Callable[..., Path]
) -> None:
    container = write_rules(RULES.replace("trigger: purchase,", "trigger: purchse,"))
    holder = app.extensions["tagrelay.pipeline"].rules
    file = container / "rules.yaml"
    stat = file.stat()
    import os

    os.utime(file, (stat.st_atime + 5, stat.st_mtime + 5))
    holder.maybe_reload()

    body = client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).get_json()
    public = client.get("/readyz").get_json()
    wrong = client.get("/readyz", headers={"Authorization": "Bearer sk_not_a_key"}).get_json()

    assert body["status"] == "ready"
    assert "unknown trigger 'purchse'" in body["checks"]["rules"]["reload_error"]
    # Without a server key, that a change was refused, not the rule files' contents.
    for answer in (public, wrong):
        assert answer["status"] == "ready"
        assert answer["checks"]["rules"]["reload_error"].startswith("the last change to the rules")
        assert "purchse" not in json.dumps(answer) and "rules.yaml" not in json.dumps(answer)


def test_a_rules_file_that_crashes_the_compiler_on_reload_fails_no_request(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    container = write_rules(RULES)
    settings = Settings(
        rules=container, data_dir=tmp_path / "data", server_keys=(ServerKey(KEY),), deliver=False
    )
    client = create_app(settings, rules=load_rules(container, interval=0.001)).test_client()
    (container / "bad.yaml").write_text("variables: &v\n  a: *v\n")  # refers to itself
    time.sleep(0.01)

    statuses = [post(client, "/v1/track", {"event_name": "lead"}).status_code for _ in range(3)]
    ready = client.get("/readyz", query_string={"api_key": KEY})

    assert statuses == [200, 200, 200]
    assert ready.status_code == 200
    body = ready.get_json()
    assert body["checks"]["rules"]["tags"] == 2  # the previous rules still serve
    assert "bad.yaml" in body["checks"]["rules"]["reload_error"]
    assert "Traceback" not in ready.get_data(as_text=True)


def test_escaped_surrogate_pairs_and_escaped_backslashes_are_ordinary_text(
    client: FlaskClient,
) -> None:
    pair = post(client, "/v1/track", b'{"event_name": "x", "event_id": "e\\ud83d\\ude00"}')
    backslash = post(client, "/v1/track", b'{"event_name": "x", "event_id": "f\\\\ud800"}')

    assert pair.status_code == 200 and pair.get_json()["event_id"] == "e\U0001f600"
    assert backslash.status_code == 200 and backslash.get_json()["event_id"] == "f\\ud800"


def test_rfc_3339_lower_case_t_and_z_are_read(
    client: FlaskClient, db: Callable[[str], list[tuple[Any, ...]]]
) -> None:
    event = {"event_name": "x", "event_id": "lc", "timestamp": "2026-11-20t14:30:45z"}
    response = post(client, "/v1/track", event)

    assert response.status_code == 200
    [(body,)] = db("SELECT body FROM events")
    assert json.loads(body)["timestamp"] == "2026-11-20T14:30:45.000Z"


def test_an_integer_event_id_is_stored_as_its_digits(client: FlaskClient) -> None:
    response = post(client, "/v1/track", {"event_name": "x", "event_id": 1234567890123})

    assert response.get_json()["event_id"] == "1234567890123"


def test_an_event_nested_as_deep_as_allowed_is_stored(client: FlaskClient) -> None:
    # 60 levels are allowed; the store must be able to encode whatever parsing lets through.
    deep: Any = 1
    for _ in range(60):
        deep = [deep]
    response = post(client, "/v1/track", {"event_name": "x", "properties": {"deep": deep}})

    assert response.status_code == 200, response.get_json()


def test_the_415_message_names_every_type_the_endpoint_takes() -> None:
    with pytest.raises(UnsupportedMediaType) as refused:
        parse_json_body(b"{}", "application/xml", allow_text=True)

    assert str(refused.value) == (
        "Content-Type must be application/json or text/json or text/plain (not application/xml)"
    )


def test_a_store_outage_is_logged_once_a_minute_not_once_a_request(
    app: Flask,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = app.extensions["tagrelay.pipeline"].store

    def full(*_: Any) -> Any:
        raise StoreError("store write failed: database or disk is full")

    monkeypatch.setattr(store, "accept_many", full)

    with caplog.at_level(logging.ERROR, logger="engine.pipeline"):
        statuses = {post(client, "/v1/track", {"event_name": "x"}).status_code for _ in range(50)}

    lines = [r for r in caplog.records if r.name == "engine.pipeline"]
    assert statuses == {503}
    assert len(lines) == 1
    assert lines[0].refused == 1  # type: ignore[attr-defined]  # an extra field


def test_the_end_of_a_store_outage_is_logged_once_with_how_many_requests_it_refused(
    app: Flask,
    client: FlaskClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = app.extensions["tagrelay.pipeline"].store
    accept_many = store.accept_many

    def full(*_: Any) -> Any:
        raise StoreError("store write failed: database or disk is full")

    with caplog.at_level(logging.INFO, logger="engine.pipeline"):
        post(client, "/v1/track", {"event_name": "before"})  # no outage: nothing logged
        monkeypatch.setattr(store, "accept_many", full)
        for _ in range(3):
            post(client, "/v1/track", {"event_name": "x"})
        monkeypatch.setattr(store, "accept_many", accept_many)
        post(client, "/v1/track", {"no_name": True})  # invalid: nothing committed, no end yet
        ended = [r for r in caplog.records if r.getMessage().startswith("store available")]
        assert ended == []
        for _ in range(3):
            assert post(client, "/v1/track", {"event_name": "y"}).status_code == 200

    ended = [r for r in caplog.records if r.getMessage().startswith("store available")]
    assert len(ended) == 1
    assert ended[0].refused == 3  # type: ignore[attr-defined]  # an extra field
    assert ended[0].outage_seconds >= 0  # type: ignore[attr-defined]


def test_a_null_user_id_is_taken_by_track_and_its_batch_and_reaches_no_platform(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    # "user_id": null: nobody is signed in (a backend's logout, tagrelay.js after reset()).
    # Valid on every endpoint, stored and forwarded as no user ID at all.
    container = write_rules(PLATFORM_RULES)
    settings = Settings(
        rules=container, data_dir=tmp_path / "data", server_keys=(ServerKey(KEY),), deliver=False
    )
    client = create_app(settings, rules=load_rules(container, interval=0)).test_client()
    granted = {p: "granted" for p in ("ad_storage", "analytics_storage", "ad_user_data")}

    single = post(client, "/v1/track", {**sale("n1"), "user_id": None, "consent": granted})
    batch = post(
        client, "/v1/track/batch", {"events": [{**sale("n2"), "user_id": None, "consent": granted}]}
    )

    assert single.status_code == 200, single.get_data(as_text=True)
    assert "meta_purchase" in single.get_json()["fired"]
    assert batch.get_json()["results"][0]["success"] is True
    with sqlite3.connect(tmp_path / "data" / "tagrelay.db") as conn:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM events")]
        payloads = {
            destination: json.loads(payload)
            for destination, payload in conn.execute(
                "SELECT destination, payload FROM deliveries WHERE event_seq = 1"
            )
        }
    assert [("user_id" in b, b["event_id"]) for b in bodies] == [(False, "n1"), (False, "n2")]
    assert set(payloads) == {"log", "meta", "tiktok", "ga4"}
    assert "external_id" not in payloads["meta"]["user_data"]
    assert "external_id" not in json.dumps(payloads["tiktok"])
    assert "user_id" not in payloads["ga4"]
