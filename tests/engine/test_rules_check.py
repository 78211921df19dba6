"""`tagrelay check`: every fixture in tests/rules/invalid names the problems it must produce.

Convention for fixtures (a file, or a directory container):

- ``# expect: [FILE:]LINE:COLUMN: MESSAGE`` — an error at that position whose message contains
  MESSAGE. FILE defaults to the file holding the comment (in a directory, a name relative to it).
- ``# expect-warning: [FILE:]LINE:COLUMN: MESSAGE`` — the same for a warning.
- ``# expect-absent: TEXT`` — TEXT (e.g. a secret) appears in no problem at all.

Every expected problem must be found, and an invalid fixture has no unexpected errors. Every
fixture in tests/rules/valid checks with no errors (warnings only where expected) and its own
rule tests pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from destinations import registry
from destinations.base import Destination, PayloadError
from engine.cli import main
from engine.event import normalize
from engine.pipeline import file_times
from engine.rules import compile_container, model
from engine.rules.schema import editor_schema
from engine.rules.source import Problem, rule_files
from engine.rules.testing import run_tests
from engine.store.base import Decision

RULES = Path(__file__).resolve().parents[1] / "rules"
ENV = {"TAGRELAY_FIXTURE_TOKEN": "fixture-token", "TAGRELAY_FIXTURE_EMPTY": ""}
_EXPECT = re.compile(r"^#\s*expect(-warning|-absent)?:\s*(.*)$")
_WHERE = re.compile(r"^(?:(?P<file>[^:\s]+\.ya?ml):)?(?P<line>\d+):(?P<column>\d+):\s*(?P<msg>.+)$")


@dataclass(frozen=True)
class Expected:
    severity: str
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"

    def matches(self, problem: Problem) -> bool:
        pos = problem.position
        return (
            problem.severity == self.severity
            and Path(pos.file).name == self.file
            and (pos.line, pos.column) == (self.line, self.column)
            and self.message in problem.message
        )


def read_expectations(container: Path) -> tuple[list[Expected], list[str]]:
    files = [container] if container.is_file() else sorted(container.glob("*.y*ml"))
    expected, absent = [], []
    for file in files:
        for line in file.read_text().splitlines():
            match = _EXPECT.match(line)
            if not match:
                continue
            kind, rest = match.groups()
            if kind == "-absent":
                absent.append(rest.strip())
                continue
            where = _WHERE.match(rest.strip())
            assert where, f"{file}: unreadable expectation {line!r}"
            expected.append(
                Expected(
                    "warning" if kind == "-warning" else "error",
                    where["file"] or file.name,
                    int(where["line"]),
                    int(where["column"]),
                    where["msg"].strip(),
                )
            )
    return expected, absent


def fixtures(kind: str) -> list[Path]:
    return sorted(p for p in (RULES / kind).iterdir() if not p.name.startswith("."))


ROOT = RULES.parents[1]
EDITOR_SCHEMA = editor_schema(registry.built_in())


@pytest.mark.parametrize(
    "container",
    [*fixtures("valid"), ROOT / "rules", ROOT / "examples" / "ecommerce"],
    ids=lambda p: p.name,
)
def test_the_editor_schema_flags_nothing_check_accepts(container: Path) -> None:
    # An editor that marks a line check takes would teach marketers to ignore its marks.
    validator = jsonschema.Draft202012Validator(EDITOR_SCHEMA)
    for path in rule_files(container):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8-sig")):
            if document is None:
                continue
            problems = [e.message for e in validator.iter_errors(document)]
            assert not problems, f"{path.name}: {problems}"


def test_the_editor_schema_knows_each_destinations_settings() -> None:
    validator = jsonschema.Draft202012Validator(EDITOR_SCHEMA)

    def flags(destination: dict[str, Any]) -> bool:
        return any(validator.iter_errors({"destinations": {"d": destination}}))

    meta = {"type": "meta_capi", "pixel_id": "123", "access_token": "${META_TOKEN}"}
    assert not flags(meta)
    assert flags({**meta, "acess_token": "x"})  # misspelt: the adapter takes no such setting
    assert flags({"type": "meta_capi", "access_token": "x"})  # its pixel_id is missing
    ga4 = {"type": "ga4", "measurement_id": "G-ABC123", "api_secret": "s"}
    assert not flags({**ga4, "validate": True})
    assert not flags({**ga4, "validate": "${GA4_VALIDATE:-false}"})  # what check reads first
    assert flags({**ga4, "validate": "yes"})
    assert not flags({"type": "not_installed_here", "anything": 1})  # a plugin's: any text
    described = EDITOR_SCHEMA["properties"]["destinations"]["additionalProperties"]
    meta_then = next(
        r["then"]
        for r in described["allOf"]
        if r["if"]["properties"]["type"]["const"] == "meta_capi"
    )
    assert meta_then["properties"]["pixel_id"]["description"] == "The pixel (dataset) ID."


@pytest.mark.parametrize("container", fixtures("invalid"), ids=lambda p: p.name)
def test_invalid_fixture_reports_the_errors_it_names(container: Path) -> None:
    expected, absent = read_expectations(container)
    assert expected, f"{container.name} names no expected error"

    compiled, problems = compile_container(container, ENV)

    assert compiled is None
    shown = "\n".join(str(p) for p in problems)
    for want in expected:
        assert any(want.matches(p) for p in problems), f"missing {want}\ngot:\n{shown}"
    unexpected = [
        p for p in problems if p.severity == "error" and not any(w.matches(p) for w in expected)
    ]
    assert not unexpected, f"unexpected errors:\n{shown}"
    for text in absent:
        assert text not in shown


@pytest.mark.parametrize("container", fixtures("valid"), ids=lambda p: p.name)
def test_valid_fixture_checks_clean_and_its_tests_pass(container: Path) -> None:
    expected, _ = read_expectations(container)

    compiled, problems = compile_container(container, ENV)

    assert compiled is not None, "\n".join(str(p) for p in problems)
    warnings = [p for p in problems if p.severity == "warning"]
    assert len(warnings) == len(expected)
    for want in expected:
        assert any(want.matches(p) for p in warnings), f"missing {want}"
    failed = [r for r in run_tests(compiled) if not r.passed]
    assert not failed, [r.differences for r in failed]


def test_every_fixture_convention_line_is_readable() -> None:
    for container in fixtures("invalid") + fixtures("valid"):
        read_expectations(container)  # asserts on malformed lines


def test_env_variable_is_substituted_and_default_used_only_when_unset(tmp_path: Path) -> None:
    rules = tmp_path / "env.yaml"
    rules.write_text(
        "destinations:\n"
        "  a: {type: webhook, url: '${HOOK_URL:-https://default.example/}'}\n"
        "  b: {type: webhook, url: '${OTHER_URL:-https://default.example/}'}\n"
    )

    compiled, _ = compile_container(rules, {"HOOK_URL": "https://set.example/in"})

    assert compiled is not None
    assert compiled.destinations["a"].adapter.settings["url"] == "https://set.example/in"
    assert compiled.destinations["b"].adapter.settings["url"] == "https://default.example/"


@pytest.mark.parametrize(
    ("written", "sent"),
    [
        ("$${LITERAL}", "${LITERAL}"),
        ("$${not a name} $${", "${not a name} ${"),  # whatever follows it
    ],
)
def test_dollar_dollar_is_a_literal_dollar_brace(tmp_path: Path, written: str, sent: str) -> None:
    rules = tmp_path / "env.yaml"
    rules.write_text(
        "destinations:\n"
        f"  a: {{type: webhook, url: 'https://x.example/', headers: {{X: '{written}'}}}}\n"
    )

    compiled, problems = compile_container(rules, {})

    assert compiled is not None, [str(p) for p in problems]
    assert compiled.destinations["a"].adapter.settings["headers"] == {"X": sent}


def test_missing_container_is_reported_not_raised(tmp_path: Path) -> None:
    compiled, problems = compile_container(tmp_path / "nowhere", {})

    assert compiled is None
    assert [p.message for p in problems] == [
        "no rule files found (expected *.yaml files or a YAML file)"
    ]


def test_settings_are_compiled_into_the_container(write_rules) -> None:  # type: ignore[no-untyped-def]
    container = write_rules(
        """
        settings:
          dedup_window: 90m
          consent_defaults: {analytics_storage: granted}
        destinations:
          log: {type: log}
        """
    )

    compiled, _ = compile_container(container, {})

    assert compiled is not None
    assert compiled.dedup_window == 5400.0
    assert compiled.consent_defaults == {"analytics_storage": "granted"}


# -- the CLI ----------------------------------------------------------------------------------


def test_check_cli_prints_each_problem_as_file_line_column_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = RULES / "invalid" / "every_error_is_reported.yaml"

    code = main(["check", str(path)])

    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[:3] == [
        f"{path}:10:14: error: tag a: unknown trigger 'purchse' (triggers: purchase)",
        f"{path}:14:18: error: tag b: unknown destination 'webhok' (destinations: log)",
        f"{path}:18:22: error: unknown variable $valu (variables: none defined)",
    ]
    assert out[-1] == f"{path}: 3 errors"


def test_check_cli_exits_0_on_a_valid_container_and_summarizes_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = RULES / "valid" / "minimal.yaml"

    code = main(["check", str(path)])

    assert code == 0
    assert capsys.readouterr().out == f"{path}: ok (1 destinations, 1 tags, 0 tests)\n"


def test_check_cli_prints_warnings_but_still_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    path = RULES / "valid" / "unused_trigger.yaml"

    code = main(["check", str(path)])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == f"{path}:6:3: warning: trigger spare is not used by any tag"
    assert out[1].startswith(f"{path}: ok")


def test_check_cli_on_a_missing_path_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", str(tmp_path / "missing")])

    assert code == 1
    assert "no rule files found" in capsys.readouterr().out


def test_shipped_default_rules_check_clean() -> None:
    compiled, problems = compile_container(Path(__file__).resolve().parents[2] / "rules", {})

    assert compiled is not None, "\n".join(str(p) for p in problems)


def test_files_in_hidden_directories_are_not_rules_and_upper_case_endings_are(
    tmp_path: Path,
) -> None:
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text("on: [push]\njobs: {}\n")
    (tmp_path / ".hidden.yaml").write_text("on: [push]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "TAGS.YAML").write_text(
        "destinations:\n  log: {type: log}\ntriggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: log_all, trigger: all, destination: log}\n"
    )

    compiled, problems = compile_container(tmp_path, {})

    assert compiled is not None, "\n".join(str(p) for p in problems)
    assert [t.name for t in compiled.tags] == ["log_all"]


def test_a_rule_file_linked_to_nothing_is_an_error_not_left_out(tmp_path: Path) -> None:
    # A deploy that lost the file a link points to must not serve the container without it.
    (tmp_path / "default.yaml").write_text("destinations:\n  log: {type: log}\n")
    (tmp_path / "tags.yaml").symlink_to(tmp_path / "shared" / "tags.yaml")

    compiled, problems = compile_container(tmp_path, {})

    assert compiled is None
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'tags.yaml'}:1:1: error: the file is a symbolic link to "
        f"{tmp_path / 'shared' / 'tags.yaml'}, which does not exist: restore what it points "
        "to, or remove the link"
    ]
    assert file_times(tmp_path)[str(tmp_path / "tags.yaml")] == 0.0  # its return is a change


def test_a_linked_directory_is_read_and_a_link_back_up_read_once(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tags.yaml").write_text(
        "destinations:\n  log: {type: log}\ntriggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: log_all, trigger: all, destination: log}\n"
    )
    container = tmp_path / "rules"
    container.mkdir()
    (container / "shared").symlink_to(shared)
    (shared / "up").symlink_to(tmp_path)  # rules/shared/up/rules/shared/...: a loop

    compiled, problems = compile_container(container, {})

    assert compiled is not None, "\n".join(str(p) for p in problems)
    assert [t.name for t in compiled.tags] == ["log_all"]


# -- odd YAML ---------------------------------------------------------------------------------


def test_a_file_nested_thousands_deep_is_a_problem_at_its_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = tmp_path / "deep.yaml"
    rules.write_text(
        "tests:\n  - name: deep\n"
        f"    event: {{event_name: a, properties: {{p: {'[' * 3000}{']' * 3000}}}}}\n"
        "    expect: {}\n"
    )

    code = main(["check", str(rules)])

    out = capsys.readouterr().out
    assert code == 1
    assert f"{rules}:3:" in out
    assert "nested more than 100 levels deep" in out
    assert "Traceback" not in out


def test_a_control_character_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    rules = tmp_path / "triggers.yaml"
    # A backspace pasted into a value on line 3, column 22 (from a chat or a word processor).
    rules.write_text("triggers:\n  a: {event: x}\n  b: {event: purchase\b}\n")

    _, problems = compile_container(rules, {})

    assert [str(p) for p in problems] == [
        f"{rules}:3:22: error: YAML syntax error: the character U+0008 is not allowed in a rule "
        "file (a control character, often pasted in unseen): retype the text around it"
    ]


def test_a_file_not_saved_as_utf8_is_reported_at_its_first_bad_byte(tmp_path: Path) -> None:
    rules = tmp_path / "triggers.yaml"
    # Saved as Latin-1 by an editor: the é of the event name is one byte, 0xE9, and the é of
    # the comment before it (UTF-8) counts as one column.
    rules.write_bytes("# café\ntriggers:\n  achat: {event: é_effectu".encode() + b"\xe9}\n")

    compiled, problems = compile_container(rules, {})

    assert compiled is None
    assert [str(p) for p in problems] == [
        f"{rules}:3:27: error: the file is not UTF-8 text (byte 0xE9 here is not UTF-8): save "
        "it as UTF-8 in your editor"
    ]


# -- deep expressions -------------------------------------------------------------------------

DEEP_RULES = """
destinations:
  log: {{type: log}}
