"""Intake: accept_many's group commit, dedup by event ID and by tag dedup key.

One transaction accepts every event of a group commit with a fixed number of statements (see
sql.py); what the events teach about their visitors is folded in by visitors._remember.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine import jsonio
from engine.errors import StoreError, UnstorablePayload
from engine.store.base import (
    Acceptance,
    Accepted,
    Decision,
    StoredEvent,
    event_id_key,
    event_id_keys,
)
from engine.store.sqlite.connection import _Connections
from engine.store.sqlite.sql import _dumps, _insert_rows, _select_in, _stored_event
from engine.store.sqlite.visitors import _remember


@functools.lru_cache(maxsize=1024)
def _summary_json(
    tag: str, destination: str, fired: bool, reason: str, consent: str | None, anonymous: bool
) -> str:
    # The key is every field Decision.summary reads (a test compares the two).
    return _dumps(Decision(tag, destination, fired, reason, consent, anonymous).summary())


def _summaries_json(decisions: Sequence[Decision]) -> str:
    """``_dumps([d.summary() for d in decisions])``, from a cache of each decision's JSON.

    The decisions of a container's tags take few distinct forms (a tag, its reason, its
    consent), so encoding them anew for every event, a fifth of an accept's JSON, is waste.
    """
    parts = [
        _summary_json(d.tag, d.destination, d.fired, d.reason, d.consent, d.anonymous)
        for d in decisions
    ]
    return "[" + ",".join(parts) + "]"


# An acceptance's event body and its fired decisions' payloads as JSON (None for the others).
_Encoded = tuple[str, list[str | None]]


class _Unencodable(Exception):
    """Acceptance ``index`` of a group cannot be encoded; raised before anything is written."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(index)
        self.index, self.cause = index, cause


def _encode(acc: Acceptance) -> _Encoded:
    return _dumps(acc.event), [_dumps(d.payload) if d.fired else None for d in acc.decisions]


@dataclass
class _Slot:
    """One accept_many call waiting in a group commit."""

    acceptances: Sequence[Acceptance]
    done: bool = False
    results: list[Accepted] = field(default_factory=list)
    error: BaseException | None = None

    def outcome(self) -> list[Accepted]:
        if self.error is not None:
            if isinstance(self.error, StoreError):  # raised anew in this caller's thread
                raise type(self.error)(str(self.error)) from self.error
            raise StoreError(f"store write failed: {type(self.error).__name__}") from self.error
        return self.results


def _accept_group(db: sqlite3.Connection, accs: Sequence[Acceptance]) -> list[Accepted]:
    """Accept ``accs`` in order inside the caller's write transaction (see Store.accept_many).

    Raises:
        _Unencodable: before anything is written, naming the first acceptance whose event or
            payloads cannot be encoded as JSON.
    """
    event_ids = [str(acc.event["event_id"]) for acc in accs]
    id_keys = [
        event_id_key(event_id, acc.event.get("source", "server"))
        for acc, event_id in zip(accs, event_ids, strict=True)
    ]
    wanted = set(id_keys)
    wanted.update(
        "tag:" + d.dedup_key for acc in accs for d in acc.decisions if d.fired and d.dedup_key
    )
    stored = {
        row["key"]: row
        for row in _select_in(
            db,
            "SELECT key, event_seq, event_id, expires_at FROM dedup_keys WHERE key IN ({marks})",
            sorted(wanted),
        )
    }
    # Stored originals of repeated event IDs (a live key whose event is gone counts as absent).
    live = [
        row["event_seq"]
        for acc, id_key in zip(accs, id_keys, strict=True)
        if (row := stored.get(id_key)) is not None and row["expires_at"] > acc.received_at
    ]
    originals = (
        {
            row["seq"]: jsonio.loads(row["decisions"])
            for row in _select_in(
                db, "SELECT seq, decisions FROM events WHERE seq IN ({marks})", sorted(set(live))
            )
        }
        if live
        else {}
    )
    results: list[Accepted] = []
    claimed: dict[str, str] = {}  # tag dedup key -> event ID, for keys claimed in this group
    first_of: dict[str, int] = {}  # event ID's key -> index of its first copy in this group
    fresh: list[tuple[int, Acceptance, list[Decision]]] = []
    for i, (acc, event_id, id_key) in enumerate(zip(accs, event_ids, id_keys, strict=True)):
        now = acc.received_at
        if id_key in first_of:
            results.append(Accepted(event_id, True, results[first_of[id_key]].decisions))
            continue
        hit = stored.get(id_key)
        if hit is not None and hit["expires_at"] > now and hit["event_seq"] in originals:
            results.append(Accepted(event_id, True, originals[hit["event_seq"]]))
            continue
        first_of[id_key] = i
        decisions = [_claim(d, event_id, now, claimed, stored) for d in acc.decisions]
        summaries = [d.summary() for d in decisions]
        fresh.append((i, acc, decisions))
        results.append(Accepted(event_id, False, summaries))

    # Only what is new is encoded (a re-sent batch of duplicates costs no encoding), and all of
    # it before the first write, so that the caller can leave out one that cannot be encoded.
    encoded: dict[int, _Encoded] = {}
    for i, acc, _ in fresh:
        try:
            encoded[i] = _encode(acc)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _Unencodable(i, exc) from exc

    # The events, then the rows that point at them by seq.
    seqs = _insert_rows(
        db,
        "INSERT INTO events (event_id, event_name, received_at, body, decisions)",
        [
            (
                event_ids[i],
                str(acc.event.get("event_name")),
                acc.received_at,
                encoded[i][0],
                _summaries_json(decisions),
            )
            for i, acc, decisions in fresh
        ],
        rowids=True,
    )
    key_rows: list[tuple[str, int, str, float]] = []
    delivery_rows: list[tuple[int, str, str, str, str | None, str, float, float]] = []
    for seq, (i, acc, decisions) in zip(seqs, fresh, strict=True):
        event_id, now = event_ids[i], acc.received_at
        expires = now + acc.window
        key_rows.append((id_keys[i], seq, event_id, expires))
        payloads = encoded[i][1]
        for d, payload in zip(decisions, payloads, strict=True):
            if d.fired:
                if d.dedup_key:
                    key_rows.append(("tag:" + d.dedup_key, seq, event_id, expires))
                delivery_rows.append(
                    (seq, event_id, d.tag, d.destination, payload, "pending", now, now)
                )
    _insert_rows(
        db, "INSERT OR REPLACE INTO dedup_keys (key, event_seq, event_id, expires_at)", key_rows
    )
    _insert_rows(
        db,
        "INSERT INTO deliveries (event_seq, event_id, tag, destination, payload, status, "
        "created_at, next_attempt_at)",
        delivery_rows,
    )
    _remember(db, [(acc.identity, acc.received_at) for _, acc, _ in fresh if acc.identity])

    return results


