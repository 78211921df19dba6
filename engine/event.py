"""The canonical event: parse, validate against its JSON Schema, normalize.

What clients send is described in the brief; this module turns one decoded JSON value into a
normalized event dict or raises :class:`~engine.errors.BadRequest` with a message that names the
field. Normalization: ``event_type`` becomes ``event_name``; ``timestamp`` (ISO 8601 or Unix
seconds) becomes ISO 8601 UTC with a ``Z``; a missing ``event_id`` is generated; consent values
become ``"granted"`` / ``"denied"``; ``context.ip`` is read as the address it names, or left
out (:func:`readable_ip`); personal data in ``context.page_url`` and ``context.referrer`` is
redacted (:mod:`engine.urlprivacy`); an identifier that is a JavaScript non-value
(:data:`destinations.values.NON_VALUES`, or blank) is left out and listed under ``dropped``
(:func:`~destinations.values.no_value`).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema

from destinations.values import no_value
from engine.errors import BadRequest
from engine.urlprivacy import redact_personal_data

_SHORT_STRING = {"type": "string", "maxLength": 256}
_MAX_ID = 256
_ID = {"type": ["string", "integer"], "minLength": 1, "maxLength": _MAX_ID}
_NULLABLE_STRING = {"type": ["string", "null"], "maxLength": 4096}
# Google's own APIs write GRANTED and DENIED (the Ads API's Consent); null is a purpose the
# person has not decided, taken as not sent (so the container's consent_defaults apply).
CONSENT_WORDS = ("granted", "denied", "GRANTED", "DENIED", "Granted", "Denied")
_CONSENT_VALUE = {"oneOf": [{"enum": list(CONSENT_WORDS)}, {"type": "boolean"}, {"type": "null"}]}

CONSENT_PURPOSES = ("ad_storage", "analytics_storage", "ad_user_data", "ad_personalization")

EVENT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "tagrelay canonical event",
    "type": "object",
    "properties": {
        "event_name": {**_SHORT_STRING, "minLength": 1},
        "event_type": {**_SHORT_STRING, "minLength": 1},
        "event_id": _ID,
        "timestamp": {"type": ["string", "number"]},
        "visitor_id": {**_SHORT_STRING, "minLength": 1},
        "session_id": {**_SHORT_STRING, "minLength": 1},
        # null: no user is signed in (tagrelay.js after reset(), a backend's logout), which
        # enrichment then adds none to and the visitor forgets (see signs_out).
        "user_id": {"type": ["string", "null"], "maxLength": 256, "minLength": 1},
        "properties": {"type": "object"},
        "user_data": {
            "type": "object",
            "properties": {
                key: _NULLABLE_STRING
                for key in (
                    "email",
                    "phone",
                    "first_name",
                    "last_name",
                    "date_of_birth",
                    "gender",
                    "city",
                    "state",
                    "postal_code",
                    "country",
                    "external_id",
                )
            },
        },
        "context": {
            "type": "object",
            "properties": {"ip": _NULLABLE_STRING, "user_agent": _NULLABLE_STRING},
        },
        "consent": {
            "type": "object",
            "properties": {purpose: _CONSENT_VALUE for purpose in CONSENT_PURPOSES},
            "additionalProperties": _CONSENT_VALUE,
        },
    },
    "additionalProperties": False,
}

_VALIDATOR = jsonschema.Draft202012Validator(EVENT_SCHEMA)
_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_FUTURE_SLACK = timedelta(hours=1)


def _quoted(text: Any) -> str:
    """``text`` quoted for an error message, cut to 60 characters."""
    shown = repr(str(text)[:60])
    return shown if len(str(text)) <= 60 else shown + "..."


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "event"
    if error.validator == "additionalProperties" and isinstance(error.schema, dict):
        instance: Any = error.instance
        extra = sorted(set(instance) - set(error.schema.get("properties", {})))
        if extra == ["source"] and not error.absolute_path:
            return (
                "source is set by tagrelay (server for /v1/track, browser for /v1/collect), "
                "not by the client: leave it out"
            )
        return f"unknown field {extra[0]!r} in {where}" if extra else f"{where}: {error.message}"
    if error.validator == "type":
        expected = error.validator_value
        if isinstance(expected, list):
            expected = " or ".join(expected)
        return f"{where} must be {expected}"
    if error.validator in ("maxLength", "minLength"):
        return f"{where} is too {'long' if error.validator == 'maxLength' else 'short'}"
    if error.validator == "oneOf":
        return f"{where} must be 'granted', 'denied', a boolean or null"
    return f"{where}: {error.message}"


_TOP_KEYS = frozenset(EVENT_SCHEMA["properties"])
_ID_KEYS = ("event_name", "event_type", "visitor_id", "session_id")
_USER_DATA_KEYS = frozenset(EVENT_SCHEMA["properties"]["user_data"]["properties"])
_CONSENT_VALUES = frozenset(CONSENT_WORDS)


_MISSING = object()

_TOP_IDS = ("visitor_id", "session_id", "user_id")
CONTEXT_IDS = frozenset(
    {
        # click IDs (engine.identity.CLICK_PARAMS) and the platforms' cookies
        *("gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid", "li_fat_id", "epik"),
        *("sccid", "rdt_cid", "fbc", "fbp", "ttp", "ga_client_id", "ga_session_id"),
    }
)
"""The identifiers of ``context`` that a JavaScript non-value is dropped from."""


def _drop_non_values(event: dict[str, Any], raw: Mapping[str, Any]) -> dict[str, str]:
    """Leave out of ``event`` (in place; the client's nested objects are copied, not changed)
    its identifiers that are :func:`no_value`: ``visitor_id``, ``session_id``, ``user_id``,
    the documented ``user_data`` fields and :data:`CONTEXT_IDS`. Returns them, by path."""
    dropped: dict[str, str] = {}
    for key in _TOP_IDS:
        if no_value(value := event.get(key)):
            dropped[key] = value
            del event[key]
    for part, names in (("user_data", _USER_DATA_KEYS), ("context", CONTEXT_IDS)):
        section = event.get(part)
        if not section:
            continue
        junk = [key for key, value in section.items() if key in names and no_value(value)]
        if junk:
            section = event[part] = {k: v for k, v in section.items() if k not in junk}
            dropped.update((f"{part}.{key}", raw[part][key]) for key in junk)
    return dropped


def conforms(raw: dict[str, Any]) -> bool:
    """A fast, hand-written check that ``raw`` satisfies :data:`EVENT_SCHEMA`.

    Sound, not complete: True only for events the schema accepts (a property test holds the
    two together); on False the caller asks jsonschema, which also words the error. Most
    events are valid, so most never pay for the generic validator (~10x slower).
    """
    if not _TOP_KEYS.issuperset(raw):
        return False
    get = raw.get
    for key in _ID_KEYS:
        value = get(key, _MISSING)
        if value is not _MISSING and not (type(value) is str and 0 < len(value) <= 256):
            return False
    user_id = get("user_id")  # absent, null (no user signed in) or an ID
    if user_id is not None and not (type(user_id) is str and 0 < len(user_id) <= 256):
        return False
    event_id = get("event_id", _MISSING)
    if event_id is not _MISSING and not (
        type(event_id) is int or (type(event_id) is str and 0 < len(event_id) <= 256)
    ):
        return False
    timestamp = get("timestamp", _MISSING)
    if timestamp is not _MISSING and type(timestamp) not in (str, int, float):
        return False
    properties = get("properties", _MISSING)
    if properties is not _MISSING and type(properties) is not dict:
        return False
    # user_data and context: the schema's string fields may be null or a string of up to 4096
    # characters; other keys are free. Only the keys present need looking at.
    user_data = get("user_data", _MISSING)
    if user_data is not _MISSING:
        if type(user_data) is not dict:
            return False
        for key, value in user_data.items():
            if type(value) is str:
                if len(value) > 4096 and key in _USER_DATA_KEYS:
                    return False
            elif value is not None and key in _USER_DATA_KEYS:
                return False
    context = get("context", _MISSING)
    if context is not _MISSING:
        if type(context) is not dict:
            return False
        for key in ("ip", "user_agent"):
            value = context.get(key)
            if value is not None and not (type(value) is str and len(value) <= 4096):
                return False
    consent = get("consent", _MISSING)
    if consent is not _MISSING:
        if type(consent) is not dict:
            return False
        for value in consent.values():
            if not (
                value in _CONSENT_VALUES
                if type(value) is str
                else value is None or type(value) is bool
            ):
                return False
    return True


def parse_timestamp(value: Any, now: datetime) -> datetime:
    """Read an ISO 8601 string or Unix seconds into an aware UTC datetime.

    Raises:
        BadRequest: unreadable, in milliseconds, before 2000 or more than an hour in the future.
    """
    if isinstance(value, bool):
        raise BadRequest("timestamp must be an ISO 8601 string or Unix seconds")
    if isinstance(value, int | float):
        if 1e11 < value < 1e14:
            raise BadRequest("timestamp looks like milliseconds; send Unix seconds")
        if 1e14 <= value < 1e17:
            raise BadRequest("timestamp looks like microseconds; send Unix seconds")
        try:
            when = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise BadRequest("timestamp is out of range") from exc
    else:
        text = str(value).strip()
        try:
            # RFC 3339 allows a lower-case "t" and "z", which fromisoformat does not read.
            when = datetime.fromisoformat(text if text.isupper() else text.upper())
        except ValueError as exc:
            if text.isdigit() and len(text) > 8:  # "1795185045": Unix seconds, quoted
                raise BadRequest(
                    "timestamp: Unix seconds must be a JSON number, not a string"
                ) from exc
            raise BadRequest("timestamp must be ISO 8601 (e.g. 2026-11-20T14:30:45Z)") from exc
        try:
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        except OverflowError as exc:  # e.g. year 1 with a positive offset
            raise BadRequest("timestamp is out of range") from exc
    if when < _EARLIEST:
        raise BadRequest("timestamp is before the year 2000")
    if when > now + _FUTURE_SLACK:
        raise BadRequest("timestamp is more than an hour in the future")
    return when


def format_time(when: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` and millisecond precision."""
    when = when.astimezone(UTC)
    # What isoformat(timespec="milliseconds") writes (with "Z" for "+00:00"), without its
    # keyword parsing and time zone lookup: about twice as fast.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 - the fastest form
        when.year,
        when.month,
        when.day,
        when.hour,
        when.minute,
        when.second,
        when.microsecond // 1000,
    )


