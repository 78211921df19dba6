"""Erasure: forget a person, purge what retention no longer keeps, expire dedup keys.

Each works in short write transactions, so that intake never waits long for the write lock
however large the store (forget reads the events it looks through on a snapshot, outside it).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from engine.store.base import answer_of
from engine.store.sqlite.connection import _Connections
from engine.store.sqlite.persons import _ids_by_email, _person_filter, _visitors_of
from engine.store.sqlite.sql import _MAX_PARAMS, _chunks, _dumps, _marks, _withheld
from engine.store.sqlite.visitors import _oldest

PURGE_CHUNK = 500  # events or visitors per retention transaction
PURGE_SCAN = 20_000  # dedup keys looked at per expiry transaction
QUOTED = 6  # characters of an erased event's value that, found in an error, count as a quote
_NOT_QUOTES = frozenset({"consent", "source"})


def _texts(value: Any) -> Iterator[str]:
    """The text values in a JSON document, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def _values(body: str, payload: str) -> set[str]:
    """The text values of an event and its delivery's payload (QUOTED characters or more), but
    those of its consent and source: words every event has ("granted", "server")."""
    found: set[str] = set()
    for document in (json.loads(body), json.loads(payload)):
        parts = (
            [v for k, v in document.items() if k not in _NOT_QUOTES]
            if isinstance(document, dict)
            else [document]
        )
        found.update(v for v in _texts(parts) if len(v) >= QUOTED)
    return found


def _quoted(db: sqlite3.Connection, seqs: Sequence[int]) -> dict[str, set[str]]:
    """The errors of the deliveries of the events ``seqs`` that quote them, each with the
    values of these events it quotes (see :func:`_quoting`). Read by an index."""
    quoted: dict[str, set[str]] = {}
    for chunk in _chunks(list(seqs), _MAX_PARAMS):
        for error, body, payload in db.execute(
            "SELECT d.last_error, e.body, d.payload FROM deliveries d "
            "JOIN events e ON e.seq = d.event_seq "
            f"WHERE d.event_seq IN ({_marks(chunk)}) AND d.last_error IS NOT NULL",
            chunk,
        ):
            if error != _withheld(error):
                found = (v for v in _values(body, payload) if v in error)
                quoted.setdefault(error, set()).update(found)
    return {error: values for error, values in quoted.items() if values}


def _quoting(
    db: sqlite3.Connection, seqs: Sequence[int], quoted: dict[str, set[str]] | None = None
) -> list[tuple[str, int, str]]:
    """The errors of other events' deliveries that quote the events ``seqs``, as the UPDATE's
    parameters (withheld text, delivery ID, error as found).

    An error is the answer to a whole request: the deliveries of a batch refused (or failed)
    together each keep the same text, which can quote any of its events (a receiver that
    echoes the body). Where another event's delivery has the very text of an error of these
    events' deliveries (the worker appends why it gave up to some: "(gave up after retries)"),
    and the text quotes a value of these events (an ID, an address, a
    digest, a time) that is not one of that event's own, it is withheld. Identical errors that
    quote nothing of these events ("HTTP 400: invalid event") are left. ``quoted``: those
    errors when already read (:func:`_quoted`), else they are read here.
    """
    if not seqs:
        return []
    if quoted is None:
        quoted = _quoted(db, seqs)
    if not quoted:
        return []
    # The deliveries the worker gave up on keep the same answer with why appended, those it
    # retries the answer alone (engine.delivery): a batch-mate's error starts with the answer.
    answers: dict[str, set[str]] = {}
    for error, values in quoted.items():
        answers.setdefault(answer_of(error), set()).update(values)
    found = []
    for error, delivery_id, body, payload in db.execute(
        "SELECT d.last_error, d.id, e.body, d.payload FROM deliveries d "
        "JOIN events e ON e.seq = d.event_seq "
        "WHERE EXISTS (SELECT 1 FROM json_each(?) "
        "WHERE substr(d.last_error, 1, length(value)) = value) "
        "AND d.event_seq NOT IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(answers)), json.dumps(list(seqs))),
    ):
        values = set().union(*(v for a, v in answers.items() if error.startswith(a)))
        if values - _values(body, payload):
            found.append((_withheld(error), delivery_id, error))
    return found


