"""A local Google Ads API server: OAuth token endpoint and conversion uploads (platforms.md §3).

Routes: ``POST /token`` (refresh-token grant), ``POST /<version>/customers/<id>:uploadClick
Conversions`` and ``…:uploadConversionAdjustments``. Requests are checked the way the API
documents: bearer token, ``developer-token`` and ``login-customer-id`` headers,
``partialFailure: true``, at most 2,000 rows, the row fields and formats (date-time with
offset, one identifier per ``userIdentifiers`` entry, at most 5, hashes as 64 lowercase hex,
no ``addressInfo`` on click conversions, gbraid and wbraid never together, one click conversion
per order ID and action in a request, an ``orderId`` on every ENHANCEMENT, an adjustment not
dated before its conversion, currency codes of 3 capital letters; a click conversion uploaded
before is refused, as ``ORDER_ID_ALREADY_IN_USE`` by its action and order ID, else as
``CLICK_CONVERSION_ALREADY_EXISTS`` by its click and time; an adjustment of a retracted
conversion as ``CONVERSION_ALREADY_RETRACTED``, a restatement no newer than its conversion's
last as ``MORE_RECENT_RESTATEMENT_FOUND``). Row problems come
back as ``partialFailureError`` with the row's ``index``, as the API answers. Usage::

    emulator = GoogleAdsEmulator()
    with LoopbackServer(emulator) as server:
        ...  # settings: endpoint=server.url, token_endpoint=server.url + "/token", ...
        assert emulator.conversions[0]["gclid"] == "abc"
"""

from __future__ import annotations

import itertools
import re
import threading
from datetime import datetime
from typing import Any

from destinations.testkit.server import Reply, Request

UPLOAD_PATH = re.compile(
    r"/(v\d+)/customers/(\d{10}):(uploadClickConversions|uploadConversionAdjustments)"
)
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}")
ACTION = re.compile(r"customers/\d{10}/conversionActions/\d+")
HEX64 = re.compile(r"[0-9a-f]{64}")
CONVERSION_FIELDS = frozenset(
    {"gclid", "gbraid", "wbraid", "conversionAction", "conversionDateTime", "conversionValue"}
    | {"currencyCode", "orderId", "userIdentifiers", "consent", "conversionEnvironment"}
    | {"cartData", "customVariables", "externalAttributionData"}
)
ADJUSTMENT_FIELDS = frozenset(
    {"adjustmentType", "conversionAction", "adjustmentDateTime", "orderId", "gclidDateTimePair"}
    | {"restatementValue", "userIdentifiers", "userAgent"}
)
Error = dict[str, Any]


