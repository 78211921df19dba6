"""Evaluating compiled rules: triggers, variables, mappings, the trigger index, hot reload."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engine import metrics
from engine.event import normalize
from engine.pipeline import Pipeline, RulesHolder, load_rules
from engine.rules import Container, compile_container
from engine.store.base import Decision
from engine.store.sqlite import SQLiteStore

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)
WriteRules = Callable[..., Path]

HEAD = """
destinations:
  hook: {type: webhook, url: "https://hook.example/in"}
  log: {type: log}
"""


def build(write_rules: WriteRules, text: str) -> Container:
    container, problems = compile_container(write_rules(HEAD + textwrap.dedent(text)), {})
    assert container is not None, "\n".join(map(str, problems))
    return container


def decide(container: Container, **event: Any) -> dict[str, Decision]:
    normalized = normalize({"event_name": "purchase", "event_id": "e1", **event}, NOW)
    return {d.tag: d for d in container.evaluate(normalized, explain=True, now=NOW)}


def fired(container: Container, **event: Any) -> set[str]:
    return {name for name, d in decide(container, **event).items() if d.fired}


# -- triggers ---------------------------------------------------------------------------------


def test_a_tag_fires_when_any_of_its_triggers_matches(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          purchase: {event: purchase}
          lead: {event: lead}
        tags:
          - {name: sales, trigger: [purchase, lead], destination: log}
        """,
    )

    assert fired(rules, event_name="purchase") == {"sales"}
    assert fired(rules, event_name="lead") == {"sales"}
    assert fired(rules, event_name="page_view") == set()


def test_all_when_conditions_must_hold(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          big_eur:
            event: purchase
            when: ["properties.value > `100`", "properties.currency == 'EUR'"]
        tags:
          - {name: big, trigger: big_eur, destination: log}
        """,
    )

    assert fired(rules, properties={"value": 150, "currency": "EUR"}) == {"big"}
    assert fired(rules, properties={"value": 150, "currency": "USD"}) == set()
    assert fired(rules, properties={"value": 50, "currency": "EUR"}) == set()


def test_unless_blocks_a_matching_event_and_says_why(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          real_purchase: {event: purchase, unless: properties.test}
        tags:
          - {name: real, trigger: real_purchase, destination: log}
        """,
    )

    blocked = decide(rules, properties={"test": True})["real"]

    assert not blocked.fired
    assert blocked.reason == "trigger real_purchase: unless `properties.test` is true"
    assert fired(rules, properties={"test": False}) == {"real"}


def test_an_exception_trigger_blocks_the_tag(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
          internal: {when: "context.ip == '10.0.0.1'"}
        tags:
          - {name: external, trigger: all, except: internal, destination: log}
        """,
    )

    blocked = decide(rules, context={"ip": "10.0.0.1"})["external"]

    assert (blocked.fired, blocked.reason) == (False, "blocked by exception trigger internal")
    assert fired(rules, context={"ip": "203.0.113.7"}) == {"external"}


def test_a_tag_that_does_not_fire_explains_every_trigger(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          purchase: {event: [purchase, sale]}
          big: {when: "properties.value > `100`"}
        tags:
          - {name: t, trigger: [purchase, big], destination: log}
        """,
    )

    reason = decide(rules, event_name="lead", properties={"value": 1})["t"].reason

    assert reason == (
        "trigger purchase: event 'lead' is not one of [purchase, sale]; "
        "trigger big: condition `properties.value > `100`` is false"
    )


def test_a_type_error_in_a_condition_means_no_match_not_a_failure(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          big: {when: "properties.value > `100`"}
        tags:
          - {name: big, trigger: big, destination: log}
        """,
    )

    assert fired(rules, properties={"value": "lots"}) == set()


def test_disabled_tag_and_disabled_destination_do_not_fire(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: paused, trigger: all, destination: log, enabled: false}
          - {name: live, trigger: all, destination: log}
        """,
    )

    decisions = decide(rules)

    assert (decisions["paused"].fired, decisions["paused"].reason) == (False, "tag is disabled")
    assert decisions["live"].fired


