"""Compiled expressions over the canonical event, and the mapping that builds payloads.

Rule files use JMESPath. Most expressions are plain dotted paths (``properties.value``); those
are resolved with a few dict lookups instead of the JMESPath interpreter, which is several times
slower. Everything is compiled once, when the container loads, never per event.
"""

from __future__ import annotations

import contextvars
import difflib
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import jmespath
import jmespath.exceptions
import jmespath.functions
import jmespath.visitor as jmespath_visitor

Getter = Callable[[Any], Any]

_PLAIN_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ExpressionError(ValueError):
    """An expression that does not parse; the message says where."""


# Getters that are plain dotted paths, constants or ``path || path`` carry what they read as a
# function attribute, so a mapping's builder can inline them (see compile_builder).
_PATH_ATTR = "_tagrelay_path"
_CONSTANT_ATTR = "_tagrelay_constant"
_EITHER_ATTR = "_tagrelay_either"  # ``a.b || c``: the two paths


def _path_getter(parts: tuple[str, ...]) -> Getter:
    """A getter for a dotted path: None as soon as a step is missing or not a dict."""
    getter: Getter
    if len(parts) == 1:
        key = parts[0]

        def get1(data: Any) -> Any:
            return data.get(key) if isinstance(data, dict) else None

        getter = get1
    elif len(parts) == 2:
        k1, k2 = parts

        def get2(data: Any) -> Any:
            if isinstance(data, dict):
                inner = data.get(k1)
                if isinstance(inner, dict):
                    return inner.get(k2)
            return None

        getter = get2
    else:

        def get_n(data: Any) -> Any:
            for key in parts:
                if not isinstance(data, dict):
                    return None
                data = data.get(key)
            return data

        getter = get_n
    setattr(getter, _PATH_ATTR, parts)
    return getter


def path_of(getter: Getter) -> tuple[str, ...] | None:
    """The dotted path a getter reads, if it is a plain path getter (else None)."""
    parts = getattr(getter, _PATH_ATTR, None)
    return parts if isinstance(parts, tuple) else None


def compile_expression(source: str) -> Getter:
    """Compile a JMESPath expression into a function of the event.

    Raises:
        ExpressionError: the expression does not parse, or calls a function that does not exist
            or with the wrong number of arguments.
    """
    text = source.strip()
    if _PLAIN_PATH.fullmatch(text) and not _is_keyword(text):
        return _path_getter(tuple(text.split(".")))
    try:
        compiled = jmespath.compile(text)
    except jmespath.exceptions.JMESPathError as exc:
        raise ExpressionError(
            f"invalid JMESPath expression {source!r}: {jmespath_message(exc)}"
        ) from exc
    tree: Any = compiled.parsed
    check_functions(tree, text)
    return compile_tree(tree)


def compile_tree(tree: dict[str, Any]) -> Getter:
    """Compile a parsed expression (jmespath's syntax tree, maybe with variable nodes)."""
    getter = _closure(tree)
    if _may_raise(tree):
        safe = getter

        def search(data: Any) -> Any:
            try:
                return safe(data)
            except Exception:  # noqa: BLE001 - jmespath raises bare TypeErrors too, e.g. 'a' > 1
                # A type error at run time (e.g. comparing a string to a number) means "no
                # value", the same as a missing field; it must never fail the event.
                return None

        getter = search
    if _reads_root(tree):
        inner = getter

        def rooted(event: Any) -> Any:
            token = _ROOT.set(event)
            try:
                return inner(event)
            finally:
                _ROOT.reset(token)

        getter = rooted
    return getter


# -- variables --------------------------------------------------------------------------------
#
# A variable node stands for a named expression's value for the whole event, wherever it sits
# in another expression (``items[?price < $min_price]`` compares each item's price with the
# event's minimum). Its ``get`` is the variable's getter. Where the node is evaluated against
# the event itself (``at_root``: not inside a projection, filter, function reference or the
# right side of a ``.`` or ``|``), it is just that getter; elsewhere it reads the event an
# enclosing getter was called with, which :func:`compile_tree` keeps in ``_ROOT``.

VARIABLE = "tagrelay_variable"
_ROOT: contextvars.ContextVar[Any] = contextvars.ContextVar("tagrelay_event")


def variable_node(name: str, get: Getter, at_root: bool, **extra: Any) -> dict[str, Any]:
    """A syntax-tree node for the value of variable ``name`` (``get``) for the event."""
    return {
        "type": VARIABLE,
        "value": name,
        "children": [],
        "get": get,
        "at_root": at_root,
        **extra,
    }


