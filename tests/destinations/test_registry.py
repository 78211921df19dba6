"""The plugin registry: entry-point discovery and the contract a plugin class must meet."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from destinations import registry
from destinations.base import Destination, HttpRequest, Item, SendContext
from destinations.webhook import Webhook
from engine.errors import PluginError


class Impostor(Webhook):
    """A plugin that also calls itself ``webhook`` (a typo'd or malicious package)."""


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    registry.registry.cache_clear()
    yield
    registry.registry.cache_clear()


def _install(root: Path, name: str, value: str) -> None:
    """A distribution on ``root`` whose one entry point is ``name = value``."""
    info = root / f"tagrelay_{root.name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: tagrelay-{root.name}\n")
    (info / "entry_points.txt").write_text(f"[tagrelay.destinations]\n{name} = {value}\n")


@pytest.mark.usefixtures("fresh_registry")
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_plugin_named_like_another_stops_the_start_instead_of_shadowing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, position: str
) -> None:
    # Whichever loaded last would take the webhook destinations, their secrets included.
    _install(tmp_path, "webhook", f"{__name__}:Impostor")
    path = [str(tmp_path), *sys.path] if position == "first" else [*sys.path, str(tmp_path)]
    monkeypatch.setattr(sys, "path", path)

    with pytest.raises(PluginError, match=r"two destination plugins are named 'webhook' \("):
        registry.registry()


@pytest.mark.usefixtures("fresh_registry")
def test_one_distribution_found_twice_on_the_path_is_no_clash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        _install(tmp_path / copy, "impostor_twice", "destinations.webhook:Webhook")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path / "a"), str(tmp_path / "b")])

    with pytest.raises(PluginError, match="class name attribute is 'webhook'"):
        registry.registry()  # loaded once, and checked: no "two plugins" error


@pytest.mark.usefixtures("fresh_registry")
def test_a_plugin_that_exits_at_import_is_a_plugin_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its sys.exit() ended `tagrelay check` (and serve) without a word of why.
    (tmp_path / "quitting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    _install(tmp_path, "quitting", "quitting_plugin:Plugin")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "quitting_plugin", raising=False)

    with pytest.raises(PluginError) as refused:
        registry.registry()

    assert str(refused.value) == "destination plugin 'quitting' failed to load: SystemExit: 3"


def _plugin(**attrs: Any) -> type[Destination]:
    def build_request(self: Destination, items: Sequence[Item], ctx: SendContext) -> HttpRequest:
        return HttpRequest("POST", "https://example.invalid/")

    return type(
        "Broken", (Destination,), {"name": "broken", "build_request": build_request, **attrs}
    )


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"settings_schema": True}, "settings_schema must be a mapping (a dict), not bool"),
        ({"default_mapping": None}, "default_mapping must be a mapping (a dict), not NoneType"),
        # Each of these passed the start, then failed later: a traceback from `tagrelay check`
        # (personal_homes), a secret of the letters of its name, hashed fields by substring.
        (
            {"personal_homes": ["user_data.em"]},
            "personal_homes must map each kind of personal data to a target, such as "
            "{'email': 'user_data.em'}",
        ),
        (
            {"personal_homes": {"email": None}},
            "personal_homes must map each kind of personal data to a target, such as "
            "{'email': 'user_data.em'}",
        ),
        (
            {"secret_settings": "token"},
            "secret_settings must be a set of names, such as frozenset({'access_token'})",
        ),
        (
            {"hashed_fields": "user_data.em"},
            "hashed_fields must be a set of names, such as frozenset({'user_data.em'})",
        ),
        (
            {"mapping_fields": "params"},
            "mapping_fields must be None or a set of names, such as "
            "frozenset({'event_name', 'custom_data'})",
        ),
        # Targets a tag's mapping may not have: keys named "" and "c[0]" went out, and a
        # number crashed `tagrelay check` with a traceback.
        (
            {"default_mapping": {"a..b": "event_id"}},
            "default_mapping target 'a..b': a target is a dotted path of names "
            "(custom_data.value); an empty name (two dots in a row, or a dot at the start or "
            'end) would send a key named ""',
        ),
        (
            {"default_mapping": {"contents[0].id": "event_id"}},
            "default_mapping target 'contents[0].id': a target is a dotted path of names, and "
            "'contents[0]' indexes a list, which a target cannot (the key would be sent as "
            "written): map the whole list instead, e.g. custom_data.contents: "
            '"properties.items[].{id: id, quantity: quantity}"',
        ),
        ({"default_mapping": {1: "event_id"}}, "default_mapping target 1: it is not text"),
        (
            {"hashed_fields": frozenset({("user_data", "em")})},
            "hashed_fields must be a set of names, such as frozenset({'user_data.em'})",
        ),
        ({"max_batch": True}, "max_batch must be a positive integer"),  # a bool is an int
        # A hashing plugin's own default mapping that sends personal data past its hashed
        # fields (a typo of its target): every event went out with it in clear text, and
        # neither the start nor `tagrelay check` said a word.
        (
            {
                "hashed_fields": frozenset({"user.em"}),
                "default_mapping": {"user.email": "user_data.email"},
            },
            "default_mapping target 'user.email' is named like an e-mail address but is not "
            "in hashed_fields, so it would be sent in clear text",
        ),
        (
            {"hashed_fields": frozenset({"user.em"}), "default_mapping": {"note": "user_data"}},
            "default_mapping target 'note' would send the event's whole user_data, which is "
            "not in hashed_fields, in clear text",
        ),
        (
            {
                "hashed_fields": frozenset({"user.em"}),
                "default_mapping": {"contact": "user_data.phone"},
            },
            "default_mapping target 'contact' would send the event's user_data.phone, which "
            "is not in hashed_fields, in clear text",
        ),
        (
            {"hashed_fields": frozenset({"user.em"}), "personal_homes": {"email": "user.mail"}},
            "personal_homes names 'user.mail' for email, which is not in hashed_fields: "
            "tagrelay check would tell rule authors to send it there in clear text",
        ),
    ],
)
def test_a_wrongly_typed_class_attribute_is_a_plugin_error_naming_it(
    attrs: dict[str, Any], message: str
) -> None:
    # It passed the JSON Schema check (True is a valid schema), then crashed the start.
    with pytest.raises(PluginError) as refused:
        registry.check_contract("broken", _plugin(**attrs))

    assert str(refused.value) == f"destination plugin 'broken': {message}"