# -- variables --------------------------------------------------------------------------------


def test_variables_can_be_used_inside_expressions_and_by_other_variables(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        variables:
          value: properties.value
          is_big: "$value > `50`"
        triggers:
          big: {when: "$is_big && $value < `100`"}
        tags:
          - {name: big, trigger: big, destination: hook, mapping: {is_big: $is_big}}
        """,
    )

    decision = decide(rules, properties={"value": 60})["big"]

    assert decision.fired
    assert decision.payload is not None and decision.payload["is_big"] is True
    assert fired(rules, properties={"value": 40}) == set()
    assert fired(rules, properties={"value": 140}) == set()


def test_lookup_table_maps_values_and_falls_back_to_its_default(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        variables:
          tier:
            lookup: properties.plan
            table: {gold: premium, silver: standard, "true": flagged, 3: three,
                    3.50: three and a half, 1e3: thousand, "007": agent}
            default: basic
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: hook, mapping: {tier: $tier}}
        """,
    )

    def tier(plan: Any) -> Any:
        payload = decide(rules, properties={"plan": plan})["t"].payload
        assert payload is not None
        return payload.get("tier")

    assert tier("gold") == "premium"
    assert tier("bronze") == "basic"
    assert tier(None) == "basic"
    assert tier(True) == "flagged"
    assert tier(3) == "three"
    assert tier(3.0) == "three"  # one JSON number, however the sender wrote it
    assert tier(3.5) == "three and a half"  # however the table writes it, too
    assert tier(1000) == "thousand"
    assert tier("007") == "agent"
    assert tier(7) == "basic"  # a code with a leading zero is text, no number


def test_a_text_is_looked_up_by_the_keys_as_written_and_a_number_by_its_value(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        variables:
          tier:
            lookup: properties.plan
            table: {3.50: three and a half, 1e3: thousand, "[1]": listed}
            default: basic
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: hook, mapping: {tier: $tier}}
        """,
    )

    def tier(plan: Any) -> Any:
        payload = decide(rules, properties={"plan": plan})["t"].payload
        assert payload is not None
        return payload.get("tier")

    assert (tier(3.5), tier(1000)) == ("three and a half", "thousand")
    assert tier("3.50") == "three and a half"
    assert tier("3.5") == "basic"  # the text "3.5" is no key of the table, as "1000" is not
    assert tier("1000") == "basic"
    assert tier([1]) == "basic"  # a list is not the text "[1]"


def test_a_lookup_tables_value_or_default_that_is_a_variable_is_its_value(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        variables:
          raw_name: event_name
          plan: properties.plan
          meta_name:
            lookup: event_name
            table: {sale: Purchase, upgrade: $plan}
            default: $raw_name
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: hook, event_name: $meta_name}
        """,
    )

    def sent(name: str) -> Any:
        payload = decide(rules, event_name=name, properties={"plan": "gold"})["t"].payload
        assert payload is not None
        return payload["event_name"]

    assert sent("sale") == "Purchase"
    assert sent("upgrade") == "gold"
    assert sent("page_view") == "page_view"


def test_an_alias_of_a_lookup_table_is_not_mistaken_for_a_constant(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        variables:
          tier: {lookup: properties.plan, table: {gold: premium}}
          level: $tier
        triggers:
          premium: {when: $level}
        tags:
          - {name: premium, trigger: premium, destination: log}
        """,
    )

    assert fired(rules, properties={"plan": "gold"}) == {"premium"}
    assert fired(rules, properties={"plan": "tin"}) == set()


# -- mapping ----------------------------------------------------------------------------------


def test_default_mapping_is_used_when_a_tag_has_none(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: hook}
        """,
    )

    payload = decide(rules, user_id="u1", properties={"value": 3})["t"].payload

    assert payload == {
        "event_id": "e1",
        "timestamp": "2026-11-20T15:00:00.000Z",
        "user_id": "u1",
        "properties": {"value": 3},
        "event_name": "purchase",
    }


