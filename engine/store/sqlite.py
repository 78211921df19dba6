"""The embedded store: one SQLite file in WAL mode, shared by every worker process on a host.

Concurrency: each process has one connection for its writes (opened lazily, reopened after a
fork), which also serves lookups by key while no write is running; other reads use a connection of
the reading thread (see "connections" below). Writes take SQLite's write lock up front
(``BEGIN IMMEDIATE``) so the check-then-insert of dedup keys is atomic across processes; readers
never block writers in WAL mode.

Durability: ``synchronous=NORMAL`` (the default here) survives any crash of tagrelay itself,
``kill -9`` included, because a committed transaction is in the WAL before ``accept`` returns;
only a power loss or kernel crash can lose the last transactions. ``synchronous=FULL`` closes that
gap at the cost of an fsync per commit (set ``TAGRELAY_SQLITE_SYNC=full``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import math
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from destinations import normalize
from destinations.normalize import is_hashed, sha256_hex
from engine import gate
from engine.errors import StoreError
from engine.identity import Identity, IdentityUpdate
from engine.store.base import (
    Acceptance,
    Accepted,
    Decision,
    Delivery,
    Status,
    Store,
    StoredEvent,
)

_SCHEMA = """
-- AUTOINCREMENT (events.seq, deliveries.id) costs every commit a write of the sqlite_sequence
-- page, and is kept for what it promises: an ID is never given again after its row is erased.
-- Without it SQLite reuses the highest rowid once that row is deleted (forget, purge): a worker
-- would then mark delivered, by ID, a new delivery in place of the one it sent, and a dedup key
-- would point at another event than its own.
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL,
    event_name   TEXT NOT NULL,
    received_at  REAL NOT NULL,
    body         TEXT NOT NULL,
    decisions    TEXT NOT NULL
);
-- No index on events.event_id: it would cost every accept a B-tree write to speed up only
-- get_event, which finds events through dedup_keys instead.
DROP INDEX IF EXISTS events_event_id;
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);

CREATE TABLE IF NOT EXISTS dedup_keys (
    key          TEXT PRIMARY KEY,
    event_seq    INTEGER NOT NULL,
    event_id     TEXT NOT NULL,
    expires_at   REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq        INTEGER NOT NULL,
    event_id         TEXT NOT NULL,
    tag              TEXT NOT NULL,
    destination      TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    next_attempt_at  REAL NOT NULL,
    lease_owner      TEXT,
    lease_expires    REAL,
    last_error       TEXT,
    finished_at      REAL
);
-- The outbox's queue: only deliveries still to send are indexed (the delivered and dead ones,
-- most of the table, cost no entry and no scan). Destination first, so that leasing for one
-- destination never walks the backlog of another (a platform that is down or slow can hold
-- most of the queue), even though one commit's deliveries then touch an index page per
-- destination. Replaces deliveries_due (every row). Queries must repeat the WHERE term
-- verbatim (_OPEN) for SQLite to use it.
DROP INDEX IF EXISTS deliveries_due;
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries (destination, status, next_attempt_at)
    WHERE status IN ('pending', 'leased');
-- A delivery by its event: retention and forget remove an event's deliveries through it instead
-- of scanning the whole outbox inside the write lock (hourly, in every process). One commit's
-- entries share the rightmost page (event_seq only grows): one page written per accept.
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_seq);

