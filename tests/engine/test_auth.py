"""Server keys (Bearer or ?api_key=) and HMAC request signatures with a replay window."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.auth import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    authenticate,
    find_keys,
    signature,
)
from engine.config import ServerKey, parse_keys
from engine.errors import Unauthorized

NOW = 1_795_185_045.0
PLAIN = ServerKey("sk_plain_0123456789")
SIGNED = ServerKey("sk_signed_0123456789", "whsec_signing_secret")
KEYS = (PLAIN, SIGNED)
BODY = b'{"event_name":"purchase"}'


def auth(
    headers: dict[str, str], args: dict[str, str] | None = None, body: bytes = BODY
) -> ServerKey:
    return authenticate(headers, args or {}, body, KEYS, NOW)


def refused(headers: dict[str, str], args: dict[str, str] | None = None, body: bytes = BODY) -> str:
    with pytest.raises(Unauthorized) as info:
        auth(headers, args, body)
    return str(info.value)


def signed_headers(timestamp: float = NOW, body: bytes = BODY, prefix: str = "") -> dict[str, str]:
    stamp = str(int(timestamp))
    return {
        "Authorization": f"Bearer {SIGNED.key}",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: prefix + signature(SIGNED.signing_secret or "", stamp, body),
    }


def test_a_bearer_key_authenticates() -> None:
    assert auth({"Authorization": f"Bearer {PLAIN.key}"}) is PLAIN


def test_the_bearer_scheme_is_case_insensitive_and_spaces_are_trimmed() -> None:
    assert auth({"Authorization": f"bearer   {PLAIN.key}  "}) is PLAIN


def test_header_names_are_case_insensitive() -> None:
    assert auth({"authorization": f"Bearer {PLAIN.key}"}) is PLAIN


def test_an_api_key_query_parameter_authenticates() -> None:
    assert auth({}, {"api_key": PLAIN.key}) is PLAIN


def test_a_missing_key_says_how_to_send_one() -> None:
    assert refused({}) == "missing server key: send 'Authorization: Bearer <key>' or ?api_key="


def test_an_unknown_key_is_refused_without_echoing_it() -> None:
    message = refused({"Authorization": "Bearer sk_guess"})

    assert message == "unknown server key"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", PLAIN.key])
def test_a_malformed_authorization_header_is_refused(value: str) -> None:
    assert refused({"Authorization": value}) == "Authorization must be 'Bearer <server key>'"


def test_a_prefix_or_extension_of_a_key_is_not_that_key() -> None:
    assert refused({"Authorization": f"Bearer {PLAIN.key[:-1]}"}) == "unknown server key"
    assert refused({"Authorization": f"Bearer {PLAIN.key}x"}) == "unknown server key"


def test_keys_are_compared_as_fixed_length_digests_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("engine.auth.hmac.compare_digest", spy)

    assert find_keys(PLAIN.key, KEYS) == [PLAIN]

    # every configured key is compared (no early exit), always 32 bytes against 32 bytes
    assert compared == [(32, 32), (32, 32)]
    assert hashlib.sha256(PLAIN.key.encode()).digest_size == 32


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None)
def test_any_presented_text_is_either_a_key_or_refused(text: str) -> None:
    found = find_keys(text, KEYS)

    assert all(entry.key == text for entry in found)


# -- signatures -------------------------------------------------------------------------------


ROTATING = (
    ServerKey("sk_rot_0123456789", "whsec_new"),
    ServerKey("sk_rot_0123456789", "whsec_old"),
)


def _signed_by(secret: str, key: str = "sk_rot_0123456789") -> dict[str, str]:
    stamp = str(int(NOW))
    return {
        "Authorization": f"Bearer {key}",
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: signature(secret, stamp, BODY),
    }


@pytest.mark.parametrize("secret", ["whsec_new", "whsec_old"])
def test_a_key_listed_with_two_secrets_accepts_a_signature_by_either(secret: str) -> None:
    # Rotating a signing secret: clients move from the old secret to the new one one by one.
    entry = authenticate(_signed_by(secret), {}, BODY, ROTATING, NOW)

    assert entry.signing_secret == secret


def test_a_key_listed_with_two_secrets_refuses_a_third_and_an_unsigned_request() -> None:
    with pytest.raises(Unauthorized, match="signature does not match"):
        authenticate(_signed_by("whsec_other"), {}, BODY, ROTATING, NOW)
    with pytest.raises(Unauthorized, match="requires signed requests"):
        authenticate({"Authorization": "Bearer sk_rot_0123456789"}, {}, BODY, ROTATING, NOW)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_key_listed_with_and_without_a_secret_still_requires_a_signature(
    order: tuple[int, int],
) -> None:
    listed = (ServerKey("sk_rot_0123456789", "whsec_new"), ServerKey("sk_rot_0123456789"))
    keys = tuple(listed[i] for i in order)

    with pytest.raises(Unauthorized, match="requires signed requests"):
        authenticate({"Authorization": "Bearer sk_rot_0123456789"}, {}, BODY, keys, NOW)
    assert authenticate(_signed_by("whsec_new"), {}, BODY, keys, NOW).signing_secret == "whsec_new"


def test_a_correctly_signed_request_authenticates() -> None:
    assert auth(signed_headers()) is SIGNED


def test_a_signature_may_carry_a_sha256_prefix_and_upper_case_hex() -> None:
    headers = signed_headers(prefix="sha256=")
    headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER].upper().replace("SHA256=", "sha256=")

    assert auth(headers) is SIGNED


def test_the_signature_covers_timestamp_dot_raw_body() -> None:
    stamp = str(int(NOW))
    expected = hmac.new(b"whsec_signing_secret", stamp.encode() + b"." + BODY, "sha256")

    assert signature("whsec_signing_secret", stamp, BODY) == expected.hexdigest()


def test_a_signature_for_another_body_is_refused() -> None:
    headers = signed_headers(body=b'{"event_name":"refund"}')

    assert refused(headers) == "signature does not match the body"


def test_a_signature_with_the_wrong_secret_is_refused() -> None:
    headers = signed_headers()
    headers[SIGNATURE_HEADER] = signature("another-secret", headers[TIMESTAMP_HEADER], BODY)

    assert refused(headers) == "signature does not match the body"


@pytest.mark.parametrize("skew", [301, -301, 3600])
def test_a_timestamp_outside_five_minutes_is_refused_even_if_signed(skew: int) -> None:
    assert refused(signed_headers(NOW + skew)) == (
        "X-Tagrelay-Timestamp is outside the 300-second replay window"
    )


@pytest.mark.parametrize("skew", [299, -299, 0])
def test_a_timestamp_within_five_minutes_is_accepted(skew: int) -> None:
    assert auth(signed_headers(NOW + skew)) is SIGNED


@pytest.mark.parametrize("stamp", ["soon", "nan", "inf", "-inf", ""])
def test_a_timestamp_that_is_not_unix_seconds_is_refused(stamp: str) -> None:
    headers = signed_headers()
    headers[TIMESTAMP_HEADER] = stamp
    headers[SIGNATURE_HEADER] = signature(SIGNED.signing_secret or "", stamp, BODY)

    assert "X-Tagrelay-Timestamp" in refused(headers)


@pytest.mark.parametrize("missing", [TIMESTAMP_HEADER, SIGNATURE_HEADER])
def test_a_signing_key_without_signature_headers_is_refused(missing: str) -> None:
    headers = signed_headers()
    del headers[missing]

    assert refused(headers) == (
        "this key requires signed requests: send X-Tagrelay-Timestamp and X-Tagrelay-Signature"
    )


def test_a_signed_key_works_through_the_api_key_parameter_too() -> None:
    headers = signed_headers()
    del headers["Authorization"]

    assert auth(headers, {"api_key": SIGNED.key}) is SIGNED


def test_non_ascii_signature_text_is_refused_not_an_error() -> None:
    headers = signed_headers()
    headers[SIGNATURE_HEADER] = "é" * 64

    assert refused(headers) == "signature does not match the body"


def test_parse_keys_reads_keys_and_signing_secrets() -> None:
    assert parse_keys(" k1 , k2:secret ,, ") == (ServerKey("k1"), ServerKey("k2", "secret"))