def test_mapping_overrides_extends_removes_and_sets_constants(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - name: t
            trigger: all
            destination: hook
            mapping:
              user_id: visitor_id          # override a default field
              value: properties.value      # extend with a new field
              context: null                # remove a default field
              source: {value: server}      # a constant
              version: 2                   # a plain number is a constant too
              properties.channel: "'web'"  # extend inside a default object
        """,
    )

    payload = decide(
        rules,
        user_id="u1",
        visitor_id="v1",
        properties={"value": 3},
        context={"ip": "203.0.113.7"},
    )["t"].payload

    assert payload is not None
    assert payload["user_id"] == "v1"
    assert payload["value"] == 3
    assert "context" not in payload
    assert payload["source"] == "server"
    assert payload["version"] == 2
    assert payload["properties"] == {"value": 3, "channel": "web"}


def test_extending_a_default_object_never_changes_the_event_or_other_tags(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: a, trigger: all, destination: hook, mapping: {properties.extra: "`1`"}}
          - {name: b, trigger: all, destination: hook}
        """,
    )
    event = normalize({"event_name": "x", "properties": {"value": 3}}, NOW)

    decisions = {d.tag: d for d in rules.evaluate(event, now=NOW)}

    assert decisions["a"].payload is not None and decisions["b"].payload is not None
    assert decisions["a"].payload["properties"] == {"value": 3, "extra": 1}
    assert decisions["b"].payload["properties"] == {"value": 3}
    assert event["properties"] == {"value": 3}


def test_null_removes_a_field_from_the_whole_object_a_default_sends(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - name: crm_no_email
            trigger: all
            destination: hook
            mapping:
              user_data.email: null   # the webhook sends user_data: user_data whole
              context.ip: null
              properties.basket.coupon: null
          - {name: crm_all, trigger: all, destination: hook}
        """,
    )
    event = normalize(
        {
            "event_name": "purchase",
            "user_data": {"email": "a@example.com", "country": "DE"},
            "context": {"ip": "203.0.113.7", "user_agent": "UA"},
            "properties": {"basket": {"coupon": "X", "size": 2}},
        },
        NOW,
    )

    decisions = {d.tag: d for d in rules.evaluate(event, now=NOW)}

    payload = decisions["crm_no_email"].payload
    assert payload is not None
    assert payload["user_data"] == {"country": "DE"}
    assert payload["context"] == {"user_agent": "UA"}
    assert payload["properties"] == {"basket": {"size": 2}}
    other = decisions["crm_all"].payload
    assert other is not None and other["user_data"]["email"] == "a@example.com"
    assert event["user_data"]["email"] == "a@example.com"
    assert event["properties"]["basket"] == {"coupon": "X", "size": 2}


def test_a_target_below_another_of_the_tag_goes_inside_it_whichever_is_written_first(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - name: deeper_first
            trigger: all
            destination: hook
            mapping: {basket.coupon: properties.coupon, basket: properties.basket}
          - name: shallower_first
            trigger: all
            destination: hook
            mapping: {basket: properties.basket, basket.coupon: properties.coupon}
        """,
    )

    decisions = decide(rules, properties={"basket": {"size": 2}, "coupon": "X"})

    for tag in ("deeper_first", "shallower_first"):
        payload = decisions[tag].payload
        assert payload is not None and payload["basket"] == {"size": 2, "coupon": "X"}, tag