def _erase_visitors(db: sqlite3.Connection, visitors: Sequence[str]) -> int:
    """Delete these visitor rows (at most _MAX_PARAMS) and their links; the rows deleted."""
    if not visitors:
        return 0
    marks = _marks(visitors)
    db.execute(f"DELETE FROM user_visitors WHERE visitor_id IN ({marks})", visitors)
    return int(db.execute(f"DELETE FROM visitors WHERE visitor_id IN ({marks})", visitors).rowcount)


def _trimmed(row: sqlite3.Row, before: float) -> tuple[tuple[Any, ...], int]:
    """A visitor row without the values it remembers from before ``before`` (retention).

    Click IDs and cookies first seen before it go, and the user agent and IP last seen before
    it, or at a time not known (a row of an earlier version). Returns the UPDATE's parameters
    (vals, user_agent, ua_seen, ip, ip_seen, oldest, visitor_id) and how many values went.
    """
    vals = json.loads(row["vals"])
    kept = {name: entry for name, entry in vals.items() if entry[1] >= before}
    dropped = len(vals) - len(kept)
    out: list[Any] = [_dumps(kept)]
    times: dict[str, float | None] = {}
    for column, seen in (("user_agent", "ua_seen"), ("ip", "ip_seen")):
        value, at = row[column], row[seen]
        if value is not None and (at is None or at < before):
            value, at = None, None
            dropped += 1
        out += [value, at]
        times[column] = at if value is not None else None
    oldest = _oldest(kept, times["ip"], times["user_agent"], row["last_seen"])
    return (*out, oldest, row["visitor_id"]), dropped


def _keys_of(db: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[str, int]]:
    """The dedup keys (key, event seq) pointing at ``seqs``: one scan of the keys for all."""
    if not seqs:
        return []
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT key, event_seq FROM dedup_keys "
            "WHERE event_seq IN (SELECT value FROM json_each(?))",
            (json.dumps(list(seqs)),),
        )
    ]


def _erase_events(
    db: sqlite3.Connection,
    seqs: Sequence[int],
    keys: Sequence[tuple[str, int]],
    removed: dict[str, int],
) -> None:
    """Delete events, their deliveries (pending ones too) and the dedup keys given."""
    for chunk in _chunks(list(seqs), _MAX_PARAMS):
        marks = _marks(chunk)
        removed["deliveries"] += db.execute(
            f"DELETE FROM deliveries WHERE event_seq IN ({marks})", chunk
        ).rowcount
        removed["events"] += db.execute(
            f"DELETE FROM events WHERE seq IN ({marks})", chunk
        ).rowcount
    for key, seq in keys:  # unless the key was taken by a later event since
        removed["dedup_keys"] += db.execute(
            "DELETE FROM dedup_keys WHERE key = ? AND event_seq = ?", (key, seq)
        ).rowcount


