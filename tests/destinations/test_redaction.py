"""Secrets never show, in any encoding, and redaction never mangles what is not a secret."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import pytest

from destinations import registry
from destinations.base import REDACTED, Destination, HttpRequest, Item, SendContext
from destinations.ga4 import GA4
from destinations.meta_capi import MetaCapi
from engine.cli import main
from tests.destinations.test_payload_values import SETTINGS, context, mapped_event

NOW = datetime.now(UTC).replace(microsecond=0)
# Characters that URL, form and JSON encoding all write differently.
AWKWARD = 'EAAB/x+y=z&q%20"\\é'


def forms(secret: str) -> set[str]:
    """Every way a secret can be written in a URL, a form or a JSON string."""
    written = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    return written | {lower_escapes(w) for w in written}


def lower_escapes(text: str) -> str:
    """``%2F`` written ``%2f``, as some servers echo a URL."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


def leaks(text: str, secret: str) -> list[str]:
    return [form for form in forms(secret) if form in text]


def shown(request: HttpRequest) -> str:
    return f"{request.url}\n{dict(request.headers)}\n{request.body.decode()}"


def test_a_meta_token_with_url_special_characters_is_redacted_in_the_form_body() -> None:
    meta = MetaCapi({"pixel_id": "1234567890", "access_token": AWKWARD})
    payload = meta.build_payload(mapped_event("meta_capi"), context())
    request = meta.build_request([Item("d1", "e1", payload)], SendContext(NOW))
    assert quote_plus(AWKWARD) in request.body.decode()  # the form-encoded token is sent

    redacted = meta.redact(request)

    assert leaks(shown(redacted), AWKWARD) == []
    assert parse_qs(redacted.body.decode())["access_token"] == [REDACTED]


def test_a_ga4_api_secret_is_redacted_in_the_url_query() -> None:
    ga4 = GA4({"measurement_id": "G-ABC123", "api_secret": "a/b+c=d e"})
    payload = ga4.build_payload(mapped_event("ga4"), context("purchase"))
    request = ga4.build_request([Item("d1", "e1", payload)], SendContext(NOW))

    redacted = ga4.redact(request)

    assert leaks(shown(redacted), "a/b+c=d e") == []
    assert parse_qs(urlsplit(redacted.url).query) == {
        "measurement_id": ["G-ABC123"],
        "api_secret": [REDACTED],
    }


@pytest.mark.parametrize("secret", ["tok", "en", "a", "access"])
def test_a_short_secret_is_redacted_only_where_it_is_a_whole_value(secret: str) -> None:
    meta = MetaCapi({"pixel_id": "1234567890", "access_token": secret})
    payload = meta.build_payload(mapped_event("meta_capi"), context())
    request = meta.build_request([Item("d1", "e1", payload)], SendContext(NOW))

    redacted = meta.redact(request)

    form = parse_qs(redacted.body.decode())
    assert form["access_token"] == [REDACTED]
    assert json.loads(form["data"][0]) == [payload]  # nothing else was touched
    assert redacted.url == request.url


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("access_token=tok&x=1", "access_token=[REDACTED]&x=1"),
        ('{"token":"tok"}', '{"token":"[REDACTED]"}'),
        ("Bearer tok", "Bearer [REDACTED]"),
        ("invalid token: tok.", "invalid token: [REDACTED]."),
        ("access_token", "access_token"),
        ("tokens stock tok-2 tok_2 2tok", "tokens stock tok-2 tok_2 2tok"),
        ("[REDACTED]", "[REDACTED]"),
    ],
)
def test_redact_text_replaces_whole_tokens_only(text: str, expected: str) -> None:
    meta = MetaCapi({"pixel_id": "1", "access_token": "tok"})

    assert meta.redact_text(text) == expected


