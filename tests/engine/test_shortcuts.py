"""The engine's shortcuts give exactly what the plain computations they replace give.

IPv4 truncation without ipaddress objects, timestamps formatted without isoformat, consent
decisions memoized per signal, decisions and payload contexts made without their dataclass
constructors, remembered click IDs found by set intersection: each is held to its reference
here, on generated inputs where that makes sense.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from destinations.base import PayloadContext
from engine.consent import (
    ConsentState,
    ConsentStates,
    Requirement,
    decide,
    granted_purposes,
    truncate_ip,
)
from engine.event import CONSENT_PURPOSES, format_time, normalize
from engine.identity import REMEMBERED, identity_update
from engine.rules import compile_container
from engine.rules.model import Container, EventScope
from engine.store.base import Decision

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def reference_truncate_ip(ip: str) -> str | None:
    """truncate_ip's rule, always through ipaddress: IPv4 (mapped too) /24, 6to4 /40, IPv6 /48."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address.version == 4:
        prefix = 24
    elif address.sixtofour is not None:
        prefix = 40
    else:
        prefix = 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


octet = st.one_of(
    st.integers(0, 255).map(str),
    st.integers(0, 999).map(str),
    st.integers(0, 99).map(lambda n: f"0{n}"),  # leading zeros: refused by ipaddress
    st.sampled_from(
        ["", "00", "-1", "+1", " 1", "1 ", "\u0661", "\u00b2", "0x1", "1e2", "256", "1.0"]
    ),
)
dotted = st.lists(octet, min_size=3, max_size=5).map(".".join)
padded = st.tuples(st.sampled_from(["", " ", "\t", "\n", "\u00a0"]), dotted).map(
    lambda pair: pair[0] + pair[1] + pair[0]
)
ips = st.one_of(
    dotted,
    padded,
    st.ip_addresses().map(str),
    # IPv4 inside IPv6: mapped (as a dual-stack listener sees IPv4 clients), 6to4 and Teredo.
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.ip_addresses(network="2002::/16").map(str),
    st.ip_addresses(network="2001::/32").map(str),
    st.text(alphabet="0123456789.:abcdef%/ ", max_size=20),
)


@settings(max_examples=1500, deadline=None)
@given(ips)
def test_ip_truncation_equals_ipaddress(ip: str) -> None:
    assert truncate_ip(ip) == reference_truncate_ip(ip)


def test_ip_truncation_keeps_its_examples() -> None:
    assert truncate_ip("203.0.113.77") == "203.0.113.0"
    assert truncate_ip("0.0.0.0") == "0.0.0.0"
    assert truncate_ip("255.255.255.255") == "255.255.255.0"
    assert truncate_ip("010.1.1.1") is None
    assert truncate_ip("1.2.3.4%1") is None


offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets)
)
def test_formatted_time_equals_isoformat(when: datetime) -> None:
    expected = when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert format_time(when) == expected


signals = st.dictionaries(
    st.sampled_from([*CONSENT_PURPOSES, "custom"]), st.sampled_from(["granted", "denied"])
)
purposes = st.frozensets(st.sampled_from([*CONSENT_PURPOSES, "custom"]), max_size=3)
requirements = st.builds(Requirement, purposes, st.one_of(st.none(), purposes))


@settings(max_examples=300, deadline=None)
@given(consent=signals, defaults=signals, requirement=requirements)
def test_shared_consent_states_decide_as_decide(
    consent: dict[str, str], defaults: dict[str, str], requirement: Requirement
) -> None:
    states = ConsentStates(defaults)
    state = states.of(consent)
    assert states.of(dict(consent)) is state  # one state per signal
    granted = granted_purposes(consent, defaults)
    mentioned = frozenset(consent)  # what the event itself says; a default is no signal
    assert (state.granted, state.mentioned) == (granted, mentioned)
    expected = decide(requirement, granted, mentioned)
    assert state.decide(requirement) == expected
    assert state.decide(requirement) == expected  # the memoized answer
    assert state.decide(Requirement(requirement.require, requirement.anonymous)) == expected


def test_a_signal_that_cannot_be_a_key_gets_a_fresh_state() -> None:
    states = ConsentStates({"analytics_storage": "granted"})
    odd: dict[str, Any] = {"ad_storage": ["granted"]}
    state = states.of(odd)
    assert state.granted == frozenset({"analytics_storage"})
    assert state is not states.of(odd)


