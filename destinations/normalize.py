"""Per-platform normalization and hashing of customer information.

The platforms disagree (``reference/platforms.md`` §0), and a wrong normalization is a silent
loss of attribution, so every normalizer takes the platform it normalizes for:

* e-mail: trim + lowercase everywhere; **Google only** also drops dots and ``+tag`` from the
  local part of gmail.com / googlemail.com addresses.
* phone: Meta wants the digits with the country code and no ``+`` (``16505551212``); Google and
  TikTok want E.164 with ``+`` (``+16505551212``). National numbers need a default country.
* the rest (names, city, state, postal code, country, date of birth, gender) follow Meta's
  customer-information rules (§1.3), which Google and TikTok share where they take the field;
  Google's names also lose titles such as ``Mrs.`` and ``Jr.`` (§3.6).

Each normalizer returns the normalized string, or None when the input cannot be normalized
(empty, not an e-mail, not a phone number, unknown country...): a value that cannot match is
left out rather than hashed. :func:`hashed` hashes a normalized value and passes through a value
that is already a SHA-256 hex digest, so nothing is ever hashed twice.
"""

from __future__ import annotations

import gettext
import hashlib
import math
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import cache, lru_cache
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import pycountry

from destinations.e164 import e164
from destinations.values import no_value, scalar_text

Platform = Literal["meta", "google", "tiktok"]
"""The platforms whose rules this module knows."""

Normalizer = Callable[[str], str | None]
"""A function from raw text to normalized text, or None when it cannot be normalized."""

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_GOOGLE_MAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
_ZIP_PLUS_4 = re.compile(r"\d{5}-\d{4}")
# A US ZIP inside other text (``CA 94035``, ``94035 USA``): five digits, or ZIP+4, not part of
# a longer run of digits.
_ZIP_IN_TEXT = re.compile(r"(?<!\d)\d{5}(?:-?\d{4})?(?!\d)")
# What lets a query key differ from its text in the URL: a percent-escape, or a tab or newline
# (which ``urlsplit`` removes).
_KEY_DISGUISE = re.compile(r"[%\t\r\n]")


# -- hashing ----------------------------------------------------------------------------------
#
# The normalizers of free text and the hash keep their last few thousand answers: one event's
# identifiers are normalized and hashed for up to four platforms, most fields the same way for
# all of them, and names, cities, states and dates repeat across events. The caches are bounded
# and live in process memory only, next to the events being processed; nothing is written out.
_CACHE_SIZE = 4096


@lru_cache(maxsize=_CACHE_SIZE)
def sha256_hex(value: str) -> str:
    """The SHA-256 of ``value`` (UTF-8) as 64 lowercase hex characters."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def is_hashed(value: object) -> bool:
    """Whether ``value`` is already a SHA-256 hex digest (64 hex characters, any case)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value.strip()) is not None


def hashed(value: object, normalizer: Normalizer) -> str | None:
    """Normalize ``value`` with ``normalizer`` and hash it; pass a digest through lowercased.

    Args:
        value: the raw value (a string; numbers are turned into text).
        normalizer: e.g. ``lambda v: email(v, "meta")``.

    Returns:
        The lowercase SHA-256 hex digest, or None when the value is empty or cannot be
        normalized.
    """
    text = _text(value)
    if text is None:
        return None
    # A digest is 64 characters once trimmed, so shorter text cannot be one.
    if len(text) >= 64 and is_hashed(text):
        return text.strip().lower()
    normal = normalizer(text)
    return sha256_hex(normal) if normal else None


def hashed_values(value: object, normalizer: Normalizer) -> str | list[str] | None:
    """Like :func:`hashed`, for fields that take a string or a list of strings.

    A list gives a list of distinct digests in input order (None when none is left); anything
    else gives what :func:`hashed` gives.
    """
    if isinstance(value, list | tuple):
        digests: list[str] = []
        for element in value:
            digest = hashed(element, normalizer)
            if digest is not None and digest not in digests:
                digests.append(digest)
        return digests or None
    return hashed(value, normalizer)


# -- identifiers --------------------------------------------------------------------------------


def email(value: str, platform: Platform) -> str | None:
    """An e-mail address, trimmed and lowercased.

    For ``google`` only, the local part of a gmail.com or googlemail.com address also loses
    every dot and any ``+tag`` (Data Manager formatting rule, platforms.md §3.6); Meta and
    TikTok keep them. Returns None when the value is not shaped like an address.
    """
    return _email(value, platform == "google")