def new_event_id() -> str:
    """A random event ID for events sent without one."""
    return uuid.uuid4().hex


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def readable_ip(ip: str) -> str | None:
    """The client IP address ``ip`` names, written as ``ipaddress`` writes it; None if none.

    What backends send as ``context.ip`` is not always one address, and platforms treat an
    unreadable one differently (Meta drops it, GA4 and TikTok take it, and TikTok may refuse
    the request it is in). So, before the event is stored:

    - an IPv4-mapped IPv6 address is the IPv4 address it is: a server listening on ``[::]``
      sees every IPv4 client as ``::ffff:203.0.113.7``, which is kept, truncated and forwarded
      as ``203.0.113.7``;
    - a list, as a backend that copied ``X-Forwarded-For`` sends it (``203.0.113.7,
      10.0.0.1``), gives its first entry: by that header's convention the client, the later
      ones being the proxies it passed. If that entry is no address (``unknown, 10.0.0.1``),
      there is none: a later one is a proxy's, never the client's;
    - a port is left out (``203.0.113.7:51234``, ``[2001:db8::1]:443``), and so is an IPv6
      zone (``fe80::1%eth0``);
    - anything else (``unknown``, a host name) is no address.
    """
    text = ip.strip()
    if _DOTTED_QUAD.fullmatch(text):
        return text  # already as ipaddress would write it: most addresses, without a parse
    candidate = text.partition(",")[0].strip()
    if candidate.startswith("[") and "]" in candidate:
        candidate = candidate[1 : candidate.index("]")]
    elif candidate.count(":") == 1:
        candidate = candidate.partition(":")[0]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.scope_id is not None:
            # "fe80::1%eth0": the zone names an interface of the sender's own host, nothing the
            # address means elsewhere, and is any text at all, so it is not kept.
            return str(ipaddress.IPv6Address(candidate.partition("%")[0]))
    return str(address)