variables: {{v1: "{v1}", v2: "{v2}"}}
triggers:
  t: {{event: x, when: "{when}"}}
tags:
  - {{name: a, trigger: t, destination: log}}
"""


def _or_chain(first: str, terms: int) -> str:
    return " || ".join([first, *(f"properties.a{i}" for i in range(terms - 1))])


V1 = "!!" * 20 + "(properties.v)"  # 42 levels
V2 = "!!" * 14 + "$v1"  # 28 more: 70


def test_a_flat_chain_of_hundreds_of_alternatives_is_no_deeper_than_a_short_one(
    write_rules: Callable[..., Path],
) -> None:
    # ``||`` and ``&&`` chains are regrouped as balanced trees: a marketer's list of 400
    # alternatives checks and runs, and each term is still tried in order.
    when = _or_chain("properties.b", 400) + " || properties.v"
    rules = DEEP_RULES.format(v1="properties.v", v2="properties.v", when=when)
    container, problems = compile_container(write_rules(rules), {})
    assert container is not None, [str(p) for p in problems]

    def fired(properties: dict[str, Any]) -> bool:
        event = normalize({"event_name": "x", "properties": properties}, datetime.now(UTC))
        (decision,) = container.evaluate(event)
        return decision.fired

    assert fired({"v": 1})  # the last term
    assert fired({"a398": "yes"})  # the one before
    assert not fired({"a398": False, "b": ""})


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("(" * 1000 + "properties.a" + ")" * 1000, "the expression is nested too deeply to read"),
        (
            "properties.a || (" * 150 + "properties.z" + ")" * 150,
            "the expression is nested 152 levels deep",
        ),
        ("!" * 150 + "properties.a", "the expression is nested 152 levels deep"),
        (
            "!!" * 20 + "$v2",
            "with the variables it uses, the expression is nested 110 levels deep",
        ),
    ],
    ids=["parentheses", "nested-or", "not-chain", "through-variables"],
)
def test_an_expression_nested_too_deeply_is_a_problem_at_its_position_not_a_crash(
    write_rules: Callable[..., Path], when: str, message: str
) -> None:
    rules = DEEP_RULES.format(v1=V1, v2=V2, when=when)

    _, problems = compile_container(write_rules(rules), {})  # must not raise

    errors = [str(p) for p in problems if p.severity == "error"]
    assert len(errors) == 1, errors
    assert ":5:23: error: trigger t when: " in errors[0]
    assert f"{message}, more than the 100 levels allowed" in errors[0]


def test_an_expression_at_the_depth_limit_is_evaluated_deep_in_a_request(
    write_rules: Callable[..., Path],
) -> None:
    """Evaluating recurses about twice per level: at the limit, far from Python's own, even
    when the server's stack is deep already (here 500 frames)."""
    rules = DEEP_RULES.format(v1=V1, v2=V2, when="!!" * 15 + "$v2")  # 70, 30 more: 100
    container, problems = compile_container(write_rules(rules), {})
    assert container is not None, [str(p) for p in problems]
    event = normalize({"event_name": "x", "properties": {"v": 1}}, datetime.now(UTC))

    def deep(frames: int) -> list[Decision]:
        return deep(frames - 1) if frames else container.evaluate(event)

    (decision,) = deep(500)

    assert decision.fired, decision.reason


