"""Compiled expressions give exactly what jmespath's interpreter gives, on generated data."""

from __future__ import annotations

from typing import Any

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destinations import registry
from engine.expr import compile_expression

HANDWRITTEN = [
    "a || b",
    "a && b",
    "!a",
    "a.b.c",
    "a.b[0].c",
    "a[0]",
    "a[-1]",
    "a[]",
    "a[].b",
    "a[].{x: b, y: c}",
    "[a, b]",
    "a | b",
    "a == b",
    "a != b",
    "a > `1`",
    "a <= b",
    "a == `1`",
    "a == `true`",
    "a[0] && 'x'",
    "length(a)",
    "a[?b > `1`].c",
    "a[1:2]",
    "not_null(a, b)",
    "a.*",
    "to_string(a)",
    "a.b || c.d",
    "`null`",
    "@",
    "a[0][0]",
    # shapes with their own compiled forms: chains of keys and indexes, projections of
    # field selections, ``&&`` with a literal, and expressions that need no exception guard
    "a[0].b",
    "a.b[0]",
    "a[0][1].c",
    "[0]",
    "@[0]",
    "a.b[-1].c",
    "a[].{x: b, y: c.x}",
    "a[].{x: b, x: c}",
    "{x: a, y: b}",
    "a[][]",
    "a[].b[]",
    "a && `1`",
    "a.b && 'x'",
    "a || `0`",
    "a.b || c.x || y",
    "!a.b",
    "a > `1` || b",
]
ADAPTER = sorted(
    {
        source
        for cls in registry.registry().values()
        for source in cls.default_mapping.values()
        if isinstance(source, str)
    }
)

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["", "x", "1", "a"]),
)
data = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "c", "x", "y"]), inner, max_size=4),
    ),
    max_leaves=12,
)


def interpreted(expression: str, value: Any) -> Any:
    try:
        return jmespath.search(expression, value, options=jmespath.Options(dict_cls=dict))
    except Exception:  # the engine reads a run-time type error as "no value"
        return None


@pytest.mark.parametrize("expression", HANDWRITTEN)
@settings(max_examples=60, deadline=None)
@given(value=data)
def test_compiled_expression_matches_the_interpreter(expression: str, value: Any) -> None:
    assert compile_expression(expression)(value) == interpreted(expression, value)


@pytest.mark.parametrize("expression", ADAPTER)
@settings(max_examples=25, deadline=None)
@given(
    value=st.dictionaries(
        st.sampled_from(["properties", "context", "user_data", "consent"]), data, max_size=4
    )
)
def test_adapter_default_mappings_match_the_interpreter(expression: str, value: Any) -> None:
    assert compile_expression(expression)(value) == interpreted(expression, value)