def validate(raw: Any) -> None:
    """Check ``raw`` against :data:`EVENT_SCHEMA`.

    Raises:
        BadRequest: with a message naming the first problem found.
    """
    if not isinstance(raw, dict):
        raise BadRequest("an event must be a JSON object")
    if not conforms(raw) and not _VALIDATOR.is_valid(raw):
        error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(raw))
        raise BadRequest(_describe(error))


def signs_out(raw: Any) -> bool:
    """Whether ``raw`` says no user is signed in: ``"user_id": null`` (tagrelay.js after
    ``reset()``, a backend's logout). Its visitor is then no user's (the identity update
    forgets its user) and enrichment adds it none; :func:`normalize` leaves the null out, so
    the stored event and the tags see an event without a user ID."""
    return isinstance(raw, dict) and "user_id" in raw and raw["user_id"] is None


SOURCES = ("server", "browser")
"""What an event's ``source`` may be: set by tagrelay, never by the client (see normalize)."""


def simulated_source(raw: Any) -> tuple[Any, str]:
    """An event given to ``tagrelay preview`` or a rule test, which may say which endpoint it
    stands for with ``source`` (``server``, the default, or ``browser``): the event without
    it, and the source.

    Raises:
        BadRequest: ``source`` is neither.
    """
    if not isinstance(raw, dict) or "source" not in raw:
        return raw, "server"
    rest = dict(raw)
    source = rest.pop("source")
    if source not in SOURCES:
        raise BadRequest(f"source must be 'server' or 'browser', not {_quoted(source)}")
    return rest, source


