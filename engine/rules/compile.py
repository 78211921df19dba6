"""Load a rule container, check it, and compile it.

:func:`load` reads a directory of YAML files (or one file), validates each against the rule-file
schema, then checks what a schema cannot see: references between names, JMESPath syntax,
adapter settings, environment variables, and triggers that can never fire. Every problem points
at ``file:line:column``. Errors stop the container; warnings do not.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import jsonschema

from destinations import cleartext, registry, values
from destinations.base import PayloadError
from engine.config import MAX_DAYS
from engine.consent import Requirement
from engine.errors import BadRequest, PluginError, RulesError
from engine.event import EVENT_SCHEMA
from engine.expr import (
    VARIABLE,
    ExpressionError,
    Field,
    Getter,
    compile_mapping,
    compile_tree,
    constant,
    numbers_as_text,
    path_of,
    target_problem,
)
from engine.rules import expressions
from engine.rules.expressions import Variable
from engine.rules.model import (
    MAX_TIMEOUT,
    Condition,
    Container,
    DeliveryOptions,
    DestinationInstance,
    RuleTest,
    Tag,
    Trigger,
    redacted,
)
from engine.rules.schema import DURATION_PATTERN, RULES_SCHEMA, VARIABLE_NAME_PATTERN
from engine.rules.source import (
    Document,
    Position,
    Problem,
    misread_number,
    parse_yaml,
    read_rule_file,
    rule_files,
)
from engine.rules.testing import prepared_event

_SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(RULES_SCHEMA)
_NUMBER_KEY = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# ``$${`` (a literal ``${``), ``${NAME}`` or ``${NAME:-default}``, or a ``${`` that is neither.
_ENV_REF = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")
_SHORTEST_DEDUP_WINDOW = 300.0  # seconds: the signature replay window (engine.auth)
_ENV_SHOWN = 64  # at most this much of a malformed reference is quoted in its error
# ``${NAME}`` or ``${NAME:-default}`` outside a destination's settings, where nothing replaces it.
_ENV_LIKE = re.compile(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")
_ENV_END = re.compile(r"[}$]")  # where a malformed reference quoted in an error ends
_VAR_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The longest duration a rule file may set: beyond that it is a typo (the server's own limit on
# retention and windows), and a time that far ahead no longer fits a date.
MAX_DURATION = MAX_DAYS * 86400.0
_ENGINE_KEYS = ("type", "enabled", "delivery")
_USER_DATA_FIELDS = frozenset(EVENT_SCHEMA["properties"]["user_data"]["properties"])
# The top-level fields an event has when the rules see it: intake refuses any other, reads
# event_type as event_name, sets source and the identifiers it dropped as no values, and the
# pipeline adds the list of fields enrichment added.
EVENT_FIELDS = (frozenset(EVENT_SCHEMA["properties"]) - {"event_type"}) | {
    "dropped",
    "enriched",
    "source",
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a text with a unit: ``500ms``, ``30s``, ``10m``, ``48h``, ``7d``."""
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits: longer than any limit
            return math.inf
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class _Entry:
    """One named thing from some file, with where it came from."""

    doc: Document
    path: tuple[str | int, ...]
    value: Any

    def at(self, *sub: str | int) -> Position:
        return self.doc.at(*self.path, *sub)

    def key_at(self, *sub: str | int) -> Position:
        return self.doc.key_at(*self.path, *sub)


@dataclass(frozen=True)
class _Lookup:
    """A lookup table as check reads it: what it looks up (as written), its keys, and whether
    it has a default."""

    looks_up: str
    keys: frozenset[str]
    has_default: bool