def test_a_plugin_that_rejects_its_settings_never_gets_them_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Picky(Destination):
        """Quotes its settings back, as foreign code may."""

        name = "picky"
        secret_settings = frozenset({"token"})
        settings_schema = {"type": "object", "properties": {"token": {}, "url": {}}}

        def __init__(self, settings: Mapping[str, Any]) -> None:
            raise ValueError(f"bad settings: {dict(settings)}")

    monkeypatch.setattr(registry, "registry", lambda: {"picky": Picky})
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  p: {type: picky, token: 8471, url: 'https://x.example/?key=abcdef'}\n"
    )

    _, problems = compile_container(rules, {})

    shown = "\n".join(map(str, problems))
    assert "rejected its settings" in shown
    assert "8471" not in shown and "abcdef" not in shown


@pytest.mark.parametrize(
    ("answer", "error"), [(RuntimeError("bug"), "RuntimeError"), (1, "TypeError")]
)
def test_an_adapter_whose_anonymous_check_fails_gets_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, answer: Any, error: str
) -> None:
    def hook(self: Destination, event_names: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(registry.registry()["google_ads"], "anonymous_warning", hook)
    path = RULES / "valid" / "google_ads_tag_without_identifiers.yaml"

    container, problems = compile_container(path, ENV)

    assert container is not None
    assert [p.message for p in problems] == [
        f"tag {tag}: the google_ads adapter could not check its copies without identifiers: {error}"
        for tag in ("sale_anon", "refund_anon")
    ]


def test_a_plugins_payload_error_never_quotes_its_secret_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reason is stored with the event and shown by preview; check_item's was redacted.
    class Quoting(Destination):
        name = "quoting"
        secret_settings = frozenset({"token"})
        settings_schema = {"type": "object", "properties": {"token": {}}}

        def build_payload(self, mapped: dict[str, Any], ctx: Any) -> dict[str, Any]:
            raise PayloadError(f"refused with token {self.settings['token']}")

    monkeypatch.setattr(registry, "registry", lambda: {"quoting": Quoting})
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  q: {type: quoting, token: tok_84712345}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: q}\n"
    )
    container, _ = compile_container(rules, {})
    assert container is not None

    (decision,) = container.evaluate(
        normalize({"event_name": "x"}, datetime.now(UTC)), now=datetime.now(UTC)
    )

    assert not decision.fired
    assert decision.reason == "invalid payload: refused with token [REDACTED]"


