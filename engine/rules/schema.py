"""The JSON Schema of a rule file.

``tagrelay schema`` writes it to ``rules/tagrelay.schema.json`` so editors can autocomplete and
flag mistakes as marketers type (the YAML language server reads a ``# yaml-language-server:
$schema=...`` comment). ``tagrelay check`` validates every file against it first, then checks
what a schema cannot: names that refer to each other, expressions, adapter settings, env vars.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.event import CONSENT_PURPOSES, CONSENT_WORDS

if TYPE_CHECKING:
    from destinations.base import Destination

_NAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_.-]*$"}
# A variable is referred to as $name, which ends at the first character that is not one of these.
VARIABLE_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"
_EXPR = {"type": "string", "minLength": 1, "description": "a JMESPath expression or $variable"}
_ONE_OR_MORE_EXPR = {"oneOf": [_EXPR, {"type": "array", "items": _EXPR, "minItems": 1}]}
_ONE_OR_MORE_NAME = {"oneOf": [_NAME, {"type": "array", "items": _NAME, "minItems": 1}]}
_PURPOSES = {"type": "array", "items": {"enum": list(CONSENT_PURPOSES)}, "uniqueItems": True}
# An empty list would make the anonymous copy need no consent at all.
_ANONYMOUS_PURPOSES = {
    **_PURPOSES,
    "minItems": 1,
    "description": "purposes that, if granted, allow a copy without identifiers (at least one)",
}
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$"
_DURATION = {
    "oneOf": [
        {"type": "string", "pattern": DURATION_PATTERN},
        {"type": "number", "minimum": 0},
    ],
    "description": "seconds, or a number with a unit: 500ms, 30s, 10m, 48h, 7d",
}

_MAPPING_VALUE = {
    "description": "expression, $variable, {value: constant}, or null to drop a default field",
    "oneOf": [
        _EXPR,
        {"type": "null"},
        {
            "type": "object",
            "properties": {"value": {}},
            "required": ["value"],
            "additionalProperties": False,
        },
        {"type": ["number", "boolean"]},
    ],
}


def _may_be_empty(section: dict[str, Any]) -> dict[str, Any]:
    """A section written with nothing under it (``variables:``) is null; that is allowed."""
    return {**section, "type": [section["type"], "null"]}


RULES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://tagrelay.dev/schema/rules.json",
    "title": "tagrelay rule file",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "settings": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "dedup_window": _DURATION,
                "consent_defaults": {
                    "type": "object",
                    "propertyNames": {"enum": list(CONSENT_PURPOSES)},
                    # As an event writes them: Google's Ads API spelling and booleans too.
                    "additionalProperties": {"enum": [*CONSENT_WORDS, True, False]},
                    "description": "what a purpose the event does not mention counts as",
                },
            },
        },
        "destinations": {
            "type": "object",
            "propertyNames": _NAME,
            "additionalProperties": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string", "description": "the destination adapter"},
                    "enabled": {"type": "boolean"},
                    "delivery": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "max_attempts": {
                                "type": "integer",
                                "minimum": 1,
                                "description": "give up after this many attempts (default: "
                                "no limit, max_age bounds the retries)",
                            },
                            "max_age": {
                                **_DURATION,
                                "description": "retry until this long after the delivery was "
                                "queued, then dead-letter (default 3d); seconds, or a number "
                                "with a unit: 500ms, 30s, 10m, 48h, 7d",
                            },
                            "batch_wait": _DURATION,
                            "timeout": _DURATION,
                            "concurrency": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
        "variables": {
            "type": "object",
            "propertyNames": {"type": "string", "pattern": VARIABLE_NAME_PATTERN},
            "additionalProperties": {
                "oneOf": [
                    _EXPR,
                    {
                        "type": "object",
                        "description": "a lookup table: `lookup` is looked up in `table`",
                        "required": ["lookup", "table"],
                        "additionalProperties": False,
                        "properties": {
                            "lookup": _EXPR,
                            "table": {"type": "object"},
                            "default": {},
                        },
                    },
                ]
            },
        },
        "triggers": {
            "type": "object",
            "propertyNames": _NAME,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "event": {
                        "oneOf": [
                            {"type": "string", "minLength": 1},
                            {"type": "array", "items": {"type": "string", "minLength": 1}},
                        ],
                        "description": "event name(s) to match; '*' or absent matches all",
                    },
                    "when": _ONE_OR_MORE_EXPR,
                    "unless": _ONE_OR_MORE_EXPR,
                },
            },
        },
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "trigger", "destination"],
                "additionalProperties": False,
                "properties": {
                    "name": _NAME,
                    "description": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "trigger": _ONE_OR_MORE_NAME,
                    "except": _ONE_OR_MORE_NAME,
                    "destination": _NAME,
                    "event_name": {"type": "string", "minLength": 1},
                    "consent": {
                        "oneOf": [
                            _PURPOSES,
                            {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "require": _PURPOSES,
                                    "anonymous": _ANONYMOUS_PURPOSES,
                                },
                            },
                        ]
                    },
                    "dedup_key": _EXPR,
                    "mapping": {
                        "type": "object",
                        "additionalProperties": _MAPPING_VALUE,
                    },
                },
            },
        },
        "tests": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "event", "expect"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "event": {"type": "object"},
                    "expect": {
                        "type": "object",
                        "minProperties": 1,  # a test that expects nothing passes whatever
                        "additionalProperties": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": False,
                            "properties": {
                                "fired": {"type": "boolean"},
                                # "" is a substring of every reason: it expects nothing.
                                "reason": {"type": "string", "minLength": 1},
                                "payload": {"type": "object"},
                                "anonymous": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
}
for _section in ("settings", "destinations", "variables", "triggers", "tags", "tests"):
    RULES_SCHEMA["properties"][_section] = _may_be_empty(RULES_SCHEMA["properties"][_section])


# A setting's value may be written as an environment reference whatever its type (`${PORT}`,
# `${FLAG:-true}`): `tagrelay check` validates the value it stands for.
_ENV_REFERENCE = {"type": "string", "pattern": r"\$\{"}


def editor_schema(adapters: Mapping[str, type[Destination]]) -> dict[str, Any]:
    """:data:`RULES_SCHEMA` with each adapter's settings under the destinations of its type,
    for editors: the known types offered, each setting's description on hover, a misspelt or
    missing setting flagged where the adapter's schema says so.

    Editor help only: ``tagrelay check`` validates with :data:`RULES_SCHEMA` and then each
    adapter's own schema, once ``${...}`` references are read. So a setting here also takes an
    environment reference, as check does, and an unknown type is still any text (a plugin
    the editor's schema was written without).
    """
    schema = copy.deepcopy(RULES_SCHEMA)
    entry = schema["properties"]["destinations"]["additionalProperties"]
    common = entry["properties"]
    common["type"] = {
        "description": "the destination adapter",
        "anyOf": [{"enum": sorted(adapters)}, {"type": "string"}],
    }
    by_type = []
    for name, adapter in sorted(adapters.items()):
        settings = adapter.settings_schema if isinstance(adapter.settings_schema, dict) else {}
        own = settings.get("properties")
        properties: dict[str, Any] = {key: {} for key in common}  # described above
        for key, rule in (own if isinstance(own, dict) else {}).items():
            if key in common or not isinstance(rule, dict):
                continue
            properties[key] = {"anyOf": [rule, _ENV_REFERENCE]}
            if isinstance(rule.get("description"), str):
                properties[key]["description"] = rule["description"]
        then: dict[str, Any] = {"properties": properties}
        if isinstance(settings.get("required"), list):
            then["required"] = list(settings["required"])
        if settings.get("additionalProperties") is False:
            then["additionalProperties"] = False
        by_type.append(
            {"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": then}
        )
    if by_type:
        entry["allOf"] = by_type
    return schema