def test_the_consent_cache_is_bounded() -> None:
    states = ConsentStates({})
    for i in range(3000):
        states.of({f"purpose_{i}": "granted"})
    assert len(states._states) <= 1024
    assert states.of({"ad_storage": "granted"}).granted == frozenset({"ad_storage"})


RULES = """
settings:
  consent_defaults: {analytics_storage: granted}
destinations:
  hook: {type: webhook, url: "http://127.0.0.1:9/hook"}
  log: {type: log}
triggers:
  buy: {event: purchase, when: properties.value > `0`}
  any: {event: "*"}
tags:
  - name: hook_full
    trigger: buy
    destination: hook
    consent: [ad_storage]
    dedup_key: properties.order_id
  - name: hook_anonymous
    trigger: buy
    destination: hook
    consent: {require: [ad_user_data], anonymous: [analytics_storage]}
  - name: log_all
    trigger: any
    destination: log
"""


def container(tmp_path: Path) -> Container:
    (tmp_path / "rules.yaml").write_text(RULES)
    compiled, problems = compile_container(tmp_path)
    assert compiled is not None, problems
    return compiled


def test_a_tag_hands_its_adapter_the_context_of_its_own_decision(tmp_path: Path) -> None:
    rules = container(tmp_path)
    seen: list[PayloadContext] = []
    adapter = rules.destinations["hook"].adapter
    original = adapter.build_payload

    def spy(mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        seen.append(ctx)
        return original(mapped, ctx)

    object.__setattr__(adapter, "build_payload", spy)
    event = normalize(
        {
            "event_name": "purchase",
            "properties": {"value": 3, "order_id": "o1"},
            "context": {"ip": "203.0.113.9"},
            "consent": {"ad_storage": "granted", "ad_user_data": "denied"},
        },
        NOW,
    )
    decisions = rules.evaluate(event, now=NOW)
    assert [d.fired for d in decisions] == [True, True, True]
    assert [c.tag for c in seen] == ["hook_full", "hook_anonymous"]
    assert decisions[0].dedup_key == "hook_full:o1"
    assert decisions[1].anonymous and seen[1].restricted
    assert seen[1].event["context"]["ip"] == "203.0.113.0"


def test_a_blocked_decision_names_the_missing_consent(tmp_path: Path) -> None:
    rules = container(tmp_path)
    denied = {"event_name": "purchase", "properties": {"value": 1}, "consent": {}}
    first = rules.evaluate(normalize(dict(denied, event_id="e1"), NOW), now=NOW)[0]
    reason = "consent denied: ad_storage (no signal)"
    assert first == Decision("hook_full", "hook", False, reason, reason)


def test_a_scope_with_a_shared_state_evaluates_as_one_without(tmp_path: Path) -> None:
    rules = container(tmp_path)
    for consent in ({}, {"ad_storage": True}, {"ad_user_data": "granted", "ad_storage": False}):
        event = normalize(
            {"event_name": "purchase", "properties": {"value": 2}, "consent": consent}, NOW
        )
        shared = EventScope(event, rules.consent_defaults, rules.consent(event))
        fresh = EventScope(event, rules.consent_defaults)
        assert isinstance(fresh.consent, ConsentState)
        for tag in rules.tags:
            assert tag.evaluate(event, rules.consent_defaults, NOW, shared) == tag.evaluate(
                event, rules.consent_defaults, NOW, fresh
            )
            assert tag.evaluate(event, rules.consent_defaults, NOW) == tag.evaluate(
                event, rules.consent_defaults, NOW, fresh
            )


def reference_remembered(context: dict[str, Any], received_at: float) -> dict[str, str]:
    """What identity_update remembered before: every name of REMEMBERED, in order."""
    values: dict[str, str] = {}
    for name in REMEMBERED:
        value = context.get(name)
        if isinstance(value, str) and value:
            values[name] = value[:500]
    if "fbclid" in values and "fbc" not in values:
        values["fbc"] = f"fb.1.{int(received_at * 1000)}.{values['fbclid']}"
    return values


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*REMEMBERED, "ip", "user_agent", "page_url", "other"]),
        st.one_of(st.none(), st.integers(0, 1), st.text(max_size=3), st.just("x" * 600)),
    )
)
def test_remembered_values_keep_their_order(context: dict[str, Any]) -> None:
    granted = frozenset({"ad_storage"})
    update = identity_update({"visitor_id": "v", "context": context}, granted, 1.0)
    expected = reference_remembered(context, 1.0)
    assert update is not None
    assert list(update.values.items()) == list(expected.items())