class BrokenSecrets(Destination):
    """A plugin whose ``secrets`` raises (quoting its secret, as a bug's message may), and
    whose ``build_payload`` and ``constant_problem`` refuse with a reason to redact."""

    name = "broken_secrets"
    secret_settings = frozenset({"token"})
    settings_schema = {"type": "object", "properties": {"token": {}}}

    def secrets(self) -> list[str]:
        raise RuntimeError(f"no secrets today: {self.settings['token']}")

    def build_payload(self, mapped: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise PayloadError("refused")

    def constant_problem(self, target: str, value: Any) -> str | None:
        return "not that constant"

    def build_request(self, items: Any, ctx: Any) -> Any:
        raise NotImplementedError


def broken_secrets_rules(tmp_path: Path, mapping: str = "") -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  b: {type: broken_secrets, token: tok_84712345}\n"
        "triggers:\n  all: {event: '*'}\n"
        f"tags:\n  - {{name: t, trigger: all, destination: b{mapping}}}\n"
    )
    return rules


def test_a_plugins_payload_error_with_a_failing_redaction_leaves_the_tag_unfired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The RuntimeError went up through the pipeline: /v1/track answered 500 and the event,
    # with its other tags, was not accepted.
    monkeypatch.setattr(registry, "registry", lambda: {"broken_secrets": BrokenSecrets})
    container, _ = compile_container(broken_secrets_rules(tmp_path), {})
    assert container is not None

    (decision,) = container.evaluate(
        normalize({"event_name": "x"}, datetime.now(UTC)), now=datetime.now(UTC)
    )

    assert not decision.fired
    assert decision.reason == (
        "invalid payload: (reason withheld: RuntimeError in the adapter's redaction)"
    )


