"""Phone numbers to E.164, as ``phonenumbers`` reads them, for the usual shapes much faster.

:func:`e164` is what :func:`destinations.normalize.phone` builds each platform's format from.
``phonenumbers.parse`` costs tens of microseconds a number (pure Python, many regular
expressions); the shapes users type most are read here straight from its public metadata
(:func:`_e164_fast`), with the same answer, and anything else takes the full reading
(:func:`_e164_slow`, the specification). tests/destinations/test_phone_fast_path.py holds the
two together over every region ``phonenumbers`` knows.
"""

from __future__ import annotations

import re
from functools import cache, lru_cache

import phonenumbers

_DIGIT = re.compile(r"\d")
_NON_DIGITS = re.compile(r"\D")


def e164(value: str, region: str | None) -> str | None:
    """``value`` as E.164 (``+4915112345678``), or None when it is not a possible number.

    Args:
        value: the number as the user typed it.
        region: ISO alpha-2 code of the country a number without its country code is read
            in. Without it such a number is read as digits that already start with a country
            code, and kept only if that gives a valid number.
    """
    return _e164(value, region)


# The same number is parsed for every platform of an event; kept small, since the keys are
# raw phone numbers held in memory.
@lru_cache(maxsize=512)
def _e164(value: str, region: str | None) -> str | None:
    # ``phonenumbers.parse`` costs tens of microseconds; the usual shapes are read straight from
    # its metadata instead, and whatever the short cut cannot vouch for takes the full reading.
    try:
        return _e164_fast(value.strip(), region)
    except _Undecided:
        return _e164_slow(value, region)


def _e164_slow(value: str, region: str | None) -> str | None:
    """The full reading with ``phonenumbers``: the specification :func:`_e164_fast` follows."""
    text = value.strip()
    if not _DIGIT.search(text):
        return None
    if text.startswith("+") or text.startswith("00"):
        # Parse the text itself (not just its digits): ``phonenumbers`` drops a written trunk
        # prefix such as the ``(0)`` in ``+44 (0)20 7946 0958``. A leading "00" is the
        # international prefix most people write, whatever their country's: read so first.
        # Where the region's own prefix is longer and matches too (Australia's 0011), that
        # reading is taken instead when the "00" one is no valid number as written: "0011 36 1
        # 234 5678" read as "00" is +1 with a North American trunk "1" dropped. The "00"
        # reading stays first because several regions' patterns take a carrier's digit after
        # "00" (Singapore's 0[0-3]\d, Hong Kong's, Korea's), which would swallow the first
        # digit of "0049 ..." or "0086 ...".
        number = _parse(text if text.startswith("+") else "+" + text[2:], None)
        digits = phonenumbers.normalize_digits_only(text)
        if (
            text.startswith("00")
            and _idd_length(digits, region) not in (None, 2)
            and not (
                number and phonenumbers.is_valid_number(number) and _as_written(number, digits[2:])
            )
        ):
            own = _parse(text, region)
            if own is not None and phonenumbers.is_valid_number(own):
                number = own
        return _format(number) if number and phonenumbers.is_possible_number(number) else None
    # No ``+``: the digits may already start with a country code (``16505551212``,
    # ``4915112345678``). Accept that reading only when it is a valid number in the default
    # country (or in any country when there is none); else read a national number.
    digits = _NON_DIGITS.sub("", text)
    if _may_start_with_country_code(digits, region):
        guess = _parse("+" + digits, None)
        if (
            guess is not None
            and phonenumbers.is_valid_number(guess)
            and region in (None, phonenumbers.region_code_for_number(guess))
        ):
            return _format(guess)
    if region is None:
        return None
    number = _parse(text, region)
    return _format(number) if number and phonenumbers.is_possible_number(number) else None


def _as_written(number: phonenumbers.PhoneNumber, digits: str) -> bool:
    """Whether ``number`` is ``digits`` (a calling code and what follows it) with nothing left
    out: no trunk prefix dropped after the calling code, as ``phonenumbers`` drops one."""
    zeros = "0" * (number.number_of_leading_zeros or 1) if number.italian_leading_zero else ""
    return digits == f"{number.country_code}{zeros}{number.national_number}"


