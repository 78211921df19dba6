"""Delivery: batching, per-item results, retries, dead letters, replay, isolation, tokens.

Every test sends real HTTP to a loopback sink and uses a real SQLite file.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import socket
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from destinations import registry
from destinations.base import (
    Destination,
    HttpRequest,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    SendContext,
    Token,
    status_result,
)
from destinations.testkit.ga4 import GA4Emulator
from destinations.testkit.meta import MetaEmulator
from destinations.testkit.raw import RawServer, read_request
from destinations.testkit.server import LoopbackServer, Reply, Request
from destinations.testkit.sink import FaultySink
from destinations.testkit.tiktok import TikTokEmulator
from engine import delivery, metrics
from engine.breaker import Backoff, CircuitBreaker
from engine.delivery import DeliveryWorker, _lease_size
from engine.maintenance import run_once
from engine.pipeline import Pipeline, load_rules
from engine.replay import replay_dead_letters, replay_destination
from engine.rules.model import Container
from engine.store.sqlite import SQLiteStore


class PerItem(Destination):
    """A test plugin whose platform answers per item, with an OAuth token."""

    name = "per_item"
    max_batch = 10
    secret_settings = frozenset({"client_secret"})
    settings_schema = {
        "type": "object",
        "properties": {"url": {"type": "string"}, "client_secret": {"type": "string"}},
    }
    default_mapping = {"value": "properties.value"}

    def token_request(self) -> HttpRequest | None:
        secret = str(self.settings["client_secret"])
        return HttpRequest.json_post(f"{self.settings['url']}/token", {"secret": secret})

    def read_token(self, response: HttpResponse) -> Token:
        body = response.json()
        return Token(body["access_token"], float(body["expires_in"]))

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest.json_post(
            f"{self.settings['url']}/items",
            {"items": [dict(i.payload) for i in items]},
            {"Authorization": f"Bearer {ctx.access_token}"},
        )

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        if response.status == 401:
            return [ItemResult(Outcome.AUTH, "token rejected")] * len(items)
        return [
            ItemResult.delivered() if r["ok"] else ItemResult(Outcome.PERMANENT, r["error"])
            for r in response.json()["results"]
        ]


class PerItemPlatform:
    """Rejects items whose value is negative; issues tokens and can revoke them."""

    def __init__(self) -> None:
        self.tokens_issued = 0
        self.secrets: list[str] = []  # the client secret of each token exchange
        self.valid_token = ""
        self.items: list[dict[str, Any]] = []

    def __call__(self, request: Request) -> Reply:
        if request.path == "/token":
            self.secrets.append(request.json()["secret"])
            self.tokens_issued += 1
            self.valid_token = f"tok{self.tokens_issued}"
            return Reply.json({"access_token": self.valid_token, "expires_in": 3600})
        if request.header("Authorization") != f"Bearer {self.valid_token}":
            return Reply.json({"error": "UNAUTHENTICATED"}, 401)
        results = []
        for item in request.json()["items"]:
            ok = item.get("value", 0) >= 0
            if ok:
                self.items.append(item)
            results.append({"ok": ok, "error": None if ok else "value must not be negative"})
        return Reply.json({"results": results})


class OneByOne(Destination):
    """A test plugin that sends every item in a request of its own (as GA4 does per client),
    and checks items before sending: ``"stale"`` is too old, ``"boom"`` trips a plugin bug."""

    name = "one_by_one"
    max_batch = 10
    settings_schema = {"type": "object", "properties": {"url": {"type": "string"}}}
    default_mapping = {"value": "properties.value"}

    def check_item(self, item: Item, ctx: SendContext) -> str | None:
        value = item.payload.get("value")
        if value == "boom":
            raise ValueError("a bug in the plugin")
        if value == "flagged":  # a reason that is no text (a plugin's slip)
            flag: Any = True
            return flag
        return "too old to send" if value == "stale" else None

    def batch_key(self, item: Item) -> str:
        return item.delivery_id

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        events = [{"event_id": i.event_id, **i.payload} for i in items]
        return HttpRequest.json_post(str(self.settings["url"]), {"events": events})


class Splitter(Destination):
    """A test plugin that keeps each ``group`` apart and splits the group ``"odd"`` as its
    ``split`` setting says: ``pairs`` (requests of two, in order) or one way of breaking the
    contract (see :data:`BROKEN_SPLITS`)."""

    name = "splitter"
    max_batch = 10
    settings_schema = {
        "type": "object",
        "properties": {"url": {"type": "string"}, "split": {"type": "string"}},
    }
    default_mapping = {"value": "properties.value", "group": "properties.group"}

    def batch_key(self, item: Item) -> str:
        return str(item.payload.get("group"))

    def split(self, items: Sequence[Item]) -> list[list[Item]]:
        if items[0].payload.get("group") != "odd":
            return super().split(items)
        how = self.settings["split"]
        if how == "pairs":
            return [list(items[i : i + 2]) for i in range(0, len(items), 2)]
        if how == "raise":
            raise ValueError("a bug in the plugin")
        broken: dict[str, Any] = {
            "drop": [list(items[:-1])],
            "twice": [list(items), [items[0]]],
            "empty": [list(items), []],
            "oversized": [[*items, *items, *items, *items]],
            "foreign": [[*items, Item("x", "x", {"value": "x"})]],
            "none": None,
        }
        return broken[how]  # deliberately not always what the contract allows

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        events = [{"event_id": i.event_id, **i.payload} for i in items]
        return HttpRequest.json_post(str(self.settings["url"]), {"events": events})


# How a split can break its contract, and the error its group's dead letters then keep.
INVALID = "permanent: the adapter's split of a batch is invalid:"
BROKEN_SPLITS = {
    "raise": "permanent: ValueError in the adapter's split of a batch",
    "none": "permanent: TypeError in the adapter's split of a batch",
    "drop": f"{INVALID} 1 item(s) left out",
    "twice": f"{INVALID} an item more than once",
    "empty": f"{INVALID} an empty request",
    "oversized": f"{INVALID} a request of more than max_batch (10) items",
    "foreign": f"{INVALID} an item that is not in the batch",
}


class Buggy(Destination):
    """A test plugin with one bug, named by its ``bug`` setting, outside the calls the engine
    guards one by one (see :data:`PLUGIN_BUGS`); ``results_as_generator`` is no bug at all."""

    name = "buggy"
    max_batch = 10
    settings_schema = {
        "type": "object",
        "properties": {"url": {"type": "string"}, "bug": {"type": "string"}},
    }
    default_mapping = {"value": "properties.value"}

    def secrets(self) -> list[str]:
        if self.settings["bug"] == "secrets":
            raise RuntimeError("a bug in the plugin")
        return []

    def token_request(self) -> HttpRequest | None:
        if self.settings["bug"] == "token_request":
            raise KeyError("client_id")
        return None

    def sends_alone(self) -> bool:
        if self.settings["bug"] == "sends_alone":
            raise RuntimeError("a bug in the plugin")
        return False

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        events = [{"event_id": i.event_id, **i.payload} for i in items]
        return HttpRequest.json_post(str(self.settings["url"]), {"events": events})

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        bug = self.settings["bug"]
        if bug == "retry_after_text":  # the header's text where seconds belong
            delay: Any = response.headers.get("Retry-After")
            return [ItemResult(Outcome.RETRYABLE, "throttled", delay)] * len(items)
        if bug == "not_a_result":
            return [None] * len(items)  # type: ignore[list-item]  # the bug under test
        if bug == "error_not_text":  # an unhashable error: it failed later, as a TypeError
            error: Any = {"code": 100}
            return [ItemResult(Outcome.PERMANENT, error)] * len(items)
        if bug == "results_as_generator":
            return (status_result(response) for _ in items)  # type: ignore[return-value]
        return [status_result(response)] * len(items)


class Single(Destination):
    """A test plugin that sends one item per request (``max_batch = 1``, as in the README's
    Slack example): a backlog then takes one batch, and one thread, per item."""

    name = "single"
    max_batch = 1
    settings_schema = {"type": "object", "properties": {"url": {"type": "string"}}}

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest.json_post(str(self.settings["url"]), dict(items[0].payload))


# A plugin bug that broke off a request, and the error its deliveries keep.
PLUGIN_BUGS = {
    "retry_after_text": "adapter returned a result that is no ItemResult",
    "not_a_result": "adapter returned a result that is no ItemResult",
    "error_not_text": "adapter returned a result that is no ItemResult",
    "token_request": "KeyError in the delivery of a request",
    "secrets": "error withheld: RuntimeError in the adapter's redaction",
}


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    known = dict(registry.registry())
    known["per_item"] = registry.check_contract("per_item", PerItem)
    known["one_by_one"] = registry.check_contract("one_by_one", OneByOne)
    known["splitter"] = registry.check_contract("splitter", Splitter)
    known["buggy"] = registry.check_contract("buggy", Buggy)
    known["single"] = registry.check_contract("single", Single)
    monkeypatch.setattr(registry, "registry", lambda: known)


@pytest.fixture
def sink() -> Iterator[tuple[FaultySink, LoopbackServer]]:
    handler = FaultySink(delay=1.5)
    with LoopbackServer(handler) as server:
        yield handler, server


def make_rules(tmp_path: Path, destinations: str, tags: str) -> Path:
    path = tmp_path / "rules.yaml"
    text = "destinations:\n" + textwrap.indent(textwrap.dedent(destinations), "  ")
    text += "triggers:\n  all: {event: '*'}\ntags:\n" + textwrap.indent(textwrap.dedent(tags), "  ")
    path.write_text(text)
    return path


def per_item_rules(tmp_path: Path, url: str) -> Path:
    return make_rules(
        tmp_path,
        f"""
        api: {{type: per_item, url: "{url}", client_secret: s3cret-value,
              delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_api, trigger: all, destination: api}\n",
    )


def webhook_rules(tmp_path: Path, url: str, delivery: str = "") -> Path:
    return make_rules(
        tmp_path,
        f"""
        hook:
          type: webhook
          url: {url}/hook
          batch: true
          delivery: {{timeout: 0.5, max_attempts: 3, batch_wait: 0 {delivery}}}
        """,
        "- {name: to_hook, trigger: all, destination: hook}\n",
    )


