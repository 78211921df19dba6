"""Which events are a person's, for forget: by their user and visitor IDs, or their e-mail."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from destinations import normalize
from destinations.normalize import is_hashed, sha256_hex
from engine.store.sqlite.sql import _marks

# What forget reads in an event body.
_USER = "json_extract(body, '$.user_id')"
_VISITOR = "json_extract(body, '$.visitor_id')"
# A user ID the pipeline copied from the visitor's identity (listed under ``enriched``) is a guess
# from a browser possibly shared, not the client's word on whose event it is.
_USER_GUESSED = "instr(COALESCE(json_extract(body, '$.enriched'), ''), '\"user_id\"') > 0"


def _visitors_of(db: sqlite3.Connection, users: Iterable[str], by_visitor_row: bool) -> set[str]:
    """The visitors linked to ``users``: the person's own browsers and devices (one step).

    Links are followed from a user to their visitors, and no further: a browser that two people
    logged in on links both, and what the other one did elsewhere is not the person's. Every
    user ID a visitor row has held is also a link (see _remember); the visitors table itself,
    which has no index by user, is read only when ``by_visitor_row``.
    """
    by_user = ["SELECT visitor_id FROM user_visitors WHERE user_id = ?"]
    if by_visitor_row:
        by_user.append("SELECT visitor_id FROM visitors WHERE user_id = ?")
    found: set[str] = set()
    for u in users:
        for sql in by_user:
            found.update(r[0] for r in db.execute(sql, (u,)))
    return found


def _person_filter(
    users: set[str],
    visitors: set[str],
    email: str | None,
    own_users: set[str] | None = None,
) -> tuple[str, list[Any]]:
    """The WHERE condition (and its parameters) matching a person's events.

    An event is the person's when it carries one of ``users``, or when it was seen on one of
    ``visitors`` and carries no user ID, one of ``own_users`` (default: ``users``), or a user
    ID only guessed from the visitor; an event on the person's visitor that the client sent
    with another user's ID is that user's, and stays. With ``email``, also every event whose
    ``user_data.email`` is that address (see _email_keys).
    """
    own = users if own_users is None else own_users
    conditions, params = ["0"], []
    if users:
        conditions.append(f"{_USER} IN ({_marks(users)})")
        params += sorted(users)
    if visitors:
        anyone = [f"{_USER} IS NULL", _USER_GUESSED]
        if own:
            anyone.append(f"{_USER} IN ({_marks(own)})")
        conditions.append(f"({_VISITOR} IN ({_marks(visitors)}) AND ({' OR '.join(anyone)}))")
        params += sorted(visitors)
        params += sorted(own)
    keys = _email_keys(email) if email else []
    if keys:
        conditions.append(
            f"{_EMAIL_KEY}(json_extract(body, '$.user_data.email')) IN ({_marks(keys)})"
        )
        params += keys
    return " OR ".join(conditions), params


_EMAIL_KEY = "tagrelay_email_key"  # the SQL name of _email_key, on every connection (see _open)


def _email_key(value: object) -> str | None:
    """What an event's ``user_data.email`` is compared by, for erasure.

    A SHA-256 digest, lower-cased; any other text normalized as the adapters do before
    hashing (Python's Unicode-aware trim and lower-casing: a tab, a newline, ``Ü``), in
    Google's form, which also reads a gmail.com address without the dots and ``+tag`` of its
    local part: those name the same mailbox. SQLite's own ``trim``/``lower`` know only spaces
    and ASCII, and missed such addresses.
    """
    if not isinstance(value, str):
        return None
    if is_hashed(value):
        return value.strip().lower()
    return normalize.email(value, "google") or value.strip().lower() or None


def _email_keys(email: str) -> list[str]:
    """The keys (see _email_key) of the events that carry ``email``, plain or hashed.

    A hash is matched when it is the SHA-256 of the address as any platform normalizes it
    (Meta and TikTok keep a gmail.com address's dots, Google drops them); ``email`` may itself
    be a digest.
    """
    if not email.strip():
        return []
    if is_hashed(email):
        return [email.strip().lower()]
    forms = (normalize.email(email, "meta"), normalize.email(email, "google"))
    plain = {f for f in forms if f} or {email.strip().lower()}
    keys = {sha256_hex(p) for p in plain}
    key = _email_key(email)
    if key:
        keys.add(key)
    return sorted(keys)


def _ids_by_email(
    db: sqlite3.Connection,
    email: str,
    where: str,
    params: list[Any],
    visitors: set[str],
    users: set[str],
) -> None:
    """Add to ``visitors`` and ``users`` the IDs on the events (matching ``where``) with
    ``email``: erasing a person found by e-mail erases what their IDs are remembered with.

    Only the IDs the client sent: one the pipeline copied from a remembered identity (listed
    under ``enriched``) may be another person's, on a shared browser.
    """
    match, email_params = _person_filter(set(), set(), email)
    for visitor, user, enriched in db.execute(
        f"SELECT {_VISITOR}, {_USER}, json_extract(body, '$.enriched') FROM events "
        f"WHERE {where} AND ({match})",
        [*params, *email_params],
    ):
        guessed = json.loads(enriched) if enriched else []
        if visitor is not None and "visitor_id" not in guessed:
            visitors.add(str(visitor))
        if user is not None and "user_id" not in guessed:
            users.add(str(user))