def _idd_length(digits: str, region: str | None) -> int | None:
    """How many leading ``digits`` ``phonenumbers`` reads as ``region``'s international prefix.

    None when the region has none or the digits do not start with it; also when the digit
    after it is 0, where ``phonenumbers`` does not take it for one (no calling code starts
    with 0: ``_parse_prefix_as_idd``).
    """
    idd = _international_prefix(region) if region else None
    match = idd.match(digits) if idd is not None else None
    if match is None or digits[match.end() : match.end() + 1] == "0":
        return None
    return match.end()


@cache
def _international_prefix(region: str) -> re.Pattern[str] | None:
    """The pattern of ``region``'s international (IDD) prefixes: ``00``, ``011``, Australia's
    ``001[14-689]|…``; None for a region ``phonenumbers`` does not know."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
    pattern = metadata.international_prefix if metadata is not None else None
    return re.compile(pattern) if pattern is not None else None


@cache
def _idd_beyond_00(region: str) -> bool:
    """Whether ``region`` has an international prefix other than just ``00``."""
    idd = _international_prefix(region)
    return idd is not None and idd.pattern != "00"


def _may_start_with_country_code(digits: str, region: str | None) -> bool:
    """Whether ``"+" + digits`` can be read as a valid number that :func:`_e164` keeps.

    False only when that reading is bound to be refused, which saves a parse:

    * country calling codes never start with 0, so ``phonenumbers`` refuses "+0…" (the digits
      start with a national trunk prefix, as in ``0151…``);
    * with a region, the reading is kept only when the number's region is that region, so its
      calling code (the leading digits, which ``phonenumbers`` reads from ASCII digits as they
      are) must be the region's: ``6505551212`` cannot be a US number written with its ``1``.
    """
    if digits.startswith("0"):
        return False
    if region is None or not digits.isascii():
        return True
    code = phonenumbers.country_code_for_region(region)
    return code == 0 or digits.startswith(str(code))


def _parse(text: str, region: str | None) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def _format(number: phonenumbers.PhoneNumber) -> str:
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# -- phone: the fast path -----------------------------------------------------------------------
#
# ``_e164_fast`` gives what ``_e164_slow`` gives for the shapes users type most, by doing what
# ``phonenumbers`` does for them step by step on its public metadata (``PhoneMetadata``,
# ``COUNTRY_CODE_TO_REGION_CODE``), compiled once per region; each helper names the
# ``phonenumbers`` code it follows. Anything else raises ``_Undecided``. The equivalence is
# checked over every region in tests/destinations/test_phone_fast_path.py.


class _Undecided(Exception):
    """The fast path cannot vouch for its answer: the full reading must decide."""


# ``phonenumbers`` bounds: a national significant number has 2 to 17 digits, and calling codes
# 1 to 3. Longer or shorter input is left to the full reading, which also refuses text over
# 250 characters.
_MIN_NSN = 2
_MAX_NSN = 17
_FAST_DIGITS = range(3, 21)
_FAST_TEXT_LENGTH = 64
_LENGTHS = range(64)  # every length a national number can have here, stripped or transformed
# Calling codes by their digits (none starts with 0, so the digits are ``str(code)``).
_CALLING_CODES = {str(code): code for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE}


class _PhonePlan:
    """One region's parsing and validation rules, compiled from its ``PhoneMetadata``.

    Attributes:
        code: the country calling code; ``code_text`` is its digits.
        international_prefix: the region's IDD (``00``, ``011``...), None when it has none.
        national_prefix: ``national_prefix_for_parsing``, None when there is none.
        transform: ``national_prefix_transform_rule``, or "".
        general: the general national number pattern, None when there is none.
        keep_lengths: lengths at which a number stripped of its national prefix is kept
            (``_test_number_length`` gives IS_POSSIBLE or TOO_LONG).
        long_lengths: lengths ``_test_number_length`` finds TOO_LONG.
        possible_lengths: lengths ``is_possible_number`` accepts (IS_POSSIBLE or
            IS_POSSIBLE_LOCAL_ONLY), for the region that holds its calling code's rules.
        leading_digits: the ``leading_digits`` pattern, None when there is none.
        type_patterns: per length up to 17, one pattern that fully matches what the pattern
            of one of the number types (fixed line, mobile, toll free...) fully matches; None
            when no type, or the general description, allows the length.
    """

    __slots__ = (
        "code",
        "code_text",
        "general",
        "international_prefix",
        "keep_lengths",
        "leading_digits",
        "long_lengths",
        "national_prefix",
        "possible_lengths",
        "transform",
        "type_patterns",
    )

    def __init__(self, metadata: phonenumbers.PhoneMetadata, code: int) -> None:
        general = metadata.general_desc
        assert general is not None  # checked by _plan_from
        self.code = code
        self.code_text = str(code)
        # An IDD or leading-digits pattern is used whenever it is not None (even if empty); a
        # national prefix or number pattern only when it is not empty.
        self.international_prefix = _compile(metadata.international_prefix, allow_empty=True)
        self.leading_digits = _compile(metadata.leading_digits, allow_empty=True)
        self.national_prefix = _compile(metadata.national_prefix_for_parsing)
        self.transform = metadata.national_prefix_transform_rule or ""
        self.general = _compile(general.national_number_pattern)
        verdicts = {length: _length_verdict(length, general) for length in _LENGTHS}
        self.keep_lengths = frozenset(n for n, v in verdicts.items() if v in {"possible", "long"})
        self.long_lengths = frozenset(n for n, v in verdicts.items() if v == "long")
        self.possible_lengths = frozenset(
            n for n, v in verdicts.items() if v in {"possible", "local"}
        )
        # ``_number_type_helper``: the types it tries, mobile only when its pattern differs.
        kinds = [
            metadata.premium_rate,
            metadata.toll_free,
            metadata.shared_cost,
            metadata.voip,
            metadata.personal_number,
            metadata.pager,
            metadata.uan,
            metadata.voicemail,
            metadata.fixed_line,
        ]
        if not metadata.same_mobile_and_fixed_line_pattern:
            kinds.append(metadata.mobile)
        types = [
            (desc.possible_length, desc.national_number_pattern)
            for desc in kinds
            if desc is not None and desc.national_number_pattern
        ]
        self.type_patterns = tuple(
            _any_of(tuple(p for lengths, p in types if _fits(length, lengths)))
            if self.general is not None and _fits(length, general.possible_length)
            else None
            for length in range(_MAX_NSN + 1)
        )


def _compile(pattern: str | None, *, allow_empty: bool = False) -> re.Pattern[str] | None:
    if pattern is None or (not pattern and not allow_empty):
        return None
    return re.compile(pattern)


@cache  # most lengths of a region, and some regions, share their patterns
def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern that fully matches what one of ``patterns`` fully matches (one call, not ten).

    Raises:
        ValueError: a pattern has groups or flags of its own, so alternatives may interfere.
    """
    if not patterns:
        return None
    for pattern in patterns:
        compiled = re.compile(pattern)
        if compiled.groups or compiled.flags != re.UNICODE:
            raise ValueError(pattern)
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