def test_event_name_can_be_fixed_or_looked_up(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        variables:
          meta_name: {lookup: event_name, table: {purchase: Purchase, lead: Lead}}
        triggers:
          all: {event: "*"}
        tags:
          - {name: fixed, trigger: all, destination: hook, event_name: Conversion}
          - {name: looked_up, trigger: all, destination: hook, event_name: $meta_name}
        """,
    )

    purchase = decide(rules, event_name="purchase")
    other = decide(rules, event_name="page_view")

    assert purchase["fixed"].payload is not None
    assert purchase["fixed"].payload["event_name"] == "Conversion"
    assert purchase["looked_up"].payload is not None
    assert purchase["looked_up"].payload["event_name"] == "Purchase"
    assert (other["looked_up"].fired, other["looked_up"].reason) == (
        False,
        "invalid payload: the event_name mapping gave no name",
    )
    # Counted as what it is, not as a trigger that did not match.
    assert metrics.reason_kind(other["looked_up"].reason) == "invalid_payload"


def test_dedup_key_is_prefixed_with_the_tag_name(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: log, dedup_key: properties.order_id}
        """,
    )

    assert decide(rules, properties={"order_id": "o9"})["t"].dedup_key == "t:o9"
    assert decide(rules, properties={})["t"].dedup_key is None


@pytest.mark.parametrize(
    ("value", "key"),
    [
        # one order, whichever way a copy writes its ID
        ("1001", "t:1001"),
        (1001, "t:1001"),
        (1001.0, "t:1001"),
        (10.5, "t:10.5"),
        # values every event would share name no order: no key, nothing blocked
        (True, None),
        (False, None),
        ([], None),
        ({}, None),
        ("", None),
        (None, None),
        # a composite key, by its canonical JSON (the order of an object's keys is no matter),
        # complete only when each of its parts names something
        (["o1", 2.0], 't:["o1","2"]'),
        ({"b": 2, "a": "ü"}, 't:{"a":"ü","b":"2"}'),
        (["refund", None], None),
        ({"a": "o1", "b": []}, None),
    ],
)
def test_a_dedup_key_is_compared_by_what_it_names(
    write_rules: WriteRules, value: Any, key: str | None
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: t, trigger: all, destination: log, dedup_key: properties.order_id}
        """,
    )

    assert decide(rules, properties={"order_id": value})["t"].dedup_key == key


def test_a_composite_dedup_key_keeps_a_refund_from_being_blocked_by_its_sale(
    write_rules: WriteRules,
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          money: {event: [sale, refund]}
        tags:
          - {name: t, trigger: money, destination: log,
             dedup_key: "[event_name, properties.order_id]"}
        """,
    )

    sale = decide(rules, event_name="sale", properties={"order_id": 1001})["t"]
    refund = decide(rules, event_name="refund", properties={"order_id": "1001"})["t"]

    assert (sale.dedup_key, refund.dedup_key) == ('t:["sale","1001"]', 't:["refund","1001"]')


# -- adapters that fail --------------------------------------------------------------------------