@lru_cache(maxsize=_CACHE_SIZE)
def _email(value: str, google: bool) -> str | None:
    text = value.strip().lower()
    if not _EMAIL.fullmatch(text):
        return None
    if google:
        local, _, domain = text.rpartition("@")
        if domain in _GOOGLE_MAIL_DOMAINS:
            local = local.split("+", 1)[0].replace(".", "")
            if not local:
                return None
            text = f"{local}@{domain}"
    return text


def phone(value: str, platform: Platform, default_country: str | None = None) -> str | None:
    """A phone number in the platform's format.

    Meta: the digits of the E.164 form, country code included, no ``+`` (``16505551212``).
    Google and TikTok: E.164 with ``+`` (``+16505551212``). A national trunk prefix
    (``+44 (0)20…``) and an international prefix (the default country's own, such as
    Australia's ``0011``, else ``00``) are read as ``phonenumbers`` reads them.

    Args:
        value: the number as the user typed it.
        platform: whose format to produce.
        default_country: ISO alpha-2 code (or a country name) used to read a number written
            without its country code. Without it such a number is read as digits that already
            start with a country code, and kept only if that gives a valid number.

    Returns:
        The normalized number, or None when it is not a possible phone number.
    """
    number = e164(value, country(default_country, "google") if default_country else None)
    if number is None:
        return None
    return number[1:] if platform == "meta" else number


def external_id(value: str, platform: Platform) -> str | None:
    """An advertiser's own user ID: trimmed, case kept.

    TikTok's template does not lowercase it, Segment does (platforms.md §4.4, unconfirmed);
    keeping the case matches what a pixel sends as is. Meta asks only for the same format on
    Pixel and Conversions API. Returns None when empty.
    """
    text = value.strip()
    return text or None


# -- person -------------------------------------------------------------------------------------


def name(value: str, platform: Platform) -> str | None:
    """A first or last name: lowercase, letters only (any script, UTF-8), inner spaces kept.

    Punctuation, digits and symbols are removed (``Jean-Luc`` -> ``jeanluc``, ``O'Brien`` ->
    ``obrien``); accented and non-Latin letters are kept (``Valéry`` -> ``valéry``).

    For ``google`` only, honorifics before the name (``Mr``, ``Mrs``, ``Ms``, ``Miss``, ``Dr``,
    ``Prof``) and generational suffixes after it (``Jr``, ``Sr``, ``II``, ``III``, ``IV``) are
    dropped as whole words, with or without a dot: ``Mrs. Mary`` -> ``mary``, ``Smith, Jr.``
    -> ``smith`` (platforms.md §3.6: "no prefixes (Mrs.) or suffixes (Jr.)"). A name made of
    such words alone is kept as it is (``Ii`` is a surname too): a hash that matches no one
    costs nothing, a real name left out loses the match. Meta's and TikTok's rules (§1.3,
    §4.4) say nothing of titles, so their names keep them.
    """
    if platform == "google" and not value.isalpha():  # one word of letters: nothing to strip
        return _google_name(value)
    return _letters(value, True)


# Whole words, lowercase, without their dot (Google's rule, platforms.md §3.6).
_NAME_PREFIXES = frozenset({"mr", "mrs", "ms", "miss", "dr", "prof"})
_NAME_SUFFIXES = frozenset({"jr", "sr", "ii", "iii", "iv"})


def _title_key(word: str) -> str:
    """A word as the title lists spell it: lowercase, without a trailing dot or comma."""
    return word.lower().rstrip(".,")


@lru_cache(maxsize=_CACHE_SIZE)
def _google_name(value: str) -> str | None:
    words = value.split()
    start, end = 0, len(words)
    while start < end and _title_key(words[start]) in _NAME_PREFIXES:
        start += 1
    while end > start and _title_key(words[end - 1]) in _NAME_SUFFIXES:
        end -= 1
    if start == end:  # titles only: keep them rather than lose the whole name
        return _letters(value, True)
    return _letters(" ".join(words[start:end]), True)


def gender(value: str, platform: Platform) -> str | None:
    """``f`` or ``m`` from the usual spellings (``Female``, ``male``, ``F``...), else None."""
    key = value.strip().lower()
    if key in {"f", "female", "woman", "w"}:
        return "f"
    if key in {"m", "male", "man"}:
        return "m"
    return None


_DOB_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(\d{4})[-/.]?(\d{1,2})[-/.]?(\d{1,2})(?:[T ].*)?"), "ymd"),
    (re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})"), "mdy"),  # US order, as in Meta's example
    (re.compile(r"(\d{1,2})[.-](\d{1,2})[.-](\d{4})"), "dmy"),
)