def _reads_root(node: dict[str, Any]) -> bool:
    if node["type"] == VARIABLE:
        return not node["at_root"]
    return any(isinstance(c, dict) and _reads_root(c) for c in node.get("children", ()))


def _variable_value(node: dict[str, Any], current: Any) -> Any:
    get: Getter = node["get"]
    return get(current) if node["at_root"] else get(_ROOT.get())


class _Interpreter(jmespath_visitor.TreeInterpreter):
    """jmespath's interpreter, which also evaluates variable nodes."""

    def visit_tagrelay_variable(self, node: dict[str, Any], value: Any) -> Any:
        return _variable_value(node, value)


# -- functions --------------------------------------------------------------------------------

_FUNCTIONS: dict[str, Any] = dict(jmespath.functions.Functions.FUNCTION_TABLE)


def check_functions(tree: dict[str, Any], source: str) -> None:
    """Raise ExpressionError for a call of an unknown function or with a wrong argument count.

    jmespath only finds these when it evaluates the call, and a failed call is null for us,
    so a misspelled ``lenght(...)`` would make a condition silently false forever.
    """
    for node in _walk(tree):
        if node["type"] != "function_expression":
            continue
        name, given = node["value"], len(node["children"])
        where = _call_position(source, name)
        spec = _FUNCTIONS.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, _FUNCTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ExpressionError(f"unknown function {name}(){where}{hint}")
        signature = spec["signature"]
        variadic = bool(signature) and signature[-1].get("variadic", False)
        wanted = len(signature)
        if given < wanted or (given > wanted and not variadic):
            count = f"at least {wanted}" if variadic else str(wanted)
            noun = "argument" if wanted == 1 and not variadic else "arguments"
            raise ExpressionError(f"{name}(){where} takes {count} {noun}, not {given}")


_ORDERING = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_NUMBER_TEXT = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")


def numbers_as_text(tree: dict[str, Any]) -> list[str]:
    """What to say of each ordering comparison with a number written as text.

    ``$value > '0'`` compares text: if the field holds a number it is null (never true); if it
    holds text it goes letter by letter (``'10' < '9'``), which is right for ISO dates or
    fixed-length codes only. So this is a warning, not an error; the event's ``timestamp``
    (always ISO 8601 text) is not warned of.
    """
    said = []
    for node in _walk(tree):
        if node["type"] != "comparator" or node["value"] not in _ORDERING:
            continue
        children = node["children"]
        if any(c.get("type") == "field" and c.get("value") == "timestamp" for c in children):
            continue
        for child in children:
            value = child.get("value") if child.get("type") == "literal" else None
            if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value):
                number = value.strip()
                said.append(
                    f"{_ORDERING[node['value']]} with {value!r} compares text: if the field "
                    f"holds a number this is never true (write the number in backticks: "
                    f"`{number}`); if it holds text, it goes letter by letter ('10' < '9')"
                )
    return said


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children", ()):
        if isinstance(child, dict):
            yield from _walk(child)


def _call_position(source: str, name: str) -> str:
    match = re.search(rf"(?<![A-Za-z0-9_$]){re.escape(name)}\s*\(", source)
    return f" at character {match.start() + 1}" if match else ""


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
    if kind == VARIABLE:
        get: Getter = node["get"]
        if node["at_root"]:
            return get
        return lambda _v: get(_ROOT.get())
    steps = _steps(node)
    if steps is not None and steps:
        # A chain of fields and indexes (``a.b[0].c``): JMESPath's field step is "v.get(key)
        # if v is a dict, else null" and its index step "v[i] if v is a list and i is within
        # it, else null", which a path getter does in one call instead of one per step.
        keys = [step for step in steps if isinstance(step, str)]
        return _path_getter(tuple(keys)) if len(keys) == len(steps) else _steps_getter(steps)
    children = [_closure(c) for c in node.get("children", ())] if kind in _COMPILED else []
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

        def either(v: Any) -> Any:
            r = left(v)
            # not truthy(r), inline: null, false, or an empty string, array or object
            if r is None or r is False or (not r and isinstance(r, _SIZED)):
                return right(v)
            return r

        left_path, right_path = path_of(left), path_of(right)
        if left_path is not None and right_path is not None:
            setattr(either, _EITHER_ATTR, (left_path, right_path))
        return either
    if kind == "and_expression":
        left, right = children
        then = node["children"][1]
        if then["type"] == "literal":
            literal = then["value"]  # ``x && 'product'``: no call for the constant

            def both_literal(v: Any) -> Any:
                r = left(v)
                if r is None or r is False or (not r and isinstance(r, _SIZED)):
                    return r
                return literal

            return both_literal

        def both(v: Any) -> Any:
            r = left(v)
            if r is None or r is False or (not r and isinstance(r, _SIZED)):
                return r
            return right(v)

        return both
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
        if node["children"][0]["type"] == "flatten":
            return _flat_projection(_closure(node["children"][0]["children"][0]), right)

        def project(v: Any) -> Any:
            base = left(v)
            if not isinstance(base, list):
                return None
            return [r for element in base if (r := right(element)) is not None]

        return project
    if kind == "multi_select_dict":
        return _select_dict(node["children"])
    if kind == "multi_select_list":
        return lambda v: None if v is None else [get(v) for get in children]
    interpreter = _Interpreter(_OPTIONS)
    tree: Any = node
    return lambda v: interpreter.visit(tree, v)


