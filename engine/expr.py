"""Compiled expressions over the canonical event, and the mapping that builds payloads.

Rule files use JMESPath. Most expressions are plain dotted paths (``properties.value``); those
are resolved with a few dict lookups instead of the JMESPath interpreter, which is several times
slower. Everything is compiled once, when the container loads, never per event.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
import jmespath.exceptions

Getter = Callable[[Any], Any]

_PLAIN_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ExpressionError(ValueError):
    """An expression that does not parse; the message says where."""


def _path_getter(parts: tuple[str, ...]) -> Getter:
    if len(parts) == 1:
        key = parts[0]

        def get1(data: Any) -> Any:
            return data.get(key) if isinstance(data, dict) else None

        return get1
    if len(parts) == 2:
        k1, k2 = parts

        def get2(data: Any) -> Any:
            if isinstance(data, dict):
                inner = data.get(k1)
                if isinstance(inner, dict):
                    return inner.get(k2)
            return None

        return get2

    def get_n(data: Any) -> Any:
        for key in parts:
            if not isinstance(data, dict):
                return None
            data = data.get(key)
        return data

    return get_n


def compile_expression(source: str) -> Getter:
    """Compile a JMESPath expression into a function of the event.

    Raises:
        ExpressionError: the expression does not parse.
    """
    text = source.strip()
    if _PLAIN_PATH.fullmatch(text) and not _is_keyword(text):
        return _path_getter(tuple(text.split(".")))
    try:
        compiled = jmespath.compile(text)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(
            f"invalid JMESPath expression {source!r}: {_jmespath_msg(exc)}"
        ) from exc
    options = jmespath.Options(dict_cls=dict)

    def search(data: Any) -> Any:
        try:
            return compiled.search(data, options=options)
        except jmespath.exceptions.JMESPathError:
            # A type error at run time (e.g. comparing a string to a number) means "no value",
            # the same as a missing field; it must never fail the event.
            return None

    return search


def _is_keyword(text: str) -> bool:
    # JMESPath literals that look like paths but are not field names.
    return text in {"true", "false", "null"}


def _jmespath_msg(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def truthy(value: Any) -> bool:
    """JMESPath truthiness: empty strings, lists, objects, false and null are false."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


@dataclass(frozen=True)
class Field:
    """One target of a mapping: where it goes and how its value is computed."""

    target: tuple[str, ...]
    get: Getter


def build(fields: tuple[Field, ...], event: Any) -> dict[str, Any]:
    """Evaluate ``fields`` over ``event`` into a nested dict; missing (None) values are left out."""
    out: dict[str, Any] = {}
    for f in fields:
        value = f.get(event)
        if value is None:
            continue
        node = out
        for key in f.target[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[f.target[-1]] = value
    return out


def constant(value: Any) -> Getter:
    """A getter that ignores the event and returns ``value``."""
    return lambda _event: value


def compile_mapping(mapping: Mapping[str, Any]) -> tuple[Field, ...]:
    """Compile a plain mapping (target -> expression string, or ``{value: X}`` for a constant).

    This is the form of an adapter's ``default_mapping``; rule files add ``$variables`` on top
    (see :mod:`engine.rules.compile`).
    """
    fields = []
    for target, source in mapping.items():
        if source is None:
            continue
        if isinstance(source, dict) and set(source) == {"value"}:
            getter = constant(source["value"])
        elif isinstance(source, str):
            getter = compile_expression(source)
        else:
            getter = constant(source)
        fields.append(Field(tuple(target.split(".")), getter))
    return tuple(fields)