def _fits(length: int, possible_lengths: tuple[int, ...]) -> bool:
    # ``_is_number_matching_desc``: no lengths listed means any length.
    return not possible_lengths or length in possible_lengths


def _length_verdict(length: int, desc: phonenumbers.PhoneNumberDesc) -> str:
    """``_test_number_length`` for the general description (type UNKNOWN), step by step."""
    possible = desc.possible_length
    if length in desc.possible_length_local_only:
        return "local"
    if possible[0] == length:
        return "possible"
    if possible[0] > length:
        return "short"
    if possible[-1] < length:
        return "long"
    return "possible" if length in possible[1:] else "invalid"


def _plan_from(metadata: phonenumbers.PhoneMetadata | None) -> _PhonePlan | None:
    """The plan for ``metadata``, or None when it breaks an assumption of the fast path."""
    if (
        metadata is None
        or not metadata.country_code
        or metadata.general_desc is None
        or not metadata.general_desc.possible_length  # phonenumbers would fail on it
    ):
        return None
    try:
        plan = _PhonePlan(metadata, metadata.country_code)
    except ValueError:
        return None
    # A transform applies to the last group of the national prefix; without one phonenumbers
    # would fail.
    if plan.transform and plan.national_prefix is not None and not plan.national_prefix.groups:
        return None
    return plan


