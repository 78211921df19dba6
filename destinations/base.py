"""The destination plugin API.

A destination turns mapped events into HTTP requests and reads the platform's answers. It does
no I/O: the engine owns the HTTP session, batching, retries, dedup, consent, storage and logging.

The life of one event through a destination::

    canonical event --(tag mapping over default_mapping)--> mapped dict
    mapped dict --build_payload()--> payload           (at intake; stored in the outbox)
    payload --check_item()--> None | reason            (at send time; e.g. "too old")
    payload --batch_key()--> key                       (items of one key may share a request)
    [items of one key] --split()--> [[items], ...]     (the requests to send; pure)
    [payloads] --build_request()--> HttpRequest        (one request; pure)
    HttpResponse --read_response()--> [ItemResult]     (one result per item, in order)

A third-party plugin subclasses :class:`Destination`, sets the class attributes and registers
the class under the ``tagrelay.destinations`` entry-point group; its entry-point name is the
``type:`` used in rule files.
"""

from __future__ import annotations

import difflib
import enum
import functools
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"

JSON_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""The encoder of :meth:`HttpRequest.json_post` bodies: compact, text left unescaped (UTF-8)."""


class PayloadError(ValueError):
    """The mapped event cannot become a valid payload for this platform.

    The message names the platform rule that was broken. Never retried: the same input gives
    the same error, so the engine records it as the tag's decision (or a permanent failure).
    """


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request, fully built; what the engine sends as is."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json_post(cls, url: str, obj: Any, headers: Mapping[str, str] | None = None) -> HttpRequest:
        """A POST with a compact JSON body and ``Content-Type: application/json``."""
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        return cls("POST", url, all_headers, JSON_BODY.encode(obj).encode())

    def json(self) -> Any:
        """The body decoded as JSON, or None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


def json_size(obj: Any) -> int:
    """The length in bytes of ``obj`` as :meth:`HttpRequest.json_post` encodes it (UTF-8).

    For a :meth:`Destination.split` that packs requests by body size: encode each part once and
    add up the parts, rather than encoding every candidate body whole.

    Raises:
        ValueError: ``obj`` holds text that UTF-8 cannot carry (a lone surrogate), as the body
            itself would.
        TypeError: ``obj`` is not JSON data.
    """
    text = JSON_BODY.encode(obj)
    # ASCII text has one byte per character: no need to encode it to count them.
    return len(text) if text.isascii() else len(text.encode())


