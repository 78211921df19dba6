"""``google_ads``: Google Ads API conversion uploads and adjustments (reference/platforms.md §3)."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
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
    Token,
    refusal,
    retry_after_seconds,
    retryable_status,
    status_result,
)

DEFAULT_ENDPOINT = "https://googleads.googleapis.com"
DEFAULT_TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
DEFAULT_API_VERSION = "v26"
CONVERSIONS = "uploadClickConversions"
ADJUSTMENTS = "uploadConversionAdjustments"
ADJUSTMENT_TYPES = ("RETRACTION", "RESTATEMENT", "ENHANCEMENT")
MAX_IDENTIFIERS = 5
# No click-through window is longer than 90 days; adjustments expire 54 days after conversion
# (§3.5); enhanced conversions for web must be sent within 24 hours of the conversion (§3.4).
MAX_CONVERSION_AGE = timedelta(days=90)
MAX_ADJUSTMENT_AGE = timedelta(days=54)
MAX_ENHANCEMENT_AGE = timedelta(hours=24)
CLICK_IDS = ("gclid", "wbraid", "gbraid")  # order of preference (see _click_id)
CONVERSION_FIELDS = frozenset(
    {"gclid", "gbraid", "wbraid", "conversionAction", "conversionValue", "currencyCode"}
    | {"orderId", "userIdentifiers", "consent", "conversionEnvironment", "cartData"}
    | {"customVariables", "userAgent"}
)
ADJUSTMENT_ONLY = frozenset({"adjustmentType", "gclidDateTimePair", "restatementValue"})
_KNOWN_FIELDS = CONVERSION_FIELDS | ADJUSTMENT_ONLY
_IDENTIFIER_FIELDS = frozenset({"hashedEmail", "hashedPhoneNumber", "addressInfo"})
_CURRENCY_CODE = re.compile(r"[A-Z]{3}")
_GOOGLE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}")
# Where Google Ads takes each kind of personal data, hashed (see destinations.cleartext).
PERSONAL_HOMES = {
    "email": "userIdentifiers.hashedEmail",
    "phone": "userIdentifiers.hashedPhoneNumber",
    "first_name": "userIdentifiers.addressInfo.hashedFirstName",
    "last_name": "userIdentifiers.addressInfo.hashedLastName",
    "street": "userIdentifiers.addressInfo.hashedStreetAddress",
}
_ADDRESS_TARGET = "userIdentifiers.addressInfo"
# The addressInfo fields that name a person or a place of theirs (see _identifiers).
_IDENTIFYING = frozenset({"hashedFirstName", "hashedLastName", "hashedStreetAddress"})
CONSENT_VALUES = {"granted": "GRANTED", "denied": "DENIED"}
# What counts as an object: dict comes first, since an exact type test is much cheaper than
# the Mapping ABC check that a dict would pass anyway.
_MAPPING = (dict, Mapping)
CUSTOMER_ID = re.compile(r"\d{3}-?\d{3}-?\d{4}")
ACTION_NAME = re.compile(r"customers/\d{10}/conversionActions/\d+")
_ADJUSTMENT_TYPE_ERROR = f"Google Ads: adjustmentType must be one of {ADJUSTMENT_TYPES}"

# -- how row and request errors are read (platforms.md §3.7) -------------------------------------
RETRY_CODES = frozenset(
    {"RESOURCE_EXHAUSTED", "RESOURCE_TEMPORARILY_EXHAUSTED", "INTERNAL_ERROR"}
    | {"TRANSIENT_ERROR", "DEADLINE_EXCEEDED", "CONCURRENT_MODIFICATION"}
)
DELAYED_CODES = {
    "TOO_RECENT_EVENT": 6 * 3600.0,  # the click is less than 6 h old
    "TOO_RECENT_CONVERSION_ACTION": 6 * 3600.0,  # the action was created less than 6 h ago
    "TOO_RECENT_CONVERSION": 24 * 3600.0,  # adjustments need a conversion at least 24 h old
    "CONVERSION_NOT_FOUND": 3600.0,  # often just not processed yet (retry for some hours)
}
AUTH_CATEGORIES = frozenset({"authenticationError", "authorizationError"})
ALREADY_UPLOADED = frozenset({"ORDER_ID_ALREADY_IN_USE", "CLICK_CONVERSION_ALREADY_EXISTS"})
"""Row errors that say the row's conversion is at Google already: its order ID, or without one
its click and conversion time, were uploaded before. Delivery is at least once, so this is what
a retry gets when the first upload arrived but its answer did not (a timeout, a reset, a worker
killed mid-request), and what a replay of a delivered sale gets: the conversion counts, and the
row is delivered, not a dead letter that a replay would only have refused again."""
ALREADY_ADJUSTED = frozenset({"CONVERSION_ALREADY_RETRACTED", "MORE_RECENT_RESTATEMENT_FOUND"})
"""Adjustment row errors that say Google's conversion already stands where the row would put it,
or past it: it is retracted (nothing changes a retracted conversion, and the refunds,
cancellations and reversals a RETRACTION or RESTATEMENT carries only ever lower it), or a
restatement dated no earlier than this one set its value (a RESTATEMENT sends the order's new
total, so the latest one is right). This is what a retried adjustment gets when the first
upload arrived and its answer did not, what a replay of a delivered one gets, and what a second
retraction of one order gets (a cancellation after a refund): the row is delivered, not a dead
letter that a replay would only have refused again."""
RETRY_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED"})
AUTH_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class TokenError(Exception):
    """The OAuth token exchange failed.

    ``outcome`` says whether a retry can help: ``Outcome.RETRYABLE`` for 408/425/429/5xx or an
    unreadable answer, ``Outcome.AUTH`` when the credentials were refused (an operator must act).
    """

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class GoogleAds(Destination):
    """Google Ads API: click conversions, enhanced conversions and adjustments (platforms.md §3).

    Settings: ``customer_id`` (10 digits, hyphens allowed), ``conversion_action`` (its ID or
    resource name), ``developer_token``, OAuth ``client_id`` / ``client_secret`` /
    ``refresh_token``, ``login_customer_id`` (the manager account, when acting through one),
    ``api_version`` (default ``v26``), ``validate_only`` (Google validates and executes
    nothing), ``default_country`` (for phone numbers without a country code when the event has
    no ``user_data.country``), ``currency`` (used when the event has none), and the ``endpoint``
    and ``token_endpoint`` base-URL overrides for proxies and emulators.

    Default mapping (target -> canonical event)::

        gclid / gbraid / wbraid            context.gclid / context.gbraid / context.wbraid
        orderId                            properties.related_order_id || properties.order_id
        conversionValue                    properties.value
        currencyCode                       properties.currency   (else the currency setting)
        userIdentifiers.hashedEmail        user_data.email       (Google rule, hashed)
        userIdentifiers.hashedPhoneNumber  user_data.phone       (E.164 with +, hashed)
        consent.adUserData                 consent.ad_user_data  ("granted" -> "GRANTED")
        consent.adPersonalization          consent.ad_personalization (not sent, see below)
        userAgent                          context.user_agent    (ENHANCEMENT only)
        userIdentifiers.addressInfo.       user_data.first_name / last_name (hashed), city,
          hashedFirstName / hashedLastName   state, postal_code, country (ENHANCEMENT only;
          / city / state / postalCode        ``userIdentifiers.addressInfo: null`` in a tag
          / countryCode                      sends none)

    When no click ID is mapped, gclid, gbraid and wbraid are read from the query string of the
    event's ``context.page_url``. One click ID is sent: gclid when present, else wbraid (web
    conversions), else gbraid; never gbraid and wbraid together. The conversion time is the
    event time, as ``yyyy-mm-dd hh:mm:ss+00:00``. A mapped ``conversionAction`` (ID or
    resource name) overrides the setting for that tag.

    **What is uploaded.** By default an ``uploadClickConversions`` row (with a click ID, or
    hashed email/phone only for enhanced conversions for leads). A tag whose ``event_name`` is
    ``RETRACTION``, ``RESTATEMENT`` or ``ENHANCEMENT`` (or that maps ``adjustmentType``) makes an
    ``uploadConversionAdjustments`` row instead:

    * ``RETRACTION``: a refund, cancellation or reversal of the whole order (value and count
      zeroed). ``restatementValue`` is refused.
    * ``RESTATEMENT``: a partial refund. Map ``restatementValue.adjustedValue`` to the order's
      **new total** (not the refunded amount); ``currencyCode`` is used when it has none.
    * ``ENHANCEMENT``: enhanced conversions for web; needs ``orderId`` and user identifiers,
      and sends ``userIdentifiers.addressInfo`` (``hashedFirstName``, ``hashedLastName``,
      ``hashedStreetAddress`` hashed; ``city``, ``state``, ``countryCode``, ``postalCode`` in
      clear; by default the event's name and address, which has no street: map
      ``hashedStreetAddress`` to add one), ``userAgent`` and, alongside ``orderId``, an
      optional mapped ``gclidDateTimePair`` (sent when it has its ``conversionDateTime``;
      platforms.md §3.4).

    A RETRACTION or RESTATEMENT names the conversion it changes by ``orderId`` (the default
    mapping gives a refund's ``related_order_id``) or by a mapped
    ``gclidDateTimePair.{gclid,conversionDateTime}`` (then map ``orderId: null``), never both
    (§3.5). A mapped ``conversionDateTime`` is sent in Google's ``yyyy-mm-dd hh:mm:ss+hh:mm``:
    given so, it is kept; given in ISO 8601 with an offset or ``Z`` (as the canonical event's
    timestamps are), it is rewritten in UTC; without an offset it is refused.

    The adjustment time is the event time. The two kinds go to different endpoints, so
    :meth:`batch_key` keeps them apart.

    An ``addressInfo`` is sent only with a hashed name or street (a country, city or postal code
    alone matches no one) and only when the e-mail and phone identifiers leave room for it
    among the five a row may carry.

    Rules checked before sending (each :class:`PayloadError` names it): one identifier per
    ``userIdentifiers`` entry and at most 5; only hashed email and phone on click conversions
    (``addressInfo``, mapped or default, is left out of them); a click conversion needs a click ID
    or a user identifier; an ENHANCEMENT needs ``orderId``, a RETRACTION or RESTATEMENT ``orderId``
    or a gclid/date-time pair; unknown fields are refused (Google rejects the whole request for
    one). At most 2,000 rows per request. Already-hashed (64-hex) identifiers pass through; the IP
    address and user agent are never hashed.

    Unconfirmed readings (platforms.md §8) and the safe choice made: whether gclid may be sent
    with gbraid/wbraid (only one is sent); the field name in partial-failure locations
    (``conversions`` / ``conversion_adjustments``): any first path element with an ``index``
    is taken as the row. ``consent.adPersonalization`` is accepted only by Customer Match and
    UserDataService, so it is never sent on uploads; adjustments carry no consent field.

    A copy without identifiers (``ctx.restricted``: analytics-only consent) carries no click ID
    (nor the gclid of a ``gclidDateTimePair``) and no user identifiers, even what a tag maps
    there out of ``properties``, and says ``adUserData: DENIED``; so only a RETRACTION or
    RESTATEMENT by ``orderId`` goes out.
    """

    name = "google_ads"
    max_batch = 2000
    secret_settings = frozenset({"developer_token", "client_secret", "refresh_token"})
    settings_schema = {
        "type": "object",
        "required": [
            "customer_id",
            "conversion_action",
            "developer_token",
            "client_id",
            "client_secret",
            "refresh_token",
        ],
        "additionalProperties": False,
        "properties": {
            "customer_id": {"type": "string", "pattern": "^[0-9]{3}-?[0-9]{3}-?[0-9]{4}$"},
            "conversion_action": {
                "type": "string",
                "pattern": "^([0-9]+|customers/[0-9]{10}/conversionActions/[0-9]+)$",
            },
            "developer_token": {"type": "string", "minLength": 1},
            "client_id": {"type": "string", "minLength": 1},
            "client_secret": {"type": "string", "minLength": 1},
            "refresh_token": {"type": "string", "minLength": 1},
            "login_customer_id": {"type": "string", "pattern": "^[0-9]{3}-?[0-9]{3}-?[0-9]{4}$"},
            "api_version": {"type": "string", "pattern": "^v[0-9]+$", "default": "v26"},
            "validate_only": {"type": "boolean", "default": False},
            "default_country": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
            "currency": {"type": "string", "pattern": "^[A-Za-z]{3}$"},
            "endpoint": {"type": "string", "pattern": "^https?://", "default": DEFAULT_ENDPOINT},
            "token_endpoint": {
                "type": "string",
                "pattern": "^https?://",
                "default": DEFAULT_TOKEN_ENDPOINT,
            },
        },
    }
    hashed_fields = frozenset(PERSONAL_HOMES.values())
    personal_homes = PERSONAL_HOMES
    default_mapping = {
        "gclid": "context.gclid",
        "gbraid": "context.gbraid",
        "wbraid": "context.wbraid",
        "orderId": "properties.related_order_id || properties.order_id",
        "conversionValue": "properties.value",
        "currencyCode": "properties.currency",
        "userIdentifiers.hashedEmail": "user_data.email",
        "userIdentifiers.hashedPhoneNumber": "user_data.phone",
        # Sent by ENHANCEMENT adjustments only; click conversions leave the address out.
        "userIdentifiers.addressInfo.hashedFirstName": "user_data.first_name",
        "userIdentifiers.addressInfo.hashedLastName": "user_data.last_name",
        "userIdentifiers.addressInfo.city": "user_data.city",
        "userIdentifiers.addressInfo.state": "user_data.state",
        "userIdentifiers.addressInfo.postalCode": "user_data.postal_code",
        "userIdentifiers.addressInfo.countryCode": "user_data.country",
        "consent.adUserData": "consent.ad_user_data",
        "consent.adPersonalization": "consent.ad_personalization",
        "userAgent": "context.user_agent",
    }

    mapping_fields = _KNOWN_FIELDS

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        # Read once: build_payload runs for every event.
        self._conversion_action: Any = self.settings.get("conversion_action", "")
        self._default_currency: Any = self.settings.get("currency")
        self._default_country: Any = self.settings.get("default_country")

    # -- intake ---------------------------------------------------------------------------------

    def build_payload(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        """The stored item: ``{"operation": <API method>, "row": <conversion or adjustment>}``.

        Raises:
            PayloadError: a Google Ads rule is broken; the message names it.
        """
        if not _KNOWN_FIELDS.issuperset(mapped):
            unknown = sorted(set(mapped) - CONVERSION_FIELDS - ADJUSTMENT_ONLY)
            raise PayloadError(f"Google Ads: unknown field(s) {unknown}")
        kind = str(mapped.get("adjustmentType") or ctx.event_name).strip().upper()
        if kind in ADJUSTMENT_TYPES:
            operation, row = ADJUSTMENTS, self._adjustment(kind, mapped, ctx)
        elif "adjustmentType" in mapped:
            raise PayloadError(_ADJUSTMENT_TYPE_ERROR)
        else:
            operation, row = CONVERSIONS, self._conversion(mapped, ctx)
        return {"operation": operation, "row": row}

    def mapping_warnings(
        self, event_names: Collection[str] | None, targets: Sequence[str]
    ) -> dict[str, str]:
        """An address mapped by a tag that sends rows other than ENHANCEMENT, which leave it out."""
        if event_names is None or "adjustmentType" in targets:
            return {}
        others = sorted(n for n in event_names if n.strip().upper() != "ENHANCEMENT")
        if not others:
            return {}
        return {
            target: (
                f"mapping {target} is not sent with the event name {others[0]!r}: an address goes "
                "with ENHANCEMENT adjustments only (a click conversion takes hashed e-mail and "
                "phone, a RETRACTION or RESTATEMENT no user identifier)"
            )
            for target in targets
            if target == _ADDRESS_TARGET or target.startswith(_ADDRESS_TARGET + ".")
        }

    def constant_problem(self, target: str, value: Any) -> str | None:
        """A constant ``conversionAction`` that is no ID, ``currencyCode`` that is no ISO 4217
        code, ``conversionValue`` that is no number, or ``adjustmentType`` of no kind."""
        checks: dict[str, Callable[[], object]] = {
            "conversionAction": lambda: self._action(value),
            "currencyCode": lambda: self._currency(value),
            "conversionValue": lambda: _number(value, "conversionValue"),
            "adjustmentType": lambda: _adjustment_type(value),
        }
        check = checks.get(target)
        return refusal(check) if check is not None else None

    def anonymous_warning(self, event_names: Collection[str] | None) -> str | None:
        """A copy without identifiers has neither click ID nor hashed e-mail or phone, which a
        click conversion and an ENHANCEMENT need; a RETRACTION or RESTATEMENT goes out without."""
        keyed = {"RETRACTION", "RESTATEMENT"}
        if event_names is not None and all(n.strip().upper() in keyed for n in event_names):
            return None
        return (
            "a copy without identifiers is never sent to Google Ads as a conversion or an "
            "ENHANCEMENT: both need a click ID or a hashed e-mail or phone, which it leaves out "
            "(only RETRACTION and RESTATEMENT go out without them)"
        )

    def _conversion(self, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        if not ADJUSTMENT_ONLY.isdisjoint(mapped):
            misplaced = sorted(set(mapped) & ADJUSTMENT_ONLY)
            raise PayloadError(f"Google Ads: {misplaced} apply to conversion adjustments only")
        row: dict[str, Any] = {}
        # A copy without identifiers sends no click ID, even one a tag maps out of properties.
        if not ctx.restricted and (click := _click_id(mapped, ctx.event)):
            row[click[0]] = click[1]
        row["conversionAction"] = self._action(mapped.get("conversionAction"))
        row["conversionDateTime"] = google_time(ctx.event_time)
        if mapped.get("conversionValue") is not None:
            row["conversionValue"] = _number(mapped["conversionValue"], "conversionValue")
        if currency := self._currency(mapped.get("currencyCode")):
            row["currencyCode"] = currency
        if mapped.get("orderId") is not None:
            row["orderId"] = _id(mapped["orderId"], "orderId")
        raw_ids = _as_dict(mapped.get("userIdentifiers"), "userIdentifiers")
        # uploadClickConversions takes hashed email and phone only (platforms.md §3.4): the
        # address the default mapping gives ENHANCEMENT adjustments is left out here.
        raw_ids.pop("addressInfo", None)
        if not ctx.restricted and (ids := self._identifiers(raw_ids, ctx)):
            row["userIdentifiers"] = ids
        if not any(row.get(k) for k in CLICK_IDS) and "userIdentifiers" not in row:
            raise PayloadError(
                "Google Ads: a click conversion needs gclid, gbraid, wbraid or a hashed "
                "email/phone (enhanced conversions for leads)"
            )
        consent = _as_dict(mapped.get("consent"), "consent")
        ad_user_data = "DENIED" if ctx.restricted else _consent(consent.get("adUserData"))
        if ad_user_data:
            row["consent"] = {"adUserData": ad_user_data}
        for key in ("conversionEnvironment", "cartData", "customVariables"):
            if mapped.get(key) is not None:
                values.check_json(mapped[key], f"Google Ads: {key}")  # passed on as mapped
                cleartext.check(mapped[key], key, "Google Ads", PERSONAL_HOMES)
                row[key] = mapped[key]
        return row

    def _adjustment(self, kind: str, mapped: dict[str, Any], ctx: PayloadContext) -> dict[str, Any]:
        row: dict[str, Any] = {
            "adjustmentType": kind,
            "conversionAction": self._action(mapped.get("conversionAction")),
            "adjustmentDateTime": google_time(ctx.event_time),
        }
        pair = _as_dict(mapped.get("gclidDateTimePair"), "gclidDateTimePair")
        if ctx.restricted and "gclid" in pair:  # a click ID: not in a copy without identifiers
            pair = {k: v for k, v in pair.items() if k != "gclid"}
        order_id = mapped.get("orderId")
        if kind == "ENHANCEMENT":
            # platforms.md §3.4 gives ENHANCEMENT its own fields: orderId required (checked
            # below) and gclidDateTimePair optional, alongside it. §3.5's "orderId or
            # gclidDateTimePair, never both" is about naming the conversion a RETRACTION or
            # RESTATEMENT changes (§6: they are "keyed by orderId or gclidDateTimePair"). The
            # v26 proto the reference read (conversion_adjustment_upload_service.py) agrees:
            # "If the adjustment_type is ENHANCEMENT, this value is optional but may be set in
            # addition to the order_id". Refusing the pair lost the whole enhancement. It is
            # sent when it has its conversionDateTime, with gclid if mapped (Google's
            # upload_enhanced_conversions_for_web.py example, quoted in §3.6, sends the date
            # alone); a gclid without its date is left out rather than sent incomplete.
            if order_id is not None:
                row["orderId"] = _id(order_id, "orderId")
            if pair.get("conversionDateTime"):
                row["gclidDateTimePair"] = _gclid_pair(pair)
        elif order_id is not None and pair:
            raise PayloadError(
                f"Google Ads: a {kind} is identified by orderId or gclidDateTimePair, not both"
            )
        elif order_id is not None:
            row["orderId"] = _id(order_id, "orderId")
        elif pair.get("gclid") and pair.get("conversionDateTime"):
            row["gclidDateTimePair"] = _gclid_pair(pair)
        else:
            raise PayloadError(
                f"Google Ads: a {kind} needs orderId or gclidDateTimePair.{{gclid,"
                "conversionDateTime}"
            )
        restatement = _as_dict(mapped.get("restatementValue"), "restatementValue")
        if kind == "RESTATEMENT":
            if restatement.get("adjustedValue") is None:
                raise PayloadError(
                    "Google Ads: RESTATEMENT needs restatementValue.adjustedValue (the new total)"
                )
            value: dict[str, Any] = {
                "adjustedValue": _number(restatement["adjustedValue"], "adjustedValue")
            }
            currency = self._currency(restatement.get("currencyCode") or mapped.get("currencyCode"))
            if currency:
                value["currencyCode"] = currency
            row["restatementValue"] = value
        elif restatement:
            raise PayloadError(f"Google Ads: restatementValue must not be sent with {kind}")
        if kind == "ENHANCEMENT":
            if "orderId" not in row:
                raise PayloadError(
                    "Google Ads: ENHANCEMENT needs orderId (the tag's transaction ID)"
                )
            raw_ids = _as_dict(mapped.get("userIdentifiers"), "userIdentifiers")
            ids = [] if ctx.restricted else self._identifiers(raw_ids, ctx, address=True)
            if not ids:
                raise PayloadError("Google Ads: ENHANCEMENT needs at least one user identifier")
            row["userIdentifiers"] = ids
            if mapped.get("userAgent"):
                row["userAgent"] = _id(mapped["userAgent"], "userAgent")
        return row

    def _identifiers(
        self, raw: dict[str, Any], ctx: PayloadContext, address: bool = False
    ) -> list[dict[str, Any]]:
        """One identifier per entry (UserIdentifier is a oneof), at most five (see below)."""
        if not _IDENTIFIER_FIELDS.issuperset(raw):
            unknown = sorted(set(raw) - _IDENTIFIER_FIELDS)
            raise PayloadError(f"Google Ads: unsupported user identifier(s) {unknown}")
        addr = _as_dict(raw.get("addressInfo"), "userIdentifiers.addressInfo")
        user_data = ctx.event.get("user_data")
        country = (
            _country(addr.get("countryCode"))
            or (_country(user_data.get("country")) if isinstance(user_data, dict) else None)
            or self._default_country
        )

        def phone(value: str) -> str | None:
            return normalize.phone(value, "google", default_country=country)

        ids: list[dict[str, Any]] = [
            {"hashedEmail": h} for h in _hash_all(raw.get("hashedEmail"), _email)
        ]
        ids += [{"hashedPhoneNumber": h} for h in _hash_all(raw.get("hashedPhoneNumber"), phone)]
        # An address identifies someone only with a name or a street: a country, a city or a
        # postal code alone matches no one, so it is left out (and an ENHANCEMENT with nothing
        # else is not sent). It takes a place only when e-mail and phone leave one: the default
        # mapping gives every enhancement an address, which must not refuse a row that is
        # complete without it.
        if (
            address
            and len(ids) < MAX_IDENTIFIERS
            and (info := _address_info(addr))
            and not _IDENTIFYING.isdisjoint(info)
        ):
            ids.append({"addressInfo": info})
        if len(ids) > MAX_IDENTIFIERS:
            # Google refuses a row of more (§3.3), and with it the conversion, click ID and
            # all: five are kept, the first e-mail address and the first phone number among
            # them, then the others in the order given.
            first = [
                next(i for i in ids if kind in i)
                for kind in ("hashedEmail", "hashedPhoneNumber")
                if any(kind in i for i in ids)
            ]
            ids = (first + [i for i in ids if i not in first])[:MAX_IDENTIFIERS]
        return ids

    def _action(self, mapped: Any) -> str:
        chosen = mapped if mapped is not None else self._conversion_action
        raw = values.text(chosen, "Google Ads: conversionAction").strip()
        if raw.isascii() and raw.isdigit():
            return f"customers/{self._customer_id()}/conversionActions/{raw}"
        if ACTION_NAME.fullmatch(raw):
            return raw
        raise PayloadError(
            "Google Ads: conversionAction must be an ID or customers/<id>/conversionActions/<id>"
        )

    def _customer_id(self) -> str:
        return str(self.settings.get("customer_id", "")).replace("-", "")

    def _currency(self, value: Any) -> str | None:
        raw = value if value is not None else self._default_currency
        if raw is None:
            return None
        code = raw.strip().upper() if isinstance(raw, str) else ""
        if not _CURRENCY_CODE.fullmatch(code):
            raise PayloadError("Google Ads: currencyCode must be an ISO 4217 code (3 letters)")
        return code

    # -- delivery -------------------------------------------------------------------------------

    def check_item(self, item: Item, ctx: SendContext) -> str | None:
        """Rows past their window: an ENHANCEMENT 24 hours after the conversion (§3.4), other
        adjustments 54 days (§3.5), click conversions the longest click-through window (90 days).
        """
        row = item.payload.get("row", {})
        if row.get("adjustmentType") == "ENHANCEMENT":
            # Measured from the conversion: the mapped conversionDateTime when there is one,
            # else the adjustment time, which is the enhancing event's own time.
            pair = row.get("gclidDateTimePair")
            times = [row.get("adjustmentDateTime")]
            times += [pair.get("conversionDateTime")] if isinstance(pair, dict) else []
            moments = [m for m in map(_google_moment, times) if m is not None]
            if moments and ctx.now - min(moments) > MAX_ENHANCEMENT_AGE:
                return (
                    "Google Ads: ENHANCEMENT older than 24 hours; enhanced conversions for web "
                    "must be sent within 24 hours of the conversion"
                )
            return None
        if item.payload.get("operation") == ADJUSTMENTS:
            when, limit, rule = row.get("adjustmentDateTime"), MAX_ADJUSTMENT_AGE, "54 days"
        else:
            when, limit, rule = row.get("conversionDateTime"), MAX_CONVERSION_AGE, "90 days"
        moment = _google_moment(when)
        if moment is not None and ctx.now - moment > limit:
            return f"Google Ads: older than {rule}, the longest window the API accepts"
        return None

    def batch_key(self, item: Item) -> str:
        """Click conversions and adjustments go to different methods, never one request."""
        return str(item.payload.get("operation", CONVERSIONS))

    def build_request(self, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        """One POST to ``customers/{id}:uploadClickConversions`` or ``…Adjustments``."""
        operation = self.batch_key(items[0])
        key = "conversions" if operation == CONVERSIONS else "conversionAdjustments"
        body: dict[str, Any] = {key: [dict(i.payload["row"]) for i in items]}
        body["partialFailure"] = True  # conversion uploads refuse anything else
        if self.settings.get("validate_only"):
            body["validateOnly"] = True
        base = str(self.settings.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        version = self.settings.get("api_version") or DEFAULT_API_VERSION
        url = f"{base}/{version}/customers/{self._customer_id()}:{operation}"
        headers = {"developer-token": str(self.settings.get("developer_token", ""))}
        if ctx.access_token:
            headers["Authorization"] = f"Bearer {ctx.access_token}"
        if login := self.settings.get("login_customer_id"):
            headers["login-customer-id"] = str(login).replace("-", "")
        return HttpRequest.json_post(url, body, headers)

    def read_response(self, response: HttpResponse, items: Sequence[Item]) -> list[ItemResult]:
        """Row results from ``partialFailureError`` (2xx) or the request's ``error`` (non-2xx)."""
        answer = response.json()
        if not 200 <= response.status < 300:
            return _request_failure(response, answer, len(items))
        if not isinstance(answer, dict):
            reason = "Google Ads: the answer is not a JSON object"
            return [ItemResult(Outcome.RETRYABLE, reason)] * len(items)
        status = answer.get("partialFailureError")
        if not isinstance(status, dict) or not status.get("code"):
            return [ItemResult.delivered()] * len(items)
        named, unnamed = _row_errors(status, len(items))
        results = answer.get("results")
        if isinstance(results, list) and len(results) == len(items):
            # A failed row has an empty result at its index, an uploaded one a full result
            # (platforms.md §3.3): an error that names no row sank only the empty ones.
            fallback = unnamed or _NO_RESULT
            return [
                named.get(i) or (ItemResult.delivered() if results[i] else fallback)
                for i in range(len(items))
            ]
        return [named.get(i) or unnamed or ItemResult.delivered() for i in range(len(items))]

    # -- OAuth ----------------------------------------------------------------------------------

    def token_request(self) -> HttpRequest:
        """The refresh-token exchange at Google's OAuth token endpoint."""
        form = {
            "grant_type": "refresh_token",
            "client_id": str(self.settings.get("client_id", "")),
            "client_secret": str(self.settings.get("client_secret", "")),
            "refresh_token": str(self.settings.get("refresh_token", "")),
        }
        url = str(self.settings.get("token_endpoint") or DEFAULT_TOKEN_ENDPOINT)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return HttpRequest("POST", url, headers, urlencode(form).encode())

    def read_token(self, response: HttpResponse) -> Token:
        """``access_token`` and ``expires_in`` (3600 s when absent).

        Raises:
            TokenError: the exchange failed; ``outcome`` says whether a retry can help.
        """
        answer = response.json()
        if 200 <= response.status < 300 and isinstance(answer, dict):
            token = answer.get("access_token")
            if isinstance(token, str) and token:
                expires = str(answer.get("expires_in", 3600))
                return Token(token, float(expires) if expires.isdigit() else 3600.0)
        error = answer.get("error") if isinstance(answer, dict) else None
        reason = f"Google OAuth token exchange failed: HTTP {response.status}"
        if isinstance(error, str):
            reason += f" {error}"  # e.g. invalid_grant: an OAuth error code, never a secret
        retry = retryable_status(response.status)
        ok_but_unreadable = 200 <= response.status < 300
        outcome = Outcome.RETRYABLE if retry or ok_but_unreadable else Outcome.AUTH
        raise TokenError(reason, outcome)


def google_time(moment: datetime) -> str:
    """``yyyy-mm-dd hh:mm:ss+00:00`` in UTC: the offset is mandatory for Google Ads."""
    utc = moment.astimezone(UTC)
    if utc.year < 1000:  # strftime may not pad such a year to four digits; isoformat does
        return utc.strftime("%Y-%m-%d %H:%M:%S+00:00")
    return utc.isoformat(" ", "seconds")  # the same text, at a fraction of strftime's cost


def _gclid_pair(pair: Mapping[str, Any]) -> dict[str, str]:
    """A mapped ``gclidDateTimePair``: its ``gclid`` when there is one, and its
    ``conversionDateTime`` in Google's format (see :func:`_conversion_time`)."""
    out = {}
    if pair.get("gclid"):
        out["gclid"] = _id(pair["gclid"], "gclidDateTimePair.gclid")
    out["conversionDateTime"] = _conversion_time(pair["conversionDateTime"])
    return out


def _conversion_time(value: Any) -> str:
    """A mapped conversion time as ``yyyy-mm-dd hh:mm:ss+hh:mm`` (platforms.md §3.3, §3.5).

    Google takes only that format, with its offset. A time already in it is kept as it is; an
    ISO 8601 time with an offset or ``Z`` (how the canonical event writes its timestamps) is
    written as :func:`google_time` writes the conversion times tagrelay uploads, so a sale's
    own timestamp names the conversion it was uploaded as.

    Raises:
        PayloadError: the time is not one of those, or has no offset (Google could only read
            it as another moment).
    """
    field = "Google Ads: gclidDateTimePair.conversionDateTime"
    text = values.text(value, field).strip()
    if _GOOGLE_TIME.fullmatch(text):
        return text
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            return google_time(moment)
    except (ValueError, OverflowError):  # not ISO 8601, or out of range in UTC
        pass
    raise PayloadError(
        f"{field} must be yyyy-mm-dd hh:mm:ss+hh:mm (or ISO 8601 with an offset or Z)"
    )


def _google_moment(text: Any) -> datetime | None:
    """A ``yyyy-mm-dd hh:mm:ss+hh:mm`` time as an aware datetime; None when it is not one."""
    try:
        return datetime.strptime(str(text), "%Y-%m-%d %H:%M:%S%z")
    except ValueError:
        return None


# -- fields -------------------------------------------------------------------------------------


def _click_id(mapped: Mapping[str, Any], event: Mapping[str, Any]) -> tuple[str, str] | None:
    """gclid first; else wbraid (web conversions); else gbraid. Never two."""
    found = {k: _id(mapped[k], k) for k in CLICK_IDS if mapped.get(k)}
    if not found:
        context = event.get("context")
        url = context.get("page_url") if isinstance(context, dict) else None
        found = {k: v for k in CLICK_IDS if (v := normalize.url_param(url, k))}
    return next(((k, found[k]) for k in CLICK_IDS if k in found), None)


def _consent(value: Any) -> str | None:
    return CONSENT_VALUES.get(value.lower()) if isinstance(value, str) else None


def _adjustment_type(value: Any) -> None:
    """Raises: PayloadError: a mapped ``adjustmentType`` names no kind of adjustment (an empty
    one leaves the kind to the event name)."""
    if value and str(value).strip().upper() not in ADJUSTMENT_TYPES:
        raise PayloadError(_ADJUSTMENT_TYPE_ERROR)


def _number(value: Any, what: str) -> float:
    return values.number(value, f"Google Ads: {what}")


def _email(value: str) -> str | None:
    return normalize.email(value, "google")


def _hash_all(raw: Any, norm: Callable[[str], str | None]) -> list[str]:
    """Distinct digests of the normalized values; pre-hashed ones pass, unusable ones drop."""
    digests = normalize.hashed_values(raw, norm)
    return [digests] if isinstance(digests, str) else digests or []


def _street(value: str) -> str | None:
    """Google street rule: lowercase, symbols removed, trimmed (:func:`normalize.street`)."""
    return normalize.street(value, "google")


def _address_info(raw: dict[str, Any]) -> dict[str, Any]:
    country = _country(raw.get("countryCode"))
    out: dict[str, Any] = {}
    hashed: tuple[tuple[str, Callable[[str], str | None]], ...] = (
        ("hashedFirstName", lambda v: normalize.name(v, "google")),
        ("hashedLastName", lambda v: normalize.name(v, "google")),
        ("hashedStreetAddress", _street),
    )
    for key, norm in hashed:
        if (digest := normalize.hashed(raw.get(key), norm)) is not None:
            out[key] = digest
    clear: tuple[tuple[str, Callable[[str], str | None]], ...] = (
        ("city", lambda v: normalize.city(v, "google")),
        ("state", lambda v: normalize.state(v, "google", country=country)),
        ("postalCode", lambda v: normalize.postal_code(v, "google", country=country)),
        ("countryCode", lambda v: normalize.country(v, "google")),
    )
    for key, norm in clear:
        # Like the hashed fields, a value that is no text (a list, an object) is left out.
        value = values.scalar_text(raw.get(key))
        if value and (text := norm(value)):
            out[key] = text
    return out


def _country(value: Any) -> str | None:
    """A mapped country as text to read addresses and phone numbers in (None: not text)."""
    return (value.strip() or None) if isinstance(value, str) else None


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, _MAPPING):
        raise PayloadError(f"Google Ads: {what} must be an object")
    return dict(value)


