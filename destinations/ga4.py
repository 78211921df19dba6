"""``ga4``: Google Analytics 4 Measurement Protocol (see reference/platforms.md §2)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
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
    json_size,
    refusal,
    status_result,
)

DEFAULT_ENDPOINT = "https://www.google-analytics.com"
MAX_AGE = timedelta(hours=72)
_TOO_OLD = "GA4: timestamp_micros is older than the 72-hour backdating limit"
MAX_BODY_BYTES = 130_000
MAX_PARAMS = 25
MAX_ITEMS = 200
MAX_NAME = 40
MAX_VALUE = 100
MAX_USER_ID = 256
MAX_USER_PROPERTIES = 25
MAX_USER_PROPERTY_NAME = 24
MAX_USER_PROPERTY_VALUE = 36
# Longer values GA's own collection limits allow for these params; longer ones are truncated
# (descriptive context is not worth losing the event over).
LONG_PARAMS = {"page_location": 1000, "page_referrer": 420, "page_title": 300}

# The Measurement Protocol reference's own reserved list, plus the app-store subscription
# events that platforms.md §2.4 names among those never to send. The longer "event naming
# rules" list in GA's help centre (page_view, click, scroll, form_*, video_*, ...) governs
# events created in the GA interface; page_view and the enhanced-measurement names are what
# server-side setups send through MP every day, so refusing them would silently lose page
# views. Safest reading: refuse what MP itself reserves and the app-store events, which no
# server-side setup has reason to send.
RESERVED_EVENTS = frozenset(
    {"ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query", "ad_reward"}
    | {"adunit_exposure", "app_background", "app_clear_data", "app_exception", "app_install"}
    | {"app_remove", "app_store_refund", "app_update", "app_upgrade", "dynamic_link_app_open"}
    | {"app_store_subscription_cancel", "app_store_subscription_renew"}
    | {"dynamic_link_app_update", "dynamic_link_first_open", "error", "firebase_campaign"}
    | {"first_open", "first_visit", "in_app_purchase", "notification_dismiss"}
    | {"notification_foreground", "notification_open", "notification_receive"}
    | {"notification_send", "os_update", "screen_view", "session_start", "user_engagement"}
)
# session_id and engagement_time_msec are reserved for UI-created events only: MP expects them.
RESERVED_PARAMS = frozenset({"gclid", "session_number"})
RESERVED_USER_PROPERTIES = frozenset(
    {"first_open_time", "first_visit_time", "last_deep_link_referrer", "user_id"}
    | {"first_open_after_install"}
)
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
TOP_LEVEL_FIELDS = frozenset(
    {"client_id", "user_id", "user_data", "consent", "user_properties", "ip_override"}
    | {"user_agent", "user_location", "device", "non_personalized_ads", "params"}
)
NAME_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")
GA_COOKIE = re.compile(r"GA\d\.\d+\.(\d+\.\d+)")
SESSION_COOKIE = re.compile(r"GS\d\.\d+\.s?(\d+)")
# Request fields and params passed on as mapped (checked for personal data in clear text).
_PASSED_ON_REQUEST = (
    "client_id",
    "ip_override",
    "user_agent",
    "user_location",
    "device",
    "user_properties",
)
_BUILT_PARAMS = frozenset({"session_id", "value", "currency", "transaction_id"})
# Where GA4 takes each kind of personal data, hashed (see destinations.cleartext).
PERSONAL_HOMES = {
    "email": "user_data.sha256_email_address",
    "phone": "user_data.sha256_phone_number",
    "first_name": "user_data.address.sha256_first_name",
    "last_name": "user_data.address.sha256_last_name",
    "street": "user_data.address.sha256_street",
}
CONSENT_VALUES = {"granted": "GRANTED", "denied": "DENIED"}
# What counts as an object: dict comes first, since an exact type test is much cheaper than
# the Mapping ABC check that a dict would pass anyway.
_MAPPING = (dict, Mapping)
# The body as sent (compact, UTF-8): one encoder for every size check. It refuses NaN and the
# infinities, which fields passed on as mapped (params, user_location, ...) could hold.
_BODY_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# A request body is the request-level object with its events added (see build_request):
#   {<request fields>,"events":[<event>,<event>,...],"validation_behavior":"..."}
# so it is the request's JSON, plus _EVENTS_FRAME, plus each event and a comma between two,
# plus _VALIDATE_FIELD in validate mode (which the intake check always counts: 49 bytes is not
# worth a second rule). A stored payload is {"request":<request>,"event":<event>}:
# _PAYLOAD_FRAME around the two.
_EVENTS_FRAME = len(',"events":[]')
_VALIDATE_FIELD = len(',"validation_behavior":"ENFORCE_RECOMMENDATIONS"')
_PAYLOAD_FRAME = len('{"request":,"event":}')


class GA4(Destination):
    """Google Analytics 4 Measurement Protocol, web streams (reference/platforms.md §2).

    Settings: ``measurement_id`` (``G-…``), ``api_secret``, ``validate`` (send to
    ``/debug/mp/collect`` with ``validation_behavior: ENFORCE_RECOMMENDATIONS`` and report its
    ``validationMessages``; nothing reaches reports), ``default_country`` (for phone numbers
    without a country code when the event has no ``user_data.country``) and ``endpoint`` (base
    URL; ``https://region1.google-analytics.com`` for EU collection, or a proxy or emulator).

    Default mapping (target -> canonical event)::

        client_id                          context.ga_client_id || visitor_id
        user_id                            user_id
        ip_override                        context.ip            (never hashed)
        user_agent                         context.user_agent    (never hashed)
        consent.ad_user_data               consent.ad_user_data  ("granted" -> "GRANTED")
        consent.ad_personalization         consent.ad_personalization
        params.transaction_id              properties.related_order_id || properties.order_id
        params.value / params.currency     properties.value / properties.currency
        params.items                       properties.items[] as {item_id, item_name, price,
                                           quantity}
        params.session_id                  context.ga_session_id
        params.page_location               context.page_url
        params.page_referrer               context.referrer
        user_data.sha256_email_address     user_data.email       (normalized, hashed)
        user_data.sha256_phone_number      user_data.phone       (E.164 with +, hashed)
        user_data.address.sha256_first_name / sha256_last_name   (hashed)
        user_data.address.city / region / postal_code / country  (normalized, clear text)

    ``client_id`` is required for web streams: without the GA cookie's client ID it falls back
    to the event's ``visitor_id``, which GA then counts as a separate (server-side) user. A raw
    ``_ga`` cookie value (``GA1.1.<id>``) and a raw ``_ga_<stream>`` session cookie are reduced
    to the IDs. ``transaction_id`` prefers ``related_order_id`` so that a ``refund`` event names
    the original order. The tag's ``event_name`` is the GA4 event name (``purchase``,
    ``refund``, …). A tag may map any ``params.*``, ``user_properties.*``, ``user_location`` or
    ``device`` field; other top-level targets are refused.

    Rules checked before sending (each :class:`PayloadError` names it): client_id required;
    event and param names ≤ 40 chars, alphanumeric and ``_``, starting with a letter, not
    reserved and without the reserved prefixes; ≤ 25 params; param values ≤ 100 chars (page
    location, referrer and title are truncated to GA's longer limits); ≤ 200 items, each with
    ``item_id`` or ``item_name`` (an item with neither is left out); ``currency`` (not blank)
    whenever ``value`` is set, and an ISO 4217 code (three letters, any case) when given;
    ``transaction_id`` on ``purchase`` and ``refund``; user properties ≤ 25, names ≤ 24, values
    ≤ 36 chars; body under 130 kB. At send time an event older than 72 hours fails alone
    (:meth:`check_item`); the events of one client are packed in order into requests of at most
    25 events whose body stays under 130 kB (:meth:`split`); an event too large to share a
    request goes alone.

    Unconfirmed readings (platforms.md marks them so) and the safe choice made:

    * Backdating: three GA pages disagree (72 h, 3 calendar days, 2 business days); 72 h is used.
    * Event-level ``timestamp_micros`` is not in the reference read, so the timestamp is sent at
      request level and requests only group events with the same timestamp, client_id and user
      fields (:meth:`batch_key`).
    * The Gmail ``+tag`` strip is confirmed for Data Manager, not for MP ``user_data``; it is
      applied (as Google Ads does) through :func:`destinations.normalize.email`.
    * ``user_agent`` is seen only in third-party code; GA ignores fields it does not know.
    * With analytics-only consent (``restricted``) ``user_data`` and ``user_id`` are dropped
      (even what a tag maps there out of ``properties``) and both consent signals are sent as
      ``DENIED``.
    """

    name = "ga4"
    max_batch = 25
    secret_settings = frozenset({"api_secret"})
    settings_schema = {
        "type": "object",
        "required": ["measurement_id", "api_secret"],
        "additionalProperties": False,
        "properties": {
            "measurement_id": {"type": "string", "pattern": "^G-[A-Za-z0-9]+$"},
            "api_secret": {"type": "string", "minLength": 1},
            "validate": {
                "type": "boolean",
                "default": False,
                "description": "send to /debug/mp/collect and report validationMessages",
            },
            "default_country": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
            "endpoint": {
                "type": "string",
                "pattern": "^https?://",
                "default": DEFAULT_ENDPOINT,
                "description": "base URL (EU: https://region1.google-analytics.com)",
            },
        },
    }
    hashed_fields = frozenset(PERSONAL_HOMES.values())
    personal_homes = PERSONAL_HOMES
    default_mapping = {
        "client_id": "context.ga_client_id || visitor_id",
        "user_id": "user_id",
        "ip_override": "context.ip",
        "user_agent": "context.user_agent",
        "consent.ad_user_data": "consent.ad_user_data",
        "consent.ad_personalization": "consent.ad_personalization",
        "params.transaction_id": "properties.related_order_id || properties.order_id",
        "params.value": "properties.value",
        "params.currency": "properties.currency",
        "params.items": (
            "properties.items[].{item_id: id, item_name: name, price: price, quantity: quantity}"
        ),
        "params.session_id": "context.ga_session_id",
        "params.page_location": "context.page_url",
        "params.page_referrer": "context.referrer",
        "user_data.sha256_email_address": "user_data.email",
        "user_data.sha256_phone_number": "user_data.phone",
        "user_data.address.sha256_first_name": "user_data.first_name",
        "user_data.address.sha256_last_name": "user_data.last_name",
        "user_data.address.city": "user_data.city",
        "user_data.address.region": "user_data.state",
        "user_data.address.postal_code": "user_data.postal_code",
        "user_data.address.country": "user_data.country",
    }

    mapping_fields = TOP_LEVEL_FIELDS

    def constant_problem(self, target: str, value: Any) -> str | None:
        """A constant ``params.currency`` that is no ISO 4217 code, ``params.value`` that is no
        number, or ``params.items`` that is no list of items."""
        if target == "params.value":
            return refusal(lambda: _number(value, "params.value"))
        if target in ("params.currency", "params.items"):
            return refusal(lambda: _params({target.removeprefix("params."): value}, ""))
        return None

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self._default_country: Any = self.settings.get("default_country")  # read once

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """The stored item: ``{"request": <request-level fields>, "event": {name, params}}``.

        Raises:
            PayloadError: a Measurement Protocol rule is broken; the message names it.
        """
        if not TOP_LEVEL_FIELDS.issuperset(mapped):
            unknown = sorted(set(mapped) - TOP_LEVEL_FIELDS)
            raise PayloadError(f"GA4: unknown top-level field(s) {unknown}")
        _check_name(ctx.event_name, "event name")
        if ctx.event_name in RESERVED_EVENTS:
            raise PayloadError(f"GA4: event name {ctx.event_name!r} is reserved")
        if (ctx.now or datetime.now(UTC)) - ctx.event_time > MAX_AGE:
            # Refused here, as at send time (check_item): queued, it became a dead letter, and
            # its tag's dedup key held back a later copy of the order that GA4 would take.
            raise PayloadError(_TOO_OLD)

        request: dict[str, Any] = {"client_id": _client_id(mapped.get("client_id"))}
        user_id = None if ctx.restricted else mapped.get("user_id")  # a person's ID
        if user_id is not None and (user_id := _user_id(user_id)):
            request["user_id"] = user_id
        request["timestamp_micros"] = int(ctx.event_time.timestamp() * 1_000_000)
        for key in ("ip_override", "user_agent"):
            if mapped.get(key):
                request[key] = values.text(mapped[key], f"GA4: {key}")
        for key in ("user_location", "device", "non_personalized_ads"):
            if mapped.get(key) is not None:
                request[key] = mapped[key]
        if consent := _consent(mapped.get("consent"), ctx.restricted):
            request["consent"] = consent
        if not ctx.restricted and (
            user_data := self._user_data(_object(mapped.get("user_data"), "user_data"), ctx.event)
        ):
            request["user_data"] = user_data
        if props := _user_properties(mapped.get("user_properties")):
            request["user_properties"] = props

        params = _params(_object(mapped.get("params"), "params"), ctx.event_name)
        # What is passed on as mapped must not carry personal data in clear text (a mapping to
        # params.email, say): user_data above holds only what _user_data hashed or normalized.
        for key in _PASSED_ON_REQUEST:
            # Their names are none of personal data: a text can only hold an e-mail address.
            value = request.get(key)
            if value is not None and (type(value) is not str or "@" in value):
                cleartext.check(value, key, "GA4", PERSONAL_HOMES)
        for key, value in params.items():
            if key not in _BUILT_PARAMS:
                cleartext.check(value, f"params.{key}", "GA4", PERSONAL_HOMES)
        payload = {"request": request, "event": {"name": ctx.event_name, "params": params}}
        try:
            body = _BODY_JSON.encode(payload)
        except ValueError:
            # NaN or an infinity in a field passed on as mapped: name it.
            fields = [*request.items(), *((f"params.{k}", v) for k, v in params.items())]
            for key, value in fields:
                values.check_json(value, f"GA4: {key}")
            raise PayloadError("GA4: the event holds a value JSON cannot carry") from None
        # ASCII text has one byte per character; other text is encoded (which also refuses
        # what cannot be sent, such as a lone surrogate).
        size = len(body) if body.isascii() else len(body.encode())
        # The body of the request that sends this event alone (see split).
        size += _EVENTS_FRAME + _VALIDATE_FIELD - _PAYLOAD_FRAME
        if size >= MAX_BODY_BYTES:
            raise PayloadError(f"GA4: the post body must be under 130 kB (this event: {size} B)")
        return payload

    def _user_data(self, raw: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
        if not raw:
            return {}
        out: dict[str, Any] = {}
        addresses = [_object(a, "user_data.address") for a in _listed(raw.get("address"))]
        # The person's country, as Google Ads and TikTok read it: the mapped address's, else
        # the event's own (a tag may keep the address out of GA4), else the setting.
        person = event.get("user_data")
        country = (
            next((c for a in addresses if (c := _country(a.get("country")))), None)
            or (_country(person.get("country")) if isinstance(person, _MAPPING) else None)
            or self._default_country
        )

        def phone(v: str) -> str | None:
            return normalize.phone(v, "google", default_country=country)

        for key, norm in (("sha256_email_address", _email), ("sha256_phone_number", phone)):
            if (digests := normalize.hashed_values(raw.get(key), norm)) is not None:
                out[key] = digests
        normalized = [a for a in (_address(a) for a in addresses) if a]
        if normalized:
            out["address"] = normalized[0] if len(normalized) == 1 else normalized
        return out

    # -- delivery -------------------------------------------------------------------------------

    def check_item(self, item: Item, ctx: SendContext) -> str | None:
        """Events older than 72 hours are refused by GA4 (the safe reading of §2.3)."""
        micros = item.payload.get("request", {}).get("timestamp_micros")
        if isinstance(micros, int) and ctx.now.timestamp() * 1_000_000 - micros > (
            MAX_AGE.total_seconds() * 1_000_000
        ):
            return _TOO_OLD
        return None

    def batch_key(self, item: Item) -> str:
        """A digest of the request-level fields: one client_id (and one user) per request."""
        request = item.payload.get("request", {})
        canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def split(self, items: Sequence[Item]) -> list[list[Item]]:
        """The events of one client packed in order into requests of at most 25 events whose
        body stays under 130 kB (platforms.md §2.4).

        Greedy: each event joins the current request when it still fits, else starts the next.
        The size counted is the body :meth:`build_request` sends, byte for byte (UTF-8, with
        ``validation_behavior`` in validate mode), from each event encoded once. An event that
        fits only alone goes alone; :meth:`build_payload` made sure that it fits alone.

        Raises:
            ValueError: an item holds text UTF-8 cannot carry (the request could not be sent).
        """
        frame = _EVENTS_FRAME + (_VALIDATE_FIELD if self.settings.get("validate") else 0)
        requests: list[list[Item]] = []
        size = 0
        for item in items:
            event_size = json_size(item.payload["event"])
            grown = size + 1 + event_size  # a comma, then the event
            if requests and len(requests[-1]) < self.max_batch and grown < MAX_BODY_BYTES:
                requests[-1].append(item)
                size = grown
            else:  # a new request, with the request-level fields of its first item
                size = json_size(_request_fields(item.payload["request"])) + frame + event_size
                requests.append([item])
        return requests

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One POST to ``/mp/collect`` (or ``/debug/mp/collect``) with up to 25 events."""
        now_micros = int(ctx.now.timestamp() * 1_000_000)
        body = _request_fields(items[0].payload["request"], now_micros)
        body["events"] = [dict(i.payload["event"]) for i in items]
        if self.settings.get("validate"):
            body["validation_behavior"] = "ENFORCE_RECOMMENDATIONS"
        return HttpRequest.json_post(self._url(), body)

    def _url(self) -> str:
        base = str(self.settings.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        path = "/debug/mp/collect" if self.settings.get("validate") else "/mp/collect"
        query = urlencode(
            {
                "measurement_id": self.settings.get("measurement_id", ""),
                "api_secret": self.settings.get("api_secret", ""),
            }
        )
        return f"{base}{path}?{query}"

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """``/mp/collect`` answers 2xx to anything; only the validation server says more.

        In ``validate`` mode each ``validationMessages`` entry becomes a PERMANENT result for the
        event it names (``events[N]`` in ``fieldPath`` or "index: [N]" in the description), or
        for every event when it names none.
        """
        if not 200 <= response.status < 300 or not self.settings.get("validate"):
            return [status_result(response)] * len(items)
        answer = response.json()
        if not isinstance(answer, dict):
            reason = "GA4 validation server: the answer is not a JSON object"
            return [ItemResult(Outcome.RETRYABLE, reason)] * len(items)
        errors: dict[int | None, list[str]] = {}
        for message in _listed(answer.get("validationMessages")):
            if isinstance(message, dict):
                index, text = _validation_message(message)
                errors.setdefault(index, []).append(text)
        results = []
        for index in range(len(items)):
            found = errors.get(index, []) + errors.get(None, [])
            results.append(
                ItemResult(Outcome.PERMANENT, "; ".join(found)) if found else ItemResult.delivered()
            )
        return results


# -- fields -------------------------------------------------------------------------------------


def _request_fields(request: Mapping[str, Any], now_micros: int | None = None) -> dict[str, Any]:
    """The request-level fields of a body as sent: the stored ones, ``timestamp_micros`` an
    integer no later than ``now_micros``.

    MP takes past timestamps only; a clock slightly ahead must not lose the event. Without
    ``now_micros`` (to measure a body before sending it) the stored time is kept: a later one
    has at least as many digits as the time it is cut to, so the body is never underestimated.
    """
    fields = dict(request)
    micros = int(fields["timestamp_micros"])
    fields["timestamp_micros"] = micros if now_micros is None else min(micros, now_micros)
    return fields


@lru_cache(maxsize=1024)
def _valid_name(name: str) -> bool:
    """Whether ``name`` passes every rule :func:`_check_name` checks.

    The names are the tags' event names and mapped param and user property names, so few
    distinct ones repeat on every event; the verdict is kept for each.
    """
    return (
        len(name) <= MAX_NAME
        and NAME_RULE.fullmatch(name) is not None
        and not name.startswith(RESERVED_PREFIXES)
    )


def _check_name(name: str, what: str) -> None:
    if _valid_name(name):
        return
    if len(name) > MAX_NAME:
        raise PayloadError(f"GA4: {what} {name!r} is longer than {MAX_NAME} characters")
    if not NAME_RULE.fullmatch(name):
        raise PayloadError(
            f"GA4: {what} {name!r} must be letters, digits and '_', starting with a letter"
        )
    if name.startswith(RESERVED_PREFIXES):
        raise PayloadError(f"GA4: {what} {name!r} uses a reserved prefix {RESERVED_PREFIXES}")


def _client_id(value: Any) -> str:
    text = values.text(value, "GA4: client_id").strip() if value is not None else ""
    if not text:
        raise PayloadError(
            "GA4: client_id is required for web streams (no ga_client_id and no visitor_id)"
        )
    if match := GA_COOKIE.fullmatch(text):
        return match.group(1)
    return text


def _user_id(value: Any) -> str | None:
    """The user ID to send; None for an e-mail address, which Google Analytics must not receive
    in clear text (personal data goes hashed, in user_data: platforms.md §2.5), and for one
    longer than GA4 takes (a session token mapped by mistake, say). Left out rather than
    refused: the events are still counted, under client_id."""
    text = values.text(value, "GA4: user_id")
    if cleartext.is_email(text) or len(text) > MAX_USER_ID:
        return None
    return text


def _consent(raw: Any, restricted: bool) -> dict[str, str]:
    if restricted:
        return {"ad_user_data": "DENIED", "ad_personalization": "DENIED"}
    out = {}
    for key in ("ad_user_data", "ad_personalization"):
        value = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, str) and value.lower() in CONSENT_VALUES:
            out[key] = CONSENT_VALUES[value.lower()]
    return out


def _params(raw: Mapping[str, Any], event_name: str) -> dict[str, Any]:
    params = {k: v for k, v in raw.items() if v is not None}
    if len(params) > MAX_PARAMS:
        raise PayloadError(f"GA4: at most {MAX_PARAMS} params per event ({len(params)} mapped)")
    for key, value in list(params.items()):
        _check_name(key, "param name")
        if key in RESERVED_PARAMS:
            raise PayloadError(f"GA4: param name {key!r} is reserved")
        if key == "session_id":
            params[key] = _session_id(value)
        elif key == "items":
            params[key] = _items(value)
        elif key == "value":
            params[key] = _number(value, "params.value")
        elif key == "currency":
            currency = values.text(value, "GA4: params.currency").strip().upper()
            if not currency:  # blank is no currency: GA4 would drop the value silently
                del params[key]
            elif _CURRENCY_CODE.fullmatch(currency):
                params[key] = currency
            else:  # GA4 answers 2xx and counts no revenue in "$" or "EURO"
                raise PayloadError("GA4: params.currency must be an ISO 4217 code (3 letters)")
        elif isinstance(value, str):
            limit = LONG_PARAMS.get(key)
            if limit is not None:
                params[key] = value[:limit]
            elif len(value) > MAX_VALUE:
                raise PayloadError(f"GA4: param {key!r} is longer than {MAX_VALUE} characters")
    if "value" in params and "currency" not in params:
        raise PayloadError("GA4: currency is required when value is set")
    if event_name in ("purchase", "refund") and not params.get("transaction_id"):
        raise PayloadError(f"GA4: transaction_id is required for the {event_name} event")
    if "transaction_id" in params:  # built, so not checked with the params passed on as mapped
        params["transaction_id"] = cleartext.identifier(
            params["transaction_id"], "params.transaction_id", "GA4", PERSONAL_HOMES
        )
    return params


def _session_id(value: Any) -> str:
    text = cleartext.identifier(value, "params.session_id", "GA4", PERSONAL_HOMES).strip()
    match = SESSION_COOKIE.match(text)
    return match.group(1) if match else text


def _items(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise PayloadError("GA4: params.items must be a list")
    if len(value) > MAX_ITEMS:
        raise PayloadError(f"GA4: at most {MAX_ITEMS} items per event")
    items = []
    for raw in value:
        item = {k: v for k, v in _object(raw, "params.items[]").items() if v is not None}
        if item.get("item_id") is None and item.get("item_name") is None:
            # GA4 takes no item without either; the event, its value included, goes without
            # this line (as Meta's contents do), not lost whole for one line of a cart.
            continue
        for key in ("item_id", "item_name"):
            if key in item:
                item[key] = values.text(item[key], f"GA4: items[].{key}")
        for key, what in (("price", "items[].price"), ("quantity", "items[].quantity")):
            if key in item:
                item[key] = _number(item[key], what)
        items.append(item)
    return items


def _number(value: Any, what: str) -> float | int:
    number = values.number(value, f"GA4: {what}")  # finite, not a boolean
    return value if type(value) is int else number  # an integer stays one (quantity: 2)


def _user_properties(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    props = {k: v for k, v in raw.items() if v is not None}
    if len(props) > MAX_USER_PROPERTIES:
        raise PayloadError(f"GA4: at most {MAX_USER_PROPERTIES} user properties")
    out = {}
    for key, value in props.items():
        if len(key) > MAX_USER_PROPERTY_NAME:
            raise PayloadError(f"GA4: user property name {key!r} is longer than 24 characters")
        _check_name(key, "user property name")
        if key in RESERVED_USER_PROPERTIES:
            raise PayloadError(f"GA4: user property name {key!r} is reserved")
        wrapped = value if isinstance(value, dict) and "value" in value else {"value": value}
        inner = wrapped["value"]
        if isinstance(inner, str) and len(inner) > MAX_USER_PROPERTY_VALUE:
            raise PayloadError(f"GA4: user property {key!r} value is longer than 36 characters")
        out[key] = wrapped
    return out


# -- user-provided data -------------------------------------------------------------------------


def _email(value: str) -> str | None:
    return normalize.email(value, "google")


def _street(value: str) -> str | None:
    """Google street rule: lowercase, symbols removed, trimmed (:func:`normalize.street`)."""
    return normalize.street(value, "google")


def _name(value: str) -> str | None:
    return normalize.name(value, "google")


_HASHED_ADDRESS_FIELDS: tuple[tuple[str, Callable[[str], str | None]], ...] = (
    ("sha256_first_name", _name),
    ("sha256_last_name", _name),
    ("sha256_street", _street),
)
# Clear-text address fields: normalizer of (value, the address's country).
_CLEAR_ADDRESS_FIELDS: tuple[tuple[str, Callable[[str, Any], str | None]], ...] = (
    ("city", lambda v, country: normalize.city(v, "google")),
    ("region", lambda v, country: normalize.state(v, "google", country=country)),
    ("postal_code", lambda v, country: normalize.postal_code(v, "google", country=country)),
    ("country", lambda v, country: normalize.country(v, "google")),
)


def _address(raw: Mapping[str, Any]) -> dict[str, Any]:
    country = _country(raw.get("country"))
    out: dict[str, Any] = {}
    for key, norm in _HASHED_ADDRESS_FIELDS:
        if (digest := normalize.hashed(raw.get(key), norm)) is not None:
            out[key] = digest
    for key, clear in _CLEAR_ADDRESS_FIELDS:
        # Like the hashed fields, a value that is no text (a list, an object) is left out.
        value = values.scalar_text(raw.get(key))
        if value and (text := clear(value, country)):
            out[key] = text
    return out


def _country(value: Any) -> str | None:
    """A mapped country as text to read addresses and phone numbers in (None: not text)."""
    return (value.strip() or None) if isinstance(value, str) else None


# -- helpers ------------------------------------------------------------------------------------


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _object(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` itself when it is an object (read, never changed), else refused; None is {}."""
    if value is None:
        return {}
    if not isinstance(value, _MAPPING):
        raise PayloadError(f"GA4: {what} must be an object")
    return value


_INDEX = re.compile(r"events\[(\d+)\]|index:? *\[(\d+)\]")
_BRACKETED = re.compile(r"\[(?!\d+\])[^\]]*\]")


def _validation_message(message: Mapping[str, Any]) -> tuple[int | None, str]:
    """The event index a validation message names (if any) and a log-safe text for it."""
    field_path = str(message.get("fieldPath") or "")
    description = str(message.get("description") or "")
    code = str(message.get("validationCode") or "VALIDATION_ERROR")
    match = _INDEX.search(field_path) or _INDEX.search(description)
    index = int(match.group(1) or match.group(2)) if match else None
    # The description quotes the offending values in brackets; keep indexes, hide values.
    safe = _BRACKETED.sub("[…]", description)[:200]
    return index, f"GA4 validation {code} at {field_path or 'request'}: {safe}".strip()
