"""The repository keeps its promises: generated files in sync, docs naming real commands."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from pathlib import Path

import engine.ratelimit
import engine.store.base
from destinations import registry
from engine.cli import build_parser
from engine.consent import TRACKING_PARAMS
from engine.rules import compile_container
from engine.rules.schema import editor_schema
from engine.rules.testing import run_tests

ROOT = Path(__file__).resolve().parents[1]


def test_committed_rule_schema_matches_the_code() -> None:
    committed = json.loads((ROOT / "rules" / "tagrelay.schema.json").read_text())
    assert committed == json.loads(json.dumps(editor_schema(registry.built_in()))), (
        "rules/tagrelay.schema.json is stale: run "
        "`tagrelay schema --built-in -o rules/tagrelay.schema.json`"
    )


def test_the_readme_names_every_url_parameter_anonymous_forwarding_strips() -> None:
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| not all of it,"))
    named = {name.lower() for name in re.findall(r"`([A-Za-z_]+)`", row)}

    assert not TRACKING_PARAMS - named, "README Consent table: add these parameters"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_cli_command_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    commands |= {flag for action in parser._actions for flag in action.option_strings}
    mentioned = {
        line.split("`tagrelay ", 1)[1].split()[0].rstrip("`|*,")
        for line in readme.splitlines()
        if "`tagrelay " in line
    }
    assert mentioned <= commands, mentioned - commands


def test_the_readme_rule_example_checks_clean_and_its_tests_pass(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```yaml\n")[1:]
    example = next(b.split("```", 1)[0] for b in blocks if b.startswith("settings:"))
    (tmp_path / "rules.yaml").write_text(example)

    container, problems = compile_container(tmp_path, {"META_ACCESS_TOKEN": "token"})

    assert container is not None, "\n".join(map(str, problems))
    assert "test_event_code" not in container.destinations["meta"].adapter.settings
    failed = [r.differences for r in run_tests(container) if not r.passed]
    assert not failed


# Wording that promises a store shared by several hosts, or a Redis backend.
_SEVERAL_HOSTS = re.compile(
    r"redis|scale[- ]out|several hosts|many hosts|other hosts|hosts sharing|on hosts|"
    r"every host\b|and hosts?\b",
    re.IGNORECASE,
)


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.:;!?])\s+", " ".join(text.split()))


def test_the_docs_promise_several_hosts_and_redis_only_as_planned() -> None:
    backends = {
        path.stem for path in (ROOT / "engine" / "store").iterdir() if path.stem != "__pycache__"
    } - {"__init__", "base"}
    docs = {
        "README.md": (ROOT / "README.md").read_text(),
        "engine/store/base.py": str(engine.store.base.__doc__),
        "Store.secret": str(engine.store.base.Store.secret.__doc__),
        "engine/ratelimit.py": str(engine.ratelimit.__doc__),
    }

    promises = [
        (name, sentence)
        for name, text in docs.items()
        for sentence in _sentences(text)
        if _SEVERAL_HOSTS.search(sentence)
        and not re.search(r"\bplanned\b|\bwith a backend", sentence)
    ]

    assert backends == {"sqlite"}, "a new backend: say in the docs what it makes true"
    assert not promises, "only SQLite exists (one host); say that Redis is planned"


def test_the_plugin_test_kit_is_installed_with_tagrelay() -> None:
    # README "Writing a destination": a plugin built against an installed tagrelay tests with
    # destinations.testkit, so the kit must be a package the build ships.
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    shipped = find["find"]["include"]

    assert any(fnmatch.fnmatch("destinations.testkit", pattern) for pattern in shipped)
    assert (ROOT / "destinations" / "testkit" / "__init__.py").is_file()
    assert "class LoopbackServer" in (ROOT / "destinations" / "testkit" / "server.py").read_text()