class Harness:
    def __init__(self, tmp_path: Path, rules: Path) -> None:
        self.store = SQLiteStore(tmp_path / "store.db")
        self.rules = load_rules(rules, interval=0)
        self.pipeline = Pipeline(self.store, self.rules)
        self.worker = DeliveryWorker(
            self.store, lambda: self.rules.container, backoff=Backoff(base=60)
        )

    @property
    def container(self) -> Container:
        return self.rules.container

    def accept(self, *events: dict[str, Any]) -> None:
        outcomes = self.pipeline.accept(list(events))
        assert all(o.accepted for o in outcomes), [o.error for o in outcomes]

    def accept_sales(self, count: int) -> None:
        """Sales e0, e1, ... of value 0, 1, ..."""
        self.accept(
            *(
                {"event_name": "sale", "event_id": f"e{i}", "properties": {"value": i}}
                for i in range(count)
            )
        )

    def statuses(self) -> list[tuple[str, int, str | None]]:
        rows = self.store._read("SELECT status, attempts, last_error FROM deliveries ORDER BY id")
        return [(r["status"], r["attempts"], r["last_error"]) for r in rows]

    def make_due(self) -> None:
        with self.store._write() as db:
            db.execute("UPDATE deliveries SET next_attempt_at = 0 WHERE status = 'pending'")


def test_accepted_events_reach_the_sink_in_one_batch(tmp_path: Path, sink: Any) -> None:
    handler, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(5)))

    h.worker.drain()

    assert sorted(handler.ids()) == [f"e{i}" for i in range(5)]
    assert len(server.requests) == 1
    assert [s[0] for s in h.statuses()] == ["delivered"] * 5


def test_a_batch_answered_413_is_sent_again_in_halves_until_it_fits(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    handler.max_body = 600  # a receiver's body limit, unknown to the rules (~3 events a body)
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept(*({"event_name": "lead", "event_id": f"e{i:02}"} for i in range(10)))

    h.worker.drain()

    assert handler.ids() == {f"e{i:02}": 1 for i in range(10)}
    assert [s[0] for s in h.statuses()] == ["delivered"] * 10
    # In order, each body within the limit; the larger ones were answered 413.
    bodies = [json.loads(r.body)["events"] for r in server.requests if len(r.body) <= 600]
    assert [e["event_id"] for body in bodies for e in body] == [f"e{i:02}" for i in range(10)]
    assert any(len(r.body) > 600 for r in server.requests)


def test_a_413_with_retry_after_is_a_temporary_refusal_retried_whole(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    handler.script("413-later")
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(3)))

    before = time.time()
    h.worker.drain()

    assert len(server.requests) == 1  # not halved
    statuses = h.statuses()
    assert [s[:2] for s in statuses] == [("pending", 1)] * 3
    assert all(s[2] and s[2].startswith("retryable: HTTP 413") for s in statuses)
    due = h.store.get_delivery(1)
    assert due is not None and due.next_attempt_at >= before + handler.retry_after


