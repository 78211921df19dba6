"""The SQLite store: event-ID dedup, tag dedup keys, atomicity, several processes, restarts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import gate
from engine.errors import StoreError
from engine.identity import IdentityUpdate
from engine.store.base import Acceptance, Decision
from engine.store.sqlite import SQLiteStore, hostlock
from engine.store.sqlite import connection as sqlite_connection
from engine.store.sqlite import erasure as sqlite_erasure
from engine.store.sqlite import intake as sqlite_intake

T0 = 1_795_185_045.0  # 2026-11-20T14:30:45Z
HOUR = 3600.0
WINDOW = 48 * HOUR


def decision(tag: str = "meta", dedup_key: str | None = None, fired: bool = True) -> Decision:
    payload = {"event_name": "Purchase"} if fired else None
    return Decision(tag, tag + "_dest", fired, "trigger matched", None, False, payload, dedup_key)


def acceptance(
    event_id: str,
    *decisions: Decision,
    at: float = T0,
    window: float = WINDOW,
    source: str = "server",
) -> Acceptance:
    event = {"event_name": "purchase", "event_id": event_id, "source": source}
    return Acceptance(event, list(decisions) or [decision()], window, at)


def rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


_CONNECT = sqlite3.connect


def trace_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement run by connections opened from now on, in order."""
    statements: list[str] = []

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = _CONNECT(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    return statements


def plans(path: Path, queries: list[str]) -> list[tuple[str, list[str]]]:
    """Each query with its EXPLAIN QUERY PLAN steps."""
    with _CONNECT(path) as db:
        return [
            (q, [str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + q)])
            # the trace writes -inf as "-Inf", which SQL reads as a column name
            for q in (query.replace("-Inf", "-1e999") for query in queries)
        ]


def scans(path: Path, queries: list[str]) -> list[tuple[str, list[str]]]:
    """The queries whose plan scans a table."""
    return [(q, p) for q, p in plans(path, queries) if any(s.startswith("SCAN") for s in p)]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "tagrelay.db"


@pytest.fixture
def store(db_path: Path) -> SQLiteStore:
    return SQLiteStore(db_path)


def test_an_accepted_event_is_stored_with_its_deliveries(store: SQLiteStore, db_path: Path) -> None:
    result = store.accept(acceptance("o1", decision("meta"), decision("ga4", fired=False)))

    assert (result.event_id, result.duplicate, result.fired) == ("o1", False, ["meta"])
    stored = store.get_event("o1")
    assert stored is not None and stored.event["event_name"] == "purchase"
    assert rows(db_path, "SELECT tag, status FROM deliveries") == [("meta", "pending")]


def test_the_store_files_are_readable_by_their_owner_only_in_a_shared_directory(
    tmp_path: Path,
) -> None:
    # A directory open to others (a shared one, or a TAGRELAY_DB's that existed) is left as it
    # is; the files holding the events were made as the umask said, readable by every user.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    path = shared / "tagrelay.db"
    umask = os.umask(0o022)
    try:
        store = SQLiteStore(path)
        store.accept(acceptance("o1"))
        files = {p.name: p.stat().st_mode & 0o777 for p in shared.glob("tagrelay.db*")}
        store.close()
    finally:
        os.umask(umask)

    assert {"tagrelay.db", "tagrelay.db-wal", "tagrelay.db-shm"} <= set(files)
    for name in ("tagrelay.db", "tagrelay.db-wal", "tagrelay.db-shm"):
        assert files[name] == 0o600, (name, oct(files[name]))


def test_the_store_uses_wal_mode(store: SQLiteStore, db_path: Path) -> None:
    store.accept(acceptance("o1"))

    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]


def test_a_repeat_within_the_window_returns_the_original_result_and_queues_nothing(
    store: SQLiteStore, db_path: Path
) -> None:
    first = store.accept(acceptance("o1", decision("meta")))

    again = store.accept(acceptance("o1", decision("meta"), decision("tiktok"), at=T0 + HOUR))

    assert again.duplicate is True
    assert again.decisions == first.decisions
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(1,)]
    assert rows(db_path, "SELECT COUNT(*) FROM deliveries") == [(1,)]


def test_a_repeat_after_the_window_is_a_new_event(store: SQLiteStore, db_path: Path) -> None:
    store.accept(acceptance("o1", at=T0 - WINDOW - 1))

    again = store.accept(acceptance("o1", at=T0))

    assert again.duplicate is False
    assert rows(db_path, "SELECT COUNT(*) FROM deliveries") == [(2,)]


def test_the_window_is_the_containers_setting(store: SQLiteStore) -> None:
    store.accept(acceptance("o1", window=60.0))

    assert store.accept(acceptance("o1", at=T0 + 59, window=60.0)).duplicate is True
    assert store.accept(acceptance("o1", at=T0 + 61, window=60.0)).duplicate is False


def test_a_tag_dedup_key_forwards_browser_and_server_copies_once(
    store: SQLiteStore, db_path: Path
) -> None:
    browser = store.accept(acceptance("browser-1", decision("meta", "meta:ord_9")))

    server = store.accept(acceptance("server-1", decision("meta", "meta:ord_9"), at=T0 + 5))

    assert browser.fired == ["meta"]
    assert server.duplicate is False
    assert server.fired == []
    assert server.decisions[0]["reason"] == (
        "duplicate: dedup key already forwarded by event browser-1"
    )
    assert rows(db_path, "SELECT event_id FROM deliveries") == [("browser-1",)]


def test_a_dedup_key_blocks_only_its_own_tag(store: SQLiteStore) -> None:
    store.accept(acceptance("a", decision("meta", "meta:ord_9")))

    later = store.accept(acceptance("b", decision("meta", "meta:ord_9"), decision("ga4")))

    assert later.fired == ["ga4"]


def test_a_dedup_key_expires_with_the_window(store: SQLiteStore) -> None:
    store.accept(acceptance("a", decision("meta", "meta:ord_9"), at=T0 - WINDOW - 1))

    later = store.accept(acceptance("b", decision("meta", "meta:ord_9")))

    assert later.fired == ["meta"]


def test_a_tag_that_did_not_fire_claims_no_dedup_key(store: SQLiteStore) -> None:
    store.accept(acceptance("a", decision("meta", "meta:ord_9", fired=False)))

    later = store.accept(acceptance("b", decision("meta", "meta:ord_9")))

    assert later.fired == ["meta"]


def test_a_batch_is_deduplicated_within_itself(store: SQLiteStore, db_path: Path) -> None:
    results = store.accept_many([acceptance("o1"), acceptance("o2"), acceptance("o1")])

    assert [r.duplicate for r in results] == [False, False, True]
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(2,)]


def test_a_large_batch_links_every_row_to_its_own_event(store: SQLiteStore, db_path: Path) -> None:
    # Enough rows that every multi-row INSERT is split into several statements.
    accs = [
        acceptance(f"e{i}", decision("a"), decision("b", f"b:{i}"), decision("c", fired=False))
        for i in range(450)
    ]
    accs[300] = acceptance("e7")  # a repeat of an earlier event of the same batch
    accs[301] = acceptance("e301", decision("b", "b:5"))  # a dedup key claimed earlier

    results = store.accept_many(accs)

    assert [r.event_id for r in results] == [a.event["event_id"] for a in accs]
    assert results[300].duplicate and results[300].fired == ["a", "b"]
    assert results[301].fired == [] and "forwarded by event e5" in str(results[301].decisions)
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(449,)]
    mislinked = (
        "SELECT COUNT(*) FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE e.event_id != d.event_id"
    )
    assert rows(db_path, mislinked) == [(0,)]
    assert rows(db_path, "SELECT COUNT(*) FROM deliveries") == [(2 * 448,)]
    keys = "SELECT COUNT(*) FROM dedup_keys k JOIN events e ON e.seq = k.event_seq"
    assert rows(db_path, keys) == [(449 + 448,)]