@cache
def _region_plan(region: str) -> _PhonePlan | None:
    return _plan_from(phonenumbers.PhoneMetadata.metadata_for_region(region, None))


@cache
def _code_plan(code: int) -> _PhonePlan | None:
    """The plan holding a calling code's rules: its main region's, or the non-geographic one's."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code)
    if not regions:
        return None
    return _plan_from(
        phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(code, regions[0])
    )


def _need(plan: _PhonePlan | None) -> _PhonePlan:
    if plan is None:
        raise _Undecided
    return plan


def _e164_fast(text: str, region: str | None) -> str | None:
    """What :func:`_e164_slow` gives for a value (``text``, stripped), without ``phonenumbers``.

    Reads ``+``, ``00`` (or the region's own international prefix that starts so, such as
    Australia's ``0011``) and plain numbers made of ASCII digits and `` ().-/``: a calling code
    with its national number (``+49 151 1234567``, ``0049…``, ``4915112345678``), or a national
    number in the default region (``0151 1234567``, ``(650) 555-1212``).

    Raises:
        _Undecided: for other text, and where the full reading takes a turn this one does not
            follow (an IDD that does not start with ``00``, such as the US ``011``, written
            before a number; a region phonenumbers does not know...).
    """
    if text.startswith("+"):
        body, international = text[1:], True
    elif text.startswith("00"):
        body, international = text[2:], True
    else:
        body, international = text, False
    # Separators that ``phonenumbers`` skips, and that can start neither an extension nor a
    # second number; what is left must be ASCII digits.
    digits = (
        body.replace(" ", "")
        .replace("-", "")
        .replace(".", "")
        .replace("(", "")
        .replace(")", "")
        .replace("/", "")
    )
    if (
        len(text) > _FAST_TEXT_LENGTH
        or len(digits) not in _FAST_DIGITS
        or not (digits.isdecimal() and digits.isascii())
    ):
        raise _Undecided
    # After "00" in a region whose own international prefix can be longer (Australia's
    # 0011), which reading holds is for _e164_slow to tell; most regions' prefix is 00 itself.
    if international and text[0] == "0" and region is not None and _idd_beyond_00(region):
        length = _idd_length("00" + digits, region)
        if length is not None and length != 2:
            raise _Undecided
    if international:
        number = _international(digits)
        if number is None:
            return None
        code, national, main = number
        return f"+{code}{national}" if len(national) in main.possible_lengths else None

    if region is not None and region not in phonenumbers.SUPPORTED_REGIONS:
        raise _Undecided
    plan = None if region is None else _need(_region_plan(region))
    # The digits read as "+" and a calling code (see _may_start_with_country_code).
    if not digits.startswith("0") and (plan is None or digits.startswith(plan.code_text)):
        number = _international(digits)
        if number is not None:
            code, national, _ = number
            found = _valid_region(code, national)
            if found is not None and region in (None, found):
                return f"+{code}{national}"
    if plan is None:
        return None
    # The national reading: ``parse(text, region)``.
    if plan.international_prefix is not None and plan.international_prefix.match(digits):
        raise _Undecided  # an IDD (``011…`` in the US), read as an international number
    main = _need(_code_plan(plan.code))  # the rules ``is_possible_number`` reads
    nsn = _national(digits, plan, main)
    if nsn is None or not _MIN_NSN <= len(nsn) <= _MAX_NSN:
        return None
    return f"+{plan.code}{nsn}" if len(nsn) in main.possible_lengths else None


def _international(digits: str) -> tuple[int, str, _PhonePlan] | None:
    """The calling code and national significant number ``parse("+" + digits)`` gives.

    With them, the plan of the calling code's main region, which ``parse`` and
    ``is_possible_number`` read. None where ``parse`` raises. ``digits`` are 3 or more ASCII
    digits (as ``parse`` demands after a "+"), so the leading zeros of the national number are
    kept as they are (``italian_leading_zero``) and E.164 is "+", the code and this number.
    """
    # ``_extract_country_code``: the shortest known code that the digits start with.
    for size in (1, 2, 3):
        code = _CALLING_CODES.get(digits[:size])
        if code is not None:
            break
    else:
        return None
    national = digits[size:]
    if len(national) < _MIN_NSN:
        return None
    main = _need(_code_plan(code))
    national = _national_significant_number(national, main)
    return (code, national, main) if _MIN_NSN <= len(national) <= _MAX_NSN else None


def _national(digits: str, plan: _PhonePlan, main: _PhonePlan) -> str | None:
    """The national significant number ``parse`` reads from ``digits`` in ``plan``'s region.

    ``main`` is the plan of the main region of its calling code. None where ``parse`` raises.
    """
    # ``_maybe_extract_country_code``: digits that start with the region's calling code lose it
    # when only then do they match the general pattern, or when they are too long with it; the
    # rest is then read with the main region's rules.
    if digits.startswith(plan.code_text):
        rest = _strip_national_prefix(digits[len(plan.code_text) :], plan)
        fits_only_without = not _fullmatches(plan.general, digits) and _fullmatches(
            plan.general, rest
        )
        if fits_only_without or len(digits) in plan.long_lengths:
            return _national_significant_number(rest, main) if len(rest) >= _MIN_NSN else None
    return _national_significant_number(digits, plan)


def _fullmatches(pattern: re.Pattern[str] | None, text: str) -> bool:
    # ``_match_national_number``: no pattern matches nothing.
    return pattern is not None and pattern.fullmatch(text) is not None


def _national_significant_number(number: str, plan: _PhonePlan) -> str:
    # ``parse``: the national prefix is dropped only when what is left has a length that is
    # possible, or too long, for the region.
    stripped = _strip_national_prefix(number, plan)
    if len(stripped) >= len(_LENGTHS):
        raise _Undecided
    return stripped if len(stripped) in plan.keep_lengths else number


def _strip_national_prefix(number: str, plan: _PhonePlan) -> str:
    # ``_maybe_strip_national_prefix_carrier_code``: the prefix goes (or is transformed, as in
    # ``5551234`` -> ``2685551234`` in Antigua) unless that turns a number matching the general
    # pattern into one that does not.
    pattern, general = plan.national_prefix, plan.general
    match = pattern.match(number) if pattern is not None and number else None
    if match is None:
        return number
    if not plan.transform or match.groups()[-1] is None:
        result = number[match.end() :]
    else:
        assert pattern is not None  # matched above
        result = pattern.sub(plan.transform, number, count=1)
    if _fullmatches(general, number) and not _fullmatches(general, result):
        return number
    return result


def _valid_region(code: int, national: str) -> str | None:
    """The region ``region_code_for_number`` gives when ``is_valid_number`` holds, else None."""
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE[code]
    if len(regions) == 1:
        region = regions[0]
    else:
        # ``_region_code_for_number_from_list``: the first region whose leading digits start
        # the number, or (when it has none) for which it is valid.
        for candidate in regions:
            plan = _need(_region_plan(candidate))
            if plan.leading_digits is None:
                if _has_known_type(national, plan):
                    # ``is_valid_number_for_region`` would run the same test on the same plan.
                    return candidate if plan.code == code else None
            elif plan.leading_digits.match(national):
                region = candidate
                break
        else:
            return None
    # ``is_valid_number_for_region``.
    if region == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
        plan = _need(_code_plan(code))
    else:
        plan = _need(_region_plan(region))
        if plan.code != code:
            return None
    return region if _has_known_type(national, plan) else None


def _has_known_type(national: str, plan: _PhonePlan) -> bool:
    # ``_number_type_helper(...) != UNKNOWN``: the general description and one type match.
    types = plan.type_patterns[len(national)]
    return _fullmatches(types, national) and _fullmatches(plan.general, national)