def test_an_event_answered_413_alone_is_a_dead_letter_and_the_rest_is_delivered(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    handler.max_body = 600
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    big = {"event_name": "lead", "event_id": "big", "properties": {"note": "x" * 800}}
    h.accept({"event_name": "lead", "event_id": "a"}, big, {"event_name": "lead", "event_id": "b"})

    h.worker.drain()

    assert handler.ids() == {"a": 1, "b": 1}
    [(status, attempts, error)] = [s for s in h.statuses() if s[0] != "delivered"]
    assert (status, attempts) == ("dead", 1)
    assert error is not None and "HTTP 413" in error


def platform_rules(tmp_path: Path, meta: MetaEmulator, tiktok: TikTokEmulator) -> Path:
    return make_rules(
        tmp_path,
        f"""
        meta: {{type: meta_capi, pixel_id: "{meta.pixel_id}", access_token: {meta.access_token},
               endpoint: "{meta.url}", delivery: {{batch_wait: 0}}}}
        tiktok: {{type: tiktok, pixel_code: {tiktok.pixel_code},
                 access_token: {tiktok.access_token}, endpoint: "{tiktok.url}",
                 delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_meta, trigger: all, destination: meta, event_name: Purchase}\n"
        "- {name: to_tiktok, trigger: all, destination: tiktok, event_name: Purchase}\n",
    )


def sale(event_id: str) -> dict[str, Any]:
    return {
        "event_name": "sale",
        "event_id": event_id,
        "user_data": {"email": f"{event_id}@example.com"},
        "properties": {"value": 10.0, "currency": "EUR"},
        "context": {"page_url": "https://shop.example/thanks", "user_agent": "Mozilla/5.0"},
        "consent": {p: "granted" for p in ("ad_storage", "analytics_storage", "ad_user_data",
                                           "ad_personalization")},
    }  # fmt: skip


@pytest.fixture
def platforms() -> Iterator[tuple[MetaEmulator, TikTokEmulator]]:
    with MetaEmulator() as meta, TikTokEmulator() as tiktok:
        yield meta, tiktok


@pytest.mark.parametrize("bad", [["e05"], ["e00"], ["e15"]])
def test_a_batch_refused_whole_for_one_event_delivers_the_others(
    tmp_path: Path, platforms: tuple[MetaEmulator, TikTokEmulator], bad: list[str]
) -> None:
    # Meta and TikTok refuse a whole request for one bad event without naming it: every event
    # of the batch used to become a dead letter.
    meta, tiktok = platforms
    meta.refuse(*bad)
    tiktok.refuse(*bad)
    h = Harness(tmp_path, platform_rules(tmp_path, meta, tiktok))
    h.accept(*(sale(f"e{i:02}") for i in range(16)))

    h.worker.drain()

    good = sorted(f"e{i:02}" for i in range(16) if f"e{i:02}" not in bad)
    for platform in (meta, tiktok):
        assert sorted(e["event_id"] for e in platform.events) == good  # each once
        assert len(platform.server.requests) <= 1 + 2 * 4  # 16 events: four halvings at most
    dead = h.store._read("SELECT event_id, destination, attempts, last_error FROM deliveries "
                         "WHERE status = 'dead' ORDER BY destination")  # fmt: skip
    assert [(r["event_id"], r["destination"], r["attempts"]) for r in dead] == [
        (bad[0], "meta", 1),
        (bad[0], "tiktok", 1),
    ]
    assert "MetaEmulator.refuse" in dead[0]["last_error"]
    assert "TikTokEmulator.refuse" in dead[1]["last_error"]
    assert {s[0] for s in h.statuses()} == {"delivered", "dead"}


def test_a_refusal_of_every_event_costs_three_requests_not_one_per_event(
    tmp_path: Path, platforms: tuple[MetaEmulator, TikTokEmulator]
) -> None:
    meta, tiktok = platforms
    ids = [f"e{i:02}" for i in range(16)]
    meta.refuse(*ids)
    tiktok.refuse(*ids)
    h = Harness(tmp_path, platform_rules(tmp_path, meta, tiktok))
    h.accept(*(sale(event_id) for event_id in ids))

    h.worker.drain()

    assert (len(meta.server.requests), len(tiktok.server.requests)) == (3, 3)
    assert [s[:2] for s in h.statuses()] == [("dead", 1)] * 32


@pytest.mark.parametrize("stop_after", [2, 3])
def test_a_worker_stopping_while_it_isolates_a_refused_event_gives_the_rest_back(
    tmp_path: Path, platforms: tuple[MetaEmulator, TikTokEmulator], stop_after: int
) -> None:
    # SIGTERM arrives once the half holding the bad event was refused (request 2), or once
    # the other half was delivered (request 3): the refused half is no verdict on its events.
    meta, tiktok = platforms
    meta.refuse("e05")
    h = Harness(tmp_path, platform_rules(tmp_path, meta, tiktok))
    h.accept(*(sale(f"e{i:02}") for i in range(16)))
    send = h.worker.transport.send
    sent: list[int] = []

    def stopping(request: Any, timeout: float) -> Any:
        response = send(request, timeout)
        if request.url.startswith(meta.url):
            sent.append(1)
            if len(sent) == stop_after:
                h.worker._stop.set()
        return response

    h.worker.transport.send = stopping  # type: ignore[method-assign]
    h.worker.tick(wait=True)

    rows = h.store._read(
        "SELECT event_id, status, lease_owner FROM deliveries WHERE destination = 'meta'"
    )
    assert len(sent) == stop_after
    assert not [r["event_id"] for r in rows if r["status"] == "dead"]
    assert {r["event_id"] for r in rows if r["status"] == "pending"} >= {
        f"e{i:02}" for i in range(8)
    }
    assert all(r["lease_owner"] is None for r in rows if r["status"] == "pending")


@pytest.mark.parametrize(
    ("fault", "expected_error"),
    [
        ("500", "HTTP 500"),
        ("429", "HTTP 429"),
        ("hang", "timed out"),
        ("reset", "connection failed"),
    ],
)
def test_transient_failures_are_retried_later(
    tmp_path: Path, sink: Any, fault: str, expected_error: str
) -> None:
    handler, server = sink
    handler.script(fault)
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})

    before = time.time()
    h.worker.drain()

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("pending", 1)
    assert error is not None and expected_error in error
    due = h.store.get_delivery(1)
    assert due is not None and due.next_attempt_at >= before + 30  # backoff base 60, jittered
    h.make_due()
    h.worker.drain()
    assert h.statuses()[0][0] == "delivered"
    assert handler.ids()["e1"] == 1


def test_retry_after_is_honoured(tmp_path: Path, sink: Any) -> None:
    handler, server = sink
    handler.retry_after = 7200
    handler.script("429")
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})

    h.worker.drain()

    delivery = h.store.get_delivery(1)
    assert delivery is not None and delivery.next_attempt_at >= time.time() + 7000


def test_a_retry_after_reaching_past_max_age_makes_a_dead_letter_at_once(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    handler.retry_after = 30 * 86400  # a month; the delivery gives up after an hour
    handler.script("429")
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url, ", max_age: 1h"))
    h.accept({"event_name": "lead", "event_id": "e1"})

    h.worker.drain()

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("dead", 1)  # listed and replayable, not pending for a month
    assert error is not None and "HTTP 429" in error and "reaches past max_age" in error
    [dead] = h.store.dead_letters()
    replay_dead_letters(h.store, h.container, [dead.id])
    h.worker.drain()
    assert handler.ids() == {"e1": 1}


def test_a_delivery_out_of_attempts_becomes_a_dead_letter_and_replays(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    handler.script("500", "500", "500")
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})

    for _ in range(3):
        h.make_due()
        h.worker.drain()

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("dead", 3)
    assert error is not None and "HTTP 500" in error and "gave up" in error
    [dead] = h.store.dead_letters()

    report = replay_dead_letters(h.store, h.container, [dead.id])
    h.worker.drain()

    assert report.queued == 1
    assert handler.ids()["e1"] == 1
    assert h.store.dead_letters() == []
    assert [s[0] for s in h.statuses()] == ["delivered"]


def test_a_batch_with_mixed_results_is_split_per_item(tmp_path: Path, plugins: None) -> None:
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        rules = per_item_rules(tmp_path, server.url)
        h = Harness(tmp_path, rules)
        h.accept(
            {"event_name": "sale", "event_id": "good", "properties": {"value": 5}},
            {"event_name": "sale", "event_id": "bad", "properties": {"value": -1}},
        )

        h.worker.drain()

    assert [s[0] for s in h.statuses()] == ["delivered", "dead"]
    assert "value must not be negative" in (h.statuses()[1][2] or "")
    assert [i["value"] for i in platform.items] == [5]


def test_oauth_token_is_cached_and_refreshed_on_401(tmp_path: Path, plugins: None) -> None:
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        rules = per_item_rules(tmp_path, server.url)
        h = Harness(tmp_path, rules)
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        h.worker.drain()
        h.accept({"event_name": "sale", "event_id": "b", "properties": {"value": 1}})
        h.worker.drain()
        assert platform.tokens_issued == 1  # cached between batches

        platform.valid_token = "revoked-elsewhere"
        h.accept({"event_name": "sale", "event_id": "c", "properties": {"value": 1}})
        h.worker.drain()

    assert platform.tokens_issued == 2
    assert [s[0] for s in h.statuses()] == ["delivered"] * 3


def test_a_reload_that_changes_the_credentials_fetches_a_token_for_them(
    tmp_path: Path, plugins: None
) -> None:
    # The token given for the old credentials still works for an hour: used on, it sent the
    # new rules' events as the old client (another account, a revoked refresh token).
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, per_item_rules(tmp_path, server.url))
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        h.worker.drain()
        rotated = per_item_rules(tmp_path, server.url).read_text()
        (tmp_path / "v2").mkdir()
        (tmp_path / "v2" / "rules.yaml").write_text(rotated.replace("s3cret-value", "rotated-1"))
        h.rules = load_rules(tmp_path / "v2" / "rules.yaml", interval=0)
        h.accept({"event_name": "sale", "event_id": "b", "properties": {"value": 1}})
        h.worker.drain()
        h.accept({"event_name": "sale", "event_id": "c", "properties": {"value": 1}})
        h.worker.drain()

    assert platform.secrets == ["s3cret-value", "rotated-1"]  # then cached for the new ones
    assert [s[0] for s in h.statuses()] == ["delivered"] * 3


def test_a_token_exchange_that_differs_each_time_still_uses_the_cached_token(
    tmp_path: Path, plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plugin's exchange may carry the time (a JWT assertion's iat, a nonce): told apart from
    # the one that gave the token, it fetched a token for every batch.
    calls = iter(range(1_000_000))

    def signed_now(self: PerItem) -> HttpRequest:
        body = {"secret": str(self.settings["client_secret"]), "iat": next(calls)}
        return HttpRequest.json_post(f"{self.settings['url']}/token", body)

    monkeypatch.setattr(PerItem, "token_request", signed_now)
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, per_item_rules(tmp_path, server.url))
        for event_id in ("a", "b", "c"):
            h.accept({"event_name": "sale", "event_id": event_id, "properties": {"value": 1}})
            h.worker.drain()

    assert platform.tokens_issued == 1
    assert [s[0] for s in h.statuses()] == ["delivered"] * 3


def test_a_batch_waits_for_another_requests_token_fetch_no_longer_than_one_exchange(
    tmp_path: Path, plugins: None
) -> None:
    # Behind a token endpoint that hangs, batches queue on the destination's token lock and
    # fetch in turn; waiting longer than one exchange, the last ones sent after their leases
    # ran out, when another worker had taken their items over and sent them too.
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        rules = make_rules(
            tmp_path,
            f"""
            api: {{type: per_item, url: "{server.url}", client_secret: s3cret-value,
                  delivery: {{batch_wait: 0, timeout: 0.2}}}}
            """,
            "- {name: to_api, trigger: all, destination: api}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        exchange = h.worker._exchange_seconds(0.2)
        fetching = h.worker._token_locks.setdefault("api", threading.Lock())
        fetching.acquire()  # another batch's fetch, hanging
        try:
            started = time.monotonic()
            batch = threading.Thread(target=h.worker.tick, kwargs={"wait": True}, daemon=True)
            batch.start()
            batch.join(10 * exchange)
            waited = time.monotonic() - started
            assert not batch.is_alive(), "the batch waited on for the token"
        finally:
            fetching.release()
        assert waited >= exchange
        assert platform.items == []  # nothing sent
        assert h.statuses() == [("pending", 0, None)]  # released: due again, no attempt counted

        h.worker.drain()  # the fetch is over: the next batch gets its token and sends

    assert [s[0] for s in h.statuses()] == ["delivered"]


def test_a_refused_token_request_counts_as_a_failure_for_the_circuit_breaker(
    tmp_path: Path, plugins: None
) -> None:
    asked: list[str] = []

    def refuse(request: Request) -> Reply:
        asked.append(request.path)
        return Reply.json({"error": "invalid_grant"}, 401)

    with LoopbackServer(refuse) as server:
        h = Harness(tmp_path, per_item_rules(tmp_path, server.url))
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        breaker = h.worker.breaker("api")
        for _ in range(breaker.threshold + 3):
            h.make_due()
            h.worker.drain()

    assert asked == ["/token"] * breaker.threshold  # then paused, not asked every round
    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("pending", breaker.threshold)
    assert error is not None and error.startswith("auth: token request")


def test_errors_kept_with_dead_letters_never_contain_secrets(tmp_path: Path, plugins: None) -> None:
    def echo_secret(request: Request) -> Reply:
        if request.path == "/token":
            return Reply.json({"access_token": "t", "expires_in": 3600})
        return Reply.text(f"bad request {request.body.decode()}", 400)

    with LoopbackServer(echo_secret) as server:
        rules = per_item_rules(tmp_path, server.url)

        class Echo(PerItem):
            def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
                return HttpRequest.json_post(f"{self.settings['url']}/items", {"s": "s3cret-value"})

            def read_response(
                self, response: HttpResponse, items: Sequence[Item]
            ) -> list[ItemResult]:
                return [ItemResult(Outcome.PERMANENT, response.excerpt())] * len(items)

        h = Harness(tmp_path, rules)
        object.__setattr__(
            h.container.destinations["api"],
            "adapter",
            Echo({"url": server.url, "client_secret": "s3cret-value"}),
        )
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        h.worker.drain()

    [(status, _, error)] = h.statuses()
    assert status == "dead"
    assert error is not None and "s3cret-value" not in error and "[REDACTED]" in error


def test_a_secret_echoed_url_encoded_is_redacted_from_dead_letters(
    tmp_path: Path, plugins: None
) -> None:
    secret = "s3cret/va+lue="

    def echo_encoded(request: Request) -> Reply:
        if request.path == "/token":
            return Reply.json({"access_token": "t", "expires_in": 3600})
        return Reply.text(f"invalid credential in ?key={quote_plus(secret)}", 400)

    class Echo(PerItem):
        def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
            return [ItemResult(Outcome.PERMANENT, response.excerpt())] * len(items)

    with LoopbackServer(echo_encoded) as server:
        h = Harness(tmp_path, per_item_rules(tmp_path, server.url))
        object.__setattr__(
            h.container.destinations["api"],
            "adapter",
            Echo({"url": server.url, "client_secret": secret}),
        )
        h.accept({"event_name": "sale", "event_id": "a", "properties": {"value": 1}})
        h.worker.drain()

    [(status, _, error)] = h.statuses()
    assert status == "dead"
    assert error is not None and quote_plus(secret) not in error and "[REDACTED]" in error


def test_circuit_breaker_pauses_a_failing_destination_then_probes() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    for _ in range(3):
        assert breaker.allow(100.0)
        breaker.record(False, 100.0)

    assert not breaker.allow(105.0)  # open
    assert breaker.allow(111.0)  # one probe after the cooldown
    assert not breaker.allow(111.0)  # only one
    breaker.record(False, 111.0)
    assert not breaker.allow(125.0)  # cooldown doubled to 20 s
    assert breaker.allow(131.5)
    breaker.record(True, 131.5)
    assert breaker.allow(131.6) and not breaker.is_open


@pytest.mark.parametrize(("status", "outcome"), [("401", "auth"), ("500", "retryable")])
def test_failing_requests_pause_the_destination_within_a_batch_too(
    tmp_path: Path, status: str, outcome: str
) -> None:
    # Refused credentials fail every request alike until an operator acts: they pause the
    # destination like a platform that is down, instead of sending every batch of a backlog.
    handler = FaultySink(status)
    with LoopbackServer(handler) as server:
        rules = make_rules(
            tmp_path,
            f'''hook: {{type: webhook, url: "{server.url}/", delivery: {{batch_wait: 0}}}}\n''',
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(12)))

        h.worker.drain()  # one event per request: one batch of twelve requests

    breaker = h.worker.breaker("hook")
    assert len(server.requests) == breaker.threshold  # then paused: no request per batch
    assert breaker.is_open
    statuses = h.statuses()
    refused = [s for s in statuses if s[1] == 1]
    assert len(refused) == breaker.threshold
    assert all(s[0] == "pending" and s[2] and s[2].startswith(f"{outcome}:") for s in refused)
    # The others wait for the pause to end without using up an attempt.
    assert [s[:2] for s in statuses if s[1] == 0] == [("pending", 0)] * 7


TOKEN = "tk_live_9f8e7d6c5b4a39281706f5e4"


def test_a_secret_the_answer_quotes_where_its_excerpt_is_cut_is_not_kept(tmp_path: Path) -> None:
    # The answer is cut to 200 characters before it is redacted; the cut falls in the key.
    def echo(request: Request) -> Reply:
        return Reply.text("x" * 180 + f" key={request.header('X-Api-Key')}", 400)

    with LoopbackServer(echo) as server:
        rules = make_rules(
            tmp_path,
            f"""
            hook:
              type: webhook
              url: {server.url}/hook
              headers: {{X-Api-Key: "{TOKEN}"}}
              delivery: {{batch_wait: 0}}
            """,
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept({"event_name": "lead", "event_id": "e1"})
        h.worker.drain()

    [(status, _, error)] = h.statuses()
    assert status == "dead"
    assert error is not None and TOKEN[:8] not in error and error.endswith("key=[REDACTED]")


def test_a_url_password_the_receiver_quotes_as_it_was_sent_is_not_kept(tmp_path: Path) -> None:
    def echo(request: Request) -> Reply:
        auth = request.header("Authorization") or ""
        decoded = base64.b64decode(auth.split()[1]).decode()
        return Reply.text(f"bad login {decoded} / header {auth}", 401)

    with LoopbackServer(echo) as server:
        url = server.url.replace("http://", "http://alice:p%40ss%2Fw0rd-Secret@")
        rules = make_rules(
            tmp_path,
            f"""
            hook:
              type: webhook
              url: "{url}/hook"
              delivery: {{batch_wait: 0, max_attempts: 1}}
            """,
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept({"event_name": "lead", "event_id": "e1"})
        h.worker.drain()

    [(status, _, error)] = h.statuses()
    assert status == "dead"
    assert error is not None and "bad login alice:[REDACTED]" in error
    assert "w0rd" not in error and "Basic [REDACTED]" in error


@pytest.mark.parametrize("probe", [False, True], ids=["a batch", "the breaker's probe"])
def test_a_batch_the_pool_could_not_start_gives_its_slot_back(
    tmp_path: Path, sink: Any, probe: bool
) -> None:
    # "can't start new thread" once: the destination's slot (and the breaker's probe, if it
    # was one) stayed taken, and the destination never sent again in this process.
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url, ", concurrency: 1"))
    h.accept({"event_name": "lead", "event_id": "e1"})
    worker = h.worker
    if probe:
        breaker = worker.breaker("hook")
        for _ in range(breaker.threshold):
            breaker.record(False, time.monotonic() - 1000)
    submit = worker._pool.submit
    failed: list[bool] = []

    def once_refused(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise RuntimeError("can't start new thread")
        return submit(*args, **kwargs)

    worker._pool.submit = once_refused  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        worker.tick()
    deadline = time.monotonic() + 10
    while h.statuses()[0][0] != "delivered" and time.monotonic() < deadline:
        worker.tick()
        time.sleep(0.05)

    assert h.statuses()[0][0] == "delivered"


def test_a_batch_the_pool_queued_but_could_not_start_a_thread_for_gives_its_slot_back_once(
    tmp_path: Path, sink: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ThreadPoolExecutor queues the work before it starts a thread for it: a refused thread
    # start leaves the batch queued, and a pool thread that frees up runs it later.
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url, ", concurrency: 1"))
    worker = h.worker
    busy = threading.Event()
    worker._pool.submit(busy.wait, 10)  # the pool's one thread, busy with something else
    h.accept({"event_name": "lead", "event_id": "e1"})
    real_start = threading.Thread.start
    refused: list[bool] = []

    def start_once_refused(self: threading.Thread) -> None:
        if not refused:
            refused.append(True)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_refused)
    with pytest.raises(RuntimeError):
        worker.tick()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    busy.set()  # the queued batch runs now, on the freed thread
    deadline = time.monotonic() + 10
    while worker._in_flight["hook"] and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.tick()  # the batch that was given up goes now
    while h.statuses()[0][0] != "delivered" and time.monotonic() < deadline:
        time.sleep(0.05)
        worker.tick()
    time.sleep(0.2)

    assert h.statuses()[0][0] == "delivered"
    assert worker._in_flight["hook"] == 0  # given back once: -1 let concurrency be exceeded


def test_delivery_metrics_count_what_the_store_applied(tmp_path: Path, sink: Any) -> None:
    # A lease lost mid-request: the store keeps the other worker's outcome, and so must the
    # counters (this one's "dead letter" was a false alarm, its "delivered" a double count).
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})
    dest = h.container.destinations["hook"]
    late = h.worker
    [delivery] = h.store.lease("hook", 10, 0.2, late._holder(), time.time())
    time.sleep(0.3)
    DeliveryWorker(h.store, lambda: h.container).drain()  # took it over and delivered it

    def counted(kind: str) -> float:
        value: float = metrics.DELIVERIES.labels("hook", kind)._value.get()
        return value

    before = {kind: counted(kind) for kind in ("dead_lettered", "delivered", "retried")}
    late._finish(dest, [delivery], ItemResult(Outcome.PERMANENT, "HTTP 400"))
    late._finish(dest, [delivery], ItemResult.delivered())
    late._finish(dest, [delivery], ItemResult(Outcome.RETRYABLE, "HTTP 500"))

    assert {kind: counted(kind) for kind in before} == before
    assert h.statuses()[0][0] == "delivered"


def _one_by_one_hook(tmp_path: Path, url: str, delivery: str = "") -> Path:
    return make_rules(
        tmp_path,
        f'''hook: {{type: webhook, url: "{url}/", delivery: {{batch_wait: 0 {delivery}}}}}\n''',
        "- {name: to_hook, trigger: all, destination: hook}\n",
    )


def paused_long_ago(worker: DeliveryWorker, destination: str) -> CircuitBreaker:
    """The destination's breaker, opened a while ago: the next batch is a probe."""
    breaker = worker.breaker(destination)
    for _ in range(breaker.threshold):
        breaker.record(False, time.monotonic() - 1000)
    return breaker


def test_a_probe_is_not_judged_by_one_item_the_platform_always_refuses(tmp_path: Path) -> None:
    # The lowest-ID item fails again (a receiver that refuses one kind of payload): the probe
    # sends the items behind it too, and their success closes the circuit.
    handler = FaultySink()
    handler.script("500")
    with LoopbackServer(handler) as server:
        h = Harness(tmp_path, _one_by_one_hook(tmp_path, server.url))
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(4)))
        breaker = paused_long_ago(h.worker, "hook")

        h.worker.drain()

    assert handler.ids() == {"e1": 1, "e2": 1, "e3": 1}
    assert not breaker.is_open