CREATE TABLE IF NOT EXISTS visitors (
    visitor_id   TEXT PRIMARY KEY,
    user_id      TEXT,
    user_agent   TEXT,
    ip           TEXT,
    vals         TEXT NOT NULL DEFAULT '{}',  -- click IDs and cookies: {name: [value, first]}
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    -- The columns below are added to a file of an earlier version by _upgrade (same order).
    ip_seen      REAL,  -- when ip was last seen (to the hour); NULL: not known, so never used
    ua_seen      REAL,  -- the same for user_agent
    oldest       REAL NOT NULL DEFAULT 0  -- see _oldest; 0 in rows of an earlier version
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS visitors_last_seen ON visitors (last_seen);

CREATE TABLE IF NOT EXISTS user_visitors (
    user_id      TEXT NOT NULL,
    visitor_id   TEXT NOT NULL,
    linked_at    REAL NOT NULL,
    PRIMARY KEY (user_id, visitor_id)
) WITHOUT ROWID;
-- Links by visitor, for retention and forget (links are written only when a user ID is new).
CREATE INDEX IF NOT EXISTS user_visitors_visitor ON user_visitors (visitor_id);

-- Random secrets shared by every process using the store (Store.secret).
CREATE TABLE IF NOT EXISTS secrets (
    name         TEXT PRIMARY KEY,
    value        BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS rate_counters (
    key          TEXT NOT NULL,
    window       REAL NOT NULL,
    n            INTEGER NOT NULL,
    PRIMARY KEY (key, window)
) WITHOUT ROWID;
"""

# Columns that files made by earlier versions lack, in the order _SCHEMA declares them: SQL has
# no "ADD COLUMN IF NOT EXISTS", so _upgrade adds them.
_ADDED_COLUMNS = {
    "visitors": (("ip_seen", "REAL"), ("ua_seen", "REAL"), ("oldest", "REAL NOT NULL DEFAULT 0")),
}
# Indexes on added columns, made once the columns exist.
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS visitors_oldest ON visitors (oldest);"


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a file made by an earlier version up to _SCHEMA, in place (after _SCHEMA ran).

    Adds the columns it lacks, in one write transaction that looks again under the write lock
    (another process may have added them meanwhile), then their indexes. Writes nothing when
    the file is current, so an operator's command that may only read the file can open it.
    Rows written before get each added column's default.
    """
    if not any(
        name not in _columns(db, table)
        for table, added in _ADDED_COLUMNS.items()
        for name, _ in added
    ):
        db.executescript(_ADDED_INDEXES)
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for table, added in _ADDED_COLUMNS.items():
            have = _columns(db, table)
            for name, declaration in added:
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.executescript(_ADDED_INDEXES)


_DELIVERY_COLUMNS = (
    "id, event_id, tag, destination, payload, status, attempts, created_at, next_attempt_at, "
    "last_error"
)
_OPEN = "status IN ('pending', 'leased')"  # the WHERE of the deliveries_open index
_HELD = "status = 'leased' AND lease_owner = ?"  # still leased to the worker settling it
_DUE = (
    f"{_OPEN} AND ((status = 'pending' AND next_attempt_at <= ?) "
    "OR (status = 'leased' AND lease_expires <= ?))"
)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The C encoder, made once: JSONEncoder.encode builds a new one on every call, a third of the
# cost of encoding an accept's ~5 small documents. No circular-reference markers: the values
# come from parsed JSON and compiled mappings (a cycle still fails, as a RecursionError), and
# the C encoder leaves stale markers behind after an error, which would then be taken for
# cycles in later documents.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_ITERENCODE = (
    _C_ENCODER(
        None, _not_serializable, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    if _C_ENCODER is not None
    else None
)


def _dumps(value: Any) -> str:
    if _ITERENCODE is None:  # an interpreter without the C accelerator
        return _ENCODER.encode(value)
    return "".join(_ITERENCODE(value, 0))


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


BUSY_TIMEOUT = 30.0
PURGE_CHUNK = 500  # events or visitors per retention transaction
PURGE_SCAN = 20_000  # dedup keys looked at per expiry transaction
IDENTITY_TOUCH = 3600.0  # a visitor's last_seen (for retention) is refreshed at most hourly
CHECKPOINT_INTERVAL = 1.0
WAL_CHECKPOINT_PAGES = 4000
"""The WAL size (in pages, 16 MB at 4 KB) past which the committing writer checkpoints itself.

The background checkpoint alone never lets the WAL restart under sustained writes: a PASSIVE
checkpoint cannot catch up with frames appended while it runs, and SQLite only rewinds the WAL
when a writer finds it fully copied. The file would then grow without bound (a single-event
commit adds about 45 KB of frames: gigabytes within minutes at full intake), and every commit
would pay for extending it. The writer's own
checkpoint finishes what the background one left, so the next transaction rewinds the WAL."""

_PID = os.getpid()


def _after_fork() -> None:
    global _PID  # the one process-wide fact a fork changes
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _checkpoint_loop(store_ref: weakref.ReferenceType[SQLiteStore], path: str) -> None:
    """Move WAL pages into the database every second, while the store is alive.

    PASSIVE never blocks writers or readers; a busy moment just leaves the work for the next
    round. One connection of its own, opened in the process that runs it.
    """
    try:
        conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        while True:
            store = store_ref()
            if store is None or store._closed.wait(CHECKPOINT_INTERVAL):
                return
            del store
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        conn.close()


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
            if isinstance(self.error, StoreError):
                raise StoreError(str(self.error)) from self.error
            raise StoreError(f"store write failed: {type(self.error).__name__}") from self.error
        return self.results


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds (worth waiting for)."""
    text = str(exc)
    return "locked" in text or "busy" in text


_T = TypeVar("_T")


def _retry_busy(run: Callable[[], _T]) -> _T:
    """``run()``, tried again with growing sleeps while SQLite answers busy or locked.

    busy_timeout is 0 (see _open): SQLite's own handler sleeps in steps of milliseconds.
    Raises the last error after BUSY_TIMEOUT seconds, or at once for any other error.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.0001
    while True:
        try:
            return run()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.005)


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        event_id=row["event_id"],
        tag=row["tag"],
        destination=row["destination"],
        payload=json.loads(row["payload"]),
        status=Status(row["status"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
    )


def _stored_event(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        seq=row["seq"],
        event_id=row["event_id"],
        event=json.loads(row["body"]),
        received_at=row["received_at"],
        decisions=json.loads(row["decisions"]),
    )


# -- accepting a group of events ---------------------------------------------------------------
#
# One transaction accepts every event of a group commit with a fixed number of statements
# (multi-row INSERTs, IN lookups), not a handful per event: each statement releases the GIL,
# and with the other request threads of the process waiting for it, every release is a thread
# switch made while this process holds the database's write lock.

_MAX_PARAMS = 900  # per statement; under SQLite's historical limit of 999 host parameters


@functools.lru_cache(maxsize=512)
def _values_sql(head: str, rows: int, width: int, tail: str) -> str:
    marks = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([marks] * rows)}{tail}"


@functools.lru_cache(maxsize=512)
def _in_sql(sql: str, count: int) -> str:
    return sql.format(marks=", ".join("?" * count))


def _insert_rows(
    db: sqlite3.Connection,
    head: str,
    rows: Sequence[Sequence[Any]],
    tail: str = "",
    rowids: bool = False,
) -> list[int]:
    """``head VALUES (...), (...) tail`` for all ``rows`` (chunked); with ``rowids``, the rowid
    of every row.

    The rowids are only meaningful for a rowid table whose keys SQLite assigns (AUTOINCREMENT):
    one multi-row INSERT then numbers its rows consecutively, the write lock being ours, so
    the last rowid of a chunk gives all of them.
    """
    if not rows:
        return []
    width = len(rows[0])
    size = max(1, _MAX_PARAMS // width)
    out: list[int] = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        params = chunk[0] if len(chunk) == 1 else list(itertools.chain.from_iterable(chunk))
        cursor = db.execute(_values_sql(head, len(chunk), width, tail), params)
        if rowids:
            last = int(cursor.lastrowid or 0)
            out += range(last - len(chunk) + 1, last + 1)
    return out


def _select_in(db: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> list[sqlite3.Row]:
    """``sql`` with its ``{marks}`` filled in for ``keys`` (chunked)."""
    rows: list[sqlite3.Row] = []
    for start in range(0, len(keys), _MAX_PARAMS):
        chunk = keys[start : start + _MAX_PARAMS]
        rows += db.execute(_in_sql(sql, len(chunk)), chunk).fetchall()
    return rows


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


def _accept_group(db: sqlite3.Connection, accs: Sequence[Acceptance]) -> list[Accepted]:
    """Accept ``accs`` in order inside the caller's write transaction (see Store.accept_many).

    Raises:
        _Unencodable: before anything is written, naming the first acceptance whose event or
            payloads cannot be encoded as JSON.
    """
    event_ids = [str(acc.event["event_id"]) for acc in accs]
    wanted = {"event:" + event_id for event_id in event_ids}
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
        for acc, event_id in zip(accs, event_ids, strict=True)
        if (row := stored.get("event:" + event_id)) is not None
        and row["expires_at"] > acc.received_at
    ]
    originals = (
        {
            row["seq"]: json.loads(row["decisions"])
            for row in _select_in(
                db, "SELECT seq, decisions FROM events WHERE seq IN ({marks})", sorted(set(live))
            )
        }
        if live
        else {}
    )
    results: list[Accepted] = []
    claimed: dict[str, str] = {}  # tag dedup key -> event ID, for keys claimed in this group
    first_of: dict[str, int] = {}  # event ID -> index of its first copy in this group
    fresh: list[tuple[int, Acceptance, list[Decision]]] = []
    for i, (acc, event_id) in enumerate(zip(accs, event_ids, strict=True)):
        now = acc.received_at
        if event_id in first_of:
            results.append(Accepted(event_id, True, results[first_of[event_id]].decisions))
            continue
        hit = stored.get("event:" + event_id)
        if hit is not None and hit["expires_at"] > now and hit["event_seq"] in originals:
            results.append(Accepted(event_id, True, originals[hit["event_seq"]]))
            continue
        first_of[event_id] = i
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
        key_rows.append(("event:" + event_id, seq, event_id, expires))
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
            owner.error = StoreError(
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


def _erase_visitors(db: sqlite3.Connection, visitors: Sequence[str]) -> int:
    """Delete these visitor rows (at most _MAX_PARAMS) and their links; the rows deleted."""
    if not visitors:
        return 0
    marks = _marks(visitors)
    db.execute(f"DELETE FROM user_visitors WHERE visitor_id IN ({marks})", visitors)
    return int(db.execute(f"DELETE FROM visitors WHERE visitor_id IN ({marks})", visitors).rowcount)


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
            json.loads(row["vals"]),
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
            if row.vals.get(name, [None])[0] != value:
                row.vals[name] = [value, now]  # a new click starts its attribution window anew
                changed = True
        previous_user = row.user_id
        if update.user_id is not None and update.user_id != row.user_id:
            row.user_id = update.user_id
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


def _is_dead(db: sqlite3.Connection, delivery_id: int) -> bool:
    row = db.execute("SELECT status FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
    return row is not None and row[0] == "dead"


def _not_queued(decisions: Sequence[Decision], why: str) -> list[Decision]:
    return [d.blocked(f"not queued: {why}") if d.fired else d for d in decisions]


# What forget reads in an event body.
_USER = "json_extract(body, '$.user_id')"
_VISITOR = "json_extract(body, '$.visitor_id')"
# A user ID the pipeline copied from the visitor's identity (listed under ``enriched``) is a guess
# from a browser possibly shared, not the client's word on whose event it is.
_USER_GUESSED = "instr(COALESCE(json_extract(body, '$.enriched'), ''), '\"user_id\"') > 0"


def _visitors_of(db: sqlite3.Connection, users: Iterable[str], by_visitor_row: bool) -> set[str]:
    """The visitors linked to ``users``: the person's own browsers and devices (one step).

    Links are followed from a user to their visitors, and no further: a browser that two people
    logged in on links both, and what the other one did elsewhere is not the person's. Every
    user ID a visitor row has held is also a link (see _remember); the visitors table itself,
    which has no index by user, is read only when ``by_visitor_row``.
    """
    by_user = ["SELECT visitor_id FROM user_visitors WHERE user_id = ?"]
    if by_visitor_row:
        by_user.append("SELECT visitor_id FROM visitors WHERE user_id = ?")
    found: set[str] = set()
    for u in users:
        for sql in by_user:
            found.update(r[0] for r in db.execute(sql, (u,)))
    return found


def _person_filter(
    users: set[str],
    visitors: set[str],
    email: str | None,
    own_users: set[str] | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE condition (and its parameters) matching a person's events.

    An event is the person's when it carries one of ``users``, or when it was seen on one of
    ``visitors`` and carries no user ID, one of ``own_users`` (default: ``users``), or a user
    ID only guessed from the visitor; an event on the person's visitor that the client sent
    with another user's ID is that user's, and stays. With ``email``, also every event whose
    ``user_data.email`` is that address (see _email_keys).
    """
    own = users if own_users is None else own_users
    conditions, params = ["0"], []
    if users:
        conditions.append(f"{_USER} IN ({_marks(users)})")
        params += sorted(users)
    if visitors:
        anyone = [f"{_USER} IS NULL", _USER_GUESSED]
        if own:
            anyone.append(f"{_USER} IN ({_marks(own)})")
        conditions.append(f"({_VISITOR} IN ({_marks(visitors)}) AND ({' OR '.join(anyone)}))")
        params += sorted(visitors)
        params += sorted(own)
    keys = _email_keys(email) if email else []
    if keys:
        conditions.append(
            f"{_EMAIL_KEY}(json_extract(body, '$.user_data.email')) IN ({_marks(keys)})"
        )
        params += keys
    return " OR ".join(conditions), params


_EMAIL_KEY = "tagrelay_email_key"  # the SQL name of _email_key, on every connection (see _open)


def _email_key(value: object) -> str | None:
    """What an event's ``user_data.email`` is compared by, for erasure.

    A SHA-256 digest, lower-cased; any other text normalized as the adapters do before
    hashing (Python's Unicode-aware trim and lower-casing: a tab, a newline, ``Ü``), in
    Google's form, which also reads a gmail.com address without the dots and ``+tag`` of its
    local part: those name the same mailbox. SQLite's own ``trim``/``lower`` know only spaces
    and ASCII, and missed such addresses.
    """
    if not isinstance(value, str):
        return None
    if is_hashed(value):
        return value.strip().lower()
    return normalize.email(value, "google") or value.strip().lower() or None


def _email_keys(email: str) -> list[str]:
    """The keys (see _email_key) of the events that carry ``email``, plain or hashed.

    A hash is matched when it is the SHA-256 of the address as any platform normalizes it
    (Meta and TikTok keep a gmail.com address's dots, Google drops them); ``email`` may itself
    be a digest.
    """
    if not email.strip():
        return []
    if is_hashed(email):
        return [email.strip().lower()]
    forms = (normalize.email(email, "meta"), normalize.email(email, "google"))
    plain = {f for f in forms if f} or {email.strip().lower()}
    keys = {sha256_hex(p) for p in plain}
    key = _email_key(email)
    if key:
        keys.add(key)
    return sorted(keys)


def _ids_by_email(
    db: sqlite3.Connection,
    email: str,
    where: str,
    params: list[Any],
    visitors: set[str],
    users: set[str],
) -> None:
    """Add to ``visitors`` and ``users`` the IDs on the events (matching ``where``) with
    ``email``: erasing a person found by e-mail erases what their IDs are remembered with.

    Only the IDs the client sent: one the pipeline copied from a remembered identity (listed
    under ``enriched``) may be another person's, on a shared browser.
    """
    match, email_params = _person_filter(set(), set(), email)
    for visitor, user, enriched in db.execute(
        f"SELECT {_VISITOR}, {_USER}, json_extract(body, '$.enriched') FROM events "
        f"WHERE {where} AND ({match})",
        [*params, *email_params],
    ):
        guessed = json.loads(enriched) if enriched else []
        if visitor is not None and "visitor_id" not in guessed:
            visitors.add(str(visitor))
        if user is not None and "user_id" not in guessed:
            users.add(str(user))


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


class SQLiteStore(Store):
    """The SQLite backend. Safe to share between threads and (through the file) processes."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        self.path = str(path)
        if synchronous.lower() not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        self.synchronous = synchronous.upper()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._writer_pid = -1
        self._lock_fd: int | None = None  # the host writer lock (see _host_lock), per process
        self._lock_fd_pid = -1
        self._checkpointer_pid = -1
        self._closed = threading.Event()
        self._wlock = threading.Lock()
        self._lock_pid = _PID
        self._group = threading.Condition(threading.Lock())
        self._queue: list[_Slot] = []
        self._leading = False
        try:
            # The script only writes when it creates or replaces something (a new file, or the
            # first open of a file an older version made); every statement is idempotent.
            with self._process_lock(), self._host_lock():
                db = self._writer_conn()
                _retry_busy(lambda: db.executescript(_SCHEMA))
                _retry_busy(lambda: _upgrade(db))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the SQLite schema: {exc}") from exc

    # -- connections ----------------------------------------------------------------------------
    #
    # One connection per process makes every write, and the lookups by key made while it is idle
    # (recall, for every event); other reads, and lookups while a write runs, use a connection
    # of the reading thread. In WAL mode a connection drops its whole page cache whenever
    # another connection has committed since its last transaction: with a connection per
    # thread, nearly every transaction started cold and read again each B-tree page it touched
    # (~25 reads of 4 KB for a single-event accept, with request threads taking turns). The
    # shared writer only starts cold after another process has committed.

    def _writer_conn(self) -> sqlite3.Connection:
        """The process's shared connection; the caller holds the process lock."""
        conn = self._writer
        if conn is not None and self._writer_pid == _PID:
            if not conn.in_transaction:
                return conn
            # A transaction whose ROLLBACK failed (an I/O error) must not become the next
            # caller's: the connection is replaced.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        conn = self._writer = self._open()
        self._writer_pid = _PID
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's own connection, for reads while the writer is busy."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == _PID:
            return conn
        conn = self._open()
        self._local.conn = conn
        self._local.pid = _PID
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # Waiting for the write lock is ours to do (_host_lock, then _retry_busy): SQLite's
            # own busy handler sleeps in steps of milliseconds, wasting most of them under load.
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.create_function(_EMAIL_KEY, 1, _email_key, deterministic=True)
            # Checkpoints (which fsync the database) run mostly in a background thread; the
            # writer only finishes the remainder when the WAL has grown past the threshold
            # (see WAL_CHECKPOINT_PAGES).
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store: {exc}") from exc
        self._start_checkpointer()
        return conn

    def _start_checkpointer(self) -> None:
        if self.path == ":memory:" or self._checkpointer_pid == _PID:
            return
        self._checkpointer_pid = _PID
        thread = threading.Thread(
            target=_checkpoint_loop,
            args=(weakref.ref(self), self.path),
            name="sqlite-checkpoint",
            daemon=True,
        )
        thread.start()

    def _process_lock(self) -> threading.Lock:
        # One writer per process at a time: threads queue on a Python lock (cheap, fair enough)
        # instead of all spinning on SQLite's. A lock must not cross a fork, hence per pid.
        pid = _PID
        if self._lock_pid != pid:
            self._wlock = threading.Lock()
            self._lock_pid = pid
        return self._wlock

    @contextmanager
    def _host_lock(self) -> Iterator[None]:
        """Hold the host's writer lock: one writing process at a time, queued by the kernel.

        SQLite's write lock cannot be waited for, only retried (see _retry_busy), and a process
        that sleeps between tries leaves the lock idle after it is freed; under steady load
        from several workers those gaps, not the writes, set the pace. Every tagrelay process
        writing this file first takes an exclusive ``flock`` on ``<file>-writer`` instead, which
        the kernel hands to the next waiter the moment it is released (and releases itself if
        the process dies). ``BEGIN IMMEDIATE`` then rarely has to retry: only when a process
        that is not tagrelay writes.
        """
        if self.path == ":memory:":
            yield
            return
        fd = self._lock_fd
        if fd is None or self._lock_fd_pid != _PID:
            # Per process: an open file description inherited across fork would share its lock.
            # Read-only is enough for flock, so an operator's command run as another user who
            # can read the database can take it too.
            try:
                fd = os.open(f"{self.path}-writer", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(f"cannot open the store's writer lock: {exc}") from exc
            self._lock_fd, self._lock_fd_pid = fd, _PID
        fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._process_lock(), self._host_lock():
            db = self._writer_conn()
            try:
                _retry_busy(lambda: db.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as exc:
                raise StoreError(f"the store is busy or unwritable: {exc}") from exc
            try:
                with gate.CPU:
                    yield db
                    db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store write failed: {exc}") from exc
                raise

    def _read(
        self, sql: str, params: Sequence[Any] = (), lookup: bool = False
    ) -> list[sqlite3.Row]:
        """Rows of a query; a ``lookup`` (a few rows found by key) uses the writer when it is idle.

        A read never waits for the writer: it takes the writer only if no write is running,
        and then holds it for its whole length, which is why scans use their own connection.
        In ":memory:" every read takes the writer, waiting if need be: another connection
        would be another, empty database.
        """
        memory = self.path == ":memory:"
        lock = self._process_lock()
        if (lookup or memory) and lock.acquire(blocking=memory):
            try:
                return list(self._writer_conn().execute(sql, params).fetchall())
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise StoreError(f"store read failed: {exc}") from exc
                # retried below, on this thread's connection, with the process lock released
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed: {exc}") from exc
            finally:
                lock.release()
        try:
            conn = self._conn()
            return list(_retry_busy(lambda: conn.execute(sql, params)).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def _snapshot(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        """``run(connection)`` in one read transaction, outside the write lock.

        For long reads that must see one state of the file. In ":memory:" it runs in a write
        transaction instead: another connection would be another, empty database.
        """
        if self.path == ":memory:":
            with self._write() as db:
                return run(db)
        conn = self._conn()
        try:
            _retry_busy(lambda: conn.execute("BEGIN"))
            try:
                return run(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def close(self) -> None:
        """Close this thread's connection and the process's writer (and stop checkpointing)."""
        self._closed.set()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._process_lock():
            if self._writer is not None and self._writer_pid == _PID:
                self._writer.close()
            self._writer = None
            if self._lock_fd is not None and self._lock_fd_pid == _PID:
                os.close(self._lock_fd)
            self._lock_fd = None

    # -- intake ---------------------------------------------------------------------------------

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
        rows = self._read(
            "SELECT e.* FROM dedup_keys k JOIN events e ON e.seq = k.event_seq WHERE k.key = ?",
            ("event:" + event_id,),
            lookup=True,
        ) or self._read(
            "SELECT * FROM events WHERE event_id = ? ORDER BY seq DESC LIMIT 1", (event_id,)
        )
        return _stored_event(rows[0]) if rows else None

    # -- outbox ---------------------------------------------------------------------------------

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

    def _settle(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        with self._write() as db:
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
    ) -> int:
        """See :meth:`Store.mark_retry`."""
        return self._settle(
            "UPDATE deliveries SET status = 'pending', attempts = attempts + ?, "
            "next_attempt_at = ?, last_error = ?, lease_owner = NULL, lease_expires = NULL",
            [(int(count_attempt), next_attempt_at, error, i, owner) for i in ids],
        )

    def mark_dead(
        self, ids: Sequence[int], owner: str, error: str, now: float, count_attempt: bool = True
    ) -> int:
        """See :meth:`Store.mark_dead`."""
        return self._settle(
            "UPDATE deliveries SET status = 'dead', attempts = attempts + ?, last_error = ?, "
            "finished_at = ?, lease_owner = NULL, lease_expires = NULL",
            [(int(count_attempt), error, now, i, owner) for i in ids],
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

    def events_since(self, since: float, destination: str | None = None) -> list[StoredEvent]:
        """See :meth:`Store.events_since`."""
        rows = self._read("SELECT * FROM events WHERE received_at >= ? ORDER BY seq", (since,))
        events = [_stored_event(r) for r in rows]
        if destination is None:
            return events
        return [e for e in events if any(d.get("destination") == destination for d in e.decisions)]

    def requeue(
        self,
        event: StoredEvent,
        decisions: Sequence[Decision],
        window: float,
        now: float,
        supersedes: Sequence[int] = (),
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
                        "SELECT event_id FROM dedup_keys WHERE key = ? AND expires_at > ?",
                        (key, now),
                    ).fetchone()
                    if row is not None and row["event_id"] != event.event_id:
                        decision = decision.blocked(  # noqa: PLW2901 - the applied version
                            f"duplicate: dedup key already forwarded by event {row['event_id']}"
                        )
                    else:
                        db.execute(
                            "INSERT OR REPLACE INTO dedup_keys (key, event_seq, event_id, "
                            "expires_at) VALUES (?, ?, ?, ?)",
                            (key, event.seq, event.event_id, now + window),
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

    # -- identity and privacy -------------------------------------------------------------------

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
            rows = self._read(
                "SELECT visitor_id FROM user_visitors WHERE user_id = ? "
                "ORDER BY linked_at DESC LIMIT 1",
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
            for name, (value, first_seen) in json.loads(visitor["vals"]).items()
            if now - first_seen <= windows.get(name, default_window)
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
        removed = {"events": 0, "deliveries": 0, "visitors": 0, "links": 0, "dedup_keys": 0}
        # The person's own IDs: those given, and with ``email`` those of their events with it.
        seed_visitors = {visitor_id} if visitor_id else set()
        seed_users = {user_id} if user_id else set()
        if not (seed_visitors or seed_users or email):
            return removed
        visitors: set[str] = set()
        users: set[str] = set()

        def search(db: sqlite3.Connection) -> tuple[int, list[int], list[tuple[str, int]]]:
            last = int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
            if email:
                _ids_by_email(db, email, "seq <= ?", [last], seed_visitors, seed_users)
            users.update(seed_users)
            visitors.update(seed_visitors, _visitors_of(db, users, by_visitor_row=True))
            where, params = _person_filter(users, visitors, email)
            sql = f"SELECT seq FROM events WHERE seq <= ? AND ({where})"
            seqs = [r[0] for r in db.execute(sql, [last, *params])]
            return last, seqs, _keys_of(db, seqs)

        last, seqs, keys = self._snapshot(search)
        for chunk in _chunks(seqs, PURGE_CHUNK):
            these = set(chunk)
            with self._write() as db:
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
                _erase_events(db, tail, _keys_of(db, tail), removed)
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
        return removed

    def purge(self, before: float, now: float | None = None) -> dict[str, int]:
        """See :meth:`Store.purge`.

        In transactions of at most PURGE_CHUNK events (or visitors), each found by an index,
        so intake never waits for more than one chunk however large the store: one
        transaction for everything held the write lock while it scanned the outbox.
        """
        now = time.time() if now is None else now
        removed = {"events": 0, "deliveries": 0, "visitors": 0, "visitor_values": 0}
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
                        "(SELECT 1 FROM dedup_keys WHERE key = 'event:' || events.event_id "
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
        return removed

    def rate_hit(self, key: str, window_start: float, count: int = 1) -> int:
        """See :meth:`Store.rate_hit`."""
        with self._write() as db:
            rows = db.execute(
                "INSERT INTO rate_counters (key, window, n) VALUES (?, ?, ?) "
                "ON CONFLICT (key, window) DO UPDATE SET n = n + excluded.n RETURNING n",
                (key, window_start, count),
            ).fetchall()
        return int(rows[0][0])

    def purge_rate_counters(self, before: float) -> int:
        """See :meth:`Store.purge_rate_counters`.

        One statement that reads the whole table: it holds about an hour of counters (the
        housekeeping runs hourly), a row per server key and per client IP of a publishable
        key, per minute.
        """
        with self._write() as db:
            return int(db.execute("DELETE FROM rate_counters WHERE window < ?", (before,)).rowcount)

    def secret(self, name: str) -> bytes:
        """See :meth:`Store.secret`."""
        rows = self._read("SELECT value FROM secrets WHERE name = ?", (name,), lookup=True)
        if rows:
            return bytes(rows[0][0])
        with self._write() as db:  # the first of several processes to get here makes it
            db.execute(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, os.urandom(32)),
            )
            row = db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    # -- lifecycle ------------------------------------------------------------------------------

    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._read("SELECT 1")

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
                    return removed + int(
                        db.execute(
                            "DELETE FROM dedup_keys WHERE key > ? AND expires_at <= ?",
                            (after, now),
                        ).rowcount
                    )
                removed += db.execute(
                    "DELETE FROM dedup_keys WHERE key > ? AND key <= ? AND expires_at <= ?",
                    (after, end[0], now),
                ).rowcount
            after = end[0]