@dataclass
class _Compiler:
    env: Mapping[str, str]
    problems: list[Problem] = field(default_factory=list)
    settings: dict[str, _Entry] = field(default_factory=dict)
    destinations: dict[str, _Entry] = field(default_factory=dict)
    variables: dict[str, _Entry] = field(default_factory=dict)
    triggers: dict[str, _Entry] = field(default_factory=dict)
    tags: list[_Entry] = field(default_factory=list)
    tests: list[_Entry] = field(default_factory=list)
    _variables: dict[str, Variable] = field(default_factory=dict)
    _resolving: list[str] = field(default_factory=list)
    # Triggers with a condition that did not compile (reported there): what is left of them
    # says nothing of which events they take.
    _broken_triggers: set[str] = field(default_factory=set)
    # Lookup tables by variable (for a tag event_name that a table names: see
    # _check_event_name_table).
    _lookups: dict[str, _Lookup] = field(default_factory=dict)
    # Lookup tables already checked as a tag's event_name (see _check_event_name_texts).
    _event_name_tables: set[str] = field(default_factory=set)

    def error(self, where: Position, message: str) -> None:
        self.problems.append(Problem(where, message))

    def warn(self, where: Position, message: str) -> None:
        self.problems.append(Problem(where, message, "warning"))

    def json_constant(self, value: Any, where: Position, what: str, field: str) -> bool:
        """Report a constant no platform could be sent: YAML reads ``2026-11-30`` as a date,
        ``.nan`` as a float JSON cannot carry, ``!!binary`` as bytes. Whether it was."""
        try:
            values.check_json(value, field)
        except PayloadError as exc:
            self.error(
                where,
                f"{what}: {exc}; quote a date or other text that YAML would read as something "
                "else ('2026-11-30')",
            )
            return True
        return False

    def env_outside_settings(self, value: Any, where: Position, what: str) -> bool:
        """Report a ``${VAR}`` in a constant or an expression: only a destination's settings
        are read from the environment, so anywhere else it would be sent as written (a
        Google Ads ``conversionAction`` of ``${LEAD_ACTION}``, refused in every event).
        Whether one was found."""
        texts: list[str] = []

        def collect(item: Any) -> None:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict):
                for inner in item.values():
                    collect(inner)
            elif isinstance(item, list):
                for inner in item:
                    collect(inner)

        collect(value)
        found = next((m.group() for t in texts if (m := _ENV_LIKE.search(t))), None)
        if found is None:
            return False
        self.error(
            where,
            f"{what}: {found} stays this text here: environment variables are read only in "
            "a destination's settings; write the value itself, or set it in a destination's "
            "settings",
        )
        return True

    # -- gathering ------------------------------------------------------------------------------

    def add_document(self, doc: Document) -> None:
        if not isinstance(doc.data, dict):
            self.error(doc.at(), "a rule file must be a mapping with sections such as tags:")
            return
        errors = sorted(
            (e for err in _SCHEMA_VALIDATOR.iter_errors(doc.data) for e in _meant_errors(err)),
            key=lambda e: list(e.absolute_path),
        )
        for err in errors:
            self.error(_error_position(doc, (), err), _schema_message(err, doc.written))
        # Where text belongs, the schema error above already says how YAML read the value.
        said = {tuple(err.absolute_path) for err in errors}
        for path, written in doc.written.items():
            if path not in said and (misread := misread_number(written)) is not None:
                where = ".".join(str(p) for p in path)
                self.error(doc.at(*path), f"{where}: {misread}")
        if errors:
            return
        for section, target in (
            ("settings", self.settings),
            ("destinations", self.destinations),
            ("variables", self.variables),
            ("triggers", self.triggers),
        ):
            for name, value in (doc.data.get(section) or {}).items():
                if name in target:
                    first = target[name].at()
                    self.error(
                        doc.at(section, name),
                        f"{section[:-1]} {name!r} is already defined at {first}",
                    )
                    continue
                target[name] = _Entry(doc, (section, name), value)
        for i, value in enumerate(doc.data.get("tags") or []):
            self.tags.append(_Entry(doc, ("tags", i), value))
        for i, value in enumerate(doc.data.get("tests") or []):
            self.tests.append(_Entry(doc, ("tests", i), value))

    # -- expressions and variables --------------------------------------------------------------

    def expression(
        self, source: str, where: Position, what: str, constant_hint: str = ""
    ) -> Getter | None:
        """Compile an expression that may use $variables; report problems at ``where``."""
        found = self.parsed(source, where, what, constant_hint)
        return None if found is None else found.get

    def parsed(
        self, source: str, where: Position, what: str, constant_hint: str = ""
    ) -> Variable | None:
        """An expression's getter and syntax tree (as an unnamed :class:`Variable`), or None
        with its problems reported at ``where``.

        ``constant_hint`` (say ``{value: product}``) is how to write a constant where the
        expression stands, for the warning about a field no event has.
        """
        whole = _VAR_REF.fullmatch(source.strip())
        if whole:
            return self.variable(whole.group(1), where)
        if self.env_outside_settings(source, where, what):
            return None
        variables: dict[str, Variable] = {}
        for name in expressions.references(source):
            var = self.variable(name, where)
            if var is None:
                return None
            variables[name] = var
        try:
            tree = expressions.parse(source, variables)
            found = Variable("", compile_tree(tree), tree, expressions.depth(tree))
        except ExpressionError as exc:
            self.error(where, f"{what}: {exc}")
            return None
        if tree.get("type") == "expref":
            # Its value is an expression, which no payload or condition can use: every event
            # would be refused (or every condition hold) without a word from check.
            self.error(
                where,
                f"{what}: {_quote(source)} starts with &, which makes it an expression "
                "reference, an argument of sort_by, min_by, max_by or map only: remove the &",
            )
            return None
        self._check_event_fields(source, tree, where, what, constant_hint)
        for message in numbers_as_text(tree):
            self.warn(where, f"{what}: {message}")
        foreign = expressions.foreign_sources(tree)
        for message in foreign:
            self.error(where, f"{what}: {message}")
        if foreign:
            return None
        return found

    def _check_event_fields(
        self, source: str, tree: dict[str, Any], where: Position, what: str, constant_hint: str
    ) -> None:
        """Warn of a path whose first step is a top-level field no event has: it is always null
        (``EUR`` meant as the text 'EUR', ``product`` meant as a constant)."""
        for name in expressions.root_fields(tree):
            if name in EVENT_FIELDS:
                continue
            known = ", ".join(sorted(EVENT_FIELDS))
            if name == "event_type":
                hint = "intake reads event_type as event_name"
            elif name in ("null", "true", "false"):  # JMESPath has no such keywords
                hint = f"the value {name} is written in backticks (`{name}`)"
            else:
                quoted = "'" + name.replace("'", "\\'") + "'"
                hint = f"a text is written in single quotes ({quoted})"
                if constant_hint:
                    hint += f", a constant as {constant_hint.format(name=name)}"
            self.warn(
                where,
                f"{what}: {_quote(source)} reads {name}, a top-level field no event has, so it "
                f"is always null (an event has: {known}); {hint}",
            )

    def _dedup_key(self, tag: str, entry: _Entry, source: str) -> Getter | None:
        """A tag's dedup key; a constant one (``'properties.order_id'``, a text) is an error:
        every event would have that key, and the tag forward one event per window."""
        where, what = entry.at("dedup_key"), f"tag {tag} dedup_key"
        found = self.parsed(source, where, what)
        if found is None or found.tree is None or expressions.reads_the_event(found.tree):
            return None if found is None else found.get
        self.error(
            where,
            f"{what}: {_quote(source)} reads nothing of the event, so every event has the same "
            "key and the tag forwards one event per dedup window; name the field holding the "
            "order ID, as properties.order_id (a text in single quotes is a constant)",
        )
        return None

    def variable(self, name: str, where: Position) -> Variable | None:
        if name in self._variables:
            return self._variables[name]
        entry = self.variables.get(name)
        if entry is None:
            known = ", ".join(sorted(self.variables)) or "none defined"
            self.error(where, f"unknown variable ${name} (variables: {known})")
            return None
        if name in self._resolving:
            chain = [*self._resolving[self._resolving.index(name) :], name]
            if len(chain) == 2:
                self.error(entry.at(), f"variable ${name} refers to itself")
            else:
                cycle = " -> ".join(f"${n}" for n in chain)
                self.error(entry.at(), f"variable ${name} is part of a cycle: {cycle}")
            return None
        self._resolving.append(name)
        try:
            var = self._compile_variable(name, entry)
        finally:
            self._resolving.pop()
        if var is not None:
            self._variables[name] = var
        return var

    def _compile_variable(self, name: str, entry: _Entry) -> Variable | None:
        value = entry.value
        if isinstance(value, str):
            found = self.parsed(value, entry.at(), f"variable ${name}")
            return None if found is None else Variable(name, found.get, found.tree, found.depth)
        looked_up = self.parsed(value["lookup"], entry.at("lookup"), f"lookup ${name}")
        if looked_up is None:
            return None
        source = looked_up.get
        table: dict[str, Getter] = {}
        depth = looked_up.depth
        failed = False
        for key, raw in value["table"].items():
            result = self._lookup_result(name, raw, entry.at("table", key), f"table.{key}")
            if result is None:
                failed = True
            else:
                table[str(key)] = result[0]
                depth = max(depth, result[1])
        default: Getter = constant(None)
        if "default" in value:
            result = self._lookup_result(name, value["default"], entry.at("default"), "default")
            if result is None:
                failed = True
            else:
                default, depth = result[0], max(depth, result[1])
        if failed:
            return None
        self._lookups[name] = _Lookup(
            str(value["lookup"]).strip(), frozenset(table), "default" in value
        )
        # A key written as a number in another form than Python writes it (3.50, 1e3) names
        # the number an event sends (3.5, 1000): a number is looked up by that form too,
        # unless the table names it itself. A text is looked up by the keys as written only
        # ("1000" is not 1e3:, "3.5" not 3.50:), and codes with leading zeros (007, 01234)
        # stay text.
        numbers = dict(table)
        for key, getter in table.items():
            if _NUMBER_KEY.fullmatch(key) and math.isfinite(number := float(key)):
                forms = [repr(number)] + ([str(int(number))] if number.is_integer() else [])
                for form in forms:
                    numbers.setdefault(form, getter)

        def lookup(event: Any) -> Any:
            key = source(event)
            found: Getter | None = None
            if isinstance(key, str):
                found = table.get(key)
            elif isinstance(key, bool):
                found = table.get("true" if key else "false")
            elif isinstance(key, int | float):
                found = numbers.get(str(key))
                if found is None and isinstance(key, float) and key.is_integer():
                    found = numbers.get(str(int(key)))  # JSON's 3.0 is the number 3 (key 3:)
            # null, a list or an object: no key names it (a list is not the text "[1]").
            return (found or default)(event)

        # No tree: its value is only known per event.
        return Variable(name, lookup, depth=depth + 1)

    def _lookup_result(
        self, lookup: str, raw: Any, where: Position, field: str
    ) -> tuple[Getter, int] | None:
        """A lookup table's value or default as a getter, and how deep it nests: the value of
        the variable it names when it is exactly ``$name``, else the constant as written. None
        (with the problem reported) if the variable it names has an error."""
        ref = _VAR_REF.fullmatch(raw.strip()) if isinstance(raw, str) else None
        if ref is not None and ref.group(1) in self.variables:
            var = self.variable(ref.group(1), where)
            return None if var is None else (var.get, var.depth)
        if ref is not None:
            known = ", ".join(sorted(self.variables)) or "none defined"
            self.warn(
                where,
                f"lookup ${lookup} {field}: {raw!r} is sent as this text: there is no variable "
                f"${ref.group(1)} (variables: {known})",
            )
        self.json_constant(raw, where, f"lookup ${lookup}", field)
        self.env_outside_settings(raw, where, f"lookup ${lookup} {field}")
        return constant(raw), 0

    # -- sections -------------------------------------------------------------------------------

    def compile_destinations(self) -> dict[str, DestinationInstance]:
        out: dict[str, DestinationInstance] = {}
        try:
            known = registry.registry()
        except PluginError as exc:
            self.error(Position("<plugins>", 1, 1), str(exc))
            return out
        for name, entry in self.destinations.items():
            type_name = entry.value["type"]
            cls = known.get(type_name)
            if cls is None:
                types = ", ".join(sorted(known))
                self.error(
                    entry.at("type"), f"unknown destination type {type_name!r} (installed: {types})"
                )
                continue
            settings = {k: v for k, v in entry.value.items() if k not in _ENGINE_KEYS}
            before = len(self.problems)
            emptied: dict[str, str] = {}
            settings = self._substitute(settings, entry, emptied)
            if len(self.problems) > before:
                continue  # a missing variable; its empty stand-in would only add noise
            validator = jsonschema.Draft202012Validator(cls.settings_schema)
            errors = list(validator.iter_errors(settings))
            for err in errors:
                message = _setting_message(err)
                missing = _missing_required(err)
                if (
                    missing is not None
                    and ".".join([*map(str, err.absolute_path), missing]) in emptied
                ):
                    setting = ".".join([*map(str, err.absolute_path), missing])
                    self.error(
                        entry.at(*err.absolute_path, missing),
                        f"destination {name} ({type_name}): {setting} is required, but "
                        f"{emptied[setting]} is empty",
                    )
                    continue
                self.error(
                    _error_position(entry.doc, entry.path, err),
                    f"destination {name} ({type_name}): {message}",
                )
            if errors:
                continue
            try:
                adapter = cls(settings)
            # SystemExit too: a plugin's sys.exit() made `tagrelay check` end without a word.
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's constructor
                reason = _redact(str(exc) or type(exc).__name__, settings, cls.secret_settings)
                self.error(
                    entry.at(), f"destination {name} ({type_name}) rejected its settings: {reason}"
                )
                continue
            delivery = entry.value.get("delivery") or {}
            seconds = {
                key: self.duration(delivery[key], entry.at("delivery", key), f"delivery {key}", d)
                if key in delivery
                else d
                for key, d in (
                    ("max_age", DeliveryOptions.max_age),
                    ("batch_wait", DeliveryOptions.batch_wait),
                    ("timeout", DeliveryOptions.timeout),
                )
            }
            options = DeliveryOptions(
                max_attempts=delivery.get("max_attempts", DeliveryOptions.max_attempts),
                max_age=seconds["max_age"],
                batch_wait=seconds["batch_wait"],
                timeout=seconds["timeout"],
                concurrency=delivery.get("concurrency", DeliveryOptions.concurrency),
            )
            if not 0 < options.timeout <= MAX_TIMEOUT:
                self.error(
                    entry.at("delivery", "timeout"),
                    f"delivery timeout must be more than 0 and at most {MAX_TIMEOUT:g}s: a "
                    "request in flight must end before a stopping server gives up waiting",
                )
            out[name] = DestinationInstance(
                name, type_name, adapter, entry.value.get("enabled", True), options
            )
        return out

    def duration(self, value: Any, where: Position, what: str, default: float) -> float:
        """Seconds from a duration the schema accepted; ``default`` with an error at ``where``
        when it is not finite or longer than :data:`MAX_DURATION`.

        The schema cannot refuse YAML's ``.nan`` and ``.inf`` (no comparison holds for NaN): a
        NaN window became a NULL expiry that the store refused, so every event answered 503.
        """
        seconds = parse_duration(value)
        if isinstance(value, float) and not math.isfinite(value):
            self.error(where, f"{what} must be a finite duration such as 48h, not {_shown(value)}")
            return default
        if seconds > MAX_DURATION:  # infinite too: a text of more digits than a float holds
            self.error(where, f"{what} must be at most {MAX_DAYS}d ({MAX_DAYS // 365} years)")
            return default
        return seconds

    def compile_settings(self) -> float:
        """The dedup window, in seconds (settings are otherwise taken as the schema left them)."""
        default = Container.dedup_window
        entry = self.settings.get("dedup_window")
        if entry is None:
            return default
        window = self.duration(entry.value, entry.at(), "dedup_window", default)
        if window < _SHORTEST_DEDUP_WINDOW:
            # A bare number is seconds: 48 was meant as hours, and a repeat 49 s later, or a
            # backend's copy of an order a page sent a minute before, went out again.
            bare = isinstance(entry.value, int | float) or _NUMBER_KEY.fullmatch(
                str(entry.value).strip()
            )
            self.warn(
                entry.at(),
                f"dedup_window is {window:g} s"
                + (" (a number alone is seconds)" if bare else "")
                + ": a repeat of an event ID, or the second copy of an order, that comes later is "
                "forwarded again; a signed request may be replayed for 5 minutes"
                + (". Write a unit: 48h, 2d" if bare else ""),
            )
        return window

    def _substitute(
        self,
        value: Any,
        entry: _Entry,
        emptied: dict[str, str],
        path: tuple[str | int, ...] = (),
    ) -> Any:
        """``value`` with ``${VAR}`` references replaced from the environment.

        A setting whose whole text comes from the environment and comes out empty
        (``${VAR:-}`` with VAR unset or empty) is left out, as if it were not written; its
        dotted path and text go into ``emptied`` so a required one can be explained.
        """
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                sub = self._substitute(item, entry, emptied, (*path, key))
                if sub == "" and isinstance(item, str) and item:
                    emptied[".".join(map(str, (*path, key)))] = item
                    continue
                out[key] = sub
            return out
        if isinstance(value, list):
            return [self._substitute(v, entry, emptied, (*path, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        setting = ".".join(map(str, path))

        def replace(match: re.Match[str]) -> str:
            var, default = match.groups()
            if match.group(0) == "$${":
                return "${"
            if var is None or (default is not None and "${" in default):
                # Kept as text, it would be sent as the setting (a token, say) literally.
                self.error(
                    entry.at(*path),
                    f"{setting}: {_env_text(value, match.start())} is not a reference to an "
                    "environment variable: write ${NAME} or ${NAME:-default} (NAME: letters, "
                    "digits and _, no spaces; a default holds no ${...}), or $${ for a "
                    "literal ${",
                )
                return ""
            found = self.env.get(var)
            if default is not None:
                return found or default  # as in the shell: the default when unset or empty
            if found is not None:
                return found
            self.error(
                entry.at(*path),
                f"environment variable {var} is not set (write ${{{var}:-default}} for a default)",
            )
            return ""

        return _ENV_REF.sub(replace, value)

    def compile_triggers(self) -> dict[str, Trigger]:
        out: dict[str, Trigger] = {}
        for name, entry in self.triggers.items():
            spec = entry.value
            events = spec.get("event")
            names: frozenset[str] | None
            if events is None or events in ("*", ["*"]):
                names = None
            elif isinstance(events, list) and "*" in events:
                names = None
                self.warn(
                    entry.at("event"),
                    f"trigger {name}: '*' takes every event; the other names add nothing",
                )
            else:
                names = frozenset([events] if isinstance(events, str) else events)
                if not names:
                    self.error(
                        entry.at("event"), f"trigger {name} can never fire: its event list is empty"
                    )
                self._check_event_names(name, entry)
            conds: dict[str, list[Condition]] = {"when": [], "unless": []}
            for kind in ("when", "unless"):
                raw = spec.get(kind)
                for i, source in enumerate([raw] if isinstance(raw, str) else raw or []):
                    where = entry.at(kind, i) if isinstance(raw, list) else entry.at(kind)
                    found = self.parsed(source, where, f"trigger {name} {kind}")
                    if found is None:
                        self._broken_triggers.add(name)
                        continue
                    conds[kind].append(Condition(source, found.get))
                    self._check_reachable(name, kind, source, found, names, where)
            out[name] = Trigger(name, names, tuple(conds["when"]), tuple(conds["unless"]))
        return out

    def _check_event_names(self, trigger: str, entry: _Entry) -> None:
        """Warn of an event name with a comma or a space at either end. ``event: purchase, sale``
        is one name to YAML, which no event is likely to send: the trigger would take neither
        purchases nor sales. Intake takes a name as sent, so such a name is not refused."""
        events = entry.value["event"]
        for i, event in enumerate([events] if isinstance(events, str) else events):
            where = entry.at("event") if isinstance(events, str) else entry.at("event", i)
            parts = [part.strip() for part in event.split(",")]
            if len(parts) > 1 and all(parts):
                self.warn(
                    where,
                    f"trigger {trigger}: {event!r} is one event name, with a comma in it; for "
                    f"several events write a list: [{', '.join(parts)}]",
                )
            elif event != event.strip():
                self.warn(
                    where,
                    f"trigger {trigger}: {event!r} has a space at its start or end, so it takes "
                    f"only events whose name has it too, not {event.strip()!r}",
                )

    def _check_reachable(
        self,
        trigger: str,
        kind: str,
        source: str,
        expression: Variable,
        names: frozenset[str] | None,
        where: Position,
    ) -> None:
        tree = expression.tree
        if tree is None:
            return  # a lookup table's value is only known per event
        if not _reads_event(tree):
            value = bool(expression.get({}))
            if kind == "when" and not value:
                self.error(
                    where, f"trigger {trigger} can never fire: {_quote(source)} is always false"
                )
            if kind == "unless" and value:
                self.error(
                    where,
                    f"trigger {trigger} can never fire: unless {_quote(source)} is always true",
                )
            return
        if kind == "unless" and names is not None:
            always = _event_names(tree, _SUFFICIENT)
            if always and names <= always:
                listed = ", ".join(sorted(names))
                self.error(
                    where,
                    f"trigger {trigger} can never fire: unless {_quote(source)} is true for "
                    f"every event it takes ([{listed}])",
                )
            return
        if kind == "when":
            wanted = _event_names(tree, _NECESSARY)
            if wanted is not None and not wanted:  # ``event_name == 'a' && event_name == 'b'``
                self.error(
                    where,
                    f"trigger {trigger} can never fire: {_quote(source)} needs event_name to be "
                    "two different names at once",
                )
            elif names is not None and wanted is not None and not wanted & names:
                listed = ", ".join(sorted(names))
                self.error(
                    where,
                    f"trigger {trigger} can never fire: {_quote(source)} needs event_name "
                    f"{' or '.join(sorted(wanted))} but the trigger only takes [{listed}]",
                )

    def compile_tags(
        self, dests: Mapping[str, DestinationInstance], triggers: Mapping[str, Trigger]
    ) -> list[Tag]:
        out: list[Tag] = []
        seen: dict[str, Position] = {}
        used_triggers: set[str] = set()
        for entry in self.tags:
            spec = entry.value
            name = spec["name"]
            if name in seen:
                self.error(entry.at("name"), f"tag {name!r} is already defined at {seen[name]}")
                continue
            seen[name] = entry.at("name")
            for key in ("trigger", "except"):  # used, even if this tag has other mistakes
                refs = spec.get(key)
                used_triggers |= {refs} if isinstance(refs, str) else set(refs or [])
            dest = dests.get(spec["destination"])
            if dest is None and spec["destination"] not in self.destinations:
                known = ", ".join(sorted(self.destinations)) or "none defined"
                wanted = spec["destination"]
                self.error(
                    entry.at("destination"),
                    f"tag {name}: unknown destination {wanted!r} (destinations: {known})",
                )
            # The tag's own mistakes are reported whatever its destination's state, so that
            # one missing env var does not hide them until it is set.
            trigs = self._trigger_refs(name, entry, "trigger", triggers)
            excs = self._trigger_refs(name, entry, "except", triggers)
            self._check_exceptions(name, entry, trigs, excs)
            getters = self._mapping_getters(name, entry)
            event_name = None
            if "event_name" in spec:
                raw_name = spec["event_name"]
                event_name = (
                    self.expression(raw_name, entry.at("event_name"), f"tag {name} event_name")
                    if raw_name.startswith("$")
                    else constant(raw_name)
                )
                if not raw_name.startswith("$"):
                    where = entry.at("event_name")
                    self.env_outside_settings(raw_name, where, f"tag {name} event_name")
                self._check_event_name_table(name, entry, trigs, excs)  # its variable compiled
            dedup = None
            if "dedup_key" in spec:
                dedup = self._dedup_key(name, entry, spec["dedup_key"])
            if dest is None:
                continue  # what needs the adapter (its mapping, its warnings) cannot be checked
            fields = self._mapping(name, entry, dest, getters)
            self._adapter_warnings(name, entry, dest, trigs, excs)
            out.append(
                Tag(
                    name=name,
                    destination=dest,
                    triggers=tuple(trigs),
                    exceptions=tuple(excs),
                    consent=_requirement(spec.get("consent")),
                    fields=fields,
                    event_name=event_name,
                    dedup_key=dedup,
                    enabled=spec.get("enabled", True),
                    position=entry.at(),
                )
            )
        for trig_name, trig_entry in self.triggers.items():
            if trig_name not in used_triggers:
                self.warn(trig_entry.at(), f"trigger {trig_name} is not used by any tag")
        return out

    def _check_exceptions(
        self, tag: str, entry: _Entry, trigs: list[Trigger], excs: list[Trigger]
    ) -> None:
        """A tag whose exceptions block every event its triggers take can never fire."""
        if not trigs:
            return
        names = {t.name for t in trigs}
        if names <= {t.name for t in excs}:
            what = (
                "its trigger is also its exception"
                if len(names) == 1
                else "each of its triggers is also one of its exceptions"
            )
            self.error(entry.at("except"), f"tag {tag} can never fire: {what}")
            return
        takes: set[str] | None = set()  # None: any event name
        for trig in trigs:
            if takes is None or trig.events is None:
                takes = None
            else:
                takes |= trig.events
        for exc in excs:
            if exc.when or exc.unless or exc.name in self._broken_triggers:
                continue
            # An exception of any event name blocks everything; one of some names blocks a
            # tag whose triggers take only those names.
            if exc.events is None or (takes is not None and takes <= exc.events):
                taken = "any event" if takes is None else f"[{', '.join(sorted(takes))}]"
                self.error(
                    entry.at("except"),
                    f"tag {tag} can never fire: exception {exc.name} has no conditions and "
                    f"takes every event its triggers take ({taken})",
                )
                return

    def _trigger_refs(
        self, tag: str, entry: _Entry, key: str, triggers: Mapping[str, Trigger]
    ) -> list[Trigger]:
        raw = entry.value.get(key)
        refs = [raw] if isinstance(raw, str) else list(raw or [])
        out = []
        for i, ref in enumerate(refs):
            if ref in triggers:
                out.append(triggers[ref])
            elif ref not in self.triggers:
                known = ", ".join(sorted(self.triggers)) or "none defined"
                where = entry.at(key, i) if isinstance(raw, list) else entry.at(key)
                self.error(where, f"tag {tag}: unknown trigger {ref!r} (triggers: {known})")
        return out

    def _mapping_getters(self, tag: str, entry: _Entry) -> dict[str, Getter]:
        """The tag's mapping expressions, compiled (each problem reported at its target), by
        target; a target whose expression has an error is left out."""
        overrides: dict[str, Any] = entry.value.get("mapping") or {}
        out: dict[str, Getter] = {}
        for target, source in overrides.items():
            problem = target_problem(target)
            if problem is not None:
                self.error(
                    entry.key_at("mapping", target), f"tag {tag} mapping {target}: {problem}"
                )
            if isinstance(source, str):
                where = entry.at("mapping", target)
                what = f"tag {tag} mapping {target}"
                getter = self.expression(source, where, what, "{{value: {name}}}")
                if getter is not None:
                    out[target] = getter
        return out

    def _mapping(
        self, tag: str, entry: _Entry, dest: DestinationInstance, getters: Mapping[str, Getter]
    ) -> tuple[Field, ...]:
        """The tag's fields: the adapter's default mapping with the tag's ``mapping`` over it
        (``getters``: its expressions, from :meth:`_mapping_getters`)."""
        overrides: dict[str, Any] = entry.value.get("mapping") or {}
        default_targets = list(dest.adapter.default_mapping)
        defaults = compile_mapping(
            {
                target: source
                for target, source in dest.adapter.default_mapping.items()
                if not any(target == t or target.startswith(t + ".") for t in overrides)
            }
        )
        fields = list(defaults)
        removals: list[tuple[str, Position]] = []
        known = dest.adapter.mapping_fields
        for target, source in overrides.items():
            where = entry.at("mapping", target)
            if target_problem(target) is not None:
                continue  # reported by _mapping_getters
            root = target.split(".", 1)[0]
            removal = source is None or (isinstance(source, dict) and source.get("value") is None)
            if known is not None and root not in known and not removal:
                # The adapter refuses every payload with it: the tag would never fire.
                close = difflib.get_close_matches(root, sorted(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.error(
                    where,
                    f"tag {tag} mapping {target}: {dest.type} takes no field {root!r}{hint}, so "
                    f"the tag would never fire; its fields: {', '.join(sorted(known))}",
                )
                continue
            if removal:
                # {value: null} sends nothing as null does: the same removal, checked the same.
                removals.append((target, where))
            elif isinstance(source, dict):
                at = entry.at("mapping", target, "value")
                reported = self.json_constant(source["value"], at, f"tag {tag}", target)
                what = f"tag {tag} mapping {target}"
                reported = self.env_outside_settings(source["value"], at, what) or reported
                fields.append(Field(tuple(target.split(".")), constant(source["value"])))
                self._check_cleartext_constant(tag, dest, target, source["value"], where)
                if not reported:  # one error at a constant: what it is, before what it does
                    self._check_adapter_constant(tag, dest, target, source["value"], at)
            elif isinstance(source, str):
                getter = getters.get(target)
                if getter is not None:
                    fields.append(Field(tuple(target.split(".")), getter))
                    self._check_cleartext(tag, dest, target, path_of(getter), where)
            else:
                self.json_constant(source, where, f"tag {tag}", target)
                fields.append(Field(tuple(target.split(".")), constant(source)))
                self._check_cleartext_constant(tag, dest, target, source, where)
        reads = {f.target: path_of(f.get) for f in fields}
        for target, where in removals:
            parts = tuple(target.split("."))
            # A default of exactly this target, or below it, was left out above. A field that
            # sends a whole object holding it (the webhook's ``user_data: user_data``) sends it
            # still: that field now removes it from its value.
            removed = any(t == target or t.startswith(target + ".") for t in default_targets)
            holders = [
                i
                for i, f in enumerate(fields)
                if len(f.target) < len(parts) and parts[: len(f.target)] == f.target
            ]
            for i in holders:
                rest = parts[len(fields[i].target) :]
                fields[i] = Field(fields[i].target, _without(fields[i].get, rest))
                source = reads.get(fields[i].target)
                if source is not None:
                    self._check_canonical(tag, target, (*source, *rest), where)
            if not removed and not holders:
                self.error(
                    where,
                    f"tag {tag} mapping {target}: null removes nothing: the {dest.type} "
                    f"mapping sends no {target} and nothing that holds it",
                )
        # YAML's mappings have no order: a target goes inside the value of a shallower one the
        # tag sets too (``x`` and ``x.y``), whichever of them the file writes first, as a tag's
        # ``properties.value`` goes inside the default ``properties``.
        targets = {f.target for f in fields}
        return tuple(
            sorted(fields, key=lambda f: sum(f.target[:i] in targets for i in range(len(f.target))))
        )

    def _check_cleartext(
        self,
        tag: str,
        dest: DestinationInstance,
        target: str,
        source: tuple[str, ...] | None,
        where: Position,
    ) -> None:
        """Refuse a mapping that would send personal data to a platform in clear text.

        For adapters that hash personal data (``Destination.hashed_fields``): a target named
        like personal data other than those fields (Meta's ``user_data.email``), and the
        event's e-mail, phone, names, date of birth or whole ``user_data`` read by plain path
        into any other target. The adapters refuse such payloads too (destinations.cleartext);
        this says so before the rules are deployed.
        """
        adapter = dest.adapter
        hashed = adapter.hashed_fields
        if not hashed or target in hashed:
            return
        sent = f"tag {tag} mapping {target}: would send"
        to = f"to {dest.name} ({dest.type}) in clear text"
        name = target.rsplit(".", 1)[-1]
        kind = None if cleartext.names_a_digest(name) else cleartext.kind_of(name)
        if kind is not None:
            what = cleartext.DESCRIPTIONS[kind]
        elif source is not None and source[:1] == ("user_data",):
            if len(source) == 1:
                fields = ", ".join(sorted(hashed))
                self.error(
                    where,
                    f"{sent} the event's whole user_data (e-mail address, phone, names) {to}; "
                    f"it hashes personal data only when mapped to {fields}",
                )
                return
            kind = cleartext.kind_of(source[1])
            if kind is None:
                return
            what = f"the event's user_data.{source[1]}"
        else:
            return
        home = adapter.personal_homes.get(kind)
        where_to = (
            f"it takes it only hashed, mapped to {home}"
            if home
            else f"it takes no {kind.replace('_', ' ')}: leave it out"
        )
        self.error(where, f"{sent} {what} {to}; {where_to}")

    def _check_cleartext_constant(
        self, tag: str, dest: DestinationInstance, target: str, value: Any, where: Position
    ) -> None:
        """A constant mapped for an adapter that hashes personal data: refused where the
        adapter would refuse it (a phone number under ``custom_data.phone``, an e-mail address
        anywhere), not for its target's name alone (``custom_data.mobile: false``)."""
        adapter = dest.adapter
        if not adapter.hashed_fields or target in adapter.hashed_fields:
            return
        try:
            cleartext.check(value, target, f"{dest.name} ({dest.type})", adapter.personal_homes)
        except PayloadError as exc:
            self.error(where, f"tag {tag} mapping {exc}")

    def _check_adapter_constant(
        self, tag: str, dest: DestinationInstance, target: str, value: Any, where: Position
    ) -> None:
        """A constant the tag's adapter would refuse in every event (a Google Ads
        ``conversionAction`` that is no ID: Destination.constant_problem) is an error at it. An
        adapter's bug there, or an answer of another shape, is a warning, as for its other
        hooks."""
        if value is None:
            return
        try:
            problem = dest.adapter.constant_problem(target, value)
            if problem is not None and not isinstance(problem, str):
                raise TypeError("constant_problem must give text or None")
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the check
            self.warn(
                where,
                f"tag {tag}: the {dest.type} adapter could not check the constant of {target}: "
                f"{type(exc).__name__}",
            )
            return
        if problem:
            self.error(
                where,
                f"tag {tag} mapping {target}: {redacted(dest.adapter, problem)}, so "
                f"{dest.name} ({dest.type}) would refuse every event of the tag",
            )

    def _platform_names(
        self, entry: _Entry, triggers: Sequence[Trigger], exceptions: Sequence[Trigger]
    ) -> frozenset[str] | None:
        """The platform event names a tag can send: its constant ``event_name``, else (none
        given) the event names its triggers take; None when they cannot be known."""
        raw_name = entry.value.get("event_name")
        if isinstance(raw_name, str):
            return None if raw_name.startswith("$") else frozenset({raw_name})
        return self._taken_names(triggers, exceptions)

    def _taken_names(
        self, triggers: Sequence[Trigger], exceptions: Sequence[Trigger]
    ) -> frozenset[str] | None:
        """The event names a tag's triggers take, less those an exception without conditions
        blocks; None when a trigger takes any name (``'*'``) or there are no triggers."""
        if not triggers or any(t.events is None for t in triggers):
            return None
        names = frozenset().union(*(t.events or () for t in triggers))
        for exc in exceptions:
            if exc.name in self._broken_triggers:
                continue
            if exc.events is not None and not exc.when and not exc.unless:
                names -= exc.events
        return names

    def _check_event_name_table(
        self,
        tag: str,
        entry: _Entry,
        triggers: Sequence[Trigger],
        exceptions: Sequence[Trigger],
    ) -> None:
        """A tag whose ``event_name`` is a lookup table of the event's name, without a default:
        an event whose name the table lacks gets no platform name, and the tag does not fire
        for it (``the event_name mapping gave no name``)."""
        raw = entry.value.get("event_name")
        if not isinstance(raw, str) or not raw.startswith("$"):
            return
        self._check_event_name_texts(tag, raw[1:].strip())
        found = self._lookups.get(raw[1:].strip())
        if found is None or found.looks_up != "event_name" or found.has_default:
            return
        names = self._taken_names(triggers, exceptions)
        keys = found.keys
        missing = sorted(names - keys) if names else []
        if not missing:
            return
        named = ", ".join(missing)
        table = ", ".join(sorted(keys)) or "nothing"
        if len(missing) == len(names or ()):
            self.error(
                entry.at("event_name"),
                f"tag {tag} can never fire: event_name {raw} has no name for {named} (its table "
                f"names {table}, with no default)",
            )
        else:
            self.warn(
                entry.at("event_name"),
                f"tag {tag} does not fire for {named}: event_name {raw} has no name for it "
                f"(its table names {table}, with no default); add it to the table, or a "
                "default",
            )

    def _check_event_name_texts(self, tag: str, variable: str) -> None:
        """A lookup table used as a tag's ``event_name`` whose value (or default) YAML reads as
        something other than text (``lead: on`` is true, ``signup: 404`` a number): every event
        it names gets no platform name, and the tag does not fire for it (``the event_name
        mapping gave no name``). Reported once per table, at the value."""
        entry = self.variables.get(variable)
        if variable in self._event_name_tables or entry is None or variable not in self._lookups:
            return
        self._event_name_tables.add(variable)
        spec = entry.value
        values: list[tuple[tuple[str, ...], str | None, Any]] = [
            (("table", str(key)), str(key), raw) for key, raw in spec["table"].items()
        ]
        if "default" in spec:
            values.append((("default",), None, spec["default"]))
        for path, key, raw in values:
            if raw is None or isinstance(raw, str | date):
                continue  # null: no name, as a missing default; a date: reported as no JSON
            shown = entry.doc.written.get((*entry.path, *path))
            reading = (
                f'YAML reads the unquoted {shown} as {_yaml_reading(raw)}: write it in quotes ("'
                f'{shown}")'
                if shown
                else f"it is {_TYPE_WORDS[_json_type(raw)]}"
            )
            events = f"event {key}" if key is not None else "the events the table does not name"
            self.error(
                entry.at(*path),
                f"lookup ${variable} {'.'.join(map(str, path))}: tag {tag} sends it as its "
                f"event_name, which must be text, but {reading}; else the tag does not fire "
                f"for {events}",
            )

    def _adapter_warnings(
        self,
        tag: str,
        entry: _Entry,
        dest: DestinationInstance,
        triggers: Sequence[Trigger],
        exceptions: Sequence[Trigger],
    ) -> None:
        """What the tag's adapter says of its mapping (Destination.mapping_warnings), each at the
        target it names, and of its copies without identifiers (anonymous_warning), at the
        tag's anonymous purposes. An adapter's bug, or an answer of another shape, is one
        warning."""
        overrides: dict[str, Any] = entry.value.get("mapping") or {}
        targets = [target for target, source in overrides.items() if source is not None]
        names = self._platform_names(entry, triggers, exceptions)
        if names is not None and not names:
            return
        consent = entry.value.get("consent") or {}
        if isinstance(consent, dict) and consent.get("anonymous") is not None:

            def anonymous() -> dict[str, str]:
                warning = dest.adapter.anonymous_warning(names)
                if warning is not None and not isinstance(warning, str):
                    raise TypeError("anonymous_warning must give text or None")
                return {"": warning} if warning else {}

            said = _asked(dest, anonymous, "its copies without identifiers")
            for warning in said.values():
                said_safely = redacted(dest.adapter, warning)  # a plugin's may quote settings
                self.warn(entry.at("consent", "anonymous"), f"tag {tag}: {said_safely}")

        def mapping() -> dict[str, str]:
            found = dict(dest.adapter.mapping_warnings(names, targets) or {})
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in found.items()):
                raise TypeError("mapping_warnings must give {target: message}")
            return found

        for target, message in _asked(dest, mapping, "the mapping").items():
            where = entry.at("mapping", target) if target in overrides else entry.at()
            self.warn(where, f"tag {tag}: {redacted(dest.adapter, message)}")

    def _check_canonical(
        self, tag: str, target: str, source: tuple[str, ...], where: Position
    ) -> None:
        """Warn when a removed field is read from a user_data field the event never has."""
        if len(source) == 2 and source[0] == "user_data" and source[1] not in _USER_DATA_FIELDS:
            known = ", ".join(sorted(_USER_DATA_FIELDS))
            self.warn(
                where,
                f"tag {tag} mapping {target}: null removes user_data.{source[1]}, which is "
                f"no field of the event (user_data fields: {known})",
            )

    def compile_tests(self, tag_names: set[str]) -> list[RuleTest]:
        out = []
        for entry in self.tests:
            spec = entry.value
            for tag_name, wanted in spec["expect"].items():
                if tag_name not in tag_names:
                    known = ", ".join(sorted(tag_names)) or "none defined"
                    self.error(
                        entry.at("expect", tag_name),
                        f"test {spec['name']!r}: unknown tag {tag_name!r} (tags: {known})",
                    )
                sent = [k for k in ("payload", "anonymous") if k in wanted]
                if wanted.get("fired") is False and (
                    "payload" in wanted or wanted.get("anonymous") is True
                ):
                    # A tag that does not fire sends nothing: the test could never pass.
                    self.error(
                        entry.at("expect", tag_name, "fired"),
                        f"test {spec['name']!r}: tag {tag_name} is expected not to fire and "
                        f"to send {' and '.join(sent)}: a tag that does not fire sends nothing; "
                        "expect one or the other",
                    )
            # Both stand for JSON, which has no time type: an unquoted 2026-01-20 in a payload
            # expected is the text, as written (it is compared with the payload's text).
            expect = _times_as_written(spec["expect"], entry.doc, (*entry.path, "expect"))
            self.json_constant(expect, entry.at("expect"), f"test {spec['name']!r}", "expect")
            test = RuleTest(spec["name"], _iso_times(spec["event"]), expect, entry.at())
            try:
                prepared_event(test.event, datetime.now(UTC))
            except BadRequest as exc:
                # What `tagrelay test` fails it for, said where it is written; a warning, as a
                # test's event never keeps the rules from serving.
                self.warn(
                    entry.at("event"),
                    f"test {spec['name']!r}: the event is invalid, so the test fails: {exc}",
                )
            out.append(test)
        return out


def _asked(
    dest: DestinationInstance, ask: Callable[[], dict[str, str]], what: str
) -> dict[str, str]:
    """A plugin hook's warnings (``ask()``); its bug, or an answer of another shape, is one
    warning (under the key ``""``) instead of a stopped check."""
    try:
        return ask()
    except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop the check
        return {"": f"the {dest.type} adapter could not check {what}: {type(exc).__name__}"}


def _consent_word(value: Any) -> str:
    """A default's value as the consent check reads it: ``granted`` or ``denied``, however the
    file writes it (``GRANTED``, ``true``), as an event may."""
    if isinstance(value, bool):
        return "granted" if value else "denied"
    return str(value).lower()


def _without(get: Getter, path: tuple[str, ...]) -> Getter:
    """``get``, with the value at ``path`` (keys of nested objects) removed from its result."""

    def without(event: Any) -> Any:
        return _drop(get(event), path)

    return without


def _drop(value: Any, path: tuple[str, ...]) -> Any:
    """A copy of ``value`` without ``path``; the original (part of the event) is never changed."""
    if not isinstance(value, dict) or path[0] not in value:
        return value
    out = dict(value)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = _drop(out[path[0]], path[1:])
    return out


def _iso_times(value: Any) -> Any:
    """``value`` with YAML timestamps (``2026-01-20T14:30:45Z`` unquoted) as ISO 8601 text.

    A test event is written in YAML but stands for JSON, which has no time type.
    """
    if isinstance(value, dict):
        return {k: _iso_times(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso_times(v) for v in value]
    if isinstance(value, datetime):
        # YAML reads a time without an offset as UTC; PyYAML leaves it naive.
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _times_as_written(value: Any, doc: Document, path: tuple[str | int, ...]) -> Any:
    """``value`` with YAML dates and times (``2026-01-20``, unquoted) as the text written."""
    if isinstance(value, dict):
        return {k: _times_as_written(v, doc, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_times_as_written(v, doc, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, date):  # a datetime too
        return doc.written.get(path) or _iso_times(value)
    return value


def _env_text(value: str, start: int) -> str:
    """The ``${...}`` at ``start`` of a setting as written, for a message: up to its closing
    brace or the next ``$``, whichever comes first; cut at :data:`_ENV_SHOWN` characters."""
    found = _ENV_END.search(value, start + 2)
    if found is None:
        text = value[start:]
    else:
        text = value[start : found.end() if found.group() == "}" else found.start()].rstrip()
    return repr(text if len(text) <= _ENV_SHOWN else text[:_ENV_SHOWN] + "...")


def _shown(value: Any) -> str:
    """A number or text from a rule file as it would be written there (``.nan``, ``.inf``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else "-.inf" if value < 0 else ".inf"
    return str(value)


def _requirement(raw: Any) -> Requirement:
    if raw is None:
        return Requirement()
    if isinstance(raw, list):
        return Requirement(frozenset(raw))
    anonymous = raw.get("anonymous")
    return Requirement(
        frozenset(raw.get("require") or []), None if anonymous is None else frozenset(anonymous)
    )


def _quote(source: str) -> str:
    """An expression quoted for a message (backticks, unless it holds JMESPath literals)."""
    return f'"{source}"' if "`" in source else f"`{source}`"


def _reads_event(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("type") in ("field", "current", "identity"):
            return True
        if node.get("type") == VARIABLE:
            var = expressions.variable_of(node)
            return var is None or var.tree is None or _reads_event(var.tree)
        return any(_reads_event(child) for child in node.get("children", []))
    return False


def _missing_required(err: jsonschema.ValidationError) -> str | None:
    """The property a ``required`` error is about (the first one missing), else None."""
    if err.validator != "required" or not isinstance(err.instance, Mapping):
        return None
    names = err.validator_value if isinstance(err.validator_value, list) else []
    return next((str(n) for n in names if n not in err.instance), None)


_NECESSARY, _SUFFICIENT = "and_expression", "or_expression"


def _event_names(node: Mapping[str, Any], lenient: str) -> set[str] | None:
    """Event names told by ``event_name == 'x'`` comparisons joined by ``&&`` and ``||``.

    With ``lenient=_NECESSARY``: the names the expression insists on (true only for those).
    With ``lenient=_SUFFICIENT``: the names it is certainly true for. The joint named by
    ``lenient`` may have parts that tell nothing (they are left out); the other needs all its
    parts to tell. None when the expression tells nothing.
    """
    var = expressions.variable_of(node)
    if var is not None:
        return None if var.tree is None else _event_names(var.tree, lenient)
    kind = node.get("type")
    children = node.get("children", [])
    if kind in (_NECESSARY, _SUFFICIENT):
        found = [_event_names(child, lenient) for child in children]
        if kind != lenient and any(s is None for s in found):
            return None
        sets = [s for s in found if s is not None]
        if not sets:
            return None
        return set.intersection(*sets) if kind == "and_expression" else set().union(*sets)
    if kind == "comparator" and node.get("value") == "eq" and len(children) == 2:
        left, right = children
        if right.get("type") == "field":
            left, right = right, left
        if (
            left == {"type": "field", "value": "event_name", "children": []}
            and right.get("type") == "literal"
        ):
            value = right.get("value")
            return {value} if isinstance(value, str) else None
    return None


def _best_alternative(err: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The error of the ``oneOf`` branch the writer most likely meant.

    A branch whose type does not even match the value (a list where an object is also allowed)
    is the least likely one, so its "is not of type" error is only the last resort.
    """
    while err.validator == "oneOf" and err.context:
        # A type error below the branch's own level (an item of a list) is from the branch
        # whose type does match.
        meant = [e for e in err.context if e.validator != "type" or e.relative_path]
        meant = meant or list(err.context)
        err = jsonschema.exceptions.best_match(meant)
    return err


def _meant_errors(err: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """Every error of the ``oneOf`` branch the writer most likely meant, not only the best one,
    so each bad item of a list (``event: [not_found, 404, on]``) is reported."""
    if err.validator != "oneOf" or not err.context:
        return [err]
    branch = _best_alternative(err)
    while isinstance(branch.parent, jsonschema.ValidationError) and branch.parent is not err:
        branch = branch.parent
    index = branch.relative_schema_path[0]
    return [
        found
        for e in err.context
        if e.relative_schema_path[0] == index
        for found in _meant_errors(e)
    ]


def _error_position(
    doc: Document, base: tuple[str | int, ...], err: jsonschema.ValidationError
) -> Position:
    """Where a schema error points: an unknown key at the key itself, else at the value."""
    err = _best_alternative(err)
    path: tuple[str | int, ...] = (*base, *err.absolute_path)
    if "propertyNames" in err.relative_schema_path and isinstance(err.instance, str):
        return doc.key_at(*path, err.instance)  # a bad name: at the name itself
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = err.schema.get("properties", {}) if isinstance(err.schema, Mapping) else {}
        extra = sorted(set(err.instance) - set(allowed))
        if extra:
            return doc.key_at(*path, extra[0])
    return doc.at(*path)


def _schema_message(
    err: jsonschema.ValidationError, written: Mapping[tuple[str | int, ...], str] | None = None
) -> str:
    """A schema error in words; ``written``: a document's values as written (see
    :attr:`Document.written`), to show a value YAML read as something else as it was typed."""
    where = ".".join(str(p) for p in err.absolute_path)
    prefix = f"{where}: " if where else ""
    if (text := _text_expected(err)) is not None:
        shown = (written or {}).get(tuple(err.absolute_path))
        if not shown:
            return f"{prefix}must be {text}, not {_TYPE_WORDS.get(_json_type(err.instance))}"
        return (
            f"{prefix}must be {text}, but YAML reads the unquoted {shown} as "
            f'{_yaml_reading(err.instance)}: write it in quotes ("{shown}")'
        )
    if err.validator == "type":  # jsonschema's words ("5 is not of type 'object'") are Python's
        want = (
            err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        )
        wanted = [_TYPE_WORDS.get(str(t), str(t)) for t in want if t != "null"]
        if "null" in want:
            wanted.append("empty")
        got = (
            "empty (nothing written after the colon)"
            if err.instance is None
            else _TYPE_WORDS.get(_json_type(err.instance))
        )
        return f"{prefix}must be {' or '.join(wanted)}, not {got}"
    if err.validator == "additionalProperties" and isinstance(err.schema, Mapping):
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{prefix}unknown key {extra[0]!r}{hint}" if extra else prefix + err.message
    if err.validator == "required":
        return f"{prefix}{err.message}"
    if err.validator == "minItems" and tuple(err.absolute_path)[-2:] == ("consent", "anonymous"):
        return (
            f"{prefix}an empty anonymous list would forward a copy whatever the consent: name "
            "the purposes the anonymous copy needs (e.g. [analytics_storage]), or remove "
            "anonymous to forward nothing without the required consent"
        )
    if err.validator == "oneOf" and err.context:
        best = _best_alternative(err)
        return _schema_message(best, written) if best is not err else prefix + err.message
    schema: Mapping[str, Any] = err.schema if isinstance(err.schema, Mapping) else {}
    if err.validator == "enum" and isinstance(err.validator_value, list):
        # jsonschema's words are Python's ("1 is not one of ['ad_storage', ...]"); a boolean
        # choice is written as YAML writes it (true, not True).
        words = [str(v).lower() if isinstance(v, bool) else str(v) for v in err.validator_value]
        choices = ", ".join(words)
        value = err.instance
        if isinstance(value, str):
            close = difflib.get_close_matches(value, words, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if value.strip().lower() in ("true", "false") and True in err.validator_value:
                hint = f" (text, in quotes: a boolean is written without, {value.strip().lower()})"
            return f"{prefix}must be one of {choices}, not {value!r}{hint}"
        shown = (written or {}).get(tuple(err.absolute_path))
        if shown is None and _json_type(value) in ("number", "boolean"):
            shown = _shown(value) if not isinstance(value, bool) else str(value).lower()
        return f"{prefix}must be one of {choices}, not {shown or _TYPE_WORDS[_json_type(value)]}"
    if err.validator == "minProperties" and err.validator_value == 1:
        keys = sorted(schema.get("properties", {}))
        need = f": write at least one of {', '.join(keys)}" if keys else ""
        if tuple(err.absolute_path)[-1:] == ("expect",):
            need = ": name a tag and what it should do (a test that expects nothing passes always)"
        return f"{prefix}must not be empty{need}"
    if err.validator == "minLength" and err.validator_value == 1:
        # jsonschema's words are "'' should be non-empty".
        return f"{prefix}must not be empty"
    if err.validator == "pattern" and schema.get("pattern") == DURATION_PATTERN:
        # jsonschema's words quote the regular expression.
        return (
            f"{prefix}{err.instance!r} is not a duration: write seconds, unquoted (90, 0.5), "
            "or a number with a unit: 500ms, 30s, 10m, 48h, 7d"
        )
    if err.validator == "pattern" and schema.get("pattern") == VARIABLE_NAME_PATTERN:
        return (
            f"{prefix}{err.instance!r} is not a valid variable name: it is used as $name, so "
            "letters, digits and _ only (letters a-z, without accents), not starting with a "
            f"digit (e.g. {_usable_name(str(err.instance))})"
        )
    if (
        err.validator == "pattern"
        and isinstance(err.instance, str)
        and str(schema.get("pattern", "")).startswith("^[A-Za-z_]")
    ):
        return (
            f"{prefix}{err.instance!r} is not a valid name "
            "(letters a-z without accents, digits, _ . - and not starting with a digit)"
        )
    return prefix + err.message


def _usable_name(name: str) -> str:
    """A variable name like ``name`` that can be used as ``$name``: accents dropped
    (``payé``: ``paye``), anything else but letters a-z, digits and _ made _."""
    ascii_only = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9_]", "_", ascii_only)


def _text_expected(err: jsonschema.ValidationError) -> str | None:
    """For an error that a value is not text where text is expected, how to say what is: "text"
    or "text or null"; else None."""
    want = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    if err.validator != "type" or "string" not in want or isinstance(err.instance, str):
        return None
    return " or ".join(_TYPE_WORDS.get(str(t), str(t)) for t in want)


def _json_type(value: Any) -> str:
    """The JSON Schema type name of a value from a rule file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string" if isinstance(value, str) else "other"


def _yaml_reading(value: Any) -> str:
    """What YAML made of an unquoted value, in words (``NO`` is false, ``12:30`` is 750)."""
    if isinstance(value, bool | type(None)):
        return str(value).lower().replace("none", "null")
    if isinstance(value, datetime | date):
        return "a date"
    if isinstance(value, int | float):
        return f"the number {_shown(value)}"
    return "something other than text"


_TYPE_WORDS = {
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping (key: value)",
    "array": "a list",
    "null": "null",
    "other": "something other than text",
}
_BOUND_WORDS = {
    "minimum": "at least",
    "exclusiveMinimum": "more than",
    "maximum": "at most",
    "exclusiveMaximum": "less than",
}


def _setting_message(err: jsonschema.ValidationError) -> str:
    """A schema error about a destination setting that names the setting, never its value.

    Any setting can hold a secret (a token pasted into a header, a key in a URL's query), and
    ``check`` output ends up in CI logs, so these messages say what is wrong, not what is there.
    """
    err = _best_alternative(err)
    if err.validator in ("additionalProperties", "required"):
        return _schema_message(err)  # they name keys, not values
    where = ".".join(str(p) for p in err.absolute_path)
    prefix = f"{where}: " if where else ""
    kind, want = err.validator, err.validator_value
    hint = ""
    if kind == "type":
        types = want if isinstance(want, list) else [want]
        what = f"must be {' or '.join(_TYPE_WORDS.get(str(t), str(t)) for t in types)}"
        if "string" in types and isinstance(err.instance, bool | int | float | date):
            hint = (
                ": YAML reads an unquoted number, date, yes/no or on/off as something other "
                "than text, so write it in quotes"
            )
    elif kind == "pattern":
        what = f"does not have the expected form (pattern {want})"
    elif kind == "minLength":
        what = "must not be empty" if want == 1 else f"must be at least {want} characters long"
    elif kind == "maxLength":
        what = f"must be at most {want} characters long"
    elif kind == "enum" and isinstance(want, list):
        what = f"must be one of: {', '.join(str(v) for v in want)}"
    elif kind == "const":
        what = f"must be {want}"
    elif kind == "format":
        what = f"is not a valid {want}"
    elif kind in _BOUND_WORDS:
        what = f"must be {_BOUND_WORDS[kind]} {want}"
    else:
        what = f"is not valid (the adapter's schema: {kind})"
    return f"{prefix}{what} (value not shown){hint}"


def _redact(message: str, settings: Mapping[str, Any], secrets: frozenset[str]) -> str:
    """``message`` (from a plugin's own code) without the setting values it may quote."""
    values: set[str] = set()

    def collect(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for item in value.values():
                collect(item, secret)
        elif isinstance(value, list):
            for item in value:
                collect(item, secret)
        elif value is not None and not isinstance(value, bool):
            text = str(value)
            if text and (secret or len(text) >= 4):
                values.add(text)

    for key, value in settings.items():
        collect(value, key in secrets)
    for text in sorted(values, key=len, reverse=True):
        message = message.replace(text, "[REDACTED]")
    return message


def compile_container(
    path: Path, env: Mapping[str, str] | None = None
) -> tuple[Container | None, list[Problem]]:
    """Load, check and compile the container at ``path``.

    Returns:
        the container (None if there were errors) and every problem found, errors and warnings.
    """
    compiler = _Compiler(env=os.environ if env is None else env)
    files = list(rule_files(path)) if path.exists() else []
    if not files:
        where = Position(str(path), 1, 1)
        return None, [Problem(where, "no rule files found (expected *.yaml files or a YAML file)")]
    digest = hashlib.sha256()
    for file in files:
        text = read_rule_file(file, compiler.problems)
        if text is None:
            continue
        digest.update(str(file).encode() + b"\0" + text.encode() + b"\0")
        for doc in parse_yaml(text, str(file), compiler.problems) or []:
            compiler.add_document(doc)
    if any(p.severity == "error" for p in compiler.problems):
        return None, _sorted(compiler.problems)
    for name, entry in compiler.variables.items():
        compiler.variable(name, entry.at())
    dedup_window = compiler.compile_settings()
    dests = compiler.compile_destinations()
    triggers = compiler.compile_triggers()
    tags = compiler.compile_tags(dests, triggers)
    tests = compiler.compile_tests(
        {t.name for t in tags} | {e.value["name"] for e in compiler.tags}
    )
    settings = {k: e.value for k, e in compiler.settings.items()}
    problems = _sorted(compiler.problems)
    if any(p.severity == "error" for p in problems):
        return None, problems
    container = Container.create(
        destinations=dests,
        tags=tuple(tags),
        tests=tuple(tests),
        dedup_window=dedup_window,
        consent_defaults={
            purpose: _consent_word(value)
            for purpose, value in (settings.get("consent_defaults") or {}).items()
        },
        fingerprint=digest.hexdigest(),
    )
    return container, problems


def load(path: Path, env: Mapping[str, str] | None = None) -> Container:
    """Compile the container at ``path`` or raise :class:`RulesError` with every problem."""
    container, problems = compile_container(path, env)
    if container is None:
        raise RulesError([p for p in problems if p.severity == "error"])
    return container


def _sorted(problems: list[Problem]) -> list[Problem]:
    unique = dict.fromkeys(problems)
    return sorted(unique, key=lambda p: (p.position, p.message))


Loader = Callable[[Path], Container]