def test_while_paused_deliveries_past_max_age_still_become_dead_letters(tmp_path: Path) -> None:
    handler = FaultySink("401")
    with LoopbackServer(handler) as server:
        # One slot: the twelve are one batch (two slots would share them, six each).
        rules = _one_by_one_hook(tmp_path, server.url, ", max_age: 1h, concurrency: 1")
        h = Harness(tmp_path, rules)
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(12)))
        with h.store._write() as db:  # queued two hours ago
            db.execute("UPDATE deliveries SET created_at = created_at - 7200")

        h.worker.drain()  # five refused, then paused: what is left is past max_age too

    statuses = h.statuses()
    assert [s[:2] for s in statuses] == [("dead", 1)] * 5 + [("dead", 0)] * 7
    assert all(s[2] and s[2].startswith("paused:") for s in statuses[5:])
    assert len(handler.received) == 0 and len(server.requests) == 5


def test_a_failing_probe_stops_after_the_threshold_and_doubles_the_pause_once(
    tmp_path: Path,
) -> None:
    handler = FaultySink("500")
    with LoopbackServer(handler) as server:
        h = Harness(tmp_path, _one_by_one_hook(tmp_path, server.url))
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(50)))
        breaker = paused_long_ago(h.worker, "hook")

        h.worker.drain()

    assert len(server.requests) == breaker.threshold  # not one request per item of the batch
    assert breaker.current_cooldown == 2 * breaker.cooldown
    assert sum(1 for s in h.statuses() if s[1]) == breaker.threshold


def test_a_slow_destination_does_not_hold_up_another(tmp_path: Path) -> None:
    slow_handler, fast_handler = FaultySink("slow", delay=3.0), FaultySink()
    with LoopbackServer(slow_handler) as slow, LoopbackServer(fast_handler) as fast:
        rules = make_rules(
            tmp_path,
            f"""
            slow: {{type: webhook, url: "{slow.url}/", delivery: {{timeout: 10, batch_wait: 0}}}}
            fast: {{type: webhook, url: "{fast.url}/", delivery: {{batch_wait: 0}}}}
            """,
            "- {name: s, trigger: all, destination: slow}\n"
            "- {name: f, trigger: all, destination: fast}\n",
        )
        h = Harness(tmp_path, rules)
        h.worker.poll_interval = 0.05
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(3)))
        h.worker.start()
        try:
            deadline = time.time() + 2.5  # well under the slow sink's 3 s answer
            while len(fast_handler.ids()) < 3 and time.time() < deadline:
                time.sleep(0.02)
            fast_done = len(fast_handler.ids())
            slow_done = len(slow_handler.ids())
        finally:
            h.worker.stop()

    assert fast_done == 3
    assert slow_done == 0


def test_an_unbatched_destination_shares_its_backlog_among_its_concurrency_slots(
    tmp_path: Path,
) -> None:
    # Without batch: true each request carries one event. One batch leased all forty and sent
    # them request after request, while the other three slots found nothing left to lease.
    slow = FaultySink("slow", delay=1.0)
    with LoopbackServer(slow) as server:
        h = Harness(tmp_path, _one_by_one_hook(tmp_path, server.url, ", concurrency: 4"))
        h.worker.poll_interval = 0.02
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(40)))
        h.worker.start()
        try:
            deadline = time.time() + 0.8  # under the sink's 1 s answer
            while len(server.requests) < 4 and time.time() < deadline:
                time.sleep(0.01)
            in_flight = len(server.requests)
        finally:
            h.worker.stop()  # each batch stops after its request and gives the rest back

    assert in_flight == 4
    assert Counter(s[0] for s in h.statuses()) == {"delivered": 4, "pending": 36}


def test_batches_sharing_a_backlog_send_each_event_once(tmp_path: Path, sink: Any) -> None:
    handler, server = sink
    h = Harness(tmp_path, _one_by_one_hook(tmp_path, server.url, ", concurrency: 4"))
    h.worker.poll_interval = 0.02
    h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(100)))
    h.worker.start()
    try:
        deadline = time.time() + 20
        while len(handler.ids()) < 100 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        h.worker.stop()

    assert handler.ids() == {f"e{i}": 1 for i in range(100)}
    assert [s[0] for s in h.statuses()] == ["delivered"] * 100


