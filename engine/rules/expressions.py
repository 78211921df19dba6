"""Expressions in rule files: JMESPath with ``$variables``.

A ``$name`` is the value of the variable ``name`` for the event being evaluated, wherever it is
written: on its own (``$order_value > `0```), inside a filter (``items[?price < $min_price]``:
``price`` is each item's, ``$min_price`` the event's), or as a function's argument. A lookup
table is a value like any other. Inside quotes (``'$code'``, ``"$field"``) and JSON literals in
backticks, ``$`` is plain text.

JMESPath (as jmespath.py implements it) has no variables, so each reference is replaced by a
placeholder name before parsing and the placeholder's node in the parsed tree is swapped for a
variable node, which :mod:`engine.expr` evaluates with the variable's own getter on the event.
Nothing of one expression's text is pasted into another.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath
import jmespath.exceptions

from engine.event import SOURCES
from engine.expr import (
    VARIABLE,
    ExpressionError,
    Getter,
    check_functions,
    compile_tree,
    jmespath_message,
    variable_node,
)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTES = "'\"`"
# How deep an expression may nest, the variables it uses included. Checking and evaluating an
# expression recurse once or twice per level (a chain of ``||`` is as deep as it is long), so
# this keeps both far from Python's recursion limit, in a request as in ``tagrelay check``.
MAX_DEPTH = 100


@dataclass(frozen=True)
class Variable:
    """A named expression: its getter and, for static checks, its parsed definition."""

    name: str
    get: Getter
    tree: dict[str, Any] | None = None  # None: only known per event (a lookup table)
    depth: int = 1  # how deep evaluating it nests (see :func:`depth`)


@dataclass(frozen=True)
class _Reference:
    name: str
    start: int  # where ``$name`` starts in the source
    end: int


def _references(source: str) -> list[_Reference]:
    """Every ``$name`` outside quotes and literals, in order."""
    found: list[_Reference] = []
    quote = ""
    i = 0
    while i < len(source):
        char = source[i]
        if quote:
            if char == "\\":
                i += 2  # jmespath lets a backslash escape the closing quote
                continue
            if char == quote:
                quote = ""
        elif char in _QUOTES:
            quote = char
        elif char == "$":
            match = NAME.match(source, i + 1)
            before = source[i - 1] if i else ""
            # ``a$b`` is no reference: left alone, it stays the syntax error it is.
            if match and not (before.isalnum() or before == "_"):
                found.append(_Reference(match.group(), i, match.end()))
                i = match.end()
                continue
        i += 1
    return found


def references(source: str) -> list[str]:
    """The variable names an expression refers to, each once, in order of appearance."""
    return list(dict.fromkeys(ref.name for ref in _references(source)))


def _placeholder(index: int) -> str:
    return f"__tagrelay_var{index}__"


def parse(source: str, variables: Mapping[str, Variable]) -> dict[str, Any]:
    """The syntax tree of ``source`` with each ``$name`` a variable node.

    Raises:
        ExpressionError: the expression does not parse, uses ``$name`` where no value can go,
            or calls an unknown function or one with the wrong number of arguments.
    """
    refs = _references(source)
    unique = dict.fromkeys(ref.name for ref in refs)
    names = {name: _placeholder(i) for i, name in enumerate(unique)}
    text = source
    shifts: list[tuple[int, int, int]] = []  # (start in text, its length there, length in source)
    for ref in reversed(refs):
        placeholder = names[ref.name]
        text = text[: ref.start] + placeholder + text[ref.end :]
    offset = 0
    for ref in refs:
        length = len(names[ref.name])
        shifts.append((ref.start + offset, length, ref.end - ref.start))
        offset += length - (ref.end - ref.start)

    def position(at: int) -> int:
        back = 0
        for start, length, original in shifts:
            if at >= start + length:
                back += length - original
            elif at >= start:
                return start - back  # inside a placeholder: its ``$``
        return at - back

    try:
        tree: Any = jmespath.compile(text).parsed
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(
            f"invalid JMESPath expression {source!r}: {jmespath_message(exc, position)}"
        ) from exc
    except RecursionError:  # jmespath's parser recurses once or more per parenthesis
        raise ExpressionError(_too_deep("the expression is nested too deeply to read")) from None
    try:
        tree = _balanced(tree)
    except RecursionError:
        raise ExpressionError(_too_deep("the expression is nested too deeply to read")) from None
    # Before anything else walks the tree recursively.
    if (levels := depth(tree)) > MAX_DEPTH:
        raise ExpressionError(_too_deep(f"the expression is nested {levels} levels deep"))
    by_placeholder = {placeholder: variables[name] for name, placeholder in names.items()}
    rewritten: dict[str, Any] = _rewrite(tree, by_placeholder, at_root=True)
    if (levels := depth(rewritten)) > MAX_DEPTH:
        what = f"with the variables it uses, the expression is nested {levels} levels deep"
        raise ExpressionError(_too_deep(what))
    check_functions(rewritten, source)
    return rewritten


_CHAINED = frozenset({"or_expression", "and_expression"})
_LONG_CHAIN = 8


def _balanced(node: Any) -> Any:
    """``node`` with every long chain of ``||`` (or of ``&&``) regrouped as a balanced tree.

    The parser nests ``a || b || c || ...`` one level per term, so a chain of a few hundred
    alternatives, which marketers do write, is as deep as it is long, for every walk of the
    tree and every evaluation. ``||`` and ``&&`` are associative (the first truthy operand, else
    the last; the first falsy one, else the last), evaluated left to right either way: regrouped,
    a chain of n terms is log2(n) deep. Short chains keep the parser's shape. A new tree: the
    parser caches the one it gave.
    """
    if not isinstance(node, Mapping):
        return node
    kind = node.get("type")
    children = node.get("children") or ()
    if kind in _CHAINED and len(children) == 2:
        operands = []
        spine = node
        while spine.get("type") == kind and len(spine.get("children", ())) == 2:
            operands.append(spine["children"][1])
            spine = spine["children"][0]
        operands.append(spine)
        operands.reverse()
        parts = [_balanced(operand) for operand in operands]
        if len(parts) > _LONG_CHAIN:
            return _joined(str(kind), parts)
        joined = parts[0]
        for part in parts[1:]:  # the parser's own shape: ((a || b) || c)
            joined = {"type": kind, "children": [joined, part]}
        return joined
    if not children:
        return node
    return {**node, "children": [_balanced(child) for child in children]}


def _joined(kind: str, parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    middle = len(parts) // 2
    halves = [_joined(kind, parts[:middle]), _joined(kind, parts[middle:])]
    return {"type": kind, "children": halves}


def _too_deep(what: str) -> str:
    return (
        f"{what}, more than the {MAX_DEPTH} levels allowed: write it shorter (a long chain of "
        "a == 'x' || a == 'y' is contains(['x', 'y'], a))"
    )


def depth(tree: Mapping[str, Any]) -> int:
    """How deep evaluating ``tree`` nests: its own levels, a variable counting as many as its
    definition (:attr:`Variable.depth`). Walked without recursion, as the tree may be deep."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, level = stack.pop()
        if not isinstance(node, Mapping):
            continue
        var = variable_of(node)
        if var is not None:
            deepest = max(deepest, level - 1 + var.depth)
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node.get("children", ()))
    return deepest


