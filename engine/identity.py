"""Visitor identity for hybrid tracking: capture click IDs, remember them, enrich server events.

The browser records the click and the visit; the backend confirms the business outcome; one
visitor ID links them. On ``/v1/collect`` the click IDs in the page URL and referrer, and the
platforms' cookies the script forwards, are remembered per visitor, each with the time first
seen. A later server event that names the visitor (or a user ID linked to it by ``identify``)
is enriched with what is remembered, before the rules run, so a backend ``sale`` reaches Meta
with its ``fbc``/``fbp``, Google Ads with its ``gclid`` and TikTok with its ``ttclid``.

Consent governs what is remembered: click IDs and platform cookies only when ``ad_storage`` is
granted; the user agent and IP only when ``ad_user_data`` is granted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from destinations.values import no_value
from engine.consent import drop_other_ips, truncate_ip
from engine.errors import BadRequest
from engine.event import format_time, parse_timestamp, readable_ip

# Query parameter -> context field. ScCid (Snapchat) keeps its documented spelling in URLs.
CLICK_PARAMS: Mapping[str, str] = {
    "gclid": "gclid",
    "gbraid": "gbraid",
    "wbraid": "wbraid",
    "fbclid": "fbclid",
    "ttclid": "ttclid",
    "msclkid": "msclkid",
    "li_fat_id": "li_fat_id",
    "epik": "epik",
    "ScCid": "sccid",
    "rdt_cid": "rdt_cid",
}
_CLICK_PARAMS_ANY_CASE = {param.lower(): name for param, name in CLICK_PARAMS.items()}
COOKIE_FIELDS = ("fbc", "fbp", "ttp", "ga_client_id")
REMEMBERED = (*CLICK_PARAMS.values(), *COOKIE_FIELDS)
_REMEMBERED_SET = frozenset(REMEMBERED)
# The click IDs of one platform's click: an event that carries one of them carries its own
# click, newer than any remembered. (Other names are each their own.)
_CLICK_OF = {
    "gclid": "google",
    "gbraid": "google",
    "wbraid": "google",
    "fbclid": "meta",
    "fbc": "meta",
}


def _query_if_clicks(url: Any, any_case: bool) -> list[tuple[str, str]]:
    """The (key, value) pairs of a URL's query, or none when no click ID's name (in any case,
    or as the platforms write it) is in the URL. Most page URLs hold none, and a key can be
    one only when its name is written there or percent-encoded; a substring test per name is
    several times faster than parsing the query (and than a case-insensitive expression)."""
    if not isinstance(url, str) or "?" not in url:
        return []
    if "%" not in url:
        text, names = (url.lower(), _CLICK_PARAMS_ANY_CASE) if any_case else (url, CLICK_PARAMS)
        if not any(name in text for name in names):
            return []
    try:
        return parse_qsl(urlsplit(url).query)
    except ValueError:
        return []


def click_ids_in_url(url: Any) -> dict[str, str]:
    """The click IDs in a URL's query string, by their names in any case (``GCLID``,
    ``sccid``); the case of values is kept. A JavaScript non-value (``?gclid=undefined``, a
    link a script built of a click ID it did not have) is none."""
    found: dict[str, str] = {}
    for key, value in _query_if_clicks(url, any_case=True):
        name = _CLICK_PARAMS_ANY_CASE.get(key.lower())
        if name and value and name not in found and not no_value(value):
            found[name] = value[:500]
    return found


def _url_clicks(url: Any) -> set[str]:
    """The click IDs a URL's query carries as the adapters read them there: by their names as
    the platforms write them (``gclid``, not ``GCLID``; see ``normalize.url_param``)."""
    pairs = _query_if_clicks(url, any_case=False)
    return {
        CLICK_PARAMS[key]
        for key, value in pairs
        if value and key in CLICK_PARAMS and not no_value(value)
    }


def capture_click_ids(event: dict[str, Any]) -> None:
    """Copy click IDs from the page URL (first) and referrer into ``context``, if not set (or
    set to a JavaScript non-value, :func:`~destinations.values.no_value`).

    An ``_fbc`` cookie (``context.fbc``) of another click than the page URL's ``fbclid`` is
    left out: it is the cookie of an earlier click, read before Meta's pixel wrote the new
    one, and the adapter, which prefers ``fbc`` to ``fbclid``, would send the earlier click.
    """
    context = event.setdefault("context", {})
    fbclid = click_ids_in_url(context.get("page_url")).get("fbclid")
    fbc = context.get("fbc")
    if fbclid and isinstance(fbc, str) and not _of_click(fbc, fbclid):
        del context["fbc"]
    for source in (context.get("page_url"), context.get("referrer")):
        for name, value in click_ids_in_url(source).items():
            # A page's "undefined" (its script read a cookie or parameter not set) is none.
            if name not in context or no_value(context[name]):
                context[name] = value


def _of_click(fbc: str, fbclid: str) -> bool:
    """Whether ``fbc`` (``fb.<index>.<ms>.<fbclid>``, maybe with a ``.<appendix>`` of Meta's
    Parameter Builder) is made of ``fbclid``."""
    parts = fbc.split(".", 3)
    return len(parts) == 4 and (parts[3] == fbclid or parts[3].startswith(fbclid + "."))


# Any time a page's clock may show: read only to see whether it is later than the server's.
_ANY_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def at_most_now(event: dict[str, Any], now: datetime) -> None:
    """Replace, in place, a page's ``timestamp`` later than ``now`` by ``now``.

    The page's clock is the visitor's. One set ahead (a wrong time zone: hours) had every event
    of that browser refused, "timestamp is more than an hour in the future". An event happened
    before it arrived: a later time is the server's.

    Raises:
        BadRequest: the timestamp cannot be read (as validation would say).
    """
    if "timestamp" in event and parse_timestamp(event["timestamp"], _ANY_TIME) > now:
        event["timestamp"] = format_time(now)


def as_collected(raw: Any, now: datetime) -> Any:
    """A page's event for a rule test or a preview (``source: browser``) as ``/v1/collect``
    hands it on: the click IDs of its page URL and referrer copied into its context
    (:func:`capture_click_ids`), a timestamp later than ``now`` made ``now``
    (:func:`at_most_now`). Anything but an object whose ``context`` is an object or absent
    stays as it is, for validation to refuse, and so does a timestamp that cannot be read."""
    # Only an absent context is taken as {}: a null, [] or "" one is refused by /v1/collect.
    if not isinstance(raw, dict) or not isinstance(raw.get("context", {}), dict):
        return raw
    event = {**raw, "context": dict(raw.get("context", {}))}
    capture_click_ids(event)
    with contextlib.suppress(BadRequest):  # refused by validation, with the same words
        at_most_now(event, now)
    return event


def apply_ip_policy(event: dict[str, Any], mode: str, granted: frozenset[str]) -> None:
    """Keep, truncate or drop ``context.ip`` before the event is stored.

    ``consent`` (the default) keeps the full IP when ``ad_user_data`` is granted, truncates it
    (:func:`~engine.consent.truncate_ip`: IPv4 /24, IPv6 /48) when only ``analytics_storage``
    is, and drops it otherwise. The address is read first (:func:`~engine.event.readable_ip`):
    an IPv4-mapped IPv6 address (``::ffff:203.0.113.7``, as a backend on a dual-stack listener
    reads its client) is kept as the IPv4 address it is, a copied ``X-Forwarded-For`` list as
    its first entry (the client; none if that is no address), and text that is no address is
    dropped.

    Unless the IP is kept whole, an address the client put in ``context`` under another name
    (``client_ip``, ``x_forwarded_for``, ``remote_addr``, a nested ``device.ip``) is dropped
    (:func:`~engine.consent.drop_other_ips`): the policy must not depend on the field's name.
    """
    context = event.get("context")
    if not isinstance(context, dict):
        return
    if mode == "consent":
        mode = (
            "keep"
            if "ad_user_data" in granted
            else "truncate"
            if "analytics_storage" in granted
            else "drop"
        )
    if mode != "keep":
        drop_other_ips(context)
    if not context.get("ip"):
        return
    ip = readable_ip(context["ip"]) if isinstance(context["ip"], str) else None
    if ip is None:
        context.pop("ip")  # not an address: no platform can use it
        return
    context["ip"] = ip
    if mode == "drop":
        context.pop("ip")
    elif mode == "truncate":
        truncated = truncate_ip(str(context["ip"]))
        if truncated is None:
            context.pop("ip")
        else:
            context["ip"] = truncated


@dataclass(slots=True)
class IdentityUpdate:
    """What one event teaches about its visitor; written in the event's store transaction.

    Read-only by contract; not frozen because one is made for most events, and a frozen
    dataclass's constructor costs four times as much.
    """

    visitor_id: str | None
    user_id: str | None = None
    values: Mapping[str, str] = field(default_factory=dict)  # click IDs and cookies
    user_agent: str | None = None
    ip: str | None = None
    # The event said no user is signed in ("user_id": null: reset(), a backend's logout): the
    # visitor is no longer taken to be its last user's (who keeps the link to it).
    signed_out: bool = False


@dataclass(frozen=True)
class Identity:
    """What the store remembers about a visitor (values within their attribution window)."""

    visitor_id: str | None = None
    user_id: str | None = None
    values: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # name -> (value, first)
    user_agent: str | None = None
    ip: str | None = None


def same_click(name: str, remembered: Any, value: str) -> bool:
    """Whether ``value``, seen for ``name``, is what is remembered: equal, or for ``fbc`` the
    same click (``fb.1.<ms>.<fbclid>`` with the same fbclid) written with another time.

    An fbc made of an fbclid carries the time it is made; a landing page seen again (reloaded,
    its link opened again) makes it again, later. Meta's pixel keeps the ``_fbc`` of a click it
    already has: so does the store, with the time the click was first seen, and its window.
    """
    if remembered == value:
        return True
    if name != "fbc" or not isinstance(remembered, str):
        return False
    old, new = remembered.split(".", 3), value.split(".", 3)
    return len(old) == len(new) == 4 and old[:2] == new[:2] and old[3] == new[3]


def identity_update(
    event: Mapping[str, Any],
    granted: frozenset[str],
    received_at: float,
    enriched: Collection[str] = (),
    signed_out: bool = False,
) -> IdentityUpdate | None:
    """What to remember from an accepted event, as consent allows; None when nothing.

    ``signed_out``: the event sent ``"user_id": null`` (:func:`engine.event.signs_out`): its
    visitor's remembered user is forgotten, whatever the consent (it removes, never adds).

    ``enriched``: the fields enrichment added (``context.ip``, ``user_id``, ...). They came
    from the store, not from the client, so they are not remembered again: a remembered IP
    copied into every backend event would otherwise count as seen again, and never age out,
    and so would the link to a user who logged in on the browser once, long ago.
    """
    visitor = event.get("visitor_id")
    user = event.get("user_id") if "user_id" not in enriched else None
    if not visitor and not user:
        return None
    context = event.get("context") or {}
    if enriched:
        context = {k: v for k, v in context.items() if f"context.{k}" not in enriched}
    values: dict[str, str] = {}
    if "ad_storage" in granted:
        # One set intersection finds the few remembered names an event carries; they are
        # then taken in REMEMBERED's order, as always.
        present = _REMEMBERED_SET.intersection(context)
        for name in REMEMBERED if present else ():
            if name in present:
                value = context[name]
                if isinstance(value, str) and value:
                    values[name] = value[:500]
        # A server event's page URL, then its referrer (the landing page, for an event sent
        # from the page after it), carry clicks as a collected one's do (collect copies those
        # into context first): remembered, for the visitor's later events.
        for url in (context.get("page_url"), context.get("referrer")):
            for name, value in click_ids_in_url(url).items():
                values.setdefault(name, value)
        if "fbclid" in values and "fbc" not in values:
            # Meta's documented fbc format, with the time the click was first seen.
            values["fbc"] = f"fb.1.{int(received_at * 1000)}.{values['fbclid']}"
    identified = "ad_user_data" in granted
    ua = context.get("user_agent") if identified else None
    ip = context.get("ip") if identified else None
    if not visitor and not values and not ua:
        return IdentityUpdate(None, str(user)) if user else None
    return IdentityUpdate(
        str(visitor) if visitor else None,
        str(user) if user else None,
        values,
        ua if isinstance(ua, str) else None,
        ip if isinstance(ip, str) else None,
        signed_out=signed_out and not user,
    )


_USER_ID_PURPOSES = frozenset({"ad_user_data", "analytics_storage"})


def enrich(
    event: dict[str, Any], identity: Identity, granted: frozenset[str], signed_out: bool = False
) -> list[str]:
    """Fill what the event lacks from the visitor's identity; returns the fields added.

    ``signed_out``: the event sent ``"user_id": null`` (no user is signed in): no user ID.

    Only as the event's own consent (``granted``) allows, the way :func:`identity_update`
    remembers: click IDs and cookies with ``ad_storage``, the user agent and IP with
    ``ad_user_data``, the user ID with ``ad_user_data`` or ``analytics_storage``. A person who
    withdrew consent gets nothing remembered back. A platform's
    click the event carries itself (``_CLICK_OF``) keeps any remembered one of it out.
    """
    added: list[str] = []
    if identity.visitor_id and not event.get("visitor_id"):
        event["visitor_id"] = identity.visitor_id
        added.append("visitor_id")
    # The user ID the browser was last seen with names a person, for analytics (GA4's user_id)
    # and for ads (external_id): back only with one of those purposes, never without consent.
    if (
        identity.user_id
        and not signed_out
        and not event.get("user_id")
        and not _USER_ID_PURPOSES.isdisjoint(granted)
    ):
        event["user_id"] = identity.user_id
        added.append("user_id")
    context = event.setdefault("context", {})
    if "ad_storage" in granted and identity.values:
        # A click the event carries itself (a landing page's fbclid, a new gbraid) is newer
        # than what is remembered: a remembered fbc or gclid added beside it would be sent in
        # its place (adapters prefer fbc to fbclid, gclid to gbraid) and credit the old click.
        own = {name for name in _REMEMBERED_SET if context.get(name)}
        own.update(_url_clicks(context.get("page_url")))
        clicks = {_CLICK_OF.get(name, name) for name in own}
        # A click in the referrer (the landing page, for an event sent from the page after
        # it) is newer than the remembered one of its platform too, and is remembered in its
        # place by this event: it, not the old click, replaces the remembered one here.
        # (Where nothing of its platform is remembered, it is not copied, as documented.)
        referred = {
            name: value
            for name, value in click_ids_in_url(context.get("referrer")).items()
            if _CLICK_OF.get(name, name) not in clicks
        }
        newer = {_CLICK_OF.get(name, name) for name in referred}
        # Of a platform's remembered clicks, only the last one seen: a gclid beside a later
        # gbraid (or an fbc beside a later fbclid) is an earlier click, which the adapters,
        # preferring gclid to gbraid and fbc to fbclid, would send in the later one's place.
        last: dict[str, float] = {}
        for name, (_value, first_seen) in identity.values.items():
            if name in _CLICK_OF:
                last[_CLICK_OF[name]] = max(first_seen, last.get(_CLICK_OF[name], first_seen))
        replaced: set[str] = set()
        for name, (value, first_seen) in identity.values.items():
            platform = _CLICK_OF.get(name, name)
            if context.get(name) or platform in clicks:
                continue
            if name in _CLICK_OF and first_seen < last[platform]:
                continue
            if platform in newer:
                replaced.add(platform)
                continue
            context[name] = value
            added.append(f"context.{name}")
        for name, value in referred.items():
            if _CLICK_OF.get(name, name) in replaced and not context.get(name):
                context[name] = value
                added.append(f"context.{name}")
    personal = (("user_agent", identity.user_agent), ("ip", identity.ip))
    for name, remembered in personal if "ad_user_data" in granted else ():
        if remembered and not context.get(name):
            context[name] = remembered
            added.append(f"context.{name}")
    if not context:
        event.pop("context")
    return added


def still_held(event: Mapping[str, Any], added: Sequence[str]) -> list[str]:
    """The fields of ``added`` (``name`` or ``context.name``) that ``event`` still holds.

    For the stored ``enriched`` list, after the IP policy may have dropped an added IP.
    """
    context = event.get("context") or {}
    return [
        name
        for name in added
        if (context.get(name[8:]) if name.startswith("context.") else event.get(name))
    ]
