"""The examples stay true: the e-commerce container checks, its tests pass, its sample events
preview cleanly, and the example Slack plugin is discovered and honours the plugin contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from destinations import registry
from engine.pipeline import Pipeline, load_rules
from engine.preview import preview
from engine.rules.compile import compile_container
from engine.rules.model import Container
from engine.rules.testing import run_tests
from engine.store.sqlite import SQLiteStore

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ECOMMERCE = EXAMPLES / "ecommerce"
EVENTS = ECOMMERCE / "events"
OUTCOMES = ("lead", "sale", "refund", "cancellation", "reversal")

# What each sample event must fire (every other tag must stay quiet).
EXPECTED_FIRED = {
    "page_view": {"meta_page_view", "tiktok_page_view", "gads_landing_page", "ga4_page_view"},
    "lead": {"meta_outcomes", "ga4_outcomes", "gads_lead", "tiktok_outcomes", "crm_outcomes"},
    "sale": {"meta_outcomes", "ga4_outcomes", "gads_sale", "tiktok_outcomes", "crm_outcomes"},
    "refund": {"ga4_refund", "gads_restatement", "crm_outcomes"},  # a partial refund
    "cancellation": {"ga4_refund", "gads_retraction", "crm_outcomes"},
    "reversal": {"ga4_refund", "gads_retraction", "crm_outcomes"},
}


@pytest.fixture(scope="module")
def ecommerce() -> Container:
    """The e-commerce container compiled with no environment variables set."""
    container, problems = compile_container(ECOMMERCE, env={})
    assert container is not None, "\n".join(str(p) for p in problems)
    return container


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / f"{name}.json").read_text(encoding="utf-8"))
    return event


def test_ecommerce_container_checks_clean_with_no_environment_set() -> None:
    container, problems = compile_container(ECOMMERCE, env={})

    assert container is not None
    assert [str(p) for p in problems] == []  # no errors and no warnings
    assert set(container.destinations) == {"meta", "ga4", "google_ads", "tiktok", "crm"}


def test_every_rule_file_points_editors_at_the_schema() -> None:
    for path in sorted(ECOMMERCE.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=../../rules/tagrelay.schema.json", path


def test_every_rule_test_of_the_ecommerce_container_passes(ecommerce: Container) -> None:
    results = run_tests(ecommerce)

    failures = [f"{r.test.name}: {d}" for r in results if not r.passed for d in r.differences]
    assert results
    assert failures == []


def test_rule_tests_cover_page_views_and_every_outcome_type(ecommerce: Container) -> None:
    tested = {test.event.get("event_name") for test in ecommerce.tests}

    assert {"page_view", *OUTCOMES} <= tested


def test_there_is_a_sample_event_for_page_views_and_every_outcome_type() -> None:
    assert {p.stem for p in EVENTS.glob("*.json")} == {"page_view", *OUTCOMES}


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRED))
def test_sample_event_previews_with_the_expected_tags(ecommerce: Container, name: str) -> None:
    result = preview(ecommerce, load_event(name))

    fired = {tag["name"] for tag in result["tags"] if tag["fired"]}
    assert fired == EXPECTED_FIRED[name], [(t["name"], t["reason"]) for t in result["tags"]]
    for tag in result["tags"]:
        assert "invalid payload" not in tag["reason"]
        assert "would fail at send time" not in tag["reason"]
        assert (tag["request"] is not None) == tag["fired"]


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRED))
def test_sample_event_previews_show_no_secret(ecommerce: Container, name: str) -> None:
    result = preview(ecommerce, load_event(name))

    requests = json.dumps([tag["request"] for tag in result["tags"]])
    assert "placeholder-" not in requests  # every secret setting's default starts so


@pytest.mark.parametrize("name", ["refund", "cancellation", "reversal"])
def test_negative_follow_ons_never_reach_platforms_without_a_refund_api(
    ecommerce: Container, name: str
) -> None:
    result = preview(ecommerce, load_event(name))

    reached = {tag["destination"] for tag in result["tags"] if tag["fired"]}
    assert reached.isdisjoint({"meta", "tiktok"})
    assert {"ga4", "google_ads"} <= reached


def follow_on(name: str, event_id: str, **properties: Any) -> dict[str, Any]:
    """A backend's negative follow-on of ord_1001 with every consent granted."""
    return {
        "event_name": name,
        "event_id": event_id,
        "visitor_id": "vis_1",
        "properties": {"related_order_id": "ord_1001", "currency": "EUR", **properties},
        "consent": {"ad_storage": "granted", "analytics_storage": "granted",
                    "ad_user_data": "granted"},
    }  # fmt: skip