class GoogleAdsEmulator:
    """One Google Ads customer with OAuth credentials and an upload log.

    Attributes:
        conversions: click conversions accepted (not in ``validateOnly`` mode).
        adjustments: conversion adjustments accepted.
        row_errors: ``orderId`` -> ``(category, enum)`` to fail that row with (e.g.
            ``("conversionUploadError", "TOO_RECENT_EVENT")``), as a real account would.
        throttle: how many of the next uploads get 429 RESOURCE_EXHAUSTED.
        fail_with: when set, the next upload is answered with this reply instead.
    """

    def __init__(
        self,
        *,
        customer_id: str = "1234567890",
        developer_token: str = "dev-token-123",
        client_id: str = "client-id.apps.googleusercontent.com",
        client_secret: str = "client-secret-xyz",
        refresh_token: str = "1//refresh-token-abc",
        login_customer_id: str | None = None,
    ) -> None:
        self.customer_id = customer_id
        self.developer_token = developer_token
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.login_customer_id = login_customer_id
        self.conversions: list[dict[str, Any]] = []
        self.adjustments: list[dict[str, Any]] = []
        self.row_errors: dict[str, tuple[str, str]] = {}
        self.throttle = 0
        self.fail_with: Reply | None = None
        self.tokens: set[str] = set()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> Reply:
        if request.method != "POST":
            return Reply.text("method not allowed", status=405)
        if request.path == "/token":
            return self._token(request)
        match = UPLOAD_PATH.fullmatch(request.path)
        if match is None:
            return _error(404, "NOT_FOUND", "no such method")
        with self._lock:
            if self.fail_with is not None:
                reply, self.fail_with = self.fail_with, None
                return reply
        return self._upload(request, match.group(2), match.group(3))

    # -- OAuth ----------------------------------------------------------------------------------

    def _token(self, request: Request) -> Reply:
        form = {k: v[0] for k, v in request.form().items()}
        if form.get("grant_type") != "refresh_token":
            return Reply.json({"error": "unsupported_grant_type"}, status=400)
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return Reply.json({"error": "invalid_client"}, status=401)
        if form.get("refresh_token") != self.refresh_token:
            return Reply.json({"error": "invalid_grant", "error_description": "Bad Request"}, 400)
        token = f"ya29.emulated-{next(self._counter)}"
        with self._lock:
            self.tokens.add(token)
        return Reply.json(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"},
        )

    def order_value(self, order_id: str) -> float | None:
        """What Google reports for an order now: its conversion's value, then the last
        restatement's new total, 0 once retracted (None: no conversion or adjustment names it).
        """
        with self._lock:
            value: float | None = next(
                (
                    c.get("conversionValue")
                    for c in self.conversions
                    if c.get("orderId") == order_id
                ),
                None,
            )
            for adjustment in self.adjustments:
                if adjustment.get("orderId") != order_id:
                    continue
                if adjustment.get("adjustmentType") == "RETRACTION":
                    value = 0.0
                elif adjustment.get("adjustmentType") == "RESTATEMENT":
                    value = adjustment["restatementValue"]["adjustedValue"]
            return value

    def revoke_tokens(self) -> None:
        """Forget every issued access token (the next upload answers 401)."""
        with self._lock:
            self.tokens.clear()

    # -- uploads --------------------------------------------------------------------------------

    def _upload(self, request: Request, customer_id: str, method: str) -> Reply:
        auth = request.header("authorization") or ""
        with self._lock:
            known = auth.startswith("Bearer ") and auth[7:] in self.tokens
        if not known:
            return _error(401, "UNAUTHENTICATED", "invalid OAuth token", "OAUTH_TOKEN_INVALID")
        if request.header("developer-token") != self.developer_token:
            return _error(401, "UNAUTHENTICATED", "bad developer token", "DEVELOPER_TOKEN_INVALID")
        if self.login_customer_id and request.header("login-customer-id") != self.login_customer_id:
            return _error(403, "PERMISSION_DENIED", "no access", "USER_PERMISSION_DENIED")
        if customer_id != self.customer_id:
            return _error(403, "PERMISSION_DENIED", "no access to customer", "CUSTOMER_NOT_FOUND")
        with self._lock:
            if self.throttle > 0:
                self.throttle -= 1
                return _throttled()
        body = request.json()
        conversions = method == "uploadClickConversions"
        key = "conversions" if conversions else "conversionAdjustments"
        if not isinstance(body, dict) or not isinstance(body.get(key), list) or not body[key]:
            return _error(400, "INVALID_ARGUMENT", f"{key} is required")
        if unknown := set(body) - {key, "partialFailure", "validateOnly", "jobId"}:
            return _error(400, "INVALID_ARGUMENT", f"Unknown name {sorted(unknown)}")
        if body.get("partialFailure") is not True:
            return _error(
                400, "INVALID_ARGUMENT", "partial failure mode is required",
                "PARTIAL_FAILURE_MODE_REQUIRED", "partialFailureError",
            )  # fmt: skip
        rows = body[key]
        if len(rows) > 2000:
            enum = (
                "TOO_MANY_CONVERSIONS_IN_REQUEST"
                if conversions
                else "TOO_MANY_ADJUSTMENTS_IN_REQUEST"
            )
            return _error(400, "INVALID_ARGUMENT", "Upload fewer than 2001 events", enum)
        field = "conversions" if conversions else "conversion_adjustments"
        check = _conversion if conversions else _adjustment
        errors: list[Error] = []
        results: list[dict[str, Any]] = []
        orders: set[tuple[Any, Any]] = set()
        with self._lock:
            uploaded = {_identity(c) for c in self.conversions} - {None}
            earlier = list(self.adjustments)
        accepted: list[dict[str, Any]] = []  # this request's adjustments, in order
        for index, row in enumerate(rows):
            problems = check(row) if isinstance(row, dict) else [("requestError", "INVALID", "")]
            if conversions and isinstance(row, dict) and row.get("orderId") is not None:
                # One conversion per order ID and conversion action (platforms.md §3.3).
                order = (row.get("conversionAction"), row["orderId"])
                if order in orders:
                    problems.append(("conversionUploadError", "DUPLICATE_ORDER_ID", "orderId"))
                orders.add(order)
            # Uploaded before (a retry whose first answer was lost): Google keeps the first and
            # refuses the row, by its order ID, else by its click and time.
            if (
                conversions
                and isinstance(row, dict)
                and not problems
                and _identity(row) in uploaded
            ):
                problems.append(_ALREADY_IN_USE if row.get("orderId") else _ALREADY_EXISTS)
            # An adjustment of a retracted conversion, or a restatement no newer than the last
            # one of its conversion, is refused, as Google refuses them (platforms.md §3.5).
            if not conversions and isinstance(row, dict) and not problems:
                problems += _adjusted_before(row, earlier, accepted)
            injected = (
                self.row_errors.get(str(row.get("orderId"))) if isinstance(row, dict) else None
            )
            if injected and not problems:
                problems = [(injected[0], injected[1], "")]
            for category, enum, where in problems:
                errors.append(_row_error(field, index, category, enum, where))
            if problems:
                results.append({})
                continue
            results.append(
                {k: row[k] for k in ("gclid", "conversionAction", "orderId") if k in row}
            )
            accepted.append(row)
            if not body.get("validateOnly"):
                with self._lock:
                    (self.conversions if conversions else self.adjustments).append(row)
        answer: dict[str, Any] = {"jobId": "1"}
        if not body.get("validateOnly"):
            answer["results"] = results
        if errors:
            answer["partialFailureError"] = {
                "code": 3,
                "message": f"{len(errors)} row error(s)",
                "details": [{"@type": _FAILURE_TYPE, "errors": errors, "requestId": "emu"}],
            }
        return Reply.json(answer, headers={"request-id": "emu"})


