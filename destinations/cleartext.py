"""Refusing personal data in clear text where an ad platform would receive it.

An ad platform takes e-mail addresses, phone numbers, names, dates of birth and street
addresses only normalized and hashed, in its own fields (Meta's ``user_data.em``, TikTok's
``user.email``): that is where its adapter hashes them. Anywhere else an adapter passes a mapped
value on as it was mapped, so that a tag can send fields the adapter does not know; a mapping
that names the wrong target (``user_data.email`` for Meta, ``user.em`` for TikTok,
``params.email`` for GA4) or sends a whole object (``custom_data: properties`` holding a
``customer_phone``) would then send the data itself. :func:`check`, at each place an adapter
passes a value on, refuses it instead, naming the field and where the platform takes that data:

- under a name that ends like personal data (``email``, ``phoneNumber``, ``billing_first_name``,
  ``customer_dob``; Meta's ``em``, ``ph``, ... as whole names), only SHA-256 digests, yes or
  no, or numbers too small to be a phone number or a birth date;
- nowhere a text that is an e-mail address (file names such as ``hero@2x.jpg`` are not).

What it cannot see: personal data inside longer text, or under names that do not say what
they hold. Cities, regions, postal codes and countries are left alone: GA4 and Google Ads take
them in clear text, and they are also ordinary business data (a shop's region). So are URLs:
intake has already redacted the personal data of the event's page URL and referrer
(``engine.urlprivacy``), and what is left of a query string is the page's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from destinations import values
from destinations.base import PayloadError

# How field names of personal data end, in words (``billing_first_name``, ``customerPhone``,
# ``shipping-street``: words split at separators and at capitals, lowercased). Ending, not
# containing: ``phone_verified``, ``email_opt_in`` or ``is_mobile`` name no personal data.
_ENDINGS = {
    "email": (
        ("email",),
        ("emails",),
        ("e", "mail"),
        ("email", "address"),
        ("email", "addresses"),
        ("mail", "address"),
    ),
    "phone": (
        ("phone",),
        ("phones",),
        ("phone", "number"),
        ("phone", "numbers"),
        ("phonenumber",),
        ("mobile", "number"),
        ("mobile", "phone"),
        ("cell", "phone"),
        ("telephone",),
    ),
    "first_name": (("first", "name"), ("firstname",), ("given", "name"), ("givenname",)),
    "last_name": (
        ("last", "name"),
        ("lastname",),
        ("family", "name"),
        ("familyname",),
        ("surname",),
    ),
    "full_name": (("full", "name"), ("fullname",), ("customer", "name")),
    "date_of_birth": (
        ("date", "of", "birth"),
        ("dateofbirth",),
        ("birth", "date"),
        ("birthdate",),
        ("birthday",),
        ("dob",),
    ),
    "street": (
        ("street",),
        ("street", "address"),
        ("address", "line"),
        ("address", "line", "1"),
        ("address", "1"),
        ("address1",),
        ("addressline1",),
    ),
}
_KIND_BY_ENDING = {ending: kind for kind, endings in _ENDINGS.items() for ending in endings}
# Whole names only: as the end of a longer name they would mean something else (``item_em``).
_SHORT_NAMES = {"em": "email", "mail": "email", "ph": "phone", "tel": "phone"}
_SHORT_NAMES |= {"fn": "first_name", "ln": "last_name", "db": "date_of_birth"}
DESCRIPTIONS = {
    "email": "an e-mail address",
    "phone": "a phone number",
    "first_name": "a first name",
    "last_name": "a last name",
    "full_name": "a person's name",
    "date_of_birth": "a date of birth",
    "street": "a street address",
}
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-']+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.([A-Za-z]{2,})")
# Endings of file names, which an image's name can make look like an address (``hero@2x.jpg``);
# none of them is a top-level domain.
_FILE_ENDINGS = frozenset(
    {"jpg", "jpeg", "png", "gif", "webp", "svg", "avif", "bmp", "ico", "tif", "tiff", "heic"}
    | {"pdf", "js", "css", "html", "htm", "json", "xml", "txt", "csv", "mp3", "mp4", "wav"}
)
_LARGE = 1_000_000  # a number below it (a flag, a count) holds no phone number or birth date


_NOT_SEEN = object()
_KIND_CACHE: dict[str, str | None] = {}  # field name -> kind_of(name); cleared when large
_FIELD_KIND: dict[str, object] = {}  # a dotted field of check() -> the kind its last name holds


def kind_of(key: str) -> str | None:
    """The kind of personal data a field named ``key`` holds (``"email"``, ``"phone"``, ...),
    judged by its name alone (see _ENDINGS); None for any other name."""
    kind = _KIND_CACHE.get(key, _NOT_SEEN)
    if kind is _NOT_SEEN:
        words = tuple(w.lower() for w in _WORDS.findall(key))
        kind = _SHORT_NAMES.get(words[0]) if len(words) == 1 else None
        for n in (3, 2, 1):
            if kind is None and len(words) >= n:
                kind = _KIND_BY_ENDING.get(words[-n:])
        if len(_KIND_CACHE) >= 4096:  # names can come from events: keep the cache bounded
            _KIND_CACHE.clear()
        _KIND_CACHE[key] = kind
    return kind  # type: ignore[return-value]


_DIGEST_WORDS = frozenset({"hash", "hashed", "sha", "sha256", "digest"})


def names_a_digest(key: str) -> bool:
    """Whether the name ``key`` says its value is hashed (``hashed_email``, ``email_sha256``):
    its value is then checked (see :func:`check`), not the name."""
    return not _DIGEST_WORDS.isdisjoint(w.lower() for w in _WORDS.findall(key))


def _is_digest(value: Any) -> bool:
    return type(value) is str and _DIGEST.fullmatch(value) is not None


def _digests_only(value: Any) -> bool:
    """Whether ``value``, under a name of personal data, holds none in clear text: SHA-256
    digests (one, a list of them), nothing, a yes or no, or a number too small to be a phone
    number or a date of birth."""
    if value is None or value == "" or type(value) is bool:
        return True
    if type(value) is int or type(value) is float:
        return abs(value) < _LARGE
    if isinstance(value, list | tuple):
        return all(_digests_only(v) for v in value)
    return _is_digest(value)


def is_email(text: str) -> bool:
    """Whether ``text`` (trimmed) is an e-mail address, and not a file name such as
    ``hero@2x.jpg``."""
    match = _EMAIL.fullmatch(text.strip()) if "@" in text else None
    return match is not None and match[1].lower() not in _FILE_ENDINGS


def _clean(payload: Any) -> bool:
    """Whether ``payload`` holds no personal data in clear text: :func:`find` without the
    paths (field names are looked up once, in :func:`kind_of`'s cache)."""
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "@" in value and is_email(value):
                return False
        elif isinstance(value, Mapping):
            for key, inner in value.items():
                kind = kind_of(key) if type(key) is str else None
                if kind is not None and not _digests_only(inner):
                    return False
                stack.append(inner)
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return True


def find(payload: Any) -> tuple[str, str, bool] | None:
    """The first place in ``payload`` that holds personal data in clear text, as ``(path,
    kind, named)`` (``named``: found by the field's name, not by its value); None when there
    is none. See the module's docstring for the rules."""
    if _clean(payload):
        return None
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if is_email(value):
                return path, "email", False
        elif isinstance(value, Mapping):
            for key, inner in value.items():
                here = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and (kind := kind_of(key)) and not _digests_only(inner):
                    return here, kind, True
                if isinstance(inner, str | Mapping | list | tuple):
                    stack.append((here, inner))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", inner) for i, inner in enumerate(value))
    return None


def check(value: Any, field: str, platform: str, homes: Mapping[str, str]) -> None:
    """Refuse ``value``, passed on as mapped under ``field``, if it holds personal data in clear
    text: by the field's own name (its last part: ``custom_data.email``), by the names inside
    it, or as an e-mail address anywhere in it.

    For the places where an adapter passes mapped values on as they are, which is where a
    wrong target leaks; ``homes`` as for :func:`refuse`.

    Raises:
        PayloadError: naming the field, what it seems to hold and where it belongs.
    """
    kind = _FIELD_KIND.get(field, _NOT_SEEN)
    if kind is _NOT_SEEN:
        kind = kind_of(field.rsplit(".", 1)[-1].removesuffix("[]"))
        if len(_FIELD_KIND) >= 4096:  # field names can hold names from events: keep it bounded
            _FIELD_KIND.clear()
        _FIELD_KIND[field] = kind
    if kind is not None and not _digests_only(value):
        _refuse(field, str(kind), True, platform, homes)
    value_kind = type(value)
    if value_kind is str:
        if "@" in value and is_email(value):
            _refuse(field, "email", False, platform, homes)
    elif (
        value_kind is dict or value_kind is list or isinstance(value, tuple | Mapping)
    ) and not _clean(value):
        found = find(value)
        if found is not None:
            path, kind, named = found
            inner = f"{field}{path}" if path.startswith("[") else f"{field}.{path}"
            _refuse(inner, kind, named, platform, homes)


def identifier(value: object, field: str, platform: str, homes: Mapping[str, str]) -> str:
    """An ID a platform receives as it is (event, order, content, click and session IDs), as
    text, refused if it is an e-mail address: a mapping such as ``properties.order_id ||
    user_data.email`` puts one there, and an order ID "must not contain PII" (Google Ads'
    ``ORDER_ID_CONTAINS_PII``, platforms.md §3.3).

    Raises:
        PayloadError: the value is no text, or is an e-mail address (named as for :func:`check`).
    """
    text = values.text(value, f"{platform}: {field}")
    if "@" in text:
        check(text, field, platform, homes)
    return text


def refuse(payload: Mapping[str, Any], platform: str, homes: Mapping[str, str]) -> None:
    """Refuse ``payload`` if it holds personal data in clear text anywhere (see :func:`find`).

    ``homes``: the kind of data -> the mapping target where the adapter hashes it, named in
    the message (``{"email": "user_data.em"}``); a kind it lacks is one the platform does not
    take at all. Walks the whole payload: the built-in adapters call :func:`check` on the values
    they pass on instead, which costs far less.

    Raises:
        PayloadError: naming the field, what it seems to hold and where it belongs.
    """
    found = find(payload)
    if found is not None:
        _refuse(*found, platform, homes)


def _refuse(path: str, kind: str, named: bool, platform: str, homes: Mapping[str, str]) -> None:
    home = homes.get(kind)
    where = (
        f"{platform} takes it only hashed, mapped to {home}"
        if home
        else f"{platform} takes no {kind.replace('_', ' ')}: leave it out"
    )
    why = " (a field named like personal data must hold SHA-256 digests)" if named else ""
    raise PayloadError(f"{path} would send {DESCRIPTIONS[kind]} in clear text; {where}{why}")