def test_concurrent_callers_are_committed_together_and_each_gets_its_own_results(
    store: SQLiteStore, db_path: Path
) -> None:
    def call(k: int) -> list[tuple[str, bool]]:
        accs = [acceptance(f"t{k}-{i}") for i in range(20)] + [acceptance("shared")]
        return [(r.event_id, r.duplicate) for r in store.accept_many(accs)]

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(8)))

    for k, got in enumerate(outcomes):
        assert got[:-1] == [(f"t{k}-{i}", False) for i in range(20)]
    assert (
        sorted(dup for out in outcomes for eid, dup in out if eid == "shared")
        == [False] + [True] * 7
    )
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(8 * 20 + 1,)]


def test_a_live_key_whose_event_is_gone_does_not_make_a_duplicate(
    store: SQLiteStore, db_path: Path
) -> None:
    store.accept(acceptance("o1"))
    with sqlite3.connect(db_path) as db:
        db.execute("DELETE FROM events")

    assert store.accept(acceptance("o1", at=T0 + 1)).duplicate is False


def test_identity_updates_of_one_visitor_in_one_batch_are_all_kept(store: SQLiteStore) -> None:
    first = acceptance("v1", at=T0)
    first = replace(first, identity=IdentityUpdate("vis", values={"gclid": "g1"}, ip="1.2.3.4"))
    second = acceptance("v2", at=T0 + 5)
    second = replace(
        second, identity=IdentityUpdate("vis", "user-9", {"fbclid": "f1"}, user_agent="UA")
    )
    third = replace(
        acceptance("v3", at=T0 + 9), identity=IdentityUpdate("vis", values={"gclid": "g2"})
    )

    store.accept_many([first, second, third])

    found = store.recall(None, "user-9", T0 + 10, {}, 30 * 86400.0)
    assert found is not None
    assert (found.visitor_id, found.user_id, found.ip, found.user_agent) == (
        "vis",
        "user-9",
        "1.2.3.4",
        "UA",
    )
    assert found.values == {"gclid": ("g2", T0 + 9), "fbclid": ("f1", T0 + 5)}


def test_a_batch_that_fails_midway_stores_nothing(store: SQLiteStore, db_path: Path) -> None:
    unstorable = Decision("meta", "meta_dest", True, "matched", payload={"x": object()})

    with pytest.raises(StoreError):  # group commit: every caller of the batch hears of it
        store.accept_many([acceptance("o1"), acceptance("o2", unstorable)])

    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert rows(db_path, "SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert rows(db_path, "SELECT COUNT(*) FROM dedup_keys") == [(0,)]
    assert store.accept(acceptance("o1")).duplicate is False


def test_the_stored_decisions_are_the_json_of_the_returned_ones(
    store: SQLiteStore, db_path: Path
) -> None:
    consented = Decision("ga4", "ga4_dest", True, "trigger matched", "consent granted", True, {})
    refused = Decision("tiktok", "tiktok_dest", False, "consent refusé: ad_storage", "denied")
    store.accept(acceptance("k1", decision("meta", "meta:ord_1")))

    result = store.accept(
        acceptance("k2", decision("meta", "meta:ord_1"), consented, refused, decision("meta"))
    )

    [(stored,)] = rows(db_path, "SELECT decisions FROM events WHERE event_id = 'k2'")
    assert stored == json.dumps(result.decisions, separators=(",", ":"), ensure_ascii=False)
    assert "forwarded by event k1" in stored


def test_a_payload_that_contains_itself_stores_nothing(store: SQLiteStore, db_path: Path) -> None:
    looped: dict[str, Any] = {"event_name": "Purchase"}
    looped["self"] = looped

    with pytest.raises(StoreError):
        store.accept(
            acceptance("o1", Decision("meta", "meta_dest", True, "matched", None, False, looped))
        )

    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert store.accept(acceptance("o2")).duplicate is False


def test_event_and_delivery_ids_are_never_reused_after_forget_or_purge(
    store: SQLiteStore, db_path: Path
) -> None:
    # Deliveries are leased, marked and superseded by ID, and dedup keys point at events by
    # seq: a new row taking the ID of an erased one would inherit what was meant for that one.
    def last_ids() -> tuple[int, int]:
        [(seq, delivery_id)] = rows(
            db_path, "SELECT MAX(seq), (SELECT MAX(id) FROM deliveries) FROM events"
        )
        return seq, delivery_id

    person = Acceptance(
        {"event_name": "purchase", "event_id": "p1", "user_id": "u1"}, [decision()], WINDOW, T0
    )
    store.accept(person)
    erased = last_ids()
    store.forget(user_id="u1")
    store.accept(acceptance("o1"))
    after_forget = last_ids()
    store.mark_delivered([d.id for d in store.lease("meta_dest", 10, 60.0, "w", T0)], "w", T0)
    store.purge(T0 + 1)
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(0,)]

    store.accept(acceptance("o2", at=T0 + 2))

    after_purge = last_ids()
    assert after_forget[0] > erased[0] and after_forget[1] > erased[1]
    assert after_purge[0] > after_forget[0] and after_purge[1] > after_forget[1]


def test_a_visitors_last_seen_moves_at_most_hourly_even_when_it_brings_news(
    store: SQLiteStore, db_path: Path
) -> None:
    def seen(event_id: str, at: float, gclid: str) -> None:
        update = IdentityUpdate("vis", values={"gclid": gclid})
        store.accept(replace(acceptance(event_id, at=at), identity=update))

    seen("v1", T0, "g1")
    seen("v2", T0 + 60, "g2")  # a new click within the hour: remembered, last_seen kept

    assert rows(db_path, "SELECT last_seen FROM visitors") == [(T0,)]
    found = store.recall("vis", None, T0 + 61, {}, 30 * 86400.0)
    assert found is not None and found.values == {"gclid": ("g2", T0 + 60)}

    seen("v3", T0 + HOUR + 1, "g2")  # nothing new, but an hour later

    assert rows(db_path, "SELECT last_seen FROM visitors") == [(T0 + HOUR + 1,)]


def test_accepted_events_and_dedup_survive_reopening_the_file(db_path: Path) -> None:
    first = SQLiteStore(db_path)
    first.accept(acceptance("o1", decision("meta", "meta:ord_9")))
    first.close()

    reopened = SQLiteStore(db_path)

    assert reopened.accept(acceptance("o1", at=T0 + 10)).duplicate is True
    assert reopened.accept(acceptance("o2", decision("meta", "meta:ord_9"))).fired == []
    assert reopened.depth() == {"meta_dest": 1}


def test_a_file_of_a_previous_version_gets_the_current_indexes(db_path: Path) -> None:
    first = SQLiteStore(db_path)
    first.accept(acceptance("o1", decision("meta"), decision("ga4")))
    first.mark_delivered([d.id for d in first.lease("ga4_dest", 10, 60.0, "w1", T0)], "w1", T0)
    first.close()
    with sqlite3.connect(db_path) as db:  # the indexes as earlier versions made them
        db.executescript(
            "DROP INDEX deliveries_open; DROP INDEX deliveries_event; "
            "DROP INDEX user_visitors_visitor; "
            "CREATE INDEX deliveries_due ON deliveries (destination, status, next_attempt_at);"
        )

    reopened = SQLiteStore(db_path)

    indexes = {r[1] for r in rows(db_path, "PRAGMA index_list(deliveries)")}
    assert indexes == {"deliveries_open", "deliveries_event"}
    links = {r[1] for r in rows(db_path, "PRAGMA index_list(user_visitors)")}
    assert "user_visitors_visitor" in links
    assert reopened.depth() == {"meta_dest": 1}
    assert [d.tag for d in reopened.lease("meta_dest", 10, 60.0, "w2", T0)] == ["meta"]
    assert reopened.accept(acceptance("o1", at=T0 + 1)).duplicate is True


_VISITORS_BEFORE_SEEN_TIMES = """
DROP TABLE visitors;
CREATE TABLE visitors (
    visitor_id   TEXT PRIMARY KEY,
    user_id      TEXT,
    user_agent   TEXT,
    ip           TEXT,
    vals         TEXT NOT NULL DEFAULT '{}',
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX visitors_last_seen ON visitors (last_seen);
"""


