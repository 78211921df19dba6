"""The adapters' fast paths give exactly what the plain code they short-cut gives.

Each ``_reference_*`` function below is the straightforward implementation the fast path
replaced (kept here verbatim as the specification); hypothesis compares the two on generated
inputs, including the awkward ones (non-ASCII text, percent-encoded URLs, odd separators).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destinations import e164, ga4, google_ads, meta_capi, normalize
from destinations.base import PayloadError

# -- references: the code before the fast paths -------------------------------------------------


def _reference_letters(value: str, *, keep_spaces: bool) -> str | None:
    text = unicodedata.normalize("NFC", value).lower()
    kept = "".join(
        ch for ch in text if unicodedata.category(ch)[0] in "LM" or (keep_spaces and ch.isspace())
    )
    return " ".join(kept.split()) or None


def _reference_alnum(value: str) -> str:
    text = unicodedata.normalize("NFC", value).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LMN")


def _reference_url_param(url: object, param: str) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    values = parse_qs(query).get(param)
    return values[0] if values and values[0] else None


def _reference_date_of_birth(value: str | date, platform: normalize.Platform) -> str | None:
    parsed = value if isinstance(value, date) else normalize._parse_date(value.strip())
    if parsed is None or not 1900 <= parsed.year <= datetime.now(UTC).year:
        return None
    return parsed.strftime("%Y%m%d") if platform == "meta" else parsed.isoformat()[:10]


def _reference_text(value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    return None


def _reference_hashed(value: object, normalizer: normalize.Normalizer) -> str | None:
    text = _reference_text(value)
    if text is None:
        return None
    if normalize.is_hashed(text):
        return text.strip().lower()
    normal = normalizer(text)
    return normalize.sha256_hex(normal) if normal else None


def _reference_e164(value: str, region: str | None) -> str | None:
    text = value.strip()
    if not re.search(r"\d", text):
        return None
    if text.startswith("+") or text.startswith("00"):
        number = e164._parse(text if text.startswith("+") else "+" + text[2:], None)
        # "00" read as the region's own, longer international prefix (Australia's 0011) only
        # when read as 00 it gives no valid number, or one only with a trunk prefix dropped
        digits = re.sub(r"\D", "", phonenumbers.normalize_digits_only(text))[2:]
        if (
            text.startswith("00")
            and _starts_with_own_idd(text, region)
            and not (
                number
                and phonenumbers.is_valid_number(number)
                and digits == f"{number.country_code}{_zeros(number)}{number.national_number}"
            )
        ):
            own = e164._parse(text, region)
            if own is not None and phonenumbers.is_valid_number(own):
                number = own
        return e164._format(number) if number and phonenumbers.is_possible_number(number) else None
    guess = e164._parse("+" + re.sub(r"\D", "", text), None)
    if (
        guess is not None
        and phonenumbers.is_valid_number(guess)
        and region in (None, phonenumbers.region_code_for_number(guess))
    ):
        return e164._format(guess)
    if region is None:
        return None
    number = e164._parse(text, region)
    return e164._format(number) if number and phonenumbers.is_possible_number(number) else None


def _zeros(number: phonenumbers.PhoneNumber) -> str:
    return "0" * (number.number_of_leading_zeros or 1) if number.italian_leading_zero else ""


def _starts_with_own_idd(text: str, region: str | None) -> bool:
    """Whether phonenumbers reads the start of ``text`` as ``region``'s international prefix
    (not when a 0 follows it: no calling code starts with 0)."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region) if region else None
    if metadata is None or metadata.international_prefix is None:
        return False
    digits = phonenumbers.normalize_digits_only(text)
    match = re.match(metadata.international_prefix, digits)
    return match is not None and digits[match.end() : match.end() + 1] != "0"


def _reference_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _reference_google_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def _reference_check_name(name: str, what: str) -> None:
    if len(name) > ga4.MAX_NAME:
        raise PayloadError(f"GA4: {what} {name!r} is longer than {ga4.MAX_NAME} characters")
    if not ga4.NAME_RULE.fullmatch(name):
        raise PayloadError(
            f"GA4: {what} {name!r} must be letters, digits and '_', starting with a letter"
        )
    if name.startswith(ga4.RESERVED_PREFIXES):
        raise PayloadError(f"GA4: {what} {name!r} uses a reserved prefix {ga4.RESERVED_PREFIXES}")


def _outcome(fn: Any, *args: Any) -> tuple[str, object]:
    """What a call gives: its value, or the type and message of what it raised."""
    try:
        return ("value", fn(*args))
    except Exception as exc:  # the comparison covers failures too
        return (type(exc).__name__, str(exc))


# -- strategies ---------------------------------------------------------------------------------

