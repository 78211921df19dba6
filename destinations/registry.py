"""Discovery of destination plugins through entry points, with contract checks.

Every destination, built-in or third-party, is registered under the ``tagrelay.destinations``
entry-point group; the entry-point name is the ``type:`` used in rule files. A plugin that does
not load or breaks the contract fails when the registry is built (at start), never per request.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from importlib.metadata import entry_points

import jsonschema

from destinations import cleartext
from destinations.base import Destination
from engine.errors import PluginError
from engine.expr import ExpressionError, Field, compile_mapping, path_of, target_problem

GROUP = "tagrelay.destinations"


def check_contract(name: str, cls: object) -> type[Destination]:
    """Check that ``cls`` is a usable destination class registered as ``name``.

    Raises:
        PluginError: naming the plugin and what it breaks.
    """
    if not (isinstance(cls, type) and issubclass(cls, Destination)):
        raise PluginError(f"destination plugin {name!r} is not a subclass of Destination")
    if cls.name != name:
        raise PluginError(
            f"destination plugin {name!r}: class name attribute is {cls.name!r}, "
            "it must equal the entry-point name"
        )
    for attribute in ("settings_schema", "default_mapping"):
        if not isinstance(getattr(cls, attribute), Mapping):
            raise PluginError(
                f"destination plugin {name!r}: {attribute} must be a mapping (a dict), "
                f"not {type(getattr(cls, attribute)).__name__}"
            )
    for attribute, example in (
        ("secret_settings", "frozenset({'access_token'})"),
        ("hashed_fields", "frozenset({'user_data.em'})"),
    ):
        names = getattr(cls, attribute)
        # A str is a collection too: "access_token" would declare its letters.
        if isinstance(names, str) or not (
            isinstance(names, Collection) and all(isinstance(n, str) for n in names)
        ):
            raise PluginError(
                f"destination plugin {name!r}: {attribute} must be a set of names, such as "
                f"{example}"
            )
    fields = cls.mapping_fields
    if fields is not None and (
        isinstance(fields, str)
        or not (isinstance(fields, Collection) and all(isinstance(n, str) for n in fields))
    ):
        raise PluginError(
            f"destination plugin {name!r}: mapping_fields must be None or a set of names, such "
            "as frozenset({'event_name', 'custom_data'})"
        )
    homes = cls.personal_homes
    if not (
        isinstance(homes, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in homes.items())
    ):
        raise PluginError(
            f"destination plugin {name!r}: personal_homes must map each kind of personal data "
            "to a target, such as {'email': 'user_data.em'}"
        )
    if not isinstance(cls.max_batch, int) or isinstance(cls.max_batch, bool) or cls.max_batch < 1:
        raise PluginError(f"destination plugin {name!r}: max_batch must be a positive integer")
    try:
        jsonschema.Draft202012Validator.check_schema(cls.settings_schema)
    except jsonschema.SchemaError as exc:
        raise PluginError(
            f"destination plugin {name!r}: invalid settings_schema: {exc.message}"
        ) from exc
    known = set(cls.settings_schema.get("properties", {}))
    if unknown := sorted(set(cls.secret_settings) - known):
        raise PluginError(
            f"destination plugin {name!r}: secret_settings {unknown} are not in settings_schema"
        )
    for target in cls.default_mapping:
        # As in a tag's mapping: "a..b" would send a key named "", "c[0]" one named "c[0]".
        problem = target_problem(target) if isinstance(target, str) else "it is not text"
        if problem is not None:
            raise PluginError(
                f"destination plugin {name!r}: default_mapping target {target!r}: {problem}"
            )
    try:
        compiled = compile_mapping(cls.default_mapping)
    except ExpressionError as exc:
        raise PluginError(f"destination plugin {name!r}: default_mapping: {exc}") from exc
    if leak := _cleartext_problem(cls, compiled):
        raise PluginError(f"destination plugin {name!r}: {leak}")
    if (
        type(cls).__dict__.get("build_request") is None
        and cls.build_request is Destination.build_request
    ):
        raise PluginError(f"destination plugin {name!r} does not implement build_request")
    return cls


def _cleartext_problem(cls: type[Destination], fields: Sequence[Field]) -> str | None:
    """Where a plugin that hashes personal data (``hashed_fields``) would send it in clear
    text all the same, by its own default mapping or ``personal_homes``, else None.

    ``tagrelay check`` holds a tag's mapping to this; the default mapping is the plugin's, and
    every tag of the plugin sends it.
    """
    hashed = cls.hashed_fields
    if not hashed:
        return None
    for what, home in cls.personal_homes.items():
        if home not in hashed:
            return (
                f"personal_homes names {home!r} for {what}, which is not in hashed_fields: "
                "tagrelay check would tell rule authors to send it there in clear text"
            )
    for field in fields:
        target = ".".join(field.target)
        if target in hashed:
            continue
        name = field.target[-1]
        kind = None if cleartext.names_a_digest(name) else cleartext.kind_of(name)
        if kind is not None:
            return (
                f"default_mapping target {target!r} is named like "
                f"{cleartext.DESCRIPTIONS[kind]} but is not in hashed_fields, so it would be "
                "sent in clear text"
            )
        source = path_of(field.get)
        if source is None or source[:1] != ("user_data",):
            continue
        if len(source) == 1 or cleartext.kind_of(source[1]) is not None:
            sent = "whole user_data" if len(source) == 1 else f"user_data.{source[1]}"
            return (
                f"default_mapping target {target!r} would send the event's {sent}, which is "
                "not in hashed_fields, in clear text"
            )
    return None


@functools.cache
def registry() -> Mapping[str, type[Destination]]:
    """Every installed destination class by type name, checked. Built once per process."""
    found: dict[str, type[Destination]] = {}
    sources: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in sources:
            if sources[ep.name] == ep.value:
                continue  # one distribution seen twice on the path
            # Whichever loaded last would silently take the other's destinations (and their
            # settings and secrets): a built-in's name, or two packages' typo.
            raise PluginError(
                f"two destination plugins are named {ep.name!r} ({sources[ep.name]} and "
                f"{ep.value}): uninstall one"
            )
        sources[ep.name] = ep.value
        try:
            cls = ep.load()
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() at import too
            raise PluginError(
                f"destination plugin {ep.name!r} failed to load: {type(exc).__name__}"
                + (f": {exc}" if str(exc) else "")
            ) from exc
        found[ep.name] = check_contract(ep.name, cls)
    return found


def built_in() -> Mapping[str, type[Destination]]:
    """The destinations tagrelay ships (``destinations.*``), without the installed plugins."""
    return {
        name: cls
        for name, cls in registry().items()
        if cls.__module__.partition(".")[0] == __name__.partition(".")[0]
    }


def get(type_name: str) -> type[Destination] | None:
    """The destination class registered as ``type_name``, or None."""
    return registry().get(type_name)