def _accept_members(
    db: sqlite3.Connection, batch: Sequence[_Slot]
) -> tuple[list[_Slot], list[Accepted]]:
    """Accept the group's members whose events can all be encoded; fail the others.

    An event or payload that cannot be encoded (a plugin's payload, say) fails its own call,
    never the group: _accept_group finds it before writing anything, so its member is left
    out, with its error, and the others are accepted in the same transaction.
    """
    members = list(batch)
    while members:
        try:
            return members, _accept_group(db, [a for m in members for a in m.acceptances])
        except _Unencodable as exc:
            owner = _owner_of(members, exc.index)
            owner.error = UnstorablePayload(
                f"store write failed: an event or payload is not JSON ({type(exc.cause).__name__})"
            )
            members.remove(owner)
    return [], []


def _owner_of(members: Sequence[_Slot], index: int) -> _Slot:
    for member in members:
        if index < len(member.acceptances):
            return member
        index -= len(member.acceptances)
    raise IndexError(index)


def _claim(
    decision: Decision,
    event_id: str,
    now: float,
    claimed: dict[str, str],
    stored: Mapping[str, sqlite3.Row],
) -> Decision:
    """The decision, blocked if its dedup key is held (by the group or the store), else claimed."""
    if not (decision.fired and decision.dedup_key):
        return decision
    key = "tag:" + decision.dedup_key
    owner = claimed.get(key)
    if owner is None and (row := stored.get(key)) is not None and row["expires_at"] > now:
        owner = row["event_id"]
    if owner is not None:
        return decision.blocked(f"duplicate: dedup key already forwarded by event {owner}")
    claimed[key] = event_id
    return decision


class _Intake(_Connections):
    """SQLiteStore's intake: accept_many (group commit) and get_event."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        super().__init__(path, synchronous)
        self._group = threading.Condition(threading.Lock())
        self._queue: list[_Slot] = []
        self._leading = False

    def accept_many(self, acceptances: Sequence[Acceptance]) -> list[Accepted]:
        """See :meth:`Store.accept_many`.

        Group commit: calls that arrive while another thread of this process is committing
        wait and are then committed together, by one of them, in one transaction. Every caller
        still returns only after its own events are committed.
        """
        slot = _Slot(acceptances)
        with self._group:
            self._queue.append(slot)
            while not slot.done and self._leading:
                self._group.wait()
            if slot.done:
                return slot.outcome()
            self._leading = True
        error: BaseException | None = None
        batch: list[_Slot] = []
        try:
            with self._write() as db:
                # Taken only now: whoever arrived while the leader waited for the write lock
                # joins this commit instead of waiting for the next one.
                with self._group:
                    batch, self._queue = self._queue, []
                members, accepted = _accept_members(db, batch)
                results = iter(accepted)
                for member in members:
                    member.results = [next(results) for _ in member.acceptances]
        except BaseException as exc:  # noqa: BLE001 - handed to every member of the batch below
            error = exc
        with self._group:
            if not batch:  # the write failed before the batch was taken: it fails with it
                batch, self._queue = self._queue, []
            for member in batch:
                member.done, member.error = True, member.error or error
            self._leading = False
            self._group.notify_all()
        return slot.outcome()

    def get_event(self, event_id: str) -> StoredEvent | None:
        """See :meth:`Store.get_event`."""
        rows: list[sqlite3.Row] = []
        for key in event_id_keys(event_id):  # the server's event first, then a page's
            rows = self._read(
                "SELECT e.* FROM dedup_keys k JOIN events e ON e.seq = k.event_seq WHERE k.key = ?",
                (key,),
                lookup=True,
            )
            if rows:
                break
        rows = rows or self._read(
            "SELECT * FROM events WHERE event_id = ? ORDER BY seq DESC LIMIT 1", (event_id,)
        )
        return _stored_event(rows[0]) if rows else None