# Pieces that generated text is assembled from: the cases each fast path must not get wrong.
NAME_PIECES = [
    "Ada", "Jean-Luc", "O'Brien", "Valéry", "정", "e\u0301", "ß", "İ", "\uff21", "3", "\u00a0",
    " ", "\t", "\x1c", "\x1f", "\u2028", ".", "_", "ǅ", "Ⅸ", "\u0663", "ﬁ", "ª",
]  # fmt: skip
URL_PIECES = [
    "https://s.example/p", "http://[bad", "?", "&", "=", "#", ";", "+", "%", "%66", "%62", "%20",
    "%zz", "\t", "\n", "\r", " ", "fbclid", "fb", "clid", "gclid", "ttclid", "a", "b", "1", "é",
    "/", ":",
]  # fmt: skip
DOB_PIECES = [
    "1997", "2001", "1899", "9999", "19", "97", "2", "16", "02", "13", "31", "0", "00", "-", "/",
    ".", "T", " ", "10:00", "\u0662\u0660\u0660\u0660", "x",
]  # fmt: skip
PHONE_PIECES = [
    "0", "00", "+", "+49", "49", "1", "151", "1234567", "650", "555", "1212", "(0)", "20", "7946",
    "0958", " ", "-", "ext 3", "\u0660\u0661\u0665\u0661", "\uff10", "0011", "44",
]  # fmt: skip


def _assembled(pieces: list[str], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


ascii_text = st.text(alphabet=st.characters(max_codepoint=127), max_size=30)
mixed_text = st.one_of(ascii_text, st.text(max_size=30), _assembled(NAME_PIECES, 8))
url_text = st.one_of(st.text(max_size=40), _assembled(URL_PIECES, 14))
url_params = st.sampled_from(["fbclid", "gclid", "ttclid", "wbraid", "gbraid", "a", "a b", "a+b"])
dob_text = st.one_of(st.text(max_size=20), _assembled(DOB_PIECES, 7))
phone_text = st.one_of(
    st.text(alphabet="0123456789 +-()", max_size=18), _assembled(PHONE_PIECES, 7)
)
# Shared calling codes (US/CA, GB/JE, RU/KZ), longer ones, regions without one (AQ), and
# international prefixes that start with 00 (AU 0011, BR 0021, KR 001).
regions = st.sampled_from(
    [None, "DE", "US", "CA", "GB", "JE", "FR", "IN", "RU", "KZ", "IE", "AQ", "AU", "BR", "KR"]
)
octet = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "", "\u0663", " 1", "1e1"])
)
ip_text = st.one_of(
    st.lists(octet, min_size=3, max_size=5).map(".".join),
    st.text(alphabet="0123456789.:abcdefABCDEF% ", max_size=20),
)


# -- normalize.py -------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(mixed_text, st.booleans())
def test_letters_fast_path_matches_the_unicode_rule(value: str, keep_spaces: bool) -> None:
    assert normalize._letters(value, keep_spaces=keep_spaces) == _reference_letters(
        value, keep_spaces=keep_spaces
    )


@settings(max_examples=500, deadline=None)
@given(mixed_text)
def test_alnum_fast_path_matches_the_unicode_rule(value: str) -> None:
    assert normalize._alnum(value) == _reference_alnum(value)


@pytest.mark.parametrize("code", range(128))
def test_letters_and_alnum_agree_on_every_ascii_character(code: int) -> None:
    for value in (chr(code), f"a{chr(code)}b", f" {chr(code)} z"):
        assert normalize._alnum(value) == _reference_alnum(value)
        for keep_spaces in (False, True):
            assert normalize._letters(value, keep_spaces=keep_spaces) == _reference_letters(
                value, keep_spaces=keep_spaces
            )


@settings(max_examples=1000, deadline=None)
@given(st.one_of(url_text, st.none(), st.integers()), url_params)
def test_url_param_pre_check_matches_the_full_parse(url: object, param: str) -> None:
    assert normalize.url_param(url, param) == _reference_url_param(url, param)


@pytest.mark.parametrize(
    "url",
    [
        "https://s.example/?%66bclid=enc",
        "https://s.example/?fb\tclid=tab",
        "https://s.example/?fb\nclid=nl",
        "https://s.example/?fbclid=plain",
        "https://s.example/?a+b=plus",
    ],
)
def test_url_param_finds_disguised_keys(url: str) -> None:
    for param in ("fbclid", "a b"):
        assert normalize.url_param(url, param) == _reference_url_param(url, param)
    assert normalize.url_param("https://s.example/?%66bclid=enc", "fbclid") == "enc"
    assert normalize.url_param("https://s.example/?fb\tclid=tab", "fbclid") == "tab"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        dob_text,
        st.dates(min_value=date(1890, 1, 1), max_value=date(datetime.now(UTC).year + 2, 1, 1)),
        st.datetimes(min_value=datetime(1890, 1, 1), max_value=datetime(2100, 1, 1)),
    ),
    st.sampled_from(["meta", "google", "tiktok"]),
)
def test_date_of_birth_matches_strftime(value: str | date, platform: normalize.Platform) -> None:
    assert normalize.date_of_birth(value, platform) == _reference_date_of_birth(value, platform)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        mixed_text,
    )
)
def test_text_matches_the_strip_rule(value: object) -> None:
    assert normalize._text(value) == _reference_text(value)


