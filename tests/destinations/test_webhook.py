"""``webhook``: request bodies kept within ``max_body_bytes``, counted byte for byte."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from destinations.base import Item, PayloadContext, PayloadError, SendContext
from destinations.testkit.server import LoopbackServer, Reply, Request
from destinations.webhook import Webhook
from tests.delivery.test_delivery import Harness, make_rules

URL = "https://hooks.example/in"
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
FRAME = len(b'{"events":[]}')


def payload_of(size: int, char: str = "x") -> dict[str, Any]:
    """A payload whose compact JSON is ``size`` bytes long (UTF-8): its note holds 50 ``char``
    then ASCII padding."""
    base = {"event_id": "e", "note": char * 50}
    room = size - len(json.dumps(base, separators=(",", ":"), ensure_ascii=False).encode())
    assert room >= 0, (size, char)
    return {"event_id": "e", "note": char * 50 + "x" * room}


def encoded(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def items_of(*payloads: dict[str, Any]) -> list[Item]:
    return [Item(str(n), f"e{n}", p) for n, p in enumerate(payloads)]


def context(event: dict[str, Any] | None = None) -> PayloadContext:
    return PayloadContext("to_hook", "lead", "e1", NOW, event or {}, now=NOW)


def bodies(hook: Webhook, items: list[Item]) -> list[bytes]:
    return [hook.build_request(request, SendContext(NOW)).body for request in hook.split(items)]


CHARS = {"ascii": "x", "2-byte": "é", "3-byte": "€", "4-byte": "😀"}


@pytest.mark.parametrize("char", CHARS.values(), ids=list(CHARS))
def test_a_batch_that_fills_the_limit_to_the_byte_goes_in_one_request(char: str) -> None:
    hook = Webhook({"url": URL, "batch": True, "max_body_bytes": 4096})
    # Three payloads, two commas and the frame: exactly 4096 bytes as build_request encodes it.
    payloads = [payload_of(1200, char), payload_of(1200, char), payload_of(4096 - FRAME - 2402)]
    assert sum(map(encoded, payloads)) + 2 + FRAME == 4096

    [body] = bodies(hook, items_of(*payloads))

    assert len(body) == 4096


@pytest.mark.parametrize("char", CHARS.values(), ids=list(CHARS))
def test_one_byte_over_the_limit_starts_another_request(char: str) -> None:
    hook = Webhook({"url": URL, "batch": True, "max_body_bytes": 4095})
    payloads = [payload_of(1200, char), payload_of(1200, char), payload_of(4096 - FRAME - 2402)]

    sent = bodies(hook, items_of(*payloads))

    assert [len(json.loads(body)["events"]) for body in sent] == [2, 1]
    assert all(len(body) <= 4095 for body in sent)


def test_a_large_batch_is_packed_in_order_under_the_limit_each_event_once() -> None:
    hook = Webhook({"url": URL, "batch": True, "max_body_bytes": 50_000})
    notes = ["x" * 200, "é" * 150, "€" * 100, "😀" * 60, "a" * 5000]
    items = [
        Item(str(n), f"e{n}", {"event_id": f"e{n}", "note": notes[n % len(notes)]})
        for n in range(500)
    ]

    sent = bodies(hook, items)

    ids = [p["event_id"] for body in sent for p in json.loads(body)["events"]]
    assert ids == [f"e{n}" for n in range(500)]  # all, once, in order
    assert all(len(body) <= 50_000 for body in sent)
    # Packed: no request could have taken the next one's first event as well.
    for body, after in pairwise(sent):
        assert len(body) + 1 + encoded(json.loads(after)["events"][0]) > 50_000


def test_the_batch_count_limit_still_holds_for_small_events() -> None:
    hook = Webhook({"url": URL, "batch": True})
    items = [Item(str(n), f"e{n}", {"event_id": f"e{n}"}) for n in range(1200)]

    assert [len(r) for r in hook.split(items)] == [500, 500, 200]


def test_the_default_limit_is_under_nginx_s_default_client_max_body_size() -> None:
    hook = Webhook({"url": URL, "batch": True})
    items = [Item(str(n), f"e{n}", payload_of(3000)) for n in range(500)]  # 1.5 MB together

    sent = bodies(hook, items)

    assert len(sent) == 2 and all(len(body) <= 1_000_000 for body in sent)


# Intake takes bodies up to 1,048,576 bytes (engine.config.Settings.max_body_bytes).
INTAKE_SIZED = 1_010_000


def test_without_a_limit_set_a_single_event_goes_whatever_its_size() -> None:
    # Arrange: batch: false, no max_body_bytes; an event intake accepts, over 1,000,000 bytes
    hook = Webhook({"url": URL})

    # Act
    payload = hook.build_payload({"note": "x" * INTAKE_SIZED}, context())
    [body] = bodies(hook, items_of(payload))

    # Assert
    assert len(body) > INTAKE_SIZED


def test_without_a_limit_set_a_batched_event_over_the_default_packing_goes_alone() -> None:
    # Arrange
    hook = Webhook({"url": URL, "batch": True})
    small = payload_of(100)

    # Act
    big = hook.build_payload({"note": "x" * INTAKE_SIZED}, context())
    sent = bodies(hook, items_of(small, big, small))

    # Assert: cut around the big one, which goes alone and is not refused
    assert [len(json.loads(body)["events"]) for body in sent] == [1, 1, 1]
    assert len(sent[1]) > INTAKE_SIZED


def test_a_limit_set_holds_for_single_events_too() -> None:
    hook = Webhook({"url": URL, "max_body_bytes": 1_000_000})

    with pytest.raises(PayloadError, match=r"max_body_bytes \(1000000 B\); this event alone"):
        hook.build_payload({"note": "x" * INTAKE_SIZED}, context())
    with pytest.raises(PayloadError, match="this one is"):
        hook.build_request(items_of({"note": "x" * INTAKE_SIZED}), SendContext(NOW))


@pytest.mark.parametrize("batch", [True, False])
def test_an_event_too_big_to_go_alone_is_refused_when_its_payload_is_built(batch: bool) -> None:
    hook = Webhook({"url": URL, "batch": batch, "max_body_bytes": 2048})
    frame = FRAME if batch else 0
    fits = hook.build_payload({"note": "x" * 1800}, context())
    room = 2048 - frame - len(json.dumps(fits, separators=(",", ":")).encode())

    exact = hook.build_payload({"note": "x" * (1800 + room)}, context())
    with pytest.raises(PayloadError, match=r"max_body_bytes \(2048 B\); this event alone makes"):
        hook.build_payload({"note": "x" * (1801 + room)}, context())

    [body] = bodies(hook, items_of(exact))
    assert len(body) == 2048


def test_an_event_with_text_utf8_cannot_carry_is_refused_when_its_size_is_measured() -> None:
    """With max_body_bytes set the payload is measured, and such text refused at intake;
    without it nothing is measured there, and split sends the item alone, to fail alone.
    (Intake never lets such text in: api.parse_json_body refuses lone surrogates.)"""
    hook = Webhook({"url": URL, "batch": True, "max_body_bytes": 10_000})
    with pytest.raises(PayloadError, match="UTF-8"):
        hook.build_payload({"note": "\ud800"}, context())

    unmeasured = Webhook({"url": URL, "batch": True})
    bad = unmeasured.build_payload({"note": "\ud800"}, context())
    good = payload_of(100)
    requests = unmeasured.split(items_of(good, bad, good))
    assert [[i.delivery_id for i in r] for r in requests] == [["0"], ["1"], ["2"]]


def test_an_event_queued_before_the_limit_was_lowered_goes_alone_and_is_refused() -> None:
    hook = Webhook({"url": URL, "batch": True, "max_body_bytes": 2048})
    small, big = payload_of(100), payload_of(3000)
    items = items_of(small, big, small)

    requests = hook.split(items)

    assert [[i.delivery_id for i in r] for r in requests] == [["0"], ["1"], ["2"]]
    with pytest.raises(PayloadError, match="this one is 3013 B"):
        hook.build_request(requests[1], SendContext(NOW))


def test_the_settings_schema_takes_max_body_bytes_and_refuses_nonsense() -> None:
    validator = jsonschema.Draft202012Validator(Webhook.settings_schema)

    assert validator.is_valid({"url": URL, "batch": True, "max_body_bytes": 102_400})
    assert not validator.is_valid({"url": URL, "max_body_bytes": 10})
    assert not validator.is_valid({"url": URL, "max_body_bytes": "1mb"})


def batched_hook(tmp_path: Path, url: str, max_body_bytes: int) -> Path:
    """Rules sending every event to a batched webhook at ``url`` with that body limit."""
    return make_rules(
        tmp_path,
        f"""
        hook: {{type: webhook, url: "{url}/hook", batch: true,
               max_body_bytes: {max_body_bytes}, delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_hook, trigger: all, destination: hook}\n",
    )