def test_a_batching_destination_starts_no_batch_of_what_has_not_waited_batch_wait(
    tmp_path: Path,
) -> None:
    # 501 due: one full batch of 500 goes; the one left over has not waited batch_wait, and
    # a second batch started in the same pass sent it alone instead of letting it fill up.
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        rules = make_rules(
            tmp_path,
            f'hook: {{type: webhook, url: "{server.url}/", batch: true, '
            "delivery: {batch_wait: 1h}}\n",
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept(*({"event_name": "lead", "event_id": f"e{i}"} for i in range(501)))
        try:
            started = h.worker.tick()
        finally:
            h.worker.stop()

    assert started == 1 and len(server.requests) == 1
    assert Counter(s[0] for s in h.statuses()) == {"delivered": 500, "pending": 1}


def test_a_slow_destination_using_all_its_concurrency_holds_up_no_other(
    tmp_path: Path, plugins: None
) -> None:
    slow_handler, fast_handler = FaultySink("slow", delay=2.0), FaultySink()
    with LoopbackServer(slow_handler) as slow, LoopbackServer(fast_handler) as fast:
        rules = tmp_path / "rules.yaml"
        rules.write_text(
            textwrap.dedent(f"""
            destinations:
              slow: {{type: single, url: "{slow.url}/",
                      delivery: {{timeout: 5, batch_wait: 0, concurrency: 16}}}}
              fast: {{type: webhook, url: "{fast.url}/", delivery: {{batch_wait: 0}}}}
            triggers: {{lead: {{event: lead}}, sale: {{event: sale}}}}
            tags:
              - {{name: s, trigger: lead, destination: slow}}
              - {{name: f, trigger: sale, destination: fast}}
            """)
        )
        h = Harness(tmp_path, rules)
        h.worker.poll_interval = 0.02
        h.accept(*({"event_name": "lead", "event_id": f"l{i}"} for i in range(40)))
        h.worker.start()
        try:
            deadline = time.time() + 1.5  # the slow batches start one per tick
            while len(slow.requests) < 16 and time.time() < deadline:
                time.sleep(0.01)
            in_flight = len(slow.requests)
            h.accept({"event_name": "sale", "event_id": "s1"})
            started = time.time()
            while not fast_handler.ids() and time.time() < started + 5:
                time.sleep(0.01)
            waited = time.time() - started
        finally:
            h.worker.stop()

    assert in_flight == 16
    assert fast_handler.ids() == {"s1": 1}
    assert waited < 1.0  # not until a slow request (2 s) gives a thread back


def test_an_expired_lease_is_taken_over(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})
    now = time.time()
    assert len(h.store.lease("hook", 10, 1.0, "dead-worker", now)) == 1  # then the worker dies
    assert h.store.lease("hook", 10, 1.0, "other", now) == []  # still leased

    assert len(h.store.lease("hook", 10, 1.0, "other", now + 2)) == 1


def test_replay_of_a_destination_uses_the_current_mapping(tmp_path: Path, sink: Any) -> None:
    handler, server = sink
    rules = webhook_rules(tmp_path, server.url)
    h = Harness(tmp_path, rules)
    h.accept({"event_name": "lead", "event_id": "e1", "properties": {"value": 3}})
    h.worker.drain()
    rules.write_text(
        rules.read_text().replace(
            "destination: hook}", "destination: hook, mapping: {fixed: properties.value}}"
        )
    )
    h.rules.maybe_reload()

    report = replay_destination(h.store, h.container, "hook", since=_an_hour_ago())
    h.worker.drain()

    assert report.queued == 1
    assert [p.get("fixed") for p in handler.received] == [None, 3]


