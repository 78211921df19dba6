"""The operator's commands on the store: ``deadletters``, ``replay``, ``forget`` and ``purge``."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from engine.cli.common import command_settings, err, existing_store, load_container, out

if TYPE_CHECKING:
    from engine.store.base import Delivery


def _delivery_json(d: Delivery) -> dict[str, object]:
    return {
        "id": d.id,
        "event_id": d.event_id,
        "tag": d.tag,
        "destination": d.destination,
        "status": d.status.value,
        "attempts": d.attempts,
        "created_at": datetime.fromtimestamp(d.created_at, UTC).isoformat(),
        "last_error": d.last_error,
    }


def cmd_deadletters(args: argparse.Namespace) -> int:
    """List, show or replay dead letters."""
    from engine.store.base import Status

    settings = command_settings(args)
    store = existing_store(settings)
    if args.action == "list":
        letters = store.dead_letters(args.destination, args.limit)
        if args.json:
            out(json.dumps([_delivery_json(d) for d in letters], indent=2))
            return 0
        for d in letters:
            when = datetime.fromtimestamp(d.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            error = (d.last_error or "")[:80]
            out(f"{d.id:>8}  {when}  {d.destination:<14} {d.tag:<20} {d.event_id}  {error}")
        out(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")
        return 0
    if args.action == "show":
        if not args.ids:
            err("deadletters show needs a delivery ID")
            return 2
        delivery = store.get_delivery(args.ids[0])
        if delivery is None:
            err(f"no delivery {args.ids[0]}")
            return 1
        if delivery.status is not Status.DEAD:
            err(f"delivery {delivery.id} is not a dead letter (it is {delivery.status.value})")
            return 1
        shown = _delivery_json(delivery)
        shown["payload"] = delivery.payload
        out(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    from engine.replay import replay_dead_letters

    container = load_container(settings.rules)
    if container is None:
        return 1
    ids = list(args.ids)
    if not ids and not args.all:
        err("deadletters replay needs delivery IDs or --all")
        return 2
    if args.all:
        ids += [d.id for d in store.dead_letters(args.destination, limit=1_000_000)]
        if not ids:
            out("no dead letters to replay")
            return 1
    report = replay_dead_letters(store, container, ids)
    for line in report.skipped:
        out(f"skipped {line}")
    out(f"replayed {report.events} dead letters: {report.queued} deliveries queued")
    return 0 if report.events else 1


def _parse_since(text: str) -> datetime:
    """``--since``: a duration back from now, or an ISO 8601 time.

    Raises:
        ValueError: neither, or a duration further back than dates go; the message says so.
    """
    from engine.rules import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"--since {text} goes back further than the year 1") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("--since takes an ISO 8601 time or a duration such as 2h or 7d") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def cmd_replay(args: argparse.Namespace) -> int:
    """Send the events accepted since a time to one destination again (current rules)."""
    from engine.replay import replay_destination

    settings = command_settings(args)
    container = load_container(settings.rules)
    if container is None:
        return 1
    if args.destination not in container.destinations:
        known = ", ".join(container.destinations)
        err(f"unknown destination {args.destination!r} (known: {known})")
        return 2
    try:
        since = _parse_since(args.since)
    except ValueError as exc:
        err(f"tagrelay: {exc}")
        return 2
    report = replay_destination(existing_store(settings), container, args.destination, since)
    for line in report.skipped:
        out(f"skipped {line}")
    out(f"replayed {report.events} events: {report.queued} deliveries queued")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase a person's events, identities and pending deliveries; report what was removed."""
    if not (args.user_id or args.visitor_id or args.email):
        err("forget needs --user-id, --visitor-id or --email")
        return 2
    store = existing_store(command_settings(args))
    removed = store.forget(user_id=args.user_id, visitor_id=args.visitor_id, email=args.email)
    if args.json:
        out(json.dumps(removed))
    else:
        out("removed: " + ", ".join(f"{n} {kind}" for kind, n in removed.items()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Apply retention now (the server also does it hourly)."""
    from engine.maintenance import PurgeIncomplete, run_once

    settings = command_settings(args)
    days = args.days if args.days is not None else settings.retention_days
    try:
        removed = run_once(existing_store(settings), days)
    except PurgeIncomplete as exc:
        out("removed: " + ", ".join(f"{n} {kind}" for kind, n in exc.removed.items()))
        err(f"tagrelay: {exc}")
        return 1
    out("removed: " + ", ".join(f"{n} {kind}" for kind, n in removed.items()))
    return 0