@pytest.mark.parametrize(
    "written",
    [
        AWKWARD,
        quote(AWKWARD, safe=""),
        quote(AWKWARD),
        quote_plus(AWKWARD),
        lower_escapes(quote(AWKWARD, safe="")),
        json.dumps(AWKWARD)[1:-1],
        json.dumps(AWKWARD, ensure_ascii=False)[1:-1],
        json.dumps(AWKWARD)[1:-1].replace("/", "\\/"),
    ],
)
def test_redact_text_finds_the_secret_in_every_encoding(written: str) -> None:
    meta = MetaCapi({"pixel_id": "1", "access_token": AWKWARD})
    # As a dead letter's message may quote it: a transport error naming the URL, an answer.
    text = f"timed out: POST https://graph.example/x?access_token={written}&y=1 said {written}"

    redacted = meta.redact_text(text)

    assert redacted == (
        f"timed out: POST https://graph.example/x?access_token={REDACTED}&y=1 said {REDACTED}"
    )


def test_redact_text_without_secrets_returns_the_text() -> None:
    log = registry.registry()["log"]({})

    assert log.redact_text("nothing secret here") == "nothing secret here"


class Structured(Destination):
    """A plugin whose secret settings are an object, a list and a number, as YAML gives them."""

    name = "structured"
    secret_settings = frozenset({"headers", "keys", "pin", "debug"})
    settings_schema = {
        "type": "object",
        "properties": {
            "headers": {"type": "object"},
            "keys": {"type": "array"},
            "pin": {"type": "integer"},
            "debug": {"type": "boolean"},
        },
    }


def test_secret_settings_that_are_objects_or_lists_are_redacted_value_by_value() -> None:
    # Their text as a whole ("{'X-Api-Key': '...'}") was the secret: nothing a request
    # carries matched it, and preview showed every value in clear.
    plugin = Structured(
        {
            "headers": {"X-Api-Key": "k_live_abcdef123456", "X-Nested": {"deep": "deep-secret-1"}},
            "keys": ["key-one-123456", "key-two-654321"],
            "pin": 98765432,
            "debug": True,
        }
    )
    request = HttpRequest.json_post(
        "https://x.example/in?pin=98765432",
        {"keys": ["key-one-123456", "key-two-654321"], "deep": "deep-secret-1", "debug": True},
        {"X-Api-Key": "k_live_abcdef123456"},
    )

    redacted = plugin.redact(request)

    assert redacted.url == f"https://x.example/in?pin={REDACTED}"
    assert redacted.headers["X-Api-Key"] == REDACTED
    assert redacted.json() == {"keys": [REDACTED, REDACTED], "deep": REDACTED, "debug": True}
    assert plugin.secrets() == [
        "k_live_abcdef123456",
        "key-one-123456",
        "key-two-654321",
        "deep-secret-1",
        "98765432",
    ]


# -- every destination --------------------------------------------------------------------------


def awkward_settings(name: str) -> tuple[dict[str, Any], list[str]]:
    """Working settings whose secret values hold every character that encodes differently."""
    cls = registry.registry()[name]
    settings = dict(SETTINGS[name])
    secrets: list[str] = []
    for key in sorted(cls.secret_settings):
        value = f'{name}-{key}/+= &%x"\\é-0123456789'
        if key == "headers":
            settings[key] = {"X-Api-Key": value, "Authorization": f"Bearer {value}!"}
            secrets += [value, f"Bearer {value}!"]
            continue
        if key == "webhook_url":
            value = f"https://hooks.slack.com/services/{value}"
        settings[key] = value
        secrets.append(value)
    return settings, secrets


@pytest.mark.parametrize("name", sorted(n for n in registry.registry() if n in SETTINGS))
def test_no_destination_shows_a_secret_in_any_encoding(name: str) -> None:
    settings, secrets = awkward_settings(name)
    adapter: Destination = registry.registry()[name](settings)
    event_name = {"ga4": "purchase"}.get(name, "Purchase")
    payload = adapter.build_payload(mapped_event(name), context(event_name))
    requests = [adapter.build_request([Item("d1", "e1", payload)], SendContext(NOW, "ya29.t"))]
    if (token := adapter.token_request()) is not None:
        requests.append(token)

    for request in requests:
        text = shown(adapter.redact(request))
        for secret in secrets:
            assert leaks(text, secret) == [], (name, secret)