def test_an_adapter_bug_leaves_its_tag_unfired_and_the_other_tags_unharmed(
    write_rules: WriteRules, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: hook_all, trigger: all, destination: hook}
          - {name: log_all, trigger: all, destination: log}
        """,
    )

    def broken(mapped: dict[str, Any], ctx: Any) -> dict[str, Any]:
        # A plugin's bug, with personal data in its message as real errors often have.
        raise ValueError(f"could not convert {mapped['user_data']['email']!r}")

    monkeypatch.setattr(rules.destinations["hook"].adapter, "build_payload", broken)

    decisions = decide(rules, user_data={"email": "ada@example.com"})

    assert not decisions["hook_all"].fired
    assert decisions["hook_all"].reason == "invalid payload: webhook failed: ValueError"
    assert decisions["hook_all"].payload is None
    assert decisions["log_all"].fired
    [record] = [r for r in caplog.records if r.name == "engine.rules.model"]
    assert record.levelname == "ERROR"
    assert vars(record)["tag"] == "hook_all"
    assert vars(record)["error"] == "ValueError"
    assert "test_rules_eval.py" in vars(record)["where"]
    assert "ada@example.com" not in caplog.text
    assert "ada@example.com" not in str(vars(record))


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"ids": {"sku_1"}}, "build_payload gave no JSON (TypeError)"),
        ([{"id": "sku_1"}], "build_payload gave list, not dict"),
        (None, "build_payload gave NoneType, not dict"),
    ],
)
def test_a_payload_the_store_cannot_keep_leaves_its_tag_unfired_and_the_event_accepted(
    write_rules: WriteRules,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    payload: Any,
    problem: str,
) -> None:
    # A plugin's set of IDs failed the store's write of the whole request: a 503 for the event,
    # retried for ever, its other tags with it.
    rules = build(
        write_rules,
        """
        triggers:
          all: {event: "*"}
        tags:
          - {name: hook_all, trigger: all, destination: hook}
          - {name: log_all, trigger: all, destination: log}
        """,
    )
    monkeypatch.setattr(
        rules.destinations["hook"].adapter, "build_payload", lambda mapped, ctx: payload
    )
    holder = RulesHolder(write_rules(), rules, interval=0)
    store = SQLiteStore(tmp_path / "store.db")

    [outcome] = Pipeline(store, holder).accept([{"event_name": "sale", "event_id": "e1"}])

    assert outcome.accepted is not None
    hook, log = outcome.accepted.decisions
    assert (hook["tag"], hook["fired"]) == ("hook_all", False)
    assert hook["reason"] == f"invalid payload: webhook failed: {problem}"
    assert (log["tag"], log["fired"]) == ("log_all", True)
    stored = store._read("SELECT tag FROM deliveries")
    assert [r["tag"] for r in stored] == ["log_all"]  # the log tag's delivery, only
    [record] = [r for r in caplog.records if r.name == "engine.rules.model"]
    assert vars(record)["error"] == problem
    assert vars(record)["where"] == "destinations.webhook.Webhook.build_payload"


# -- the trigger index ------------------------------------------------------------------------


def test_only_tags_that_can_fire_on_an_event_name_are_evaluated(write_rules: WriteRules) -> None:
    rules = build(
        write_rules,
        """
        triggers:
          purchase: {event: purchase}
          lead: {event: lead}
          all: {event: "*"}
          big: {when: "properties.value > `1`"}
        tags:
          - {name: on_purchase, trigger: purchase, destination: log}
          - {name: on_anything, trigger: all, destination: log}
          - {name: on_lead, trigger: lead, destination: log}
          - {name: on_big, trigger: big, destination: log}
        """,
    )

    def evaluated(name: str) -> list[str]:
        event = normalize({"event_name": name}, NOW)
        return [d.tag for d in rules.evaluate(event, now=NOW)]

    assert evaluated("purchase") == ["on_purchase", "on_anything", "on_big"]
    assert evaluated("page_view") == ["on_anything", "on_big"]
    assert [t.name for t in rules.candidates("lead")] == ["on_anything", "on_lead", "on_big"]


# -- hot reload -------------------------------------------------------------------------------

RELOADABLE = """
destinations:
  log: {type: log}
triggers:
  all: {event: "*"}
tags:
  - {name: first, trigger: all, destination: log}
