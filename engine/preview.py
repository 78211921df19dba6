"""Dry runs: what every tag would do with one event, and the exact requests it would send."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from destinations.base import HttpRequest, Item, SendContext
from engine import event as events
from engine.consent import granted_purposes
from engine.identity import apply_ip_policy, as_collected, still_held
from engine.rules.model import Container

PREVIEW_TOKEN = "[access token]"  # noqa: S105 - a placeholder, not a credential  # stands in for an OAuth token a preview never fetches


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text) if text[:1] in "[{" else text
    except ValueError:
        return text


def request_json(request: HttpRequest) -> dict[str, Any]:
    """A request as JSON-friendly data; the body decoded when it is JSON."""
    body: Any = request.json()
    content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
    if body is None and content_type.startswith("application/x-www-form-urlencoded"):
        # Form bodies (Meta) are shown as fields; fields holding JSON are shown decoded.
        body = {k: _maybe_json(v) for k, v in parse_qsl(request.body.decode("utf-8", "replace"))}
    elif body is None and request.body:
        body = request.body.decode("utf-8", "replace")
    return {
        "method": request.method,
        "url": request.url,
        "headers": dict(request.headers),
        "body": body,
    }


# (event, now, granted purposes, signed_out: the event sent "user_id": null) -> fields added
Enricher = Callable[[dict[str, Any], datetime, frozenset[str], bool], list[str]]


def preview(
    container: Container,
    raw: Any,
    now: datetime | None = None,
    enricher: Enricher | None = None,
    ip_storage: str = "consent",
    redact_params: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Evaluate ``raw`` against every tag, without storing or sending anything.

    Returns:
        ``{"event": normalized, "tags": [{name, destination, fired, reason, consent,
        anonymous, request}]}``; ``request`` is None for tags that did not fire. Secrets in
        requests are replaced by ``[REDACTED]``.

    Raises:
        BadRequest: the event is invalid.
    """
    now = now or datetime.now(UTC)
    raw, source = events.simulated_source(raw)
    if source == "browser":
        raw = as_collected(raw, now)
    event = events.normalize(raw, now, redact_params, source)
    granted = granted_purposes(event.get("consent"), container.consent_defaults)
    signed_out = events.signs_out(raw)
    added = enricher(event, now, granted, signed_out) if enricher is not None else []
    apply_ip_policy(event, ip_storage, granted)
    if added and (added := still_held(event, added)):
        event["enriched"] = added  # shown, so the reader sees what the store contributed
    tags = []
    for decision in container.evaluate(event, explain=True, now=now):
        entry: dict[str, Any] = {
            "name": decision.tag,
            "destination": decision.destination,
            "fired": decision.fired,
            "reason": decision.reason,
            "consent": decision.consent,
            "anonymous": decision.anonymous,
            "request": None,
        }
        if decision.fired and decision.payload is not None:
            dest = container.destinations[decision.destination]
            adapter = dest.adapter
            item = Item("preview", str(event["event_id"]), decision.payload)
            try:
                ctx = SendContext(now, PREVIEW_TOKEN if adapter.token_request() else None)
                problem = adapter.check_item(item, ctx)
                if problem:  # redacted as delivery redacts it: a plugin may quote its settings
                    problem = adapter.redact_text(str(problem))
                else:
                    request = adapter.redact(adapter.build_request([item], ctx))
                    entry["request"] = request_json(request)
            except Exception as exc:  # noqa: BLE001 - a plugin's bug, shown as the send would
                # Its type only: a plugin's message may quote its settings, secrets included.
                problem = f"the {dest.type} adapter failed: {type(exc).__name__}"
            if problem:
                entry["fired"] = False
                entry["reason"] = f"would fail at send time: {problem}"
        tags.append(entry)
    return {"event": event, "tags": tags}
