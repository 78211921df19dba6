"""The SQLite store: event-ID dedup, tag dedup keys, atomicity, several processes, restarts."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import gate
from engine.errors import StoreError
from engine.identity import IdentityUpdate
from engine.store import sqlite as sqlite_store
from engine.store.base import Acceptance, Decision
from engine.store.sqlite import SQLiteStore

T0 = 1_795_185_045.0  # 2026-11-20T14:30:45Z
HOUR = 3600.0
WINDOW = 48 * HOUR


def decision(tag: str = "meta", dedup_key: str | None = None, fired: bool = True) -> Decision:
    payload = {"event_name": "Purchase"} if fired else None
    return Decision(tag, tag + "_dest", fired, "trigger matched", None, False, payload, dedup_key)


def acceptance(
    event_id: str, *decisions: Decision, at: float = T0, window: float = WINDOW
) -> Acceptance:
    event = {"event_name": "purchase", "event_id": event_id}
    return Acceptance(event, list(decisions) or [decision()], window, at)


def rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


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


def test_accepted_events_and_dedup_survive_reopening_the_file(db_path: Path) -> None:
    first = SQLiteStore(db_path)
    first.accept(acceptance("o1", decision("meta", "meta:ord_9")))
    first.close()

    reopened = SQLiteStore(db_path)

    assert reopened.accept(acceptance("o1", at=T0 + 10)).duplicate is True
    assert reopened.accept(acceptance("o2", decision("meta", "meta:ord_9"))).fired == []
    assert reopened.depth() == {"meta_dest": 1}


def test_purge_drops_only_expired_keys(store: SQLiteStore) -> None:
    store.accept(acceptance("old", at=T0 - WINDOW - 1))
    store.accept(acceptance("new"))

    purged = store.purge_expired(T0)

    assert purged == 1
    assert store.accept(acceptance("new", at=T0 + 1)).duplicate is True


def test_ping_answers_on_a_working_store(store: SQLiteStore) -> None:
    store.ping()


def test_the_wal_stays_bounded_under_sustained_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The background checkpoint is kept out of the way: the writers alone must rewind the WAL,
    # as they have to when commits never pause long enough for it to catch up.
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_INTERVAL", 3600.0)
    monkeypatch.setattr(sqlite_store, "WAL_CHECKPOINT_PAGES", 100)
    store = SQLiteStore(db_path)
    big = {"event_name": "Purchase", "blob": "x" * 3000}
    for i in range(600):  # ~4 pages per commit: ~2,400 pages of WAL without a rewind
        d = Decision("meta", "meta_dest", True, "trigger matched", None, False, big)
        store.accept(acceptance(f"e{i}", d))

    wal_pages = (db_path.parent / (db_path.name + "-wal")).stat().st_size / 4096
    store.close()
    assert wal_pages < 300
    assert rows(db_path, "SELECT COUNT(*) FROM events") == [(600,)]


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
