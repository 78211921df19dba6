"""A loopback emulator of TikTok's Events API 2.0 (reference/platforms.md §4).

It checks requests the way TikTok documents them and answers like the Business API, which
says HTTP 200 to most failures and puts the verdict in ``code``:

* ``POST /open_api/v1.3/event/track/`` with the token in the ``Access-Token`` header (missing:
  code 40104, wrong: code 40105) and a JSON body;
* ``event_source`` one of ``web|app|offline|crm``; ``event_source_id`` the pixel code;
  optional string ``test_event_code``; ``data`` a list of 1 to 1,000 events;
* each event: ``event`` name, integer ``event_time`` (Unix seconds), string ``event_id``;
* ``user.email``, ``user.phone``, ``user.external_id`` (and the unconfirmed ``first_name``,
  ``last_name``, ``zip_code``) are 64 lowercase hex, a string or a list; ``ttclid``, ``ttp``,
  ``ip`` and ``user_agent`` must not be hashed;
* ``properties``: numeric ``value``, 3-letter ``currency``, ``contents`` objects with an
  optional string ``content_id``, a numeric ``price`` and an integer ``quantity``,
  ``content_type`` ``product`` or ``product_group``; ``limited_data_use`` a boolean.

Success: ``{"code": 0, "message": "OK", "request_id": ..., "data": {}}``. A bad request gets
code 40002 (parameter error); TikTok's rejection is for the whole batch.
:meth:`TikTokEmulator.fail_next` injects throttling (40100), transient server errors, auth
errors (40105) and plain gateway errors; :meth:`TikTokEmulator.refuse` makes chosen events
invalid, as a rule of TikTok's that no adapter checks before sending would.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from typing import Any, Literal

from destinations.testkit.jsontypes import is_integer, is_number
from destinations.testkit.server import Emulator, Reply, Request

Fault = Literal["throttle", "transient", "auth", "server_error"]

PATH = "/open_api/v1.3/event/track/"
EVENT_SOURCES = frozenset({"web", "app", "offline", "crm"})
HASHED_KEYS = frozenset({"email", "phone", "external_id", "first_name", "last_name", "zip_code"})
CLEAR_KEYS = frozenset({"ttclid", "ttp", "ip", "user_agent", "locale"})
MAX_BATCH = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ANY_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_request_ids = itertools.count(1)


class TikTokEmulator(Emulator):
    """The emulator; use it as a context manager, then point ``endpoint`` at :attr:`url`.

    Attributes:
        events: the events of every accepted request, in order.
        bodies: every accepted request body (without ``data`` trimmed), in order.
    """

    def __init__(self, pixel_code: str = "CTESTPIXEL123", access_token: str = "tt-token") -> None:
        self.pixel_code = pixel_code
        self.access_token = access_token
        self.events: list[dict[str, Any]] = []
        self.bodies: list[dict[str, Any]] = []
        self._refused: frozenset[str] = frozenset()
        super().__init__()

    def refuse(self, *event_ids: str) -> None:
        """Find the events with these ``event_id`` values invalid: a request holding one fails
        whole (code 40002), as TikTok fails one for a rule no adapter checks before sending."""
        self._refused = frozenset(event_ids)

    # -- the handler -----------------------------------------------------------------------------

    def __call__(self, request: Request) -> Reply:
        fault = self._next_fault()
        if fault == "server_error":
            return Reply.text("<html><body>503 Service Unavailable</body></html>", status=503)
        if fault == "transient":
            return _answer(50000, "System error, please retry later.", status=500)
        if fault == "throttle":
            return _answer(40100, "Too many requests. Please retry in some time.")
        if fault == "auth":
            return _answer(40105, "Access token is incorrect or has been revoked.")
        if request.method != "POST" or request.path != PATH:
            return Reply.text("404 page not found", status=404)
        token = request.header("access-token")
        if not token:
            return _answer(40104, "Access token is empty.")
        if token != self.access_token:
            return _answer(40105, "Access token is incorrect or has been revoked.")
        body = request.json()
        problem = _body_problem(body, self.pixel_code) or self._refused_problem(body)
        if problem:
            return _answer(40002, problem)
        assert isinstance(body, dict)
        with self._lock:
            self.events.extend(body["data"])
            self.bodies.append(body)
        return _answer(0, "OK")

    def _refused_problem(self, body: Any) -> str | None:
        for index, event in enumerate(body["data"]):
            if isinstance(event, dict) and event.get("event_id") in self._refused:
                return f"data[{index}]: this event is refused (TikTokEmulator.refuse)"
        return None


def _answer(code: int, message: str, status: int = 200) -> Reply:
    request_id = f"2026{next(_request_ids):012d}"
    return Reply.json(
        {"code": code, "message": message, "request_id": request_id, "data": {}}, status
    )


def _body_problem(body: object, pixel_code: str) -> str | None:
    if not isinstance(body, dict):
        return "Invalid JSON body."
    if body.get("event_source") not in EVENT_SOURCES:
        return "event_source: must be one of web, app, offline, crm."
    if body.get("event_source_id") != pixel_code:
        return "event_source_id: pixel not found."
    code = body.get("test_event_code")
    if code is not None and not isinstance(code, str):
        return "test_event_code: must be a string."
    data = body.get("data")
    if not isinstance(data, list) or not data:
        return "data: required."
    if len(data) > MAX_BATCH:
        return f"data: at most {MAX_BATCH} events."
    for index, event in enumerate(data):
        problem = _event_problem(event)
        if problem:
            return f"data[{index}].{problem}"
    return None


def _event_problem(event: object) -> str | None:
    if not isinstance(event, dict):
        return "event: must be an object."
    if not isinstance(event.get("event"), str) or not event["event"]:
        return "event: required."
    event_time = event.get("event_time")
    if not isinstance(event_time, int) or isinstance(event_time, bool):
        return "event_time: must be an integer (Unix seconds)."
    if "event_id" in event and not isinstance(event["event_id"], str):
        return "event_id: must be a string."
    user = event.get("user", {})
    if not isinstance(user, dict):
        return "user: must be an object."
    for key, value in user.items():
        values = value if isinstance(value, list) else [value]
        if key in HASHED_KEYS:
            if not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in values):
                return f"user.{key}: must be SHA-256 (64 lowercase hex)."
        elif key in CLEAR_KEYS and (not isinstance(value, str) or _ANY_HEX64.fullmatch(value)):
            return f"user.{key}: must be sent unhashed."
    if "ip" in user:
        try:
            ipaddress.ip_address(user["ip"])
        except ValueError:
            return "user.ip: invalid IP address."
    if "limited_data_use" in event and not isinstance(event["limited_data_use"], bool):
        return "limited_data_use: must be a boolean."
    page = event.get("page", {})
    if not isinstance(page, dict) or not all(isinstance(v, str) for v in page.values()):
        return "page: must be an object of strings."
    return _properties_problem(event.get("properties"))


def _properties_problem(properties: object) -> str | None:
    if properties is None:
        return None
    if not isinstance(properties, dict):
        return "properties: must be an object."
    value = properties.get("value")
    if value is not None and not is_number(value):
        return "properties.value: must be a number."
    currency = properties.get("currency")
    if currency is not None and not (
        isinstance(currency, str) and re.fullmatch(r"[A-Za-z]{3}", currency)
    ):
        return "properties.currency: must be an ISO 4217 code."
    contents = properties.get("contents")
    # content_id is optional (TikTok's SDK: PixelContent), but a string when given.
    if contents is not None and not (
        isinstance(contents, list)
        and all(isinstance(c, dict) and isinstance(c.get("content_id", ""), str) for c in contents)
    ):
        return "properties.contents: each an object, its content_id (optional) a string."
    for content in contents or []:
        quantity, price = content.get("quantity"), content.get("price")
        if quantity is not None and not is_integer(quantity):
            return "properties.contents[].quantity: must be an integer."
        if price is not None and not is_number(price):
            return "properties.contents[].price: must be a number."
    if properties.get("content_type", "product") not in ("product", "product_group"):
        return "properties.content_type: must be product or product_group."
    return None