def test_a_file_of_a_previous_version_gets_the_new_visitor_columns_in_place(
    db_path: Path,
) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:  # visitors as earlier versions made them
        db.executescript(_VISITORS_BEFORE_SEEN_TIMES)
        db.execute(
            "INSERT INTO visitors VALUES ('vis', 'u1', 'UA', '203.0.113.7', ?, ?, ?)",
            (json.dumps({"gclid": ["g1", T0]}), T0, T0),
        )

    reopened = SQLiteStore(db_path)

    columns = [r[1] for r in rows(db_path, "PRAGMA table_info(visitors)")]
    assert columns[-3:] == ["ip_seen", "ua_seen", "oldest"]
    assert "visitors_oldest" in {r[1] for r in rows(db_path, "PRAGMA index_list(visitors)")}
    found = reopened.recall("vis", None, T0 + 60, {}, 30 * 86400.0)
    # The click ID is kept; an IP and user agent of unknown age are not taken for recent ones.
    assert found is not None and found.values == {"gclid": ("g1", T0)}
    assert (found.user_id, found.ip, found.user_agent) == ("u1", None, None)
    update = IdentityUpdate("vis", user_agent="UA", ip="203.0.113.7")
    reopened.accept(replace(acceptance("o1", at=T0 + 120), identity=update))
    found = reopened.recall("vis", None, T0 + 180, {}, 30 * 86400.0)
    assert found is not None and (found.ip, found.user_agent) == ("203.0.113.7", "UA")
    SQLiteStore(db_path).close()  # a third open finds nothing to add


_VISITORS_BEFORE_ONE_ROW = """
DROP TABLE visitors;
CREATE TABLE visitors (
    visitor_id   TEXT PRIMARY KEY,
    user_id      TEXT,
    user_agent   TEXT,
    ip           TEXT,
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX visitors_last_seen ON visitors (last_seen);
CREATE TABLE visitor_values (
    visitor_id   TEXT NOT NULL,
    name         TEXT NOT NULL,
    value        TEXT NOT NULL,
    first_seen   REAL NOT NULL,
    last_seen    REAL NOT NULL,
    PRIMARY KEY (visitor_id, name)
) WITHOUT ROWID;
"""


def test_a_file_that_kept_a_row_per_visitor_value_is_upgraded_with_its_values(
    db_path: Path,
) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:  # visitors as the earliest versions made them
        db.executescript(_VISITORS_BEFORE_ONE_ROW)
        db.execute("INSERT INTO visitors VALUES ('vis', 'u1', 'UA', '203.0.113.7', ?, ?)", (T0, T0))
        db.executemany(
            "INSERT INTO visitor_values VALUES ('vis', ?, ?, ?, ?)",
            [("gclid", "g1", T0, T0 + 60), ("fbp", "f1", T0 + 30, T0 + 60)],
        )

    reopened = SQLiteStore(db_path)
    update = IdentityUpdate("vis", values={"gclid": "g2"}, ip="203.0.113.7")
    accepted = reopened.accept(replace(acceptance("o1", at=T0 + 120), identity=update))

    assert accepted.duplicate is False
    found = reopened.recall("vis", None, T0 + 180, {}, 30 * 86400.0)
    assert found is not None and found.values == {"gclid": ("g2", T0 + 120), "fbp": ("f1", T0 + 30)}
    assert (found.user_id, found.ip) == ("u1", "203.0.113.7")
    # Moved, not copied: retention and forget read only the visitor rows.
    assert rows(db_path, "SELECT name FROM sqlite_master WHERE name = 'visitor_values'") == []
    SQLiteStore(db_path).close()  # a third open finds nothing to add


def _open_and_remember(path: str, start: Any, n: int) -> bool:
    start.wait(30)
    store = SQLiteStore(path)
    store.accept(replace(acceptance(f"o{n}"), identity=IdentityUpdate(f"v{n}", ip="192.0.2.1")))
    store.close()
    return True


