"""Run the tests declared in rule files: input event -> expected tags and payload fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine import event as events
from engine.errors import BadRequest
from engine.identity import apply_ip_policy, as_collected
from engine.rules.model import Container, RuleTest
from engine.store.base import Decision


@dataclass
class TestResult:
    """The outcome of one rule test: passed, or the differences found."""

    test: RuleTest
    differences: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when nothing differed."""
        return not self.differences


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def subset_differences(expected: Any, actual: Any, path: str) -> list[str]:
    """Where ``actual`` does not contain ``expected``, at every depth.

    An object is compared by the keys ``expected`` lists (other keys of ``actual`` are not
    looked at); a list must have as many elements as ``expected``, each compared in order the
    same way (so an object inside a list is a subset too); any other value must be equal and of
    the same JSON type: ``true`` is not ``1``, while ``10`` and ``10.0`` are the same number.

    An expected ``null`` under an object's key means the key must be absent (or null): the
    payload never carries nulls of its own, so that is how a test says "not sent".
    """
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return [f"{path}: expected an object, got {_show(actual)}"]
        out: list[str] = []
        for key, value in expected.items():
            sub = f"{path}.{key}"
            if value is None:
                if actual.get(key) is not None:
                    out.append(f"{sub}: expected to be absent, got {_show(actual[key])}")
            elif key not in actual:
                out.append(f"{sub}: expected {_show(value)}, but it is missing")
            else:
                out.extend(subset_differences(value, actual[key], sub))
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected a list, got {_show(actual)}"]
        if len(expected) != len(actual):
            noun = "element" if len(expected) == 1 else "elements"
            return [f"{path}: expected {len(expected)} {noun}, got {len(actual)}: {_show(actual)}"]
        out = []
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            out.extend(subset_differences(want, got, f"{path}[{i}]"))
        return out
    if _is_number(expected) and _is_number(actual):
        same = expected == actual
    else:
        same = type(expected) is type(actual) and expected == actual
    return [] if same else [f"{path}: expected {_show(expected)}, got {_show(actual)}"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def prepared_event(
    raw: Mapping[str, Any], now: datetime, redact_params: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A test's event as the endpoint it stands for takes it (``source: browser``: as
    ``/v1/collect``, the click IDs of its URLs copied in), validated and normalized.

    Raises:
        BadRequest: the event is one the endpoint would refuse (the message says why).
    """
    event, source = events.simulated_source(dict(raw))
    if source == "browser":
        event = as_collected(event, now)
    return events.normalize(event, now, redact_params, source)


def run_test(
    container: Container,
    test: RuleTest,
    now: datetime | None = None,
    ip_storage: str = "consent",
    redact_params: frozenset[str] = frozenset(),
) -> TestResult:
    """Evaluate one test's event as the server would and compare with its expectations.

    ``ip_storage`` is the server's IP policy (``TAGRELAY_IP_STORAGE``) and ``redact_params``
    its page URL fields to redact (``TAGRELAY_REDACT_QUERY_PARAMS``), applied to the event
    before the rules see it, as intake and ``tagrelay preview`` do.
    """
    result = TestResult(test)
    now = now or datetime.now(UTC)
    try:
        event = prepared_event(test.event, now, redact_params)
    except BadRequest as exc:
        result.differences.append(f"the test event is invalid: {exc}")
        return result
    consent = container.consent(event)
    apply_ip_policy(event, ip_storage, consent.granted)
    decisions: dict[str, Decision] = {
        d.tag: d for d in container.evaluate(event, explain=True, now=now, consent=consent)
    }
    for tag, expect in test.expect.items():
        got = decisions.get(tag)
        if got is None:
            result.differences.append(f"{tag}: no such tag")
            continue
        if "fired" in expect and expect["fired"] != got.fired:
            verb = "fire" if expect["fired"] else "not fire"
            result.differences.append(f"{tag}: expected to {verb}, but {got.reason}")
        if "anonymous" in expect and expect["anonymous"] != got.anonymous:
            result.differences.append(
                f"{tag}: expected anonymous={expect['anonymous']}, got {got.anonymous}"
            )
        if "reason" in expect and expect["reason"] not in got.reason:
            result.differences.append(
                f"{tag}: expected reason containing {expect['reason']!r}, got {got.reason!r}"
            )
        if "payload" in expect:
            if got.payload is None:
                result.differences.append(f"{tag}: expected a payload, but the tag did not fire")
            else:
                result.differences.extend(
                    subset_differences(expect["payload"], got.payload, f"{tag}.payload")
                )
    return result


def run_tests(
    container: Container, ip_storage: str = "consent", redact_params: frozenset[str] = frozenset()
) -> list[TestResult]:
    """Run every test of the container (the settings: see :func:`run_test`)."""
    return [
        run_test(container, test, ip_storage=ip_storage, redact_params=redact_params)
        for test in container.tests
    ]