def test_preview_json_shows_no_form_of_an_awkward_meta_token_or_ga4_secret(
    write_rules: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = write_rules(
        f"""
        destinations:
          meta: {{type: meta_capi, pixel_id: "123", access_token: {json.dumps(AWKWARD)}}}
          ga: {{type: ga4, measurement_id: G-ABC, api_secret: "a/b+c=d e"}}
        triggers:
          all: {{event: purchase}}
        tags:
          - {{name: m, trigger: all, destination: meta, event_name: Purchase}}
          - {{name: g, trigger: all, destination: ga}}
        """
    )
    event = {
        "event_name": "purchase",
        "timestamp": (NOW - timedelta(minutes=1)).isoformat(),
        "visitor_id": "v1",
        "properties": {"value": 10, "currency": "EUR", "order_id": "o1"},
        "user_data": {"email": "a@example.com"},
        "context": {"page_url": "https://shop.example/x", "user_agent": "UA"},
    }
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))

    code = main(["preview", str(path), "--rules", str(rules), "--json"])

    out = capsys.readouterr().out
    assert code == 0
    tags = {t["name"]: t for t in json.loads(out)["tags"]}
    assert tags["m"]["request"]["body"]["access_token"] == REDACTED
    assert tags["g"]["request"]["url"].endswith(f"api_secret={REDACTED}")
    assert leaks(out, AWKWARD) == []
    assert leaks(out, "a/b+c=d e") == []


WEBHOOK_SETTINGS: dict[str, Any] = {
    "url": "https://crm:pa55-word@hooks.example.com/in?api_key=K3y_value&source=web&sig=s1gn",
    "headers": {
        "Authorization": "Bearer tok_live_4242",
        "X-Basic": "Basic dXNlcjpzM2NyZXQtcGFzcw==",  # user:s3cret-pass
        "X-Api": 'Token token="zz9-token"',
    },
}


@pytest.mark.parametrize(
    "credential",
    ["tok_live_4242", "s3cret-pass", "zz9-token", "pa55-word", "K3y_value", "s1gn"],
)
def test_a_webhook_credential_quoted_alone_is_redacted(credential: str) -> None:
    from destinations.webhook import Webhook

    hook = Webhook(WEBHOOK_SETTINGS)
    answer = f'{{"error": "credential {credential} was refused"}}'

    assert credential not in hook.redact_text(answer)
    assert hook.redact_text(answer) == '{"error": "credential [REDACTED] was refused"}'


def test_a_webhook_request_shows_no_credential_and_keeps_the_rest() -> None:
    from destinations.webhook import Webhook

    hook = Webhook(WEBHOOK_SETTINGS)
    request = hook.build_request([Item("d1", "e1", {"event_name": "lead"})], SendContext(NOW))

    redacted = hook.redact(request)

    for credential in ("tok_live_4242", "s3cret-pass", "pa55-word", "K3y_value", "s1gn"):
        assert leaks(shown(redacted), credential) == []
    assert "source=web" in redacted.url and "hooks.example.com/in" in redacted.url
    assert json.loads(redacted.body) == {"event_name": "lead"}


def test_a_webhook_without_credentials_redacts_nothing() -> None:
    from destinations.webhook import Webhook

    hook = Webhook({"url": "https://hooks.example.com/in?source=web&page=2"})

    assert hook.secrets() == []
    assert hook.redact_text("source=web page 2") == "source=web page 2"


def test_a_plain_webhook_header_hides_its_whole_value_but_not_its_words() -> None:
    from destinations.webhook import Webhook

    hook = Webhook({"url": "https://hooks.example.com/in", "headers": {"X-Source": "my site"}})

    assert hook.redact_text("from my site") == "from [REDACTED]"
    assert hook.redact_text("the site is down") == "the site is down"