def fired_for_ga4_and_google_ads(tmp_path: Path, *events: dict[str, Any]) -> list[set[str]]:
    """The ga4 and google_ads tags each event fires, accepted one after the other into a real
    store (where the tags' dedup keys are claimed)."""
    pipeline = Pipeline(SQLiteStore(tmp_path / "store.db"), load_rules(ECOMMERCE, interval=0))
    fired = []
    for event in events:
        (outcome,) = pipeline.accept([event])
        assert outcome.accepted is not None, outcome.error
        decisions = outcome.accepted.decisions
        fired.append({d["tag"] for d in decisions if d["fired"] and d["tag"] != "crm_outcomes"})
    return fired


def test_an_order_undone_twice_is_refunded_once_in_ga4_as_it_is_retracted_once(
    tmp_path: Path,
) -> None:
    # An order cancelled, then its payment refunded, then charged back: three events, one order.
    events = [
        follow_on("cancellation", "cnl_1", value=129.0),
        follow_on("refund", "rfd_1", value=129.0),
        follow_on("reversal", "chb_1", value=129.0),
    ]

    fired = fired_for_ga4_and_google_ads(tmp_path, *events)

    assert fired == [{"ga4_refund", "gads_retraction"}, set(), set()]


def test_each_partial_refund_reaches_ga4_and_then_the_whole_rest_once(tmp_path: Path) -> None:
    events = [
        follow_on("refund", "rfd_1", value=10.0, remaining_value=119.0),
        follow_on("refund", "rfd_2", value=19.0, remaining_value=100.0),
        follow_on("refund", "rfd_3", value=100.0),  # the rest: the order is undone
        follow_on("reversal", "chb_1", value=100.0),
    ]

    fired = fired_for_ga4_and_google_ads(tmp_path, *events)

    partial, whole = {"ga4_refund", "gads_restatement"}, {"ga4_refund", "gads_retraction"}
    assert fired == [partial, partial, whole, set()]


def test_slack_plugin_is_discovered_through_entry_points() -> None:
    found = registry.registry()

    assert "slack" in found, "install the example plugin: pip install -e examples/plugin"
    from tagrelay_slack import Slack

    assert found["slack"] is Slack
    assert registry.check_contract("slack", Slack) is Slack


def test_a_container_using_the_slack_plugin_previews_a_redacted_message(tmp_path: Path) -> None:
    pytest.importorskip("tagrelay_slack", reason="pip install -e examples/plugin")
    url = "https://hooks.slack.com/services/T000/B000/SECRETPART"
    (tmp_path / "rules.yaml").write_text(
        """
destinations:
  sales_channel:
    type: slack
    webhook_url: ${SLACK_WEBHOOK_URL}
    template: "*$event_name* $order $value $currency ($coupon)"
triggers:
  sale: {event: sale}
tags:
  - name: slack_sales
    trigger: sale
    destination: sales_channel
    event_name: New sale
    mapping:
      fields.coupon: properties.coupon
""",
        encoding="utf-8",
    )
    container, problems = compile_container(tmp_path, env={"SLACK_WEBHOOK_URL": url})
    assert container is not None, "\n".join(str(p) for p in problems)

    (tag,) = preview(container, load_event("sale"))["tags"]

    assert tag["fired"] is True
    assert tag["request"]["url"] == "[REDACTED]"
    assert tag["request"]["body"] == {"text": "*New sale* ord_10042 129.0 EUR (WELCOME10)"}
    assert "SECRETPART" not in json.dumps(tag["request"])