def date_of_birth(value: str | date, platform: Platform) -> str | None:
    """A date of birth: ``YYYYMMDD`` for Meta, ``YYYY-MM-DD`` for the others.

    Reads ``1997-02-16``, ``19970216``, ``1997/02/16``, an ISO date-time, ``2/16/1997``
    (month first, as in Meta's docs) and ``16.02.1997`` or ``16-02-1997`` (day first). When
    the number in the month's place is above 12, the two are swapped: ``16/2/1997`` and
    ``02-16-1997`` are read too. Years outside 1900 to this year give None.
    """
    parsed = value if isinstance(value, date) else _parse_date(value.strip())
    if parsed is None or not 1900 <= parsed.year <= datetime.now(UTC).year:
        return None
    # ``YYYY-MM-DD`` (a datetime's isoformat goes on with the time). The year (1900 to this
    # year) has four digits, so without the dashes this is what ``strftime("%Y%m%d")`` gives,
    # at a fraction of the cost.
    iso = parsed.isoformat()[:10]
    return iso.replace("-", "") if platform == "meta" else iso


@lru_cache(maxsize=_CACHE_SIZE)
def _parse_date(text: str) -> date | None:
    for pattern, order in _DOB_PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        a, b, c = map(int, match.groups())
        # Either order of day and month: the separator's usual one, the other when the
        # number in the month's place cannot be a month.
        if order == "ymd":
            year, month, day = a, b, c
        elif order == "mdy":
            year, month, day = (c, a, b) if a <= 12 else (c, b, a)
        else:
            year, month, day = (c, b, a) if b <= 12 else (c, a, b)
        try:
            return date(year, month, day)
        except ValueError:
            return None
    return None


# -- address ------------------------------------------------------------------------------------


def street(value: str, platform: Platform) -> str | None:
    """A street address: lowercase, symbols and punctuation removed (not replaced), single spaces.

    Google's rule (``1600 Amphitheatre Pkwy.`` -> ``1600 amphitheatre pkwy``); digits are kept.
    """
    text = unicodedata.normalize("NFC", value).lower()
    kept = "".join(ch for ch in text if unicodedata.category(ch)[0] in "LMN" or ch.isspace())
    return " ".join(kept.split()) or None


def city(value: str, platform: Platform) -> str | None:
    """A city: lowercase letters only.

    Meta and TikTok: no spaces (``South San Francisco`` -> ``southsanfrancisco``). Google
    (sent in clear text by GA4): digits and symbols removed, single spaces kept.
    """
    return _letters(value, platform == "google")


@lru_cache(maxsize=_CACHE_SIZE)
def state(value: str, platform: Platform, country: str | None = None) -> str | None:
    """A state or region: US state names become their 2-letter code; lowercase, no punctuation.

    Args:
        value: ``California``, ``CA``, ``N.Y.``, ``Bavaria``...
        platform: accepted for a uniform API; the rule is the same everywhere.
        country: the address's country (code or name). Names are mapped to US codes only when
            it is the United States or unknown.
    """
    key = _alnum(value)
    if not key:
        return None
    resolved = _country_code(country) if country else None
    if resolved in (None, "US"):
        return _US_STATES.get(key, key)
    return key


@lru_cache(maxsize=_CACHE_SIZE)
def postal_code(value: str, platform: Platform, country: str | None = None) -> str | None:
    """A postal code: US ZIPs keep their first 5 digits; others lose spaces and dashes.

    When ``country`` is the United States and the text holds exactly one ZIP-shaped run (five
    digits, or ZIP+4: ``94035-1234``, ``940351234``) not inside a longer run of digits, the
    code is that ZIP's first five digits, whatever else the text says (``CA 94035``,
    ``ZIP 94035``, ``94035 USA``). Otherwise it is read as any other code: ``country`` is often
    a shop's default, and a Canadian ``K1A 0B1`` cut to its digits would be ``101``. With no
    country, only a whole ZIP+4 (``94035-1234``) is read as a US ZIP. Meta and TikTok get
    lowercase alphanumerics (``M1 1AE`` -> ``m11ae``, ``00-950`` -> ``00950``); Google, which
    receives the code in clear text, gets it trimmed with single spaces.
    """
    text = value.strip()
    resolved = _country_code(country) if country else None
    if resolved == "US":
        runs = [match.group() for match in _ZIP_IN_TEXT.finditer(text)]
        if len(runs) == 1:
            return runs[0][:5]
    elif resolved is None and _ZIP_PLUS_4.fullmatch(text):
        return text[:5]
    if platform == "google":
        return " ".join(text.split()) or None
    return _alnum(text) or None