def test_replay_of_a_destination_lists_only_events_it_sent_before_and_would_not_now(
    tmp_path: Path, sink: Any
) -> None:
    # A tag that fires on a few events of many: the events it never fired for are no news,
    # and listing each of them held a line per event read in memory (and printed it).
    _, server = sink
    rules = make_rules(
        tmp_path,
        f"""
        hook: {{type: webhook, url: {server.url}/hook, delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_hook, trigger: sales, destination: hook, consent: [ad_storage]}\n",
    )
    rules.write_text(rules.read_text().replace("all: {event: '*'}", "sales: {event: sale}"))
    h = Harness(tmp_path, rules)
    granted = {"ad_storage": "granted"}
    h.accept(
        *({"event_name": "page_view", "event_id": f"v{i}"} for i in range(50)),
        {"event_name": "sale", "event_id": "s1", "consent": granted},
        {"event_name": "sale", "event_id": "s2", "consent": {"ad_storage": "denied"}},
    )
    h.worker.drain()
    with h.store._write() as db:  # s1's consent withdrawn since it was sent
        db.execute(
            "UPDATE events SET body = json_set(body, '$.consent.ad_storage', 'denied') "
            "WHERE event_id = 's1'"
        )
    h.accept({"event_name": "sale", "event_id": "s3", "consent": granted})

    report = replay_destination(h.store, h.container, "hook", since=_an_hour_ago())

    assert report.queued == 1  # s3
    assert [line.split(":")[0] for line in report.skipped] == ["s1 to_hook"]


def test_replay_of_a_destination_does_not_list_copies_whose_dedup_key_held_them_back_then(
    tmp_path: Path, sink: Any
) -> None:
    # The backend's copy of an order the browser's copy forwarded first was never sent; at the
    # replay its key still holds it back, which is no news either (one line per such copy).
    _, server = sink
    rules = make_rules(
        tmp_path,
        f"hook: {{type: webhook, url: {server.url}/hook, delivery: {{batch_wait: 0}}}}\n",
        "- {name: to_hook, trigger: all, destination: hook, dedup_key: properties.order_id}\n",
    )
    h = Harness(tmp_path, rules)
    h.accept(
        {"event_name": "sale", "event_id": "page", "properties": {"order_id": "o1"}},
        {"event_name": "sale", "event_id": "backend", "properties": {"order_id": "o1"}},
    )
    h.worker.drain()

    report = replay_destination(h.store, h.container, "hook", since=_an_hour_ago())

    assert report.queued == 1  # the copy that held the key
    assert report.skipped == []


def test_replay_of_a_destination_replaces_what_still_waits_instead_of_sending_it_twice(
    tmp_path: Path, sink: Any
) -> None:
    # A mapping fixed during an outage and replayed: the deliveries still waiting for their
    # retry carry the old payload, and were sent as well as the replay's.
    handler, server = sink
    rules = webhook_rules(tmp_path, server.url)
    h = Harness(tmp_path, rules)
    handler.script("500")
    h.accept({"event_name": "lead", "event_id": "e1", "properties": {"value": 3}})
    h.worker.drain()
    assert [s for s, _, _ in h.statuses()] == ["pending"]
    rules.write_text(
        rules.read_text().replace(
            "destination: hook}", "destination: hook, mapping: {fixed: properties.value}}"
        )
    )
    h.rules.maybe_reload()

    report = replay_destination(h.store, h.container, "hook", since=_an_hour_ago())
    h.make_due()
    h.worker.drain()

    assert report.queued == 1
    assert [p.get("fixed") for p in handler.received] == [3]
    assert [s for s, _, _ in h.statuses()] == ["delivered"]


def test_replay_of_a_destination_replaces_a_dead_letter_of_the_event_instead_of_sending_it_twice(
    tmp_path: Path, sink: Any
) -> None:
    # A mapping the platform refused, fixed and replayed: the dead letters it left stayed in
    # the list as if never sent, and `deadletters replay --all` then sent each event again.
    handler, server = sink
    rules = webhook_rules(tmp_path, server.url)
    h = Harness(tmp_path, rules)
    handler.script("500", "500", "500")
    h.accept({"event_name": "lead", "event_id": "e1", "properties": {"value": 3}})
    for _ in range(3):
        h.make_due()
        h.worker.drain()
    assert [s for s, _, _ in h.statuses()] == ["dead"]
    rules.write_text(
        rules.read_text().replace(
            "destination: hook}", "destination: hook, mapping: {fixed: properties.value}}"
        )
    )
    h.rules.maybe_reload()

    report = replay_destination(h.store, h.container, "hook", since=_an_hour_ago())
    h.worker.drain()
    later = replay_dead_letters(h.store, h.container, [d.id for d in h.store.dead_letters()])
    h.worker.drain()

    assert (report.queued, later.queued) == (1, 0)
    assert [p.get("fixed") for p in handler.received] == [3]
    assert [s for s, _, _ in h.statuses()] == ["delivered"]


def test_metrics_count_deliveries(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    before = metrics.DELIVERIES.labels("hook", "delivered")._value.get()
    h.accept({"event_name": "lead", "event_id": "m1"})
    h.worker.drain()

    body, _ = metrics.render(h.store.depth)
    each, _ = metrics.render(metrics.depth_of_each(h.store.depth, lambda: ["hook", "idle"]))

    assert metrics.DELIVERIES.labels("hook", "delivered")._value.get() == before + 1
    assert b"tagrelay_outbox_depth" in body
    # Each configured destination has its series, 0 with nothing waiting.
    assert b'tagrelay_outbox_depth{destination="hook"} 0.0' in each
    assert b'tagrelay_outbox_depth{destination="idle"} 0.0' in each
    assert b"tagrelay_delivery_latency_seconds_bucket" in body


def _an_hour_ago() -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(hours=1)


def test_worker_thread_stops_cleanly(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.worker.start()
    h.worker.stop(timeout=5)
    assert not any(t.name == "delivery" and t.is_alive() for t in threading.enumerate())


def test_a_stopping_worker_beats_while_it_waits_for_a_request_in_flight(tmp_path: Path) -> None:
    # gunicorn's master kills a worker silent for 30 s; a worker restarted by SIGHUP waits in
    # stop() for its delivery request, which can take longer, and was killed with its lease held.
    answered = threading.Event()

    def slow_platform(request: Request) -> Reply:
        time.sleep(2.5)
        answered.set()
        return Reply.json({"ok": True})

    beats: list[float] = []
    with LoopbackServer(slow_platform) as server:
        rules = make_rules(
            tmp_path,
            f"hook: {{type: webhook, url: {server.url}/hook, delivery: {{timeout: 10}}}}\n",
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept_sales(1)
        h.worker.start()
        deadline = time.monotonic() + 10
        while not server.requests and time.monotonic() < deadline:  # the request in flight
            time.sleep(0.02)

        h.worker.stop(heartbeat=lambda: beats.append(time.monotonic()))

    assert answered.is_set()
    assert [status for status, _, _ in h.statuses()] == ["delivered"]
    assert len(beats) >= 2  # about one a second while the request was out
    assert max(b - a for a, b in itertools.pairwise(beats)) < 1.5


def test_a_gunicorn_worker_stops_delivery_beating_before_its_heartbeat_file_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gunicorn closes a worker's heartbeat file before its worker_exit hook runs: a notify()
    # from there raised, and the hook's count flush after it never ran. The worker's run()
    # stops delivery as it leaves gthread's loop, with the file still open.
    from flask import Flask
    from gunicorn.workers.gthread import ThreadWorker

    from engine.server import _Worker

    class Delivery:
        heartbeat: Any = "not stopped"

        def stop(self, heartbeat: Any = None) -> None:
            self.heartbeat = heartbeat

    events: list[str] = []
    monkeypatch.setattr(ThreadWorker, "run", lambda self: events.append("loop ended"))
    worker = object.__new__(_Worker)
    worker.wsgi = Flask("app")
    worker.wsgi.extensions["tagrelay.delivery"] = delivery = Delivery()
    worker.notify = lambda: events.append("beat")  # type: ignore[method-assign]

    worker.run()

    assert events == ["loop ended"]
    assert delivery.heartbeat is worker.notify


def test_stopping_a_stopped_worker_returns_at_once(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.worker.start()
    h.worker.stop(timeout=5)

    h.worker.stop(heartbeat=lambda: pytest.fail("a second stop waits for nothing"))


def one_by_one_rules(tmp_path: Path, url: str) -> Path:
    return make_rules(
        tmp_path,
        f"""
        api: {{type: one_by_one, url: "{url}/items", delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_api, trigger: all, destination: api}\n",
    )


def test_a_batch_sent_request_by_request_sends_nothing_another_worker_took_over(
    tmp_path: Path, plugins: None
) -> None:
    sent: list[Any] = []
    store_box: list[SQLiteStore] = []

    def platform(request: Request) -> Reply:
        sent.append(request.json()["events"][0]["value"])
        if len(sent) == 1:  # the first request outlasts the lease; another worker takes the rest
            with store_box[0]._write() as db:
                db.execute(
                    "UPDATE deliveries SET lease_owner = 'other', lease_expires = ? WHERE id > 1",
                    (time.time() + 3600,),
                )
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        store_box.append(h.store)
        h.accept_sales(3)
        h.worker.tick(wait=True)

    assert sent == [0]  # the two taken over are the other worker's to send
    owners = h.store._read("SELECT status, lease_owner FROM deliveries ORDER BY id")
    assert [(r["status"], r["lease_owner"]) for r in owners] == [
        ("delivered", None),
        ("leased", "other"),
        ("leased", "other"),
    ]


def test_a_batch_of_the_same_worker_that_took_over_the_rest_of_a_batch_sends_it_alone(
    tmp_path: Path, plugins: None
) -> None:
    sent: list[Any] = []
    box: list[Harness] = []
    second_batch: list[threading.Thread] = []
    second_started = threading.Event()

    def platform(request: Request) -> Reply:
        value = request.json()["events"][0]["value"]
        sent.append(value)
        h = box[0]
        if len(sent) == 1:
            # The first request outlasts the lease of the rest of its batch, and this worker's
            # next batch (another thread) leases that rest while this one is still in flight.
            with h.store._write() as db:
                db.execute("UPDATE deliveries SET lease_expires = 0 WHERE id > 1")
            dest = h.container.destinations["api"]
            second_batch.append(threading.Thread(target=h.worker._deliver, args=(dest,)))
            second_batch[0].start()
            second_started.wait(5)
        elif not second_started.is_set():
            second_started.set()  # the second batch's first request: kept in flight a while
            time.sleep(1.0)
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        box.append(h)
        h.accept_sales(3)
        h.worker.tick(wait=True)
        second_batch[0].join(10)

    assert sorted(sent) == [0, 1, 2]  # each once: the first batch left the rest to the second
    assert [s[0] for s in h.statuses()] == ["delivered"] * 3


def test_a_plugin_error_checking_one_item_fails_that_item_alone(
    tmp_path: Path, plugins: None
) -> None:
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        h.accept(
            {"event_name": "sale", "event_id": "bug", "properties": {"value": "boom"}},
            {"event_name": "sale", "event_id": "fine", "properties": {"value": 1}},
        )
        h.worker.drain()

    [(bug, _, error), (fine, _, _)] = h.statuses()
    assert (bug, fine) == ("dead", "delivered")
    assert error is not None and "ValueError" in error
    assert sink.ids() == {"fine": 1}


def test_a_check_item_reason_that_is_no_text_is_kept_as_its_text(
    tmp_path: Path, plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plugin with secrets had it taken for a bug of its redaction: "(error withheld: ...)".
    monkeypatch.setattr(OneByOne, "secrets", lambda self: ["a-secret-value-0123"])
    with LoopbackServer(FaultySink()) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        h.accept({"event_name": "sale", "event_id": "f", "properties": {"value": "flagged"}})
        h.worker.drain()

    [(status, _, error)] = h.statuses()
    assert (status, error) == ("dead", "permanent: True")


def test_a_probe_that_sends_nothing_lets_the_next_probe_through(
    tmp_path: Path, plugins: None
) -> None:
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        breaker = h.worker.breaker("api")
        for _ in range(breaker.threshold):
            breaker.record(False, time.monotonic() - 60)  # open, its cooldown over
        h.accept({"event_name": "sale", "event_id": "old", "properties": {"value": "stale"}})

        h.worker.tick(wait=True)  # the probe: its only item is too old, so no request is made
        h.accept({"event_name": "sale", "event_id": "new", "properties": {"value": 1}})
        h.worker.drain()

    assert sink.ids() == {"new": 1}
    assert not breaker.is_open


def test_a_destination_with_no_room_does_not_take_the_probe(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    breaker = h.worker.breaker("hook")
    for _ in range(breaker.threshold):
        breaker.record(False, time.monotonic() - 60)
    h.accept({"event_name": "lead", "event_id": "e1"})
    h.worker._in_flight["hook"] = h.container.destinations["hook"].delivery.concurrency

    assert h.worker.tick() == 0
    assert not breaker.probing  # still free for the first batch that has room


def test_deliveries_of_a_destination_missing_from_the_rules_wait_without_using_attempts(
    tmp_path: Path, sink: Any
) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "e1"})
    (tmp_path / "other").mkdir()
    elsewhere = load_rules(webhook_rules(tmp_path / "other", server.url), interval=0).container
    del elsewhere.destinations["hook"]  # as if the destination had been taken out of the rules
    parked = DeliveryWorker(h.store, lambda: elsewhere)

    for _ in range(5):
        h.make_due()
        parked.tick(wait=True)

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("pending", 0)
    assert error is not None and "not in the current rules" in error


def test_deliveries_to_a_removed_destination_become_dead_letters_after_the_default_max_age(
    tmp_path: Path, sink: Any
) -> None:
    handler, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept({"event_name": "lead", "event_id": "old"}, {"event_name": "lead", "event_id": "new"})
    three_days = 3 * 86400.0
    with h.store._write() as db:  # "old" was accepted just over three days ago
        db.execute(
            "UPDATE deliveries SET created_at = created_at - ? WHERE event_id = 'old'",
            (three_days + 1,),
        )
        db.execute(
            "UPDATE events SET received_at = received_at - ? WHERE event_id = 'old'",
            (three_days + 1,),
        )
    (tmp_path / "other").mkdir()
    elsewhere = load_rules(webhook_rules(tmp_path / "other", server.url), interval=0).container
    del elsewhere.destinations["hook"]  # as if the destination had been taken out of the rules

    DeliveryWorker(h.store, lambda: elsewhere).tick(wait=True)

    [dead] = h.store.dead_letters()
    assert (dead.event_id, dead.attempts) == ("old", 0)  # nothing was attempted
    assert dead.last_error is not None
    assert "destination hook is no longer in the rules" in dead.last_error
    [waiting] = [d for d in (h.store.get_delivery(i) for i in (1, 2)) if d and d.event_id == "new"]
    assert (waiting.status.value, waiting.attempts) == ("pending", 0)
    # Put back within the three days, the destination gets what waited; the dead letter replays.
    report = replay_dead_letters(h.store, h.container, [dead.id])
    h.make_due()
    h.worker.drain()
    assert report.queued == 1
    assert handler.ids() == {"old": 1, "new": 1}


def test_a_removed_destination_keeps_no_event_past_retention(tmp_path: Path, sink: Any) -> None:
    _, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    long_ago = datetime.now(UTC) - timedelta(days=400)
    outcomes = h.pipeline.accept([{"event_name": "lead", "event_id": "e1"}], now=long_ago)
    assert outcomes[0].accepted is not None
    (tmp_path / "other").mkdir()
    elsewhere = load_rules(webhook_rules(tmp_path / "other", server.url), interval=0).container
    del elsewhere.destinations["hook"]

    DeliveryWorker(h.store, lambda: elsewhere).tick(wait=True)
    run_once(h.store, retention_days=395)

    assert h.store.get_event("e1") is None
    assert h.statuses() == []


def _store_bytes(store: SQLiteStore) -> bytes:
    path = Path(store.path)
    return b"".join(
        p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
    )


def test_forget_leaves_no_quote_of_the_person_in_a_batch_mates_dead_letter(
    tmp_path: Path,
) -> None:
    def quoting(request: Request) -> Reply:  # a receiver that refuses a batch and quotes it
        return Reply.json({"refused": request.json()}, 400)

    with LoopbackServer(quoting) as server:
        h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
        h.accept(
            {"event_name": "lead", "event_id": "a1", "user_id": "user_ada_4711"},
            {"event_name": "lead", "event_id": "b1", "user_id": "user_bob_0815"},
        )
        h.worker.drain()
    [(_, _, error)] = h.statuses()[1:]
    assert error is not None and "user_ada_4711" in error  # Bob's dead letter quotes Ada

    removed = h.store.forget(user_id="user_ada_4711")

    assert removed["events"] == 1
    assert [(status, attempts) for status, attempts, _ in h.statuses()] == [("dead", 1)]
    assert b"user_ada_4711" not in _store_bytes(h.store)
    # Bob's dead letter stays, with what kind of failure it was.
    [(_, _, error)] = h.statuses()
    assert error is not None and error.startswith("permanent: ")


@pytest.mark.parametrize("status", [400, 500])
def test_forget_while_a_batch_is_in_flight_leaves_no_quote_of_the_person_in_its_errors(
    tmp_path: Path, status: int
) -> None:
    harness: list[Harness] = []

    def quoting(request: Request) -> Reply:
        harness[0].store.forget(user_id="user_ada_4711")  # while the request is in flight
        return Reply.json({"refused": request.json()}, status)

    with LoopbackServer(quoting) as server:
        h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
        harness.append(h)
        h.accept(
            {"event_name": "lead", "event_id": "a1", "user_id": "user_ada_4711"},
            {"event_name": "lead", "event_id": "b1", "user_id": "user_bob_0815"},
        )
        h.worker.tick(wait=True)

    [(state, attempts, error)] = h.statuses()  # Bob's, a dead letter or to be retried
    assert (state, attempts) == ("dead" if status == 400 else "pending", 1)
    assert error is not None and error.startswith(("permanent: ", "retryable: "))
    assert b"user_ada_4711" not in _store_bytes(h.store)


def test_forget_leaves_no_quote_of_the_person_in_an_answer_recorded_during_its_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The errors that quote the person were read with the search, outside the write lock:
    # a batch answered while it ran (seconds on a large store) kept Ada's user ID in Bob's
    # dead letter after she was forgotten.
    def quoting(request: Request) -> Reply:
        return Reply.json({"refused": request.json()}, 400)

    with LoopbackServer(quoting) as server:
        h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
        h.accept(
            {"event_name": "lead", "event_id": "a1", "user_id": "user_ada_4711"},
            {"event_name": "lead", "event_id": "b1", "user_id": "user_bob_0815"},
        )
        snapshot = h.store._snapshot

        def search_then_answer(run: Any) -> Any:
            found = snapshot(run)
            h.worker.drain()  # the batch is answered after the search read the outbox
            return found

        monkeypatch.setattr(h.store, "_snapshot", search_then_answer)
        removed = h.store.forget(user_id="user_ada_4711")

    assert removed["errors"] == 1
    [(state, _, error)] = h.statuses()
    assert state == "dead" and error is not None and error.startswith("permanent: ")
    assert b"user_ada_4711" not in _store_bytes(h.store)


def test_forget_leaves_no_quote_of_the_person_in_a_batch_mate_given_up_on(
    tmp_path: Path,
) -> None:
    # A batch-mate at its last attempt keeps the answer with "(gave up after retries)"
    # appended, the person's delivery the answer alone: not "the very error", it was left.
    def naming(request: Request) -> Reply:  # a receiver that names the users it failed
        return Reply.json({"failed": [e["user_id"] for e in request.json()["events"]]}, 500)

    with LoopbackServer(naming) as server:
        h = Harness(tmp_path, webhook_rules(tmp_path, server.url))  # max_attempts: 3
        h.accept({"event_name": "lead", "event_id": "b1", "user_id": "user_bob_0815"})
        with h.store._write() as db:  # Bob's delivery was tried twice before
            db.execute("UPDATE deliveries SET attempts = 2")
        h.accept({"event_name": "lead", "event_id": "a1", "user_id": "user_ada_4711"})
        h.worker.drain()
    [(state, _, error), _] = h.statuses()
    assert state == "dead" and error is not None and "user_ada_4711" in error

    removed = h.store.forget(user_id="user_ada_4711")

    assert removed["errors"] == 1
    [(state, _, error)] = h.statuses()
    assert state == "dead" and error is not None and error.startswith("retryable: ")
    assert b"user_ada_4711" not in _store_bytes(h.store)


def test_a_stopping_worker_sends_nothing_more_and_gives_back_what_it_did_not_send(
    tmp_path: Path, plugins: None
) -> None:
    sent: list[Any] = []
    worker_box: list[DeliveryWorker] = []

    def platform(request: Request) -> Reply:
        sent.append(request.json()["events"][0]["value"])
        worker_box[0]._stop.set()  # SIGTERM arrives while the first request is in flight
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        worker_box.append(h.worker)
        h.accept_sales(3)
        h.worker.tick(wait=True)

    assert sent == [0]
    rows = h.store._read("SELECT status, lease_owner FROM deliveries ORDER BY id")
    assert [(r["status"], r["lease_owner"]) for r in rows] == [
        ("delivered", None),
        ("pending", None),  # released at once, for the next worker to send
        ("pending", None),
    ]


def splitter_rules(tmp_path: Path, url: str, split: str) -> Path:
    return make_rules(
        tmp_path,
        f"""
        api: {{type: splitter, url: "{url}/items", split: {split}, delivery: {{batch_wait: 0}}}}
        """,
        "- {name: to_api, trigger: all, destination: api}\n",
    )


def grouped_sales(*groups: str) -> list[dict[str, Any]]:
    """Sales e0, e1, ... of value 0, 1, ..., each in the group given for it."""
    return [
        {"event_name": "sale", "event_id": f"e{i}", "properties": {"value": i, "group": group}}
        for i, group in enumerate(groups)
    ]


def test_the_default_split_cuts_a_batch_by_max_batch_in_order() -> None:
    class Counted(Destination):
        max_batch = 3

    items = [Item(f"d{i}", f"e{i}", {"value": i}) for i in range(8)]

    requests = Counted({}).split(items)

    assert [[i.delivery_id for i in request] for request in requests] == [
        ["d0", "d1", "d2"],
        ["d3", "d4", "d5"],
        ["d6", "d7"],
    ]
    assert all(a is b for a, b in zip([i for r in requests for i in r], items, strict=True))
    assert Counted({}).split([]) == []


def test_every_built_in_destination_but_ga4_and_webhook_splits_by_count_as_before() -> None:
    built_in = {n: c for n, c in registry.registry().items() if c.__module__.startswith("dest")}

    overriding = sorted(name for name, cls in built_in.items() if "split" in vars(cls))

    assert overriding == ["ga4", "webhook"] and len(built_in) > 2  # both split by body size


def test_a_plugin_split_decides_the_requests_of_a_batch(tmp_path: Path, plugins: None) -> None:
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, splitter_rules(tmp_path, server.url, "pairs"))
        h.accept(*grouped_sales("odd", "odd", "odd", "odd", "odd"))
        h.worker.drain()

    sent = [[e["value"] for e in r.json()["events"]] for r in server.requests]
    assert sent == [[0, 1], [2, 3], [4]]
    assert [s[0] for s in h.statuses()] == ["delivered"] * 5


