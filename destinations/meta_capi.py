"""Meta (Facebook/Instagram) Conversions API (reference/platforms.md §1)."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, ClassVar
from urllib.parse import urlencode

from destinations import cleartext, normalize, values
from destinations.base import (
    Destination,
    HttpRequest,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    PayloadContext,
    PayloadError,
    SendContext,
    refusal,
    retry_after_seconds,
    retryable_status,
    status_result,
    undocumented_targets,
)

DEFAULT_ENDPOINT = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v26.0"
ACTION_SOURCES = (
    "email",
    "website",
    "app",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
)
MAX_AGE = timedelta(days=7)
MAX_AGE_PHYSICAL_STORE = timedelta(days=62)
SEND_MARGIN = timedelta(minutes=5)
"""An item this close to the age limit at send time is given up: it could cross the limit in
flight, and one too-old event makes Meta reject the whole request."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# What counts as an object: dict comes first, since an exact type test is much cheaper than
# the Mapping ABC check that a dict would pass anyway.
_MAPPING = (dict, Mapping)
_RETRY_CODES = frozenset({1, 2, 4, 17, 32, 613})
_AUTH_CODES = frozenset({10, 102, 104, 190})
_NO_SUCH_OBJECT = 33  # error_subcode of code 100: the pixel does not exist, or no access to it
# Where Meta takes each kind of personal data, hashed (named when a payload holds it in clear
# text elsewhere: see destinations.cleartext).
PERSONAL_HOMES = {
    "email": "user_data.em",
    "phone": "user_data.ph",
    "first_name": "user_data.fn",
    "last_name": "user_data.ln",
    "date_of_birth": "user_data.db",
}
# Mapped fields build_payload reads itself; the other mapped fields are passed on as they are.
# event_time and event_name are always the event's own timestamp and the tag's event name.
_BUILT_FIELDS = frozenset(
    {"fbclid", "action_source", "event_time", "event_name", "event_source_url", "user_data"}
    | {"custom_data", "event_id"}
)
_CLEAR_USER_FIELDS = frozenset({"client_ip_address", "client_user_agent", "fbc", "fbp"})
# The user_data of a copy without identifiers (analytics-only consent): the IP, which the
# engine has truncated, and the user agent, which website events require. Nothing that names a
# person or a click (hashed fields, external_id, fbc, fbp...), whatever the tag maps there.
_ANONYMOUS_USER_FIELDS = frozenset({"client_ip_address", "client_user_agent"})
# The server event's top-level fields Meta documents (platforms.md §1), and fbclid, read here.
_DOCUMENTED_FIELDS = _BUILT_FIELDS | {
    "opt_out",
    "referrer_url",
    "data_processing_options",
    "data_processing_options_country",
    "data_processing_options_state",
    "customer_segmentation",
    "advertiser_tracking_enabled",
    "messaging_channel",
    "original_event_data",
    "attribution_data",
    "app_data",
}
# Meta answers an event with a key it does not know "(#100) Unexpected key ... on param
# $['data'][0]" (reported by SDK users: facebook-nodejs-business-sdk issue 258), refusing the
# whole request; delivery then splits the batch until the tag's events are dead letters.
_UNDOCUMENTED_FATE = (
    "Meta refuses an event with a key it does not know, so every event of this tag would "
    "become a dead letter"
)
# Customer information Meta refuses an event for when it is all the event has: these sets or
# any part of them (platforms.md §1.3, "invalid-alone combinations", the Graph API v13.0
# rule). One such event fails the whole request it is sent in.
_INVALID_ALONE = (
    frozenset({"ct", "country", "st", "zp", "ge", "client_user_agent"}),
    frozenset({"db", "client_user_agent"}),
    frozenset({"fn", "ge"}),
    frozenset({"ln", "ge"}),
)
# Meta's click and browser cookies (platforms.md §1.5): fb.<subdomain index>.<creation time in
# ms>.<fbclid | random number>, with the appendix Meta's Parameter Builder may add. Meta refuses
# the whole request for one in another shape (code 100, "Click ID Incorrectly Formatted"), so
# such a value (a JavaScript "undefined", a bare fbclid, a time in seconds) is left out.
_COOKIE_SHAPES = {
    "fbc": re.compile(r"fb\.\d\.\d{13}\.\S+"),
    "fbp": re.compile(r"fb\.\d\.\d{13}\.\d+(?:\.[A-Za-z0-9]{2,8})?"),
}
# An IPv4 address in its canonical dotted form (no leading zeros, octets up to 255), which
# ``ipaddress`` reads and writes back unchanged.
_CANONICAL_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
)


