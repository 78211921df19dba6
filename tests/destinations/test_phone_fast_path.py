"""The phone fast path gives exactly what the full ``phonenumbers`` reading gives.

``e164._e164_slow`` is the reading with ``phonenumbers.parse`` (the specification);
``e164._e164`` reads the usual shapes (``+49 151 1234567``, ``0049…``, ``4915112345678``,
``0151 1234567`` in Germany) from phonenumbers' metadata and leaves the rest to the full reading.
The two are compared on the example numbers of every region and non-geographic calling code
phonenumbers knows, as people write them (with digits changed, added or dropped), with and
without a default region, and on junk.
"""

from __future__ import annotations

from functools import cache

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destinations import e164, normalize

PNF = phonenumbers.PhoneNumberFormat
REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
NON_GEO = "001"


def _new(value: str, region: str | None) -> str | None:
    return e164._e164.__wrapped__(value, region)


def _old(value: str, region: str | None) -> str | None:
    return e164._e164_slow(value, region)


def _decided(value: str, region: str | None) -> bool:
    """Whether the fast path answers by itself, without the full reading."""
    try:
        e164._e164_fast(value.strip(), region)
    except e164._Undecided:
        return False
    return True


@cache
def _examples() -> tuple[tuple[str, phonenumbers.PhoneNumber], ...]:
    """(region, number): phonenumbers' example numbers of every type, region and global code."""
    found = [
        (region, number)
        for region in REGIONS
        for kind in phonenumbers.PhoneNumberType.values()
        if kind != phonenumbers.PhoneNumberType.UNKNOWN
        if (number := phonenumbers.example_number_for_type(region, kind)) is not None
    ]
    for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS):
        number = phonenumbers.example_number_for_non_geo_entity(code)
        if number is not None:
            found.append((NON_GEO, number))
    return tuple(found)


def _usual_forms(region: str, number: phonenumbers.PhoneNumber) -> list[tuple[str, str | None]]:
    """The ways a number is usually written, each with the default region it comes with."""
    code = str(number.country_code)
    nsn = phonenumbers.national_significant_number(number)
    own = None if region == NON_GEO else region
    forms: list[tuple[str, str | None]] = [
        (phonenumbers.format_number(number, PNF.E164), None),
        (phonenumbers.format_number(number, PNF.INTERNATIONAL), None),
        (phonenumbers.format_number(number, PNF.INTERNATIONAL), own),
        (f"00{code} {nsn}", None),
        (code + nsn, None),
        (code + nsn, own),
    ]
    if own is not None:
        forms.append((phonenumbers.format_number(number, PNF.NATIONAL), own))
    return forms


# -- the reference: platforms.md §7 and the cases phonenumbers treats specially -------------------

