"""Compiled mapping builders give exactly what the generic merge gives, on generated mappings.

``compile_builder`` generates one Python function per mapping (plain paths read inline and
grouped by prefix, constants embedded, other getters called); ``_build_generic`` is the plain
reference. Mappings here have overlapping and repeated targets, nested prefixes, paths deeper
than the inlining limit, constants (None among them), JMESPath getters and keys that need
quoting; events have missing and None values and non-dict intermediates.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from destinations import registry
from engine.expr import (
    _MAX_INLINED_DEPTH,
    Field,
    Getter,
    _build_generic,
    _path_getter,
    build,
    compile_builder,
    compile_expression,
    compile_mapping,
    constant,
    path_of,
)

KEYS = ["a", "b", "c", "it's", 'q"uote', "back\\slash", "new\nline", "tab\tkey"]

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from(["", "x", "1"]),
)
json_value = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    ),
    max_leaves=20,
)
events = st.one_of(st.dictionaries(st.sampled_from(KEYS), json_value, max_size=6), json_value)

paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=4).map(tuple)
EXPRESSIONS = ["a || b.c", "a[0]", "a[].b", "a.b && 'x'", "a.{x: b, y: c}", "`null`", "a == b"]


def _opaque(get: Getter) -> Getter:
    """The same getter without its path marker: the builder must call it, not inline it."""

    def opaque(event: Any) -> Any:
        return get(event)

    return opaque


getters = st.one_of(
    paths.map(_path_getter),
    paths.map(lambda p: _opaque(_path_getter(p))),
    st.sampled_from(EXPRESSIONS).map(compile_expression),
    json_value.map(constant),
    st.just(constant(None)),
    st.just(_path_getter(("a",) * (_MAX_INLINED_DEPTH + 2))),
)
fields = st.lists(st.builds(Field, paths, getters), max_size=12).map(tuple)


def ordered(value: Any) -> Any:
    """A value with every dict turned into its list of items, so key order is compared too."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def tree_order(mapping: tuple[Field, ...], event: Any) -> dict[str, Any]:
    """The output order the builder promises for non-overlapping targets (see compile_builder).

    A key comes in the order of its first target in the mapping, a nested dict only when
    something went into it.
    """
    tree: dict[str, Any] = {}
    for f in mapping:
        node = tree
        for key in f.target[:-1]:
            node = node.setdefault(key, {})
        node[f.target[-1]] = f.get

    def fill(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, sub in node.items():
            if isinstance(sub, dict):
                if child := fill(sub):
                    out[key] = child
            elif (value := sub(event)) is not None:
                out[key] = value
        return out

    return fill(tree)


def overlapping(mapping: tuple[Field, ...]) -> bool:
    targets = [f.target for f in mapping]
    known = set(targets)
    return len(known) != len(targets) or any(
        t[:i] in known for t in targets for i in range(1, len(t))
    )


@settings(max_examples=600, deadline=None)
@given(mapping=fields, event=events)
def test_compiled_builder_equals_the_generic_merge(mapping: tuple[Field, ...], event: Any) -> None:
    before = copy.deepcopy(event)
    built = compile_builder(mapping)(event)
    assert built == _build_generic(mapping, event)
    assert build(mapping, event) == built
    if not overlapping(mapping):
        assert ordered(built) == ordered(tree_order(mapping, event))
    assert event == before  # a mapping never changes the event it reads


@pytest.mark.parametrize("name", sorted(registry.registry()))
@settings(max_examples=80, deadline=None)
@given(
    event=st.dictionaries(
        st.sampled_from(["properties", "context", "user_data", "consent", "user_id", "event_id"]),
        st.one_of(
            json_value,
            st.dictionaries(
                st.sampled_from(["email", "phone", "ip", "page_url", "value", "items"]),
                json_value,
                max_size=4,
            ),
        ),
        max_size=5,
    )
)
def test_adapter_default_mappings_build_as_the_generic_merge(name: str, event: Any) -> None:
    mapping = compile_mapping(registry.registry()[name].default_mapping)
    built = compile_builder(mapping)(event)
    assert ordered(built) == ordered(tree_order(mapping, event))
    assert built == _build_generic(mapping, event)


def test_plain_paths_and_constants_are_inlined_and_other_getters_called() -> None:
    mapping = (
        Field(("user", "email"), compile_expression("user_data.email")),
        Field(("user", "id"), compile_expression("user_data.external_id || user_id")),
        Field(("source",), constant("web")),
        Field(("nothing",), constant(None)),
        Field(("quoted", 'k"\n'), _path_getter(('it"s\n',))),
    )
    assert path_of(mapping[0].get) == ("user_data", "email")
    assert path_of(mapping[1].get) is None
    builder = compile_builder(mapping, "tag t")
    assert builder.__code__.co_filename == "<tag t>"
    event = {"user_data": {"email": "e"}, "user_id": "u", 'it"s\n': 1}
    assert builder(event) == {
        "user": {"email": "e", "id": "u"},
        "source": "web",
        "quoted": {'k"\n': 1},
    }
    assert builder("not a dict") == {"source": "web"}


def test_overlapping_targets_use_the_generic_merge() -> None:
    inner = {"value": 1}
    mapping = (
        Field(("custom_data",), _path_getter(("properties",))),
        Field(("custom_data", "currency"), constant("EUR")),
    )
    event = {"properties": inner}
    assert compile_builder(mapping)(event) == {"custom_data": {"value": 1, "currency": "EUR"}}
    assert inner == {"value": 1}


def test_a_builder_is_plain_python_over_the_event() -> None:
    # Keys reach the generated source only through repr(); one that looks like code stays data.
    key = "x'] = 1; import os; out['y"
    mapping = (Field((key,), _path_getter((key,))),)
    assert compile_builder(mapping)({key: "v"}) == {key: "v"}
    assert json.dumps(compile_builder(mapping)({})) == "{}"
