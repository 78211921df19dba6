"""The housekeeping thread: retention every run, expired dedup keys less often."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.maintenance import Maintenance, PurgeIncomplete, run_once
from engine.store.sqlite import SQLiteStore


def run_until(job: Maintenance, done: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Run the housekeeping thread until ``done()`` (or ``seconds``); whether the thread was
    still alive when it was stopped."""
    job.start()
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = job._thread is not None and job._thread.is_alive()
    job.stop()
    return alive


@pytest.fixture
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SQLiteStore, Counter[str]]:
    store = SQLiteStore(tmp_path / "t.db")
    calls: Counter[str] = Counter()
    purge, purge_expired = store.purge, store.purge_expired

    def counted_purge(before: float, now: float | None = None) -> dict[str, int]:
        calls["purge"] += 1
        return purge(before, now)

    def counted_expired(now: float) -> int:
        calls["purge_expired"] += 1
        return purge_expired(now)

    monkeypatch.setattr(store, "purge", counted_purge)
    monkeypatch.setattr(store, "purge_expired", counted_expired)
    return store, calls


def test_expired_keys_are_dropped_at_their_own_slower_pace(
    counted: tuple[SQLiteStore, Counter[str]],
) -> None:
    store, calls = counted
    job = Maintenance(store, retention_days=30, interval=0.02, delay=0.0, key_interval=3600)
    run_until(job, lambda: calls["purge"] >= 4)

    assert calls["purge"] >= 4
    assert calls["purge_expired"] == 1  # the first run, then not before key_interval


def test_a_manual_purge_drops_expired_keys_too(counted: tuple[SQLiteStore, Counter[str]]) -> None:
    store, calls = counted

    removed = run_once(store, retention_days=30)

    assert set(removed) == {
        "dedup_keys",
        "rate_counters",
        "events",
        "deliveries",
        "visitors",
        "visitor_values",
        "links",
    }
    assert calls == {"purge": 1, "purge_expired": 1}


def test_rate_counters_are_dropped_even_when_retention_is_off(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    now = 1_795_185_060.0
    store.rate_hit("old", now - 2 * 3600)
    store.rate_hit("recent", now - 60)

    removed = run_once(store, retention_days=0, now=now)

    assert [r["key"] for r in store._read("SELECT key FROM rate_counters")] == ["recent"]
    assert removed["rate_counters"] == 1


def test_an_unexpected_error_is_logged_without_its_text_and_the_next_run_purges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    purge = store.purge
    calls: list[float] = []

    def failing_once(before: float, now: float | None = None) -> dict[str, int]:
        calls.append(before)
        if len(calls) == 1:  # a bug, or a driver error the store does not wrap
            raise ValueError("no such row: jane@example.com")
        return purge(before, now)

    monkeypatch.setattr(store, "purge", failing_once)
    caplog.set_level(logging.INFO, logger="engine.maintenance")
    job = Maintenance(store, retention_days=30, interval=0.02, delay=0.0)

    alive = run_until(job, lambda: len(calls) >= 3)

    assert alive and len(calls) >= 3  # the thread ran on after the error
    [failed] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed.getMessage() == "housekeeping step failed; retried at the next run"
    assert failed.__dict__["step"] == "retention"
    assert failed.__dict__["error_type"] == "ValueError"
    assert "jane@example.com" not in caplog.text  # nor a traceback quoting it
    assert any(r.getMessage() == "retention purge done" for r in caplog.records)


def test_a_failing_step_does_not_keep_the_others_from_running(
    counted: tuple[SQLiteStore, Counter[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: the key expiry, the first step, fails for good
    store, calls = counted
    now = 1_795_185_060.0
    store.rate_hit("old", now - 2 * 3600)

    def broken(now: float) -> int:
        raise ValueError("no such row: jane@example.com")

    monkeypatch.setattr(store, "purge_expired", broken)
    caplog.set_level(logging.INFO, logger="engine.maintenance")

    # Act
    with pytest.raises(PurgeIncomplete) as raised:
        run_once(store, retention_days=30, now=now)

    # Assert: the rate counters and the personal-data purge ran all the same
    assert raised.value.failed == {"dedup_keys": "ValueError"}
    assert raised.value.removed["rate_counters"] == 1
    assert "events" in raised.value.removed
    assert calls["purge"] == 1
    [failed] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed.__dict__["step"] == "dedup_keys"
    assert failed.__dict__["error_type"] == "ValueError"
    assert "jane@example.com" not in caplog.text
    assert "jane@example.com" not in str(raised.value)


def test_retention_runs_every_time_though_the_key_expiry_always_fails(
    counted: tuple[SQLiteStore, Counter[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    store, calls = counted
    tried: list[float] = []

    def broken(now: float) -> int:
        tried.append(now)
        raise ValueError("a bug in the key expiry")

    monkeypatch.setattr(store, "purge_expired", broken)
    job = Maintenance(store, retention_days=30, interval=0.02, delay=0.0, key_interval=3600)

    # Act
    run_until(job, lambda: calls["purge"] >= 3)

    # Assert: the purge of personal data ran on; the failed step is tried again each run
    assert calls["purge"] >= 3
    assert len(tried) >= 3