@pytest.mark.parametrize(("how", "error"), BROKEN_SPLITS.items(), ids=list(BROKEN_SPLITS))
def test_a_split_that_raises_or_breaks_the_contract_dead_letters_its_group_unsent(
    tmp_path: Path, plugins: None, how: str, error: str
) -> None:
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, splitter_rules(tmp_path, server.url, how))
        h.accept(*grouped_sales("odd", "even", "odd", "odd", "even"))
        h.worker.drain()
        h.make_due()
        h.worker.drain()  # nothing is left to lease again

    assert sink.ids() == {"e1": 1, "e4": 1}  # the other group is sent, once
    assert h.statuses() == [
        ("dead", 1, error),
        ("delivered", 1, None),
        ("dead", 1, error),
        ("dead", 1, error),
        ("delivered", 1, None),
    ]
    assert len(h.store.dead_letters()) == 3  # kept, for `deadletters replay` once it is fixed


def test_the_engine_sends_a_ga4_clients_large_events_in_the_fewest_requests_under_130_kb(
    tmp_path: Path,
) -> None:
    emulator = GA4Emulator()
    with LoopbackServer(emulator) as server:
        rules = make_rules(
            tmp_path,
            f"""
            ga4: {{type: ga4, measurement_id: {emulator.measurement_id},
                   api_secret: {emulator.api_secret}, endpoint: "{server.url}",
                   delivery: {{batch_wait: 0}}}}
            """,
            "- {name: to_ga4, trigger: all, destination: ga4, event_name: purchase}\n",
        )
        h = Harness(tmp_path, rules)
        items = [{"id": f"{n:03d}" + "x" * 50} for n in range(80)]  # an event of about 5.5 kB
        h.accept(
            *(
                {
                    "event_name": "sale",
                    "event_id": f"e{i}",
                    "visitor_id": "vis_1",
                    "properties": {"order_id": f"ord_{i}", "items": items},
                }
                for i in range(25)
            )
        )
        h.worker.drain()

    bodies = [request.body for request in server.requests]
    sent = [e["params"]["transaction_id"] for b in bodies for e in json.loads(b)["events"]]
    assert len(bodies) == 2  # 25 such events make about 138 kB: two requests, not 25
    assert all(len(body) < 130_000 for body in bodies)
    assert sorted(sent) == sorted(f"ord_{i}" for i in range(25))  # every event, once
    assert emulator.dropped == [] and len(emulator.accepted) == 25
    assert [s[0] for s in h.statuses()] == ["delivered"] * 25


def buggy_rules(tmp_path: Path, url: str, bug: str) -> Path:
    return make_rules(
        tmp_path,
        f"""
        api: {{type: buggy, url: "{url}/items", bug: {bug},
              delivery: {{batch_wait: 0, max_attempts: 3}}}}
        """,
        "- {name: to_api, trigger: all, destination: api}\n",
    )


@pytest.mark.parametrize(("bug", "error"), PLUGIN_BUGS.items(), ids=list(PLUGIN_BUGS))
def test_a_plugin_bug_that_breaks_off_a_request_counts_an_attempt_and_ends_in_a_dead_letter(
    tmp_path: Path, plugins: None, bug: str, error: str
) -> None:
    sink = FaultySink("429" if bug == "retry_after_text" else "500" if bug == "secrets" else "ok")
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, buggy_rules(tmp_path, server.url, bug))
        h.accept({"event_name": "sale", "event_id": "e1", "properties": {"value": 1}})

        h.worker.drain()
        after_one = h.statuses()
        for _ in range(2):
            h.make_due()
            h.worker.drain()

    # Not left leased (sent again whenever the lease ran out, never counted, never given up).
    [(status, attempts, first_error)] = after_one
    assert (status, attempts) == ("pending", 1)
    assert first_error is not None and error in first_error
    [(status, attempts, last_error)] = h.statuses()
    assert (status, attempts) == ("dead", 3)
    assert last_error is not None and error in last_error
    assert len(server.requests) <= 3


def test_results_read_as_a_generator_are_taken_as_a_list(tmp_path: Path, plugins: None) -> None:
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, buggy_rules(tmp_path, server.url, "results_as_generator"))
        h.accept({"event_name": "sale", "event_id": "e1", "properties": {"value": 1}})

        h.worker.drain()

    assert [s[0] for s in h.statuses()] == ["delivered"]
    assert sink.ids() == {"e1": 1}


def test_a_plugin_bug_saying_whether_it_sends_alone_leaves_it_batched(
    tmp_path: Path, plugins: None, caplog: pytest.LogCaptureFixture
) -> None:
    # Asked for every destination on every pass: raised, it stopped delivery to all of them.
    sink = FaultySink()
    with LoopbackServer(sink) as server:
        h = Harness(tmp_path, buggy_rules(tmp_path, server.url, "sends_alone"))
        h.accept_sales(3)

        h.worker.drain()

    assert [s[0] for s in h.statuses()] == ["delivered"] * 3
    assert len(server.requests) == 1  # one batch, as without the hook
    failed = [r for r in caplog.records if "sends_alone failed" in r.getMessage()]
    assert len(failed) == 1  # said once, not on every pass


