"""Compiled expressions over the canonical event, and the mapping that builds payloads.

Rule files use JMESPath. Most expressions are plain dotted paths (``properties.value``); those
are resolved with a few dict lookups instead of the JMESPath interpreter, which is several times
slower. Everything is compiled once, when the container loads, never per event.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.visitor as jmespath_visitor

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
    tree: Any = compiled.parsed
    getter = _closure(tree)

    def search(data: Any) -> Any:
        try:
            return getter(data)
        except Exception:  # noqa: BLE001 - jmespath raises bare TypeErrors too, e.g. for 'a' > 1
            # A type error at run time (e.g. comparing a string to a number) means "no value",
            # the same as a missing field; it must never fail the event.
            return None

    return search


_OPTIONS = jmespath.Options(dict_cls=dict)
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}


def _closure(node: dict[str, Any]) -> Getter:
    """Turn a parsed JMESPath AST into nested Python closures.

    The common node types (fields, paths, indexes, projections, ``||``/``&&``/``!``,
    comparisons, literals, multi-selects, pipes) become direct Python; the rest (functions,
    filters, slices, ...) is handed to jmespath's own interpreter, node by node, so the
    semantics are jmespath's everywhere. ``tests/engine/test_expr_compiler.py`` holds the two
    together on generated data.
    """
    kind = node["type"]
    children = [_closure(c) for c in node.get("children", ())] if kind in _COMPILED else []
    if kind == "field":
        key = node["value"]
        return lambda v: v.get(key) if isinstance(v, dict) else None
    if kind in ("subexpression", "index_expression", "pipe"):
        return _chain(children)
    if kind == "index":
        index = node["value"]

        def at(v: Any) -> Any:
            if not isinstance(v, list):
                return None
            try:
                return v[index]
            except IndexError:
                return None

        return at
    if kind in ("current", "identity"):
        return lambda v: v
    if kind == "literal":
        literal = node["value"]
        return lambda _v: literal
    if kind == "or_expression":
        left, right = children
        return lambda v: r if truthy(r := left(v)) else right(v)
    if kind == "and_expression":
        left, right = children
        return lambda v: right(v) if truthy(r := left(v)) else r
    if kind == "not_expression":
        (inner,) = children
        return lambda v: not truthy(inner(v))
    if kind == "comparator":
        left, right = children
        op = node["value"]
        if op == "eq":
            return lambda v: _equals(left(v), right(v))
        if op == "ne":
            return lambda v: not _equals(left(v), right(v))
        compare = _COMPARE[op]

        def ordered(v: Any) -> Any:
            a, b = left(v), right(v)
            if not (_comparable(a) and _comparable(b)):
                return None
            return compare(a, b)

        return ordered
    if kind == "flatten":
        (inner,) = children

        def flatten(v: Any) -> Any:
            base = inner(v)
            if not isinstance(base, list):
                return None
            merged: list[Any] = []
            for element in base:
                if isinstance(element, list):
                    merged.extend(element)
                else:
                    merged.append(element)
            return merged

        return flatten
    if kind == "projection":
        left, right = children

        def project(v: Any) -> Any:
            base = left(v)
            if not isinstance(base, list):
                return None
            return [r for element in base if (r := right(element)) is not None]

        return project
    if kind == "multi_select_dict":
        pairs = [(c["value"], _closure(c["children"][0])) for c in node["children"]]
        return lambda v: None if v is None else {k: get(v) for k, get in pairs}
    if kind == "multi_select_list":
        return lambda v: None if v is None else [get(v) for get in children]
    interpreter = jmespath_visitor.TreeInterpreter(_OPTIONS)
    tree: Any = node
    return lambda v: interpreter.visit(tree, v)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _comparable(x: Any) -> bool:
    """JMESPath orders numbers and strings; anything else compares to null."""
    return _number(x) or isinstance(x, str)


def _equals(x: Any, y: Any) -> bool:
    """JMESPath equality: Python's, except that 0/1 never equal false/true."""
    if _number(x) and x in (0, 1) and isinstance(y, bool):
        return False
    if _number(y) and y in (0, 1) and isinstance(x, bool):
        return False
    return bool(x == y)


_COMPILED = frozenset(
    {"field", "subexpression", "index_expression", "pipe", "index", "current", "identity"}
    | {"literal", "or_expression", "and_expression", "not_expression", "comparator"}
    | {"flatten", "projection", "multi_select_list"}
)


def _chain(steps: list[Getter]) -> Getter:
    if len(steps) == 2:
        first, second = steps
        return lambda v: second(first(v))

    def chained(v: Any) -> Any:
        for step in steps:
            v = step(v)
        return v

    return chained


def _is_keyword(text: str) -> bool:
    # JMESPath literals that look like paths but are not field names.
    return text in {"true", "false", "null"}


def _jmespath_msg(exc: Exception) -> str:
    if isinstance(exc, jmespath.exceptions.IncompleteExpressionError):
        return "the expression ends too early"
    if isinstance(exc, jmespath.exceptions.LexerError):
        what = getattr(exc, "message", "") or "unreadable text"
        return f"{what} at character {getattr(exc, 'lexer_position', 0) + 1}"
    if isinstance(exc, jmespath.exceptions.ParseError):
        where = f" at character {exc.lex_position + 1}" if exc.lex_position is not None else ""
        return f"{exc.msg}{where}"
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
    cached = _PLANS.get(id(fields))
    if cached is None or cached[0] is not fields:
        # Keyed by identity (hashing a tuple of fields per event would cost more than it
        # saves); the tuple is kept in the entry so its id cannot be reused meanwhile.
        if len(_PLANS) > 4096:
            _PLANS.clear()
        cached = _PLANS[id(fields)] = (fields, _plan(fields))
    plan = cached[1]
    return plan(event) if plan is not None else _build_generic(fields, event)


Builder = Callable[[Any], dict[str, Any]]
_PLANS: dict[int, tuple[tuple[Field, ...], Builder | None]] = {}


def _plan(fields: tuple[Field, ...]) -> Builder | None:
    """A builder with the nesting worked out once, for mappings whose targets do not overlap.

    (A target that is a prefix of another, e.g. ``custom_data`` and ``custom_data.value``,
    needs the generic merge; mappings compiled from rules almost never have one.)
    """
    targets = [f.target for f in fields]
    known = set(targets)
    if len(known) != len(targets) or any(t[:i] in known for t in targets for i in range(1, len(t))):
        return None
    tree: dict[str, Any] = {}
    for f in fields:
        node = tree
        for key in f.target[:-1]:
            node = node.setdefault(key, {})
        node[f.target[-1]] = f.get
    return _tree_builder(tree)


def _tree_builder(tree: dict[str, Any]) -> Builder:
    steps = [
        (key, None, _tree_builder(sub)) if isinstance(sub, dict) else (key, sub, None)
        for key, sub in tree.items()
    ]

    def run(event: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, get, nested in steps:
            if get is not None:
                value = get(event)
                if value is not None:
                    out[key] = value
            elif nested is not None and (child := nested(event)):
                out[key] = child
        return out

    return run


def _build_generic(fields: tuple[Field, ...], event: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Dicts built here; any other dict came from the event (or a constant) and is copied before
    # a deeper field is written into it, so a mapping never changes the event it reads.
    owned = {id(out)}
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
            elif id(child) not in owned:
                child = dict(child)
                node[key] = child
            owned.add(id(child))
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