def country(value: str, platform: Platform) -> str | None:
    """An ISO 3166-1 alpha-2 code from an alpha-2 or alpha-3 code (``DEU`` -> ``de``) or an
    English (or common European) name: the ISO names, and the usual English, short and former
    names the ISO list lacks (``Turkey``, ``UAE``, ``Burma``, ``Swaziland``, ``The Gambia``,
    ``St Lucia``). Kosovo, which has no ISO code, is ``XK``, as ``phonenumbers`` reads it.

    Lowercase for Meta and TikTok (``United States`` -> ``us``), uppercase for Google.
    Returns None for an unknown country, and for a value that is not text.
    """
    if not isinstance(value, str):
        return None  # a mapped number, list or object: read as no country at all
    code = _country_code(value)
    if code is None:
        return None
    return code if platform == "google" else code.lower()


# -- URLs ---------------------------------------------------------------------------------------


def url_param(url: object, param: str) -> str | None:
    """The first value of query parameter ``param`` in ``url``, unchanged (case kept), that is
    no JavaScript non-value (:func:`~destinations.values.no_value`), such as ``undefined``: the
    one click capture reads (:func:`engine.identity.click_ids_in_url`)."""
    if not isinstance(url, str) or not url:
        return None
    # Most URLs do not carry the parameter: skip the parse when none of its keys can be
    # ``param``. A key is its text in the URL with "+" read as a space and percent-escapes
    # decoded, after ``urlsplit`` has removed tabs and newlines; so without escapes, tabs or
    # newlines in the URL, a key can only equal a ``param`` without spaces if ``param`` is
    # written in the URL.
    if param not in url and " " not in param and not _KEY_DISGUISE.search(url):
        return None
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    # "?gclid=undefined": a link a script built of a click ID it did not have carries none.
    return next((v for v in parse_qs(query).get(param, ()) if not no_value(v)), None)