def _may_raise(node: dict[str, Any]) -> bool:
    """Whether the compiled form of ``node`` can raise on JSON data.

    Field lookups, indexes (IndexError is caught), projections, flattens, multi-selects,
    literals, ``||``/``&&``/``!`` and equality never do. Ordering comparisons can ('a' < 1 is
    a TypeError), and so can whatever is left to jmespath's interpreter (functions, ...).
    """
    kind = node["type"]
    if kind == VARIABLE:
        return False  # a variable's getter is itself compiled safe
    if kind not in _COMPILED and kind not in ("multi_select_dict", "key_val_pair"):
        return True
    if kind == "comparator" and node["value"] in _COMPARE:
        return True
    return any(_may_raise(child) for child in node.get("children", ()))


def _flat_projection(source: Getter, right: Getter) -> Getter:
    """``source[].right``: flatten one level, then project, without the intermediate list."""

    def project(v: Any) -> Any:
        base = source(v)
        if not isinstance(base, list):
            return None
        out: list[Any] = []
        for element in base:
            if isinstance(element, list):
                for inner in element:
                    if (r := right(inner)) is not None:
                        out.append(r)
            elif (r := right(element)) is not None:
                out.append(r)
        return out

    return project


def _select_dict(pairs: list[dict[str, Any]]) -> Getter:
    """``{k: expr, ...}``: null on null, else a dict of each expression's value."""
    names = [pair["value"] for pair in pairs]
    values = [pair["children"][0] for pair in pairs]
    steps = [_steps(value) for value in values]
    keys = [p[0] for p in steps if p is not None and len(p) == 1 and isinstance(p[0], str)]
    if len(keys) == len(names):
        # Every value is a plain field (``{id: id, name: name}``): read with dict lookups, not
        # one getter call each; a non-dict has no fields, so every value is null.
        fields = list(zip(names, keys, strict=True))

        def select_fields(v: Any) -> Any:
            if v is None:
                return None
            if isinstance(v, dict):
                return {name: v.get(key) for name, key in fields}
            return dict.fromkeys(names)

        return select_fields
    getters = [(name, _closure(value)) for name, value in zip(names, values, strict=True)]
    return lambda v: None if v is None else {k: get(v) for k, get in getters}


def _steps(node: dict[str, Any]) -> tuple[str | int, ...] | None:
    """The keys and indexes of a chain of fields, indexes and ``@`` (``a.b[0].c``), else None."""
    kind = node["type"]
    if kind == "field":
        return (node["value"],)
    if kind == "index":
        return (node["value"],)
    if kind in ("current", "identity"):
        return ()
    if kind not in ("subexpression", "index_expression"):
        return None
    steps: tuple[str | int, ...] = ()
    for child in node["children"]:
        found = _steps(child)
        if found is None:
            return None
        steps += found
    return steps


def _steps_getter(steps: tuple[str | int, ...]) -> Getter:
    """A getter for a chain of keys (str) and indexes (int); see :func:`_steps`."""
    plan: list[tuple[bool, Any]] = [(isinstance(step, str), step) for step in steps]

    def get_steps(data: Any) -> Any:
        for is_key, step in plan:
            if is_key:
                if not isinstance(data, dict):
                    return None
                data = data.get(step)
            else:
                if not isinstance(data, list):
                    return None
                try:
                    data = data[step]
                except IndexError:
                    return None
        return data

    return get_steps


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


_SIZED = (str, list, dict)  # JMESPath's false when empty

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