class MetaCapi(Destination):
    """Meta Conversions API: ``POST {endpoint}/{api_version}/{pixel_id}/events``.

    The request is form-encoded (``data`` = the JSON array of events, ``access_token``, and
    ``test_event_code`` when set), as in Meta's official example; a JSON body is only seen in
    third-party code (platforms.md §8.1). The token travels in the body, not the URL, so it
    stays out of proxy logs.

    Default mapping (target -> canonical event)::

        event_id                      event_id
        event_source_url              context.page_url
        referrer_url                  context.referrer
        user_data.em                  user_data.email          hashed
        user_data.ph                  user_data.phone          digits with country code, hashed
        user_data.fn / ln             user_data.first_name / last_name   hashed
        user_data.db                  user_data.date_of_birth  YYYYMMDD, hashed
        user_data.ge                  user_data.gender         f/m, hashed
        user_data.ct / st / zp        user_data.city / state / postal_code   hashed
        user_data.country             user_data.country        ISO alpha-2 lowercase, hashed
        user_data.external_id         user_data.external_id || user_id       hashed
        user_data.client_ip_address   context.ip               never hashed
        user_data.client_user_agent   context.user_agent       never hashed
        user_data.fbc / fbp           context.fbc / context.fbp              never hashed
        fbclid                        context.fbclid   (input only: builds user_data.fbc)
        custom_data.value / currency  properties.value / properties.currency
        custom_data.order_id          properties.order_id
        custom_data.contents          properties.items -> {id, quantity, item_price, title}
        custom_data.content_ids       properties.items[].id
        custom_data.content_type      "product" when there are items

    In a copy without identifiers (``ctx.restricted``: analytics-only consent) ``user_data``
    keeps only ``client_ip_address`` and ``client_user_agent``, and no ``fbc`` is built, even
    from what a tag maps there out of ``properties``.

    ``event_name`` is the tag's event name, ``event_time`` the event's timestamp, and
    ``action_source`` the tag's mapping, else the ``action_source`` setting (``website``).
    When no ``fbc`` is given it is built as ``fb.1.<event time ms>.<fbclid>`` from ``fbclid``
    or from the ``fbclid`` query parameter of ``event_source_url``; fbclid is never altered.
    An ``fbc`` or ``fbp`` not in Meta's format (``fb.<n>.<ms>.<fbclid or number>``, with the
    Parameter Builder's appendix or without) is left out, as is an fbclid with a space in it:
    Meta refuses the whole request for one (an ``fbc`` left out is built from ``fbclid``).
    A national phone number is read in the person's country (the mapped
    ``user_data.country``, else the event's), else ``default_country``.

    Rules enforced before sending: events older than 7 days (62 for ``physical_store``) are
    refused at intake and given up at send time, because one old event fails the whole
    request; ``action_source`` is required; ``website`` events need ``event_source_url``
    (http/https) and ``client_user_agent``; ``Purchase`` needs ``value`` and ``currency``;
    ``user_data`` must not be only one of the combinations Meta refuses alone (``ct``,
    ``country``, ``st``, ``zp``, ``ge`` and ``client_user_agent``; ``db`` and
    ``client_user_agent``; ``fn`` and ``ge``; ``ln`` and ``ge``; or part of one), such as a
    user agent without an IP address.

    Unconfirmed (platforms.md §8), read safely: the Business-Use-Case rate-limit codes
    80000-80014 are retried; Graph OAuth codes 102 and 104 are treated as auth errors; a 2xx
    answer without ``events_received`` is retried (dedup by ``event_id`` makes a resend safe).
    """

    name: ClassVar[str] = "meta_capi"
    max_batch: ClassVar[int] = 1000
    secret_settings: ClassVar[frozenset[str]] = frozenset({"access_token"})
    settings_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "pixel_id": {
                "type": ["string", "integer"],
                "pattern": "^[0-9]+$",
                "description": "The pixel (dataset) ID.",
            },
            "access_token": {
                "type": "string",
                "minLength": 1,
                "description": "Conversions API or system-user access token.",
            },
            "api_version": {
                "type": "string",
                "pattern": r"^v[0-9]+\.[0-9]+$",
                "default": DEFAULT_API_VERSION,
            },
            "test_event_code": {
                "type": "string",
                "minLength": 1,
                "description": "Events Manager test code; events then show under Test Events.",
            },
            "default_country": {
                "type": "string",
                "minLength": 2,
                "description": "ISO alpha-2 country for phone numbers written without one.",
            },
            "action_source": {"enum": list(ACTION_SOURCES), "default": "website"},
            "endpoint": {
                "type": "string",
                "pattern": "^https?://",
                "default": DEFAULT_ENDPOINT,
                "description": "Base URL (a proxy, or an emulator in tests).",
            },
        },
        "required": ["pixel_id", "access_token"],
        "additionalProperties": False,
    }
    hashed_fields: ClassVar[frozenset[str]] = frozenset(
        f"user_data.{key}"
        for key in ("em", "ph", "fn", "ln", "db", "ge", "ct", "st", "zp", "country", "external_id")
    )
    personal_homes: ClassVar[Mapping[str, str]] = PERSONAL_HOMES
    default_mapping: ClassVar[Mapping[str, str]] = {
        "event_id": "event_id",
        "event_source_url": "context.page_url",
        "referrer_url": "context.referrer",
        "user_data.em": "user_data.email",
        "user_data.ph": "user_data.phone",
        "user_data.fn": "user_data.first_name",
        "user_data.ln": "user_data.last_name",
        "user_data.db": "user_data.date_of_birth",
        "user_data.ge": "user_data.gender",
        "user_data.ct": "user_data.city",
        "user_data.st": "user_data.state",
        "user_data.zp": "user_data.postal_code",
        "user_data.country": "user_data.country",
        "user_data.external_id": "user_data.external_id || user_id",
        "user_data.client_ip_address": "context.ip",
        "user_data.client_user_agent": "context.user_agent",
        "user_data.fbc": "context.fbc",
        "user_data.fbp": "context.fbp",
        "fbclid": "context.fbclid",
        "custom_data.value": "properties.value",
        "custom_data.currency": "properties.currency",
        "custom_data.order_id": "properties.order_id",
        "custom_data.contents": (
            "properties.items[].{id: id, quantity: quantity, item_price: price, title: name}"
        ),
        "custom_data.content_ids": "properties.items[].id",
        "custom_data.content_type": "properties.items[0] && 'product'",
    }

    def mapping_warnings(
        self, event_names: Collection[str] | None, targets: Sequence[str]
    ) -> dict[str, str]:
        """A target passed on as written that Meta does not document (a did-you-mean when its
        name is close to one it does)."""
        return undocumented_targets(targets, _DOCUMENTED_FIELDS, "Meta", _UNDOCUMENTED_FATE)

    def constant_problem(self, target: str, value: Any) -> str | None:
        """A constant ``action_source`` Meta does not take, or a ``custom_data`` field read here
        (``currency``, ``value``...) that its check refuses."""
        if target == "action_source":
            return refusal(lambda: _action_source(value))
        root, _, field = target.partition(".")
        if root == "custom_data" and field in _CUSTOM_BUILT_FIELDS:
            return refusal(lambda: _custom_data({field: value}))
        return None

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        # Read once: build_payload runs for every event.
        self._action_source: Any = self.settings.get("action_source", "website")
        self._default_country = _text(self.settings.get("default_country"))

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """One server event for ``data[]``: normalized, hashed and checked.

        Raises:
            PayloadError: the event breaks a Meta rule (the message names it).
        """
        fbclid = mapped.get("fbclid")
        action_source = _action_source(mapped.get("action_source") or self._action_source)
        age = (ctx.now or datetime.now(UTC)) - ctx.event_time
        if age > _max_age(action_source):
            raise PayloadError(
                f"event_time must be within {_max_age(action_source).days} days"
                f" for action_source {action_source}"
            )
        event_time = int(ctx.event_time.timestamp())

        source_url = _text(mapped.get("event_source_url"))
        user_data = self._user_data(mapped.get("user_data"), ctx.event, ctx.restricted)
        if "fbc" not in user_data and not ctx.restricted:
            fbclid = _text(fbclid)
            if fbclid and "@" in fbclid:  # built into fbc, so not checked as passed on
                cleartext.check(fbclid, "fbclid", "Meta", PERSONAL_HOMES)
            fbclid = fbclid or normalize.url_param(source_url, "fbclid")
            if fbclid:
                created_ms = (ctx.event_time - _EPOCH) // timedelta(milliseconds=1)
                fbc = f"fb.1.{created_ms}.{fbclid}"
                if _COOKIE_SHAPES["fbc"].fullmatch(fbc):  # not of an fbclid with a space in it
                    user_data["fbc"] = fbc
        custom_data = _custom_data(mapped.get("custom_data"))

        if action_source == "website":
            if not source_url or not source_url.lower().startswith(("http://", "https://")):
                raise PayloadError("website events require event_source_url (http or https)")
            if "client_user_agent" not in user_data:
                raise PayloadError("website events require user_data.client_user_agent")
        if not user_data:
            raise PayloadError("user_data needs at least one customer information parameter")
        if any(weak.issuperset(user_data) for weak in _INVALID_ALONE):
            raise PayloadError(
                f"user_data holds only {', '.join(sorted(user_data))}: Meta refuses an event"
                " whose only customer information is ct, country, st, zp, ge and"
                " client_user_agent, db and client_user_agent, fn and ge, ln and ge, or part"
                " of one of these (add em, ph, external_id, client_ip_address, fbc or fbp)"
            )
        if ctx.event_name == "Purchase" and not {"value", "currency"} <= set(custom_data):
            raise PayloadError("Purchase events require custom_data.value and currency")

        payload: dict[str, Any] = {
            "event_name": ctx.event_name,
            "event_time": event_time,
            "event_id": _id(mapped.get("event_id") or ctx.event_id, "event_id"),
            "action_source": action_source,
        }
        if source_url:
            payload["event_source_url"] = source_url
        payload["user_data"] = user_data
        if custom_data:
            payload["custom_data"] = custom_data
        for key, value in mapped.items():
            if value is not None and key not in _BUILT_FIELDS:
                _passed_on(value, key)
                payload[key] = value
        return payload

    def _user_data(
        self, raw: object, event: Mapping[str, Any], restricted: bool = False
    ) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, _MAPPING):
            raise PayloadError("user_data must be an object")
        if restricted:
            raw = {k: v for k, v in raw.items() if k in _ANONYMOUS_USER_FIELDS}
        # Page views and the like carry nothing to hash: no region to work out then.
        hashed = not _HASHED_FIELDS.isdisjoint(raw)
        hashers = _hashers(self._region(raw, event)) if hashed else {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            hasher = hashers.get(key)
            if hasher is not None:
                digest = normalize.hashed_values(value, hasher)
                if digest is not None:
                    out[key] = digest
            elif key in _CLEAR_USER_FIELDS:
                text = _text(value)
                if key == "client_ip_address" and text:
                    text = _ip(text)
                if text:
                    # Sent as it is: no e-mail address from a mapping that falls back to one.
                    if "@" in text:
                        cleartext.check(text, f"user_data.{key}", "Meta", PERSONAL_HOMES)
                    shape = _COOKIE_SHAPES.get(key)
                    if shape is None or shape.fullmatch(text):
                        out[key] = text
            elif value is not None:
                # Other Meta fields that are never hashed (lead_id, ...), passed on as mapped.
                _passed_on(value, f"user_data.{key}")
                out[key] = value
        return out

    def _region(self, raw: Mapping[str, Any], event: Mapping[str, Any]) -> str | None:
        """The country that national phone numbers, states and postal codes are read in: the
        person's, as Google Ads and TikTok read it (the mapped ``user_data.country``, else the
        event's own, which a tag may keep out of Meta's payload), else ``default_country``."""
        person = event.get("user_data")
        for value in (
            raw.get("country"),
            person.get("country") if isinstance(person, _MAPPING) else None,
        ):
            country = _text(value)
            if country and not normalize.is_hashed(country) and normalize.country(country, "meta"):
                return country
        return self._default_country

    # -- delivery -------------------------------------------------------------------------------

    def check_item(self, item: Item, ctx: SendContext) -> str | None:
        """Give up an event that is (about to be) past Meta's age limit."""
        event_time = item.payload.get("event_time")
        if not isinstance(event_time, int | float):
            return None
        limit = _max_age(str(item.payload.get("action_source", "")))
        if ctx.now - datetime.fromtimestamp(event_time, UTC) > limit - SEND_MARGIN:
            return f"event_time older than {limit.days} days: Meta would reject the request"
        return None

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One form-encoded POST carrying up to 1,000 events."""
        if len(items) > self.max_batch:
            raise ValueError(f"Meta takes at most {self.max_batch} events per request")
        base = str(self.settings.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        version = self.settings.get("api_version") or DEFAULT_API_VERSION
        url = f"{base}/{version}/{self.settings['pixel_id']}/events"
        data = [dict(item.payload) for item in items]
        form = {"data": json.dumps(data, separators=(",", ":"), ensure_ascii=False)}
        if self.settings.get("test_event_code"):
            form["test_event_code"] = str(self.settings["test_event_code"])
        form["access_token"] = str(self.settings["access_token"])
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return HttpRequest("POST", url, headers, urlencode(form).encode())

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """The same result for every item: Meta accepts or rejects a request as a whole."""
        return [_result(response)] * len(items)


@lru_cache(maxsize=64)
def _hashers(region: str | None) -> Mapping[str, normalize.Normalizer]:
    """The normalizer of each hashed user_data key; ``region`` reads national phone numbers,
    states and postal codes. Built once per region (a country name or code, few distinct)."""
    return {
        "em": lambda v: normalize.email(v, "meta"),
        "ph": lambda v: normalize.phone(v, "meta", region),
        "fn": lambda v: normalize.name(v, "meta"),
        "ln": lambda v: normalize.name(v, "meta"),
        "db": lambda v: normalize.date_of_birth(v, "meta"),
        "ge": lambda v: normalize.gender(v, "meta"),
        "ct": lambda v: normalize.city(v, "meta"),
        "st": lambda v: normalize.state(v, "meta", region),
        "zp": lambda v: normalize.postal_code(v, "meta", region),
        "country": lambda v: normalize.country(v, "meta"),
        "external_id": lambda v: normalize.external_id(v, "meta"),
    }


_HASHED_FIELDS = frozenset(_hashers(None))


def _action_source(value: Any) -> str:
    """Raises: PayloadError: ``value`` is no action source Meta takes."""
    if value not in ACTION_SOURCES:
        raise PayloadError(f"action_source must be one of {', '.join(ACTION_SOURCES)}")
    return str(value)


def _max_age(action_source: str) -> timedelta:
    return MAX_AGE_PHYSICAL_STORE if action_source == "physical_store" else MAX_AGE


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    return values.scalar_text(value)


def _ip(text: str) -> str | None:
    if _CANONICAL_IPV4.fullmatch(text):
        return text  # what str(ipaddress.ip_address(text)) gives, without the parse
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _number(value: object, field: str) -> float:
    return values.number(value, f"custom_data.{field}")


# custom_data fields _custom_data reads itself; the others are passed on as they are.
_CUSTOM_BUILT_FIELDS = frozenset(
    {"value", "predicted_ltv", "net_revenue", "currency", "order_id", "content_ids", "contents"}
)


def _passed_on(value: Any, field: str) -> None:
    """Refuse a value passed on as mapped that JSON cannot carry or that holds personal data in
    clear text (a mapping to ``user_data.email`` instead of ``user_data.em``, say)."""
    values.check_json(value, field)
    cleartext.check(value, field, "Meta", PERSONAL_HOMES)


def _custom_data(raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, _MAPPING):
        raise PayloadError("custom_data must be an object")
    out = {k: v for k, v in raw.items() if v is not None}
    for key in ("value", "predicted_ltv", "net_revenue"):
        if key in out:
            out[key] = _number(out[key], key)
    if "currency" in out:
        currency = out["currency"]
        currency = currency.strip().upper() if isinstance(currency, str) else ""
        if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
            raise PayloadError("custom_data.currency must be an ISO 4217 code")
        out["currency"] = currency
    if "order_id" in out:
        out["order_id"] = _id(out["order_id"], "custom_data.order_id")
    if "content_ids" in out:
        ids = out["content_ids"] if isinstance(out["content_ids"], list) else [out["content_ids"]]
        out["content_ids"] = [_id(i, "custom_data.content_ids[]") for i in ids if i is not None]
    if "contents" in out:
        out["contents"] = _contents(out["contents"])
    for key, value in out.items():
        if key not in _CUSTOM_BUILT_FIELDS:
            _passed_on(value, f"custom_data.{key}")
    return {k: v for k, v in out.items() if v not in ([], {}, None)}


def _contents(raw: object) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise PayloadError("custom_data.contents must be a list")
    contents = []
    for entry in raw:
        if not isinstance(entry, _MAPPING) or entry.get("id") is None:
            continue  # Meta requires an id on every content
        content = {k: v for k, v in entry.items() if v is not None}
        content["id"] = values.text(content["id"], "custom_data.contents[].id")
        if "quantity" in content:
            content["quantity"] = values.integer(
                content["quantity"], "custom_data.contents[].quantity"
            )
        if "item_price" in content:
            content["item_price"] = values.number(
                content["item_price"], "custom_data.contents[].item_price"
            )
        _passed_on(content, "custom_data.contents[]")
        contents.append(content)
    return contents


def _result(response: HttpResponse) -> ItemResult:
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if 200 <= response.status < 300 and error is None:
        if isinstance(body, dict) and isinstance(body.get("events_received"), int):
            return ItemResult.delivered()
        return ItemResult(Outcome.RETRYABLE, f"unexpected answer: {response.excerpt(200)}")
    if not isinstance(error, dict):
        return status_result(response)
    code = error.get("code") if isinstance(error.get("code"), int) else None
    reason = _reason(error)
    retry_after = retry_after_seconds(response.headers)
    if code in _RETRY_CODES or (code is not None and 80000 <= code <= 80014):
        return ItemResult(Outcome.RETRYABLE, reason, retry_after)
    if code in _AUTH_CODES or (code is not None and 200 <= code <= 299):
        return ItemResult(Outcome.AUTH, reason)
    if code == 100 and error.get("error_subcode") == _NO_SUCH_OBJECT:
        # "Object with ID ... does not exist, cannot be loaded due to missing permissions": the
        # pixel ID, or the token's access to it, is wrong for every event alike. A setting to
        # fix, as a token error is: the events wait for it rather than all becoming dead letters.
        return ItemResult(Outcome.AUTH, reason)
    if error.get("is_transient") is True or response.status >= 500:
        return ItemResult(Outcome.RETRYABLE, reason, retry_after)
    if code is None and response.status in (401, 403):
        return ItemResult(Outcome.AUTH, reason)
    if code is None and retryable_status(response.status):
        return ItemResult(Outcome.RETRYABLE, reason, retry_after)
    # "If any event in data is [invalid], the whole request fails": which one is not said.
    return ItemResult(Outcome.PERMANENT, reason, whole_request=True)


def _reason(error: Mapping[str, Any]) -> str:
    code = error.get("code")
    subcode = error.get("error_subcode")
    parts = [f"Meta error {code}" + (f"/{subcode}" if subcode is not None else "")]
    for key in ("type", "message", "error_user_msg", "fbtrace_id"):
        value = error.get(key)
        if isinstance(value, str | int) and value != "":
            parts.append(f"{key}={value}")
    return "; ".join(parts)[:500]


def _id(value: object, field: str) -> str:
    """An ID Meta receives as it is: text, and no e-mail address (see
    :func:`cleartext.identifier`)."""
    return cleartext.identifier(value, field, "Meta", PERSONAL_HOMES)
