"""Reading mapped values as the types a platform takes, refusing what it cannot take.

A tag can map any JSON value to any target, and JMESPath functions can make values JSON has no
text for (``to_number('NaN')`` is a NaN, ``to_number('1e999')`` an infinity). So an adapter never
calls ``float()``, ``int()``, ``str()`` or a string method on a mapped value directly: it reads
the value through these helpers, which either give a value of the right type or raise
:class:`~destinations.base.PayloadError` naming the field, so the tag is recorded as not fired
with the reason instead of the event failing.

The ``field`` argument is the field's name as the adapter's messages spell it, platform prefix
included (``"GA4: params.value"``); the helpers add what is wrong (``... must be a number``).
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from destinations.base import PayloadError


def finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None.

    A JSON number (not a boolean) or text holding one (``" 12.5 "``) counts; NaN, the
    infinities (also written as text: ``"NaN"``, ``"inf"``, ``"1e999"``) and integers beyond
    the range of a float do not.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, str):
        try:
            number = float(value)  # float() trims the whitespace itself
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def scalar_text(value: object) -> str | None:
    """A string as it is, an integer or a finite float as its text; None for anything else.

    Booleans, lists, objects, NaN and the infinities have no sensible text for an ID, a name or
    a URL: ``str()`` would send ``"[1, 2]"`` or ``"nan"`` to the platform.
    """
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:  # more digits than Python will write (sys.get_int_max_str_digits)
            return None
    if isinstance(value, float):
        return str(value) if math.isfinite(value) else None
    return None


def number(value: object, field: str) -> float:
    """``value`` as a finite float (see :func:`finite_float`).

    Raises:
        PayloadError: ``<field> must be a number``.
    """
    found = finite_float(value)
    if found is None:
        raise PayloadError(f"{field} must be a number")
    return found


def integer(value: object, field: str) -> int:
    """``value`` as an integer: a finite number, truncated towards zero (``2.7`` -> ``2``).

    Raises:
        PayloadError: ``<field> must be a number``.
    """
    return int(number(value, field))


def text(value: object, field: str) -> str:
    """``value`` as text for an ID or a name (see :func:`scalar_text`).

    Raises:
        PayloadError: ``<field> must be a string or a number``.
    """
    found = scalar_text(value)
    if found is None:
        raise PayloadError(f"{field} must be a string or a number")
    return found


def check_json(value: object, field: str) -> None:
    """Refuse ``value`` if strict JSON cannot carry it, naming the first place that fails.

    For values passed on to the platform as they were mapped. Strings, numbers, booleans,
    null, lists and objects (dicts) are JSON; NaN and the infinities are not (Python would write
    ``NaN``, which no platform reads), and neither are other Python types.

    Raises:
        PayloadError: ``<field>.<path> must be a finite number`` (or ``... is not a JSON
        value``).
    """
    if _is_json(value):
        return
    path, bad = _first_non_json(value, field)
    if isinstance(bad, float):
        raise PayloadError(f"{path} must be a finite number")
    raise PayloadError(f"{path} is not a JSON value")


def _is_json(value: Any) -> bool:
    # Checked for every passed-on value of every event: the common types are tested first, by
    # identity, before anything is put on the stack. Iterative, because an accepted event may be
    # nested nearly a thousand levels deep.
    stack = [value]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict or kind is list or kind is tuple:
            for inner in value.values() if kind is dict else value:
                inner_kind = type(inner)
                if inner_kind is str or inner is None or inner_kind is int or inner_kind is bool:
                    continue
                if inner_kind is float:
                    if not math.isfinite(inner):
                        return False
                    continue
                stack.append(inner)
        elif kind is str or value is None or kind is int or kind is bool:
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                return False
        elif isinstance(value, dict | list | tuple):  # subclasses (an OrderedDict) are JSON too
            stack.extend(value.values() if isinstance(value, dict) else value)
        elif not isinstance(value, str | int):  # subclasses (a str subclass, an IntEnum) are JSON
            return False
    return True


def _first_non_json(value: Any, path: str) -> tuple[str, Any]:
    """The path of the first value :func:`_is_json` refuses, and that value."""
    while True:
        if isinstance(value, dict):
            key, value = next((k, v) for k, v in value.items() if not _is_json(v))
            path = f"{path}.{key}" if path else str(key)
        elif isinstance(value, list | tuple):
            index, value = next((i, v) for i, v in enumerate(value) if not _is_json(v))
            path = f"{path}[{index}]"
        else:
            return path or "value", value


NON_VALUES = frozenset({"undefined", "null", "NaN", "[object Object]"})
"""What JavaScript writes where a value is missing: ``String(undefined)``, ``String(null)``,
``String(NaN)`` and ``String({})``, as a page or a Node backend sends them in an identifier
(a cookie not set, an object's missing field). Case counts: ``Null`` and ``Nan`` are names."""


def no_value(value: Any) -> TypeGuard[str]:
    """Whether ``value`` is text that names nothing: one of :data:`NON_VALUES`, or blank.

    Such an identifier is no click, cookie or person, and sent as one it is worse than none:
    Google Ads refuses a gclid ``undefined`` (``UNPARSEABLE_GCLID``), and every visitor whose
    ``external_id`` or ``user_id`` is ``undefined`` would be one person to each platform and to
    tagrelay's own visitor links. A set lookup: it runs for each identifier of every event.
    """
    return type(value) is str and (value in NON_VALUES or not value.strip())