def normalize(
    raw: Any,
    now: datetime | None = None,
    redact_params: frozenset[str] = frozenset(),
    source: str = "server",
) -> dict[str, Any]:
    """Validate one event and return its normalized form.

    Args:
        raw: the decoded JSON value the client sent.
        now: the time of receipt (UTC); defaults to the current time.
        redact_params: page URL fields redacted whatever they hold, beside those
            :func:`engine.urlprivacy.redact_personal_data` finds itself
            (``TAGRELAY_REDACT_QUERY_PARAMS``).
        source: the endpoint that took it, kept as the event's ``source``: ``server``
            (``/v1/track``, a server key) or ``browser`` (``/v1/collect``, a publishable key
            any page may use). Rules can then tell a backend's copy from a page's, which no
            field the client sends can (a client that sends ``source`` is refused).

    Identifiers that are JavaScript non-values (``"undefined"``, ``"null"``, ``"NaN"``,
    ``"[object Object]"``, blank; see :func:`no_value`) are left out, not refused (the event's
    other tags still need it), and listed under ``dropped`` (path -> the text sent).

    Raises:
        BadRequest: with a message naming the first problem found.
    """
    now = now or datetime.now(UTC)
    validate(raw)
    event = dict(raw)
    if "user_id" in event and event["user_id"] is None:
        del event["user_id"]  # no user signed in (see signs_out): absent to all that follows
    # Before anything reads them (enrichment, the identity update, tags): treated as absent, so
    # enrichment may fill them and nothing remembers them; listed, so the drop is seen.
    if dropped := _drop_non_values(event, raw):
        event["dropped"] = dropped
    event["source"] = source
    alias = event.pop("event_type", None)
    if "event_name" not in event:
        if alias is None:
            raise BadRequest("event_name is required (event_type is accepted as an alias)")
        event["event_name"] = alias
    elif alias is not None and alias != event["event_name"]:
        # Which one the client meant cannot be told; taking either could send a purchase as
        # a page view.
        raise BadRequest(
            f"event_name and event_type differ ({_quoted(event['event_name'])} and "
            f"{_quoted(alias)}): send one name (event_type is an alias of event_name)"
        )
    event_id = event.get("event_id")
    if event_id is None:
        event["event_id"] = new_event_id()
    elif type(event_id) is not str:
        # The schema's "integer" also admits 1.0 and 1e300, and its maxLength counts no digits.
        if type(event_id) is not int:
            raise BadRequest(
                "event_id must be a string or a whole number written without a decimal point "
                "or an exponent"
            )
        if len(str(event_id)) > _MAX_ID:
            raise BadRequest(
                f"event_id must be a string or a whole number of at most {_MAX_ID} digits"
            )
        event["event_id"] = str(event_id)
    when = parse_timestamp(event["timestamp"], now) if "timestamp" in event else now
    event["timestamp"] = format_time(when)
    context = event.get("context")
    if context and (ip := context.get("ip")) is not None:  # text, by the schema
        readable = readable_ip(ip)
        if readable != ip:  # read before anything uses it (enrichment, the IP policy, tags)
            context = event["context"] = dict(context)  # the client's object stays as sent
            if readable is None:
                del context["ip"]
            else:
                context["ip"] = readable
    if context:
        for key in ("page_url", "referrer"):  # see engine.urlprivacy: stored, then sent, clean
            url = context.get(key)
            if type(url) is str and (clean := redact_personal_data(url, redact_params)) != url:
                if context is raw.get("context"):
                    context = event["context"] = dict(context)
                context[key] = clean
    consent = event.get("consent")
    if consent:
        event["consent"] = {
            k: ("granted" if v is True or (v is not False and v.lower() == "granted") else "denied")
            for k, v in consent.items()
            if v is not None
        }
    return event


def event_time(event: Mapping[str, Any]) -> datetime:
    """The normalized event's timestamp as an aware datetime."""
    return datetime.fromisoformat(event["timestamp"])
