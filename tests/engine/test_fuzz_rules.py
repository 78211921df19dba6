"""Property: no rule file, however wrong, makes `tagrelay check` fail other than with problems.

Marketers edit these files by hand. Whatever they write (a list where a mapping belongs, a
number where an expression belongs, an expression half typed, a setting of the wrong type), the
answer is a list of problems with positions, never an exception; and a container that compiles
evaluates any event, and runs its own tests, without one either. The files are made from the
rules language's own words (sections, keys, destination types, expression pieces), so most of
them get deep into the compiler rather than stopping at the first schema check.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from engine.errors import BadRequest
from engine.event import normalize
from engine.rules import compile_container
from engine.rules.testing import run_tests

NOW = datetime(2026, 11, 30, tzinfo=UTC)

NAMES = ["log", "hook", "meta", "ga4", "ads", "tt", "sale", "all", "v", "order_value", "x"]
TYPES = ["log", "webhook", "meta_capi", "ga4", "google_ads", "tiktok", "nope", ""]
PURPOSES = ["ad_storage", "analytics_storage", "ad_user_data", "ad_personalization", "nope"]
EXPRESSIONS = [
    "properties.value",
    "properties.order_id",
    "user_data.email",
    "$order_value",
    "$v",
    "$missing",
    "event_name == 'sale'",
    "$order_value > `0`",
    "to_number(properties.value) > `10`",
    "contains(['a', 'b'], event_name)",
    "properties.items[*].id",
    "properties.items[0].price",
    "[event_name, properties.order_id]",
    "{value: properties.value}",
    "`{}`",
    "`null`",
    "&properties.value",
    "properties.",
    "[",
    "a | b | c",
    "${TOKEN}",
    "${TOKEN:-fallback}",
    "${MISSING}",
    "length(@)",
    "not_a_function(x)",
    "'text'",
    "@",
    "*",
]
SETTING_KEYS = [
    "url",
    "secret",
    "pixel_id",
    "access_token",
    "measurement_id",
    "api_secret",
    "customer_id",
    "conversion_action",
    "pixel_code",
    "batch",
    "headers",
    "endpoint",
    "enabled",
    "delivery",
    "validate",
    "max_body_bytes",
]
DELIVERY_KEYS = ["batch_wait", "concurrency", "max_age", "max_attempts", "timeout"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EXPRESSIONS + NAMES + TYPES + ["48h", "10s", "-1", "0", "1e3", "${X}"]),
    st.text(max_size=12),
)
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(NAMES + SETTING_KEYS), st.text(max_size=6)), inner, max_size=3
        ),
    ),
    max_leaves=8,
)


def sometimes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the rules language's shape, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, anything)


def mapping_of(keys: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return sometimes(st.dictionaries(st.sampled_from(keys), values, max_size=4))


expression = sometimes(st.sampled_from(EXPRESSIONS))
names = sometimes(st.sampled_from(NAMES))
keys = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), scalars)  # hashable
destination = sometimes(
    st.fixed_dictionaries(
        {"type": sometimes(st.sampled_from(TYPES))},
        optional={
            **{
                key: sometimes(st.sampled_from([*EXPRESSIONS, "https://x.example/h", "1234"]))
                for key in SETTING_KEYS[:9]
            },
            "enabled": sometimes(st.booleans()),
            "batch": sometimes(st.booleans()),
            "delivery": mapping_of(DELIVERY_KEYS, sometimes(st.sampled_from([1, 0.5, "1s", -1]))),
        },
    )
)
lookup = st.fixed_dictionaries(
    {"lookup": expression, "table": sometimes(st.dictionaries(scalars, scalars, max_size=3))},
    optional={"default": anything},
)
trigger = sometimes(
    st.fixed_dictionaries(
        {},
        optional={
            "event": sometimes(st.one_of(names, st.just("*"), st.lists(names, max_size=3))),
            "when": sometimes(st.one_of(expression, st.lists(expression, max_size=2))),
            "unless": expression,
        },
    )
)
tag = sometimes(
    st.fixed_dictionaries(
        {"name": names, "trigger": sometimes(st.one_of(names, st.lists(names, max_size=2)))},
        optional={
            "destination": names,
            "event_name": names,
            "consent": sometimes(
                st.one_of(
                    st.lists(st.sampled_from(PURPOSES), max_size=3),
                    st.dictionaries(
                        st.sampled_from(["required", "anonymous"]),
                        st.lists(st.sampled_from(PURPOSES), max_size=2),
                    ),
                )
            ),
            "mapping": sometimes(
                st.dictionaries(
                    st.sampled_from(["custom_data.value", "value", "a..b", "x[0]", "event_name"]),
                    st.one_of(expression, st.fixed_dictionaries({"value": anything})),
                    max_size=3,
                )
            ),
            "dedup_key": expression,
            "except": sometimes(st.one_of(names, st.lists(names, max_size=2))),
            "enabled": sometimes(st.booleans()),
        },
    )
)
event = st.fixed_dictionaries(
    {"event_name": sometimes(st.sampled_from(["sale", "purchase", "lead", "page_view"]))},
    optional={
        "event_id": sometimes(st.sampled_from(["e1", "e2"])),
        "properties": sometimes(
            st.fixed_dictionaries(
                {},
                optional={
                    "value": sometimes(st.one_of(st.integers(), st.floats(), st.text(max_size=4))),
                    "order_id": anything,
                    "items": anything,
                },
            )
        ),
        "user_data": sometimes(
            st.fixed_dictionaries({}, optional={"email": scalars, "phone": scalars})
        ),
        "consent": sometimes(
            st.dictionaries(st.sampled_from(PURPOSES), st.sampled_from(["granted", "denied"]))
        ),
    },
)
test_case = sometimes(
    st.fixed_dictionaries(
        {"name": names, "event": sometimes(event)},
        optional={
            "expect": sometimes(
                st.dictionaries(
                    keys,
                    sometimes(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "fired": sometimes(st.booleans()),
                                "reason": scalars,
                                "payload": anything,
                            },
                        )
                    ),
                    max_size=2,
                )
            )
        },
    )
)
container = st.fixed_dictionaries(
    {},
    optional={
        "settings": sometimes(
            st.fixed_dictionaries(
                {},
                optional={
                    "dedup_window": sometimes(st.sampled_from(["48h", "30m", "0", 10, "-1h"])),
                    "consent_defaults": mapping_of(
                        PURPOSES, sometimes(st.sampled_from(["granted", "denied", True]))
                    ),
                },
            )
        ),
        "destinations": sometimes(st.dictionaries(keys, destination, max_size=3)),
        "variables": sometimes(st.dictionaries(keys, st.one_of(expression, lookup), max_size=3)),
        "triggers": sometimes(st.dictionaries(keys, trigger, max_size=3)),
        "tags": sometimes(st.lists(tag, max_size=4)),
        "tests": sometimes(st.lists(test_case, max_size=2)),
    },
)


class _Dumper(yaml.SafeDumper):
    """Writes what the strategies make, keys of any scalar type included."""


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(document=container, events=st.lists(event, min_size=1, max_size=3))
def test_any_rule_file_gives_problems_never_an_exception(
    tmp_path: Path, document: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.dump(document, Dumper=_Dumper, allow_unicode=True), encoding="utf-8")

    compiled, problems = compile_container(path, env={"TOKEN": "t0ken-value"})
    note("compiled" if compiled else "refused")  # --hypothesis-show-statistics

    if compiled is None:
        assert any(p.severity == "error" for p in problems)
        assert all(p.position.file == str(path) and p.position.line >= 1 for p in problems)
        return
    for result in run_tests(compiled):
        assert isinstance(result.differences, list)
    for raw in events:
        try:
            normalized = normalize(dict(raw), NOW)
        except BadRequest:  # intake refuses it with a 400 (tested elsewhere)
            continue
        for decision in compiled.evaluate(normalized, explain=True, now=NOW):
            assert isinstance(decision.reason, str)