# -- responses ----------------------------------------------------------------------------------


def _ads_errors(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The GoogleAdsError entries inside a google.rpc.Status's details."""
    errors: list[Mapping[str, Any]] = []
    for detail in status.get("details") or []:
        if isinstance(detail, dict):
            errors += [e for e in detail.get("errors") or [] if isinstance(e, dict)]
    return errors


def _row_index(error: Mapping[str, Any]) -> int | None:
    location = error.get("location")
    elements = location.get("fieldPathElements") if isinstance(location, dict) else None
    for element in elements or []:
        if isinstance(element, dict) and "index" in element:
            try:
                return int(element["index"])
            except (TypeError, ValueError):
                return None
    return None


def _error_code(error: Mapping[str, Any]) -> tuple[Any, Any]:
    """A GoogleAdsError's ``errorCode`` as (category, enum): ``("databaseError",
    "CONCURRENT_MODIFICATION")``; empty strings when it has none."""
    code = error.get("errorCode")
    return next(iter(code.items())) if isinstance(code, dict) and code else ("", "")


def _transient(error: Mapping[str, Any]) -> bool:
    """Whether a GoogleAdsError is one a retry can clear (platforms.md §3.7: quota, internal
    and transient errors, a deadline, a concurrent modification)."""
    category, enum = _error_code(error)
    return enum in RETRY_CODES or category == "quotaError"


def _classify(error: Mapping[str, Any]) -> ItemResult:
    category, enum = _error_code(error)
    message = str(error.get("message") or "")[:200]
    # The error's "trigger" may quote the offending value (personal data): never copied.
    reason = f"Google Ads {category}.{enum}: {message}".strip()
    if category in AUTH_CATEGORIES:
        return ItemResult(Outcome.AUTH, reason)
    if enum in ALREADY_UPLOADED or enum in ALREADY_ADJUSTED:
        return ItemResult(Outcome.DELIVERED, reason)
    if enum in DELAYED_CODES:
        return ItemResult(Outcome.RETRYABLE, reason, DELAYED_CODES[enum])
    if _transient(error):
        return ItemResult(Outcome.RETRYABLE, reason, _retry_delay(error))
    return ItemResult(Outcome.PERMANENT, reason)


def _retry_delay(error: Mapping[str, Any]) -> float | None:
    details = error.get("details")
    quota = details.get("quotaErrorDetails") if isinstance(details, dict) else None
    delay = quota.get("retryDelay") if isinstance(quota, dict) else None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(delay)) if delay is not None else None
    return float(match.group(1)) if match else None


