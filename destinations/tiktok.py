"""TikTok Events API 2.0 (reference/platforms.md §4)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any, ClassVar

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

DEFAULT_ENDPOINT = "https://business-api.tiktok.com"
PATH = "/open_api/v1.3/event/track/"
EVENT_SOURCES = ("web", "app", "offline", "crm")

_SUCCESS_CODES = frozenset({0, 20001})
# What counts as an object: dict comes first, since an exact type test is much cheaper than
# the Mapping ABC check that a dict would pass anyway.
_MAPPING = (dict, Mapping)
_RETRY_CODES = frozenset({40100, 40700, 42900})
_AUTH_CODES = frozenset({40001, 40102, 40104, 40105})
# Where TikTok takes each kind of personal data, hashed (see destinations.cleartext).
PERSONAL_HOMES = {
    "email": "user.email",
    "phone": "user.phone",
    "first_name": "user.first_name",
    "last_name": "user.last_name",
}
# Mapped fields build_payload reads itself; the other mapped fields are passed on as they are.
# event_time and event are always the event's own timestamp and the tag's event name.
_BUILT_FIELDS = frozenset({"event_time", "event", "page", "user", "properties", "event_id"})
_CLEAR_USER_FIELDS = frozenset({"ttclid", "ttp", "ip", "user_agent", "locale"})
# The user of a copy without identifiers (analytics-only consent): the IP, which the engine has
# truncated, the user agent and the locale. Nothing that names a person or a click (hashed
# fields, external_id, ttclid, ttp...), whatever the tag maps there.
_ANONYMOUS_USER_FIELDS = frozenset({"ip", "user_agent", "locale"})
# An event's top-level fields as TikTok's Events API 2.0 and its SDK write them (platforms.md).
_DOCUMENTED_FIELDS = frozenset(
    {"event", "event_time", "event_id", "user", "properties", "page", "app", "ad", "device"}
    | {"lead", "limited_data_use", "locale"}
)
# Whether TikTok refuses a key it does not know or drops it is not documented (platforms.md).
_UNDOCUMENTED_FATE = "TikTok ignores or refuses it"


class TikTok(Destination):
    """TikTok Events API 2.0: ``POST {endpoint}/open_api/v1.3/event/track/``.

    The token goes in the ``Access-Token`` header; the JSON body is ``{event_source,
    event_source_id, test_event_code?, data: [...]}``, where ``event_source_id`` is the
    ``pixel_code`` setting (for ``app``, ``offline`` and ``crm`` sources, put the app ID or event
    set ID there).

    Default mapping (target -> canonical event)::

        event_id              event_id
        user.email            user_data.email                 trim + lowercase, hashed
        user.phone            user_data.phone                 E.164 with "+", hashed
        user.external_id      user_data.external_id || user_id    trimmed, hashed
        user.ttclid           context.ttclid (else the page URL's ttclid)   never hashed
        user.ttp              context.ttp                      never hashed
        user.ip               context.ip                       never hashed
        user.user_agent       context.user_agent               never hashed
        properties.value      properties.value
        properties.currency   properties.currency
        properties.order_id   properties.order_id
        properties.contents   properties.items -> {content_id, content_name, price, quantity}
        properties.content_type   "product" when there are items
        page.url              context.page_url
        page.referrer         context.referrer

    ``event`` is the tag's event name and ``event_time`` the event's timestamp (Unix seconds).
    In a copy without identifiers (``ctx.restricted``: analytics-only consent) ``user`` keeps
    only ``ip``, ``user_agent`` and ``locale``, and no ``ttclid`` is read from the page URL,
    even from what a tag maps there out of ``properties``.
    A national phone number (and a mapped state or ZIP) is read in the person's country: a
    mapped ``user.country``, else the event's ``user_data.country`` (read for this only: the
    default mapping does not send it, see below), else ``default_country``.

    Unconfirmed (platforms.md §8.5), read safely:

    * the batch limit of 1,000;
    * the response codes: 0 and 20001 count as delivered; 40100, 40700, 42900 and 5xxxx are
      retried; 40001 (no permission) and the access-token codes 40102/40104/40105 are auth
      errors; 40002 and any other non-zero code reject the whole request permanently, as
      RudderStack aborts them;
    * the ``+`` in phone numbers (Segment's reading);
    * ``external_id`` keeps its case, like TikTok's own template;
    * the name and address user fields (``first_name``, ``last_name``, ``city``, ``state``,
      ``country``, ``zip_code``) are normalized when a tag maps them but are not in the
      default mapping, because no TikTok page confirms them.
    """

    name: ClassVar[str] = "tiktok"
    max_batch: ClassVar[int] = 1000
    secret_settings: ClassVar[frozenset[str]] = frozenset({"access_token"})
    settings_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "pixel_code": {
                "type": "string",
                "minLength": 1,
                "description": "Pixel code (web) or event set ID; sent as event_source_id.",
            },
            "access_token": {
                "type": "string",
                "minLength": 1,
                "description": "Events API access token from Events Manager.",
            },
            "test_event_code": {
                "type": "string",
                "minLength": 1,
                "description": "Events Manager test code. TikTok does not keep such events.",
            },
            "default_country": {
                "type": "string",
                "minLength": 2,
                "description": "ISO alpha-2 country for phone numbers written without one.",
            },
            "event_source": {"enum": list(EVENT_SOURCES), "default": "web"},
            "endpoint": {
                "type": "string",
                "pattern": "^https?://",
                "default": DEFAULT_ENDPOINT,
                "description": "Base URL (a proxy, or an emulator in tests).",
            },
        },
        "required": ["pixel_code", "access_token"],
        "additionalProperties": False,
    }
    hashed_fields: ClassVar[frozenset[str]] = frozenset(
        f"user.{key}"
        for key in ("email", "phone", "external_id", "first_name", "last_name", "zip_code")
    )
    personal_homes: ClassVar[Mapping[str, str]] = PERSONAL_HOMES
    default_mapping: ClassVar[Mapping[str, str]] = {
        "event_id": "event_id",
        "user.email": "user_data.email",
        "user.phone": "user_data.phone",
        "user.external_id": "user_data.external_id || user_id",
        "user.ttclid": "context.ttclid",
        "user.ttp": "context.ttp",
        "user.ip": "context.ip",
        "user.user_agent": "context.user_agent",
        "properties.value": "properties.value",
        "properties.currency": "properties.currency",
        "properties.order_id": "properties.order_id",
        "properties.contents": (
            "properties.items[].{content_id: id, content_name: name, price: price,"
            " quantity: quantity}"
        ),
        "properties.content_type": "properties.items[0] && 'product'",
        "page.url": "context.page_url",
        "page.referrer": "context.referrer",
    }

    def mapping_warnings(
        self, event_names: Collection[str] | None, targets: Sequence[str]
    ) -> dict[str, str]:
        """A target passed on as written that TikTok does not document (a did-you-mean when
        its name is close to one it does)."""
        return undocumented_targets(targets, _DOCUMENTED_FIELDS, "TikTok", _UNDOCUMENTED_FATE)

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        # Read once: build_payload runs for every event (and checks the source each time).
        self._source = str(self.settings.get("event_source") or "web")
        self._default_region = normalize.country(
            str(self.settings.get("default_country") or ""), "google"
        )

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """One event for ``data[]``: normalized, hashed and checked.

        Raises:
            PayloadError: the event breaks a TikTok rule (the message names it).
        """
        self._event_source()
        page = _object(mapped.get("page"), "page")
        raw_user = _object(mapped.get("user"), "user")
        if ctx.restricted:
            raw_user = {k: v for k, v in raw_user.items() if k in _ANONYMOUS_USER_FIELDS}
        user = self._user(raw_user, ctx.event)
        if "ttclid" not in user and not ctx.restricted:
            ttclid = normalize.url_param(page.get("url"), "ttclid")
            if ttclid:
                user["ttclid"] = ttclid
        properties = _properties(_object(mapped.get("properties"), "properties"))

        payload: dict[str, Any] = {
            "event": ctx.event_name,
            "event_time": int(ctx.event_time.timestamp()),
            "event_id": _id(mapped.get("event_id") or ctx.event_id, "event_id"),
        }
        if user:
            payload["user"] = user
        if properties:
            payload["properties"] = properties
        page_out = {k: values.text(v, f"page.{k}") for k, v in page.items() if v is not None}
        for key, value in page_out.items():
            cleartext.check(value, f"page.{key}", "TikTok", PERSONAL_HOMES)
        if page_out:
            payload["page"] = page_out
        for key, value in mapped.items():
            if value is not None and key not in _BUILT_FIELDS:
                _passed_on(value, key)
                payload[key] = value
        return payload

    def constant_problem(self, target: str, value: Any) -> str | None:
        """A constant ``properties`` field read here (``currency``, ``value``...) that its check
        refuses."""
        root, _, field = target.partition(".")
        if root == "properties" and field in _PROPERTIES_BUILT_FIELDS:
            return refusal(lambda: _properties({field: value}))
        return None

    def _event_source(self) -> str:
        if self._source not in EVENT_SOURCES:
            raise PayloadError(f"event_source must be one of {', '.join(EVENT_SOURCES)}")
        return self._source

    def _user(self, raw: Mapping[str, Any], event: Mapping[str, Any]) -> dict[str, Any]:
        # Page views and the like carry nothing to normalize: no region to work out then.
        if _NORMALIZED_FIELDS.isdisjoint(raw):
            hashers, clear = _NO_NORMALIZERS
        else:
            # The person's country, as Meta and Google Ads read it: the mapped one, else the
            # event's own (TikTok's payload does not carry it by default), else the setting.
            # Without this a US number would be read as German under default_country DE.
            user_data = event.get("user_data")
            region = (
                _region(raw.get("country"))
                or (_region(user_data.get("country")) if isinstance(user_data, _MAPPING) else None)
                or self._default_region
            )
            hashers, clear = _normalizers(region)
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in hashers:
                digest = normalize.hashed_values(value, hashers[key])
                if digest is not None:
                    out[key] = digest
            elif key in clear:
                text = _str(value)
                normal = clear[key](text) if text else None
                if normal:
                    if "@" in normal:  # no e-mail address as a city, a state or a country
                        cleartext.check(normal, f"user.{key}", "TikTok", PERSONAL_HOMES)
                    out[key] = normal
            elif key in _CLEAR_USER_FIELDS:
                text = _str(value)
                if text:
                    # Sent as it is: no e-mail address from a mapping that falls back to one.
                    if "@" in text:
                        cleartext.check(text, f"user.{key}", "TikTok", PERSONAL_HOMES)
                    out[key] = text
            elif value is not None:
                _passed_on(value, f"user.{key}")
                out[key] = value
        return out

    # -- delivery -------------------------------------------------------------------------------

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One JSON POST carrying up to 1,000 events."""
        if len(items) > self.max_batch:
            raise ValueError(f"TikTok takes at most {self.max_batch} events per request")
        base = str(self.settings.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        body: dict[str, Any] = {
            "event_source": self._event_source(),
            "event_source_id": str(self.settings["pixel_code"]),
        }
        if self.settings.get("test_event_code"):
            body["test_event_code"] = str(self.settings["test_event_code"])
        body["data"] = [dict(item.payload) for item in items]
        headers = {"Access-Token": str(self.settings["access_token"])}
        return HttpRequest.json_post(base + PATH, body, headers)

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """The same result for every item: TikTok answers for the request as a whole."""
        return [_result(response)] * len(items)


_Normalizers = tuple[Mapping[str, normalize.Normalizer], Mapping[str, normalize.Normalizer]]


@lru_cache(maxsize=256)
def _normalizers(region: str | None) -> _Normalizers:
    """The normalizers of the hashed and of the clear-text user fields, built once per region
    (an alpha-2 code that reads national phone numbers, states and postal codes)."""
    hashers: dict[str, normalize.Normalizer] = {
        "email": lambda v: normalize.email(v, "tiktok"),
        "phone": lambda v: normalize.phone(v, "tiktok", region),
        "external_id": lambda v: normalize.external_id(v, "tiktok"),
        "first_name": lambda v: normalize.name(v, "tiktok"),
        "last_name": lambda v: normalize.name(v, "tiktok"),
        "zip_code": lambda v: normalize.postal_code(v, "tiktok", region),
    }
    clear: dict[str, normalize.Normalizer] = {
        "city": lambda v: normalize.city(v, "tiktok"),
        "state": lambda v: normalize.state(v, "tiktok", region),
        "country": lambda v: normalize.country(v, "tiktok"),
    }
    return hashers, clear


_NO_NORMALIZERS: _Normalizers = ({}, {})
_NORMALIZED_FIELDS = frozenset().union(*_normalizers(None))


def _region(value: object) -> str | None:
    """The alpha-2 code of a country given as text (code or name), None if it is none."""
    text = _str(value)
    if not text or normalize.is_hashed(text):
        return None
    return normalize.country(text, "google")


def _str(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    return values.scalar_text(value)


def _object(value: object, field: str) -> Mapping[str, Any]:
    """``value`` itself when it is an object (read, never changed), else refused; None is {}."""
    if value is None:
        return {}
    if not isinstance(value, _MAPPING):
        raise PayloadError(f"{field} must be an object")
    return value


def _number(value: object, field: str) -> float:
    return values.number(value, f"properties.{field}")


# properties fields _properties reads itself; the others are passed on as they are.
_PROPERTIES_BUILT_FIELDS = frozenset(
    {"value", "predicted_ltv", "currency", "order_id", "content_ids", "contents"}
)


def _properties(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in raw.items() if v is not None}
    for key in ("value", "predicted_ltv"):
        if key in out:
            out[key] = _number(out[key], key)
    if "currency" in out:
        currency = out["currency"]
        currency = currency.strip().upper() if isinstance(currency, str) else ""
        if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
            raise PayloadError("properties.currency must be an ISO 4217 code")
        out["currency"] = currency
    if "order_id" in out:
        out["order_id"] = _id(out["order_id"], "properties.order_id")
    if "content_ids" in out:
        if isinstance(out["content_ids"], list):
            out["content_ids"] = [
                _id(i, "properties.content_ids[]") for i in out["content_ids"] if i is not None
            ]
        else:
            _passed_on(out["content_ids"], "properties.content_ids")
    if "contents" in out:
        if not isinstance(out["contents"], list):
            raise PayloadError("properties.contents must be a list")
        out["contents"] = [_content(c) for c in out["contents"] if isinstance(c, _MAPPING)]
    for key, value in out.items():
        if key not in _PROPERTIES_BUILT_FIELDS:
            _passed_on(value, f"properties.{key}")
    return {k: v for k, v in out.items() if v not in ([], {}, None)}


def _passed_on(value: Any, field: str) -> None:
    """Refuse a value passed on as mapped that JSON cannot carry or that holds personal data in
    clear text (a mapping to ``user.em`` instead of ``user.email``, say)."""
    values.check_json(value, field)
    cleartext.check(value, field, "TikTok", PERSONAL_HOMES)


def _content(raw: Mapping[str, Any]) -> dict[str, Any]:
    content = {k: v for k, v in raw.items() if v is not None}
    if "content_id" in content:
        content["content_id"] = values.text(
            content["content_id"], "properties.contents[].content_id"
        )
    if "price" in content:
        content["price"] = values.number(content["price"], "properties.contents[].price")
    if "quantity" in content:
        content["quantity"] = values.integer(content["quantity"], "properties.contents[].quantity")
    _passed_on(content, "properties.contents[]")
    return content


def _result(response: HttpResponse) -> ItemResult:
    body = response.json()
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        if 200 <= response.status < 300:
            return ItemResult(Outcome.RETRYABLE, f"unexpected answer: {response.excerpt(200)}")
        return status_result(response)
    message = body.get("message") if isinstance(body, dict) else None
    reason = f"TikTok code {code}: {message}"[:500] if message else f"TikTok code {code}"
    if code in _SUCCESS_CODES and 200 <= response.status < 300:
        return ItemResult(Outcome.DELIVERED, None if code == 0 else reason)
    retry_after = retry_after_seconds(response.headers)
    if code in _RETRY_CODES or 50000 <= code <= 59999 or response.status >= 500:
        return ItemResult(Outcome.RETRYABLE, reason, retry_after)
    if code in _AUTH_CODES or response.status in (401, 403):
        return ItemResult(Outcome.AUTH, reason)
    if retryable_status(response.status):
        return ItemResult(Outcome.RETRYABLE, reason, retry_after)
    # TikTok refuses a whole batch for one erroneous event, without naming it.
    return ItemResult(Outcome.PERMANENT, reason, whole_request=True)


def _id(value: object, field: str) -> str:
    """An ID TikTok receives as it is: text, and no e-mail address (see
    :func:`cleartext.identifier`)."""
    return cleartext.identifier(value, field, "TikTok", PERSONAL_HOMES)
