"""`tagrelay test` and `tagrelay preview`: readable results, exit codes, redacted secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from destinations.webhook import Webhook
from engine.cli import main
from tests.support.server import ROOT

WriteRules = Callable[..., Path]
SECRET = "whsec_preview_signing_secret_0123"
HEADER_TOKEN = "Bearer crm-api-token-4567"

RULES = f"""
destinations:
  crm:
    type: webhook
    url: https://crm.example/in
    secret: {SECRET}
    headers: {{Authorization: "{HEADER_TOKEN}", X-Api-Key: crm-key-89}}
  log: {{type: log}}
triggers:
  purchase: {{event: purchase}}
  all: {{event: "*"}}
tags:
  - name: crm_purchase
    trigger: purchase
    destination: crm
    event_name: Purchase
    consent: [ad_user_data]
    mapping: {{value: properties.value}}
  - {{name: log_all, trigger: all, destination: log}}
"""
PASSING_TESTS = """
tests:
  - name: a purchase reaches the crm
    event: {event_name: purchase, properties: {value: 10}, consent: {ad_user_data: granted}}
    expect:
      crm_purchase: {fired: true, payload: {event_name: Purchase, value: 10}}
      log_all: {fired: true}
"""
FAILING_TESTS = """
tests:
  - name: a purchase reaches the crm
    event: {event_name: purchase, properties: {value: 10}, consent: {ad_user_data: granted}}
    expect:
      crm_purchase: {fired: true, payload: {value: 12, currency: EUR}}
  - name: a page view does not
    event: {event_name: page_view}
    expect:
      crm_purchase: {fired: true}
      log_all: {fired: false, reason: nothing}
