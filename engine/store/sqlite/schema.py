"""The store's tables and indexes, and the in-place upgrade of a file an earlier version made."""

from __future__ import annotations

import contextlib
import sqlite3

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
-- Links by age, for retention (a link is rewritten when its visitor is seen with the user again).
CREATE INDEX IF NOT EXISTS user_visitors_linked ON user_visitors (linked_at);

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

# Columns that files made by earlier versions lack, in the order _SCHEMA declares them (but
# vals, which comes after last_seen in a file that lacks it; the code names every column): SQL
# has no "ADD COLUMN IF NOT EXISTS", so _upgrade adds them.
_ADDED_COLUMNS = {
    "visitors": (
        ("vals", "TEXT NOT NULL DEFAULT '{}'"),
        ("ip_seen", "REAL"),
        ("ua_seen", "REAL"),
        ("oldest", "REAL NOT NULL DEFAULT 0"),
    ),
}
# The earliest files kept a visitor's click IDs and cookies a row each, in visitor_values:
# _upgrade moves them into vals as _remember keeps them ({name: [value, first seen]}) and drops
# the table, which nothing reads any more (so neither retention nor forget would erase it).
_OLD_VALUES = "visitor_values"
_MOVE_OLD_VALUES = (
    "UPDATE visitors SET vals = (SELECT json_group_object(name, json_array(value, first_seen)) "
    "FROM visitor_values AS old WHERE old.visitor_id = visitors.visitor_id) "
    "WHERE visitor_id IN (SELECT visitor_id FROM visitor_values)"
)
# Indexes on added columns, made once the columns exist.
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS visitors_oldest ON visitors (oldest);"


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _has_table(db: sqlite3.Connection, table: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (table,)).fetchone() is not None


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a file made by an earlier version up to _SCHEMA, in place (after _SCHEMA ran).

    Adds the columns it lacks and moves the rows of visitor_values into them, in one write
    transaction that looks again under the write lock (another process may have done it
    meanwhile), then their indexes. Writes nothing when the file is current, so an operator's
    command that may only read the file can open it. Rows written before get each added
    column's default.
    """
    if not _has_table(db, _OLD_VALUES) and not any(
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
        if _has_table(db, _OLD_VALUES):
            db.execute(_MOVE_OLD_VALUES)
            db.execute(f"DROP TABLE {_OLD_VALUES}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.executescript(_ADDED_INDEXES)