def test_a_receiver_behind_a_body_limit_gets_every_event(tmp_path: Path) -> None:
    got: Counter[str] = Counter()
    largest = 0

    def receiver(request: Request) -> Reply:  # a proxy in front of it refuses larger bodies
        nonlocal largest
        largest = max(largest, len(request.body))
        if len(request.body) > 50_000:
            return Reply.text("<html>413 Request Entity Too Large</html>", 413)
        got.update(e["event_id"] for e in request.json()["events"])
        return Reply.json({"ok": True})

    with LoopbackServer(receiver) as server:
        rules = batched_hook(tmp_path, server.url, max_body_bytes=50000)
        h = Harness(tmp_path, rules)
        h.accept(
            *(
                {"event_name": "lead", "event_id": f"e{i}", "properties": {"note": "x" * 200}}
                for i in range(300)
            )
        )

        h.worker.drain()

    assert got == Counter(f"e{i}" for i in range(300))  # every event, once
    assert {status for status, _, _ in h.statuses()} == {"delivered"}
    assert 1 < len(server.requests) < 300 and largest <= 50_000


def test_an_event_over_the_limit_does_not_fire_and_others_are_sent(tmp_path: Path) -> None:
    got: list[str] = []

    def receiver(request: Request) -> Reply:
        got.extend(e["event_id"] for e in request.json()["events"])
        return Reply.json({"ok": True})

    with LoopbackServer(receiver) as server:
        rules = batched_hook(tmp_path, server.url, max_body_bytes=2000)
        h = Harness(tmp_path, rules)
        outcomes = h.pipeline.accept(
            [
                {"event_name": "lead", "event_id": "big", "properties": {"note": "x" * 3000}},
                {"event_name": "lead", "event_id": "small"},
            ]
        )
        h.worker.drain()

    big, small = (o.accepted for o in outcomes)
    assert big is not None and small is not None  # both events are stored
    assert (big.fired, small.fired) == ([], ["to_hook"])
    [decision] = big.decisions
    assert "max_body_bytes (2000 B)" in str(decision["reason"])
    assert got == ["small"]
    assert h.store.dead_letters() == []  # nothing queued to be refused by the receiver
