"""Normalization and hashing per platform: the vectors of reference/platforms.md §7."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

import pytest

from destinations import normalize
from destinations.normalize import Platform

Fn = Callable[[str], str | None]


def _fn(field: str, platform: Platform, country: str | None = None) -> Fn:
    """The normalizer of ``field`` for ``platform`` as a one-argument function."""
    table: dict[str, Fn] = {
        "email": lambda v: normalize.email(v, platform),
        "phone": lambda v: normalize.phone(v, platform, country),
        "name": lambda v: normalize.name(v, platform),
        "gender": lambda v: normalize.gender(v, platform),
        "dob": lambda v: normalize.date_of_birth(v, platform),
        "city": lambda v: normalize.city(v, platform),
        "street": lambda v: normalize.street(v, platform),
        "state": lambda v: normalize.state(v, platform, country),
        "zip": lambda v: normalize.postal_code(v, platform, country),
        "country": lambda v: normalize.country(v, platform),
        "external_id": lambda v: normalize.external_id(v, platform),
    }
    return table[field]


# (platform, field, default country, input, normalized, SHA-256): §7.1, §7.2, §7.3 docs rows, §7.4
VECTORS = [
    # §7.1 official published vectors
    ("meta", "email", None, "John_Smith@gmail.com", "john_smith@gmail.com",
     "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"),
    ("meta", "phone", "US", "(650)555-1212", "16505551212",
     "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"),
    ("meta", "name", None, "Mary", "mary",
     "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"),
    ("meta", "name", None, "Valéry", "valéry",
     "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"),
    ("meta", "name", None, "정", "정",
     "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"),
    ("meta", "dob", None, "2/16/1997", "19970216",
     "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c"),
    ("meta", "country", None, "United States", "us",
     "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"),
    ("google", "email", None, "cloudy.sanfrancisco+shopping@gmail.com",
     "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    ("google", "email", None, "user.name+NYC@Example.com", "user.name+nyc@example.com",
     "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac"),
    ("google", "phone", "US", "(800)555-0100", "+18005550100",
     "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"),
    # §7.2 same input, different platforms
    ("meta", "email", None, "  John.Doe@Gmail.com ", "john.doe@gmail.com",
     "375320dd9ae7ed408002f3768e16cb5f28c861062fd50dff9a3bff62e9dce4ef"),
    ("tiktok", "email", None, "  John.Doe@Gmail.com ", "john.doe@gmail.com",
     "375320dd9ae7ed408002f3768e16cb5f28c861062fd50dff9a3bff62e9dce4ef"),
    ("google", "email", None, "  John.Doe@Gmail.com ", "johndoe@gmail.com",
     "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"),
    ("meta", "email", None, "John.Doe+promo@Gmail.com", "john.doe+promo@gmail.com",
     "80f9126efd0446cb338c54ea6fe3d4af8fa3fe93db0024b14150441550e632a2"),
    ("google", "email", None, "John.Doe+promo@Gmail.com", "johndoe@gmail.com",
     "06a240d11cc201676da976f7b49341181fd180da37cbe40a77432c0a366c80c3"),
    ("google", "email", None, "John.Doe+promo@GoogleMail.com", "johndoe@googlemail.com",
     "f07280f43150f779598094600662ad3c94d7c0a78c78b15c4056e4a38df260b9"),
    ("google", "email", None, "Jane.Doe+news@Example.com", "jane.doe+news@example.com",
     "dbf1912b4cad4df9823f627874244e64b50a6ac550b9cb33b17df671a26679db"),
    ("meta", "phone", None, "+1 (650) 555-1212", "16505551212",
     "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"),
    ("google", "phone", None, "+1 (650) 555-1212", "+16505551212",
     "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"),
    ("tiktok", "phone", None, "+1 (650) 555-1212", "+16505551212",
     "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"),
    ("meta", "phone", None, "+44 (0)20 7946 0958", "442079460958",
     "35e206e5dec4c89b9e8b71b8c32724a5bb518483ac5a20c6617d738375b3b823"),
    ("google", "phone", None, "+44 (0)20 7946 0958", "+442079460958",
     "f0bf0228144d9fe2bdf1da2d8ca698f17bf1410ee688b075c27062e47b6f0b6d"),
    ("tiktok", "phone", None, "+44 (0)20 7946 0958", "+442079460958",
     "f0bf0228144d9fe2bdf1da2d8ca698f17bf1410ee688b075c27062e47b6f0b6d"),
    ("meta", "phone", None, "0044 20 7946 0958", "442079460958",
     "35e206e5dec4c89b9e8b71b8c32724a5bb518483ac5a20c6617d738375b3b823"),
    # §7.3 Meta docs rules
    ("meta", "name", None, " Mary ", "mary",
     "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"),
    ("meta", "name", None, "Jean-Luc", "jeanluc",
     "7fef38066db9900f992fa9926eea8cc648f44c2af50c4d511c415422196c8ef5"),
    ("meta", "name", None, "O'Brien", "obrien",
     "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"),
    ("meta", "gender", None, "Female", "f",
     "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111"),
    ("meta", "dob", None, "1997-02-16", "19970216",
     "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c"),
    ("meta", "city", None, "South San Francisco", "southsanfrancisco",
     "e6a4de398edea64e0e057033d684bebe76c975d00b1c919471703d318fb05d7f"),
    ("meta", "city", None, "St. Louis", "stlouis",
     "8ba24bdf99947996f3000259be455de791b06fcc0e802ce05031030df1ee8ea3"),
    ("meta", "city", None, "Val-d'Or", "valdor",
     "f0c98c20d4ec7bf8bb40e321a0dd5da4379130f9304e3739927b1ff912a60158"),
    ("meta", "state", None, "California", "ca",
     "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"),
    ("meta", "state", None, "N.Y.", "ny",
     "1b06e2003f8420d6fa42badd8f77ec0f706b976b7a48b13c567dc5a559681683"),
    ("meta", "zip", None, "94035-1234", "94035",
     "1794327a4d443904421f5ca1f3d72d0a62ba2f0770d80755ec2220fc0efb052e"),
    ("meta", "zip", None, "M1 1AE", "m11ae",
     "1dc694c2070e697769fb959b50671d76cafd430d8ca191fbdd0affcaea344ac5"),
    ("meta", "zip", None, "00-950", "00950",
     "157c5bb53cacd69115a429c3a9257890995f3410caf57a12e1959f70c7b3fbec"),
    ("meta", "country", None, "US", "us",
     "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"),
    ("meta", "external_id", None, "user-42", "user-42",
     "6d894aa3ee802549d7f340e7c1cf0d1c1cb14cd84f768d92ffaa6785337c4997"),
    # §7.4 other platforms
    ("google", "name", None, "  Mary ", "mary",
     "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"),
    ("google", "name", None, "O'Brien", "obrien",
     "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"),
    ("google", "email", None, "Cloudy.SanFrancisco+shopping@gmail.com",
     "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    ("google", "street", None, "1600 Amphitheatre Pkwy.", "1600 amphitheatre pkwy",
     "22b7e2d69b91e0ef4a88e81a73d897b92fd9c93ccfbe0a860f77db16c26f662e"),
    ("tiktok", "external_id", None, " User-42 ", "User-42",
     "fafe5e551759817bdc65038b8cb1a8263b1a8b3b60c269d67ff0f8c57ae0f733"),
]  # fmt: skip

# (platform, field, default country, input, a wrong normalization that must never come out):
# the SDK and sample-code rows of §7 that contradict the documented rules, and each platform's
# format for another platform's rule (§0's traps).
WRONG = [
    ("google", "email", None, "Jane.Doe+news@Example.com", "janedoenews@example.com"),
    ("google", "email", None, "user.name+NYC@Example.com", "usernamenyc@example.com"),
    ("meta", "phone", None, "+44 (0)20 7946 0958", "4402079460958"),
    ("meta", "name", None, "Jean-Luc", "jean-luc"),
    ("meta", "state", None, "California", "california"),
    ("meta", "dob", None, "1997-02-16", "1997-02-16"),
    ("meta", "zip", None, "00-950", "00"),
    ("meta", "city", None, "Val-d'Or", "vald'or"),
    ("meta", "phone", "US", "(650)555-1212", "6505551212"),  # no country code added
    ("meta", "zip", "US", "940351234", "940351234"),  # a 9-digit US ZIP not cut to 5
    ("meta", "country", None, "United States", None),  # read as "us", not refused as the SDK does
    ("tiktok", "email", None, "John.Doe+promo@Gmail.com", "johndoe@gmail.com"),  # Google's rule
    ("meta", "phone", None, "+1 (650) 555-1212", "+16505551212"),  # Google's format
    ("google", "phone", None, "+1 (650) 555-1212", "16505551212"),  # Meta's format
]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v[0]}-{v[1]}-{v[3].strip()}")
def test_documented_vector_normalizes_and_hashes_as_published(
    vector: tuple[Platform, str, str | None, str, str, str],
) -> None:
    # Arrange
    platform, field, country, raw, normal, digest = vector
    normalizer = _fn(field, platform, country)

    # Act
    normalized = normalizer(raw)
    hashed = normalize.hashed(raw, normalizer)

    # Assert
    assert normalized == normal
    assert hashed == digest


@pytest.mark.parametrize(("platform", "field", "country", "raw", "wrong"), WRONG)
def test_sdk_and_sample_code_normalizations_are_not_reproduced(
    platform: Platform, field: str, country: str | None, raw: str, wrong: str | None
) -> None:
    assert _fn(field, platform, country)(raw) != wrong


def test_sha256_hex_is_64_lowercase_hex_of_utf8() -> None:
    assert normalize.sha256_hex("valéry") == (
        "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"
    )


def test_prehashed_value_passes_through_lowercased_and_is_not_hashed_again() -> None:
    # Arrange
    digest = "62A14E44F765419D10FEA99367361A727C12365E2520F32218D505ED9AA0F62F"

    # Act
    result = normalize.hashed(f" {digest} ", lambda v: normalize.email(v, "meta"))

    # Assert
    assert result == digest.lower()


def test_is_hashed_recognizes_only_64_hex_characters() -> None:
    assert normalize.is_hashed("a" * 64)
    assert normalize.is_hashed("A" * 64)
    assert not normalize.is_hashed("a" * 32)
    assert not normalize.is_hashed("g" * 64)
    assert not normalize.is_hashed(None)


@pytest.mark.parametrize("raw", [None, "", "   ", "not-an-email", True, {"a": 1}])
def test_hashed_gives_none_when_there_is_nothing_to_hash(raw: object) -> None:
    assert normalize.hashed(raw, lambda v: normalize.email(v, "meta")) is None


def test_hashed_values_hashes_each_element_of_a_list_and_drops_duplicates() -> None:
    # Arrange
    raw = ["A@example.com", " a@example.com", "b@example.com", "broken"]

    # Act
    result = normalize.hashed_values(raw, lambda v: normalize.email(v, "meta"))

    # Assert
    assert result == [
        normalize.sha256_hex("a@example.com"),
        normalize.sha256_hex("b@example.com"),
    ]


def test_meta_phone_is_digits_with_country_code_without_plus() -> None:
    assert normalize.phone("+49 151 12345678", "meta") == "4915112345678"


def test_google_and_tiktok_phone_is_e164_with_plus() -> None:
    assert normalize.phone("+49 151 12345678", "google") == "+4915112345678"
    assert normalize.phone("+49 151 12345678", "tiktok") == "+4915112345678"


def test_national_phone_is_read_in_the_default_country() -> None:
    assert normalize.phone("0151 12345678", "tiktok", "DE") == "+4915112345678"
    assert normalize.phone("0151 12345678", "meta", "Germany") == "4915112345678"


def test_an_international_prefix_is_the_default_countrys_own() -> None:
    # Australia's is 0011 (phonenumbers' reading), not 00 followed by 11
    assert normalize.phone("0011 44 20 7946 0958", "google", "AU") == "+442079460958"
    assert normalize.phone("0011 44 20 7946 0958", "meta", "AU") == "442079460958"


def test_national_phone_without_a_default_country_is_left_out() -> None:
    assert normalize.phone("(650) 555-1212", "meta") is None


def test_phone_digits_that_start_with_the_country_code_are_kept_whole() -> None:
    assert normalize.phone("4915112345678", "google", "DE") == "+4915112345678"
    assert normalize.phone("16505551212", "meta", "US") == "16505551212"


def test_phone_without_digits_is_left_out() -> None:
    assert normalize.phone("n/a", "meta", "US") is None


def test_gmail_dot_and_plus_rule_applies_to_google_only() -> None:
    raw = "J.Doe+x@gmail.com"
    assert normalize.email(raw, "google") == "jdoe@gmail.com"
    assert normalize.email(raw, "meta") == "j.doe+x@gmail.com"
    assert normalize.email(raw, "tiktok") == "j.doe+x@gmail.com"


@pytest.mark.parametrize(
    ("raw", "platform", "expected"),
    [
        ("Germany", "meta", "de"),
        ("Deutschland", "tiktok", "de"),
        ("germany", "google", "DE"),
        ("UK", "meta", "gb"),
        ("USA", "google", "US"),
        ("United States of America", "meta", "us"),
        ("fr", "google", "FR"),
        ("Côte d'Ivoire", "meta", "ci"),
        ("DEU", "meta", "de"),  # ISO 3166-1 alpha-3
        ("GBR", "google", "GB"),
        ("fra", "tiktok", "fr"),
        ("CAN", "google", "CA"),
    ],
)
def test_country_names_and_codes_become_alpha2_in_the_platform_case(
    raw: str, platform: Platform, expected: str
) -> None:
    assert normalize.country(raw, platform) == expected


# Names people write that the ISO names in ``pycountry`` do not give: English short, former and
# older names, parts of a country, and "The"/"St" forms. Each was None before it was added.
USUAL_COUNTRY_NAMES = [
    ("Turkey", "tr"),  # pycountry: Türkiye
    ("UAE", "ae"),
    ("Cape Verde", "cv"),  # Cabo Verde
    ("Swaziland", "sz"),  # Eswatini
    ("Burma", "mm"),  # Myanmar
    ("Macedonia", "mk"),  # North Macedonia
    ("Britain", "gb"),
    ("Korea", "kr"),
    ("Korea, North", "kp"),
    ("Vatican", "va"),
    ("Vatican City", "va"),
    ("Holy See", "va"),
    ("Palestine", "ps"),
    ("Palestinian Territories", "ps"),
    ("Kosovo", "xk"),  # no ISO code: XK, as phonenumbers and the ad platforms use
    ("East Timor", "tl"),
    ("DR Congo", "cd"),
    ("Democratic Republic of the Congo", "cd"),
    ("Congo-Brazzaville", "cg"),
    ("Bosnia", "ba"),
    ("Bosnia & Herzegovina", "ba"),
    ("Republic of Ireland", "ie"),
    ("Falkland Islands", "fk"),
    ("Saint Helena", "sh"),
    ("Saint Martin", "mf"),
    ("Sint Maarten", "sx"),
    ("US Virgin Islands", "vi"),
    ("Bonaire", "bq"),
    ("The Gambia", "gm"),
    ("The Bahamas", "bs"),
    ("St Kitts and Nevis", "kn"),
    ("St. Vincent and the Grenadines", "vc"),
    ("Trinidad & Tobago", "tt"),
    ("Lao PDR", "la"),
]
# ... and names that resolved already, kept so: the library's own and earlier aliases.
KNOWN_COUNTRY_NAMES = [
    ("Türkiye", "tr"),
    ("Ivory Coast", "ci"),
    ("Czech Republic", "cz"),
    ("North Macedonia", "mk"),
    ("Holland", "nl"),
    ("The Netherlands", "nl"),
    ("Great Britain", "gb"),
    ("England", "gb"),
    ("Scotland", "gb"),
    ("Wales", "gb"),
    ("Northern Ireland", "gb"),
    ("South Korea", "kr"),
    ("North Korea", "kp"),
    ("Russia", "ru"),
    ("Vietnam", "vn"),
    ("Laos", "la"),
    ("Syria", "sy"),
    ("Iran", "ir"),
    ("Bolivia", "bo"),
    ("Venezuela", "ve"),
    ("Tanzania", "tz"),
    ("Moldova", "md"),
    ("Taiwan", "tw"),
    ("Brunei", "bn"),
    ("Eswatini", "sz"),
    ("Myanmar", "mm"),
]


@pytest.mark.parametrize(("raw", "expected"), USUAL_COUNTRY_NAMES + KNOWN_COUNTRY_NAMES)
def test_usual_english_and_former_country_names_are_read(raw: str, expected: str) -> None:
    assert normalize.country(raw, "meta") == expected
    assert normalize.country(raw, "google") == expected.upper()


def test_unknown_country_is_left_out() -> None:
    assert normalize.country("Narnia", "meta") is None
    assert normalize.country("XX", "meta") is None
    assert normalize.country("XXX", "meta") is None


def test_no_three_letter_country_name_is_the_alpha3_code_of_another_country() -> None:
    # alpha-3 codes are read before names: a name spelled like another's code would be misread
    import pycountry

    alpha3 = {str(c.alpha_3).lower(): str(c.alpha_2) for c in pycountry.countries}
    names = normalize._country_names()

    clashes = {k: v for k, v in names.items() if k in alpha3 and alpha3[k] != v}

    assert clashes == {}


def test_alpha3_country_reads_phones_states_and_zips_in_that_country() -> None:
    assert normalize.phone("0151 12345678", "google", "DEU") == "+4915112345678"
    assert normalize.phone("020 7946 0958", "meta", "GBR") == "442079460958"
    assert normalize.state("New York", "meta", "USA") == "ny"
    assert normalize.state("Washington", "meta", "GBR") == "washington"
    assert normalize.postal_code("94035-1234", "google", "CAN") == "94035-1234"


def test_us_state_names_become_codes_but_other_regions_are_only_cleaned() -> None:
    assert normalize.state("New York", "meta", "US") == "ny"
    assert normalize.state("Georgia", "meta") == "ga"
    assert normalize.state("Baden-Württemberg", "meta", "DE") == "badenwürttemberg"
    assert normalize.state("Washington", "meta", "GB") == "washington"


def test_us_zip_keeps_its_first_five_digits() -> None:
    assert normalize.postal_code("940351234", "meta", "US") == "94035"
    assert normalize.postal_code("94035-1234", "google") == "94035"
    assert normalize.postal_code("940351234", "meta") == "940351234"  # not known to be US


@pytest.mark.parametrize("platform", ["meta", "tiktok", "google"])
def test_postal_code_with_letters_is_never_cut_to_a_us_zip(platform: Platform) -> None:
    # platforms.md §1.3: "US: first 5 digits only"; no US ZIP has letters, and ``country`` may
    # be a shop's default_country rather than the person's
    expected = "K1A 0B1" if platform == "google" else "k1a0b1"

    assert normalize.postal_code("K1A 0B1", platform, "US") == expected
    assert normalize.postal_code("94035 1234", platform, "US") == "94035"


@pytest.mark.parametrize("platform", ["meta", "tiktok", "google"])
@pytest.mark.parametrize("raw", ["CA 94035", "ZIP 94035", "94035 USA", "CA 94035-1234"])
def test_us_zip_written_with_words_around_it_is_its_first_five_digits(
    platform: Platform, raw: str
) -> None:
    # platforms.md §1.3 zp "US: first 5 digits only": the state or "ZIP" is not part of it
    assert normalize.postal_code(raw, platform, "US") == "94035"


@pytest.mark.parametrize("platform", ["meta", "tiktok", "google"])
def test_text_without_exactly_one_zip_is_read_as_any_other_code_under_us(
    platform: Platform,
) -> None:
    google = platform == "google"

    assert normalize.postal_code("K1A 0B1", platform, "US") == ("K1A 0B1" if google else "k1a0b1")
    assert normalize.postal_code("12345 67890", platform, "US") == (
        "12345 67890" if google else "1234567890"
    )
    assert normalize.postal_code("CA 94035", platform) == ("CA 94035" if google else "ca94035")


def test_google_postal_code_stays_readable() -> None:
    assert normalize.postal_code(" M1  1AE ", "google", "GB") == "M1 1AE"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("19970216", "19970216"),
        ("1997/02/16", "19970216"),
        ("1997-2-6", "19970206"),
        ("1997-02-16T00:00:00Z", "19970216"),
        ("16/2/1997", "19970216"),  # day first when the first number cannot be a month
        ("16.02.1997", "19970216"),
        ("16-02-1997", "19970216"),
        ("05.02.1997", "19970205"),  # day first with dots or dashes, as in Europe
        ("02-16-1997", "19970216"),  # month first when the second number cannot be a month
        ("02.16.1997", "19970216"),
        (date(1997, 2, 16), "19970216"),
    ],
)
def test_meta_date_of_birth_is_yyyymmdd(raw: str | date, expected: str) -> None:
    assert normalize.date_of_birth(raw, "meta") == expected


@pytest.mark.parametrize(
    "raw", ["1890-01-01", "2999-01-01", "1997-02-30", "13/13/1997", "13.13.1997", "someday"]
)
def test_impossible_date_of_birth_is_left_out(raw: str) -> None:
    assert normalize.date_of_birth(raw, "meta") is None


def test_date_of_birth_for_other_platforms_is_iso() -> None:
    assert normalize.date_of_birth("2/16/1997", "tiktok") == "1997-02-16"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("F", "f"), ("female", "f"), ("Male", "m"), ("m", "m"), ("diverse", None), ("", None)],
)
def test_gender_is_f_or_m(raw: str, expected: str | None) -> None:
    assert normalize.gender(raw, "meta") == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Smith Jr.", "smith"),
        ("Mrs. Mary", "mary"),
        ("Smith, Jr.", "smith"),
        ("MR John", "john"),
        ("Prof. Dr. Hans", "hans"),
        ("Henry III", "henry"),
        ("Miss Ada Sr", "ada"),
        ("Mary Ann", "mary ann"),  # inner words that are no title stay
        ("Drew Mrsich", "drew mrsich"),  # only whole words are titles
        ("Jr. Smith", "jr smith"),  # a suffix before the name is not a suffix
    ],
)
def test_google_names_lose_prefixes_and_suffixes(raw: str, expected: str) -> None:
    # platforms.md §3.6: first/last name, no prefixes (Mrs.) or suffixes (Jr.)
    assert normalize.name(raw, "google") == expected


@pytest.mark.parametrize(("raw", "expected"), [("Ii", "ii"), ("Dr.", "dr"), ("Mr. Jr.", "mr jr")])
def test_google_name_of_titles_alone_is_kept_whole(raw: str, expected: str) -> None:
    assert normalize.name(raw, "google") == expected


@pytest.mark.parametrize("platform", ["meta", "tiktok"])
def test_meta_and_tiktok_names_keep_titles(platform: Platform) -> None:
    assert normalize.name("Smith Jr.", platform) == "smith jr"
    assert normalize.name("Mrs. Mary", platform) == "mrs mary"


def test_google_city_keeps_single_spaces_but_meta_removes_them() -> None:
    assert normalize.city(" New  York 10 ", "google") == "new york"
    assert normalize.city(" New  York 10 ", "meta") == "newyork"


def test_url_param_keeps_the_case_of_the_value() -> None:
    url = "https://shop.example/?a=1&fbclid=AbC-123_xYz"
    assert normalize.url_param(url, "fbclid") == "AbC-123_xYz"
    assert normalize.url_param(url, "ttclid") is None
    assert normalize.url_param(None, "fbclid") is None


def test_url_param_reads_the_value_click_capture_reads_past_a_javascript_non_value() -> None:
    # The adapters found no gclid where click capture (and so enrichment) found REAL.
    url = "https://shop.example/?gclid=undefined&gclid=REAL&fbclid=null"

    assert normalize.url_param(url, "gclid") == "REAL"
    assert normalize.url_param(url, "fbclid") is None
