"""Personal data in page URLs is redacted at intake, before it is stored or forwarded."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine.app import create_app
from engine.cli import main
from engine.config import ServerKey, Settings, load_settings
from engine.event import normalize
from engine.pipeline import load_rules
from engine.urlprivacy import redact_personal_data

SHOP = "https://shop.example"
DIGEST = "a" * 64


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # a form sent by GET: fields named like personal data, whatever their values
        (
            f"{SHOP}/thanks?email=ada%40example.com&phone=%2B4915112345678&utm_source=news",
            f"{SHOP}/thanks?email=(redacted)&phone=(redacted)&utm_source=news",
        ),
        (f"{SHOP}/s?billing_first_name=Ada&lastName=Lovelace&tel=0151",
         f"{SHOP}/s?billing_first_name=(redacted)&lastName=(redacted)&tel=(redacted)"),
        # an e-mail address under any name, encoded or not
        (f"{SHOP}/search?q=ada@example.com", f"{SHOP}/search?q=(redacted)"),
        (f"{SHOP}/search?q=ada%40example.com&page=2", f"{SHOP}/search?q=(redacted)&page=2"),
        # in the fragment's query (single-page apps), and in a path segment
        (f"{SHOP}/#/signup?first_name=Ada&gclid=G",
         f"{SHOP}/#/signup?first_name=(redacted)&gclid=G"),
        (f"{SHOP}/#email=ada@example.com", f"{SHOP}/#email=(redacted)"),
        (f"{SHOP}/users/ada%40example.com/orders?x=1", f"{SHOP}/users/(redacted)/orders?x=1"),
        ("/users/ada@example.com", "/users/(redacted)"),
        # a fragment route, a redirect's own query (encoded once more), "+" in an address,
        # several addresses, an address inside a longer value
        (f"{SHOP}/#/users/ada@example.com", f"{SHOP}/#/users/(redacted)"),
        (f"{SHOP}/login?next=/account?email=ada@example.com", f"{SHOP}/login?next=(redacted)"),
        (f"{SHOP}/login?next=%2Faccount%3Femail%3Dada%2540example.com&x=1",
         f"{SHOP}/login?next=(redacted)&x=1"),
        (f"{SHOP}/welcome?ref=ada+news@example.com", f"{SHOP}/welcome?ref=(redacted)"),
        (f"{SHOP}/share?to=ada@example.com,bob@example.com", f"{SHOP}/share?to=(redacted)"),
        (f"{SHOP}/search?q=ada@example.com+order", f"{SHOP}/search?q=(redacted)"),
    ],
)  # fmt: skip
def test_personal_data_in_a_url_is_redacted_and_the_rest_kept_as_sent(
    url: str, expected: str
) -> None:
    assert redact_personal_data(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        f"{SHOP}/p/blue-shirt?utm_source=news&gclid=G&fbclid=F&q=shirt",  # campaign and click IDs
        f"{SHOP}/?email_sha256={DIGEST}&em={DIGEST}",  # digests are what platforms take
        f"{SHOP}/img/hero@2x.jpg",  # a file name, not an address
        "https://user:secret@shop.example/x",  # the host's user is no e-mail address
        f"{SHOP}/?email=&phone",  # nothing to redact
        f"{SHOP}/?phone_verified=1&email_opt_in=yes",  # names that hold no personal data
        f"{SHOP}/#reviews",
        f"{SHOP}/?ln=en&fn=search&db=main&ph=2",  # two-letter names say nothing in a URL
    ],
)
def test_a_url_without_personal_data_is_left_exactly_as_sent(url: str) -> None:
    assert redact_personal_data(url) == url


def test_intake_stores_and_forwards_page_url_and_referrer_redacted() -> None:
    raw: dict[str, Any] = {
        "event_name": "sign_up",
        "context": {
            "page_url": f"{SHOP}/thanks?email=ada%40example.com&utm_campaign=spring",
            "referrer": f"{SHOP}/signup?phone=%2B4915112345678",
            "user_agent": "Mozilla/5.0",
        },
    }

    event = normalize(raw, datetime.now(UTC))

    assert event["context"] == {
        "page_url": f"{SHOP}/thanks?email=(redacted)&utm_campaign=spring",
        "referrer": f"{SHOP}/signup?phone=(redacted)",
        "user_agent": "Mozilla/5.0",
    }
    assert raw["context"]["page_url"].endswith("ada%40example.com&utm_campaign=spring")  # as sent


# -- the site's own names (TAGRELAY_REDACT_QUERY_PARAMS) -------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"{SHOP}/thanks?ref=Ada&utm_source=news", f"{SHOP}/thanks?ref=(redacted)&utm_source=news"),
        (f"{SHOP}/thanks?REF=Ada+Lovelace", f"{SHOP}/thanks?REF=(redacted)"),  # any case
        (f"{SHOP}/thanks?r%65f=Ada", f"{SHOP}/thanks?r%65f=(redacted)"),  # the name decoded
        (f"{SHOP}/?mob=%2B4915112345678&ref=", f"{SHOP}/?mob=(redacted)&ref="),  # empty: kept
        (f"{SHOP}/#/thanks?ref=Ada&x=1", f"{SHOP}/#/thanks?ref=(redacted)&x=1"),  # fragment
        (f"{SHOP}/#ref=Ada", f"{SHOP}/#ref=(redacted)"),
        (f"{SHOP}/?ref={DIGEST}", f"{SHOP}/?ref=(redacted)"),  # whatever the value holds
        (f"{SHOP}/ref/Ada?x=ref", f"{SHOP}/ref/Ada?x=ref"),  # names, not path or values
    ],
)
def test_the_sites_own_field_names_are_redacted_whatever_they_hold(url: str, expected: str) -> None:
    assert redact_personal_data(url, frozenset({"ref", "mob"})) == expected
    assert redact_personal_data(url) == url or "@" in url  # not without being named


def _serve_and_track(
    tmp_path: Path, write_rules: Callable[..., Path], settings: dict[str, Any]
) -> dict[str, Any]:
    container = write_rules(
        "destinations: {log: {type: log}}\n"
        "triggers: {all: {event: '*'}}\n"
        "tags: [{name: log_all, trigger: all, destination: log}]\n"
    )
    app = create_app(
        Settings(
            rules=container,
            data_dir=tmp_path / "data",
            server_keys=(ServerKey("sk_test_0123456789"),),
            deliver=False,
            **settings,
        ),
        rules=load_rules(container, interval=0),
    )
    answer = app.test_client().post(
        "/v1/track",
        json={"event_name": "sign_up", "event_id": "e1",
              "context": {"page_url": f"{SHOP}/thanks?ref=Ada&utm_source=news",
                          "referrer": f"{SHOP}/#/signup?Ref=Ada"}},
        headers={"Authorization": "Bearer sk_test_0123456789"},
    )  # fmt: skip
    assert answer.status_code == 200, answer.get_data(as_text=True)
    with sqlite3.connect(tmp_path / "data" / "tagrelay.db") as conn:
        [(body,)] = conn.execute("SELECT body FROM events")
    context: dict[str, Any] = json.loads(body)["context"]  # (forwarded: see the preview test)
    return context


def test_intake_redacts_the_configured_names_before_storing_and_forwarding(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    names = load_settings({"TAGRELAY_REDACT_QUERY_PARAMS": "ref"}).redact_query_params

    context = _serve_and_track(tmp_path, write_rules, {"redact_query_params": names})

    assert context == {
        "page_url": f"{SHOP}/thanks?ref=(redacted)&utm_source=news",
        "referrer": f"{SHOP}/#/signup?Ref=(redacted)",
    }


def test_without_configured_names_a_neutral_name_is_kept(
    tmp_path: Path, write_rules: Callable[..., Path]
) -> None:
    context = _serve_and_track(tmp_path, write_rules, {})

    assert context["page_url"] == f"{SHOP}/thanks?ref=Ada&utm_source=news"


def test_preview_and_rules_tests_redact_the_configured_names_as_intake_does(
    tmp_path: Path,
    write_rules: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = f"{SHOP}/thanks?ref=Ada"
    container = write_rules(f"""