def jmespath_message(exc: Exception, position: Callable[[int], int] = lambda p: p) -> str:
    """A jmespath error in words, with the 1-based character it points at.

    ``position`` maps a 0-based position in the parsed text to one in the text the writer
    wrote (they differ when ``$variables`` were replaced before parsing).
    """
    if isinstance(exc, jmespath.exceptions.IncompleteExpressionError):
        return "the expression ends too early"
    if isinstance(exc, jmespath.exceptions.LexerError):
        what = getattr(exc, "message", "") or "unreadable text"
        return f"{what} at character {position(getattr(exc, 'lexer_position', 0)) + 1}"
    if isinstance(exc, jmespath.exceptions.ParseError):
        where = (
            f" at character {position(exc.lex_position) + 1}"
            if exc.lex_position is not None
            else ""
        )
        if getattr(exc, "token_type", None) == "NUMBER":
            # A number stands only in an index or a slice; as a value it is a literal.
            return f"{exc.msg}{where}: a number as a value is written in backticks, `10`"
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


Builder = Callable[[Any], dict[str, Any]]


def build(fields: tuple[Field, ...], event: Any) -> dict[str, Any]:
    """Evaluate ``fields`` over ``event`` into a nested dict; missing (None) values are left out.

    For a mapping evaluated many times, compile it once with :func:`compile_builder` instead
    (a :class:`~engine.rules.model.Tag` does); this looks the builder up in a cache per call.
    """
    cached = _BUILDERS.get(id(fields))
    if cached is None or cached[0] is not fields:
        # Keyed by identity (hashing a tuple of fields per event would cost more than it
        # saves); the tuple is kept in the entry so its id cannot be reused meanwhile.
        if len(_BUILDERS) > 4096:
            _BUILDERS.clear()
        cached = _BUILDERS[id(fields)] = (fields, compile_builder(fields))
    return cached[1](event)


_BUILDERS: dict[int, tuple[tuple[Field, ...], Builder]] = {}

# Paths deeper than this are read through their getter rather than inlined: every step of an
# inlined path is one more level of indentation in the generated source, which Python caps.
_MAX_INLINED_DEPTH = 24


def compile_builder(fields: tuple[Field, ...], name: str = "mapping") -> Builder:
    """Compile a mapping into one function of the event that builds its nested dict.

    The result equals :func:`_build_generic`'s (a property test holds them together). For a
    mapping whose targets do not overlap (no target is a prefix of another, none repeats: a
    mapping compiled from rules almost never has one), the nesting is worked out once and a
    specialised function is generated:

    - plain-path fields (and both sides of ``path || path``) are read inline and grouped by
      their source prefix, so the ``user_data`` of an event without one is looked up once for
      all of its fields;
    - constants are embedded; other getters (JMESPath, lookup tables) are called as they are;
    - the output is assembled in target order: a key appears in the order of its first
      target in the mapping, a nested dict only when something was put into it.

    Getters are pure functions of the event, so reading the values in a different order than
    the targets' changes nothing. Overlapping mappings get the generic merge. ``name`` labels
    the generated function in tracebacks and profiles.
    """
    targets = [f.target for f in fields]
    known = set(targets)
    if (
        len(known) != len(targets)
        or not all(targets)
        or any(t[:i] in known for t in targets for i in range(1, len(t)))
    ):
        return partial(_build_generic, fields)
    return _BuilderSource(fields).compile(name)


class _Source:
    """A node of the trie of source paths: the locals read exactly here, and deeper steps."""

    __slots__ = ("children", "fields")

    def __init__(self) -> None:
        self.fields: list[str] = []
        self.children: dict[str, _Source] = {}

    def add(self, path: tuple[str, ...], local: str) -> None:
        """Read ``path`` into the local variable ``local``."""
        node = self
        for key in path:
            node = node.children.setdefault(key, _Source())
        node.fields.append(local)

    def below(self) -> list[str]:
        """Every local read strictly below this node."""
        out: list[str] = []
        for child in self.children.values():
            out += child.fields
            out += child.below()
        return out


