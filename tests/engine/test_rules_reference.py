"""Property: the compiled container decides and maps what the README's words say, on generated
containers and events.

The engine compiles rules for speed (plain paths read without the interpreter, triggers indexed
by event name, consent decisions memoized, mappings compiled into one function). The reference
here is the slow reading of the README instead: every expression is ``jmespath.search`` over the
whole event with each ``$name`` replaced by the variable's value (a JSON literal); a trigger
takes its event names and holds when every ``when`` is true and no ``unless`` is; a tag fires on
any of its triggers unless an exception trigger holds; the mapping is the adapter's default
mapping with the tag's targets over it; lookup tables, consent and dedup keys as their sections
say. Any difference is a defect of the engine, unless the README says otherwise.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jmespath
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import event as note
from hypothesis import strategies as st

from destinations.webhook import Webhook
from engine.consent import strip_identifiers
from engine.errors import BadRequest
from engine.event import normalize
from engine.rules import compile_container

NOW = datetime(2026, 11, 30, tzinfo=UTC)
EVENT_NAMES = ["purchase", "lead", "sale", "page_view"]
PURPOSES = ["ad_storage", "analytics_storage", "ad_user_data", "ad_personalization"]

# -- the reference -----------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_OPTIONS = jmespath.Options(dict_cls=dict)


def _truthy(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not isinstance(value, str | list | dict) or len(value) > 0


def _literal(value: Any) -> str:
    """``value`` as a JMESPath JSON literal."""
    return "`" + json.dumps(value).replace("`", "\\`") + "`"


class Reference:
    """The README's rules language, read the slow and plain way."""

    def __init__(self, rules: dict[str, Any]) -> None:
        self.rules = rules
        self.variables: dict[str, Any] = rules.get("variables") or {}
        self.triggers: dict[str, Any] = rules.get("triggers") or {}
        raw = (rules.get("settings") or {}).get("consent_defaults") or {}
        self.defaults = {
            p: ("granted" if v is True or str(v).lower() == "granted" else "denied")
            for p, v in raw.items()
        }

    def substituted(self, source: str, doc: Any) -> str:
        """``source`` with each ``$name`` outside quotes and literals replaced by its value."""
        out, quote, i = [], "", 0
        while i < len(source):
            char = source[i]
            if quote:
                if char == "\\":
                    out.append(source[i : i + 2])
                    i += 2
                    continue
                if char == quote:
                    quote = ""
            elif char in "'\"`":
                quote = char
            elif char == "$" and (match := _NAME.match(source, i + 1)):
                out.append(_literal(self.variable(match.group(), doc)))
                i = match.end()
                continue
            out.append(char)
            i += 1
        return "".join(out)

    def expr(self, source: str, doc: Any) -> Any:
        """An expression's value over ``doc``; a run-time error is no value."""
        try:
            return jmespath.search(self.substituted(source, doc), doc, options=_OPTIONS)
        except Exception:  # as the engine: an error at run time is no value
            return None

    def variable(self, name: str, doc: Any) -> Any:
        spec = self.variables[name]
        if isinstance(spec, str):
            return self.expr(spec, doc)
        key = self.expr(spec["lookup"], doc)
        table: dict[str, Any] = spec["table"]
        found: Any = _MISSING
        if isinstance(key, str):
            found = table.get(key, _MISSING)
        elif isinstance(key, bool):
            found = table.get("true" if key else "false", _MISSING)
        elif isinstance(key, int | float):
            # As JSON writes the number, else a key written as that number (not 007, a code).
            written = json.dumps(key)
            found = table.get(written, _MISSING)
            if found is _MISSING:
                numbers = [k for k in table if _NUMBER.fullmatch(k) and float(k) == key]
                found = table[numbers[0]] if numbers else _MISSING
        if found is _MISSING:
            if "default" not in spec:
                return None
            found = spec["default"]
        ref = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", found) if isinstance(found, str) else None
        if ref is not None and ref.group(1) in self.variables:
            return self.variable(ref.group(1), doc)
        return found

    def trigger(self, name: str, event: dict[str, Any]) -> bool:
        spec = self.triggers[name]
        events = spec.get("event")
        names = [events] if isinstance(events, str) else events
        if names is not None and "*" not in names and event["event_name"] not in names:
            return False
        when = spec.get("when")
        unless = spec.get("unless")
        when_list = [when] if isinstance(when, str) else when or []
        unless_list = [unless] if isinstance(unless, str) else unless or []
        return all(_truthy(self.expr(c, event)) for c in when_list) and not any(
            _truthy(self.expr(c, event)) for c in unless_list
        )

    def consent(self, tag: dict[str, Any], event: dict[str, Any]) -> str:
        """``full``, ``anonymous`` or ``blocked``."""
        granted = {p for p, v in self.defaults.items() if v == "granted"}
        for purpose, value in (event.get("consent") or {}).items():
            (granted.add if value == "granted" else granted.discard)(purpose)
        raw = tag.get("consent")
        if raw is None:
            return "full"
        require = set(raw) if isinstance(raw, list) else set(raw.get("require") or [])
        anonymous = None if isinstance(raw, list) else raw.get("anonymous")
        if require and require <= granted:
            return "full"
        if not require and anonymous is None:
            return "full"
        if anonymous is not None and set(anonymous) <= granted:
            return "anonymous"
        return "blocked"

    def view(self, event: dict[str, Any]) -> dict[str, Any]:
        """What a mapping reads: the consent with the defaults for purposes the event omits."""
        consent = dict(event.get("consent") or {})
        for purpose, value in self.defaults.items():
            consent.setdefault(purpose, value)
        return {**event, "consent": consent} if consent else dict(event)

    def fields(self, tag: dict[str, Any]) -> list[tuple[str, Any]]:
        """(target, source) of the tag: the adapter's defaults with the tag's mapping over them.

        A source is an expression, ``("const", X)``, or ``("without", source, path)``.
        """
        mapping: dict[str, Any] = tag.get("mapping") or {}

        def below(target: str, other: str) -> bool:
            return target == other or target.startswith(other + ".")

        out: list[tuple[str, Any]] = [
            (t, s)
            for t, s in Webhook.default_mapping.items()
            if not any(below(t, override) for override in mapping)
        ]
        removals = []
        for target, source in mapping.items():
            if source is None or (isinstance(source, dict) and source["value"] is None):
                removals.append(target)
            elif isinstance(source, dict):
                out.append((target, ("const", source["value"])))
            else:
                out.append((target, source))
        for removed in removals:
            out = [
                (t, ("without", s, removed[len(t) + 1 :]) if below(removed, t) else s)
                for t, s in out
            ]
        return out

    def value(self, source: Any, doc: Any) -> Any:
        if isinstance(source, str):
            return self.expr(source, doc)
        if source[0] == "const":
            return source[1]
        value = self.value(source[1], doc)
        *parents, last = source[2].split(".")
        if not isinstance(value, dict):
            return value
        value = json.loads(json.dumps(value))
        node = value
        for name in parents:
            node = node.get(name)
            if not isinstance(node, dict):
                return value
        node.pop(last, None)
        return value

    def mapped(self, tag: dict[str, Any], doc: Any) -> dict[str, Any]:
        """The mapped fields: a target's parents before it (YAML's mappings have no order), a
        deeper target set inside the value of a shallower one."""
        out: dict[str, Any] = {}
        fields = sorted(self.fields(tag), key=lambda f: f[0].count("."))
        for target, source in fields:
            value = self.value(source, doc)
            if value is None:
                continue
            *parents, last = target.split(".")
            node = out
            for name in parents:
                child = node.get(name)
                node[name] = child = dict(child) if isinstance(child, dict) else {}
                node = child
            node[last] = value
        return out

    def dedup(self, value: Any) -> str | None:
        if value is None or value == "" or isinstance(value, bool):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, int | float):
            return str(int(value)) if float(value).is_integer() else repr(value)
        if isinstance(value, dict):
            parts: Any = {k: self.dedup(v) for k, v in value.items()}
            whole = parts and None not in parts.values()
        else:
            parts = [self.dedup(v) for v in value]
            whole = parts and None not in parts
        return (
            json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if whole
            else None
        )

    def tag(self, tag: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        """What the tag does with the event: fired, anonymous, payload, dedup key."""
        no = {"fired": False}
        destination = self.rules["destinations"][tag["destination"]]
        if tag.get("enabled") is False or destination.get("enabled") is False:
            return no
        triggers = [tag["trigger"]] if isinstance(tag["trigger"], str) else tag["trigger"]
        if not any(self.trigger(t, event) for t in triggers):
            return no
        exceptions = tag.get("except") or []
        exceptions = [exceptions] if isinstance(exceptions, str) else exceptions
        if any(self.trigger(t, event) for t in exceptions):
            return no
        verdict = self.consent(tag, event)
        if verdict == "blocked":
            return no
        doc = self.view(event)
        if verdict == "anonymous":
            doc = strip_identifiers(doc)
        raw_name = tag.get("event_name")
        if raw_name is None:
            name = doc.get("event_name")
        elif raw_name.startswith("$"):
            name = self.expr(raw_name, doc)
        else:
            name = raw_name
        if not isinstance(name, str) or not name:
            return no
        payload = self.mapped(tag, doc)
        payload.setdefault("event_name", name)
        payload.setdefault("event_id", event["event_id"])
        payload.setdefault("timestamp", event["timestamp"])
        key = None
        if "dedup_key" in tag and (text := self.dedup(self.expr(tag["dedup_key"], event))):
            key = f"{tag['name']}:{text}"
        return {"fired": True, "anonymous": verdict == "anonymous", "payload": payload, "key": key}


_MISSING = object()

# -- generated containers and events -----------------------------------------------------------

VARIABLES = {
    "vv": "properties.value",
    "vc": "properties.code",
    "vdash": 'properties."order-id"',
    "vdot": 'properties."a.b"',
    "vuni": 'properties."größe"',
    "vitems": "properties.items",
}
EXPRESSIONS = [
    "properties.value",
    "properties.code",
    "properties.flag",
    "properties.empty",
    "properties.order_id",
    'properties."order-id"',
    'properties."a.b"',
    'properties."größe"',
    "properties.items",
    "properties.items[0].price",
    "properties.items[*].price",
    "properties.items[].id",
    "properties.items[?price > `1`].id",
    "properties.items[?price < $vv].id",
    "$vitems[?price > $vv] | length(@)",
    "length(properties.items || `[]`)",
    "!properties.flag",
    "properties.value > `2`",
    "$vv > `2`",
    "$vv == `3`",
    "$vc == '3'",
    "properties.code == `3`",
    "contains(['a', 'x', 'EUR'], $vc)",
    "to_string($vv)",
    "to_number($vc)",
    "$vv",
    "$vc",
    "$vdash",
    "$vdot",
    "$vuni",
    "$vlk",
    "$vlk2",
    "$vx",
    "$vname",
    "[event_name, properties.order_id]",
    "[$vc, $vv]",
    "{v: $vv, c: properties.code}",
    "user_data.email",
    "user_data",
    "context.gclid || context.fbclid",
    "context",
    "consent.analytics_storage",
    "consent",
    "properties.value || $vc",
    "properties.value && $vc",
    "$vlk || 'none'",
    "not_null(properties.missing, $vc)",
    "$vx[0]",
    "$vitems[0].price",
    "event_name == 'purchase'",
    "properties.items[?price == $vlk]",
    "@.properties.value",
    "properties.*",
    "type($vlk)",
    "properties.items[].{p: price, m: $vv}",
    "properties.items[?price == $vc] | [0]",
    "max_by(properties.items || `[]`, &to_number(price || `0`))",
    "sort_by(properties.items[?price], &to_string(price))[].id",
    "$vitems[?id == 'sku_1'].price | [0]",
    "keys(properties)",
    'properties."a.b" || properties."order-id"',
    "properties.value || properties.code",
    "user_data.email || context.gclid",
    "properties.items[-1].id",
    "properties.items[1:]",
    "properties.items[*].id | join(',', @)",
    "properties.items[*].[id, $vc]",
    "[properties.value, properties.code][?@]",
    "properties.empty == `[]`",
    "properties.flag == `true`",
    "properties.value == `1`",
    "$vlk2",
    "{l: $vlk, n: $vname}",
]
# Conditions: no constant ones (check refuses a condition that reads nothing).
CONDITIONS = [e for e in EXPRESSIONS if e not in ("`null`",)]
KEYS = ["3", "3.50", "1e3", "007", "true", "false", "null", "EUR", "x", "0", "-1", "", "a.b"]
TABLE_VALUES = ["A", "B", 5, 2.5, True, False, None, "$vv", "$vc", "$vdash", "", {"k": 1}, [1]]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, 3, 3.0, 3.5, 1000, -1, 7, 2.5]),
    st.sampled_from(["", "3", "3.5", "3.50", "1000", "007", "true", "null", "EUR", "x", "a", "ü"]),
    st.just([]),
    st.just({}),
)
ITEM = st.fixed_dictionaries(
    {}, optional={"price": VALUES, "id": st.sampled_from(["sku_1", "sku_2", "", 1])}
)
PROPERTY_KEYS = ["value", "code", "flag", "empty", "order_id", "order-id", "a.b", "größe"]
ORDER_IDS = st.sampled_from(["o1", "1001", 1001, 1001.0, 1001.5, "", None, ["o1"], [], {}])
EVENTS = st.fixed_dictionaries(
    {
        "event_name": st.sampled_from(EVENT_NAMES),
        "event_id": st.sampled_from(["e1", "e2"]),
        "properties": st.one_of(
            st.dictionaries(st.sampled_from(PROPERTY_KEYS), VALUES, max_size=6),
            st.fixed_dictionaries(
                {"items": st.one_of(st.lists(ITEM, max_size=3), VALUES), "order_id": ORDER_IDS},
                optional={k: VALUES for k in PROPERTY_KEYS if k != "order_id"},
            ),
        ),
    },
    optional={
        "user_data": st.fixed_dictionaries(
            {}, optional={"email": st.just("ada@example.com"), "external_id": st.just("c42")}
        ),
        "user_id": st.just("u1"),
        "context": st.fixed_dictionaries(
            {},
            optional={
                "gclid": st.sampled_from(["g1", "", None]),
                "fbclid": st.sampled_from(["f1", None]),
                "ip": st.just("203.0.113.7"),
                "page_url": st.just("https://shop.example/?gclid=g1&x=1"),
            },
        ),
        "consent": st.one_of(
            st.just({"analytics_storage": "granted", "ad_storage": "denied"}),
            st.dictionaries(
                st.sampled_from(PURPOSES),
                st.sampled_from(["granted", "granted", "denied", True, False, None]),
            ),
        ),
    },
)


