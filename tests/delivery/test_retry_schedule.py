"""Retries over hours and days, and the circuit breaker's clock: the real worker, store and
HTTP, on a clock the test moves.

The worker's ``time`` is replaced by :class:`Clock`, whose wall clock and monotonic clock the
test sets; everything else (the SQLite outbox, the webhook adapter, the loopback sink) is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import engine.delivery
from destinations.testkit.server import LoopbackServer
from destinations.testkit.sink import FaultySink
from engine.breaker import Backoff
from tests.delivery.test_delivery import Harness, make_rules

HOUR = 3600.0
DAY = 24 * HOUR


class Clock:
    """Stands in for the ``time`` module in :mod:`engine.delivery`.

    ``now`` is the wall clock; ``steady`` the monotonic clock. They move together unless a test
    steps the wall clock alone, as NTP or an operator may.
    """

    def __init__(self, now: float) -> None:
        self.now = now
        self.steady = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.steady

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.steady += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(time.time())
    monkeypatch.setattr(engine.delivery, "time", fake)
    return fake


@pytest.fixture
def sink() -> Iterator[tuple[FaultySink, LoopbackServer]]:
    handler = FaultySink()
    with LoopbackServer(handler) as server:
        yield handler, server


def outage_harness(tmp_path: Path, url: str, delivery: str = "") -> Harness:
    """A batching webhook with the default delivery options (plus ``delivery``), and the
    default backoff, with 50 leads queued."""
    options = f", delivery: {{{delivery}}}" if delivery else ""
    rules = make_rules(
        tmp_path,
        f'hook: {{type: webhook, url: "{url}/hook", batch: true{options}}}\n',
        "- {name: to_hook, trigger: all, destination: hook}\n",
    )
    h = Harness(tmp_path, rules)
    h.worker.backoff = Backoff()  # the default, not the other tests' base of 60 s
    h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(50)))
    return h


def run(h: Harness, clock: Clock, until: Callable[[], bool], limit: float) -> float:
    """Let the worker deliver, the clock jumping to whatever is due next, until ``until()`` or
    ``limit`` seconds have passed; returns the seconds that passed."""
    start = clock.now
    while not until() and clock.now - start < limit:
        h.worker.tick(wait=True)
        rows = h.store._read(
            "SELECT MIN(next_attempt_at) AS due FROM deliveries WHERE status = 'pending'"
        )
        due = rows[0]["due"]
        if due is None:
            break
        breaker = h.worker.breaker("hook")
        paused = breaker.open_until - clock.steady if breaker.is_open else 0.0
        clock.advance(max(1.0, due - clock.now, paused))
    return clock.now - start


def counts(h: Harness) -> dict[str, int]:
    found: dict[str, int] = {}
    for status, _, _ in h.statuses():
        found[status] = found.get(status, 0) + 1
    return found


def test_default_retries_outlast_a_six_hour_outage(
    tmp_path: Path, clock: Clock, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    handler, server = sink
    handler.default = "500"
    h = outage_harness(tmp_path, server.url)

    run(h, clock, lambda: False, 6 * HOUR)  # the platform answers 500 for six hours
    during = counts(h)
    requests_during = len(server.requests)
    handler.default = "ok"
    run(h, clock, lambda: counts(h) == {"delivered": 50}, 2 * HOUR)

    assert during == {"pending": 50}  # not one dead letter: max_age (3 days) is far off
    assert handler.ids() == {f"e{i}": 1 for i in range(50)}  # every lead, once
    assert counts(h) == {"delivered": 50}
    # Backed off, not hammering: at most an hour apart once the backoff reaches its cap.
    assert 12 < requests_during < 40


def test_default_retries_end_in_dead_letters_once_max_age_has_passed(
    tmp_path: Path, clock: Clock, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    handler, server = sink
    handler.default = "500"
    h = outage_harness(tmp_path, server.url)

    took = run(h, clock, lambda: counts(h) == {"dead": 50}, 4 * DAY)

    assert counts(h) == {"dead": 50}
    # Not before max_age, and no later than one more wait (an hour at most) after it.
    assert 3 * DAY <= took <= 3 * DAY + HOUR + 5 * 60
    [(_, attempts, error), *_] = h.statuses()
    assert attempts > 60  # retried all along, at most an hour apart
    assert error is not None and "HTTP 500" in error


def test_an_explicit_max_attempts_still_gives_up_after_that_many_attempts(
    tmp_path: Path, clock: Clock, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    handler, server = sink
    handler.default = "500"
    h = outage_harness(tmp_path, server.url, "max_attempts: 12")

    took = run(h, clock, lambda: counts(h) == {"dead": 50}, 4 * DAY)

    assert counts(h) == {"dead": 50}
    assert [attempts for _, attempts, _ in h.statuses()] == [12] * 50
    assert took < HOUR  # 11 waits of backoff: 17 to 34 minutes


def test_a_wall_clock_stepped_back_does_not_keep_a_recovered_destination_paused(
    tmp_path: Path, clock: Clock, sink: tuple[FaultySink, LoopbackServer]
) -> None:
    handler, server = sink
    handler.default = "500"
    rules = make_rules(
        tmp_path,
        f'hook: {{type: webhook, url: "{server.url}/hook", delivery: {{batch_wait: 0}}}}\n',
        "- {name: to_hook, trigger: all, destination: hook}\n",
    )
    h = Harness(tmp_path, rules)
    h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(5)))
    clock.advance(1.0)
    h.worker.tick(wait=True)  # five failed requests: the breaker opens for 10 s
    breaker = h.worker.breaker("hook")
    assert breaker.is_open
    handler.default = "ok"

    clock.now -= HOUR  # NTP (or an operator) steps the wall clock back an hour
    clock.advance(11.0)  # and the cooldown passes
    h.accept({"event_name": "lead", "event_id": "fresh"})
    with h.store._write() as db:  # accepted now, by the stepped clock: due now
        db.execute(
            "UPDATE deliveries SET created_at = ?, next_attempt_at = ? WHERE event_id = 'fresh'",
            (clock.now, clock.now),
        )
    h.worker.tick(wait=True)

    assert handler.ids() == {"fresh": 1}  # the probe went, and the platform took it
    assert not breaker.is_open