_FAILURE_TYPE = "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure"
Problem = tuple[str, str, str]  # (error category, enum, field name)


_ALREADY_IN_USE: Problem = ("conversionUploadError", "ORDER_ID_ALREADY_IN_USE", "orderId")
_ALREADY_EXISTS: Problem = (
    "conversionUploadError", "CLICK_CONVERSION_ALREADY_EXISTS", "conversionDateTime"
)  # fmt: skip


def _identity(row: dict[str, Any]) -> tuple[Any, ...] | None:
    """What makes a click conversion one Google has already: its action and order ID, or
    without one its click and time (None for a conversion with neither)."""
    action = row.get("conversionAction")
    if row.get("orderId"):
        return action, "order", row["orderId"]
    click = row.get("gclid") or row.get("gbraid") or row.get("wbraid")
    return (action, "click", click, row.get("conversionDateTime")) if click else None


def _adjusted(row: dict[str, Any]) -> tuple[Any, ...]:
    """The conversion an adjustment changes: its action and order ID, or click and time."""
    pair = row.get("gclidDateTimePair") or {}
    named = ("order", row["orderId"]) if row.get("orderId") else ("click", *pair.values())
    return (row.get("conversionAction"), *named)


def _adjusted_before(
    row: dict[str, Any], earlier: list[dict[str, Any]], accepted: list[dict[str, Any]]
) -> list[Problem]:
    """``CONVERSION_ALREADY_RETRACTED`` for a RETRACTION or RESTATEMENT of a conversion retracted
    before; ``MORE_RECENT_RESTATEMENT_FOUND`` for a RESTATEMENT dated no later than one its
    conversion had (a second restatement needs a newer ``adjustmentDateTime``, §3.5).

    ``earlier`` and ``accepted`` are the adjustments taken before and in this request."""
    kind = row.get("adjustmentType")
    if kind not in ("RETRACTION", "RESTATEMENT"):
        return []
    target = _adjusted(row)
    before = [a for a in [*earlier, *accepted] if _adjusted(a) == target]
    if any(a.get("adjustmentType") == "RETRACTION" for a in before):
        return [("conversionAdjustmentUploadError", "CONVERSION_ALREADY_RETRACTED", "orderId")]
    when = _moment(row.get("adjustmentDateTime"))
    restated = [
        _moment(a.get("adjustmentDateTime"))
        for a in before
        if a.get("adjustmentType") == "RESTATEMENT"
    ]
    if kind == "RESTATEMENT" and any(
        at is not None and when is not None and at >= when for at in restated
    ):
        enum = "MORE_RECENT_RESTATEMENT_FOUND"
        return [("conversionAdjustmentUploadError", enum, "adjustmentDateTime")]
    return []


