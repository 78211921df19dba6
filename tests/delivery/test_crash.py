"""Crash safety: kill -9 every server process mid-load, restart, and nothing accepted is lost."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from destinations.testkit.server import LoopbackServer
from destinations.testkit.sink import FaultySink
from tests.support.server import TagrelayServer

KEY = "sk_crash_test_key_0123456789"


@pytest.fixture
def sink() -> Iterator[tuple[FaultySink, LoopbackServer]]:
    handler = FaultySink("slow", delay=0.05)
    with LoopbackServer(handler) as server:
        yield handler, server


@pytest.mark.slow
def test_kill_9_mid_load_loses_no_accepted_event(
    tmp_path: Path, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    handler, sink_server = sink
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n"
        f"  hook: {{type: webhook, url: '{sink_server.url}/hook', batch: true,\n"
        "         delivery: {timeout: 1, batch_wait: 0.1}}\n"
        "triggers: {all: {event: '*'}}\n"
        "tags: [{name: to_hook, trigger: all, destination: hook}]\n"
    )
    server = TagrelayServer(rules, tmp_path / "data", KEY)
    server.start()
    accepted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        session = requests.Session()
        for i in range(100_000):
            if stop.is_set():
                return
            event_id = f"w{worker}-{i}"
            try:
                r = session.post(
                    server.url + "/v1/track",
                    json={"event_name": "sale", "event_id": event_id},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=5,
                )
            except requests.RequestException:
                return  # the server is gone
            if r.status_code == 200:
                with lock:
                    accepted.add(event_id)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        server.kill()  # SIGKILL to master and both workers, mid-load and mid-delivery
        stop.set()
        for t in threads:
            t.join(10)
        assert len(accepted) > 50
        server.start()
        deadline = time.time() + 60  # leases of killed workers expire after 2*timeout+10 s
        while time.time() < deadline and not accepted <= set(handler.ids()):
            time.sleep(0.25)
    finally:
        stop.set()
        server.stop()

    arrived = handler.ids()
    missing = accepted - set(arrived)
    duplicates = sum(n - 1 for n in arrived.values() if n > 1)
    print(
        f"\ncrash test: {len(accepted)} accepted, {len(missing)} missing, "
        f"{duplicates} duplicates at the sink (at-least-once; event_id lets platforms dedup)"
    )
    assert not missing


@pytest.mark.slow
def test_sigterm_finishes_or_releases_in_flight_batches(tmp_path: Path) -> None:
    handler = FaultySink("slow", delay=0.5)
    with LoopbackServer(handler) as sink_server:
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            "destinations:\n"
            f"  hook: {{type: webhook, url: '{sink_server.url}/hook',\n"
            "         delivery: {timeout: 5, batch_wait: 0}}\n"
            "triggers: {all: {event: '*'}}\n"
            "tags: [{name: to_hook, trigger: all, destination: hook}]\n"
        )
        server = TagrelayServer(rules, tmp_path / "data", KEY)
        server.start()
        try:
            for i in range(10):
                requests.post(
                    server.url + "/v1/track",
                    json={"event_name": "x", "event_id": f"t{i}"},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=5,
                )
            time.sleep(0.3)  # deliveries are in flight at the slow sink
        finally:
            server.stop()

    from engine.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "data" / "tagrelay.db")
    rows = store._read("SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status")
    statuses = {r["status"]: r["n"] for r in rows}
    assert "leased" not in statuses
    assert sum(statuses.values()) == 10


@pytest.mark.slow
def test_kill_9_mid_load_keeps_event_ids_deduplicated(
    tmp_path: Path, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    """Unique and repeated event IDs from several clients (batches of one to three) to both
    workers, then SIGKILL and a restart: an acknowledged event's dedup key was committed with
    it, so every ID is stored once with one delivery, accepted as new at most once, and a
    duplicate when sent again after the restart."""
    _, sink_server = sink
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n"
        f"  hook: {{type: webhook, url: '{sink_server.url}/hook', batch: true}}\n"
        "triggers: {all: {event: '*'}}\n"
        "tags: [{name: to_hook, trigger: all, destination: hook}]\n"
    )
    server = TagrelayServer(rules, tmp_path / "data", KEY, env={"TAGRELAY_RATE_LIMIT": "0"})
    server.start()
    new: Counter[str] = Counter()  # answers with duplicate false, per event ID
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def load(worker: int) -> None:
        session = requests.Session()
        for i in range(100_000):
            if stop.is_set():
                return
            ids = [
                f"rep-{(worker * 7 + i + n) % 40}" if n % 2 else f"w{worker}-{i}-{n}"
                for n in range(i % 3 + 1)
            ]
            try:
                r = session.post(
                    server.url + "/v1/track/batch",
                    json={"events": [{"event_name": "sale", "event_id": e} for e in ids]},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=5,
                )
            except requests.RequestException:
                return  # the server is gone
            if r.status_code == 200:
                with lock:
                    for result in r.json()["results"]:
                        acked.add(result["event_id"])
                        new[result["event_id"]] += not result["duplicate"]

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        server.kill()  # SIGKILL to master and both workers, mid-commit
        stop.set()
        for t in threads:
            t.join(10)
        server.start()
        again = requests.post(
            server.url + "/v1/track/batch",
            json={"events": [{"event_name": "sale", "event_id": e} for e in sorted(acked)[:100]]},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        ).json()["results"]
    finally:
        stop.set()
        server.stop()

    stored = Counter(r["event_id"] for r in server.query("SELECT event_id FROM events"))
    queued = Counter(r["event_id"] for r in server.query("SELECT event_id FROM deliveries"))
    assert len(acked) > 50 and any(n > 0 for e, n in new.items() if e.startswith("rep-"))
    assert all(stored[e] == 1 and queued[e] == 1 for e in acked)
    assert max(stored.values()) == 1 and max(queued.values()) == 1
    assert max(new.values()) == 1
    assert all(r["duplicate"] for r in again)