def compile_expression(source: str, variables: Mapping[str, Variable]) -> Getter:
    """Compile an expression that may refer to ``variables`` (see :func:`parse`)."""
    return compile_tree(parse(source, variables))


# Node types whose children are evaluated against the same value as the node itself, and those
# whose first child is (the left side of ``.``, ``|``, ``[...]`` and projections).
_SAME_VALUE = frozenset(
    {"comparator", "and_expression", "or_expression", "not_expression", "function_expression"}
    | {"multi_select_list", "multi_select_dict", "key_val_pair", "flatten"}
)
_LEFT_SAME_VALUE = frozenset(
    {"subexpression", "index_expression", "pipe", "projection", "value_projection"}
    | {"filter_projection"}
)


def _rewrite(node: Any, variables: Mapping[str, Variable], at_root: bool) -> Any:
    """A copy of ``node`` with placeholder fields made variable nodes (the original is jmespath's
    cached tree and stays as it is)."""
    if not isinstance(node, dict):
        return node
    kind, value = node.get("type"), node.get("value")
    if isinstance(value, str) and value in variables:
        name = variables[value].name
        if kind == "field":
            var = variables[value]
            return variable_node(name, var.get, at_root, variable=var)
        if kind == "key_val_pair":
            raise ExpressionError(f"${name} cannot name a key: write {{key: ${name}}}")
        if kind == "function_expression":
            raise ExpressionError(f"${name} is a variable, not a function")
    children = [
        _rewrite(
            child,
            variables,
            at_root and (kind in _SAME_VALUE or (kind in _LEFT_SAME_VALUE and i == 0)),
        )
        for i, child in enumerate(node.get("children", ()))
    ]
    return {**node, "children": children}


