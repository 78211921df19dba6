"""What the store remembers of visitors: each event's identity folded in at intake; recall."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine import jsonio
from engine.identity import Identity, IdentityUpdate, same_click
from engine.store.sqlite.connection import _Connections
from engine.store.sqlite.sql import _dumps, _insert_rows, _select_in

IDENTITY_TOUCH = 3600.0  # a visitor's last_seen (for retention) is refreshed at most hourly


@dataclass
class _Visitor:
    """A visitor row as the group's updates leave it (written once, at the end)."""

    user_id: str | None
    user_agent: str | None
    ip: str | None
    vals: dict[str, list[Any]]
    first_seen: float
    last_seen: float
    ip_seen: float | None = None
    ua_seen: float | None = None
    oldest: float | None = None  # as stored (None: a new row)
    dirty: bool = False
    touched: bool = False  # last_seen moved (new, or not touched for an hour)


_VISITOR_UPDATE = (
    " ON CONFLICT (visitor_id) DO UPDATE SET user_id = excluded.user_id, "
    "user_agent = excluded.user_agent, ip = excluded.ip, vals = excluded.vals, "
    "ip_seen = excluded.ip_seen, ua_seen = excluded.ua_seen"
)


@functools.lru_cache(maxsize=4)
def _visitor_upsert(touched: bool, moved: bool) -> str:
    """The upsert's tail; an indexed column only when it moves (``last_seen``, ``oldest``): a
    column named in SET rewrites its index entries, even unchanged."""
    tail = _VISITOR_UPDATE
    if touched:
        tail += ", last_seen = excluded.last_seen"
    if moved:
        tail += ", oldest = excluded.oldest"
    return tail


def _oldest(
    vals: Mapping[str, Sequence[Any]],
    ip_seen: float | None,
    ua_seen: float | None,
    last_seen: float,
) -> float:
    """A visitor row's ``oldest``: when its oldest remembered value was seen (a click ID or
    cookie by the time first seen, the IP and user agent by the time last seen), else its
    ``last_seen``. Retention finds through it, by index, the rows with something to drop."""
    times = [float(first) for _, first in vals.values()]
    times += [t for t in (ip_seen, ua_seen) if t is not None]
    return min(times) if times else last_seen


def _seen_at(value: str | None, seen: float | None) -> float | None:
    """When a remembered user agent or IP was last seen, for ``oldest``: None without one, 0
    for one of an earlier version, whose time is not known (retention then drops it)."""
    if value is None:
        return None
    return 0.0 if seen is None else seen


def _seen(row: _Visitor, column: str, new: str | None, now: float) -> bool:
    """Fold the user agent or IP an event was sent with into ``row``; whether the row changed.

    Its time last seen moves at most hourly for the same value (see IDENTITY_TOUCH): within
    the hour, a visitor seen again with nothing new costs no write.
    """
    if new is None:
        return False
    seen_column = "ip_seen" if column == "ip" else "ua_seen"
    seen: float | None = getattr(row, seen_column)
    if new == getattr(row, column) and seen is not None and now - seen <= IDENTITY_TOUCH:
        return False
    setattr(row, column, new)
    setattr(row, seen_column, now)
    return True


