"""The Slack destination through the plugin API only (destinations.base) and real HTTP."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

import jsonschema
import pytest
import requests
from fake_slack_webhook import FakeSlack
from tagrelay_slack import DEFAULT_TEMPLATE, MAX_TEXT, Slack

from destinations.base import (
    REDACTED,
    Destination,
    HttpRequest,
    HttpResponse,
    Item,
    Outcome,
    PayloadContext,
    PayloadError,
    SendContext,
)

NOW = datetime(2026, 11, 20, 14, 31, tzinfo=UTC)
SALE: dict[str, Any] = {
    "event_name": "sale",
    "event_id": "ord_789",
    "properties": {"order_id": "ord_789", "value": 129.0, "currency": "EUR"},
    "user_data": {"email": "a@example.com"},
}


def context(event_name: str = "sale", event_id: str = "ord_789") -> PayloadContext:
    return PayloadContext(
        tag="slack_sales",
        event_name=event_name,
        event_id=event_id,
        event_time=datetime(2026, 11, 20, 14, 30, 45, tzinfo=UTC),
        event=SALE,
        now=NOW,
    )


def send(request: HttpRequest) -> HttpResponse:
    """Deliver a request over real HTTP, as the engine's transport would."""
    reply = requests.request(
        request.method, request.url, headers=dict(request.headers), data=request.body, timeout=5
    )
    return HttpResponse(reply.status_code, dict(reply.headers), reply.content)


def deliver(slack: Slack, payload: dict[str, Any]) -> tuple[HttpRequest, list[Any]]:
    items = [Item("d1", "ord_789", payload)]
    request = slack.build_request(items, SendContext(NOW))
    return request, slack.read_response(send(request), items)


def test_slack_is_registered_under_the_tagrelay_destinations_entry_point_group() -> None:
    found = {ep.name: ep for ep in entry_points(group="tagrelay.destinations")}

    assert found["slack"].load() is Slack
    assert issubclass(Slack, Destination)
    assert Slack.name == "slack"


def test_settings_schema_is_valid_and_requires_the_webhook_url() -> None:
    jsonschema.Draft202012Validator.check_schema(Slack.settings_schema)
    validator = jsonschema.Draft202012Validator(Slack.settings_schema)

    assert not validator.is_valid({})
    assert not validator.is_valid({"webhook_url": "hooks.slack.com/services/x"})
    assert validator.is_valid({"webhook_url": "https://hooks.slack.com/services/T/B/x"})


def test_the_default_mapping_reads_no_personal_data() -> None:
    sources = " ".join(Slack.default_mapping.values())

    assert "user_data" not in sources
    assert "context" not in sources
    assert "user_id" not in sources


def test_the_default_template_names_the_event_order_and_value() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x"})
    mapped = {"fields": {"order": "ord_789", "value": 129.0, "currency": "EUR"}}

    payload = slack.build_payload(mapped, context())

    assert payload == {"text": "*sale* ord_789 129.0 EUR"}


def test_a_custom_template_uses_mapped_fields_and_escapes_their_values() -> None:
    slack = Slack(
        {
            "webhook_url": "https://hooks.slack.com/services/T/B/x",
            "template": "New $event_name: ${order} ($coupon) id=$event_id",
            "username": "tagrelay",
            "icon_emoji": ":moneybag:",
        }
    )
    mapped = {"fields": {"order": "ord_789", "coupon": "<b>&FREE"}}

    payload = slack.build_payload(mapped, context())

    assert payload["text"] == "New sale: ord_789 (&lt;b&gt;&amp;FREE) id=ord_789"
    assert payload["username"] == "tagrelay"
    assert payload["icon_emoji"] == ":moneybag:"


def test_a_placeholder_without_a_value_is_left_empty() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x"})

    payload = slack.build_payload({"fields": {"order": "lead_5"}}, context("lead", "lead_5"))

    assert payload["text"] == "*lead* lead_5"


def test_an_empty_message_is_a_payload_error() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x", "template": "$order"})

    with pytest.raises(PayloadError, match="empty"):
        slack.build_payload({}, context())


def test_a_very_long_message_is_cut_to_slacks_limit() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x", "template": "$note"})

    payload = slack.build_payload({"fields": {"note": "x" * (MAX_TEXT + 50)}}, context())

    assert len(payload["text"]) == MAX_TEXT
    assert payload["text"].endswith("…")


def test_a_template_with_a_stray_dollar_is_refused_when_the_rules_load() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x", "template": "cost: $5"})


def test_a_message_is_posted_as_json_to_the_webhook(slack_webhook: FakeSlack) -> None:
    slack = Slack({"webhook_url": slack_webhook.url})
    payload = slack.build_payload({"fields": {"order": "ord_789"}}, context())

    _, results = deliver(slack, payload)

    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    (received,) = slack_webhook.received
    assert received.path == "/services/T000/B000/XXXXSECRETXXXX"
    assert received.headers["content-type"] == "application/json"
    assert json.loads(received.body) == {"text": "*sale* ord_789"}


def test_a_rate_limited_message_is_retried_after_the_given_delay(slack_webhook: FakeSlack) -> None:
    slack_webhook.answer(429, "rate_limited", Retry_After="30")
    slack = Slack({"webhook_url": slack_webhook.url})

    _, (result,) = deliver(slack, {"text": "hi"})

    assert result.outcome is Outcome.RETRYABLE
    assert result.retry_after == 30.0


def test_a_slack_outage_is_retried(slack_webhook: FakeSlack) -> None:
    slack_webhook.answer(500, "rollup_error")
    slack = Slack({"webhook_url": slack_webhook.url})

    _, (result,) = deliver(slack, {"text": "hi"})

    assert result.outcome is Outcome.RETRYABLE


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, "no_service"), (410, "channel_is_archived"), (403, "action_prohibited")],
)
def test_a_revoked_webhook_or_gone_channel_needs_an_operator(
    slack_webhook: FakeSlack, status: int, error: str
) -> None:
    slack_webhook.answer(status, error)
    slack = Slack({"webhook_url": slack_webhook.url})

    _, (result,) = deliver(slack, {"text": "hi"})

    assert result.outcome is Outcome.AUTH
    assert result.error is not None and error in result.error


def test_an_invalid_payload_is_not_retried(slack_webhook: FakeSlack) -> None:
    slack_webhook.answer(400, "invalid_payload")
    slack = Slack({"webhook_url": slack_webhook.url})

    _, (result,) = deliver(slack, {"text": "hi"})

    assert result.outcome is Outcome.PERMANENT


def test_the_webhook_url_never_appears_in_a_redacted_request() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"
    slack = Slack({"webhook_url": url})
    request = slack.build_request([Item("d1", "e1", {"text": "hi"})], SendContext(NOW))

    redacted = slack.redact(request)

    assert redacted.url == REDACTED
    assert "XXXXSECRETXXXX" not in redacted.url + redacted.body.decode()


def test_one_request_carries_exactly_one_message() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x"})
    items = [Item("d1", "e1", {"text": "a"}), Item("d2", "e2", {"text": "b"})]

    assert Slack.max_batch == 1
    with pytest.raises(ValueError, match="one message"):
        slack.build_request(items, SendContext(NOW))


def test_default_template_constant_is_the_one_used_without_settings() -> None:
    slack = Slack({"webhook_url": "https://hooks.slack.com/services/T/B/x"})

    assert slack.template.template == DEFAULT_TEMPLATE