def _conversion(row: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = [("fieldError", "UNKNOWN_FIELD", k) for k in set(row) - CONVERSION_FIELDS]
    if not ACTION.fullmatch(str(row.get("conversionAction"))):
        out.append(("conversionUploadError", "NO_CONVERSION_ACTION_FOUND", "conversionAction"))
    if not DATE_TIME.fullmatch(str(row.get("conversionDateTime"))):
        out.append(("dateError", "INVALID_STRING_DATE_TIME", "conversionDateTime"))
    if row.get("gbraid") and row.get("wbraid"):
        out.append(("conversionUploadError", "GBRAID_WBRAID_BOTH_SET", "gbraid"))
    if "conversionValue" in row and not isinstance(row["conversionValue"], int | float):
        out.append(("fieldError", "INVALID_VALUE", "conversionValue"))
    if "currencyCode" in row and not re.fullmatch(r"[A-Z]{3}", str(row["currencyCode"])):
        out.append(("conversionUploadError", "INVALID_CURRENCY_CODE", "currencyCode"))
    consent = row.get("consent") or {}
    if set(consent) - {"adUserData"}:
        out.append(("fieldError", "UNSUPPORTED_FIELD", "consent.adPersonalization"))
    if consent.get("adUserData", "GRANTED") not in ("GRANTED", "DENIED"):
        out.append(("fieldError", "INVALID_VALUE", "consent.adUserData"))
    ids = row.get("userIdentifiers") or []
    out += _identifiers(ids, allowed={"hashedEmail", "hashedPhoneNumber"})
    if not ids and not any(row.get(k) for k in ("gclid", "gbraid", "wbraid")):
        out.append(("conversionUploadError", "MISSING_CLICK_ID_OR_USER_IDENTIFIER", "gclid"))
    return out


def _adjustment(row: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = [("fieldError", "UNKNOWN_FIELD", k) for k in set(row) - ADJUSTMENT_FIELDS]
    kind = row.get("adjustmentType")
    if kind not in ("RETRACTION", "RESTATEMENT", "ENHANCEMENT"):
        out.append(("fieldError", "INVALID_VALUE", "adjustmentType"))
    if not ACTION.fullmatch(str(row.get("conversionAction"))):
        out.append(
            ("conversionAdjustmentUploadError", "INVALID_CONVERSION_ACTION", "conversionAction")
        )
    if not DATE_TIME.fullmatch(str(row.get("adjustmentDateTime"))):
        out.append(("dateError", "INVALID_STRING_DATE_TIME", "adjustmentDateTime"))
    pair = row.get("gclidDateTimePair")
    if pair is not None and not DATE_TIME.fullmatch(str(pair.get("conversionDateTime"))):
        field = "gclidDateTimePair.conversionDateTime"
        out.append(("dateError", "INVALID_STRING_DATE_TIME", field))
    # ENHANCEMENT takes gclidDateTimePair alongside its required orderId (platforms.md §3.4);
    # "never both" names the conversion a RETRACTION or RESTATEMENT changes (§3.5).
    if kind != "ENHANCEMENT" and "orderId" in row and "gclidDateTimePair" in row:
        enum = "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET"
        out.append(("conversionAdjustmentUploadError", enum, "orderId"))
    if "orderId" not in row and (kind == "ENHANCEMENT" or "gclidDateTimePair" not in row):
        # An ENHANCEMENT names its conversion by orderId, the tag's transaction ID, always
        # (platforms.md §3.4); a gclidDateTimePair only goes alongside it.
        out.append(("conversionAdjustmentUploadError", "MISSING_ORDER_ID_FOR_WEBPAGE", "orderId"))
    restatement = row.get("restatementValue")
    if kind == "RESTATEMENT" and not isinstance(
        (restatement or {}).get("adjustedValue"), int | float
    ):
        out.append(("fieldError", "REQUIRED", "restatementValue.adjustedValue"))
    currency = (restatement or {}).get("currencyCode")
    if currency is not None and not re.fullmatch(r"[A-Z]{3}", str(currency)):
        field = "restatementValue.currencyCode"
        out.append(("conversionAdjustmentUploadError", "INVALID_CURRENCY_CODE", field))
    # The adjustment must come after the conversion it adjusts (platforms.md §3.5).
    adjusted = _moment(row.get("adjustmentDateTime"))
    converted = _moment(pair.get("conversionDateTime")) if isinstance(pair, dict) else None
    if adjusted is not None and converted is not None and adjusted < converted:
        field = "adjustmentDateTime"
        out.append(("conversionAdjustmentUploadError", "ADJUSTMENT_PRECEDES_CONVERSION", field))
    if kind == "RETRACTION" and restatement is not None:
        out.append(
            ("conversionAdjustmentUploadError", "RESTATEMENT_ALREADY_EXISTS", "restatementValue")
        )
    if kind == "ENHANCEMENT":
        ids = row.get("userIdentifiers") or []
        if not ids:
            out.append(("fieldError", "REQUIRED", "userIdentifiers"))
        out += _identifiers(ids, allowed={"hashedEmail", "hashedPhoneNumber", "addressInfo"})
    elif row.get("userIdentifiers"):
        out.append(("fieldError", "UNSUPPORTED_FIELD", "userIdentifiers"))
    return out


def _moment(text: Any) -> datetime | None:
    """A ``yyyy-mm-dd hh:mm:ss+hh:mm`` time as an aware datetime; None when it is not one."""
    try:
        return datetime.strptime(str(text), "%Y-%m-%d %H:%M:%S%z")
    except ValueError:
        return None


def _identifiers(ids: Any, allowed: set[str]) -> list[Problem]:
    if not isinstance(ids, list):
        return [("fieldError", "INVALID_VALUE", "userIdentifiers")]
    if len(ids) > 5:
        return [("collectionSizeError", "TOO_MANY", "userIdentifiers")]
    out: list[Problem] = []
    for entry in ids:
        kinds = set(entry) - {"userIdentifierSource"} if isinstance(entry, dict) else set()
        if len(kinds) != 1:
            # A oneof: the API would silently keep only the last; the emulator flags it.
            out.append(("fieldError", "ONEOF_SET_TWICE", "userIdentifiers"))
            continue
        (kind,) = kinds
        if kind not in allowed:
            enum = "UNSUPPORTED_USER_IDENTIFIER"
            out.append(("conversionUploadError", enum, f"userIdentifiers.{kind}"))
        elif kind == "addressInfo":
            out += _address(entry[kind])
        elif not HEX64.fullmatch(str(entry[kind])):
            out.append(
                ("conversionUploadError", "INVALID_USER_IDENTIFIER", f"userIdentifiers.{kind}")
            )
    return out


def _address(info: Any) -> list[Problem]:
    if not isinstance(info, dict):
        return [("fieldError", "INVALID_VALUE", "addressInfo")]
    out: list[Problem] = []
    for key in ("hashedFirstName", "hashedLastName", "hashedStreetAddress"):
        if key in info and not HEX64.fullmatch(str(info[key])):
            out.append(("conversionAdjustmentUploadError", "INVALID_USER_IDENTIFIER", key))
    for key in ("city", "state", "postalCode", "countryCode"):
        if key in info and HEX64.fullmatch(str(info[key])):
            out.append(("fieldError", "INVALID_VALUE", key))  # these travel in clear text
    if "countryCode" in info and not re.fullmatch(r"[A-Z]{2}", str(info["countryCode"])):
        out.append(("fieldError", "INVALID_VALUE", "countryCode"))
    return out


def _row_error(field: str, index: int, category: str, enum: str, where: str) -> Error:
    path = [{"fieldName": field, "index": index}]
    path += [{"fieldName": part} for part in where.split(".") if part]
    return {
        "errorCode": {category: enum},
        "message": f"{enum.replace('_', ' ').capitalize()}.",
        "location": {"fieldPathElements": path},
    }


def _error(status: int, rpc_status: str, message: str, enum: str = "", category: str = "") -> Reply:
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if enum:
        category = category or {401: "authenticationError", 403: "authorizationError"}.get(
            status, "requestError"
        )
        failure = {"errorCode": {category: enum}, "message": message}
        error["details"] = [{"@type": _FAILURE_TYPE, "errors": [failure], "requestId": "emu"}]
    return Reply.json({"error": error}, status=status)


def _throttled() -> Reply:
    failure = {
        "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"},
        "message": "Too many requests.",
        "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "retryDelay": "30s"}},
    }
    error = {
        "code": 429,
        "message": "Resource has been exhausted (e.g. check quota).",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": _FAILURE_TYPE, "errors": [failure], "requestId": "emu"}],
    }
    return Reply.json({"error": error}, status=429)
