"""The intake's counter tally: counts summed in process reach the Prometheus counters."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import Counter

from engine import metrics
from engine.pipeline import Pipeline, load_rules
from engine.store.sqlite import SQLiteStore

RULES = """
destinations:
  sink: {type: log}
triggers:
  all: {event: "*"}
tags:
  - name: log_all
    trigger: all
    destination: sink
"""


def _value(counter: Counter, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


def test_counts_are_added_to_the_counter_on_flush() -> None:
    counter = Counter("tally_test_flush", "test", ["kind"])
    tally = metrics.Tally(interval=3600)
    for _ in range(3):
        tally.add(counter, "a")
    tally.add(counter, "b")
    assert _value(counter, "a") == 0  # held until a flush

    tally.flush()

    assert (_value(counter, "a"), _value(counter, "b")) == (3, 1)
    tally.flush()  # nothing pending: nothing added twice
    assert _value(counter, "a") == 3


def test_add_many_counts_every_pair_once() -> None:
    counter = Counter("tally_test_many", "test", ["kind", "outcome"])
    tally = metrics.Tally(interval=3600)
    tally.add_many([(counter, ("a", "x")), (counter, ("a", "x")), (counter, ("b", "y"))])
    tally.add_many([])

    tally.flush()

    assert (_value(counter, "a", "x"), _value(counter, "b", "y")) == (2, 1)


def test_counts_are_flushed_by_the_timer_without_further_traffic() -> None:
    counter = Counter("tally_test_timer", "test", ["kind"])
    tally = metrics.Tally(interval=0.05)
    tally.add(counter, "a")  # the first count starts the timer
    deadline = time.monotonic() + 5
    while _value(counter, "a") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _value(counter, "a") == 1


def test_a_scrape_shows_events_accepted_just_before_it(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    store = SQLiteStore(tmp_path / "t.db")
    pipeline = Pipeline(store, load_rules(tmp_path / "rules.yaml"))
    before = _value(metrics.EVENTS, "accepted")

    pipeline.accept([{"event_name": "page_view", "event_id": f"tally-{i}"} for i in range(4)])
    body, _ = metrics.render(store.depth)

    assert _value(metrics.EVENTS, "accepted") == before + 4
    assert b"tagrelay_events_total" in body


def test_tag_decisions_are_counted_by_outcome_and_reason(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        """
destinations:
  sink: {type: log}
triggers:
  all: {event: "*"}
  flagged: {event: page_view, when: properties.flagged}
tags:
  - name: log_all
    trigger: all
    destination: sink
  - name: log_flagged
    trigger: flagged
    destination: sink
"""
    )
    store = SQLiteStore(tmp_path / "t.db")
    pipeline = Pipeline(store, load_rules(tmp_path / "rules.yaml"))
    fired = _value(metrics.TAGS, "log_all", "fired", "fired")
    blocked = _value(metrics.TAGS, "log_flagged", "blocked", "trigger")
    accepted = _value(metrics.EVENTS, "accepted")

    pipeline.accept([{"event_name": "page_view", "event_id": f"tags-{i}"} for i in range(3)])
    metrics.TALLY.flush()

    assert _value(metrics.EVENTS, "accepted") == accepted + 3
    assert _value(metrics.TAGS, "log_all", "fired", "fired") == fired + 3
    assert _value(metrics.TAGS, "log_flagged", "blocked", "trigger") == blocked + 3