CASES = [
    # platforms.md §7.1, §7.2, §7.4
    ("(650)555-1212", "US", "+16505551212"),
    ("(800)555-0100", "US", "+18005550100"),
    ("+1 (650) 555-1212", None, "+16505551212"),
    ("+44 (0)20 7946 0958", None, "+442079460958"),  # the written trunk prefix goes
    ("0044 20 7946 0958", None, "+442079460958"),
    ("0044 20 7946 0958", "DE", "+442079460958"),  # 00: Germany's international prefix
    ("0044 20 7946 0958", "AU", "+442079460958"),  # not Australia's (0011), read as 00 still
    ("0044 20 7946 0958", "US", "+442079460958"),  # nor the US's (011)
    ("0011 0 20 7946 0958", "AU", None),  # no calling code starts with 0: not Australia's IDD
    ("+44 844 412 4653", None, "+448444124653"),
    ("650.555.1212", "US", "+16505551212"),
    # digits with the calling code, with and without a default region
    ("4915112345678", None, "+4915112345678"),
    ("4915112345678", "DE", "+4915112345678"),
    ("16505551212", "US", "+16505551212"),
    ("+4915112345678", "US", "+4915112345678"),  # a "+" number ignores the default region
    # national numbers in their region
    ("0151 12345678", "DE", "+4915112345678"),
    ("0151/12345678", "DE", "+4915112345678"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("0412 345 678", "AU", "+61412345678"),
    ("03-1234-5678", "JP", "+81312345678"),
    ("98765 43210", "IN", "+919876543210"),
    ("(650) 555-1212", None, None),  # national, and no region to read it in
    ("+1 2345 6789 0123 4567 89", None, None),  # more than 17 national digits
    ("12345678901234567890", None, None),
    # Italian leading zeros are part of the number; the Vatican shares +39
    ("+39 06 6988 1234", None, "+390669881234"),
    ("06 6988 1234", "IT", "+390669881234"),
    ("390669881234", None, "+390669881234"),
    ("0669812345", "VA", "+390669812345"),
    # shared calling codes: NANPA, +7 (Russia, Kazakhstan), +44 (Jersey)
    ("613 555 0123", "CA", "+16135550123"),
    ("8 (912) 345-67-89", "RU", "+79123456789"),
    ("8 (701) 123-45-67", "KZ", "+77011234567"),
    ("77011234567", None, "+77011234567"),
    ("441534456789", None, "+441534456789"),
    ("01534 456789", "JE", "+441534456789"),
    ("79123456789", "KZ", None),  # a Russian number, without "+", in Kazakhstan
    # national prefix transforms: Antigua's local numbers, Brazil's carrier codes
    ("460 1234", "AG", "+12684601234"),
    ("0 15 11 91234-5678", "BR", "+5511912345678"),
    # a non-geographic calling code
    ("+800 1234 5678", None, "+80012345678"),
    ("80012345678", None, "+80012345678"),
]


@pytest.mark.parametrize(("value", "region", "expected"), CASES)
def test_usual_shapes_are_read_by_the_fast_path_as_phonenumbers_reads_them(
    value: str, region: str | None, expected: str | None
) -> None:
    assert _decided(value, region)
    assert _new(value, region) == _old(value, region) == expected


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("+1 650 555 1212 ext 5", None, "+16505551212"),  # letters
        ("011 49 151 12345678", "US", "+4915112345678"),  # the US IDD before a number
        # "00" where the region's own international prefix can be longer: read as 00 when
        # that gives a valid number, else with the region's prefix (Australia's 0011)
        ("0011 44 20 7946 0958", "AU", "+442079460958"),  # Australia's, not 00 followed by 11
        ("0011 44 20 7946 0958", "CX", "+442079460958"),  # Christmas Island shares it
        ("0014 44 20 7946 0958", "AU", "+442079460958"),  # another of Australia's
        ("0021 44 20 7946 0958", "BR", "+442079460958"),  # Brazil's, with a carrier code
        ("001 44 20 7946 0958", "KR", "+442079460958"),
        # read as 00 only with a North American trunk "1" dropped: +1 361 234 5678
        ("0011 36 1 234 5678", "AU", "+3612345678"),
        ("0011 354 611 1234", "AU", "+3546111234"),
        ("0011 353 22 12345", "AU", "+3532212345"),
        ("0011 32 12 34 56 78", "AU", "+3212345678"),
        ("0011 47 82 01 23 45", "AU", "+4782012345"),
        ("0011 507 200 1234", "AU", "+5072001234"),
        # ... whose patterns take a carrier's digit after 00: not the calling code's first
        ("0049 151 12345678", "SG", "+4915112345678"),  # Singapore's 0[0-3]\d
        ("0044 20 7946 0958", "SG", "+442079460958"),
        ("0061 412 345 678", "SG", "+61412345678"),
        ("0086 138 0013 8000", "HK", "+8613800138000"),
        ("0086 138 0013 8000", "KR", "+8613800138000"),
        ("00 971 50 123 4567", "KR", "+971501234567"),
        ("0065 9123 4567", "TH", "+6591234567"),
        ("0151 12345678", "de", None),  # a region phonenumbers does not know
        ("0151 12345678", "AQ", None),
        ("\uff10\uff11\uff15\uff11 12345678", "DE", "+4915112345678"),  # full-width digits
        ("+49\u00a0151\u00a012345678", None, "+4915112345678"),  # no-break spaces
        ("+49\t151 12345678", None, None),  # a tab is not phone punctuation
        ("12", "DE", "+4912"),  # too few digits for the fast path (a local-only length)
        ("n/a", "US", None),
    ],
)
def test_other_shapes_are_left_to_the_full_reading(
    value: str, region: str | None, expected: str | None
) -> None:
    assert not _decided(value, region)
    assert _new(value, region) == _old(value, region) == expected


def test_the_cached_reading_and_phone_use_the_fast_path() -> None:
    assert e164._e164("+49 151 12345678", None) == "+4915112345678"
    assert normalize.phone("0151 12345678", "meta", "Germany") == "4915112345678"
    assert normalize.phone("0151 12345678", "google", "DE") == "+4915112345678"


