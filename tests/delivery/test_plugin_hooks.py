"""A plugin's delivery hooks: what they are given, and what they answer wrongly, contained to
their items."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from destinations.testkit.server import LoopbackServer, Reply, Request
from tests.delivery.test_delivery import Harness, make_rules


class ListKey(Destination):
    """batch_key answers an unhashable value (a list) instead of a string."""

    name = "list_key"
    max_batch = 10
    settings_schema = {"type": "object", "properties": {"url": {"type": "string"}}}
    default_mapping = {"value": "properties.value"}

    def batch_key(self, item: Item) -> Any:
        return [item.payload.get("value")]

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest.json_post(str(self.settings["url"]), {"n": len(items)})


class TextExpiry(Destination):
    """read_token passes ``expires_in`` on as the token endpoint wrote it, as text."""

    name = "text_expiry"
    max_batch = 10
    settings_schema = {"type": "object", "properties": {"url": {"type": "string"}}}
    default_mapping = {"value": "properties.value"}

    def token_request(self) -> HttpRequest | None:
        return HttpRequest.json_post(f"{self.settings['url']}/token", {})

    def read_token(self, response: HttpResponse) -> Token:
        body = response.json()
        return Token(body["access_token"], body["expires_in"])

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest.json_post(f"{self.settings['url']}/items", {"n": len(items)})

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        return [status_result(response)] * len(items)


class Verbose(Destination):
    """read_response explains a retry at great length."""

    name = "verbose"
    max_batch = 10
    settings_schema = {"type": "object", "properties": {"url": {"type": "string"}}}
    default_mapping = {"value": "properties.value"}

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest.json_post(str(self.settings["url"]), {"n": len(items)})

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        return [ItemResult(Outcome.RETRYABLE, "busy " * 20_000)] * len(items)


class QueryToken(TextExpiry):
    """Sends the OAuth token in the query string, as Snapchat's Conversions API takes it."""

    name = "query_token"

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        url = f"{self.settings['url']}/events?access_token={ctx.access_token}"
        return HttpRequest.json_post(url, {"n": len(items)})


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    known = dict(registry.registry())
    known["list_key"] = registry.check_contract("list_key", ListKey)
    known["text_expiry"] = registry.check_contract("text_expiry", TextExpiry)
    known["verbose"] = registry.check_contract("verbose", Verbose)
    known["query_token"] = registry.check_contract("query_token", QueryToken)
    monkeypatch.setattr(registry, "registry", lambda: known)


def _platform(expires_in: object) -> Any:
    def answer(request: Request) -> Reply:
        if request.path == "/token":
            return Reply.json({"access_token": "tok", "expires_in": expires_in})
        return Reply.json({"ok": True})

    return answer


def _harness(tmp_path: Path, plugin: str, url: str) -> Harness:
    rules = make_rules(
        tmp_path,
        f'api: {{type: {plugin}, url: "{url}", delivery: {{batch_wait: 0}}}}\n',
        "- {name: to_api, trigger: all, destination: api}\n",
    )
    harness = Harness(tmp_path, rules)
    harness.accept_sales(2)
    harness.worker.drain(timeout=2)
    return harness


@pytest.mark.usefixtures("plugins")
def test_a_batch_key_that_cannot_group_items_fails_its_items_instead_of_holding_the_lease(
    tmp_path: Path,
) -> None:
    with LoopbackServer(_platform(3600)) as server:
        h = _harness(tmp_path, "list_key", server.url)

    rows = h.store._read("SELECT status, lease_owner, last_error FROM deliveries ORDER BY id")
    assert [(r["status"], r["lease_owner"]) for r in rows] == [("dead", None)] * 2
    assert "TypeError in the adapter's check of the item" in rows[0]["last_error"]


@pytest.mark.usefixtures("plugins")
@pytest.mark.parametrize(("expires_in", "status"), [("3600", "delivered"), ("soon", "pending")])
def test_a_token_lifetime_given_as_text_is_read_and_one_that_is_no_number_is_retried(
    tmp_path: Path, expires_in: str, status: str
) -> None:
    with LoopbackServer(_platform(expires_in)) as server:
        h = _harness(tmp_path, "text_expiry", server.url)

    statuses = h.statuses()
    assert [s[0] for s in statuses] == [status] * 2, statuses
    # Never blamed on build_request and dead-lettered, as the unguarded TypeError was.
    assert all("build_request" not in (s[2] or "") for s in statuses), statuses


@pytest.mark.usefixtures("plugins")
def test_the_error_kept_with_a_retry_is_cut_as_a_dead_letters_is(tmp_path: Path) -> None:
    with LoopbackServer(_platform(3600)) as server:
        h = _harness(tmp_path, "verbose", server.url)

    assert [(s[0], len(s[2] or "")) for s in h.statuses()] == [("pending", 1000)] * 2


@pytest.mark.usefixtures("plugins")
def test_an_oauth_token_echoed_by_the_platform_is_redacted_from_the_dead_letter(
    tmp_path: Path,
) -> None:
    # The token comes from token_request, not from a setting: the adapter's secrets lack it.
    def platform(request: Request) -> Reply:
        if request.path == "/token":
            return Reply.json({"access_token": "oauth-live-7f3a9c2e51", "expires_in": 3600})
        token = request.param("access_token")
        return Reply.json({"error": f"token {token} lacks the scope"}, 400)

    with LoopbackServer(platform) as server:
        h = _harness(tmp_path, "query_token", server.url)

    assert [s[:2] for s in h.statuses()] == [("dead", 1)] * 2
    assert all("token [REDACTED] lacks" in (s[2] or "") for s in h.statuses())
    assert "7f3a9c2e51" not in str(h.statuses())


def test_each_request_of_a_batch_is_built_at_its_own_time(tmp_path: Path) -> None:
    # A lease's requests go out one after another: a webhook signature's timestamp is the
    # request's, or a receiver that checks its replay window refuses the later ones.
    seen: list[tuple[float, int]] = []

    def slow_receiver(request: Request) -> Reply:
        header = request.header("X-Tagrelay-Signature") or ""
        stamp = int(dict(part.split("=", 1) for part in header.split(","))["t"])
        seen.append((time.time(), stamp))
        time.sleep(1.2)
        return Reply.json({"ok": True})

    with LoopbackServer(slow_receiver) as server:
        rules = make_rules(
            tmp_path,
            f"hook: {{type: webhook, url: '{server.url}/hook', secret: 0123456789abcdef-signing,"
            " delivery: {timeout: 5, batch_wait: 0}}\n",
            "- {name: to_hook, trigger: all, destination: hook}\n",
        )
        h = Harness(tmp_path, rules)
        h.accept_sales(3)
        h.worker.drain()

    assert len(seen) == 3
    lags = [received - stamp for received, stamp in seen]
    assert max(lags) < 1.5, f"the signature's time lags the request by {lags} s"  # whole seconds