def _read_from_the_event(tree: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The nodes of an expression evaluated against the event itself: not those read from
    each item of a filter or a projection, nor what a variable reads."""
    stack: list[tuple[Any, bool]] = [(tree, True)]
    while stack:
        node, at_root = stack.pop()
        if not isinstance(node, Mapping):
            continue
        kind = node.get("type")
        if at_root:
            yield node
        for i, child in enumerate(node.get("children", ())):
            same = kind in _SAME_VALUE or (kind in _LEFT_SAME_VALUE and i == 0)
            stack.append((child, at_root and same))


def root_fields(tree: Mapping[str, Any]) -> list[str]:
    """The fields an expression reads from the event itself, as the first step of a path.

    Only fields evaluated against the event count: ``properties`` and ``EUR`` in
    ``properties.currency == EUR``, not ``price`` in ``properties.items[?price > `1`]`` (read
    from each item) nor what a variable reads (its own definition is checked on its own).
    """
    found = [
        node["value"]
        for node in _read_from_the_event(tree)
        if node.get("type") == "field" and isinstance(node.get("value"), str)
    ]
    return list(dict.fromkeys(reversed(found)))


_READS_INPUT = frozenset({"field", "current", "identity"})


def reads_the_event(tree: Mapping[str, Any]) -> bool:
    """Whether an expression reads anything of the event (a field, ``@``, ``*``), itself or
    through a variable; False for a constant such as ``'properties.order_id'`` (a text)."""
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping):
            continue
        if node.get("type") in _READS_INPUT:
            return True
        if node.get("type") == VARIABLE:
            var = variable_of(node)
            if var is None or var.tree is None or reads_the_event(var.tree):
                return True
        stack.extend(node.get("children", ()))
    return False


_SOURCE_FIELD = {"type": "field", "value": "source", "children": []}


def foreign_sources(tree: Mapping[str, Any]) -> list[str]:
    """What to say of each comparison of the event's ``source`` with a text it never holds.

    tagrelay sets ``source`` to ``server`` or ``browser`` (:data:`engine.event.SOURCES`), so
    ``source == 'page'`` is always false: a trigger that never fires, or an exception meant to
    keep a page's copies out that never does. Only ``source`` read from the event itself
    counts (see :func:`root_fields`), not an item's field of that name in a filter.
    """
    said = []
    for node in _read_from_the_event(tree):
        if node.get("type") != "comparator" or node.get("value") not in ("eq", "ne"):
            continue
        left, right = (*node.get("children", ()), None, None)[:2]
        if isinstance(right, Mapping) and right.get("type") == "field":
            left, right = right, left
        if (
            left == _SOURCE_FIELD
            and isinstance(right, Mapping)
            and right.get("type") == "literal"
            and right.get("value") not in SOURCES
        ):
            always = "false" if node["value"] == "eq" else "true"
            said.append(
                f"source is 'server' or 'browser' (set by tagrelay), never "
                f"{right.get('value')!r}: this comparison is always {always}"
            )
    return said


def variable_of(node: Mapping[str, Any]) -> Variable | None:
    """The variable a syntax-tree node refers to, if it is a variable node."""
    if node.get("type") != VARIABLE:
        return None
    var = node.get("variable")
    return var if isinstance(var, Variable) else None