hex_digest = st.text(alphabet="0123456789abcdefABCDEF", min_size=63, max_size=65)


@settings(max_examples=300, deadline=None)
@given(st.one_of(mixed_text, hex_digest, st.tuples(st.sampled_from(["", " ", "\t"]), hex_digest)))
def test_hashed_length_shortcut_matches_the_digest_check(value: str | tuple[str, str]) -> None:
    text = "".join(value) if isinstance(value, tuple) else value

    def norm(v: str) -> str | None:
        return normalize.name(v, "meta")

    assert normalize.hashed(text, norm) == _reference_hashed(text, norm)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", max_size=20))
def test_a_plus_sign_before_a_zero_never_parses(rest: str) -> None:
    # Why _e164 skips the country-code reading of digits that start with a trunk prefix.
    assert e164._parse("+0" + rest, None) is None


def test_every_region_has_the_calling_code_it_is_listed_under() -> None:
    # Why _e164 skips the country-code reading of digits that do not start with the calling
    # code of the default region: no other calling code can give a number of that region.
    for code, listed in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.items():
        for region in listed:
            if region != "001":  # non-geographic entities have no region of their own
                assert phonenumbers.country_code_for_region(region) == code


# Calling codes (and the start of real numbers) with a region that has that code.
CODE_REGIONS = [
    ("1", "US"), ("1650", "US"), ("1", "CA"), ("44", "GB"), ("4420", "GB"), ("44", "JE"),
    ("49", "DE"), ("4915", "DE"), ("33", "FR"), ("7", "RU"), ("7", "KZ"), ("91", "IN"),
    ("353", "IE"), ("", "DE"),
]  # fmt: skip
ARABIC_INDIC = str.maketrans(
    "0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"
)


@st.composite
def digits_and_region(draw: st.DrawFn) -> tuple[str, str]:
    prefix, region = draw(st.sampled_from(CODE_REGIONS))
    digits = prefix + draw(st.text(alphabet="0123456789", min_size=4, max_size=11))
    if draw(st.booleans()):
        region = draw(st.sampled_from(sorted(phonenumbers.SUPPORTED_REGIONS)))
    if draw(st.integers(0, 4)) == 0:  # phonenumbers reads other digit scripts too
        digits = digits.translate(ARABIC_INDIC)
    return digits, region


@settings(max_examples=1000, deadline=None)
@given(digits_and_region())
def test_a_skipped_country_code_reading_is_never_kept(case: tuple[str, str]) -> None:
    digits, region = case
    if not e164._may_start_with_country_code(digits, region):
        guess = e164._parse("+" + digits, None)
        assert (
            guess is None
            or not phonenumbers.is_valid_number(guess)
            or phonenumbers.region_code_for_number(guess) != region
        )


@settings(max_examples=600, deadline=None)
@given(phone_text, regions)
def test_e164_matches_the_unshortened_reading(value: str, region: str | None) -> None:
    assert e164._e164.__wrapped__(value, region) == _reference_e164(value, region)


# -- adapters -----------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(ip_text)
def test_meta_ipv4_fast_path_matches_ipaddress(text: str) -> None:
    assert meta_capi._ip(text) == _reference_ip(text)


@pytest.mark.parametrize(
    "text", ["0.0.0.0", "255.255.255.255", "203.0.113.5", "01.2.3.4", "1.2.3.256", "::1"]
)
def test_meta_ip_examples(text: str) -> None:
    assert meta_capi._ip(text) == _reference_ip(text)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
        ),
    )
)
def test_google_time_matches_strftime(moment: datetime) -> None:
    assert google_ads.google_time(moment) == _reference_google_time(moment)


name_text = st.one_of(
    st.text(alphabet="abcXYZ019_.-", max_size=45),
    st.sampled_from(ga4.RESERVED_PREFIXES).flatmap(
        lambda prefix: st.text(alphabet="abc_", max_size=5).map(lambda rest: prefix + rest)
    ),
)


@settings(max_examples=400, deadline=None)
@given(name_text)
def test_ga4_cached_name_check_matches_the_rules(name: str) -> None:
    for _ in range(2):  # the second call answers from the cache
        assert _outcome(ga4._check_name, name, "param name") == _outcome(
            _reference_check_name, name, "param name"
        )