"""


def touch_later(path: Path, seconds: int) -> None:
    stat = path.stat()
    os.utime(path, (stat.st_atime + seconds, stat.st_mtime + seconds))


def test_editing_a_rule_file_installs_the_new_container(write_rules: WriteRules) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)
    file = container / "rules.yaml"

    file.write_text(RELOADABLE.replace("name: first", "name: second"))
    touch_later(file, 5)

    assert holder.maybe_reload() is True
    assert [t.name for t in holder.container.tags] == ["second"]
    assert holder.last_error is None


def test_a_file_edited_while_the_rules_are_first_compiled_is_compiled_again(
    write_rules: WriteRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its time was taken after the compile: the edit was never seen, until the next one.
    container = write_rules(RELOADABLE)
    file = container / "rules.yaml"

    def edited_meanwhile(path: Path, *args: Any) -> Any:
        compiled = compile_container(path, *args)
        file.write_text(RELOADABLE.replace("name: first", "name: second"))
        touch_later(file, 5)
        return compiled

    monkeypatch.setattr("engine.pipeline.compile_container", edited_meanwhile)
    holder = load_rules(container, interval=0)
    monkeypatch.undo()

    assert [t.name for t in holder.container.tags] == ["first"]
    assert holder.maybe_reload() is True
    assert [t.name for t in holder.container.tags] == ["second"]


def test_a_broken_edit_keeps_the_old_rules_and_records_the_error(
    write_rules: WriteRules,
) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)
    file = container / "rules.yaml"
    good = holder.container

    file.write_text(RELOADABLE.replace("trigger: all", "trigger: al"))
    touch_later(file, 5)

    assert holder.maybe_reload() is False
    assert holder.container is good
    assert holder.last_error is not None
    assert "unknown trigger 'al'" in holder.last_error


def test_reverting_a_broken_edit_clears_the_error(write_rules: WriteRules) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)
    file = container / "rules.yaml"
    file.write_text("tags: [")
    touch_later(file, 5)
    holder.maybe_reload()

    file.write_text(RELOADABLE)
    touch_later(file, 10)
    holder.maybe_reload()

    assert holder.last_error is None
    assert [t.name for t in holder.container.tags] == ["first"]


def test_a_reload_the_compiler_fails_on_keeps_the_old_rules_and_tries_again_after_a_change(
    write_rules: WriteRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)
    good = holder.container
    calls: list[Path] = []

    def crash(path: Path) -> Any:
        calls.append(path)
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("engine.pipeline.compile_container", crash)
    (container / "bad.yaml").write_text("variables: &v\n  a: *v\n")

    assert holder.maybe_reload() is False
    assert holder.container is good
    assert holder.last_error is not None
    assert holder.last_error.startswith("rules reload failed: RecursionError")
    assert "bad.yaml" in holder.last_error
    assert holder.maybe_reload() is False  # unchanged since: not compiled again
    assert len(calls) == 1

    touch_later(container / "bad.yaml", 5)
    holder.maybe_reload()

    assert len(calls) == 2


def test_a_recursive_yaml_file_dropped_into_the_rules_is_a_refused_reload(
    write_rules: WriteRules,
) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)
    good = holder.container

    (container / "bad.yaml").write_text("variables: &v\n  a: *v\n")

    assert holder.maybe_reload() is False
    assert holder.container is good
    assert holder.last_error is not None
    assert "bad.yaml" in holder.last_error


def test_unchanged_files_are_not_recompiled(write_rules: WriteRules) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)

    assert holder.maybe_reload() is False


def test_a_new_file_in_the_container_is_picked_up(write_rules: WriteRules) -> None:
    container = write_rules(RELOADABLE)
    holder = load_rules(container, interval=0)

    (container / "zz_more.yaml").write_text(
        "tags:\n  - {name: extra, trigger: all, destination: log}\n"
    )

    assert holder.maybe_reload() is True
    assert [t.name for t in holder.container.tags] == ["first", "extra"]


def test_the_container_property_reloads_after_the_interval(write_rules: WriteRules) -> None:
    container = write_rules(RELOADABLE)
    compiled, _ = compile_container(container, {})
    assert compiled is not None
    holder = RulesHolder(container, compiled, interval=0.01)
    file = container / "rules.yaml"
    file.write_text(RELOADABLE.replace("name: first", "name: second"))
    touch_later(file, 5)

    time.sleep(0.02)

    assert [t.name for t in holder.container.tags] == ["second"]


@pytest.mark.parametrize("interval", [0])
def test_load_rules_refuses_a_broken_container(tmp_path: Path, interval: float) -> None:
    from engine.errors import RulesError

    (tmp_path / "bad.yaml").write_text("tags: [")

    with pytest.raises(RulesError, match="YAML syntax error"):
        load_rules(tmp_path, interval)