# -- every region -------------------------------------------------------------------------------


def test_every_example_number_reads_the_same_in_every_usual_form() -> None:
    # Arrange
    cases = [form for example in _examples() for form in _usual_forms(*example)]

    # Act
    differences = [(v, r, _new(v, r), _old(v, r)) for v, r in cases if _new(v, r) != _old(v, r)]
    undecided = [(v, r) for v, r in cases if not _decided(v, r)]

    # Assert
    assert len({region for region, _ in _examples()}) == len(REGIONS) + 1  # + non-geographic
    assert differences == []
    assert undecided == []  # and the fast path reads them all by itself


def test_shared_calling_codes_read_the_same_with_each_region_as_default() -> None:
    # Digits with the calling code are kept only if valid in the default region; otherwise
    # phonenumbers reads them as a national number that may start with the calling code.
    cases = [
        (phonenumbers.format_number(number, PNF.E164)[1:], default)
        for region, number in _examples()
        if len(regions := phonenumbers.COUNTRY_CODE_TO_REGION_CODE[number.country_code]) > 1
        for default in regions
    ]

    differences = [(v, r, _new(v, r), _old(v, r)) for v, r in cases if _new(v, r) != _old(v, r)]

    assert len(cases) > 4000
    assert differences == []


def test_possible_lengths_are_those_of_is_possible_number() -> None:
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        plan = e164._code_plan(code)
        assert plan is not None
        for length in range(1, 21):
            number = phonenumbers.PhoneNumber(country_code=code, national_number=int("9" * length))
            assert (length in plan.possible_lengths) == phonenumbers.is_possible_number(number)


def _written_idds() -> list[tuple[str, str]]:
    """(region, an international prefix as written there): the region's preferred one, else
    its pattern when that is plain digits."""
    found = []
    for region in REGIONS:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        pattern = metadata.international_prefix if metadata else None
        written = metadata.preferred_international_prefix if metadata else None
        written = written or (pattern if pattern and pattern.isdigit() else None)
        if written:
            found.append((region, written))
    return found


def test_every_regions_international_prefix_is_read_as_phonenumbers_reads_it() -> None:
    # Arrange: a London number dialled from every region with its own prefix (00, 011, 0011,
    # 810...), and a number of the region's own calling code
    cases = [
        (f"{idd} {code} {nsn}", region)
        for region, idd in _written_idds()
        for code, nsn in (("44", "20 7946 0958"), ("49", "151 12345678"))
    ]

    # Act
    read = [(v, r, _new(v, r), _old(v, r), _phonenumbers(v, r)) for v, r in cases]

    # Assert
    assert len(cases) > 400
    assert [case for case in read if not case[2] == case[3] == case[4]] == []


def _phonenumbers(value: str, region: str) -> str | None:
    number = e164._parse(value, region)
    if number is None or not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, PNF.E164)


def test_every_region_has_a_plan() -> None:
    # A region without a plan would send all its numbers to the full reading.
    assert [r for r in REGIONS if e164._region_plan(r) is None] == []


# -- generated numbers --------------------------------------------------------------------------

SEPARATORS = st.sampled_from(["", " ", "-", ".", "/", ") (", " - "])
# What may come before the national number: a calling code (after "+", "00" or nothing), a
# national prefix, both, or stray digits.
LEADS = st.sampled_from(
    [
        "+{code}",
        "+{code} ",
        "+{code} (0)",
        "+ {code}-",
        "00{code}",
        "00 {code} ",
        "{code}",
        "{code} ",
        "{code}{trunk}",
        "",
        "{trunk}",
        "({trunk}",
        "1",
        "8",
        "0",
    ]
)
# Regions that share a calling code with others.
SHARED = sorted(
    {r for rs in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.values() if len(rs) > 1 for r in rs}
)
ANY_REGION = st.sampled_from(REGIONS)
# No default region, the number's own, one that shares its calling code, or any.
DEFAULTS = st.one_of(st.none(), st.just("own"), st.sampled_from(SHARED), ANY_REGION)
GROUP_SIZES = st.lists(st.integers(1, 4), max_size=5)
EXAMPLES = st.deferred(lambda: st.sampled_from(_examples()))
DIGITS = st.sampled_from("0123456789")
EDITS = st.lists(
    st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 20), DIGITS),
    max_size=3,
)