@pytest.mark.parametrize(
    "url",
    [
        "https://sk_live_4eC39HqLyjWDarjtT1zdp7dc@hooks.example.com/in",
        "https://sk_live_4eC39HqLyjWDarjtT1zdp7dc:@hooks.example.com/in",
    ],
)
def test_a_credential_given_as_the_urls_user_name_is_redacted(url: str) -> None:
    from destinations.webhook import Webhook

    hook = Webhook({"url": url})
    request = hook.build_request([Item("d1", "e1", {"event_name": "lead"})], SendContext(NOW))

    assert leaks(shown(hook.redact(request)), "sk_live_4eC39HqLyjWDarjtT1zdp7dc") == []


TOKEN = "tk_live_9f8e7d6c5b4a39281706f5e4"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 180 + " key=" + TOKEN[:15],  # cut at the end of an excerpt
        f"Google Ads requestError.INVALID: key {TOKEN[:12]} (gave up after retries)",  # then text
        "echo: " + quote_plus(TOKEN + "/x")[:20],  # an encoded form, cut
    ],
    ids=["cut at the end", "cut, then more text", "encoded, cut"],
)
def test_a_secret_cut_short_is_redacted_too(text: str) -> None:
    from destinations.webhook import Webhook

    hook = Webhook({"url": "https://hooks.example.com/in", "headers": {"X-Key": TOKEN + "/x"}})

    redacted = hook.redact_text(text)

    assert REDACTED in redacted
    assert TOKEN[:8] not in redacted


def test_fewer_than_eight_characters_of_a_secret_are_left_alone() -> None:
    meta = MetaCapi({"pixel_id": "1", "access_token": TOKEN})

    assert meta.redact_text("the key tk_live is unknown") == "the key tk_live is unknown"


def test_a_percent_encoded_url_password_is_redacted_as_sent_too() -> None:
    from destinations.webhook import Webhook

    hook = Webhook({"url": "https://alice:p%40ss%2Fw0rd-Secret@hooks.example.com/in"})
    basic = base64.b64encode(b"alice:p@ss/w0rd-Secret").decode()
    # requests sends the URL's user:password decoded, as "Authorization: Basic <base64>".
    text = f"bad login alice:p@ss/w0rd-Secret (header Basic {basic}; url p%40ss%2Fw0rd-Secret)"

    redacted = hook.redact_text(text)

    assert "w0rd" not in redacted and basic[:8] not in redacted
    assert redacted.startswith("bad login alice:[REDACTED]")


def test_a_webhook_url_marked_secret_is_redacted_after_its_host() -> None:
    from destinations.webhook import Webhook

    token = "XoXoPathSECRET0123456789"
    url = f"https://hooks.slack.com/services/T0001/B0001/{token}"
    hook = Webhook({"url": url, "secret_url": True})
    request = hook.build_request([Item("d1", "e1", {"event_name": "lead"})], SendContext(NOW))

    assert hook.redact(request).url == f"https://hooks.slack.com{REDACTED}"
    assert hook.redact_text(f"invalid_token {token} for services") == (
        f"invalid_token {REDACTED} for services"
    )
    assert Webhook({"url": url}).redact(request).url == url  # not marked: shown as it is


def test_text_that_only_shares_a_secrets_first_characters_stays_readable() -> None:
    from destinations.webhook import Webhook

    hook = Webhook(
        {
            "url": "https://hooks.zapier.com/hooks/catch/123456/abcdef/",
            "secret_url": True,
            "headers": {"Content-Type": "application/json", "X-Key": TOKEN},
        }
    )
    text = "HTTP 415: unsupported media type application/xml; no route /hooks/catalog/v1"

    assert hook.redact_text(text) == text
    assert hook.redact_text(f"key {TOKEN[:10]}") == f"key {REDACTED}"
