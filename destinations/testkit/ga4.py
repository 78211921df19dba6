"""A local GA4 Measurement Protocol server (reference/platforms.md §2).

``/mp/collect`` answers 204 to anything, as GA does (after checking the limits and formats of
platforms.md §2.3-§2.6: names, params, items, currency, user properties, user data); what
GA would have dropped is kept in :attr:`GA4Emulator.dropped` so tests can see it.
``/debug/mp/collect`` answers ``{"validationMessages": [...]}`` built by the same checks. Usage::

    emulator = GA4Emulator()
    with LoopbackServer(emulator) as server:
        ...  # settings: endpoint=server.url, measurement_id=emulator.measurement_id, ...
        assert emulator.dropped == []
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from destinations.testkit.jsontypes import is_number
from destinations.testkit.server import Reply, Request

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
HEX64 = re.compile(r"[0-9a-f]{64}")
RESERVED_EVENTS = frozenset(
    {"ad_activeview", "ad_click", "ad_exposure", "ad_impression", "ad_query", "ad_reward"}
    | {"adunit_exposure", "app_background", "app_clear_data", "app_exception", "app_install"}
    | {"app_remove", "app_store_refund", "app_update", "app_upgrade", "dynamic_link_app_open"}
    | {"dynamic_link_app_update", "dynamic_link_first_open", "error", "firebase_campaign"}
    | {"first_open", "first_visit", "in_app_purchase", "notification_dismiss"}
    | {"notification_foreground", "notification_open", "notification_receive"}
    | {"notification_send", "os_update", "screen_view", "session_start", "user_engagement"}
    | {"app_store_subscription_cancel", "app_store_subscription_renew"}
)
RESERVED_USER_PROPERTIES = frozenset(
    {"first_open_time", "first_visit_time", "last_deep_link_referrer", "user_id"}
    | {"first_open_after_install"}
)
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_", "gtag.")
LONG_PARAMS = {"page_location": 1000, "page_referrer": 420, "page_title": 300}
TOP_LEVEL = frozenset(
    {"client_id", "user_id", "timestamp_micros", "user_properties", "user_data", "consent"}
    | {"non_personalized_ads", "user_location", "ip_override", "device", "user_agent"}
    | {"validation_behavior", "events"}
)
MAX_AGE_MICROS = 72 * 3600 * 1_000_000


def _msg(path: str, description: str, code: str) -> dict[str, str]:
    return {"fieldPath": path, "description": description, "validationCode": code}


class GA4Emulator:
    """The GA4 collection and validation servers for one web stream.

    Attributes:
        measurement_id: the stream the requests must name.
        api_secret: the secret ``/mp/collect`` requires (the debug server does not check it).
        accepted: every event (with its request-level fields) ``/mp/collect`` would keep.
        dropped: validation messages for what ``/mp/collect`` silently dropped.
        fail_with: when set, the next request is answered with this reply instead.
    """

    def __init__(self, measurement_id: str = "G-TEST123", api_secret: str = "mp-secret") -> None:
        self.measurement_id = measurement_id
        self.api_secret = api_secret
        self.accepted: list[dict[str, Any]] = []
        self.dropped: list[dict[str, str]] = []
        self.fail_with: Reply | None = None
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        with self._lock:
            if self.fail_with is not None:
                reply, self.fail_with = self.fail_with, None
                return reply
        if request.method != "POST":
            return Reply.text("method not allowed", status=405)
        if request.path not in ("/mp/collect", "/debug/mp/collect"):
            return Reply.text("not found", status=404)
        debug = request.path.startswith("/debug")
        messages = self.validate(request, check_secret=not debug)
        if debug:
            return Reply.json({"validationMessages": messages})
        with self._lock:
            if messages:
                self.dropped.extend(messages)
            else:
                body = request.json()
                top = {k: v for k, v in body.items() if k != "events"}
                self.accepted.extend({**top, **event} for event in body["events"])
        return Reply(204)

    # -- checks ---------------------------------------------------------------------------------

    def validate(self, request: Request, check_secret: bool = True) -> list[dict[str, str]]:
        """Every validation message GA would give for this request (empty: it is valid)."""
        if request.param("measurement_id") != self.measurement_id:
            return [_msg("measurement_id", "unknown measurement_id", "VALUE_INVALID")]
        if check_secret and request.param("api_secret") != self.api_secret:
            return [_msg("api_secret", "invalid api_secret", "VALUE_INVALID")]
        if not (request.header("content-type") or "").startswith("application/json"):
            return [_msg("", "the body must be JSON", "VALUE_INVALID")]
        if len(request.body) >= 130_000:
            return [_msg("", "the post body must be under 130 kB", "VALUE_OUT_OF_BOUNDS")]
        body = request.json()
        if not isinstance(body, dict):
            return [_msg("", "the body must be a JSON object", "VALUE_INVALID")]
        out = [_msg(key, f"unknown field [{key}]", "NAME_INVALID") for key in set(body) - TOP_LEVEL]
        client_id = body.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            out.append(_msg("client_id", "client_id is required", "VALUE_REQUIRED"))
        user_id = body.get("user_id")
        if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 256):
            out.append(_msg("user_id", "user_id must be a string of 256 chars", "VALUE_INVALID"))
        out += self._timestamp(body.get("timestamp_micros"))
        out += _consent(body.get("consent"))
        out += _user_properties(body.get("user_properties"))
        npa = body.get("non_personalized_ads")
        if npa is not None and not isinstance(npa, bool):
            out.append(_msg("non_personalized_ads", "must be a boolean", "VALUE_INVALID"))
        out += _user_data(body.get("user_data"))
        events = body.get("events")
        if not isinstance(events, list) or not events:
            return [*out, _msg("events", "events is required", "VALUE_REQUIRED")]
        if len(events) > 25:
            out.append(_msg("events", "at most 25 events per request", "EXCEEDED_MAX_ENTITIES"))
        for index, event in enumerate(events):
            out += _event(index, event)
        return out

    @staticmethod
    def _timestamp(value: Any) -> list[dict[str, str]]:
        if value is None:
            return []
        now = int(time.time() * 1_000_000)
        if not isinstance(value, int) or value > now or now - value > MAX_AGE_MICROS:
            return [
                _msg("timestamp_micros", "must be a past time within 72 hours", "VALUE_INVALID")
            ]
        return []


def _consent(consent: Any) -> list[dict[str, str]]:
    if consent is None:
        return []
    if not isinstance(consent, dict):
        return [_msg("consent", "consent must be an object", "VALUE_INVALID")]
    return [
        _msg(f"consent.{k}", "must be GRANTED or DENIED", "VALUE_INVALID")
        for k, v in consent.items()
        if k not in ("ad_user_data", "ad_personalization") or v not in ("GRANTED", "DENIED")
    ]


def _user_properties(props: Any) -> list[dict[str, str]]:
    """At most 25, names of at most 24 characters (not reserved), values of at most 36."""
    if props is None:
        return []
    if not isinstance(props, dict):
        return [_msg("user_properties", "must be an object", "VALUE_INVALID")]
    out = []
    if len(props) > 25:
        out.append(_msg("user_properties", "at most 25", "EXCEEDED_MAX_ENTITIES"))
    for name, prop in props.items():
        where = f"user_properties.{name}"
        if len(name) > 24 or not NAME.fullmatch(name) or name.startswith(RESERVED_PREFIXES):
            out.append(_msg(where, f"User property name [{name}] is invalid.", "NAME_INVALID"))
        elif name in RESERVED_USER_PROPERTIES:
            out.append(_msg(where, f"User property [{name}] is reserved.", "NAME_RESERVED"))
        if not isinstance(prop, dict) or "value" not in prop:
            out.append(_msg(where, "must be an object with a value", "VALUE_REQUIRED"))
        elif isinstance(prop["value"], str) and len(prop["value"]) > 36:
            out.append(_msg(f"{where}.value", "at most 36 characters", "VALUE_OUT_OF_BOUNDS"))
    return out


def _user_data(user_data: Any) -> list[dict[str, str]]:
    if user_data is None:
        return []
    if not isinstance(user_data, dict):
        return [_msg("user_data", "user_data must be an object", "VALUE_INVALID")]
    out = []
    for key in ("sha256_email_address", "sha256_phone_number"):
        values = user_data.get(key)
        for value in values if isinstance(values, list) else [values] if values else []:
            if not isinstance(value, str) or not HEX64.fullmatch(value):
                out.append(
                    _msg(f"user_data.{key}", "must be SHA-256 lowercase hex", "VALUE_INVALID")
                )
    addresses = user_data.get("address")
    for addr in addresses if isinstance(addresses, list) else [addresses] if addresses else []:
        for key in ("sha256_first_name", "sha256_last_name", "sha256_street"):
            if key in addr and not HEX64.fullmatch(str(addr[key])):
                out.append(_msg(f"user_data.address.{key}", "must be hex", "VALUE_INVALID"))
        for key in ("city", "region", "postal_code", "country"):
            if key in addr and HEX64.fullmatch(str(addr[key])):
                out.append(_msg(f"user_data.address.{key}", "is sent in clear", "VALUE_INVALID"))
        city = addr.get("city")
        if city is not None and (
            not isinstance(city, str) or city != city.strip().lower() or re.search(r"\d", city)
        ):
            # "remove digits and symbols, lowercase, trim" (uid-data): else it matches no one.
            out.append(_msg("user_data.address.city", "not normalized", "VALUE_INVALID"))
        if "country" in addr and not re.fullmatch(r"[A-Za-z]{2}", str(addr["country"])):
            out.append(_msg("user_data.address.country", "ISO alpha-2", "VALUE_INVALID"))
    return out


def _event(index: int, event: Any) -> list[dict[str, str]]:
    path = f"events[{index}]"
    if not isinstance(event, dict):
        return [_msg(path, "an event must be an object", "VALUE_INVALID")]
    name = event.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return [
            _msg(
                f"{path}.name",
                f"Event at index: [{index}] has invalid name [{name}].",
                "NAME_INVALID",
            )
        ]
    out = []
    if name in RESERVED_EVENTS or name.startswith(RESERVED_PREFIXES):
        out.append(_msg(f"{path}.name", f"Event name [{name}] is reserved.", "NAME_RESERVED"))
    params = event.get("params") or {}
    if not isinstance(params, dict):
        return [*out, _msg(f"{path}.params", "params must be an object", "VALUE_INVALID")]
    if len(params) > 25:
        out.append(_msg(f"{path}.params", "at most 25 params", "EXCEEDED_MAX_ENTITIES"))
    for key, value in params.items():
        where = f"{path}.params.{key}"
        if not NAME.fullmatch(key) or key.startswith(RESERVED_PREFIXES):
            out.append(_msg(where, f"Param name [{key}] is invalid.", "NAME_INVALID"))
        elif key in ("gclid", "session_number"):
            out.append(_msg(where, f"Param name [{key}] is reserved.", "NAME_RESERVED"))
        if isinstance(value, str) and len(value) > LONG_PARAMS.get(key, 100):
            out.append(_msg(where, "Param value is too long.", "VALUE_OUT_OF_BOUNDS"))
    items = params.get("items")
    if items is not None:
        if not isinstance(items, list) or len(items) > 200:
            out.append(_msg(f"{path}.params.items", "at most 200 items", "VALUE_INVALID"))
        else:
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not ({"item_id", "item_name"} & set(item)):
                    out.append(
                        _msg(f"{path}.params.items[{i}]", "item_id or item_name", "VALUE_REQUIRED")
                    )
                    continue
                for key in ("price", "quantity"):
                    number = item.get(key)
                    if number is not None and not is_number(number):
                        where = f"{path}.params.items[{i}].{key}"
                        out.append(_msg(where, f"{key} must be a number", "VALUE_INVALID"))
    if "value" in params and not is_number(params["value"]):
        out.append(_msg(f"{path}.params.value", "value must be a number", "VALUE_INVALID"))
    if "value" in params and "currency" not in params:
        out.append(_msg(f"{path}.params.currency", "currency is required", "VALUE_REQUIRED"))
    if "currency" in params and not re.fullmatch(r"[A-Z]{3}", str(params["currency"])):
        # "in 3-letter ISO 4217 format": GA4 cannot count revenue in anything else.
        out.append(_msg(f"{path}.params.currency", "ISO 4217 code", "VALUE_INVALID"))
    if name in ("purchase", "refund") and not params.get("transaction_id"):
        out.append(_msg(f"{path}.params.transaction_id", "required", "VALUE_REQUIRED"))
    return out
