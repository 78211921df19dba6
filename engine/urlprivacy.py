"""Personal data in page URLs, redacted at intake before anything stores or forwards them.

Sites put personal data in URLs more often than they mean to: a sign-up form sent by GET
(``/thanks?email=ada%40example.com&phone=...``), a newsletter link that carries the address,
an account page at ``/users/ada@example.com``. The platforms take the page URL in clear text
(Meta's ``event_source_url``, GA4's ``page_location``, TikTok's ``page.url``), so whatever
personal data it holds would reach them unhashed, even from an analytics-only event.

A query or fragment field is redacted when its name says it holds personal data (as
:func:`destinations.cleartext.kind_of` reads names: ``email``, ``phone``, ``first_name``,
``customer_dob``...; two-letter names such as ``fn`` say nothing in a URL) and its value is
not a SHA-256 digest, or when its value holds an e-mail address whatever its name, decoded as
often as it was encoded (a redirect URL's own query); so is a path segment, in the path or in
a fragment route, that holds one. The value becomes ``(redacted)``, as GA4's own data
redaction writes it; the rest of the URL stays exactly as sent, so the platforms still see the
page and its campaign parameters. What it cannot see: a phone number or name under a name
that does not say so (``?ref=Ada``); the site's own such names are given in ``names``
(``TAGRELAY_REDACT_QUERY_PARAMS``), and their values are redacted whatever they hold.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

from destinations import cleartext

REDACTED_VALUE = "(redacted)"
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
# At most 64 characters before the "@" (RFC 5321's longest local part): a longer run still
# holds an address that ends as the whole run's would, found from a later start, and each start
# then looks at 64 characters, not on to an "@" however far (a 30 KB page URL took 24 s).
_EMAIL_IN = re.compile(
    r"[A-Za-z0-9._%+\-']{1,64}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
_DECODINGS = 3  # a redirect's URL inside a query is encoded once more, and it can nest


_NONE: frozenset[str] = frozenset()


def redact_personal_data(url: str, names: frozenset[str] = _NONE) -> str:
    """``url`` with the personal data it carries redacted (see the module docstring).

    Args:
        url: a page URL or referrer, as sent.
        names: query and fragment field names, in lower case, whose values are redacted
            whatever they hold.
    """
    if "?" not in url and "#" not in url and "@" not in url and "%40" not in url:
        return url  # nothing that could hold a field or an address
    head, hash_sign, fragment = url.partition("#")
    base, question, query = head.partition("?")
    if "@" in base or "%40" in base:
        base = _redact_path(base)
    if query:
        query = _redact_fields(query, names)
    if fragment:
        # Single-page apps route by fragment: a path (#/users/ada@example.com) and a query
        # (#/signup?email=...) of their own.
        route, inner, rest = fragment.partition("?")
        if inner:
            fragment = _redact_segments(route) + inner + _redact_fields(rest, names)
        elif "=" in fragment:
            fragment = _redact_fields(fragment, names)
        else:
            fragment = _redact_segments(fragment)
    return base + question + query + hash_sign + fragment


def _redact_fields(query: str, names: frozenset[str]) -> str:
    """``name=value&...`` with each field that holds personal data, or is named in ``names``,
    given ``(redacted)``."""
    fields = query.split("&")
    changed = False
    for n, field in enumerate(fields):
        name, equals, value = field.partition("=")
        if not (equals and value) or value == REDACTED_VALUE:
            continue
        readable = unquote_plus(name)
        if (names and readable.strip().lower() in names) or _personal(readable, value):
            fields[n] = f"{name}={REDACTED_VALUE}"
            changed = True
    return "&".join(fields) if changed else query


def _personal(name: str, value: str) -> bool:
    """Whether a query field holds personal data: an e-mail address anywhere in its value,
    however often encoded (a redirect URL's own query included), or a name that says so
    (two-letter names such as ``fn`` or ``ln`` say nothing in a URL) and no digest."""
    if _has_email(value):
        return True
    if len(name) <= 2 or cleartext.kind_of(name) is None:
        return False
    return _DIGEST.fullmatch(unquote_plus(value).strip()) is None


def _has_email(text: str) -> bool:
    """Whether ``text`` holds an e-mail address (not a file name such as ``hero@2x.jpg``), as
    written or percent-decoded up to :data:`_DECODINGS` times."""
    for _ in range(_DECODINGS + 1):
        if "@" in text and any(cleartext.is_email(m.group()) for m in _EMAIL_IN.finditer(text)):
            return True
        if "%" not in text:
            return False
        decoded = unquote(text)
        if decoded == text:
            return False
        text = decoded
    return False


def _redact_segments(path: str) -> str:
    """``path`` with each ``/``-separated segment that holds an e-mail address redacted."""
    if "@" not in path and "%40" not in path:
        return path
    segments = path.split("/")
    clean = [REDACTED_VALUE if _has_email(s) else s for s in segments]
    return path if clean == segments else "/".join(clean)


def _redact_path(base: str) -> str:
    """The scheme, host and path, with each path segment that holds an e-mail address
    redacted (the ``user@`` of a host is not one: the host is left alone)."""
    scheme, sep, rest = base.partition("://")
    if not sep:
        scheme, rest = "", base
    host, slash, path = rest.partition("/")
    if not slash:
        return base
    return scheme + sep + host + slash + _redact_segments(path)
