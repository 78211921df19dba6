"""The compiled container: triggers, tags and destinations, ready to evaluate events.

Everything here is built once by :mod:`engine.rules.compile` and is read-only afterwards, so one
container can be shared by all threads of a worker and swapped whole on reload.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from destinations.base import Destination, PayloadContext, PayloadError
from engine import jsonio
from engine.consent import ConsentState, ConsentStates, Requirement, Verdict, strip_identifiers
from engine.event import event_time
from engine.expr import Builder, Field, Getter, compile_builder, truthy
from engine.logs import Throttle
from engine.rules.source import Position
from engine.store.base import Decision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Condition:
    """A compiled ``when``/``unless`` expression and its source text (for explanations)."""

    source: str
    get: Getter


@dataclass(frozen=True)
class Trigger:
    """Which events: an event-name set (None: any) and conditions that must all hold."""

    name: str
    events: frozenset[str] | None
    when: tuple[Condition, ...] = ()
    unless: tuple[Condition, ...] = ()
    _matched: tuple[bool, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The answer when the trigger matches is the same for every event: worded once.
        object.__setattr__(self, "_matched", (True, f"trigger {self.name} matched"))

    def check(self, event: Mapping[str, Any]) -> tuple[bool, str]:
        """Whether the trigger matches, and why (or why not), in words."""
        name = event.get("event_name")
        if self.events is not None and name not in self.events:
            wanted = ", ".join(sorted(self.events))
            return False, f"trigger {self.name}: event {name!r} is not one of [{wanted}]"
        for cond in self.when:
            if not truthy(cond.get(event)):
                return False, f"trigger {self.name}: condition `{cond.source}` is false"
        for cond in self.unless:
            if truthy(cond.get(event)):
                return False, f"trigger {self.name}: unless `{cond.source}` is true"
        return self._matched


# A request in flight must end before a stopping worker is killed: the server's graceful
# shutdown waits for two requests (an OAuth token, then the send) of this length, and more.
MAX_TIMEOUT = 30.0


@dataclass(frozen=True)
class DeliveryOptions:
    """How the engine delivers to one destination (see the delivery section of the README).

    A delivery that keeps failing is retried until ``max_age`` has passed since it was queued,
    however many attempts that takes (the backoff reaches its cap of an hour between attempts
    within the first hour or so), so it outlives a platform outage of up to ``max_age``.
    ``max_attempts`` gives up sooner, after that many attempts; None, the default, sets no such
    limit. (A default of 12 attempts spanned 17 to 34 minutes of backoff: an outage that long
    turned every delivery queued at its start into a dead letter, days before ``max_age``.)
    """

    max_attempts: int | None = None
    max_age: float = 3 * 86400.0
    batch_wait: float = 1.0
    timeout: float = 10.0  # at most MAX_TIMEOUT
    concurrency: int = 2


@dataclass(frozen=True)
class DestinationInstance:
    """One configured destination: its name in the rules, its adapter and delivery options."""

    name: str
    type: str
    adapter: Destination
    enabled: bool = True
    delivery: DeliveryOptions = field(default_factory=DeliveryOptions)


@dataclass(frozen=True)
class Tag:
    """Trigger(s) + destination + consent + mapping."""

    name: str
    destination: DestinationInstance
    triggers: tuple[Trigger, ...]
    exceptions: tuple[Trigger, ...]
    consent: Requirement
    fields: tuple[Field, ...]
    event_name: Getter | None = None  # None: the event's own name
    dedup_key: Getter | None = None
    enabled: bool = True
    position: Position | None = None
    _build: Builder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The mapping is compiled into one function when the tag is made, not per event.
        object.__setattr__(self, "_build", compile_builder(self.fields, f"tag {self.name}"))

    def event_names(self) -> frozenset[str] | None:
        """Every event name this tag can fire on, or None if any name can fire it."""
        names: set[str] = set()
        for trig in self.triggers:
            if trig.events is None:
                return None
            names |= trig.events
        return frozenset(names)

    def evaluate(
        self,
        event: Mapping[str, Any],
        consent_defaults: Mapping[str, str],
        now: datetime | None = None,
        scope: EventScope | None = None,
    ) -> Decision:
        """Run this tag on a normalized event: trigger, exceptions, consent, mapping, payload.

        ``scope`` carries what every tag needs of the same event (trigger results, the consent
        state, the parsed time, the stripped copy), so a container computes it once.
        """
        if scope is None:
            scope = EventScope(event, consent_defaults)
        destination = self.destination
        dest = destination.name
        if not self.enabled:
            return Decision(self.name, dest, False, "tag is disabled")
        if not destination.enabled:
            return Decision(self.name, dest, False, f"destination {dest} is disabled")
        checked = scope.checked
        for trig in self.triggers:
            # A verdict is a non-empty tuple, so "or" only asks the scope on the first look.
            ok, matched = checked.get(trig.name) or scope.check(trig)
            if ok:
                break
        else:
            why_not = "; ".join([scope.check(trig)[1] for trig in self.triggers])
            return Decision(self.name, dest, False, why_not)
        for exc in self.exceptions:
            if scope.check(exc)[0]:
                return Decision(self.name, dest, False, f"blocked by exception trigger {exc.name}")
        decision = scope.consent.decide(self.consent)
        verdict = decision.verdict
        if verdict is _BLOCKED:
            return Decision(self.name, dest, False, decision.reason, decision.reason)
        anonymous = verdict is _ANONYMOUS
        view = scope.stripped() if anonymous else scope.view
        platform_name = self.event_name(view) if self.event_name else view.get("event_name")
        if not isinstance(platform_name, str) or not platform_name:
            return Decision(
                self.name,
                dest,
                False,
                "invalid payload: the event_name mapping gave no name",
                decision.reason,
                anonymous,
            )
        ctx = PayloadContext(
            self.name, platform_name, str(event["event_id"]), scope.time, view, anonymous, now
        )
        mapped = self._build(view)
        adapter = destination.adapter
        if anonymous and adapter.hashed_fields:
            # A plugin's identifier fields stay empty in a copy without identifiers, whatever a
            # mapping copies into them from properties, as the built-ins' do (they read
            # ctx.restricted; a plugin may not).
            mapped = _without_targets(mapped, adapter.hashed_fields)
        try:
            payload = adapter.build_payload(mapped, ctx)
        except PayloadError as exc:
            # Stored with the event and shown by preview: a plugin's message may quote its
            # settings, as a check_item reason may (redacted the same way there).
            reason = f"invalid payload: {redacted(adapter, str(exc))}"
            return Decision(self.name, dest, False, reason, decision.reason, anonymous)
        except Exception as exc:  # noqa: BLE001 - an adapter's bug must not fail the event
            reason = (
                f"invalid payload: {adapter.name or destination.type} failed: {type(exc).__name__}"
            )
            _log_adapter_failure(self.name, destination, exc)
            return Decision(self.name, dest, False, reason, decision.reason, anonymous)
        if not isinstance(payload, dict):  # (whether JSON can carry it: see without_unstorable)
            problem = f"build_payload gave {type(payload).__name__}, not dict"
            reason = f"invalid payload: {adapter.name or destination.type} failed: {problem}"
            _log_adapter_failure(self.name, destination, problem=problem)
            return Decision(self.name, dest, False, reason, decision.reason, anonymous)
        key = None
        if self.dedup_key is not None and (text := dedup_text(self.dedup_key(event))):
            key = f"{self.name}:{text}"
        return Decision(self.name, dest, True, matched, decision.reason, anonymous, payload, key)


def dedup_text(value: Any) -> str | None:
    """A dedup key's value as the text keys are compared by; None when it names nothing.

    An order ID sent as a number by one copy and as text by the other is one order (``1001``,
    ``"1001"`` and ``1001.0`` are one key). Nothing names nothing: ``null``, ``""``, ``[]``,
    ``{}``, and ``true``/``false``, which every event would share (one forwarded per window,
    the others blocked). A list or an object is a composite key (``[event_name,
    properties.order_id]``): the canonical JSON of its parts' texts, and nothing unless each
    part names something (``["refund", null]`` would be every refund's).
    """
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    parts: Any
    if isinstance(value, dict):
        parts = {name: dedup_text(part) for name, part in value.items()}
        complete = all(text is not None for text in parts.values())
    else:
        parts = [dedup_text(part) for part in value]
        complete = all(text is not None for text in parts)
    if not parts or not complete:
        return None
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def without_unstorable(
    decisions: Sequence[Decision], destinations: Mapping[str, DestinationInstance]
) -> list[Decision]:
    """``decisions``, each fired one whose payload JSON cannot carry (a plugin's set of IDs)
    made unfired, naming the problem; the others as they are.

    Asked only when the store could not encode a payload
    (:class:`~engine.errors.UnstorablePayload`), since it encodes every payload anyway: such a
    payload failed the store's write of the whole request (a 503, retried by the client for
    ever), the event's other tags with it.
    """
    out = []
    for d in decisions:
        kept = d
        if d.fired:
            try:
                jsonio.dumps(d.payload)
            except (TypeError, ValueError, RecursionError) as exc:
                destination = destinations[d.destination]
                problem = f"build_payload gave no JSON ({type(exc).__name__})"
                _log_adapter_failure(d.tag, destination, problem=problem)
                name = destination.adapter.name or destination.type
                reason = f"invalid payload: {name} failed: {problem}"
                kept = Decision(d.tag, d.destination, False, reason, d.consent, d.anonymous)
        out.append(kept)
    return out


def _without_targets(mapped: dict[str, Any], targets: Collection[str]) -> dict[str, Any]:
    """``mapped`` without the dotted ``targets``. The objects on their paths are copied, never
    changed: a mapping's value can be an object of the event itself."""
    out = dict(mapped)
    for target in targets:
        *parents, last = target.split(".")
        node = out
        for name in parents:
            child = node.get(name)
            if not isinstance(child, dict):
                break
            node[name] = node = dict(child)  # the parent's copy holds the copy
        else:
            node.pop(last, None)
    return out


def redacted(adapter: Destination, text: str) -> str:
    """``text`` (a plugin's reason) through the adapter's :meth:`~Destination.redact_text`.

    A ``secrets`` that raises is a bug of the plugin: the reason is withheld, since nothing of it
    can be shown safely without the secrets, and the caller goes on (it failed the request of
    an event whose tag the plugin refused, as a 500, or stopped ``tagrelay check``).
    """
    try:
        return adapter.redact_text(text)
    except Exception as exc:  # noqa: BLE001 - a plugin's bug must not fail the event
        name = type(adapter).__name__
        if _REDACTION_FAILED.due(name):  # it fails for every event its tags refuse
            log.error(
                "destination adapter failed to redact a reason; it is withheld",
                extra={"adapter": name, "error_type": type(exc).__name__},
            )
        return f"(reason withheld: {type(exc).__name__} in the adapter's redaction)"


_REDACTION_FAILED = Throttle()  # once a minute per adapter class


def _log_adapter_failure(
    tag: str,
    destination: DestinationInstance,
    exc: Exception | None = None,
    problem: str | None = None,
) -> None:
    """Log a build_payload bug for the operator: where it was raised, never the message.

    The message and a traceback's text can quote the mapped values (personal data); the type,
    the tag and the place in the adapter's code are enough to find the bug. A payload the store
    cannot keep (``problem``) is named by what it is, never by its content.
    """
    frames = traceback.extract_tb(exc.__traceback__) if exc is not None else []
    where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    if exc is None:
        adapter = type(destination.adapter)
        where = f"{adapter.__module__}.{adapter.__qualname__}.build_payload"
    log.error(
        "destination adapter failed to build a payload; the tag did not fire",
        extra={
            "tag": tag,
            "destination": destination.name,
            "type": destination.type,
            "error": type(exc).__name__ if exc is not None else problem,
            "where": where,
        },
    )


class EventScope:
    """Per-event facts shared by every tag of one evaluation, each computed at most once."""

    __slots__ = (
        "_stripped",
        "_time",
        "checked",
        "consent",
        "defaults",
        "event",
        "granted",
        "mentioned",
        "view",
    )

    def __init__(
        self,
        event: Mapping[str, Any],
        defaults: Mapping[str, str],
        consent: ConsentState | None = None,
    ) -> None:
        """``consent``: the event's consent state, if the caller has it already."""
        self.event = event
        self.defaults = defaults
        if consent is None:
            consent = ConsentState.of(event.get("consent"), defaults)
        self.consent = consent
        self.granted = consent.granted
        self.mentioned = consent.mentioned
        # What a tag's mapping reads: the event, its consent with the container's defaults for
        # the purposes it does not state, as the tags' consent decisions read it.
        filled = consent.filled
        self.view = event if filled is None else {**event, "consent": dict(filled)}
        self.checked: dict[str, tuple[bool, str]] = {}  # trigger name -> verdict
        self._stripped: dict[str, Any] | None = None
        self._time: datetime | None = None

    def check(self, trigger: Trigger) -> tuple[bool, str]:
        """The trigger's verdict on this event (evaluated once per trigger)."""
        found = self.checked.get(trigger.name)
        if found is None:
            found = self.checked[trigger.name] = trigger.check(self.event)
        return found

    def stripped(self) -> dict[str, Any]:
        """The event without identifiers (for anonymous forwarding), as :attr:`view`."""
        if self._stripped is None:
            self._stripped = strip_identifiers(self.view)
        return self._stripped

    @property
    def time(self) -> datetime:
        """The event's timestamp."""
        if self._time is None:
            self._time = event_time(self.event)
        return self._time


# Enum members are looked up through the enum's metaclass; plain globals are ten times faster.
_BLOCKED = Verdict.BLOCKED
_ANONYMOUS = Verdict.ANONYMOUS


@dataclass(frozen=True)
class RuleTest:
    """One test declared in a rule file."""

    name: str
    event: Mapping[str, Any]
    expect: Mapping[str, Mapping[str, Any]]
    position: Position


@dataclass(frozen=True)
class Container:
    """A compiled rule container."""

    destinations: Mapping[str, DestinationInstance]
    tags: tuple[Tag, ...]
    tests: tuple[RuleTest, ...] = ()
    dedup_window: float = 48 * 3600.0
    consent_defaults: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    by_event: Mapping[str, tuple[Tag, ...]] = field(default_factory=dict)
    any_event: tuple[Tag, ...] = ()
    _consent: ConsentStates = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_consent", ConsentStates(self.consent_defaults))

    @classmethod
    def create(cls, **kwargs: Any) -> Container:
        """Build a container and its event-name index of tags."""
        tags: tuple[Tag, ...] = kwargs["tags"]
        index: dict[str, list[Tag]] = {}
        wildcard: list[Tag] = []
        for tag in tags:
            names = tag.event_names()
            if names is None:
                wildcard.append(tag)
            else:
                for name in names:
                    index.setdefault(name, []).append(tag)
        order = {tag.name: i for i, tag in enumerate(tags)}
        by_event = {
            name: tuple(sorted([*found, *wildcard], key=lambda t: order[t.name]))
            for name, found in index.items()
        }
        return cls(**kwargs, by_event=by_event, any_event=tuple(wildcard))

    def candidates(self, event_name: str) -> tuple[Tag, ...]:
        """The tags that can fire on events of this name, in declaration order."""
        return self.by_event.get(event_name, self.any_event)

    def consent(self, event: Mapping[str, Any]) -> ConsentState:
        """The consent state of an event under this container's defaults (shared, memoized)."""
        return self._consent.of(event.get("consent"))

    def evaluate(
        self,
        event: Mapping[str, Any],
        explain: bool = False,
        now: datetime | None = None,
        consent: ConsentState | None = None,
    ) -> list[Decision]:
        """Run every candidate tag on a normalized event.

        Args:
            event: a normalized canonical event.
            explain: also report the tags that could not fire on this event name, with why.
            now: the time of receipt (adapters check event age against it).
            consent: the event's :meth:`consent` state, if the caller has it already.
        """
        defaults = self.consent_defaults
        scope = EventScope(event, defaults, consent or self._consent.of(event.get("consent")))
        tags = self.tags if explain else self.candidates(str(event.get("event_name")))
        return [tag.evaluate(event, defaults, now, scope) for tag in tags]
