"""engine.jsonio: orjson's speed, the json module's answers."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import jsonio

# JSON values as the json module reads them: any text (lone surrogates too), any integer.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the types json gives (1 and 1.0 differ; so do 0.0 and -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@settings(max_examples=400)
@given(json_values)
def test_loads_reads_every_json_text_as_the_json_module_does(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert _same(jsonio.loads(text), json.loads(text))
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            assert _same(jsonio.loads(text.encode()), json.loads(text))


@settings(max_examples=400)
@given(json_values)
def test_dumps_writes_what_the_json_module_reads_back_the_same(value: Any) -> None:
    assert _same(json.loads(jsonio.dumps(value)), value)
    assert _same(json.loads(jsonio.dumpb(value)), value)


@settings(max_examples=300)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integers_are_read_exactly(number: int) -> None:
    assert _same(jsonio.loads(str(number)), number)
    assert _same(jsonio.loads(f'{{"n": [{number}]}}'.encode()), {"n": [number]})


@settings(max_examples=300)
@given(st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-8", "replace")))
def test_loads_fast_reads_a_text_as_json_does_or_leaves_it_to_json(raw: bytes) -> None:
    value = jsonio.loads_fast(raw)
    if value is jsonio.NOT_READ:
        return
    assert _same(value, json.loads(raw.decode("utf-8")))


@pytest.mark.parametrize(
    "text",
    [
        "18446744073709551616",  # 2**64: orjson alone would read a float
        "-9223372036854775809",  # -2**63 - 1: the same
        "123456789012345678901234567890",
        '{"order_id": 12345678901234567890123}',
        "[1e400]",  # an infinity: orjson refuses it, json reads it
        "NaN",
        '"\\ud800"',  # a lone surrogate escape
        '"\\udc00x"',
    ],
)
def test_texts_orjson_would_read_otherwise_are_read_by_json(text: str) -> None:
    assert jsonio.loads_fast(text.encode()) is jsonio.NOT_READ
    expected = json.loads(text)
    got = jsonio.loads(text)
    if isinstance(expected, float) and math.isnan(expected):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert _same(got, expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1,]", "Expecting value"),
        ('{"a":1,}', "Expecting property name enclosed in double quotes"),
        ("01", "Extra data"),
        ("\ufeff{}", "Unexpected UTF-8 BOM"),
    ],
)
def test_malformed_json_gets_the_json_modules_error(text: str, message: str) -> None:
    with pytest.raises(json.JSONDecodeError, match=message):
        jsonio.loads(text)


def test_what_orjson_cannot_write_is_written_by_json() -> None:
    value = {"big": 2**70, "lone": "\ud800", "k": {1: True}}

    assert jsonio.dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # As bytes, ASCII-escaped: a lone surrogate has no UTF-8 form.
    assert jsonio.dumpb(value) == json.dumps(value, separators=(",", ":")).encode()


def test_values_json_cannot_hold_are_refused() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"a": {1, 2}})
    with pytest.raises(TypeError):
        jsonio.dumpb(object())


def test_text_is_written_in_utf8_not_escaped() -> None:
    assert jsonio.dumps({"city": "Köln"}) == '{"city":"Köln"}'
    assert jsonio.dumpb({"city": "Köln"}) == '{"city":"Köln"}'.encode()