def test_a_plugins_constant_problem_with_a_failing_redaction_is_a_check_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `tagrelay check` ended in a traceback that printed the secret.
    monkeypatch.setattr(registry, "registry", lambda: {"broken_secrets": BrokenSecrets})
    rules = broken_secrets_rules(tmp_path, ", mapping: {currency: {value: EURO}}")

    status = main(["check", str(rules)])

    out = capsys.readouterr()
    assert status == 1
    assert (
        "tag t mapping currency: (reason withheld: RuntimeError in the adapter's redaction), "
        "so b (broken_secrets) would refuse every event of the tag"
    ) in out.out + out.err
    assert "tok_84712345" not in out.out + out.err


def test_a_plugin_that_exits_in_its_constructor_is_a_check_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tagrelay check` ended with its status 3 and no word of why.
    class Quitter(Destination):
        name = "quitter"

        def __init__(self, settings: Mapping[str, Any]) -> None:
            raise SystemExit(3)

    monkeypatch.setattr(registry, "registry", lambda: {"quitter": Quitter})
    rules = tmp_path / "rules.yaml"
    rules.write_text("destinations:\n  q: {type: quitter}\n")

    container, problems = compile_container(rules, {})

    assert container is None
    assert "destination q (quitter) rejected its settings: 3" in "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (RuntimeError("bug"), "RuntimeError"),
        (None, None),
        ("text", "ValueError"),
        ([1], "TypeError"),
    ],
)
def test_an_adapter_whose_mapping_check_fails_gets_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, answer: Any, error: str | None
) -> None:
    def hook(self: Destination, event_names: Any, targets: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(registry.registry()["google_ads"], "mapping_warnings", hook)
    path = RULES / "valid" / "google_ads_address_on_a_click_conversion.yaml"

    container, problems = compile_container(path, ENV)

    assert container is not None
    assert [p.message for p in problems] == [
        f"tag {tag}: the google_ads adapter could not check the mapping: {error}"
        for tag in (
            "click",
            "own_name",
            "refund",
            "enhancement",
            "removed",
            "unknowable",
            "enhancements_only",
        )
        if error
    ]


@pytest.mark.parametrize(
    ("answer", "error"), [(RuntimeError("bug"), "RuntimeError"), (1, "TypeError")]
)
def test_an_adapter_whose_constant_check_fails_gets_a_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: Any, error: str
) -> None:
    def hook(self: Destination, target: str, value: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(registry.registry()["log"], "constant_problem", hook)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  l: {type: log}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: l, mapping: {x: {value: 1}}}\n"
    )

    container, problems = compile_container(rules, {})

    assert container is not None
    assert [p.message for p in problems] == [
        f"tag t: the log adapter could not check the constant of x: {error}"
    ]


def test_a_constant_the_adapter_refuses_is_said_without_the_adapters_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Quoting(Destination):
        name = "quoting"
        secret_settings = frozenset({"token"})
        settings_schema = {"type": "object", "properties": {"token": {}}}

        def constant_problem(self, target: str, value: Any) -> str | None:
            return f"{target} refused with token {self.settings['token']}"

    monkeypatch.setattr(registry, "registry", lambda: {"quoting": Quoting})
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  q: {type: quoting, token: tok_84712345}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: q, mapping: {x: {value: 1}}}\n"
    )

    container, problems = compile_container(rules, {})

    assert container is None
    assert [p.message for p in problems] == [
        "tag t mapping x: x refused with token [REDACTED], so q (quoting) would refuse every "
        "event of the tag"
    ]


def test_a_test_whose_event_intake_would_refuse_is_a_warning_where_it_is_written(
    tmp_path: Path,
) -> None:
    # It failed `tagrelay test` ("the test event is invalid") with no word from `check`. A
    # warning: a test never keeps the rules from serving.
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  hook: {type: log}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: hook}\n"
        "tests:\n"
        "  - name: an old order\n"
        "    event: {event_name: purchase, timestamp: '1999-01-01T00:00:00Z'}\n"
        "    expect: {t: {fired: true}}\n"
        "  - name: a page's event\n"
        "    event: {event_name: purchase, source: browser,\n"
        "            context: {page_url: 'https://a.example/?gclid=1'}}\n"
        "    expect: {t: {fired: true}}\n"
        "  - name: a typo\n"
        "    event: {event_name: purchase, propertes: {value: 1}}\n"
        "    expect: {t: {fired: true}}\n"
    )

    container, problems = compile_container(rules, {})

    assert container is not None
    assert [(p.severity, p.position.line, p.message) for p in problems] == [
        (
            "warning",
            9,
            "test 'an old order': the event is invalid, so the test fails: timestamp is before "
            "the year 2000",
        ),
        (
            "warning",
            16,
            "test 'a typo': the event is invalid, so the test fails: unknown field 'propertes' "
            "in event",
        ),
    ]


def test_a_plugins_mapping_and_anonymous_warnings_are_said_without_its_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Quoting(Destination):
        name = "quoting"
        secret_settings = frozenset({"token"})
        settings_schema = {"type": "object", "properties": {"token": {}}}

        def mapping_warnings(self, event_names: Any, targets: Any) -> dict[str, str]:
            return {"x": f"x is dropped (token {self.settings['token']})"}

        def anonymous_warning(self, event_names: Any) -> str | None:
            return f"copies are refused with token {self.settings['token']}"

    monkeypatch.setattr(registry, "registry", lambda: {"quoting": Quoting})
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n  q: {type: quoting, token: tok_84712345}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: q, mapping: {x: {value: 1}},\n"
        "     consent: {anonymous: [analytics_storage]}}\n"
    )

    container, problems = compile_container(rules, {})

    assert container is not None
    assert sorted(p.message for p in problems) == [
        "tag t: copies are refused with token [REDACTED]",
        "tag t: x is dropped (token [REDACTED])",
    ]


def test_a_plugins_secrets_given_as_one_text_redact_that_text_not_each_letter() -> None:
    class OneText(Destination):
        name = "one_text"

        def secrets(self) -> Any:
            return "tok_84712345"

    assert OneText({}).redact_text("sent tok_84712345 to the API") == "sent [REDACTED] to the API"


def test_a_short_dedup_window_written_with_a_unit_is_not_said_to_lack_one(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "settings: {dedup_window: 2m}\n"
        "destinations:\n  l: {type: log}\n"
        "triggers:\n  all: {event: '*'}\n"
        "tags:\n  - {name: t, trigger: all, destination: l}\n"
    )

    container, problems = compile_container(rules, {})

    assert container is not None
    assert [p.message for p in problems] == [
        "dedup_window is 120 s: a repeat of an event ID, or the second copy of an order, that "
        "comes later is forwarded again; a signed request may be replayed for 5 minutes"
    ]


def test_an_adapter_whose_redaction_fails_is_logged_once_a_minute_not_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It fails for every event its tags refuse: an ERROR line each flooded the log.
    class Broken(Destination):
        name = "broken_redaction"

        def secrets(self) -> list[str]:
            raise RuntimeError("bug")

    adapter = Broken({})
    with caplog.at_level(logging.ERROR):
        reasons = [model.redacted(adapter, f"refused event {n}") for n in range(5)]

    assert set(reasons) == {"(reason withheld: RuntimeError in the adapter's redaction)"}
    assert [r.message for r in caplog.records].count(
        "destination adapter failed to redact a reason; it is withheld"
    ) == 1
