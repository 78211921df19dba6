"""Consent: what a tag requires, what an event grants, and the decision between them.

Purposes are Google Consent Mode v2's: ``ad_storage``, ``analytics_storage``, ``ad_user_data``,
``ad_personalization``. A tag states the purposes it requires to forward the event with
identifiers (``require``) and, optionally, the purposes under which it may still forward an
anonymous copy (``anonymous``). Three outcomes follow (``seeds/001``):

- ``FULL``: every required purpose is granted; the event goes out whole.
- ``ANONYMOUS``: a required purpose is missing but the tag's anonymous purposes are granted; the
  event goes out stripped of identifiers (no user_data, no user ID, no click IDs, IP truncated).
- ``BLOCKED``: neither; the event stays stored and is not forwarded.

A purpose the event does not mention counts as denied unless the container's defaults say
otherwise. Every decision carries its reason, which is stored with the event.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from engine.event import CONSENT_PURPOSES

CLICK_ID_FIELDS = (
    "gclid",
    "gbraid",
    "wbraid",
    "dclid",
    "fbclid",
    "fbc",
    "fbp",
    "ttclid",
    "ttp",
    "msclkid",
    "li_fat_id",
    "epik",
    "sccid",
    "ScCid",
    "rdt_cid",
    "twclid",
)
_CLICK_ID_PARAMS = frozenset(p.lower() for p in CLICK_ID_FIELDS)


class Verdict(enum.Enum):
    """How a tag may forward an event."""

    FULL = "full"
    ANONYMOUS = "anonymous"
    BLOCKED = "blocked"


@dataclass(frozen=True)
class Requirement:
    """What one tag requires."""

    require: frozenset[str] = frozenset()
    anonymous: frozenset[str] | None = None  # None: no anonymous forwarding


@dataclass(frozen=True)
class Decision:
    """A consent verdict and the reason for it, in words."""

    verdict: Verdict
    reason: str


def granted_purposes(
    consent: Mapping[str, Any] | None, defaults: Mapping[str, str]
) -> frozenset[str]:
    """The purposes an event grants, with the container's defaults for unmentioned ones."""
    granted = {p for p, v in defaults.items() if v == "granted"}
    for purpose, value in (consent or {}).items():
        if value == "granted":
            granted.add(purpose)
        else:
            granted.discard(purpose)
    return frozenset(granted)


def decide(
    requirement: Requirement, granted: frozenset[str], mentioned: frozenset[str]
) -> Decision:
    """Decide how a tag may forward an event.

    Args:
        requirement: the tag's consent requirement.
        granted: purposes granted by the event (defaults applied).
        mentioned: purposes the event states at all, to tell "denied" from "no signal".
    """
    missing = sorted(requirement.require - granted)
    if not missing:
        needed = ", ".join(sorted(requirement.require)) or "nothing"
        return Decision(Verdict.FULL, f"consent granted (requires {needed})")
    why = ", ".join(p if p in mentioned else f"{p} (no signal)" for p in missing)
    if requirement.anonymous is not None:
        anon_missing = sorted(requirement.anonymous - granted)
        if not anon_missing:
            return Decision(Verdict.ANONYMOUS, f"forwarded without identifiers: denied {why}")
    return Decision(Verdict.BLOCKED, f"consent denied: {why}")


def all_purposes_known(purposes: frozenset[str]) -> list[str]:
    """Purposes not among Consent Mode v2's four (for ``tagrelay check``)."""
    return sorted(purposes - set(CONSENT_PURPOSES))


def truncate_ip(ip: str) -> str | None:
    """IPv4 to /24 and IPv6 to /48 (the last octet or 80 bits zeroed); None if unreadable."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    prefix = 24 if address.version == 4 else 48
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network.network_address)


def _strip_url(url: Any) -> Any:
    if not isinstance(url, str) or "?" not in url:
        return url
    parts = urlsplit(url)
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in _CLICK_ID_PARAMS
    ]
    return urlunsplit(parts._replace(query=urlencode(query)))


def strip_identifiers(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the event with no way back to a person: for analytics-only forwarding.

    Drops ``user_data`` and ``user_id``, every click ID and platform cookie, click-ID query
    parameters from the page URL and referrer, and truncates the IP.
    """
    stripped = {k: v for k, v in event.items() if k not in ("user_data", "user_id")}
    context = event.get("context")
    if isinstance(context, dict):
        ctx = {k: v for k, v in context.items() if k not in CLICK_ID_FIELDS}
        if isinstance(ctx.get("ip"), str):
            ctx["ip"] = truncate_ip(ctx["ip"])
        for key in ("page_url", "referrer"):
            if key in ctx:
                ctx[key] = _strip_url(ctx[key])
        stripped["context"] = ctx
    return stripped
