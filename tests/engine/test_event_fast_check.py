"""The hand-written event check never accepts what the JSON Schema refuses."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.event import _VALIDATOR, conforms

KEYS = [
    "event_name",
    "event_type",
    "event_id",
    "timestamp",
    "visitor_id",
    "session_id",
    "user_id",
    "properties",
    "user_data",
    "context",
    "consent",
    "extra",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.text(min_size=250, max_size=260),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["ip", "user_agent", "email", "ad_storage", "x"]), inner, max_size=3
        ),
        st.dictionaries(
            st.sampled_from(["ad_storage", "analytics_storage"]),
            st.sampled_from(["granted", "denied", True, False, "maybe", 1]),
            max_size=2,
        ),
    ),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_fast_check_accepts_only_what_the_schema_accepts(event: dict[str, Any]) -> None:
    if conforms(event):
        assert _VALIDATOR.is_valid(event)


def test_fast_check_accepts_the_brief_example() -> None:
    event = {
        "event_name": "purchase",
        "event_id": "ord_789",
        "timestamp": "2026-11-20T14:30:45Z",
        "visitor_id": "vis_abc",
        "user_id": "u1",
        "properties": {"value": 129.0},
        "user_data": {"email": "a@example.com", "phone": None},
        "context": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0", "gclid": None},
        "consent": {"ad_storage": "granted", "ad_user_data": True},
    }

    assert conforms(event) and _VALIDATOR.is_valid(event)


def test_fast_check_accepts_a_null_user_id() -> None:
    # "user_id": null says nobody is signed in (see engine.event.signs_out).
    event = {"event_name": "page_view", "user_id": None}

    assert conforms(event) and _VALIDATOR.is_valid(event)
    assert not conforms({"event_name": "page_view", "user_id": ""})