# -- helpers ------------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    if isinstance(value, str):
        # Empty after ``strip()`` exactly when empty or all whitespace (the same definition).
        return None if not value or value.isspace() else value
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        # An int of any size is its digits (``float()`` would overflow past 1e308).
        return scalar_text(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # NaN and the infinities are no one's phone number or postal code
        return str(int(value)) if value.is_integer() else str(value)
    return None


def _ascii_deletions(keep: Callable[[str], bool]) -> dict[int, None]:
    """A ``str.translate`` table deleting every ASCII character that ``keep`` refuses."""
    return {code: None for code in range(128) if not keep(chr(code))}


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LM"


def _is_letter_or_space(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LM" or ch.isspace()


def _is_alnum(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LMN"


# ASCII text is already in NFC and stays ASCII when lowercased, so for it the per-character
# Unicode test reduces to these tables, built with the very same tests.
_ASCII_NON_LETTERS = _ascii_deletions(_is_letter)
_ASCII_NON_LETTERS_SPACES = _ascii_deletions(_is_letter_or_space)
_ASCII_NON_ALNUM = _ascii_deletions(_is_alnum)


@lru_cache(maxsize=_CACHE_SIZE)
def _letters(value: str, keep_spaces: bool) -> str | None:
    if value.isascii():
        if value.isalpha():  # ASCII letters only: the usual name or city
            return value.lower()
        table = _ASCII_NON_LETTERS_SPACES if keep_spaces else _ASCII_NON_LETTERS
        return " ".join(value.lower().translate(table).split()) or None
    text = unicodedata.normalize("NFC", value).lower()
    keep = _is_letter_or_space if keep_spaces else _is_letter
    return " ".join("".join(filter(keep, text)).split()) or None


@lru_cache(maxsize=_CACHE_SIZE)
def _alnum(value: str) -> str:
    if value.isascii():
        return value.lower().translate(_ASCII_NON_ALNUM)
    text = unicodedata.normalize("NFC", value).lower()
    return "".join(filter(_is_alnum, text))


def _country_key(value: str) -> str:
    decomposed = unicodedata.normalize("NFKD", value.casefold().replace("&", "and"))
    return "".join(ch for ch in decomposed if ch.isalnum() and ch.isascii())


# Names people write that ``pycountry`` does not know: short, former and English names
# (the library says Türkiye, Cabo Verde, Eswatini, Myanmar) and parts of a country. Keys as
# ``_country_key`` writes them. A leading "the" and "St" for "Saint" are read by
# ``_country_code`` itself (``The Gambia``, ``St Kitts and Nevis``).
_COUNTRY_ALIASES = {
    "usa": "US",
    "unitedstatesofamerica": "US",
    "america": "US",
    "uk": "GB",
    "britain": "GB",
    "greatbritain": "GB",
    "england": "GB",
    "scotland": "GB",
    "wales": "GB",
    "northernireland": "GB",
    "czechia": "CZ",
    "northmacedonia": "MK",
    "macedonia": "MK",
    "republicofmacedonia": "MK",
    "fyrom": "MK",
    "turkey": "TR",
    "turkiye": "TR",
    "uae": "AE",
    "emirates": "AE",
    "capeverde": "CV",
    "swaziland": "SZ",
    "burma": "MM",
    "ivorycoast": "CI",
    "korea": "KR",
    "koreasouth": "KR",
    "koreanorth": "KP",
    "republicofkorea": "KR",
    "korearepublicof": "KR",
    "russianfederation": "RU",
    "vietnam": "VN",
    "laopdr": "LA",
    "holland": "NL",
    "vatican": "VA",
    "vaticancity": "VA",
    "vaticancitystate": "VA",
    "holysee": "VA",
    "palestine": "PS",
    "stateofpalestine": "PS",
    "palestinianterritories": "PS",
    "palestinianterritory": "PS",
    "easttimor": "TL",
    "drcongo": "CD",
    "drc": "CD",
    "democraticrepublicofthecongo": "CD",
    "democraticrepublicofcongo": "CD",
    "congokinshasa": "CD",
    "congobrazzaville": "CG",
    "bosnia": "BA",
    "bosniaherzegovina": "BA",
    "republicofireland": "IE",
    "eire": "IE",
    "falklands": "FK",
    "falklandislands": "FK",
    "aland": "AX",
    "sainthelena": "SH",
    "saintmartin": "MF",
    "sintmaarten": "SX",
    "saintbarts": "BL",
    "usvirginislands": "VI",
    "caribbeannetherlands": "BQ",
    "bonaire": "BQ",
    "pitcairnislands": "PN",
    "cocosislands": "CC",
    "keelingislands": "CC",
    # Kosovo has no ISO 3166-1 code; XK is the code in common use (phonenumbers reads +383
    # numbers as XK, and Meta, Google and TikTok take it), so it is read as a code too.
    "kosovo": "XK",
}


@cache
def _country_names() -> dict[str, str]:
    """Names -> alpha-2: ISO 3166 names from ``pycountry``, in English and six more languages.

    (``phonenumbers`` ships locale data too, but importing it costs ~75 MB per process.)
    """
    names: dict[str, str] = {}
    translations = [
        gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[lang], fallback=True)
        for lang in ("de", "fr", "es", "it", "nl", "pt")
    ]
    for entry in pycountry.countries:
        code = str(entry.alpha_2)
        labels = [getattr(entry, attr, None) for attr in ("name", "official_name", "common_name")]
        labels += [t.gettext(str(entry.name)) for t in translations]
        for label in labels:
            if isinstance(label, str):
                names.setdefault(_country_key(label), code)
    names.update(_COUNTRY_ALIASES)
    return names


@lru_cache(maxsize=1024)
def _country_code(value: str) -> str | None:
    key = _country_key(value)
    if not key:
        return None
    upper = key.upper()
    if len(key) == 2 and upper in _ALPHA_2:
        return upper
    if len(key) == 3 and upper in _ALPHA_3:  # no 3-letter country name is another's code
        return _ALPHA_3[upper]
    names = _country_names()
    code = names.get(key)
    if code is None and key.startswith("the"):  # The Gambia, The Bahamas, The Netherlands
        code = names.get(key[3:])
    if code is None and key.startswith("st"):  # St Lucia, St. Kitts and Nevis
        code = names.get("saint" + key[2:])
    return code


_ALPHA_2 = frozenset(str(c.alpha_2) for c in pycountry.countries) | {"XK"}
_ALPHA_3 = {str(c.alpha_3): str(c.alpha_2) for c in pycountry.countries}


_US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "newhampshire": "nh", "newjersey": "nj",
    "newmexico": "nm", "newyork": "ny", "northcarolina": "nc", "northdakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa", "rhodeisland": "ri",
    "southcarolina": "sc", "southdakota": "sd", "tennessee": "tn", "texas": "tx", "utah": "ut",
    "vermont": "vt", "virginia": "va", "washington": "wa", "westvirginia": "wv",
    "wisconsin": "wi", "wyoming": "wy", "puertorico": "pr", "guam": "gu",
    "americansamoa": "as", "northernmarianaislands": "mp", "usvirginislands": "vi",
    "virginislands": "vi",
}  # fmt: skip