class _Unhashable(Single):
    """A plugin that compares by value and so has no hash (as a dataclass would)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Unhashable) and self.settings == other.settings

    __hash__ = None  # type: ignore[assignment]


def test_an_unhashable_plugin_is_still_asked_whether_it_sends_alone() -> None:
    # The answer is kept per adapter object, which takes a hash: without one it is asked again.
    adapter = _Unhashable({"url": "http://127.0.0.1:9/"})

    assert _lease_size(adapter, 7, 2) == (1, 7)  # max_batch 1: shared, one item a batch
    assert _lease_size(Single({"url": "http://127.0.0.1:9/"}), 7, 2) == (1, 7)


class TricklingSink(RawServer):
    """A loopback HTTP server that takes a request and answers 200 at once, then sends its body
    one byte every ``pause`` seconds: each wait is shorter than a read timeout, the whole far
    longer. Counts the requests it received."""

    def __init__(self, size: int = 30, pause: float = 0.2) -> None:
        self.size, self.pause = size, pause
        self.requests = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        """Read one request, then trickle the answer's body."""
        with conn, conn.makefile("rb") as request:
            read_request(request)
            self.requests += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
            for _ in range(self.size):
                time.sleep(self.pause)
                try:
                    conn.sendall(b"x")
                except OSError:
                    return  # the client gave up


def test_an_answer_trickling_in_past_the_timeout_times_out_well_within_the_lease(
    tmp_path: Path,
) -> None:
    # timeout 0.5 s: the lease is 11 s; the body takes 30 x 0.2 s = 6 s, each wait 0.2 s.
    sink = TricklingSink()
    try:
        h = Harness(tmp_path, webhook_rules(tmp_path, sink.url))
        h.accept({"event_name": "lead", "event_id": "e1"})

        started = time.monotonic()
        h.worker.drain()
        took = time.monotonic() - started
    finally:
        sink.close()

    [(status, attempts, error)] = h.statuses()
    assert (status, attempts) == ("pending", 1)
    assert error is not None and "timed out" in error
    assert took < 3  # connect + read timeout (1 s), not the 6 s the body took to trickle in
    assert sink.requests == 1


def test_a_lease_outlasts_the_longest_a_request_can_hold_it(tmp_path: Path) -> None:
    """Waiting for another thread's token fetch, fetching one, then sending: three exchanges,
    each within connect timeout + timeout. A lease of 2 x timeout + 10 s had no margin over
    two of them, so another worker could take over a request in flight and send it again."""
    h = Harness(tmp_path, webhook_rules(tmp_path, "http://127.0.0.1:9"))  # timeout 0.5 s
    h.accept_sales(1)
    leased: list[float] = []
    lease = h.store.lease

    def spy(destination: str, limit: int, seconds: float, owner: str, now: float) -> Any:
        leased.append(seconds)
        return lease(destination, limit, seconds, owner, now)

    h.store.lease = spy  # type: ignore[method-assign]
    h.worker.drain()

    connect = h.worker.transport.connect_timeout
    assert leased and min(leased) >= 3 * (min(connect, 0.5) + 0.5) + 10


def test_the_breaker_says_in_one_step_whether_a_batch_is_the_probe() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=10)
    assert breaker.admit(100.0) == (True, 0)  # closed: no probe
    breaker.record(False, 100.0)
    breaker.record(False, 100.0)

    assert breaker.admit(105.0) == (False, 0)  # paused
    assert breaker.admit(111.0) == (True, 1)  # the first probe
    assert breaker.admit(111.0) == (False, 0)  # only one
    breaker.record(True, 111.5)
    assert breaker.admit(111.6) == (True, 0)


def test_a_probe_that_ends_late_does_not_end_a_later_probes_turn() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=10)
    breaker.record(False, 100.0)
    _, first = breaker.admit(111.0)
    breaker.record(False, 111.0)  # another batch's request failed: paused again, to 131
    _, second = breaker.admit(132.0)  # the next probe, while the first still runs

    breaker.end_probe(first)  # the first ends, without a request of its own

    assert second == first + 1
    assert breaker.admit(133.0) == (False, 0)  # still one probe at a time


@pytest.mark.parametrize("slow", ["lease", "mark_dead"])
def test_a_lease_the_store_was_slow_to_grant_is_renewed_before_the_first_request(
    tmp_path: Path, plugins: None, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """A lease runs from the time asked for it, before the store's write lock is had: a wait for
    that lock (up to 30 s), or settling unsendable items before the first request, ate into the
    time kept for the request, and another worker took over a request still in flight."""
    monkeypatch.setattr(DeliveryWorker, "_lease_seconds", lambda self, timeout: 3.0)
    monkeypatch.setattr(delivery, "STORE_SLACK", 1.0)
    taken_over: list[int] = []
    box: list[Harness] = []

    def platform(request: Request) -> Reply:
        time.sleep(1.0)  # well within the request's timeout (10 s)
        taken_over.extend(d.id for d in box[0].store.lease("api", 10, 60, "other", time.time()))
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        box.append(h)
        h.accept(
            {"event_name": "sale", "event_id": "e0", "properties": {"value": "stale"}},
            {"event_name": "sale", "event_id": "e1", "properties": {"value": 1}},
        )
        original = getattr(h.store, slow)

        def slowly(*args: Any, **kwargs: Any) -> Any:
            time.sleep(2.5)  # the write lock held by another writer meanwhile
            return original(*args, **kwargs)

        monkeypatch.setattr(h.store, slow, slowly)
        h.worker.tick(wait=True)

    assert taken_over == []
    assert [s[0] for s in h.statuses()] == ["dead", "delivered"]


def test_a_renewal_the_store_was_slow_to_grant_is_renewed_again_before_the_request(
    tmp_path: Path, plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DeliveryWorker, "_lease_seconds", lambda self, timeout: 3.0)
    monkeypatch.setattr(delivery, "STORE_SLACK", 1.0)
    taken_over: list[int] = []
    box: list[Harness] = []

    def platform(request: Request) -> Reply:
        time.sleep(1.0)
        taken_over.extend(d.id for d in box[0].store.lease("api", 10, 60, "other", time.time()))
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        box.append(h)
        h.accept_sales(2)
        renew = h.store.renew
        slow = [2.5]  # the renewal before the second request waits for the write lock

        def slowly(*args: Any) -> list[int]:
            time.sleep(slow.pop() if slow else 0)
            return renew(*args)

        monkeypatch.setattr(h.store, "renew", slowly)
        h.worker.tick(wait=True)

    assert taken_over == []
    assert [s[0] for s in h.statuses()] == ["delivered", "delivered"]


def test_a_store_too_slow_to_renew_a_lease_stops_the_batch_without_sending(
    tmp_path: Path, plugins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every renewal slower than the slack renewed again, without end: the batch stalled for as
    # long as the store stayed that slow.
    monkeypatch.setattr(DeliveryWorker, "_lease_seconds", lambda self, timeout: 3.0)
    monkeypatch.setattr(delivery, "STORE_SLACK", 0.2)
    sent: list[Request] = []

    def platform(request: Request) -> Reply:
        sent.append(request)
        return Reply.json({"ok": True})

    with LoopbackServer(platform) as server:
        h = Harness(tmp_path, one_by_one_rules(tmp_path, server.url))
        h.accept_sales(3)  # three requests: the batch stops before the second
        renew = h.store.renew
        renewals = [0]

        def slowly(*args: Any) -> list[int]:
            renewals[0] += 1
            time.sleep(0.3)
            return renew(*args)

        monkeypatch.setattr(h.store, "renew", slowly)
        h.worker.tick(wait=True)

    assert len(sent) == 1  # the first request, on the lease as granted
    # Before the second: tried, then given up, and the third not tried at all.
    assert renewals[0] == delivery.RENEW_TRIES
    assert [s[:2] for s in h.statuses()] == [("delivered", 1), ("leased", 0), ("leased", 0)]
    later = [d.id for d in h.store.lease("api", 10, 60, "other", time.time() + 10)]
    assert len(later) == 2  # once their lease has run out, the items are leased again


def test_a_batch_that_starts_once_the_worker_is_stopping_leases_and_sends_nothing(
    tmp_path: Path, sink: Any
) -> None:
    """A batch the scheduler handed to the pool as SIGTERM came (``tick`` goes on through the
    destinations) started a request of its own, which could outlast the server's graceful
    timeout: the worker was killed with the lease held."""
    handler, server = sink
    h = Harness(tmp_path, webhook_rules(tmp_path, server.url))
    h.accept_sales(2)
    h.worker._stop.set()

    assert h.worker.tick(wait=True) == 0
    h.worker._run_batch(h.container.destinations["hook"])  # one handed over just before

    assert handler.received == []
    assert [s[:2] for s in h.statuses()] == [("pending", 0), ("pending", 0)]


class AlreadyThere(PerItem):
    """A platform that answers every item as one it had already, in words quoting the item."""

    name = "already_there"

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        return [ItemResult(Outcome.DELIVERED, "had it: ada@example.com")] * len(items)


def test_a_delivery_the_platform_had_already_is_logged_without_its_words(
    tmp_path: Path,
    plugins: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Google Ads ORDER_ID_ALREADY_IN_USE after a lost answer is delivered: the operator can
    # still see that it happened, but the platform's words, which may quote the item, stay out.
    known = dict(registry.registry())
    known["already_there"] = registry.check_contract("already_there", AlreadyThere)
    monkeypatch.setattr(registry, "registry", lambda: known)
    platform = PerItemPlatform()
    with LoopbackServer(platform) as server:
        rules = make_rules(
            tmp_path,
            f"""
            api: {{type: already_there, url: "{server.url}", client_secret: s3cret-value,
                  delivery: {{batch_wait: 0}}}}
            """,
            "- {name: to_api, trigger: all, destination: api}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept_sales(2)
        with caplog.at_level(logging.INFO, logger="engine.delivery"):
            h.worker.drain()

    assert [s[0] for s in h.statuses()] == ["delivered", "delivered"]
    noted = [r for r in caplog.records if "had it already" in r.getMessage()]
    assert [(r.destination, r.count) for r in noted] == [("api", 2)]  # type: ignore[attr-defined]
    assert "ada@example.com" not in caplog.text