def lookups(expressions: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lookup": st.sampled_from(expressions),
            "table": st.dictionaries(
                st.sampled_from(KEYS), st.sampled_from(TABLE_VALUES), max_size=5
            ),
        },
        optional={"default": st.sampled_from(TABLE_VALUES)},
    )


trigger_names = st.sampled_from(["t0", "t1", "t2", "t3"])
conditions = st.one_of(
    st.sampled_from(CONDITIONS), st.lists(st.sampled_from(CONDITIONS), min_size=1, max_size=2)
)
triggers = st.fixed_dictionaries(
    {
        "event": st.one_of(
            st.sampled_from(["*", *EVENT_NAMES]),
            st.lists(st.sampled_from([*EVENT_NAMES, "*"]), min_size=1, max_size=3, unique=True),
        )
    },
    optional={"when": conditions, "unless": conditions},
).flatmap(  # no event: any event
    lambda t: st.sampled_from([t, {k: v for k, v in t.items() if k != "event"} or t])
)
MAPPING_TARGETS = [
    "properties",
    "properties.value",
    "properties.extra",
    "x",
    "x.y",
    "x.y.z",
    "user_data.email",
    "context.ip",
    "visitor_id",
    "event_name",
    "a-b.ü",
    "consent",
]
REMOVABLE = [
    "properties",
    "properties.value",
    "user_data.email",
    "context.ip",
    "visitor_id",
    "consent",
]
CONSTANTS = st.sampled_from(["c", 5, True, {"k": "v"}, [1, 2], "", 0])
mapping = st.dictionaries(
    st.sampled_from(MAPPING_TARGETS),
    st.one_of(st.sampled_from(EXPRESSIONS), st.fixed_dictionaries({"value": CONSTANTS})),
    max_size=4,
).flatmap(
    lambda m: st.dictionaries(st.sampled_from(REMOVABLE), st.none(), max_size=2).map(
        lambda r: {**m, **{t: None for t in r if t not in m}}
    )
)
consent = st.one_of(
    st.sampled_from(
        [
            ["ad_storage"],
            {"require": ["ad_storage", "ad_user_data"], "anonymous": ["analytics_storage"]},
            {"anonymous": ["analytics_storage"]},
        ]
    ),
    st.lists(st.sampled_from(PURPOSES), max_size=2, unique=True),
    st.fixed_dictionaries(
        {},
        optional={
            "require": st.lists(st.sampled_from(PURPOSES), max_size=2, unique=True),
            "anonymous": st.lists(st.sampled_from(PURPOSES), min_size=1, max_size=2, unique=True),
        },
    ),
)
tag = st.fixed_dictionaries(
    {
        "trigger": st.one_of(
            trigger_names, st.lists(trigger_names, min_size=1, max_size=2, unique=True)
        ),
        "destination": st.sampled_from(["hook", "hook", "hook", "off"]),
    },
    optional={
        "except": st.one_of(
            trigger_names, st.lists(trigger_names, min_size=1, max_size=2, unique=True)
        ),
        "consent": consent,
        "event_name": st.sampled_from(["Purchase", "$vname", "$vc", "$vlk || 'Other'", "$vx"]),
        "mapping": mapping,
        "dedup_key": st.sampled_from(
            [
                "properties.order_id",
                'properties."order-id"',
                "[event_name, properties.order_id]",
                "{o: properties.order_id, v: $vv}",
                "$vv",
                "$vlk",
                "properties.items[].id",
            ]
        ),
        "enabled": st.sampled_from([True, True, False]),
    },
)
containers = st.fixed_dictionaries(
    {
        "destinations": st.just(
            {
                "hook": {"type": "webhook", "url": "https://hook.example/in"},
                "off": {"type": "webhook", "url": "https://hook.example/off", "enabled": False},
            }
        ),
        "variables": st.fixed_dictionaries(
            {
                **{k: st.just(v) for k, v in VARIABLES.items()},
                "vlk": lookups(["properties.code", "properties.value", "$vv", "properties.flag"]),
                "vlk2": lookups(["$vlk", "$vc || $vv", "properties.items[0].price"]),
                "vname": st.fixed_dictionaries(
                    {
                        "lookup": st.sampled_from(["properties.code", "$vv"]),
                        "table": st.dictionaries(
                            st.sampled_from(KEYS), st.sampled_from(["Purchase", "Lead"]), max_size=3
                        ),
                    },
                    optional={"default": st.sampled_from(["Other", "$vc"])},
                ),
                "vx": st.sampled_from(
                    [e for e in EXPRESSIONS if "$vx" not in e and "$vname" not in e]
                ),
            }
        ),
        "triggers": st.fixed_dictionaries({f"t{i}": triggers for i in range(4)}),
        "tags": st.lists(tag, min_size=1, max_size=4).map(
            lambda tags: [{"name": f"tag{i}", **t} for i, t in enumerate(tags)]
        ),
    },
    optional={
        "settings": st.fixed_dictionaries(
            {
                "consent_defaults": st.dictionaries(
                    st.sampled_from(PURPOSES),
                    st.sampled_from(["granted", "denied", "GRANTED", "Denied", True, False]),
                    max_size=2,
                )
            }
        )
    },
)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(rules=containers, events=st.lists(EVENTS, min_size=1, max_size=4))
def test_the_engine_does_what_the_readme_says(
    tmp_path_factory: Any, rules: dict[str, Any], events: list[dict[str, Any]]
) -> None:
    path = Path(tmp_path_factory.mktemp("rules")) / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True, sort_keys=False), encoding="utf-8")
    compiled, _ = compile_container(path, env={})
    assume(compiled is not None)
    assert compiled is not None
    reference = Reference(rules)
    for raw in events:
        try:
            event = normalize(json.loads(json.dumps(raw)), NOW)
        except BadRequest:
            continue
        decisions = {d.tag: d for d in compiled.evaluate(event, explain=True, now=NOW)}
        fast = {d.tag: d for d in compiled.evaluate(event, now=NOW)}
        for spec in rules["tags"]:
            expected = reference.tag(spec, event)
            got = decisions[spec["name"]]
            assert got.fired == expected["fired"], (spec, event, got.reason)
            assert (spec["name"] in fast and fast[spec["name"]].fired) == got.fired, spec
            if not got.fired:
                note("not fired: " + got.reason.split(":")[0][:40])
                continue
            note(f"fired anonymous={got.anonymous} key={got.dedup_key is not None}")
            assert got.anonymous == expected["anonymous"], (spec, event)
            assert got.payload == expected["payload"], (spec, event)
            assert got.dedup_key == expected["key"], (spec, event)


