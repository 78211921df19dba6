"""A loopback emulator of Meta's Conversions API (reference/platforms.md §1).

It checks requests the way Meta documents them and answers like the Graph API:

* ``POST /{api_version}/{pixel_id}/events``; ``access_token`` in the form body, the JSON body
  or the query string (missing: code 104, wrong: code 190);
* ``data``: a JSON array of 1 to 1,000 server events (a form field holding JSON, or a JSON
  body's array); ``test_event_code`` optional;
* each event: ``event_name``, integer ``event_time`` at most 7 days old (62 for
  ``physical_store``; one old event fails the whole request), ``action_source`` from the
  documented list, ``event_source_url`` (http/https) and ``client_user_agent`` for
  ``website``, a non-empty ``user_data`` that is not only one of the invalid-alone
  combinations (``ct``, ``country``, ``st``, ``zp``, ``ge`` and ``client_user_agent``;
  ``db`` and ``client_user_agent``; ``fn`` and ``ge``; ``ln`` and ``ge``; or part of one);
* hashed ``user_data`` keys are 64 lowercase hex (a string or a list of them); ``external_id``
  may be hashed or not; ``client_ip_address``, ``client_user_agent``, ``fbc`` and ``fbp`` must
  not be hashed and must have their documented shape;
* ``fbc`` and ``fbp`` carry their creation time in milliseconds (13 digits); an ``fbp`` may
  end with the Parameter Builder's appendix (``fb.1.<ms>.<random>.Ag``);
* ``Purchase`` needs ``custom_data.value`` and ``currency``;
* ``custom_data`` types: numeric ``value``, 3-letter ``currency``, ``contents`` with an ``id``,
  an integer ``quantity`` and a numeric ``item_price``;
* ``data_processing_options`` a list (``["LDU"]`` or empty), its country and state integers,
  a country only with a state.

Success: ``{"events_received": n, "messages": [], "fbtrace_id": ...}``. A failure is a Graph
error envelope with code 100 (invalid parameter). :meth:`MetaEmulator.fail_next` injects
throttling, transient, auth, permission or plain server errors; :meth:`MetaEmulator.refuse`
makes chosen events invalid, as a rule of Meta's that no adapter checks before sending would.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from destinations.testkit.jsontypes import is_integer, is_number
from destinations.testkit.server import Emulator, Reply, Request

Fault = Literal["throttle", "transient", "auth", "permission", "server_error"]

# Written from Meta's documentation, not imported from destinations.meta_capi: the emulator
# checks the adapter against the platform, so it must not share the adapter's beliefs.
ACTION_SOURCES = frozenset(
    {
        "email",
        "website",
        "app",
        "phone_call",
        "chat",
        "physical_store",
        "system_generated",
        "business_messaging",
        "other",
    }
)
HASHED_KEYS = frozenset({"em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country"})
# An event whose only customer information is one of these sets, or part of one, is invalid
# (platforms.md §1.3, the combinations Graph API v13.0 made invalid).
INVALID_ALONE = (
    frozenset({"ct", "country", "st", "zp", "ge", "client_user_agent"}),
    frozenset({"db", "client_user_agent"}),
    frozenset({"fn", "ge"}),
    frozenset({"ln", "ge"}),
)
MAX_BATCH = 1000
_PATH = re.compile(r"/(v\d+\.\d+)/(\d+)/events")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ANY_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
# The creation time is in milliseconds (13 digits since 2001), not seconds (platforms.md §1.5).
# Meta's Parameter Builder ends both cookies with an appendix, a language token such as "Ag"
# (facebook/capi-param-builder: it adds one to an _fbp cookie that has none), which Meta reads;
# platforms.md §1.5 says to pass it through unchanged.
_FBC = re.compile(r"fb\.\d\.\d{13}\.\S+")
_FBP = re.compile(r"fb\.\d\.\d{13}\.\d+(?:\.[A-Za-z0-9]{2,8})?")
_trace_ids = itertools.count(1)


class GraphError(Exception):
    """A request the Graph API would refuse; becomes an error envelope."""

    def __init__(self, code: int, message: str, status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


_FAULTS: dict[str, GraphError] = {
    "throttle": GraphError(
        4, "(#4) Application request limit reached", is_transient=True, error_subcode=None
    ),
    "transient": GraphError(
        2,
        "An unexpected error has occurred. Please retry your request later.",
        status=500,
        is_transient=True,
    ),
    "auth": GraphError(
        190, "Error validating access token: Session has expired", error_subcode=463
    ),
    "permission": GraphError(200, "(#200) Permissions error", status=403),
}


class MetaEmulator(Emulator):
    """The emulator; use it as a context manager, then point ``endpoint`` at :attr:`url`.

    Attributes:
        events: the events of every accepted request, in order.
        test_event_codes: the ``test_event_code`` of every accepted request (None if absent).
    """

    def __init__(
        self,
        pixel_id: str = "1234567890",
        access_token: str = "meta-test-token",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pixel_id = pixel_id
        self.access_token = access_token
        self.clock = clock
        self.events: list[dict[str, Any]] = []
        self.test_event_codes: list[str | None] = []
        self._refused: frozenset[str] = frozenset()
        super().__init__()

    def refuse(self, *event_ids: str) -> None:
        """Find the events with these ``event_id`` values invalid: a request holding one fails
        whole (code 100), as Meta fails one for a rule no adapter checks before sending."""
        self._refused = frozenset(event_ids)

    # -- the handler -----------------------------------------------------------------------------

    def __call__(self, request: Request) -> Reply:
        fault = self._next_fault()
        if fault == "server_error":
            return Reply.text("<html><body>502 Bad Gateway</body></html>", status=502)
        if fault is not None:
            return _error_reply(_FAULTS[fault])
        try:
            data, test_event_code = self._check(request)
        except GraphError as error:
            return _error_reply(error)
        with self._lock:
            self.events.extend(data)
            self.test_event_codes.append(test_event_code)
        return Reply.json({"events_received": len(data), "messages": [], "fbtrace_id": _trace_id()})

    def _check(self, request: Request) -> tuple[list[dict[str, Any]], str | None]:
        match = _PATH.fullmatch(request.path)
        if request.method != "POST" or match is None or match.group(2) != self.pixel_id:
            raise GraphError(100, "Unsupported post request.", error_subcode=33)
        params = _params(request)
        token = params.get("access_token") or request.param("access_token")
        if not token:
            raise GraphError(104, "An access token is required to request this resource.")
        if token != self.access_token:
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token")
        test_event_code = params.get("test_event_code")
        if test_event_code is not None and not isinstance(test_event_code, str):
            raise GraphError(100, "Invalid parameter: test_event_code must be a string")
        data = params.get("data")
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                raise GraphError(100, "Invalid parameter: data must be a JSON array") from None
        if not isinstance(data, list) or not data:
            raise GraphError(100, "The parameter data is required")
        if len(data) > MAX_BATCH:
            raise GraphError(100, f"Invalid parameter: at most {MAX_BATCH} events per request")
        now = self.clock()
        for index, event in enumerate(data):
            problem = _event_problem(event, now)
            if isinstance(event, dict) and event.get("event_id") in self._refused:
                problem = problem or "this event is refused (MetaEmulator.refuse)"
            if problem:
                raise GraphError(
                    100,
                    "Invalid parameter",
                    error_user_title="Invalid event",
                    error_user_msg=f"data[{index}]: {problem}",
                )
        return data, test_event_code


def _params(request: Request) -> dict[str, Any]:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/json":
        body = request.json()
        return body if isinstance(body, dict) else {}
    if content_type == "application/x-www-form-urlencoded":
        return {k: v[0] for k, v in request.form().items() if v}
    return {}


def _event_problem(event: object, now: float) -> str | None:
    if not isinstance(event, dict):
        return "an event must be an object"
    if not isinstance(event.get("event_name"), str) or not event["event_name"]:
        return "event_name is required"
    event_time = event.get("event_time")
    if not isinstance(event_time, int) or isinstance(event_time, bool):
        return "event_time must be an integer (Unix seconds)"
    action_source = event.get("action_source")
    if action_source not in ACTION_SOURCES:
        return "action_source is required and must be a documented value"
    max_days = 62 if action_source == "physical_store" else 7
    if now - event_time > max_days * 86400:
        return f"event_time is more than {max_days} days in the past"
    user_data = event.get("user_data")
    if not isinstance(user_data, dict) or not user_data:
        return "user_data is required"
    if any(weak.issuperset(user_data) for weak in INVALID_ALONE):
        return "user_data: this combination of customer information parameters is not valid"
    if action_source == "website":
        url = event.get("event_source_url")
        if not isinstance(url, str) or not re.match(r"https?://", url):
            return "event_source_url is required for website events"
        if not user_data.get("client_user_agent"):
            return "client_user_agent is required for website events"
    if event["event_name"] == "Purchase":
        custom_data = event.get("custom_data")
        if not isinstance(custom_data, dict) or not {"value", "currency"} <= set(custom_data):
            return "Purchase events require custom_data.value and custom_data.currency"
    return (
        _user_data_problem(user_data)
        or _custom_data_problem(event.get("custom_data"))
        or _processing_options_problem(event)
    )


def _user_data_problem(user_data: dict[str, Any]) -> str | None:
    for key, value in user_data.items():
        values = value if isinstance(value, list) else [value]
        if key in HASHED_KEYS:
            if not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in values):
                return f"user_data.{key} must be SHA-256 (64 lowercase hex)"
        elif key == "external_id":
            if not all(isinstance(v, str) and v for v in values):
                return "user_data.external_id must be a string or a list of strings"
        elif key in ("client_ip_address", "client_user_agent", "fbc", "fbp") and (
            not isinstance(value, str) or _ANY_HEX64.fullmatch(value)
        ):
            return f"user_data.{key} must not be hashed"
    ip = user_data.get("client_ip_address")
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            return "user_data.client_ip_address is not a valid IP address"
    if "fbc" in user_data and not _FBC.fullmatch(user_data["fbc"]):
        return "user_data.fbc must look like fb.1.<ms>.<fbclid>"
    if "fbp" in user_data and not _FBP.fullmatch(user_data["fbp"]):
        return "user_data.fbp must look like fb.1.<ms>.<random>"
    return None


def _custom_data_problem(custom_data: object) -> str | None:
    if custom_data is None:
        return None
    if not isinstance(custom_data, dict):
        return "custom_data must be an object"
    value = custom_data.get("value")
    if value is not None and not is_number(value):
        return "custom_data.value must be a number"
    currency = custom_data.get("currency")
    if currency is not None and not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
        return "custom_data.currency must be a 3-letter ISO 4217 code"
    contents = custom_data.get("contents")
    if contents is not None and not (
        isinstance(contents, list)
        and all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in contents)
    ):
        return "custom_data.contents must be a list of objects with an id"
    for content in contents or []:
        quantity, price = content.get("quantity"), content.get("item_price")
        if quantity is not None and not is_integer(quantity):
            return "custom_data.contents[].quantity must be an integer"
        if price is not None and not is_number(price):
            return "custom_data.contents[].item_price must be a number"
    ids = custom_data.get("content_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return "custom_data.content_ids must be a list of strings"
    return None


def _processing_options_problem(event: dict[str, Any]) -> str | None:
    """``data_processing_options`` is a list (``["LDU"]`` or empty); a country (1: USA, 0:
    geolocate) goes with a state (1000: California, ..., 0: geolocate) (platforms.md §1.2)."""
    options = event.get("data_processing_options")
    if options is not None and not (isinstance(options, list) and all(o == "LDU" for o in options)):
        return 'data_processing_options must be a list: ["LDU"] or []'
    country = event.get("data_processing_options_country")
    state = event.get("data_processing_options_state")
    for key, value in (("country", country), ("state", state)):
        if value is not None and not is_integer(value):
            return f"data_processing_options_{key} must be an integer"
    if country is not None and state is None:
        return "data_processing_options_country needs data_processing_options_state"
    return None


def _error_reply(error: GraphError) -> Reply:
    body: dict[str, Any] = {
        "message": error.message,
        "type": "OAuthException",
        "code": error.code,
        "fbtrace_id": _trace_id(),
    }
    body.update({k: v for k, v in error.extra.items() if v is not None})
    return Reply.json({"error": body}, status=error.status)


def _trace_id() -> str:
    return f"AEmuTrace{next(_trace_ids):06d}"
