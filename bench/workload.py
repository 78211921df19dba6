"""The benchmark's event mix: what a shop's site and backend send in a day, in proportion.

Every event is built from a seeded random generator, so two runs send the same mix. Event IDs
(and order IDs) are unique per event: the store's dedup would otherwise turn repeats into the
cheaper "duplicate" path and flatter the figures.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

PLACEHOLDER = "__EID__"
"""Stands for a unique ID in JSON templates; the load generators replace every occurrence."""
NUMBER = "__NUM__"
"""Stands for a 7-digit number in JSON templates, different in every request (a phone number's
last digits): with the placeholder in the e-mail, no two requests carry the same person, so
the normalizers' caches only save what they would save in real traffic."""

# (event kind, weight): page views dominate; purchases carry full user_data so hashing happens.
MIX: tuple[tuple[str, int], ...] = (
    ("page_view", 50),
    ("add_to_cart", 12),
    ("view_item", 8),
    ("purchase", 15),
    ("lead", 10),
    ("refund", 5),
)

_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
_CITIES = (("Berlin", "BE", "10115"), ("Hamburg", "HH", "20095"), ("Munich", "BY", "80331"))
_PRODUCTS = (
    ("sku_1", "Running shoe", 129.0),
    ("sku_2", "Trail sock", 12.5),
    ("sku_3", "Rain jacket", 189.0),
    ("sku_4", "Water bottle", 19.9),
    ("sku_5", "Head torch", 44.0),
)
_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


def _consent(rng: random.Random) -> dict[str, Any] | None:
    roll = rng.random()
    if roll < 0.70:
        return {
            "ad_storage": "granted",
            "analytics_storage": "granted",
            "ad_user_data": "granted",
            "ad_personalization": "denied",
        }
    if roll < 0.85:  # analytics only: GA4 gets an anonymous copy, ad platforms nothing
        return {"ad_storage": False, "analytics_storage": True, "ad_user_data": False}
    return None  # no signal: only the container's defaults apply


def _context(rng: random.Random, i: int) -> dict[str, Any]:
    click = rng.random()
    query = ""
    context: dict[str, Any] = {
        "ip": f"203.0.113.{i % 250 + 1}",
        "user_agent": _UA,
        "referrer": "https://www.google.com/",
        "fbp": f"fb.1.1732000000000.{1000000 + i}",
        "ga_client_id": f"GA1.1.{100000 + i}.1732000000",
        "ttp": f"ttp_{i:08d}",
    }
    if click < 0.3:
        context["gclid"] = f"Cj0KCQiA{i:010d}"
        query = f"?gclid={context['gclid']}"
    elif click < 0.45:
        query = f"?fbclid=IwAR{i:012d}"
    elif click < 0.55:
        context["ttclid"] = f"E.C.P.{i:016d}"
    context["page_url"] = f"https://shop.example/p/{i % 40}{query}"
    return context


def _user_data(rng: random.Random, i: int, full: bool) -> dict[str, Any]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    data: dict[str, Any] = {
        "email": f" {first}.{last}+{i}@Example.com ",
        "phone": f"0151 {1000000 + i % 8999999}" if i % 2 else f"+49 151 {1000000 + i}",
    }
    if full:
        city, state, zip_code = rng.choice(_CITIES)
        data.update(
            first_name=first,
            last_name=last,
            date_of_birth=f"19{60 + i % 40}-0{1 + i % 9}-1{i % 10}",
            gender=rng.choice(("female", "male", "f", "m")),
            city=city,
            state=state,
            postal_code=zip_code,
            country="DE",
            external_id=f"cust_{i}",
        )
    return data


def make_event(kind: str, i: int, rng: random.Random, now: datetime, eid: str) -> dict[str, Any]:
    """One canonical event of ``kind`` (``eid`` is its event ID, and its order's ID)."""
    when = now - timedelta(seconds=rng.randint(1, 600))
    event: dict[str, Any] = {
        "event_name": kind,
        "event_id": eid,
        "timestamp": when.isoformat().replace("+00:00", "Z"),
        "visitor_id": f"vis_{i % 5000}",
        "session_id": f"sess_{i % 900}",
        "context": _context(rng, i),
    }
    if (consent := _consent(rng)) is not None:
        event["consent"] = consent
    if kind in ("page_view", "view_item"):
        event["properties"] = {"page_title": "Running shoes", "path": f"/p/{i % 40}"}
    elif kind == "add_to_cart":
        sku, name, price = rng.choice(_PRODUCTS)
        event["properties"] = {
            "value": price,
            "currency": "EUR",
            "items": [{"id": sku, "name": name, "price": price, "quantity": 1}],
        }
    elif kind == "purchase":
        items = [
            {"id": sku, "name": name, "price": price, "quantity": rng.randint(1, 3)}
            for sku, name, price in rng.sample(_PRODUCTS, rng.randint(1, 3))
        ]
        event["user_id"] = f"user_{i}"
        event["user_data"] = _user_data(rng, i, full=True)
        event["properties"] = {
            "order_id": eid,
            "value": round(sum(it["price"] * it["quantity"] for it in items), 2),
            "currency": "EUR",
            "items": items,
        }
    elif kind == "lead":
        event["user_data"] = _user_data(rng, i, full=False)
        event["properties"] = {"form": "newsletter", "value": 5.0, "currency": "EUR"}
    elif kind == "refund":
        event["user_id"] = f"user_{i}"
        event["properties"] = {
            "related_order_id": f"ord_{i}",
            "value": 129.0,
            "currency": "EUR",
        }
    return event


def kinds(n: int, seed: int = 7) -> list[str]:
    """``n`` event kinds drawn from :data:`MIX`."""
    rng = random.Random(seed)
    names = [name for name, _ in MIX]
    weights = [w for _, w in MIX]
    return rng.choices(names, weights, k=n)


def events(
    n: int,
    seed: int = 7,
    now: datetime | None = None,
    prefix: str = "bench",
    only: str | None = None,
    start: int = 0,
) -> list[dict[str, Any]]:
    """``n`` events of the mix (or of one kind), each with a unique event ID.

    Events are numbered from ``start``; the people in them (e-mail, phone, customer ID) follow
    the number, so pools with different starts share no one.
    """
    now = now or datetime.now(UTC)
    rng = random.Random(seed)
    chosen = [only] * n if only else kinds(n, seed)
    return [
        make_event(kind, i, rng, now, f"{prefix}-{i}") for i, kind in enumerate(chosen, start=start)
    ]


def templates(n: int, seed: int = 11, now: datetime | None = None) -> list[str]:
    """``n`` single-event JSON bodies whose IDs are :data:`PLACEHOLDER`."""
    bodies = events(n, seed, now)
    for body in bodies:
        body["event_id"] = PLACEHOLDER
        if "order_id" in body.get("properties", {}):
            body["properties"]["order_id"] = PLACEHOLDER
        if user := body.get("user_data"):
            local = user["email"].strip().split("+")[0]
            user["email"] = f" {local}+{PLACEHOLDER}@Example.com "
            user["phone"] = f"+49 151 {NUMBER}"
    return [json.dumps(b, separators=(",", ":")) for b in bodies]


def batch_templates(n: int, size: int = 100, seed: int = 13) -> list[str]:
    """``n`` batch bodies (``{"events": [...]}``) of ``size`` events each, IDs as placeholders."""
    out = []
    for k in range(n):
        singles = templates(size, seed + k)
        out.append('{"events":[' + ",".join(singles) + "]}")
    return out