class _BuilderSource:
    """Writes the source of one mapping's builder function (see :func:`compile_builder`)."""

    def __init__(self, fields: tuple[Field, ...]) -> None:
        self.fields = fields
        self.lines = ["def build_mapping(event):"]
        # Getters and constants are passed in as globals of the generated function; only
        # keys (strings, written with repr) and generated local names appear in its text.
        self.namespace: dict[str, Any] = {
            "__builtins__": {"isinstance": isinstance, "dict": dict},
            "sized": _SIZED,
        }
        self.constants: dict[int, Any] = {}
        self.counter = 0

    def compile(self, name: str) -> Builder:
        roots = _Source()
        either: list[int] = []
        for i, f in enumerate(self.fields):
            parts = path_of(f.get)
            constant_box = getattr(f.get, _CONSTANT_ATTR, None)
            paths = getattr(f.get, _EITHER_ATTR, None)
            if parts is not None and len(parts) <= _MAX_INLINED_DEPTH:
                roots.add(parts, f"v{i}")
            elif isinstance(constant_box, tuple):
                self.constants[i] = constant_box[0]
            elif isinstance(paths, tuple) and max(map(len, paths)) <= _MAX_INLINED_DEPTH:
                # ``a.b || c``: both paths read inline (reading the right one when the left
                # is truthy costs less than a call, and getters have no side effects).
                roots.add(paths[0], f"left{i}")
                roots.add(paths[1], f"right{i}")
                either.append(i)
            else:
                self.namespace[f"get{i}"] = f.get
                self.emit(1, f"v{i} = get{i}(event)")
        if roots.children:
            self.emit(1, "if isinstance(event, dict):")
            self.read(roots, "event", 2)
            self.emit(1, "else:")
            self.emit(2, " = ".join(roots.below()) + " = None")
        for i in either:
            # JMESPath's ``||``: the left value unless it is false (null, false or an empty
            # string, array or object), else the right one.
            left, right = f"left{i}", f"right{i}"
            self.emit(
                1,
                f"v{i} = {right} if {left} is None or {left} is False"
                f" or (not {left} and isinstance({left}, sized)) else {left}",
            )
        tree: dict[str, Any] = {}
        for i, f in enumerate(self.fields):
            out = tree
            for key in f.target[:-1]:
                out = out.setdefault(key, {})
            out[f.target[-1]] = i
        self.emit(1, f"return {self.assemble(tree)}")
        source = "\n".join(self.lines) + "\n"
        # The text is generated here from repr()-quoted keys and local names only, never from
        # rule text as code, so exec runs nothing but the lookups written above.
        exec(compile(source, f"<{name}>", "exec"), self.namespace)  # noqa: S102
        builder: Builder = self.namespace["build_mapping"]
        return builder

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def local(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def read(self, node: _Source, var: str, depth: int) -> None:
        """Read ``node``'s children from ``var`` (known to be a dict) into the fields' locals."""
        for key, child in node.children.items():
            if not child.children and len(child.fields) == 1:
                self.emit(depth, f"{child.fields[0]} = {var}.get({key!r})")
                continue
            step = self.local("s")
            self.emit(depth, f"{step} = {var}.get({key!r})")
            for local in child.fields:
                self.emit(depth, f"{local} = {step}")
            if child.children:
                # One test for every field under this prefix (JMESPath and the path getters
                # read a step of a non-dict as null).
                self.emit(depth, f"if isinstance({step}, dict):")
                self.read(child, step, depth + 1)
                self.emit(depth, "else:")
                self.emit(depth + 1, " = ".join(child.below()) + " = None")

    def assemble(self, tree: dict[str, Any]) -> str:
        """Emit the statements filling one output dict; returns the local holding it."""
        out = self.local("out")
        self.emit(1, f"{out} = {{}}")
        for key, sub in tree.items():
            if isinstance(sub, dict):
                child = self.assemble(sub)
                self.emit(1, f"if {child}:")
                self.emit(2, f"{out}[{key!r}] = {child}")
            elif sub in self.constants:
                if self.constants[sub] is not None:
                    self.namespace[f"const{sub}"] = self.constants[sub]
                    self.emit(1, f"{out}[{key!r}] = const{sub}")
            else:
                self.emit(1, f"if v{sub} is not None:")
                self.emit(2, f"{out}[{key!r}] = v{sub}")
        return out


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

    def get_constant(_event: Any) -> Any:
        return value

    setattr(get_constant, _CONSTANT_ATTR, (value,))
    return get_constant


def target_problem(target: str) -> str | None:
    """What is wrong with a mapping target, if it is not a dotted path of names."""
    for name in target.split("."):
        if not name:
            return (
                "a target is a dotted path of names (custom_data.value); an empty name (two dots "
                'in a row, or a dot at the start or end) would send a key named ""'
            )
        if "[" in name or "]" in name:
            return (
                f"a target is a dotted path of names, and {name!r} indexes a list, which a "
                "target cannot (the key would be sent as written): map the whole list instead, "
                'e.g. custom_data.contents: "properties.items[].{id: id, quantity: quantity}"'
            )
        if name != name.strip():
            return f"the name {name!r} starts or ends with a space"
    return None


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
