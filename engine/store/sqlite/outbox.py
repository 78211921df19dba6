"""The outbox: deliveries leased, renewed and settled by their holder; dead letters and replay."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from engine import jsonio
from engine.store.base import Decision, Delivery, Status, StoredEvent
from engine.store.sqlite.connection import _Connections
from engine.store.sqlite.sql import (
    _MAX_PARAMS,
    _chunks,
    _dumps,
    _marks,
    _stored_event,
    _withheld,
)

_DELIVERY_COLUMNS = (
    "id, event_id, tag, destination, payload, status, attempts, created_at, next_attempt_at, "
    "last_error"
)
REPLAY_PAGE = 500  # events read at a time by events_since
_OPEN = "status IN ('pending', 'leased')"  # the WHERE of the deliveries_open index
_HELD = "status = 'leased' AND lease_owner = ?"  # still leased to the worker settling it
_DUE = (
    f"{_OPEN} AND ((status = 'pending' AND next_attempt_at <= ?) "
    "OR (status = 'leased' AND lease_expires <= ?))"
)


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        event_id=row["event_id"],
        tag=row["tag"],
        destination=row["destination"],
        payload=jsonio.loads(row["payload"]),
        status=Status(row["status"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
    )


def _is_dead(db: sqlite3.Connection, delivery_id: int) -> bool:
    row = db.execute("SELECT status FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
    return row is not None and row[0] == "dead"


def _count(db: sqlite3.Connection, ids: Sequence[int]) -> int:
    """How many of the deliveries ``ids`` exist."""
    found = 0
    for chunk in _chunks(list(ids), _MAX_PARAMS):
        sql = f"SELECT COUNT(*) FROM deliveries WHERE id IN ({_marks(chunk)})"
        found += int(db.execute(sql, chunk).fetchone()[0])
    return found


def _not_queued(decisions: Sequence[Decision], why: str) -> list[Decision]:
    return [d.blocked(f"not queued: {why}") if d.fired else d for d in decisions]


class _Outbox(_Connections):
    """SQLiteStore's outbox: lease, renew, settle, inspect and requeue deliveries."""

    def lease(
        self, destination: str, limit: int, lease_seconds: float, owner: str, now: float
    ) -> list[Delivery]:
        """See :meth:`Store.lease`."""
        with self._write() as db:
            rows = db.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries "
                f"WHERE destination = ? AND {_DUE} ORDER BY id LIMIT ?",
                (destination, now, now, limit),
            ).fetchall()
            if rows:
                db.executemany(
                    "UPDATE deliveries SET status = 'leased', lease_owner = ?, lease_expires = ? "
                    "WHERE id = ?",
                    [(owner, now + lease_seconds, r["id"]) for r in rows],
                )
        return [_delivery(r) for r in rows]

    def renew(self, ids: Sequence[int], owner: str, lease_seconds: float, now: float) -> list[int]:
        """See :meth:`Store.renew`."""
        held: list[int] = []
        with self._write() as db:
            for chunk in _chunks(list(ids), _MAX_PARAMS - 2):
                held += (
                    row[0]
                    for row in db.execute(
                        f"UPDATE deliveries SET lease_expires = ? WHERE id IN ({_marks(chunk)}) "
                        f"AND {_HELD} RETURNING id",
                        [now + lease_seconds, *chunk, owner],
                    )
                )
        return sorted(held)

    def _settle(self, sql: str, rows: Sequence[Sequence[Any]], answered: Sequence[int] = ()) -> int:
        """``sql`` for each of ``rows``, whose first parameter is the error when ``answered``
        is given: withheld if one of those deliveries is gone (see Store.mark_retry)."""
        with self._write() as db:
            wanted = sorted(set(answered))
            if wanted and _count(db, wanted) < len(wanted):
                rows = [(_withheld(row[0]), *row[1:]) for row in rows]
            return int(db.executemany(f"{sql} WHERE id = ? AND {_HELD}", rows).rowcount)

    def mark_delivered(self, ids: Sequence[int], owner: str, now: float) -> int:
        """See :meth:`Store.mark_delivered`."""
        return self._settle(
            "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, "
            "finished_at = ?, lease_owner = NULL, lease_expires = NULL, payload = '{}'",
            [(now, i, owner) for i in ids],
        )

    def mark_retry(
        self,
        ids: Sequence[int],
        owner: str,
        next_attempt_at: float,
        error: str,
        count_attempt: bool = True,
        answered: Sequence[int] = (),
    ) -> int:
        """See :meth:`Store.mark_retry`."""
        return self._settle(
            "UPDATE deliveries SET last_error = ?, status = 'pending', attempts = attempts + ?, "
            "next_attempt_at = ?, lease_owner = NULL, lease_expires = NULL",
            [(error, int(count_attempt), next_attempt_at, i, owner) for i in ids],
            answered,
        )

    def mark_dead(
        self,
        ids: Sequence[int],
        owner: str,
        error: str,
        now: float,
        count_attempt: bool = True,
        answered: Sequence[int] = (),
    ) -> int:
        """See :meth:`Store.mark_dead`."""
        return self._settle(
            "UPDATE deliveries SET last_error = ?, status = 'dead', attempts = attempts + ?, "
            "finished_at = ?, lease_owner = NULL, lease_expires = NULL",
            [(error, int(count_attempt), now, i, owner) for i in ids],
            answered,
        )

    def release(self, ids: Sequence[int], owner: str) -> int:
        """See :meth:`Store.release`."""
        return self._settle(
            "UPDATE deliveries SET status = 'pending', lease_owner = NULL, lease_expires = NULL",
            [(i, owner) for i in ids],
        )

    def destinations_due(self, now: float) -> dict[str, tuple[int, float]]:
        """See :meth:`Store.destinations_due`."""
        rows = self._read(
            "SELECT destination, COUNT(*) AS n, MIN(next_attempt_at) AS oldest FROM deliveries "
            f"WHERE {_DUE} GROUP BY destination",
            (now, now),
        )
        return {r["destination"]: (r["n"], r["oldest"]) for r in rows}

    def depth(self) -> dict[str, int]:
        """See :meth:`Store.depth`."""
        rows = self._read(
            f"SELECT destination, COUNT(*) AS n FROM deliveries WHERE {_OPEN} GROUP BY destination"
        )
        return {r["destination"]: r["n"] for r in rows}

    def dead_letters(self, destination: str | None = None, limit: int = 100) -> list[Delivery]:
        """See :meth:`Store.dead_letters`."""
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE status = 'dead'"
        params: list[Any] = []
        if destination:
            sql += " AND destination = ?"
            params.append(destination)
        rows = self._read(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        return [_delivery(r) for r in rows]

    def get_delivery(self, delivery_id: int) -> Delivery | None:
        """See :meth:`Store.get_delivery`."""
        rows = self._read(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,), lookup=True
        )
        return _delivery(rows[0]) if rows else None

    def events_since(self, since: float, destination: str | None = None) -> Iterator[StoredEvent]:
        """See :meth:`Store.events_since`.

        Read REPLAY_PAGE events at a time, by sequence number, from the first received at or
        after ``since`` (found by its index) to the last accepted when the reading began: all
        of them at once held a busy store's days of events in memory.
        """
        first, last = self._read(
            "SELECT (SELECT min(seq) FROM events WHERE received_at >= ?), "
            "(SELECT max(seq) FROM events)",
            (since,),
        )[0]
        return iter(()) if first is None else self._events_between(first, last, since, destination)

    def _events_between(
        self, first: int, last: int, since: float, destination: str | None
    ) -> Iterator[StoredEvent]:
        after = first - 1
        while True:
            rows = self._read(
                "SELECT * FROM events WHERE seq > ? AND seq <= ? AND received_at >= ? "
                "ORDER BY seq LIMIT ?",
                (after, last, since, REPLAY_PAGE),
            )
            for row in rows:
                event = _stored_event(row)
                if destination is None or any(
                    d.get("destination") == destination for d in event.decisions
                ):
                    yield event
            if len(rows) < REPLAY_PAGE:
                return
            after = rows[-1]["seq"]

    def requeue(
        self,
        event: StoredEvent,
        decisions: Sequence[Decision],
        window: float,
        now: float,
        supersedes: Sequence[int] = (),
        replace_waiting: bool = False,
    ) -> list[Decision]:
        """See :meth:`Store.requeue`."""
        applied: list[Decision] = []
        with self._write() as db:
            # Checked under the write lock: what the caller read before may have changed.
            if db.execute("SELECT 1 FROM events WHERE seq = ?", (event.seq,)).fetchone() is None:
                return _not_queued(decisions, "the event was erased meanwhile")
            dead = [i for i in set(supersedes) if _is_dead(db, i)]
            if len(dead) < len(set(supersedes)):
                return _not_queued(decisions, "the dead letter was replayed meanwhile")
            for decision in decisions:
                key = "tag:" + decision.dedup_key if decision.dedup_key else None
                if decision.fired and key:
                    row = db.execute(
                        "SELECT event_seq, event_id FROM dedup_keys WHERE key = ? "
                        "AND expires_at > ?",
                        (key, now),
                    ).fetchone()
                    # Another event by its seq: a page's event may share the event's ID.
                    if row is not None and row["event_seq"] != event.seq:
                        decision = decision.blocked(  # noqa: PLW2901 - the applied version
                            f"duplicate: dedup key already forwarded by event {row['event_id']}"
                        )
                    else:
                        db.execute(
                            "INSERT OR REPLACE INTO dedup_keys (key, event_seq, event_id, "
                            "expires_at) VALUES (?, ?, ?, ?)",
                            (key, event.seq, event.event_id, now + window),
                        )
                if decision.fired and replace_waiting:
                    # Leased ones may be in flight: they stay (delivery is at least once). A
                    # dead letter is replaced too, as `deadletters replay` replaces it: left,
                    # it was listed as never sent, and replaying it sent the event again.
                    db.execute(
                        "DELETE FROM deliveries WHERE event_seq = ? AND tag = ? "
                        "AND destination = ? AND status IN ('pending', 'dead')",
                        (event.seq, decision.tag, decision.destination),
                    )
                if decision.fired:
                    db.execute(
                        "INSERT INTO deliveries (event_seq, event_id, tag, destination, payload, "
                        "status, created_at, next_attempt_at) "
                        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                        (
                            event.seq,
                            event.event_id,
                            decision.tag,
                            decision.destination,
                            _dumps(decision.payload),
                            now,
                            now,
                        ),
                    )
                applied.append(decision)
            if any(d.fired for d in applied):  # a dead letter replaced by nothing stays
                db.executemany("DELETE FROM deliveries WHERE id = ?", [(i,) for i in dead])
        return applied

    def event_for_delivery(self, delivery_id: int) -> StoredEvent | None:
        """The event a delivery belongs to."""
        rows = self._read(
            "SELECT e.* FROM events e JOIN deliveries d ON d.event_seq = e.seq WHERE d.id = ?",
            (delivery_id,),
            lookup=True,
        )
        return _stored_event(rows[0]) if rows else None