LOOKUP_KEYS = [*KEYS, "3.0", "1000", "1e+3", "2.5", "-0", "True", "NO", "01067", "1:30", "ü"]
LOOKUP_VALUES = st.one_of(
    VALUES, st.sampled_from(["1e3", "1e+3", "3.0", "1:30", "NO", "01067", "-0", "2.5", 2.5])
)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")), deadline=None)
@given(
    table=st.dictionaries(
        st.sampled_from(LOOKUP_KEYS), st.sampled_from(["A", "B", "C", 1, None]), max_size=6
    ),
    default=st.sampled_from([None, "D", "$code"]),
    codes=st.lists(LOOKUP_VALUES, min_size=1, max_size=8),
)
def test_a_lookup_table_gives_what_its_section_says(
    tmp_path_factory: Any, table: dict[str, Any], default: str | None, codes: list[Any]
) -> None:
    lookup: dict[str, Any] = {"lookup": "properties.code", "table": table}
    if default is not None:
        lookup["default"] = default
    rules = {
        "destinations": {"hook": {"type": "webhook", "url": "https://hook.example/in"}},
        "variables": {"code": "properties.code", "found": lookup},
        "triggers": {"all": {"event": "*"}},
        "tags": [
            {"name": "t", "trigger": "all", "destination": "hook", "mapping": {"x": "$found"}}
        ],
    }
    path = Path(tmp_path_factory.mktemp("rules")) / "rules.yaml"
    path.write_text(yaml.safe_dump(rules, allow_unicode=True, sort_keys=False), encoding="utf-8")
    compiled, problems = compile_container(path, env={})
    assert compiled is not None, problems
    reference = Reference(rules)
    for code in codes:
        event = normalize({"event_name": "sale", "properties": {"code": code}}, NOW)
        (decision,) = compiled.evaluate(event, now=NOW)
        assert decision.payload is not None
        assert decision.payload.get("x") == reference.variable("found", event), code