@dataclass(frozen=True)
class HttpResponse:
    """What came back from the platform."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body decoded as JSON, or None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    def excerpt(self, limit: int = 500) -> str:
        """The start of the body as text, for error records (never the request's secrets)."""
        return self.body[:limit].decode("utf-8", "replace")


class Outcome(enum.Enum):
    """What happened to one item of a batch."""

    DELIVERED = "delivered"
    RETRYABLE = "retryable"  # timeouts, 408, 429, 5xx, platform throttling: try again later
    PERMANENT = "permanent"  # the platform rejected this item; sending it again will not help
    AUTH = "auth"  # credentials or permissions: an operator must act; retried slowly


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item, with the platform's reason when it was not delivered.

    ``whole_request``, with :attr:`Outcome.PERMANENT`: the platform refused the request as a
    whole for an item it does not name (Meta, TikTok), so the other items were not refused for
    themselves. The delivery worker then sends the request's halves on their own, and halves
    the refused half again, so that only the refused item becomes a dead letter (see README,
    "Delivery").
    """

    outcome: Outcome
    error: str | None = None
    retry_after: float | None = None
    whole_request: bool = False

    @classmethod
    def delivered(cls) -> ItemResult:
        """The platform accepted the item."""
        return cls(Outcome.DELIVERED)


@dataclass(frozen=True)
class Item:
    """One delivery in a batch: the stored payload and the identifiers around it."""

    delivery_id: str
    event_id: str
    payload: Mapping[str, Any]


@dataclass(slots=True)
class PayloadContext:
    """What a destination knows about the event while building a payload (at intake).

    Read-only by contract. Not a frozen dataclass only because one is made for every tag that
    fires, and a frozen dataclass's constructor costs five times as much.
    """

    tag: str
    event_name: str  # the platform event name the tag chose
    event_id: str
    event_time: datetime  # timezone-aware, UTC
    event: Mapping[str, Any]  # the canonical event, after consent stripping
    restricted: bool = False  # analytics-only consent: identifiers were stripped
    now: datetime | None = None  # the time of receipt; None means "now" (e.g. in unit tests)


@dataclass(frozen=True)
class SendContext:
    """What a destination knows while building a request (at send time)."""

    now: datetime
    access_token: str | None = None  # from token_request(), when the destination uses one


@dataclass(frozen=True)
class Token:
    """An access token from an OAuth exchange and its lifetime in seconds."""

    value: str
    expires_in: float


class Destination:
    """Base class of every destination adapter.

    Subclasses set the class attributes and override :meth:`build_request` and
    :meth:`read_response`; the rest has sensible defaults.
    """

    name: ClassVar[str] = ""
    """The entry-point name, which is also the ``type:`` in rule files."""
    max_batch: ClassVar[int] = 1
    """The most items the platform takes in one request."""
    secret_settings: ClassVar[frozenset[str]] = frozenset()
    """Settings whose values never reach a log, a preview or an error message."""
    settings_schema: ClassVar[dict[str, Any]] = {"type": "object"}
    """JSON Schema of the destination's settings, checked by ``tagrelay check``."""
    default_mapping: ClassVar[Mapping[str, str]] = {}
    """Target path (dotted) -> expression over the canonical event. Tags override or extend it;
    a tag mapping a target to ``null`` removes it."""
    hashed_fields: ClassVar[frozenset[str]] = frozenset()
    """Mapping targets (dotted) whose values the adapter normalizes and hashes. When it names
    any, ``tagrelay check`` refuses a tag that maps the event's personal data (its e-mail,
    phone, names, date of birth, or its whole ``user_data``) to any other target, or maps
    anything to another target named like personal data (``user_data.email`` for Meta): the
    platform would receive it in clear text. See :mod:`destinations.cleartext`, which also
    checks built payloads."""
    personal_homes: ClassVar[Mapping[str, str]] = {}
    """Kind of personal data (``"email"``, ``"phone"``, ``"first_name"``, ``"last_name"``,
    ``"date_of_birth"``, ``"street"``) -> the hashed target it belongs in, named in messages."""

    mapping_fields: ClassVar[frozenset[str] | None] = None
    """The top-level mapping targets the adapter takes (the first name of a dotted target), or
    None when it takes any. When set, ``tagrelay check`` reports a tag that maps another one as
    an error at that target: :meth:`build_payload` would refuse every event of the tag."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings: Mapping[str, Any] = dict(settings)

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """Turn the mapped fields into the stored payload of one item (normalize, hash, check).

        Pure. Raise :class:`PayloadError` naming the broken rule when the event cannot be sent;
        any other exception is a bug of the adapter, which the engine records as the tag's
        decision (the tag does not fire). Read mapped values through
        :mod:`destinations.values`: a mapping can give any JSON value, NaN or an infinity for
        any target.

        The default returns the mapped dict with the event's name, ID and time added, its values
        unchecked; an adapter that sends them on as they are refuses what JSON cannot carry with
        :func:`destinations.values.check_json` first (as ``webhook`` does).
        """
        payload = dict(mapped)
        payload.setdefault("event_name", ctx.event_name)
        payload.setdefault("event_id", ctx.event_id)
        if "timestamp" not in payload:
            # The canonical event's own timestamp is this time already written in UTC with
            # milliseconds; formatting ``event_time`` again would only cost.
            stamp = ctx.event.get("timestamp")
            if not isinstance(stamp, str):
                stamp = ctx.event_time.isoformat().replace("+00:00", "Z")
            payload["timestamp"] = stamp
        return payload

    def mapping_warnings(
        self, event_names: Collection[str] | None, targets: Sequence[str]
    ) -> dict[str, str]:
        """What ``tagrelay check`` warns about a tag of this destination: targets the tag maps
        that the adapter will leave out of what it sends, each with its message. The default has
        nothing to say.

        Args:
            event_names: the platform event names the tag can send: its ``event_name`` when it
                is a constant, else (none given) the events its triggers name; None when they
                cannot be known (an expression, a trigger on any event).
            targets: the targets the tag's own mapping sets (a removing ``null`` is none).
        """
        return {}

    def constant_problem(self, target: str, value: Any) -> str | None:
        """Why :meth:`build_payload` would refuse every event of a tag whose mapping sets
        ``target`` (dotted) to the constant ``value`` (a Google Ads ``conversionAction`` that
        is no ID, a currency that is no ISO 4217 code), else None. ``tagrelay check`` reports it
        as an error at the constant. The default has nothing to say."""
        return None

    def anonymous_warning(self, event_names: Collection[str] | None) -> str | None:
        """What ``tagrelay check`` warns about a tag of this destination that forwards a copy
        without identifiers (consent ``anonymous``), when the adapter refuses such copies
        (:meth:`build_payload` needs what they leave out); None when it takes them, as the
        default does. ``event_names``: as for :meth:`mapping_warnings`."""
        return None

    # -- delivery -------------------------------------------------------------------------------

    def check_item(self, item: Item, ctx: SendContext) -> str | None:
        """A reason why this item can no longer be sent (e.g. it is too old), else None."""
        return None

    def batch_key(self, item: Item) -> str:
        """Items with different keys never share a request (e.g. GA4's one client_id)."""
        return ""

    def sends_alone(self) -> bool:
        """Whether every request carries one item (``max_batch`` 1, or a setting such as the
        webhook's ``batch: false``). The engine then shares a destination's due items among
        its ``concurrency`` slots, whose batches send request after request, instead of
        leasing ``max_batch`` of them to one batch."""
        return self.max_batch == 1

    def split(self, items: Sequence[Item]) -> list[list[Item]]:
        """Cut the items of one batch key into the requests that deliver them. Pure.

        The engine sends one request per list, in the order given, through
        :meth:`build_request`. Every item must be in exactly one list (the same objects, in any
        order), and every list must hold 1 to ``max_batch`` items. An exception, or an answer
        that breaks these rules, is taken for a bug of the plugin: the items of that batch key
        become dead letters naming the problem, and none of them is sent.

        The default cuts by count, in order: runs of ``max_batch`` items. Override it when a
        request has another limit, such as GA4's body size (:class:`destinations.ga4.GA4`).
        """
        size = self.max_batch
        return [list(items[start : start + size]) for start in range(0, len(items), size)]

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """The request that delivers ``items``: one list of :meth:`split`. Pure."""
        raise NotImplementedError

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """One result per item, in order. The default reads the HTTP status alone.

        Never called for a 413 answer: the engine reads it (a request of several items is sent
        again in halves; see the README, "Delivery, retries and dead letters").
        """
        return [status_result(response)] * len(items)

    def token_request(self) -> HttpRequest | None:
        """The request that obtains an access token (OAuth), or None when none is needed."""
        return None

    def read_token(self, response: HttpResponse) -> Token:
        """Read the token out of the answer to :meth:`token_request`."""
        raise NotImplementedError

    # -- secrets --------------------------------------------------------------------------------

    def secrets(self) -> list[str]:
        """The secret setting values, longest first (so replacing never leaves a fragment).

        A setting that is an object or a list (headers, several keys) gives each value in it, at
        any depth: its text as a whole is nothing a request carries. Booleans are no secrets.
        """
        found: set[str] = set()
        for key in self.secret_settings:
            _secret_texts(self.settings.get(key), found)
        return sorted(found, key=lambda text: (-len(text), text))

    def redact(self, request: HttpRequest) -> HttpRequest:
        """The same request with every secret replaced by ``[REDACTED]`` (see :meth:`redact_text`).

        The URL, every header value and the body are redacted; an ``Authorization`` header is
        replaced whole.
        """
        if not self.secrets():
            return request
        url = self.redact_text(request.url)
        body = self.redact_text(request.body.decode("utf-8", "replace"))
        headers = {
            k: REDACTED if k.lower() == "authorization" else self.redact_text(v)
            for k, v in request.headers.items()
        }
        return replace(request, url=url, headers=headers, body=body.encode())

    def redact_text(self, text: str) -> str:
        """``text`` with every secret setting value replaced by ``[REDACTED]``.

        For anything shown or stored that may quote a request: previews, error messages, dead
        letters. A secret is found as it is and in every form a request or an answer may carry
        it in: percent-encoded in a URL (``quote``, with or without ``/`` kept, either case of
        hex digits), form-encoded (``quote_plus``) and escaped in a JSON string (with or without
        ``\\u`` escapes and ``\\/``). Only whole occurrences are replaced: a secret that starts
        or ends with a letter, digit, ``_`` or ``-`` must not go on into more of them, so a short
        secret such as ``tok`` leaves ``access_token`` alone while ``access_token=tok`` becomes
        ``access_token=[REDACTED]``.

        A secret cut short also goes: the first :data:`FRAGMENT` characters or more of any form
        of a longer secret, where the text ends after them or goes on with no letter, digit,
        ``_`` or ``-``. A platform's answer quoting a secret is cut to
        a length before it reaches here (``excerpt(200)``), and the cut can fall inside it.
        """
        secrets = self.secrets()
        # A plugin's secrets() giving one text, not a list of them, would redact each letter.
        return redact_values(text, [secrets] if isinstance(secrets, str) else secrets)


def _secret_texts(value: object, found: set[str]) -> None:
    """Add the text of every value in ``value`` (a setting, at any depth) to ``found``."""
    if isinstance(value, Mapping):
        for inner in value.values():
            _secret_texts(inner, found)
    elif isinstance(value, list | tuple | set | frozenset):
        for inner in value:
            _secret_texts(inner, found)
    elif value and not isinstance(value, bool):  # as before: an empty value or a 0 is none
        found.add(str(value))


def redact_values(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` (longest first) replaced by ``[REDACTED]``, in every
    form and cut short, as :meth:`Destination.redact_text` replaces the secret settings.

    For secrets that are no setting, such as the OAuth token the engine obtained with
    :meth:`Destination.token_request`.
    """
    found = tuple(secrets)
    pattern = _secrets_pattern(found)
    if pattern is None:
        return text
    return _redact_fragments(pattern.sub(REDACTED, text), found)


FRAGMENT = 8
"""The fewest leading characters of a secret :meth:`Destination.redact_text` takes for a piece of
it: a shorter piece tells little of a secret, and would match too much else."""


# A character that continues a token: a secret next to one is part of something longer.
_TOKEN_CHAR = re.compile(r"[\w-]")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def _secret_forms(secret: str) -> set[str]:
    """``secret`` as written raw, percent-encoded, form-encoded and JSON-escaped."""
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),  # "/" kept, as in a URL path
        quote_plus(secret),  # urlencode() of a form or a query string
        quote_plus(secret, safe="/"),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    forms |= {form.replace("/", "\\/") for form in forms if "/" in form}  # JSON's optional \/
    forms |= {_PERCENT_ESCAPE.sub(lambda m: m.group().lower(), form) for form in forms}
    forms.discard("")
    return forms


@functools.lru_cache(maxsize=256)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regular expression matching every form of every secret as a whole token."""
    forms = sorted({form for secret in secrets for form in _secret_forms(secret)}, key=len)
    alternatives = []
    for form in reversed(forms):  # longest first: a longer form wins over its own prefix
        before = r"(?<![\w-])" if _TOKEN_CHAR.match(form[0]) else ""
        after = r"(?![\w-])" if _TOKEN_CHAR.match(form[-1]) else ""
        alternatives.append(before + re.escape(form) + after)
    return re.compile("|".join(alternatives)) if alternatives else None


@functools.lru_cache(maxsize=256)
def _fragment_index(secrets: tuple[str, ...]) -> tuple[re.Pattern[str], dict[str, tuple[str, ...]]]:
    """A pattern finding the first :data:`FRAGMENT` characters of every form of every secret
    longer than that, and the forms each such start begins."""
    forms: dict[str, set[str]] = {}
    for secret in secrets:
        for form in _secret_forms(secret):
            if len(form) > FRAGMENT:
                forms.setdefault(form[:FRAGMENT], set()).add(form)
    starts = sorted(forms, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, starts)) if starts else r"(?!)")
    return pattern, {start: tuple(found) for start, found in forms.items()}


def _redact_fragments(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with every run of at least :data:`FRAGMENT` characters that begins a form of a
    secret replaced by ``[REDACTED]``: what is left of a secret cut short."""
    pattern, forms = _fragment_index(secrets)
    pieces: list[str] = []
    pos = scan = 0
    while (found := pattern.search(text, scan)) is not None:
        start = found.start()
        end = start + max(_common_prefix(text, start, form) for form in forms[found.group()])
        # Cut short, a secret ends where the text does or where something was added after the
        # cut; text that goes on in the same word only shares the secret's first characters
        # ("application/xml" beside an "application/json" header).
        if end < len(text) and _TOKEN_CHAR.match(text, end):
            scan = start + 1
            continue
        pieces += [text[pos:start], REDACTED]
        pos = scan = end
    return "".join(pieces) + text[pos:] if pieces else text


def _common_prefix(text: str, start: int, form: str) -> int:
    """How many characters of ``text`` from ``start`` on are the first ones of ``form``."""
    length = 0
    for a, b in zip(text[start:], form, strict=False):
        if a != b:
            break
        length += 1
    return length


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` header in seconds, or None when it is absent or unreadable.

    RFC 9110 §10.2.3: delta-seconds (ASCII digits only: ``str.isdigit`` also takes ``²`` and
    ``١٢٠``) or an HTTP date in any of the three forms a recipient must accept (§5.6.7):
    ``Sun, 06 Nov 1994 08:49:37 GMT``, ``Sunday, 06-Nov-94 08:49:37 GMT`` and asctime's
    ``Sun Nov  6 08:49:37 1994``. An HTTP date is always UTC, so one parsed without a zone
    (asctime, or ``-0000``) is read as UTC; compared as a naive time it raised a TypeError in
    ``read_response``. A date in the past is 0 s.
    """
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isascii() and raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


RETRYABLE_STATUSES = frozenset({408, 425, 429})
"""The 4xx statuses that say "try again later" (request timeout, too early, too many requests);
every 5xx is retryable too (:func:`retryable_status`)."""


def refusal(build: Callable[[], object]) -> str | None:
    """The PayloadError ``build()`` raises, as text, else None: for
    :meth:`Destination.constant_problem`, which asks a constant the checks
    :meth:`~Destination.build_payload` makes of it."""
    try:
        build()
    except PayloadError as exc:
        return str(exc)
    return None


def retryable_status(status: int) -> bool:
    """Whether an HTTP status alone makes a failure retryable: 408, 425, 429 or any 5xx."""
    return status in RETRYABLE_STATUSES or status >= 500


def undocumented_targets(
    targets: Sequence[str], documented: Collection[str], platform: str, fate: str
) -> dict[str, str]:
    """For :meth:`Destination.mapping_warnings` of an adapter that passes fields it does not
    build on as written: each target whose first name the platform does not document, with a
    did-you-mean when it is close to one it does (``customdata``, ``custom-data``).

    ``fate`` says what the platform does with such a field (``"Meta refuses the event"``). A
    name far from every documented one is still warned of, as a field the platform may have
    added since: the warning says so.
    """
    found = {}
    known = sorted(documented)
    for target in targets:
        root = target.split(".", 1)[0]
        if root in documented:
            continue
        close = difflib.get_close_matches(root, known, n=1, cutoff=0.8)
        if close:
            found[target] = (
                f"mapping {target}: {platform} documents no field {root!r} (did you mean "
                f"{close[0]}?); it is sent as written, and {fate}"
            )
        else:
            found[target] = (
                f"mapping {target}: {platform} documents no field {root!r}; it is sent as "
                f"written, and {fate} (if {platform} has added the field since, it is taken)"
            )
    return found


def status_result(response: HttpResponse) -> ItemResult:
    """The generic reading of an HTTP status: 2xx delivered, 401/403 auth, 408/429/5xx retry;
    any other status is permanent (a 413 never comes here: the engine reads it)."""
    status = response.status
    if 200 <= status < 300:
        return ItemResult.delivered()
    reason = f"HTTP {status}: {response.excerpt(200)}".strip()
    if status in (401, 403):
        return ItemResult(Outcome.AUTH, reason)
    if retryable_status(status):
        return ItemResult(Outcome.RETRYABLE, reason, retry_after_seconds(response.headers))
    return ItemResult(Outcome.PERMANENT, reason)