"""


def test_passing_rule_tests_exit_0(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(RULES + PASSING_TESTS)

    code = main(["test", str(container)])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("ok   a purchase reaches the crm  (")
    assert out[-1] == "1 passed, 0 failed"


@pytest.mark.parametrize("command", ["check", "test"])
def test_without_a_path_check_and_test_read_tagrelay_rules(
    write_rules: WriteRules,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    container = write_rules(RULES + PASSING_TESTS)
    monkeypatch.setenv("TAGRELAY_RULES", str(container))
    monkeypatch.setenv("TAGRELAY_WORKERS", "not a number")  # another setting cannot fail it

    code = main([command])

    out = capsys.readouterr().out
    assert code == 0, out
    assert ("1 passed, 0 failed" if command == "test" else f"{container}: ok") in out


def test_failing_rule_tests_show_each_difference_and_exit_1(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(RULES + FAILING_TESTS)

    code = main(["test", str(container)])

    out = capsys.readouterr().out
    assert code == 1
    file = container / "rules.yaml"
    assert out.splitlines() == [
        f"FAIL a purchase reaches the crm  ({file}:21:5)",
        "       crm_purchase.payload.value: expected 12, got 10",
        '       crm_purchase.payload.currency: expected "EUR", but it is missing',
        f"FAIL a page view does not  ({file}:25:5)",
        "       crm_purchase: expected to fire, but trigger purchase: event 'page_view' is not "
        "one of [purchase]",
        "       log_all: expected to not fire, but trigger all matched",
        "       log_all: expected reason containing 'nothing', got 'trigger all matched'",
        "0 passed, 2 failed",
    ]


def test_rule_tests_on_a_broken_container_exit_1_with_the_errors(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(RULES.replace("trigger: purchase\n", "trigger: purchse\n"))

    code = main(["test", str(container)])

    assert code == 1
    assert "unknown trigger 'purchse'" in capsys.readouterr().err


def test_a_rule_test_with_an_invalid_event_fails_and_says_why(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(
        RULES
        + "tests:\n  - name: bad\n    event: {event_name: x, colour: red}\n"
        + "    expect: {log_all: {fired: true}}\n"
    )

    code = main(["test", str(container)])

    assert code == 1
    assert "the test event is invalid: unknown field 'colour' in event" in capsys.readouterr().out


def test_rule_tests_say_when_a_field_expected_absent_is_sent(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(
        RULES
        + "tests:\n  - name: absent\n"
        + "    event: {event_name: purchase, properties: {value: 10},"
        + " consent: {ad_user_data: granted}}\n"
        + "    expect: {crm_purchase: {payload: {value: null, currency: null}}}\n"
    )

    code = main(["test", str(container)])

    out = capsys.readouterr().out
    assert code == 1
    assert "crm_purchase.payload.value: expected to be absent, got 10" in out
    assert "currency" not in out


def test_rule_tests_compare_types_and_lists_at_every_depth(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(
        RULES.replace(
            "mapping: {value: properties.value}",
            "mapping: {value: properties.value, flags: {value: [1, 0]}, items: properties.items}",
        )
        + "tests:\n  - name: typed\n"
        + "    event: {event_name: purchase, consent: {ad_user_data: granted},"
        + " properties: {value: 10, items: [{id: a, quantity: 1}, {id: b, quantity: 2}]}}\n"
        + "    expect:\n      crm_purchase:\n        payload:\n"
        + "          flags: [true, false]\n"
        + "          items: [{quantity: true}, {id: b, quantity: 2.0}]\n"
        + "          value: [10]\n"
        + "  - name: lengths\n"
        + "    event: {event_name: purchase, consent: {ad_user_data: granted},"
        + " properties: {items: [{id: a}, {id: b}]}}\n"
        + "    expect: {crm_purchase: {payload: {items: [{id: a}]}}}\n"
    )

    code = main(["test", str(container)])

    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[1:5] == [
        "       crm_purchase.payload.flags[0]: expected true, got 1",
        "       crm_purchase.payload.flags[1]: expected false, got 0",
        "       crm_purchase.payload.items[0].quantity: expected true, got 1",
        "       crm_purchase.payload.value: expected a list, got 10",
    ]
    assert out[6] == (
        '       crm_purchase.payload.items: expected 1 element, got 2: [{"id": "a"}, {"id": "b"}]'
    )


def test_rule_tests_apply_the_ip_policy_the_server_is_configured_with(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = write_rules(
        """
        destinations:
          hook: {type: webhook, url: "https://hook.example/in"}
        triggers:
          all: {event: "*"}
        tags:
          - {name: hook_all, trigger: all, destination: hook}
        tests:
          - name: the ip as the server would send it, without any consent
            event: {event_name: purchase, context: {ip: 203.0.113.7}}
            expect: {hook_all: {payload: {context: {ip: 203.0.113.7}}}}
        """
    )

    monkeypatch.setenv("TAGRELAY_IP_STORAGE", "keep")
    kept = main(["test", str(container)])
    monkeypatch.setenv("TAGRELAY_IP_STORAGE", "consent")
    dropped = main(["test", str(container)])

    assert (kept, dropped) == (0, 1)
    assert "hook_all.payload.context.ip: expected" in capsys.readouterr().out


AD_CLICK_RULES = """
destinations:
  crm: {type: webhook, url: https://crm.example/in}
triggers:
  ad_click: {event: page_view, when: context.gclid}
tags:
  - {name: crm_click, trigger: ad_click, destination: crm}
tests:
  - name: a page's landing from an ad carries its click ID, as /v1/collect copies it
    event: {event_name: page_view, source: browser,
            context: {page_url: "https://shop.example/?GCLID=abc&utm_source=x"}}
    expect:
      crm_click: {fired: true, payload: {context: {gclid: abc}}}
"""


def test_a_rule_test_of_a_page_event_sees_the_click_ids_collect_copies_from_its_url(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    container = write_rules(AD_CLICK_RULES)

    code = main(["test", str(container)])
    out = capsys.readouterr().out
    event = {
        "event_name": "page_view",
        "source": "browser",
        "context": {"page_url": "https://shop.example/?GCLID=abc"},
    }
    preview_code, preview_out = preview_json(container, tmp_path, capsys, event)

    assert code == 0, out
    assert preview_code == 0, preview_out
    result = json.loads(preview_out)
    assert result["event"]["context"]["gclid"] == "abc"
    assert result["tags"][0]["fired"] is True


@pytest.mark.parametrize("context", [None, [], "", 0, False])
def test_a_rule_test_of_a_page_event_whose_context_is_no_object_fails_as_collect_refuses_it(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str], context: Any
) -> None:
    # /v1/collect refuses such an event (400 context must be object); the test made its context
    # {} and passed.
    rules = AD_CLICK_RULES.replace(
        'context: {page_url: "https://shop.example/?GCLID=abc&utm_source=x"}',
        f"context: {json.dumps(context)}",
    ).replace("{fired: true, payload: {context: {gclid: abc}}}", "{fired: false}")

    code = main(["test", str(write_rules(rules))])

    assert code == 1
    assert "the test event is invalid: context must be object" in capsys.readouterr().out


def test_a_rule_test_of_a_page_event_from_a_clock_ahead_takes_the_servers_time_as_collect_does(
    write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    # /v1/collect takes a page's timestamp later than the server's time as the server's time;
    # the test refused it ("more than an hour in the future"), and failed.
    rules = AD_CLICK_RULES.replace(
        "event: {event_name: page_view, source: browser,",
        "event: {event_name: page_view, source: browser, timestamp: '2999-01-01T00:00:00Z',",
    )

    code = main(["test", str(write_rules(rules))])

    assert code == 0, capsys.readouterr().out


# -- preview ----------------------------------------------------------------------------------

EVENT = {
    "event_name": "purchase",
    "event_id": "ord_1",
    "timestamp": "2026-11-20T14:30:45+01:00",
    "properties": {"value": 10},
    "consent": {"ad_user_data": "granted"},
}


def preview_json(
    container: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], event: Any = EVENT
) -> tuple[int, str]:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    code = main(["preview", str(path), "--rules", str(container), "--json"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_preview_json_has_the_event_and_one_entry_per_tag(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = preview_json(write_rules(RULES), tmp_path, capsys)

    result = json.loads(out)
    assert code == 0
    assert set(result) == {"event", "tags"}
    assert result["event"]["timestamp"] == "2026-11-20T13:30:45.000Z"
    crm, log = result["tags"]
    assert {"name", "destination", "fired", "reason", "request"} <= set(crm)
    assert (crm["name"], crm["destination"], crm["fired"]) == ("crm_purchase", "crm", True)
    assert crm["reason"] == "trigger purchase matched"
    request = crm["request"]
    assert set(request) == {"method", "url", "headers", "body"}
    assert (request["method"], request["url"]) == ("POST", "https://crm.example/in")
    assert request["body"]["event_name"] == "Purchase"
    assert request["body"]["value"] == 10
    assert (log["name"], log["fired"]) == ("log_all", True)


def test_preview_redacts_the_webhook_secret_and_custom_headers(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = preview_json(write_rules(RULES), tmp_path, capsys)

    headers = json.loads(out)["tags"][0]["request"]["headers"]
    assert headers["Authorization"] == "[REDACTED]"
    assert headers["X-Api-Key"] == "[REDACTED]"
    for secret in (SECRET, HEADER_TOKEN, "crm-api-token-4567", "crm-key-89"):
        assert secret not in out


@pytest.mark.parametrize("hook", ["build_request", "check_item"])
def test_a_plugin_that_raises_in_preview_is_a_tag_that_would_fail_not_a_traceback(
    write_rules: WriteRules,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hook: str,
) -> None:
    def broken(self: Webhook, *_: Any) -> Any:
        raise ValueError(f"cannot use {SECRET}")  # a plugin quoting its settings

    monkeypatch.setattr(Webhook, hook, broken)

    code, out = preview_json(write_rules(RULES), tmp_path, capsys)

    crm = json.loads(out)["tags"][0]
    assert code == 0
    assert (crm["fired"], crm["request"]) == (False, None)
    assert crm["reason"] == "would fail at send time: the webhook adapter failed: ValueError"
    assert SECRET not in out


def test_a_reason_a_plugins_check_item_gives_is_shown_redacted(
    write_rules: WriteRules,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Delivery redacted it in dead letters; preview showed it as the plugin wrote it.
    monkeypatch.setattr(Webhook, "check_item", lambda self, item, ctx: f"refused by {SECRET}")

    code, out = preview_json(write_rules(RULES), tmp_path, capsys)

    crm = json.loads(out)["tags"][0]
    assert code == 0
    assert crm["reason"] == "would fail at send time: refused by [REDACTED]"
    assert SECRET not in out


def test_preview_text_output_redacts_secrets_too(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(EVENT))

    code = main(["preview", str(path), "--rules", str(write_rules(RULES))])

    out = capsys.readouterr().out
    assert code == 0
    assert "FIRED   crm_purchase -> crm: trigger purchase matched" in out
    assert "POST https://crm.example/in" in out
    for secret in (SECRET, "crm-api-token-4567", "crm-key-89"):
        assert secret not in out


def test_preview_text_output_shows_identifiers_dropped_as_no_value(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps({**EVENT, "user_id": "undefined", "context": {"gclid": "null"}}))

    code = main(["preview", str(path), "--rules", str(write_rules(RULES))])

    out = capsys.readouterr().out
    assert code == 0
    assert "dropped as no value: user_id ('undefined'), context.gclid ('null')" in out


def test_preview_explains_tags_that_do_not_fire(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {**EVENT, "consent": {"ad_user_data": "denied"}}

    _, out = preview_json(write_rules(RULES), tmp_path, capsys, event)

    crm = json.loads(out)["tags"][0]
    assert (crm["fired"], crm["reason"], crm["request"]) == (
        False,
        "consent denied: ad_user_data",
        None,
    )


META_RULES = """
destinations:
  meta: {type: meta_capi, pixel_id: "1234567890", access_token: meta-token}
triggers:
  all: {event: "*"}
tags:
  - {name: meta_purchase, trigger: all, destination: meta, event_name: Purchase}
"""


def test_preview_of_a_quantity_meta_cannot_take_explains_it_without_a_traceback(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {
        **{k: v for k, v in EVENT.items() if k != "timestamp"},  # now: Meta refuses old events
        "properties": {"value": 10, "currency": "EUR", "items": [{"id": "a", "quantity": "NaN"}]},
        "context": {"page_url": "https://shop.example/", "user_agent": "Mozilla/5.0"},
    }

    code, out = preview_json(write_rules(META_RULES), tmp_path, capsys, event)

    assert code == 0, out
    [meta] = json.loads(out)["tags"]
    assert (meta["fired"], meta["reason"]) == (
        False,
        "invalid payload: custom_data.contents[].quantity must be a number",
    )


def test_preview_of_an_invalid_event_exits_2(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = preview_json(write_rules(RULES), tmp_path, capsys, {"event_id": "x"})

    assert code == 2
    assert "event.json: invalid event: event_name is required" in output


def test_preview_of_an_unreadable_file_exits_2(
    write_rules: WriteRules, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["preview", str(tmp_path / "missing.json"), "--rules", str(write_rules(RULES))])

    assert code == 2
    assert "cannot read" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_early_ends_without_a_traceback() -> None:
    # `tagrelay preview ... | head`: the reader closes the pipe; Python printed a BrokenPipeError
    # traceback on stderr.
    reader, writer = os.pipe()
    os.close(reader)  # a reader that has already stopped
    try:
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", "schema"],
            cwd=ROOT,
            stdout=writer,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)

    assert done.returncode == 141
    assert done.stderr == b""