destinations: {{crm: {{type: webhook, url: "https://crm.example/in"}}}}
triggers: {{all: {{event: '*'}}}}
tags:
  - name: crm_all
    trigger: all
    destination: crm
    mapping: {{page: context.page_url}}
tests:
  - name: the page is sent without the name
    event: {{event_name: sign_up, context: {{page_url: "{page}"}}}}
    expect: {{crm_all: {{payload: {{page: "{SHOP}/thanks?ref=(redacted)"}}}}}}
""")
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"event_name": "sign_up", "context": {"page_url": page}}))
    monkeypatch.setenv("TAGRELAY_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("TAGRELAY_REDACT_QUERY_PARAMS", "ref")

    assert main(["test", str(container)]) == 0, capsys.readouterr().out
    capsys.readouterr()
    assert main(["preview", str(event), "--rules", str(container), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["event"]["context"]["page_url"] == f"{SHOP}/thanks?ref=(redacted)"
    assert result["tags"][0]["request"]["body"]["page"] == f"{SHOP}/thanks?ref=(redacted)"

    monkeypatch.delenv("TAGRELAY_REDACT_QUERY_PARAMS")
    assert main(["test", str(container)]) == 1  # the test expects the server's setting


@pytest.mark.parametrize(
    "value",
    [
        # a long run before an "@" and a domain that never ends in a top-level domain, once
        # encoded so that it is looked at after each decoding too
        "%25" + "a" * 15_000 + "@" + "b." * 7_500,
        "x/#/users/" + "a" * 15_000 + "@" + "b." * 7_500,
    ],
)
def test_a_long_page_url_is_looked_at_in_time_that_grows_with_its_length(value: str) -> None:
    # A page URL has no length limit but the body's (64 KB for /v1/collect, which anyone with
    # the site's publishable key reaches): each start of the address search went on to the
    # "@", so a 30 KB URL held the worker for half a minute.
    url = f"{SHOP}/search?q={value}"
    started = time.perf_counter()

    assert redact_personal_data(url) == url
    assert redact_personal_data(f"{SHOP}/search?q={'a' * 30_000}ada@example.com") == (
        f"{SHOP}/search?q=(redacted)"
    )

    assert time.perf_counter() - started < 2.0