class _Erasure(_Connections):
    """SQLiteStore's erasure and retention: forget, purge and purge_expired."""

    def forget(
        self, user_id: str | None = None, visitor_id: str | None = None, email: str | None = None
    ) -> dict[str, int]:
        """See :meth:`Store.forget`.

        Finding the person's events reads every event (their IDs are inside the body), which
        takes seconds on a large store: that scan runs on a snapshot outside the write lock.
        The events found are then erased in short transactions, and the last transaction
        looks again, inside the lock, at the events that arrived during the scan (and at all
        events on any visitor linked to the person meanwhile, which is rare), so nothing of the
        person is left as of that transaction.
        """
        removed = {
            "events": 0,
            "deliveries": 0,
            "visitors": 0,
            "links": 0,
            "dedup_keys": 0,
            "errors": 0,
        }
        # The person's own IDs: those given, and with ``email`` those of their events with it.
        seed_visitors = {visitor_id} if visitor_id else set()
        seed_users = {user_id} if user_id else set()
        if not (seed_visitors or seed_users or email):
            return removed
        visitors: set[str] = set()
        users: set[str] = set()

        def search(
            db: sqlite3.Connection,
        ) -> tuple[int, list[int], list[tuple[str, int]], set[str], list[tuple[str, int, str]]]:
            last = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            if email:
                _ids_by_email(db, email, "seq <= ?", [last], seed_visitors, seed_users)
            users.update(seed_users)
            visitors.update(seed_visitors, _visitors_of(db, users, by_visitor_row=True))
            where, params = _person_filter(users, visitors, email)
            sql = f"SELECT seq FROM events WHERE seq <= ? AND ({where})"
            seqs = [r[0] for r in db.execute(sql, [last, *params])]
            quoted = _quoted(db, seqs) if seqs else {}
            return last, seqs, _keys_of(db, seqs), set(quoted), _quoting(db, seqs, quoted)

        last, seqs, keys, seen, quoting = self._snapshot(search)
        for chunk in _chunks(seqs, PURGE_CHUNK):
            these = set(chunk)
            with self._write() as db:
                # An error recorded during the search (a request answered meanwhile) is read
                # here, by an index; only a new one that quotes the person costs a full read.
                fresh = _quoted(db, chunk)
                if new := {e: v for e, v in fresh.items() if e not in seen}:
                    quoting += _quoting(db, seqs, new)
                    seen.update(new)
                _erase_events(db, chunk, [k for k in keys if k[1] in these], removed)
        with self._write() as db:
            # The same step from the same start, on the links as they are now: whoever it
            # reaches that the search did not was linked meanwhile.
            if email:
                _ids_by_email(db, email, "seq > ?", [last], seed_visitors, seed_users)
            new_users = seed_users - users
            users |= new_users
            new_visitors = (
                seed_visitors | _visitors_of(db, users, by_visitor_row=False)
            ) - visitors
            visitors |= new_visitors
            where, params = _person_filter(users, visitors, email)
            tail = [
                r[0]
                for r in db.execute(
                    f"SELECT seq FROM events WHERE seq > ? AND ({where})", [last, *params]
                )
            ]
            if new_visitors or new_users:  # their older events too (rare: a full read)
                where, params = _person_filter(new_users, new_visitors, None, own_users=users)
                tail += [
                    r[0]
                    for r in db.execute(
                        f"SELECT seq FROM events WHERE seq <= ? AND ({where})", [last, *params]
                    )
                ]
            if tail:
                quoting += _quoting(db, tail)
                _erase_events(db, tail, _keys_of(db, tail), removed)
            # Unless the error changed since (another attempt, another answer).
            removed["errors"] += db.executemany(
                "UPDATE deliveries SET last_error = ? WHERE id = ? AND last_error = ?", quoting
            ).rowcount
            # A visitor of the person's is erased whole, even one another person used too: it
            # is only what enrichment remembers (click IDs, user agent, IP), which cannot be
            # told apart by person; the other person's events, and their own links to their
            # other visitors, stay.
            for v in visitors:
                removed["visitors"] += db.execute(
                    "DELETE FROM visitors WHERE visitor_id = ?", (v,)
                ).rowcount
                removed["links"] += db.execute(
                    "DELETE FROM user_visitors WHERE visitor_id = ?", (v,)
                ).rowcount
            for u in users:
                removed["links"] += db.execute(
                    "DELETE FROM user_visitors WHERE user_id = ?", (u,)
                ).rowcount
        self._reset_wal()
        return removed

    def purge(self, before: float, now: float | None = None) -> dict[str, int]:
        """See :meth:`Store.purge`.

        In transactions of at most PURGE_CHUNK events (or visitors, or links), each found by an
        index, so intake never waits for more than one chunk however large the store: one
        transaction for everything held the write lock while it scanned the outbox.
        """
        now = time.time() if now is None else now
        removed = {"events": 0, "deliveries": 0, "visitors": 0, "visitor_values": 0, "links": 0}
        after: tuple[float, int] = (-math.inf, 0)  # (received_at, seq) of the last event seen
        while True:
            with self._write() as db:
                rows = db.execute(
                    "SELECT seq, received_at FROM events WHERE received_at < ? "
                    "AND (received_at, seq) > (?, ?) ORDER BY received_at, seq LIMIT ?",
                    (before, *after, PURGE_CHUNK),
                ).fetchall()
                seqs = [row[0] for row in rows]
                if seqs:
                    marks = _marks(seqs)
                    removed["deliveries"] += db.execute(
                        f"DELETE FROM deliveries WHERE event_seq IN ({marks}) "
                        "AND status IN ('delivered', 'dead')",
                        seqs,
                    ).rowcount
                    # An event stays while a delivery of it is still to be sent, and while its
                    # ID is still deduplicated: a repeat is answered with the stored original.
                    removed["events"] += db.execute(
                        f"DELETE FROM events WHERE seq IN ({marks}) AND NOT EXISTS "
                        "(SELECT 1 FROM deliveries WHERE event_seq = events.seq) AND NOT EXISTS "
                        # its event ID's key, of either source (store.base.event_id_keys)
                        "(SELECT 1 FROM dedup_keys WHERE key IN ('event:' || events.event_id, "
                        "'browser:' || events.event_id) "
                        "AND event_seq = events.seq AND expires_at > ?)",
                        [*seqs, now],
                    ).rowcount
            if len(rows) < PURGE_CHUNK:
                break
            after = (rows[-1][1], rows[-1][0])
        while True:
            with self._write() as db:
                visitors = [
                    row[0]
                    for row in db.execute(
                        "SELECT visitor_id FROM visitors WHERE last_seen < ? "
                        "ORDER BY last_seen LIMIT ?",
                        (before, PURGE_CHUNK),
                    )
                ]
                removed["visitors"] += _erase_visitors(db, visitors)
            if len(visitors) < PURGE_CHUNK:
                break
        # Links to visitors still seen, last made before the cut-off (a browser someone logged
        # in on long ago), and that user ID in the visitor row while it is still the row's:
        # recall by user ID would hand the former user the browser's current identity, and
        # enrichment copy their ID into the browser's new events.
        while True:
            with self._write() as db:
                links = [
                    (row[0], row[1])
                    for row in db.execute(
                        "SELECT user_id, visitor_id FROM user_visitors WHERE linked_at < ? "
                        "ORDER BY linked_at LIMIT ?",
                        (before, PURGE_CHUNK),
                    )
                ]
                db.executemany(
                    "DELETE FROM user_visitors WHERE user_id = ? AND visitor_id = ?", links
                )
                db.executemany(
                    "UPDATE visitors SET user_id = NULL WHERE visitor_id = ? AND user_id = ?",
                    [(visitor, user) for user, visitor in links],
                )
                removed["links"] += len(links)
            if len(links) < PURGE_CHUNK:
                break
        # Visitors still seen, with values remembered since before the cut-off (a regular's
        # click ID of long ago): those values go. Each row comes out with ``oldest`` at or
        # after the cut-off, or is erased, so every round makes progress.
        while True:
            with self._write() as db:
                found = db.execute(
                    "SELECT visitor_id, user_agent, ip, vals, last_seen, ip_seen, ua_seen "
                    "FROM visitors WHERE oldest < ? ORDER BY oldest LIMIT ?",
                    (before, PURGE_CHUNK),
                ).fetchall()
                gone = [r["visitor_id"] for r in found if r["last_seen"] < before]
                kept = [_trimmed(r, before) for r in found if r["last_seen"] >= before]
                db.executemany(
                    "UPDATE visitors SET vals = ?, user_agent = ?, ua_seen = ?, ip = ?, "
                    "ip_seen = ?, oldest = ? WHERE visitor_id = ?",
                    [row for row, _ in kept],
                )
                removed["visitor_values"] += sum(n for _, n in kept)
                # Last seen before the cut-off since the loop above: rare.
                removed["visitors"] += _erase_visitors(db, gone)
            if len(found) < PURGE_CHUNK:
                break
        if any(removed.values()):
            self._reset_wal()
        return removed

    def purge_expired(self, now: float) -> int:
        """See :meth:`Store.purge_expired`.

        Keys are random, so expired ones lie all over the table: it is walked in key order,
        PURGE_SCAN keys per transaction, and the expired keys of each stretch deleted there.
        One DELETE for the whole table held the write lock for a full scan (half a second at
        two million keys, 48 hours of a moderate site).
        """
        removed = 0
        after = ""
        while True:
            with self._write() as db:
                # Where this stretch ends, found in the index without reading the rows.
                end = db.execute(
                    "SELECT key FROM dedup_keys WHERE key > ? ORDER BY key LIMIT 1 OFFSET ?",
                    (after, PURGE_SCAN - 1),
                ).fetchone()
                if end is None:
                    removed += int(
                        db.execute(
                            "DELETE FROM dedup_keys WHERE key > ? AND expires_at <= ?",
                            (after, now),
                        ).rowcount
                    )
                    break
                removed += db.execute(
                    "DELETE FROM dedup_keys WHERE key > ? AND key <= ? AND expires_at <= ?",
                    (after, end[0], now),
                ).rowcount
            after = end[0]
        if removed:
            # A key's value is stored as written (an order ID; a tag keyed by an e-mail, which
            # the README advises against, keeps the address): the WAL keeps the deleted rows'
            # pages until it is reset, as after an erasure or the retention purge.
            self._reset_wal()
        return removed
