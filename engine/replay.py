"""Replaying stored events through the current rules: dead letters, or a destination since a time.

A replay is not a new intake: the event keeps its ID and is not deduplicated against itself.
It does go through the current rules, consent and tag dedup keys again, so a fixed mapping fixes
the replayed payload, and a key another event already forwarded is still not forwarded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.rules.model import Container
from engine.store.base import Decision, Status, Store, StoredEvent

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    """What a replay did."""

    events: int = 0  # events (dead letters) that something was queued for
    queued: int = 0
    skipped: list[str] = field(default_factory=list)  # "event_id tag: reason"


def _decisions(
    container: Container, event: StoredEvent, destination: str | None, tag: str | None
) -> list[Decision]:
    out = []
    # An event stored before events had a source is read as the server's: which endpoint
    # took it cannot be told any more.
    stored = {"source": "server", **event.event}
    for decision in container.evaluate(stored, explain=True, now=datetime.now(UTC)):
        if destination is not None and decision.destination != destination:
            continue
        if tag is not None and decision.tag != tag:
            continue
        out.append(decision)
    return out


def _apply(
    store: Store,
    container: Container,
    event: StoredEvent,
    decisions: Sequence[Decision],
    report: ReplayReport,
    supersedes: Sequence[int] = (),
    replace_waiting: bool = False,
    listed: Collection[str] | None = None,
) -> None:
    """Requeue ``decisions`` of ``event``; a tag the store then holds back (its dedup key) is
    listed as skipped if it is among ``listed`` (None: every tag)."""
    now = datetime.now(UTC).timestamp()
    applied = store.requeue(
        event, decisions, container.dedup_window, now, supersedes, replace_waiting
    )
    queued = 0
    for decision in applied:
        if decision.fired:
            queued += 1
        elif listed is None or decision.tag in listed:
            report.skipped.append(f"{event.event_id} {decision.tag}: {decision.reason}")
    # Replayed only if something was queued: a dead letter whose tag no longer fires stays.
    report.events += 1 if queued else 0
    report.queued += queued


def replay_dead_letters(store: Store, container: Container, ids: Sequence[int]) -> ReplayReport:
    """Replay dead letters by delivery ID; each is replaced by the replay's own delivery."""
    report = ReplayReport()
    for delivery_id in ids:
        delivery = store.get_delivery(delivery_id)
        if delivery is None:
            report.skipped.append(f"delivery {delivery_id}: no such delivery")
            continue
        if delivery.status is not Status.DEAD:
            report.skipped.append(f"delivery {delivery_id}: not a dead letter")
            continue
        event = store.event_for_delivery(delivery_id)
        if event is None:
            report.skipped.append(f"delivery {delivery_id}: its event is no longer stored")
            continue
        decisions = _decisions(container, event, None, delivery.tag)
        if not decisions:
            report.skipped.append(f"delivery {delivery_id}: tag {delivery.tag} is not in the rules")
            continue
        _apply(store, container, event, decisions, report, supersedes=[delivery_id])
    log.info("dead letters replayed", extra={"queued": report.queued, "events": report.events})
    return report


def replay_destination(
    store: Store, container: Container, destination: str, since: datetime
) -> ReplayReport:
    """Send every event accepted since ``since`` to ``destination`` again, per current rules.

    A delivery of the event by the same tag that still waits (a retry), or its dead letter, is
    replaced by the replay's, not sent as well; one in flight (leased) stays.
    """
    report = ReplayReport()
    for event in store.events_since(since.timestamp()):
        decisions = _decisions(container, event, destination, None)
        # Listed as skipped: a tag that fired for the event then and does not now (its consent,
        # a mapping, a dedup key). Every event the tag never fired for was listed too, a line
        # per event read, held in memory for the whole replay and printed.
        sent = {str(d.get("tag")) for d in event.decisions if d.get("fired")}
        for decision in decisions:
            if not decision.fired and decision.tag in sent:
                report.skipped.append(f"{event.event_id} {decision.tag}: {decision.reason}")
        fired = [d for d in decisions if d.fired]
        if fired:  # a write only for what it queues; it replaces what still waits to go
            _apply(store, container, event, fired, report, replace_waiting=True, listed=sent)
    log.info("destination replayed", extra={"destination": destination, "queued": report.queued})
    return report
