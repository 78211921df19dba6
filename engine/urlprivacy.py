"""Personal data in page URLs, redacted at intake before anything stores or forwards them.

Sites put personal data in URLs more often than they mean to: a sign-up form sent by GET
(``/thanks?email=ada%40example.com&phone=...``), a newsletter link that carries the address,
an account page at ``/users/ada@example.com``. The platforms take the page URL in clear text
(Meta's ``event_source_url``, GA4's ``page_location``, TikTok's ``page.url``), so whatever
personal data it holds would reach them unhashed, even from an analytics-only event.

A query or fragment field is redacted when its name says it holds personal data (as
:func:`destinations.cleartext.kind_of` reads names: ``email``, ``phone``, ``first_name``,
``customer_dob``...) and its value is not a SHA-256 digest, or when its value is an e-mail
address whatever its name; so is a path segment that is an e-mail address. The value becomes
``(redacted)``, as GA4's own data redaction writes it; the rest of the URL stays exactly as
sent, so the platforms still see the page and its campaign parameters.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

from destinations import cleartext

REDACTED_VALUE = "(redacted)"
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def redact_personal_data(url: str) -> str:
    """``url`` with the personal data it carries redacted (see the module docstring)."""
    if "?" not in url and "#" not in url and "@" not in url and "%40" not in url:
        return url  # nothing that could hold a field or an address
    head, hash_sign, fragment = url.partition("#")
    base, question, query = head.partition("?")
    if "@" in base or "%40" in base:
        base = _redact_path(base)
    if query:
        query = _redact_fields(query)
    if fragment:
        # Single-page apps route by fragment and carry their query in it (#/signup?email=...).
        route, inner, rest = fragment.partition("?")
        if inner:
            fragment = route + inner + _redact_fields(rest)
        elif "=" in fragment:
            fragment = _redact_fields(fragment)
    return base + question + query + hash_sign + fragment


def _redact_fields(query: str) -> str:
    """``name=value&...`` with each field that holds personal data given ``(redacted)``."""
    fields = query.split("&")
    changed = False
    for n, field in enumerate(fields):
        name, equals, value = field.partition("=")
        if equals and value and _personal(unquote_plus(name), unquote_plus(value)):
            fields[n] = f"{name}={REDACTED_VALUE}"
            changed = True
    return "&".join(fields) if changed else query


def _personal(name: str, value: str) -> bool:
    if cleartext.is_email(value):
        return True
    return cleartext.kind_of(name) is not None and _DIGEST.fullmatch(value.strip()) is None


def _redact_path(base: str) -> str:
    """The scheme, host and path, with each path segment that is an e-mail address redacted
    (the ``user@`` of a host is not one: the host is left alone)."""
    scheme, sep, rest = base.partition("://")
    if not sep:
        scheme, rest = "", base
    host, slash, path = rest.partition("/")
    if not slash:
        return base
    segments = path.split("/")
    clean = [REDACTED_VALUE if cleartext.is_email(unquote(s)) else s for s in segments]
    return base if clean == segments else scheme + sep + host + slash + "/".join(clean)
