"""Consent: what a tag requires, what an event grants, and the decision between them.

Purposes are Google Consent Mode v2's: ``ad_storage``, ``analytics_storage``, ``ad_user_data``,
``ad_personalization``. A tag states the purposes it requires to forward the event with
identifiers (``require``) and, optionally, the purposes under which it may still forward an
anonymous copy (``anonymous``). Three outcomes follow (``seeds/001``):

- ``FULL``: every required purpose is granted; the event goes out whole.
- ``ANONYMOUS``: a required purpose is missing but the tag's anonymous purposes are granted; the
  event goes out stripped of identifiers (no user_data, no user ID, no click IDs, no tracking
  parameters in its URLs, IP truncated).
- ``BLOCKED``: neither; the event stays stored and is not forwarded.

A tag with ``anonymous`` purposes and nothing to ``require`` only ever sends anonymously: it is
``ANONYMOUS`` when its anonymous purposes are granted and ``BLOCKED`` otherwise, never ``FULL``
(a tag that asks for an anonymous copy does not want the identifiers at all).

A purpose the event does not mention counts as denied unless the container's defaults say
otherwise. Every decision carries its reason, which is stored with the event.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from destinations import cleartext
from engine.event import _DOTTED_QUAD, CONSENT_PURPOSES

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

_CLICK_ID_NAMES = frozenset(name.lower() for name in CLICK_ID_FIELDS)

# URL query parameters that identify one click, one person or one email recipient: removed
# from ``page_url`` and ``referrer`` (query and fragment, any case) in the anonymous view.
# Drawn from the platforms' documentation and the browsers' query-stripping lists (Brave's
# query filter, Firefox's strip list). Campaign-level parameters (``utm_*``, ``gad_source``,
# ``mc_cid``) name no one and stay: analytics needs them, as it needs the page path.
TRACKING_PARAMS: frozenset[str] = frozenset(
    {
        # Google: Ads, Display & Video, Search Ads 360 click IDs; the gtag linker ``_gl``
        # (carries the ``_gcl_aw`` gclid and the ``_ga`` cookie, base64) and analytics.js's
        # ``_gac``; ``srsltid``, the per-click ID of Merchant Center auto-tagging.
        "gclid",
        "gclsrc",
        "gbraid",
        "wbraid",
        "dclid",
        "_gl",
        "_gac",
        "srsltid",
        # Ad platforms' click IDs.
        "fbclid",  # Meta
        "fb_action_ids",  # Meta (the sharer's actions)
        "igshid",  # Instagram share (the sharer)
        "igsh",
        "msclkid",  # Microsoft Advertising
        "ttclid",  # TikTok
        "twclid",  # X
        "li_fat_id",  # LinkedIn (a member ID)
        "sccid",  # Snapchat (ScCid)
        "epik",  # Pinterest
        "rdt_cid",  # Reddit
        "qclid",  # Quora
        "yclid",  # Yandex Direct
        "ymclid",  # Yandex Market
        "ysclid",  # Yandex search
        "tblci",  # Taboola
        "dicbo",  # Outbrain
        # Affiliate networks' click references.
        "irclickid",  # impact.com
        "cjevent",  # CJ
        "awc",  # Awin
        "rb_clickid",
        "unicorn_click_id",
        "wickedid",  # Wicked Reports
        "_openstat",  # Openstat
        "_branch_match_id",  # Branch
        # Email and marketing automation: the recipient.
        "mc_eid",  # Mailchimp
        "_kx",  # Klaviyo
        "_ke",  # Klaviyo (the address itself, encoded)
        "_hsenc",  # HubSpot
        "_hsmi",
        "__hstc",
        "__hssc",
        "__hsfp",
        "hsctatracking",
        "mkt_tok",  # Marketo
        "oly_anon_id",  # Omeda
        "oly_enc_id",
        "vero_id",  # Vero
        "vero_conv",
        "__s",  # Drip
        "ml_subscriber",  # MailerLite
        "ml_subscriber_hash",
        "ck_subscriber_id",  # Kit (ConvertKit)
        "ss_email_id",  # Squarespace
        "et_rid",  # Salesforce Marketing Cloud
        "bsft_uid",  # Blueshift
        "bsft_clkid",
        "at_recipient_id",  # Adobe
        "at_recipient_list",
        "_bhlid",  # beehiiv
    }
    | {p.lower() for p in CLICK_ID_FIELDS}
)


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


class ConsentState:
    """One consent signal (with the container's defaults applied) and its decisions, memoized.

    Events carry one of a handful of consent signals, so :class:`ConsentStates` hands out one
    shared state per signal and each tag's decision is worded once per signal, not per event.
    Everything here is immutable once computed; concurrent threads at worst compute the same
    decision twice and store equal values.
    """

    __slots__ = ("_decisions", "filled", "granted", "mentioned")

    def __init__(
        self,
        granted: frozenset[str],
        mentioned: frozenset[str],
        filled: Mapping[str, str] | None = None,
    ) -> None:
        self.granted = granted
        self.mentioned = mentioned
        # The signal as a tag's mapping reads it (GA4's consent, Google Ads' adUserData): the
        # event's, with the container's defaults for the purposes it does not state; None when
        # the defaults add nothing. Shared: copied before it is handed out.
        self.filled = filled
        # Keyed by the requirement's id: a requirement is a dataclass whose hash is computed in
        # Python on every lookup. The requirement is kept in the entry, so its id cannot be
        # reused by another object while the entry exists, and it is checked on every hit.
        self._decisions: dict[int, tuple[Requirement, Decision]] = {}

    @classmethod
    def of(cls, consent: Mapping[str, Any] | None, defaults: Mapping[str, str]) -> ConsentState:
        """The state of one event's ``consent`` (not shared; see :class:`ConsentStates`)."""
        consent = consent or {}
        added = {p: v for p, v in defaults.items() if p not in consent}
        filled = {**consent, **added} if added else None
        return cls(granted_purposes(consent, defaults), frozenset(consent), filled)

    def decide(self, requirement: Requirement) -> Decision:
        """:func:`decide` for this signal, computed once per requirement."""
        found = self._decisions.get(id(requirement))
        if found is not None and found[0] is requirement:
            return found[1]
        if len(self._decisions) >= _MAX_MEMO:
            self._decisions.clear()
        decision = decide(requirement, self.granted, self.mentioned)
        self._decisions[id(requirement)] = (requirement, decision)
        return decision


_MAX_MEMO = 1024


class ConsentStates:
    """The shared :class:`ConsentState` of each consent signal, under one set of defaults.

    A container keeps one (its defaults never change). Keyed by the signal's items: two
    signals with equal items grant and mention the same purposes. Bounded (emptied when
    full), since a client may send purposes of its own; a signal that cannot be a key (an
    unhashable value, possible only in events that were not normalized) gets a fresh state.
    """

    def __init__(self, defaults: Mapping[str, str]) -> None:
        self.defaults = defaults
        self._states: dict[tuple[tuple[str, Any], ...], ConsentState] = {}

    def of(self, consent: Mapping[str, Any] | None) -> ConsentState:
        """The state of one event's ``consent``."""
        key = tuple(consent.items()) if consent else ()
        try:
            found = self._states.get(key)
        except TypeError:
            return ConsentState.of(consent, self.defaults)
        if found is None:
            if len(self._states) >= _MAX_MEMO:
                self._states.clear()
            found = self._states[key] = ConsentState.of(consent, self.defaults)
        return found


def decide(
    requirement: Requirement, granted: frozenset[str], mentioned: frozenset[str]
) -> Decision:
    """Decide how a tag may forward an event.

    Args:
        requirement: the tag's consent requirement.
        granted: purposes granted by the event (defaults applied).
        mentioned: purposes the event states at all, to tell "denied" from "no signal".
    """

    def denied(purposes: list[str]) -> str:
        return ", ".join(p if p in mentioned else f"{p} (no signal)" for p in purposes)

    if not requirement.require and requirement.anonymous is not None:
        # Only anonymous forwarding was asked for: never the identifiers.
        anon_missing = sorted(requirement.anonymous - granted)
        if anon_missing:
            return Decision(Verdict.BLOCKED, f"consent denied: {denied(anon_missing)}")
        return Decision(
            Verdict.ANONYMOUS, "forwarded without identifiers: the tag is anonymous only"
        )
    missing = sorted(requirement.require - granted)
    if not missing:
        needed = ", ".join(sorted(requirement.require)) or "nothing"
        return Decision(Verdict.FULL, f"consent granted (requires {needed})")
    why = denied(missing)
    if requirement.anonymous is not None:
        anon_missing = sorted(requirement.anonymous - granted)
        if not anon_missing:
            return Decision(Verdict.ANONYMOUS, f"forwarded without identifiers: denied {why}")
        # Both ways were shut: say why the copy without identifiers was not sent either.
        why += f"; without identifiers: {denied(anon_missing)}"
    return Decision(Verdict.BLOCKED, f"consent denied: {why}")


def all_purposes_known(purposes: frozenset[str]) -> list[str]:
    """Purposes not among Consent Mode v2's four (for ``tagrelay check``)."""
    return sorted(purposes - set(CONSENT_PURPOSES))


# 6to4 (RFC 3056): the client's IPv4 address is bits 16-48, so a /48 would keep all of it.
_6TO4 = ipaddress.IPv6Network("2002::/16")


def truncate_ip(ip: str) -> str | None:
    """The address with its host part zeroed; None if unreadable.

    IPv4 is cut to /24 and IPv6 to /48, except where an IPv6 address carries an IPv4 address
    in its first 48 bits: an IPv4-mapped address (``::ffff:203.0.113.7``) is its IPv4 address
    cut to /24 (``203.0.113.0``), and a 6to4 address (``2002::/16``) is cut to /40, which
    keeps the embedded IPv4 address's /24 only. Teredo (``2001::/32``) carries the client's
    address in its last 32 bits, which the /48 removes.
    """
    text = ip.strip()
    quad = _DOTTED_QUAD.fullmatch(text)
    if quad is not None:
        # A dotted quad that ipaddress accepts (octets as strict as its parser: ASCII digits,
        # 0-255, no leading zero) is already written the way ipaddress writes it back, so its
        # /24 is its first three octets and a zero: no need to build address objects.
        return f"{quad[1]}.{quad[2]}.{quad[3]}.0"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        prefix = 24
    elif address in _6TO4:
        prefix = 40
    else:
        prefix = 48
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    return str(network.network_address)


def _tracking(field: str) -> bool:
    """Whether one ``name=value`` field of a query names a tracking parameter."""
    name = unquote_plus(field.partition("=")[0]).lower()
    # "&amp;gclid=" is a URL copied out of HTML: the platforms' scripts read it as gclid too.
    return name in TRACKING_PARAMS or name.removeprefix("amp;") in TRACKING_PARAMS


def _strip_query(query: str) -> str:
    """The query without its tracking parameters; the other fields exactly as they were."""
    return "&".join(field for field in query.split("&") if not _tracking(field))


def _strip_fragment(fragment: str) -> str:
    """The fragment without tracking parameters: the gtag linker can put ``_gl`` there
    (``#_gl=...``), and single-page apps that route by fragment carry their query in it
    (``#/landing?gclid=...``). A fragment without ``=`` (``#reviews``) is left as it is."""
    if "?" in fragment:
        route, _, query = fragment.partition("?")
        kept = _strip_query(query)
        if kept == query:
            return fragment
        return f"{route}?{kept}" if kept else route
    return _strip_query(fragment) if "=" in fragment else fragment


def _strip_url(url: str) -> str | None:
    """The URL without tracking parameters; None when it cannot be parsed.

    A URL that cannot be parsed cannot be shown to be free of click IDs, so the anonymous
    view drops it rather than forward it as it came.
    """
    if "?" not in url and "#" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" or a host that is no IP in brackets, for instance
        return None
    query, fragment = _strip_query(parts.query), _strip_fragment(parts.fragment)
    if query == parts.query and fragment == parts.fragment:
        return url  # nothing to remove: the URL exactly as it came
    return urlunsplit(parts._replace(query=query, fragment=fragment))


# Names of a person's IDs and of personal data that cleartext.kind_of leaves to the platforms'
# own fields (it judges what may be hashed), compared in lower case without "_", "-" or ".".
_PERSON_NAMES = frozenset(
    {"userid", "externalid", "customerid", "customernumber", "accountid", "memberid"}
    | {"username", "login", "zip", "zipcode", "postcode", "postalcode"}
)
_NAME_PUNCTUATION = str.maketrans("", "", "_-.")

# Click IDs inside a longer name (``last_gclid``, Microsoft's ``_uetmsclkid`` cookie), compared
# without punctuation; the short ones (``fbc``, ``ttp``, ``epik``) only as whole names.
_CLICK_ID_ENDINGS = tuple(
    sorted({n.translate(_NAME_PUNCTUATION) for n in _CLICK_ID_NAMES if len(n) >= 5})
)
# The platforms' cookies under their cookie names, without their leading "_" and punctuation
# (``_gcl_aw``, ``_gcl_dc``... and analytics.js's ``_gac_<property>`` hold the gclid; Reddit's,
# Snap's, Pinterest's and Microsoft's visitor cookies), and mobile advertising IDs.
_AD_COOKIE_PREFIXES = ("gcl",)
_AD_COOKIES = frozenset({"rdtuuid", "scid", "pinunauth", "uetvid", "uetsid"})
_ADVERTISING_IDS = frozenset({"idfa", "idfv", "gaid", "aaid", "madid", "advertisingid"})
# A raw IP under a name other than the canonical ``context.ip`` (which is truncated instead):
# ``client_ip``, ``clientIP``, ``ip_v6``, ``X-Real-IP``, a copied ``x_forwarded_for``,
# ``forwarded``, ``remote_addr``. Read by words, so that ``shipping`` or ``vip`` are not IPs.
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_IP_WORDS = frozenset({"ip", "ipv", "ips", "forwarded"})


def _identifies(name: object, depth: int = 0) -> bool:
    """Whether a ``context`` field of this name identifies a person: a click ID or platform
    cookie in any spelling (``gclid``, ``_fbp``, ``_gcl_aw``), a mobile advertising ID, an IP
    address under any name but the top-level ``ip`` (which is truncated instead), a person's
    ID, an address of any kind (``billing_address``, ``ip_address``), or personal data by its
    name (as ``tagrelay check`` reads names). ``depth``: 0 for the fields of ``context``."""
    return isinstance(name, str) and _name_identifies(name, depth > 0)


# The same few field names come with every event: each is read once (a dozen string tests and
# a regular expression, which doubled the cost of an anonymous copy), then remembered; bounded,
# as clients choose the names.
@functools.lru_cache(maxsize=4096)
def _name_identifies(name: str, nested: bool) -> bool:
    if name == "ip":  # context.ip, truncated by strip_identifiers; "IP" or "Ip" is not
        return nested
    lowered = name.lower()
    unprefixed = lowered.lstrip("_")
    if lowered in _CLICK_ID_NAMES or unprefixed in _CLICK_ID_NAMES:
        return True
    if lowered in TRACKING_PARAMS or unprefixed in TRACKING_PARAMS:
        # What identifies a click or a recipient in a URL's query (``yclid``, ``irclickid``,
        # ``_kx``, ``mc_eid``) identifies them as a field of its own too.
        return True
    bare = lowered.translate(_NAME_PUNCTUATION)
    if (
        bare.endswith(_CLICK_ID_ENDINGS)
        or bare.startswith(_AD_COOKIE_PREFIXES)
        or (lowered.startswith("_gac") and bare.startswith("gac"))
        or bare in _AD_COOKIES
        or bare in _ADVERTISING_IDS
        or bare.endswith("addr")
        or _names_an_ip(name, bare)
    ):
        return True
    return bare in _PERSON_NAMES or bare.endswith("address") or cleartext.kind_of(name) is not None


def _names_an_ip(name: str, bare: str) -> bool:
    """Whether a field's name says it holds an IP address (``bare``: the name in lower case
    without punctuation): ``IP``, ``client_ip``, ``clientIP``, ``ip_v6``, ``x_forwarded_for``."""
    return bare in _IP_WORDS or any(word.lower() in _IP_WORDS for word in _WORDS.findall(name))


@functools.lru_cache(maxsize=4096)
def _other_ip_name(name: str, nested: bool) -> bool:
    """Whether a ``context`` field of this name holds an IP address, but for the canonical
    top-level ``ip`` (which the IP policy reads itself): ``client_ip``, ``X-Real-IP``, a copied
    ``x_forwarded_for``, ``forwarded``, ``remote_addr``, a nested ``device.ip``."""
    if name == "ip":
        return nested
    bare = name.lower().translate(_NAME_PUNCTUATION)
    return bare.endswith("remoteaddr") or _names_an_ip(name, bare)


def drop_other_ips(value: Any, depth: int = 0) -> None:
    """Remove, in place, the fields of ``context`` (at any depth, in objects and lists) that
    hold an IP address under another name than the top-level ``ip``: what the IP policy does
    not keep whole must not stay under a name of the client's choosing."""
    if depth > 64:  # intake refuses deeper events
        return
    if isinstance(value, dict):
        for key in [k for k in value if isinstance(k, str) and _other_ip_name(k, depth > 0)]:
            del value[key]
        inner_values: Any = value.values()
    elif isinstance(value, list):
        inner_values = value
    else:
        return
    for inner in inner_values:
        if isinstance(inner, dict | list):  # a text or a number holds no fields: not walked
            drop_other_ips(inner, depth + 1)


_DROPPED = object()  # a URL that cannot be parsed: left out (see _strip_url)


def _without_identifying_fields(value: Any, depth: int = 0) -> Any:
    """``value`` with the fields :func:`_identifies` names removed, in objects at any depth
    (``context.customer.email``) and in lists, and the :data:`TRACKING_PARAMS` removed from
    every text with a query or a fragment (a ``landing_url``, a ``page.url`` as well as the
    ``page_url``: see :func:`_strip_url`); other values as they are."""
    if depth > 64:  # intake refuses deeper events; nothing of a person is left this far down
        return None
    if isinstance(value, str):
        if "?" not in value and "#" not in value:
            return value
        clean = _strip_url(value)
        return _DROPPED if clean is None else clean
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not _identifies(k, depth):
                kept = _without_identifying_fields(v, depth + 1)
                if kept is not _DROPPED:
                    out[k] = kept
        return out
    if isinstance(value, list):
        kept_items = (_without_identifying_fields(v, depth + 1) for v in value)
        return [v for v in kept_items if v is not _DROPPED]
    return value


def strip_identifiers(event: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the event with no way back to a person: for analytics-only forwarding.

    Drops ``user_data`` and ``user_id``, every click ID and platform cookie, any other
    ``context`` field, at any depth, whose name says it holds personal data, an address or a
    person's ID (``email``, ``phone``, ``first_name``, ``billing_address``, ``user_id``,
    ``external_id``...; see :func:`_identifies`), the :data:`TRACKING_PARAMS`
    from the page URL, the referrer and any other URL in ``context`` (a URL that cannot be
    parsed is dropped whole), and truncates the IP (:func:`truncate_ip`).
    """
    stripped = {k: v for k, v in event.items() if k not in ("user_data", "user_id")}
    context = event.get("context")
    if isinstance(context, dict):
        # Any spelling: a client that sends ``GCLID`` or ``Fbp`` identifies the person as well.
        ctx = _without_identifying_fields(context)
        if isinstance(ctx.get("ip"), str):
            ctx["ip"] = truncate_ip(ctx["ip"])
        stripped["context"] = ctx
    return stripped