def test_workers_opening_a_previous_versions_file_at_once_upgrade_it_once(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.executescript(_VISITORS_BEFORE_SEEN_TIMES)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        pending = [
            pool.apply_async(_open_and_remember, (str(db_path), start, n)) for n in range(PROCESSES)
        ]
        start.set()
        assert all(p.get(timeout=60) for p in pending)

    columns = [r[1] for r in rows(db_path, "PRAGMA table_info(visitors)")]
    assert columns.count("ip_seen") == 1 and columns[-1] == "oldest"
    assert rows(db_path, "SELECT COUNT(*) FROM visitors WHERE ip_seen = ?", T0) == [(PROCESSES,)]


def test_the_ip_and_user_agent_keep_the_time_last_seen_to_the_hour(
    store: SQLiteStore, db_path: Path
) -> None:
    def seen(event_id: str, at: float, ip: str) -> None:
        update = IdentityUpdate("vis", user_agent="UA", ip=ip)
        store.accept(replace(acceptance(event_id, at=at), identity=update))

    seen("v1", T0, "203.0.113.7")
    seen("v2", T0 + 60, "203.0.113.7")  # the same within the hour: no write
    seen("v3", T0 + 120, "198.51.100.1")  # a new IP: seen now
    seen("v4", T0 + HOUR + 121, "198.51.100.1")  # the same an hour later: seen again

    assert rows(db_path, "SELECT ip_seen, ua_seen FROM visitors") == [
        (T0 + HOUR + 121, T0 + HOUR + 121)
    ]
    window = 2 * HOUR
    at_the_edge = store.recall("vis", None, T0 + HOUR + 121 + window, {}, window)
    past_it = store.recall("vis", None, T0 + HOUR + 122 + window, {}, window)
    assert at_the_edge is not None and at_the_edge.ip == "198.51.100.1"
    assert past_it is not None and (past_it.ip, past_it.user_agent) == (None, None)


def test_opening_a_file_whose_schema_must_change_waits_for_another_writer(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("DROP INDEX deliveries_open")
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    threading.Timer(0.3, other.rollback).start()

    SQLiteStore(db_path)

    assert "deliveries_open" in {r[1] for r in rows(db_path, "PRAGMA index_list(deliveries)")}
    other.close()


def test_purge_drops_only_expired_keys(store: SQLiteStore) -> None:
    store.accept(acceptance("old", at=T0 - WINDOW - 1))
    store.accept(acceptance("new"))

    purged = store.purge_expired(T0)

    assert purged == 1
    assert store.accept(acceptance("new", at=T0 + 1)).duplicate is True


def test_expiry_walks_the_keys_in_short_transactions(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_erasure, "PURGE_SCAN", 3)
    store = SQLiteStore(db_path)
    for i in range(10):
        store.accept(acceptance(f"old{i}", at=T0 - WINDOW - 1))
        store.accept(acceptance(f"new{i}"))
    began, removed = _count_transactions(monkeypatch, store, lambda: store.purge_expired(T0))

    assert removed == 10
    assert began >= 20 // 3  # a transaction per stretch of 3 keys, not one for the table
    assert sorted(r[0] for r in rows(db_path, "SELECT key FROM dedup_keys")) == sorted(
        f"event:new{i}" for i in range(10)
    )


def test_retention_works_in_chunks_across_events_received_together(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch's events share one received_at: a chunk boundary inside them must skip none.
    monkeypatch.setattr(sqlite_erasure, "PURGE_CHUNK", 2)
    store = SQLiteStore(db_path)
    store.accept_many([acceptance(f"b{i}", decision("meta"), at=T0) for i in range(5)])
    store.accept_many([acceptance(f"p{i}", decision("tiktok"), at=T0) for i in range(2)])
    store.accept(acceptance("late", decision("meta"), at=T0 + 2 * HOUR))
    leased = store.lease("meta_dest", 100, 60.0, "w", T0)
    store.mark_delivered([d.id for d in leased if d.event_id != "late"], "w", T0)
    for visitor, user in (("v1", "u1"), ("v2", "u2"), ("v3", None)):
        seen = acceptance(f"seen-{visitor}", decision(fired=False), at=T0)
        store.accept(replace(seen, identity=IdentityUpdate(visitor, user)))

    began, removed = _count_transactions(monkeypatch, store, lambda: store.purge(T0 + HOUR))

    assert removed == {
        "events": 8,
        "deliveries": 5,
        "visitors": 3,
        "visitor_values": 0,
        "links": 0,
    }
    # 10 old events, then 3 visitors, in chunks of 2: 6 + 2 + 1 rounds (else 3)
    assert began >= 9
    remaining = {r[0] for r in rows(db_path, "SELECT event_id FROM events")}
    assert remaining == {"p0", "p1", "late"}  # still to send, or too recent
    assert rows(db_path, "SELECT COUNT(*) FROM user_visitors") == [(0,)]


def test_retention_drops_what_a_visitor_still_seen_remembers_from_before_the_cut_off(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_erasure, "PURGE_CHUNK", 2)
    store = SQLiteStore(db_path)
    cut = T0 + 10 * HOUR
    for n in range(5):  # regulars: an old click, a newer cookie, seen again after the cut-off
        visitor = f"v{n}"
        old = IdentityUpdate(visitor, values={"gclid": f"g{n}"}, user_agent="UA", ip="192.0.2.1")
        store.accept(replace(acceptance(f"old{n}", at=T0), identity=old))
        newer = IdentityUpdate(visitor, values={"fbp": f"fb{n}"})
        store.accept(replace(acceptance(f"new{n}", at=cut + HOUR), identity=newer))
    fresh = IdentityUpdate("v-fresh", values={"gclid": "g"}, ip="192.0.2.2")
    store.accept(replace(acceptance("fresh", at=cut + HOUR), identity=fresh))

    began, removed = _count_transactions(monkeypatch, store, lambda: store.purge(cut))

    assert removed["visitors"] == 0 and removed["visitor_values"] == 5 * 3
    # 5 old events, no visitor to erase, 5 to trim, in chunks of 2: 3 + 1 + 3 rounds (else 3)
    assert began >= 7
    for n in range(5):
        found = store.recall(f"v{n}", None, cut + 2 * HOUR, {}, 1e9)
        assert found is not None
        assert (found.values, found.ip, found.user_agent) == (
            {"fbp": (f"fb{n}", cut + HOUR)},
            None,
            None,
        )
    kept = store.recall("v-fresh", None, cut + 2 * HOUR, {}, 1e9)
    assert kept is not None and (kept.values, kept.ip) == (
        {"gclid": ("g", cut + HOUR)},
        "192.0.2.2",
    )
    assert rows(db_path, "SELECT MIN(oldest) FROM visitors") == [(cut + HOUR,)]
    assert store.purge(cut)["visitor_values"] == 0  # nothing left to find


def test_retention_drops_the_user_links_a_visitor_still_seen_made_before_the_cut_off(
    store: SQLiteStore, db_path: Path
) -> None:
    cut = T0 + 10 * 24 * HOUR
    for visitor in ("shared", "own"):  # Ada logged in on both long ago
        seen = acceptance(f"ada-{visitor}", decision(fired=False), at=T0)
        store.accept(replace(seen, identity=IdentityUpdate(visitor, "ada")))
    # Since the cut-off: Bob on the shared browser, and Ada's own browser without a login.
    bob = acceptance("bob", decision(fired=False), at=cut + HOUR)
    store.accept(replace(bob, identity=IdentityUpdate("shared", "bob")))
    anonymous = acceptance("anon", decision(fired=False), at=cut + HOUR)
    store.accept(replace(anonymous, identity=IdentityUpdate("own", values={"gclid": "g"})))

    removed = store.purge(cut, now=cut + 2 * HOUR)

    assert rows(db_path, "SELECT user_id, visitor_id FROM user_visitors") == [("bob", "shared")]
    # Ada's ID no longer finds Bob's browser, nor is it copied into her old browser's events.
    assert store.recall(None, "ada", cut + 2 * HOUR, {}, 1e9) is None
    own = store.recall("own", None, cut + 2 * HOUR, {}, 1e9)
    assert own is not None and own.user_id is None
    shared = store.recall(None, "bob", cut + 2 * HOUR, {}, 1e9)
    assert shared is not None and (shared.visitor_id, shared.user_id) == ("shared", "bob")
    assert removed["visitors"] == 0 and removed["links"] == 2


def test_retention_drops_the_ip_and_user_agent_of_unknown_age_from_a_previous_version(
    db_path: Path,
) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.executescript(_VISITORS_BEFORE_SEEN_TIMES)
        db.execute(
            "INSERT INTO visitors VALUES ('vis', NULL, 'UA', '203.0.113.7', ?, ?, ?)",
            (json.dumps({"gclid": ["g1", T0 - WINDOW], "fbp": ["f1", T0 + HOUR]}), T0, T0 + HOUR),
        )
    store = SQLiteStore(db_path)

    removed = store.purge(T0)

    assert removed["visitor_values"] == 3  # the old click ID, the IP and the user agent
    assert rows(db_path, "SELECT vals, ip, user_agent, oldest FROM visitors") == [
        ('{"fbp":["f1",%r]}' % (T0 + HOUR), None, None, T0 + HOUR)
    ]


def test_retention_and_expiry_find_their_rows_by_index(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # They run hourly in every process, inside the write lock: no statement may scan a table.
    statements = trace_statements(monkeypatch)
    store = SQLiteStore(db_path)
    store.accept(replace(acceptance("o1"), identity=IdentityUpdate("v1", "u1")))
    statements.clear()

    store.purge(T0 + HOUR)
    store.purge_expired(T0 + WINDOW + 1)

    # rate_counters holds a few rows per server key (the last hour's minutes): scanned.
    queries = [
        q for q in statements if q.split()[0] in ("SELECT", "DELETE") and "rate_counters" not in q
    ]
    assert len(queries) >= 6
    assert scans(db_path, queries) == []


def _of_person(event_id: str) -> Acceptance:
    event = {"event_name": "purchase", "event_id": event_id, "user_id": "u1"}
    return replace(acceptance(event_id, decision("meta", dedup_key=event_id)), event=event)


@pytest.mark.parametrize("arrival", [False, True], ids=["quiet", "event-arrives-meanwhile"])
def test_forget_searches_outside_the_write_lock_and_misses_no_event_accepted_meanwhile(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, arrival: bool
) -> None:
    # Finding a person's events reads every event body: seconds on a large store, which
    # intake must not wait for. An event of theirs committed during that read is erased too.
    statements = trace_statements(monkeypatch)
    store = SQLiteStore(db_path)
    store.accept(_of_person("p1"))
    store.accept(acceptance("other"))
    # A chain of shared devices: forget follows one step, from the person to their visitors.
    for n, (visitor, user) in enumerate(
        [("v1", "u1"), ("v1", "u2"), ("v2", "u2"), ("v2", "u3"), ("v3", "u3")]
    ):
        body = {
            "event_name": "login",
            "event_id": f"link{n}",
            "visitor_id": visitor,
            "user_id": user,
        }
        seen = replace(acceptance(f"link{n}", decision(fired=False)), event=body)
        store.accept(replace(seen, identity=IdentityUpdate(visitor, user)))
    write, keys_of = store._write, sqlite_erasure._keys_of
    held: list[range] = []  # the statements run inside write transactions

    @contextlib.contextmanager
    def flagged() -> Iterator[sqlite3.Connection]:
        with write() as db:
            start = len(statements)
            try:
                yield db
            finally:
                held.append(range(start, len(statements)))

    def keys_then_accept(db: sqlite3.Connection, seqs: Any) -> Any:
        found = keys_of(db, seqs)
        if arrival and db is not store._writer:  # the search: a new event arrives meanwhile
            store.accept(_of_person("p2"))
        return found

    monkeypatch.setattr(store, "_write", flagged)
    monkeypatch.setattr(sqlite_erasure, "_keys_of", keys_then_accept)
    statements.clear()

    removed = store.forget(user_id="u1")

    others = ["other", "link1", "link2", "link3", "link4"]  # link1: u2 on the person's v1
    assert sorted(r[0] for r in rows(db_path, "SELECT event_id FROM events")) == sorted(others)
    assert rows(db_path, "SELECT COUNT(*) FROM deliveries WHERE event_id != 'other'") == [(0,)]
    assert sorted(r[0] for r in rows(db_path, "SELECT key FROM dedup_keys")) == sorted(
        f"event:{e}" for e in others
    )
    assert (removed["events"], removed["dedup_keys"]) == ((3, 5) if arrival else (2, 3))
    assert rows(db_path, "SELECT visitor_id FROM visitors ORDER BY 1") == [("v2",), ("v3",)]
    if arrival:
        return  # the late event's dedup keys are found by a scan, inside the lock: rare
    under_lock = [
        statements[i]
        for span in held
        for i in span
        if statements[i].split()[0] in ("SELECT", "DELETE")
    ]
    assert any("json_extract" in q for q in under_lock)  # the look at late arrivals
    assert not [q for q in under_lock if "seq <=" in q]  # no second read of all events
    assert scans(db_path, under_lock) == []


def test_forget_works_on_an_in_memory_store() -> None:
    # There the search cannot use a connection of its own: it would see an empty database.
    store = SQLiteStore(":memory:")
    store.accept(_of_person("p1"))
    store.accept(acceptance("other"))

    removed = store.forget(user_id="u1")

    assert (removed["events"], removed["deliveries"], removed["dedup_keys"]) == (1, 1, 2)
    assert store.get_event("p1") is None and store.get_event("other") is not None


def _count_transactions(
    monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, run: Callable[[], Any]
) -> tuple[int, Any]:
    """How many write transactions ``run()`` took, and what it returned."""
    began = 0
    write = store._write

    def counted() -> Any:
        nonlocal began
        began += 1
        return write()

    monkeypatch.setattr(store, "_write", counted)
    result = run()
    return began, result


def test_ping_answers_on_a_working_store(store: SQLiteStore) -> None:
    store.ping()


def test_the_wal_stays_bounded_under_sustained_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The background checkpoint is kept out of the way: the writers alone must rewind the WAL,
    # as they have to when commits never pause long enough for it to catch up.
    monkeypatch.setattr(sqlite_connection, "CHECKPOINT_INTERVAL", 3600.0)
    monkeypatch.setattr(sqlite_connection, "WAL_CHECKPOINT_PAGES", 100)
    store = SQLiteStore(db_path)
    big = {"event_name": "Purchase", "blob": "x" * 3000}
    for i in range(600):  # ~4 pages per commit: ~2,400 pages of WAL without a rewind
        d = Decision("meta", "meta_dest", True, "trigger matched", None, False, big)
        store.accept(acceptance(f"e{i}", d))

    wal_pages = (db_path.parent / (db_path.name + "-wal")).stat().st_size / 4096
    store.close()
    assert wal_pages < 300
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(600,)]


# -- the outbox -------------------------------------------------------------------------------


def test_the_outbox_queries_read_only_the_index_of_open_deliveries(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Delivered and dead rows, most of the table, must not be scanned every poll.
    statements = trace_statements(monkeypatch)
    store = SQLiteStore(db_path)
    store.accept(acceptance("o1", decision("meta"), decision("ga4")))

    store.destinations_due(T0)
    store.depth()
    store.lease("meta_dest", 10, 60.0, "w", T0)

    queries = [q for q in statements if q.startswith("SELECT") and "FROM deliveries" in q]
    assert len(queries) == 3
    for query, plan in plans(db_path, queries):
        assert "INDEX deliveries_open" in " ".join(plan), query


# -- connections ------------------------------------------------------------------------------


def test_threads_taking_turns_write_through_one_connection(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection drops its page cache after another connection's commit: one per thread
    # would make every write start cold.
    store.accept(acceptance("o0"))
    opened: list[Any] = []
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: opened.append(a) or connect(*a, **k))

    for k in range(4):
        worker = threading.Thread(target=store.accept, args=(acceptance(f"t{k}"),))
        worker.start()
        worker.join()

    assert opened == []


def test_a_read_does_not_wait_for_a_write_in_progress(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.accept(acceptance("o1"))
    writing, finish = threading.Event(), threading.Event()
    encode = sqlite_intake._encode

    def slow_encode(acc: Acceptance) -> Any:  # called inside the write transaction
        if acc.event["event_id"] == "o2":
            writing.set()
            finish.wait(10)
        return encode(acc)

    monkeypatch.setattr(sqlite_intake, "_encode", slow_encode)
    writer = threading.Thread(target=store.accept, args=(acceptance("o2"),))
    writer.start()
    try:
        assert writing.wait(10)

        found = store.get_event("o1")

        assert found is not None and writer.is_alive()
    finally:
        finish.set()
        writer.join()
    assert store.get_event("o2") is not None


# -- several processes ------------------------------------------------------------------------

EVENTS = 40
PROCESSES = 4


def _accept_all(path: str, start: Any, offset: int) -> list[tuple[str, bool, list[str]]]:
    """Accept every event (rotated by ``offset``) one request at a time, like a worker would."""
    store = SQLiteStore(path)
    start.wait(30)
    order = list(range(EVENTS))
    order = order[offset:] + order[:offset]
    out = []
    for i in order:
        # Events 2k and 2k+1 are the browser and server copies of one order.
        acc = acceptance(f"e{i}", decision("a"), decision("b", f"b:order-{i // 2}"))
        result = store.accept(acc)
        out.append((result.event_id, result.duplicate, result.fired))
    store.close()
    return out


def test_processes_racing_on_the_same_event_ids_accept_each_exactly_once(db_path: Path) -> None:
    SQLiteStore(db_path).close()  # the schema exists before the race, as under gunicorn
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        pending = [
            pool.apply_async(_accept_all, (str(db_path), start, k * 7)) for k in range(PROCESSES)
        ]
        start.set()
        results = [r for p in pending for r in p.get(timeout=60)]

    originals = Counter(event_id for event_id, duplicate, _ in results if not duplicate)
    assert originals == Counter({f"e{i}": 1 for i in range(EVENTS)})
    assert len(results) == EVENTS * PROCESSES
    assert rows(db_path, "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events") == [
        (EVENTS, EVENTS)
    ]
    per_tag = dict(rows(db_path, "SELECT tag, COUNT(*) FROM deliveries GROUP BY tag"))
    assert per_tag == {"a": EVENTS, "b": EVENTS // 2}
    repeated = "SELECT event_id, tag FROM deliveries GROUP BY 1, 2 HAVING COUNT(*) > 1"
    assert rows(db_path, repeated) == []


def test_a_store_write_inside_gated_work_does_not_deadlock(store: SQLiteStore) -> None:
    with gate.CPU:  # e.g. a plugin or an operator command writing while evaluating
        assert store.accept(acceptance("g1")).duplicate is False


def test_the_gate_is_fresh_in_a_forked_child() -> None:
    read, write = os.pipe()
    with gate.CPU:
        pid = os.fork()
        if pid == 0:  # the child must be able to take the lock its parent holds
            os.write(write, b"1" if gate.CPU.acquire(timeout=5) else b"0")
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"


def test_a_forked_child_writes_through_a_connection_of_its_own(
    store: SQLiteStore, db_path: Path
) -> None:
    store.accept(acceptance("parent-1"))  # the writer is open before the fork, as under gunicorn

    pid = fork_accepting(store, "child-1")

    assert child_exit_code(pid) == 0
    assert store.accept(acceptance("parent-2")).duplicate is False
    assert rows(db_path, "SELECT event_id FROM events ORDER BY seq") == [
        ("parent-1",),
        ("child-1",),
        ("parent-2",),
    ]


def fork_accepting(store: SQLiteStore, event_id: str) -> int:
    """Fork a child that accepts ``event_id`` into ``store`` and exits 0 if it was new; the
    child's pid (see :func:`child_exit_code`)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if store.accept(acceptance(event_id)).duplicate is False else 2
        finally:
            os._exit(code)
    return pid


def child_exit_code(pid: int, timeout: float = 30.0) -> int:
    """The exit code of forked child ``pid``; killed and failed if it hangs (a lock inherited
    locked across the fork would leave it waiting for ever, and the test run with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child hung for {timeout:g} s")


def test_a_forked_child_writes_even_if_the_parents_lock_waiter_held_its_lock_at_the_fork(
    store: SQLiteStore,
) -> None:
    store.accept(acceptance("parent-1"))
    holding, release = threading.Event(), threading.Event()

    def waiter_mid_hand_over() -> None:
        with store._host._cond:  # as the parent's waiter thread is, now and then
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=waiter_mid_hand_over, daemon=True)
    thread.start()
    holding.wait(10)
    try:
        pid = fork_accepting(store, "child-1")
    finally:
        release.set()
        thread.join(10)

    assert child_exit_code(pid, timeout=10) == 0


def _hold_host_lock(db_path: Path) -> int:
    """Take the host's writer lock as another tagrelay process would (own open file)."""
    import fcntl

    fd = os.open(f"{db_path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_writer_waits_for_the_process_holding_the_host_lock(
    store: SQLiteStore, db_path: Path
) -> None:
    fd = _hold_host_lock(db_path)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (store.accept_many([acceptance("h1")]), done.set()))
    worker.start()
    try:
        assert not done.wait(0.3)  # queued behind the other process, not failed
    finally:
        os.close(fd)  # closing the file releases the lock, as a process's death would
    worker.join(10)
    assert done.is_set()
    assert rows(db_path, "SELECT event_id FROM events") == [("h1",)]


def test_requests_arriving_while_the_leader_waits_join_its_commit(
    store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    original = sqlite_intake._accept_group

    def recording(db: sqlite3.Connection, accs: Any) -> Any:
        groups.append(len(accs))
        return original(db, accs)

    monkeypatch.setattr(sqlite_intake, "_accept_group", recording)
    store.accept_many([acceptance("warm")])  # opens the writer connection and the lock file
    groups.clear()
    fd = _hold_host_lock(db_path)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(store.accept_many, [acceptance(f"g{i}")]) for i in range(4)]
        deadline = time.monotonic() + 5
        while len(store._queue) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.close(fd)
        results = [f.result(timeout=10) for f in futures]

    assert [r[0].duplicate for r in results] == [False] * 4
    assert groups == [4]  # one transaction for all four


# -- the outbox: leases are settled only by their holder ---------------------------------------


def test_a_late_answer_cannot_overwrite_the_worker_that_took_the_lease_over(
    store: SQLiteStore,
) -> None:
    store.accept(acceptance("o1"))
    [mine] = store.lease("meta_dest", 10, 30.0, "A", T0)  # A's request hangs past its lease
    [theirs] = store.lease("meta_dest", 10, 30.0, "B", T0 + 31)

    assert store.mark_delivered([theirs.id], "B", T0 + 32) == 1
    assert store.mark_retry([mine.id], "A", T0 + 40, "retryable: timed out") == 0
    assert store.mark_dead([mine.id], "A", "permanent: HTTP 400", T0 + 40) == 0
    assert store.release([mine.id], "A") == 0

    settled = store.get_delivery(mine.id)
    assert settled is not None and settled.status.value == "delivered"
    assert store.lease("meta_dest", 10, 30.0, "C", T0 + 100) == []  # never sent again


def test_a_lease_is_renewed_only_by_its_holder(store: SQLiteStore) -> None:
    store.accept(acceptance("o1"))
    store.accept(acceptance("o2"))
    first, second = store.lease("meta_dest", 10, 30.0, "A", T0)
    [taken] = store.lease("meta_dest", 1, 30.0, "B", T0 + 31)  # A's lease ran out; B took one

    held = store.renew([first.id, second.id], "A", 30.0, T0 + 32)

    assert held == [second.id] and taken.id == first.id
    assert store.lease("meta_dest", 10, 30.0, "C", T0 + 60) == []  # the renewal holds
    assert store.mark_delivered([second.id], "A", T0 + 62) == 1


def test_waiting_without_an_attempt_keeps_the_attempt_count(store: SQLiteStore) -> None:
    store.accept(acceptance("o1"))
    [d] = store.lease("meta_dest", 10, 30.0, "A", T0)

    store.mark_retry([d.id], "A", T0 + 60, "destination missing", count_attempt=False)

    parked = store.get_delivery(d.id)
    assert parked is not None and (parked.status.value, parked.attempts) == ("pending", 0)


# -- replay ------------------------------------------------------------------------------------


def _dead_letter(store: SQLiteStore, event_id: str) -> int:
    store.accept(acceptance(event_id))
    [d] = store.lease("meta_dest", 10, 30.0, "w", T0)
    store.mark_dead([d.id], "w", "permanent: HTTP 400", T0)
    return d.id


def test_a_dead_letter_replayed_twice_at_once_is_queued_once(store: SQLiteStore) -> None:
    dead = _dead_letter(store, "o1")
    event = store.event_for_delivery(dead)
    assert event is not None

    # Two replays that both saw the dead letter before either wrote.
    first = store.requeue(event, [decision()], WINDOW, T0 + 1, supersedes=[dead])
    second = store.requeue(event, [decision()], WINDOW, T0 + 2, supersedes=[dead])

    assert [d.fired for d in first] == [True]
    assert [d.fired for d in second] == [False]
    assert "replayed meanwhile" in second[0].reason
    assert len(store.lease("meta_dest", 10, 30.0, "w", T0 + 3)) == 1  # one, in the dead's place
    assert store.dead_letters() == []


def test_a_replay_that_queues_nothing_keeps_the_dead_letter(store: SQLiteStore) -> None:
    dead = _dead_letter(store, "o1")
    event = store.event_for_delivery(dead)
    assert event is not None

    applied = store.requeue(event, [decision(fired=False)], WINDOW, T0 + 1, supersedes=[dead])

    assert [d.fired for d in applied] == [False]
    assert [d.id for d in store.dead_letters()] == [dead]


def test_a_replay_does_not_take_a_dedup_key_held_by_a_page_event_of_the_same_id(
    store: SQLiteStore,
) -> None:
    # A page's event and the server's may share an event ID (their IDs are deduplicated
    # apart): the key the page's claimed is held by another event, whatever its ID.
    keyed = decision(dedup_key="ord_1")
    store.accept(acceptance("o1", keyed, source="browser"))
    server = store.accept(acceptance("o1", keyed, at=T0 + 1))
    page, backend = store.events_since(0.0)

    applied = store.requeue(backend, [keyed], WINDOW, T0 + 2)

    assert server.fired == [] and page.event_id == backend.event_id == "o1"
    assert [d.fired for d in applied] == [False] and "dedup key" in applied[0].reason
    assert len(store.lease("meta_dest", 10, 30.0, "w", T0 + 3)) == 1  # the page's, once


def test_a_replay_of_an_event_erased_meanwhile_queues_nothing(store: SQLiteStore) -> None:
    store.accept(_of_person("p1"))
    event = store.get_event("p1")
    assert event is not None
    store.forget(user_id="u1")  # between the replay's read and its write

    applied = store.requeue(event, [decision()], WINDOW, T0 + 1)

    assert [d.fired for d in applied] == [False] and "erased" in applied[0].reason
    assert store.lease("meta_dest", 10, 30.0, "w", T0 + 2) == []


# -- retention and erasure ---------------------------------------------------------------------


def test_retention_keeps_an_event_while_its_id_is_deduplicated(store: SQLiteStore) -> None:
    store.accept(acceptance("o1"))
    [d] = store.lease("meta_dest", 10, 30.0, "w", T0)
    store.mark_delivered([d.id], "w", T0 + 1)

    # Retention of a day, a 48-hour window: at 30 hours the event is old but still the original.
    kept = store.purge(T0 + 6 * HOUR, now=T0 + 30 * HOUR)
    repeat = store.accept(acceptance("o1", at=T0 + 30 * HOUR))
    gone = store.purge(T0 + 6 * HOUR, now=T0 + WINDOW + 1)

    assert kept["events"] == 0
    assert repeat.duplicate and repeat.fired == ["meta"]
    assert store.lease("meta_dest", 10, 30.0, "w", T0 + 31 * HOUR) == []  # nothing sent twice
    assert gone["events"] == 1 and store.get_event("o1") is None


def test_a_pages_event_ids_and_the_servers_are_deduplicated_apart(store: SQLiteStore) -> None:
    page = acceptance("o1", source="browser")
    first = store.accept(page)
    server = store.accept(acceptance("o1"))
    both = store.accept_many([page, acceptance("o1"), replace(page, received_at=T0 + 1)])

    assert not first.duplicate and not server.duplicate
    assert [a.duplicate for a in both] == [True, True, True]
    assert len(store.lease("meta_dest", 10, 30.0, "w", T0)) == 2


def test_retention_keeps_a_pages_event_while_its_id_is_deduplicated(store: SQLiteStore) -> None:
    store.accept(acceptance("p1", source="browser"))
    [d] = store.lease("meta_dest", 10, 30.0, "w", T0)
    store.mark_delivered([d.id], "w", T0 + 1)

    kept = store.purge(T0 + 6 * HOUR, now=T0 + 30 * HOUR)
    found = store.get_event("p1")
    gone = store.purge(T0 + 6 * HOUR, now=T0 + WINDOW + 1)

    assert kept["events"] == 0 and found is not None and found.event_id == "p1"
    assert gone["events"] == 1 and store.get_event("p1") is None


def test_forget_by_email_erases_the_identities_the_person_was_seen_with(
    store: SQLiteStore,
) -> None:
    event = {
        "event_name": "purchase",
        "event_id": "m1",
        "visitor_id": "vis-1",
        "user_id": "u-ada",
        "user_data": {"email": "ada@example.com"},
    }
    update = IdentityUpdate("vis-1", "u-ada", {"gclid": "g1"}, "UA", "203.0.113.7")
    store.accept(replace(acceptance("m1"), event=event, identity=update))
    page = {"event_name": "page_view", "event_id": "pv1", "visitor_id": "vis-1"}
    store.accept(replace(acceptance("pv1"), event=page))

    removed = store.forget(email=" Ada@Example.com ")

    assert (removed["events"], removed["visitors"], removed["links"]) == (2, 1, 1)
    assert store.recall("vis-1", None, T0, {}, 1e9) is None
    assert store.recall(None, "u-ada", T0, {}, 1e9) is None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("asked", "stored", "erased"),
    [
        ("ada@example.com", "ada@example.com\n", True),
        ("ada@example.com", "\tada@example.com", True),
        ("ada@example.com", "\u00a0Ada@Example.COM\r\n", True),
        ("ada.müller@example.com", "ADA.MÜLLER@example.com", True),
        ("ADA.MÜLLER@example.com", _sha256("ada.müller@example.com"), True),
        ("ada@example.com", _sha256("ada@example.com").upper(), True),
        ("ada@example.com", " " + _sha256("ada@example.com") + "\n", True),
        (_sha256("ada@example.com"), "ada@example.com", False),  # a digest matches digests
        (_sha256("ada@example.com"), _sha256("ada@example.com"), True),
        # A gmail.com address names one mailbox with or without dots and +tag (Google's form).
        ("Ada.Lovelace@gmail.com", "adalovelace+shop@gmail.com", True),
        ("ada.lovelace@gmail.com", _sha256("adalovelace@gmail.com"), True),
        ("ada.lovelace@gmail.com", _sha256("ada.lovelace@gmail.com"), True),
        ("ada@example.com", "ada@example.org", False),
        ("ada@example.com", "bada@example.com", False),
        ("ada.lovelace@example.com", "adalovelace@example.com", False),  # only gmail.com
        ("ada@example.com", _sha256("bob@example.com"), False),
    ],
)
def test_forget_by_email_finds_every_form_the_platforms_would_match(
    store: SQLiteStore, asked: str, stored: str, erased: bool
) -> None:
    event = {"event_name": "lead", "event_id": "m1", "user_data": {"email": stored}}
    store.accept(replace(acceptance("m1"), event=event))
    store.accept(acceptance("other"))

    removed = store.forget(email=asked)

    assert (store.get_event("m1") is None) is erased
    assert removed["events"] == int(erased)
    assert store.get_event("other") is not None


def test_an_event_that_cannot_be_encoded_fails_alone_not_its_group_commit(
    store: SQLiteStore, db_path: Path
) -> None:
    looped: dict[str, Any] = {"event_name": "Purchase"}
    looped["self"] = looped
    bad = acceptance("bad", Decision("meta", "meta_dest", True, "matched", None, False, looped))
    store.accept_many([acceptance("warm")])
    fd = _hold_host_lock(db_path)  # the good ones queue up behind one leader
    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(store.accept_many, [acceptance(f"g{i}")]) for i in range(3)]
        deadline = time.monotonic() + 5
        while len(store._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = pool.submit(store.accept_many, [bad])
        time.sleep(0.05)
        os.close(fd)
        results = [f.result(timeout=10) for f in good]
        with pytest.raises(StoreError, match="not JSON"):
            failed.result(timeout=10)

    assert [r[0].duplicate for r in results] == [False] * 3
    assert rows(db_path, "SELECT COUNT(*) FROM events WHERE event_id LIKE 'g%'") == [(3,)]


def test_a_payload_with_a_lone_surrogate_is_stored_and_read_back_as_built(
    store: SQLiteStore,
) -> None:
    # JSON carries it (json writes it as is); UTF-8, SQLite's text, cannot.
    payload = {"event_name": "Purchase", "content_name": "Schuh \ud800", "city": "Köln"}
    odd = Decision("meta", "meta_dest", True, "matched", None, False, payload)

    results = store.accept_many([acceptance("odd", odd), acceptance("plain")])

    assert [r.duplicate for r in results] == [False, False]
    leased = store.lease("meta_dest", 10, 30.0, "w", T0)
    assert [(d.event_id, dict(d.payload)) for d in leased] == [
        ("odd", payload),
        ("plain", {"event_name": "Purchase"}),
    ]


def test_a_resent_batch_of_duplicates_is_not_encoded_again(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [acceptance(f"r{i}") for i in range(20)]
    store.accept_many(batch)
    encoded: list[Any] = []
    encode = sqlite_intake._encode

    def counted(acc: Acceptance) -> Any:
        encoded.append(acc)
        return encode(acc)

    monkeypatch.setattr(sqlite_intake, "_encode", counted)

    again = store.accept_many([*batch, acceptance("new")])

    assert [r.duplicate for r in again] == [True] * 20 + [False]
    # A client's retry of a whole batch costs lookups, not encoding; "new" shows the count works.
    assert [acc.event["event_id"] for acc in encoded] == ["new"]


def test_cached_decision_json_is_what_summary_gives_for_every_field() -> None:
    """intake._summary_json caches by the fields Decision.summary reads; a decision differing
    in any field (payload and dedup key included) must still get its own summary's JSON."""
    base = Decision("t", "d", True, "trigger all matched")
    variants = [
        base,
        replace(base, fired=False, reason="consent denied: ad_storage"),
        replace(base, consent="granted: ad_storage"),
        replace(base, anonymous=True),
        replace(base, payload={"x": 1}),
        replace(base, dedup_key="t:o1"),
        replace(base, tag="other", destination="elsewhere"),
    ]
    for decision in variants + variants[::-1]:
        assert sqlite_intake._summaries_json([decision]) == json.dumps(
            [decision.summary()], separators=(",", ":")
        )


def test_a_retention_chunk_of_visitors_fits_in_one_statement() -> None:
    """_erase_visitors takes at most _MAX_PARAMS visitors in one IN (...) list."""
    assert sqlite_erasure.PURGE_CHUNK <= sqlite_erasure._MAX_PARAMS


def test_forget_overwrites_what_it_deletes_even_where_sqlite_is_built_to_only_free_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian builds SQLite with secure_delete on; others leave deleted rows readable in free
    # pages. Connections open here as such a build's would.
    def default_off(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = _CONNECT(*args, **kwargs)
        conn.execute("PRAGMA secure_delete=OFF")
        return conn

    monkeypatch.setattr(sqlite3, "connect", default_off)
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    marker = "ada.lovelace.erase.me@example.com"
    event = {"event_name": "lead", "event_id": "e1", "user_id": "u1"}
    event["user_data"] = {"email": marker, "padding": "p" * 3000}  # a page of its own
    store.accept(Acceptance(event, [decision()], WINDOW, T0))

    store.forget(user_id="u1")
    for n in range(5):  # the store goes on: the WAL is not reset by anyone else meanwhile
        store.accept(acceptance(f"later-{n}"))

    assert marker.encode() not in path.read_bytes()
    wal = Path(f"{path}-wal")
    assert not wal.exists() or marker.encode() not in wal.read_bytes()


@contextlib.contextmanager
def writer_lock_held_elsewhere(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the store's host writer lock (as one stopped mid-write would)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
            f"{path}-writer",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_write_waits_for_a_stuck_writer_no_longer_than_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    monkeypatch.setattr(sqlite_connection, "BUSY_TIMEOUT", 0.5)
    with writer_lock_held_elsewhere(path):
        outcome: list[BaseException | None] = []

        def accept() -> None:
            try:
                store.accept(acceptance("e1"))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        writer = threading.Thread(target=accept, daemon=True)
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "the write waited on for the lock"
        [error] = outcome
        assert isinstance(error, StoreError) and "busy" in str(error)
        assert store.get_event("e1") is None

    # The stuck process is gone: the thread left waiting for the lock takes it for the next
    # write, and gives it back after.
    store.accept(acceptance("e2"))
    assert store.get_event("e2") is not None
    other = SQLiteStore(path)
    other.accept(acceptance("e3"))
    assert store.get_event("e3") is not None


def test_a_writer_that_gave_up_leaves_the_lock_free_when_nobody_wants_it_any_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    monkeypatch.setattr(sqlite_connection, "BUSY_TIMEOUT", 0.3)
    with writer_lock_held_elsewhere(path), pytest.raises(StoreError):
        store.accept(acceptance("e1"))
    # The waiter thread got the lock when the holder died, with no writer waiting any more:
    # it gave it back, so another process is not locked out.
    deadline = time.monotonic() + 5
    probe = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n")  # fmt: skip
    while True:
        taken = subprocess.run([sys.executable, "-c", probe, f"{path}-writer"], check=False)
        if taken.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert taken.returncode == 0


def test_a_fork_waits_until_no_checkpoint_is_inside_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gunicorn's master keeps a checkpointer thread (it opened the store to check it) while it
    # forks workers; a child forked while that thread held a lock inside SQLite would hang.
    inside, finished = threading.Event(), threading.Event()

    class SlowCheckpoint:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str) -> Any:
            if "wal_checkpoint" in sql and not finished.is_set():
                inside.set()
                time.sleep(0.3)  # as if deep in SQLite
                finished.set()
            return self.conn.execute(sql)

        def close(self) -> None:
            self.conn.close()

    def connect(*args: Any, **kwargs: Any) -> Any:
        conn = _CONNECT(*args, **kwargs)
        return SlowCheckpoint(conn) if kwargs.get("timeout") == 1.0 else conn

    monkeypatch.setattr(sqlite_connection, "CHECKPOINT_INTERVAL", 0.01)
    monkeypatch.setattr(sqlite3, "connect", connect)
    store = SQLiteStore(tmp_path / "s.db")
    assert inside.wait(10)

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    finished_before_the_fork = finished.is_set()
    child_exit_code(pid)
    store.close()

    assert finished_before_the_fork


def test_a_waiter_thread_that_could_not_start_does_not_leave_every_later_write_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    monkeypatch.setattr(sqlite_connection, "BUSY_TIMEOUT", 0.5)
    real_start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        if self.name == "sqlite-writer-lock":
            raise RuntimeError("can't start new thread")
        real_start(self)

    with writer_lock_held_elsewhere(path):
        monkeypatch.setattr(threading.Thread, "start", refused)
        with pytest.raises(StoreError, match="no thread to wait with"):
            store.accept(acceptance("e1"))
        monkeypatch.setattr(threading.Thread, "start", real_start)
    # Marked as waiting with no thread, it would refuse every write after the lock was free.
    assert store.accept(acceptance("e2")).duplicate is False


def test_a_lock_freed_within_the_polling_time_is_taken_without_the_waiter_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    store.accept(acceptance("warm"))
    monkeypatch.setattr(hostlock, "POLL_SECONDS", 10.0)  # every wait of this test is "short"
    fd = _hold_host_lock(path)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (store.accept(acceptance("e1")), done.set()))
    writer.start()
    try:
        assert not done.wait(0.3)  # waits for the other holder...
    finally:
        os.close(fd)
    writer.join(10)
    assert done.is_set()
    assert store._host._waiter is None  # ...by trying again, not through the waiter thread
    assert store.get_event("e1") is not None


def test_events_since_reads_a_page_at_a_time_and_only_what_was_accepted_before(
    store: SQLiteStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replay over days of a busy store held them all in memory at once; and an event accepted
    # while the replay ran (it has its own deliveries) was replayed too, so sent twice.
    from engine.store.sqlite import outbox as sqlite_outbox

    monkeypatch.setattr(sqlite_outbox, "REPLAY_PAGE", 3)
    store.accept(acceptance("old", at=T0 - 3600))
    for n in range(7):
        store.accept(acceptance(f"e{n}", decision("ga4" if n == 4 else "meta"), at=T0 + n))
    statements = trace_statements(monkeypatch)
    store.close()  # connections opened from here on are traced
    reopened = SQLiteStore(db_path)

    replayed = reopened.events_since(T0)
    first = next(replayed)
    reopened.accept(acceptance("during", at=T0 + 100))  # while the replay runs
    rest = [event.event_id for event in replayed]
    only_meta = [e.event_id for e in reopened.events_since(T0, destination="meta_dest")]

    assert [first.event_id, *rest] == [f"e{n}" for n in range(7)]
    assert only_meta == ["e0", "e1", "e2", "e3", "e5", "e6", "during"]  # before this call
    pages = [s for s in statements if s.startswith("SELECT * FROM events WHERE seq >")]
    assert len(pages) == 3 + 3  # 7 events, 3 a page: each iteration read three pages
    read = plans(db_path, [s for s in statements if "FROM events" in s])
    assert not [(q, steps) for q, steps in read if "SCAN events" in steps]  # each by an index


def test_free_bytes_is_what_the_files_file_system_leaves_free(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    stat = os.statvfs(tmp_path)
    try:
        free = store.free_bytes()
        assert free is not None
        assert abs(free - stat.f_bavail * stat.f_frsize) < 64 * 2**20  # give or take other writers
        assert SQLiteStore(":memory:").free_bytes() is None  # no file system to ask
    finally:
        store.close()


def test_dropping_expired_dedup_keys_leaves_none_of_their_values_in_the_wal(
    tmp_path: Path,
) -> None:
    # A key's value is stored as written: a tag keyed by an e-mail keeps the address. The
    # six-hourly drop of expired keys left the deleted rows' pages in the WAL, where the
    # erasure and the retention purge reset it.
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    marker = "ada.lovelace.expired.key@example.com"
    store.accept(acceptance("e1", decision(dedup_key=f"meta:{marker}")))

    assert store.purge_expired(T0 + WINDOW + 1) == 2  # the event ID's key and the tag's

    assert marker.encode() not in path.read_bytes()
    wal = Path(f"{path}-wal")
    assert not wal.exists() or marker.encode() not in wal.read_bytes()