def _remember(db: sqlite3.Connection, updates: Sequence[tuple[IdentityUpdate, float]]) -> None:
    """Fold what the group's events teach about their visitors into the visitor rows.

    A visitor seen again within the hour with nothing new costs no write; click IDs keep the
    time they were first seen with that value, so a new click starts its window anew; the
    user agent and IP keep the time they were last seen (to the hour), for their window.

    ``last_seen`` (only retention reads it) moves at most hourly, new values or not: moving it
    moves the visitor's entry in the visitors_last_seen index too, two more pages written by a
    commit that only learnt a new cookie. Retention may then take a visitor up to an hour
    early, never late.
    """
    updates = [(u, now) for u, now in updates if u.visitor_id is not None]
    if not updates:
        return
    ids = sorted({str(u.visitor_id) for u, _ in updates})
    visitors: dict[str, _Visitor] = {
        row["visitor_id"]: _Visitor(
            row["user_id"],
            row["user_agent"],
            row["ip"],
            jsonio.loads(row["vals"]),
            row["first_seen"],
            row["last_seen"],
            row["ip_seen"],
            row["ua_seen"],
            row["oldest"],
        )
        for row in _select_in(
            db,
            "SELECT visitor_id, user_id, user_agent, ip, vals, first_seen, last_seen, ip_seen, "
            "ua_seen, oldest FROM visitors WHERE visitor_id IN ({marks})",
            ids,
        )
    }
    links: dict[tuple[str, str], float] = {}
    for update, now in updates:
        visitor_id = str(update.visitor_id)
        row = visitors.get(visitor_id)
        known = row is not None
        if row is None:
            row = visitors[visitor_id] = _Visitor(None, None, None, {}, now, now)
        touch = not known or now - row.last_seen > IDENTITY_TOUCH
        changed = touch
        for name, value in update.values.items():
            if not same_click(name, row.vals.get(name, [None])[0], value):
                row.vals[name] = [value, now]  # a new click starts its attribution window anew
                changed = True
        previous_user = row.user_id
        if update.user_id is not None and update.user_id != row.user_id:
            row.user_id = update.user_id
            changed = True
        elif update.signed_out and row.user_id is not None:
            # "user_id": null (reset(), a logout): the browser's later events, and server
            # events naming only it, are no one's; the user's link to it stays (user_visitors).
            row.user_id = None
            changed = True
        changed = _seen(row, "user_agent", update.user_agent, now) or changed
        changed = _seen(row, "ip", update.ip, now) or changed
        if touch:
            row.last_seen, row.touched = now, True
        row.dirty = row.dirty or changed
        if update.user_id and (not known or previous_user != update.user_id or changed):
            links[(update.user_id, visitor_id)] = now
    groups: dict[tuple[bool, bool], list[tuple[Any, ...]]] = {}
    for vid, v in visitors.items():
        if not v.dirty:
            continue
        oldest = _oldest(
            v.vals, _seen_at(v.ip, v.ip_seen), _seen_at(v.user_agent, v.ua_seen), v.last_seen
        )
        groups.setdefault((v.touched, oldest != v.oldest), []).append(
            (
                vid,
                v.user_id,
                v.user_agent,
                v.ip,
                _dumps(v.vals),
                v.first_seen,
                v.last_seen,
                v.ip_seen,
                v.ua_seen,
                oldest,
            )
        )
    for (touched, moved), rows in sorted(groups.items()):
        _insert_rows(
            db,
            "INSERT INTO visitors (visitor_id, user_id, user_agent, ip, vals, first_seen, "
            "last_seen, ip_seen, ua_seen, oldest)",
            rows,
            _visitor_upsert(touched, moved),
        )
    _insert_rows(
        db,
        "INSERT INTO user_visitors (user_id, visitor_id, linked_at)",
        [(user, vid, at) for (user, vid), at in links.items()],
        " ON CONFLICT (user_id, visitor_id) DO UPDATE SET linked_at = excluded.linked_at",
    )


class _Visitors(_Connections):
    """SQLiteStore's reads of what it remembers of visitors: recall."""

    def recall(
        self,
        visitor_id: str | None,
        user_id: str | None,
        now: float,
        windows: Mapping[str, float],
        default_window: float,
    ) -> Identity | None:
        """See :meth:`Store.recall`."""
        if not visitor_id and user_id:
            # Not a browser someone else has signed in on since: what it remembers now (their
            # clicks, IP and user agent) is theirs, not this user's.
            rows = self._read(
                "SELECT l.visitor_id FROM user_visitors l JOIN visitors v "
                "ON v.visitor_id = l.visitor_id WHERE l.user_id = ? "
                "AND (v.user_id IS NULL OR v.user_id = l.user_id) "
                "ORDER BY l.linked_at DESC LIMIT 1",
                (user_id,),
                lookup=True,
            )
            visitor_id = rows[0]["visitor_id"] if rows else None
        if not visitor_id:
            return None
        rows = self._read("SELECT * FROM visitors WHERE visitor_id = ?", (visitor_id,), lookup=True)
        if not rows:
            return None
        visitor = rows[0]
        values = {
            name: (value, first_seen)
            for name, (value, first_seen) in jsonio.loads(visitor["vals"]).items()
            if 0 <= now - first_seen <= windows.get(name, default_window)
        }

        def recent(column: str, seen: str) -> str | None:
            # Seen within the window, as click IDs are; a time not known (a row of an earlier
            # version) is not taken for a recent one.
            at = visitor[seen]
            return visitor[column] if at is not None and now - at <= default_window else None

        return Identity(
            visitor_id,
            visitor["user_id"],
            values,
            recent("user_agent", "ua_seen"),
            recent("ip", "ip_seen"),
        )