def _row_errors(
    status: Mapping[str, Any], count: int
) -> tuple[dict[int, ItemResult], ItemResult | None]:
    """The failures of the rows the errors name (row index -> failure; the first error of a
    row names it), and the failure told by errors that name no row, if any."""
    named: dict[int, ItemResult] = {}
    errors = _ads_errors(status)
    if not errors:
        reason = f"Google Ads partial failure: {str(status.get('message') or '')[:200]}"
        return named, ItemResult(Outcome.PERMANENT, reason)
    unnamed: ItemResult | None = None
    for error in errors:
        result = _classify(error)
        index = _row_index(error)
        if index is None:
            unnamed = unnamed or result
        elif 0 <= index < count:
            named.setdefault(index, result)
    return named, unnamed


_NO_RESULT = ItemResult(
    Outcome.PERMANENT, "Google Ads partial failure: the row has no result and no error names it"
)


def _request_failure(response: HttpResponse, answer: Any, count: int) -> list[ItemResult]:
    """A non-2xx answer: the whole request failed; nothing was processed.

    Read from the HTTP status and the RPC status first, then from the GoogleAdsErrors in the
    body: rows they name get their own outcome (the others go again); errors that name no row
    fail the request as a whole, retryable when every one of them is (a transient one: a
    ``CONCURRENT_MODIFICATION`` comes as 409 ABORTED, a ``TRANSIENT_ERROR`` with any status;
    or one that clears with time, as ``TOO_RECENT_CONVERSION_ACTION``), else permanent.
    """
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return [status_result(response)] * count
    status = str(error.get("status") or "")
    retry_after = retry_after_seconds(response.headers)
    ads_errors = _ads_errors(error)
    first = _classify(ads_errors[0]) if ads_errors else None
    reason = f"Google Ads HTTP {response.status} {status}: " + (
        first.error if first and first.error else str(error.get("message") or "")[:200]
    )
    if (
        response.status in (401, 403)
        or status in AUTH_STATUSES
        or any(_error_code(e)[0] in AUTH_CATEGORIES for e in ads_errors)
    ):
        # Refused credentials refuse every row, whichever status carries them.
        return [ItemResult(Outcome.AUTH, reason)] * count
    if retryable_status(response.status) or status in RETRY_STATUSES:
        delay = retry_after or (first.retry_after if first else None)
        return [ItemResult(Outcome.RETRYABLE, reason, delay)] * count
    by_row: dict[int, ItemResult] = {}
    for ads_error in ads_errors:
        index = _row_index(ads_error)
        if index is not None and 0 <= index < count:
            by_row.setdefault(index, _classify(ads_error))
    if not by_row:
        # Read as a row's error would be (_classify): retried only if every one of them may
        # clear, after the longest wait any of them asks for (a TOO_RECENT_* its hours).
        told = [_classify(e) for e in ads_errors]
        if told and all(t.outcome is Outcome.RETRYABLE for t in told):
            # The longest wait asked for, the Retry-After header's included.
            waits = [w for w in (retry_after, *(t.retry_after for t in told)) if w is not None]
            return [ItemResult(Outcome.RETRYABLE, reason, max(waits, default=None))] * count
        return [ItemResult(Outcome.PERMANENT, reason)] * count
    # Rows named in the error sank the request; the others were fine and can go again.
    innocent = ItemResult(Outcome.RETRYABLE, "Google Ads: not processed (another row failed)")
    return [by_row.get(i, innocent) for i in range(count)]


def _id(value: object, field: str) -> str:
    """An ID Google Ads receives as it is: text, and no e-mail address (see
    :func:`cleartext.identifier`)."""
    return cleartext.identifier(value, field, "Google Ads", PERSONAL_HOMES)