def _grouped(digits: str, sizes: list[int], separator: str) -> str:
    groups, start = [], 0
    for size in sizes:
        if start < len(digits):
            groups.append(digits[start : start + size])
            start += size
    groups.append(digits[start:])
    return separator.join(g for g in groups if g)


@st.composite
def written_numbers(draw: st.DrawFn) -> tuple[str, str | None]:
    """An example number, maybe changed, written with or without its calling code."""
    region, number = draw(EXAMPLES)
    digits = list(phonenumbers.national_significant_number(number))
    for edit, position, digit in draw(EDITS):  # a typo, a digit too many or too few
        at = min(position, len(digits))
        if edit == "insert" or not digits:
            digits.insert(at, digit)
        elif edit == "replace":
            digits[min(at, len(digits) - 1)] = digit
        else:
            del digits[min(at, len(digits) - 1)]
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        number.country_code, region
    )
    trunk = (metadata.national_prefix if metadata else None) or "0"
    lead = draw(LEADS).format(code=number.country_code, trunk=trunk)
    text = lead + _grouped("".join(digits), draw(GROUP_SIZES), draw(SEPARATORS))
    default = draw(DEFAULTS)
    if default == "own":
        default = None if region == NON_GEO else region
    return text, default


@settings(max_examples=1500, deadline=None)
@given(written_numbers())
def test_written_numbers_read_the_same(case: tuple[str, str | None]) -> None:
    value, region = case
    assert _new(value, region) == _old(value, region)


@st.composite
def numbers_after_an_idd(draw: st.DrawFn) -> tuple[str, str]:
    """A written number after an international prefix of the default region (any of those
    its pattern allows: Australia's 0011 or 0014, Brazil's 0021...), or after 00."""
    region = draw(ANY_REGION)
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    pattern = metadata.international_prefix if metadata else None
    idd = "00"
    if pattern and draw(st.booleans()):
        idd = draw(st.from_regex(f"(?:{pattern})", fullmatch=True, alphabet="0123456789"))
    text, _ = draw(written_numbers())
    return idd + draw(st.sampled_from(["", " "])) + text.lstrip("+"), region


@settings(max_examples=800, deadline=None)
@given(numbers_after_an_idd())
def test_numbers_after_an_international_prefix_read_the_same(case: tuple[str, str]) -> None:
    value, region = case
    assert _new(value, region) == _old(value, region)


digits_text = st.text(alphabet="0123456789", min_size=1, max_size=22)
lead = st.sampled_from(["", "", "+", "00", "0", "+0", "1", "7", "44", "8"])
regions = st.one_of(st.none(), ANY_REGION)


@settings(max_examples=600, deadline=None)
@given(lead, digits_text, regions)
def test_random_digits_read_the_same(prefix: str, digits: str, region: str | None) -> None:
    value = prefix + digits
    assert _new(value, region) == _old(value, region)


junk = st.one_of(
    st.text(alphabet="0123456789 +-().,/#*;:xXet\t\u00a0\uff0b\uff10\u0660\u2013", max_size=24),
    st.text(max_size=16),
)


@settings(max_examples=400, deadline=None)
@given(junk, st.one_of(regions, st.sampled_from(["de", "AQ", "ZZ", NON_GEO, ""])))
def test_junk_reads_the_same(value: str, region: str | None) -> None:
    assert _new(value, region) == _old(value, region)


@settings(max_examples=500, deadline=None)
@given(st.one_of(digits_text, written_numbers().map(lambda case: case[0])))
def test_reading_after_a_plus_and_validity_follow_phonenumbers(text: str) -> None:
    # The two steps the fast path rebuilds, checked on their own: parse("+" + digits), then
    # is_valid_number with region_code_for_number.
    digits = "".join(ch for ch in text if ch in "0123456789")
    if len(digits) not in e164._FAST_DIGITS:
        return
    number = e164._parse("+" + digits, None)
    read = e164._international(digits)
    if number is None:
        assert read is None
        return
    assert read is not None
    code, national, _ = read
    assert (code, national) == (
        number.country_code,
        phonenumbers.national_significant_number(number),
    )
    valid = phonenumbers.is_valid_number(number)
    assert e164._valid_region(code, national) == (
        phonenumbers.region_code_for_number(number) if valid else None
    )
