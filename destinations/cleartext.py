"""Refusing personal data in clear text where an ad platform would receive it.

An ad platform takes e-mail addresses, phone numbers, names, dates of birth and street
addresses only normalized and hashed, in its own fields (Meta's ``user_data.em``, TikTok's
``user.email``): that is where its adapter hashes them. Anywhere else an adapter passes a mapped
value on as it was mapped, so that a tag can send fields the adapter does not know; a mapping
that names the wrong target (``user_data.email`` for Meta, ``user.em`` for TikTok,
``params.email`` for GA4) or sends a whole object of the event (``custom_data: user_data``)
would then send the address itself. :func:`refuse` looks at the finished payload and refuses
it instead, naming the field and where the platform takes that data:

- a field named like one of those kinds of data (``email``, ``phoneNumber``, ``first_name``,
  ``em``, ``dob``, ...) must hold SHA-256 digests (64 hexadecimal digits), or nothing;
- no text anywhere may be an e-mail address.

Cities, regions, postal codes and countries are left alone: GA4 and Google Ads take them in
clear text, and they are also ordinary business data (a shop's region). So are URLs, whose
query strings are the page's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from destinations.base import PayloadError

# Squashed (lowercase, no "_", "-", "." or spaces) field names -> the kind of data they name.
_KINDS = {
    "email": (
        "email",
        "emails",
        "mail",
        "emailaddress",
        "emailaddresses",
        "useremail",
        "customeremail",
        "em",
    ),
    "phone": (
        "phone",
        "phones",
        "phonenumber",
        "phonenumbers",
        "mobile",
        "mobilenumber",
        "mobilephone",
        "telephone",
        "tel",
        "ph",
    ),
    "first_name": ("firstname", "givenname", "fn"),
    "last_name": ("lastname", "surname", "familyname", "ln"),
    "full_name": ("fullname", "customername"),
    "date_of_birth": ("dateofbirth", "dob", "birthday", "birthdate", "db"),
    "street": ("street", "streetaddress", "address1", "addressline1", "addressline"),
}
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}
DESCRIPTIONS = {
    "email": "an e-mail address",
    "phone": "a phone number",
    "first_name": "a first name",
    "last_name": "a last name",
    "full_name": "a person's name",
    "date_of_birth": "a date of birth",
    "street": "a street address",
}
_SQUASH = re.compile(r"[\s_.\-]+")
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-']+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")


_NOT_SEEN = object()
_KIND_CACHE: dict[str, str | None] = {}  # field name -> kind_of(name); cleared when large
_FIELD_KIND: dict[str, object] = {}  # a dotted field of check() -> the kind its last name holds


def kind_of(key: str) -> str | None:
    """The kind of personal data a field named ``key`` holds (``"email"``, ``"phone"``, ...),
    judged by its name alone; None for any other name."""
    kind = _KIND_CACHE.get(key, _NOT_SEEN)
    if kind is _NOT_SEEN:
        kind = _KIND_OF.get(_SQUASH.sub("", key.lower()))
        if len(_KIND_CACHE) >= 4096:  # names can come from events: keep the cache bounded
            _KIND_CACHE.clear()
        _KIND_CACHE[key] = kind
    return kind  # type: ignore[return-value]


def _is_digest(value: Any) -> bool:
    return type(value) is str and _DIGEST.fullmatch(value) is not None


def _digests_only(value: Any) -> bool:
    """Whether ``value`` holds nothing but SHA-256 digests (one, a list of them, or nothing)."""
    if value is None or value == "":
        return True
    if isinstance(value, list | tuple):
        return all(v is None or v == "" or _is_digest(v) for v in value)
    return _is_digest(value)


def _is_email(text: str) -> bool:
    return "@" in text and _EMAIL.fullmatch(text.strip()) is not None


def _clean(payload: Any) -> bool:
    """Whether ``payload`` holds no personal data in clear text: :func:`find` without the
    paths, run on every value passed on of every event, so the common types are tested
    exactly, and a field name already seen costs one dictionary lookup."""
    stack = [payload]
    cache = _KIND_CACHE
    while stack:
        value = stack.pop()
        kind_of_value = type(value)
        if kind_of_value is dict or isinstance(value, Mapping):
            for key, inner in value.items():
                kind = cache.get(key, _NOT_SEEN)
                if kind is not None:
                    if kind is _NOT_SEEN:
                        kind = kind_of(key) if type(key) is str else None
                    if kind is not None and not _digests_only(inner):
                        return False
                inner_kind = type(inner)
                if inner_kind is str:
                    if "@" in inner and _is_email(inner):
                        return False
                elif inner_kind is dict or inner_kind is list or isinstance(inner, tuple | Mapping):
                    stack.append(inner)
        elif kind_of_value is list or kind_of_value is tuple:
            for inner in value:
                inner_kind = type(inner)
                if inner_kind is str:
                    if "@" in inner and _is_email(inner):
                        return False
                elif inner_kind is dict or inner_kind is list or isinstance(inner, tuple | Mapping):
                    stack.append(inner)
        elif isinstance(value, str) and _is_email(value):
            return False
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
            if _is_email(value):
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
        if "@" in value and _is_email(value):
            _refuse(field, "email", False, platform, homes)
    elif (
        value_kind is dict or value_kind is list or isinstance(value, tuple | Mapping)
    ) and not _clean(value):
        found = find(value)
        if found is not None:
            path, kind, named = found
            inner = f"{field}{path}" if path.startswith("[") else f"{field}.{path}"
            _refuse(inner, kind, named, platform, homes)


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
