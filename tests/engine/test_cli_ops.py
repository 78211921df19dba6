"""The operator's commands: the metrics directory of `serve`, store commands on a store that
must exist."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import cli
from engine.cli import main
from engine.config import Settings
from engine.errors import ConfigError

WriteRules = Callable[..., Path]
T0 = 1_795_185_045.0
RULES = """
destinations:
  log: {type: log}
triggers:
  all: {event: "*"}
tags:
  - {name: log_all, trigger: all, destination: log}
"""


@pytest.fixture(autouse=True)
def no_tagrelay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TAGRELAY_"):
            monkeypatch.delenv(name)


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


# -- the metrics directory ----------------------------------------------------------------------


@pytest.fixture
def no_metrics_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROMETHEUS_MULTIPROC_DIR unset now and restored after; no lock held after the test."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(cli, "_metrics_lock_fd", None)


def test_a_metrics_directory_that_does_not_exist_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_metrics_dir: None
) -> None:
    configured = tmp_path / "prom" / "multiproc"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(configured))

    cli._metrics_dir(Settings(data_dir=tmp_path / "data"))

    assert configured.is_dir()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(configured)


def test_a_metrics_directory_that_cannot_be_made_refuses_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_metrics_dir: None
) -> None:
    (tmp_path / "afile").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "afile" / "metrics"))

    with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR .* cannot hold the metrics"):
        cli._metrics_dir(Settings(data_dir=tmp_path / "data"))


def test_instances_sharing_a_data_directory_keep_their_own_metrics(
    tmp_path: Path, no_metrics_dir: None
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    (tmp_path / "data").mkdir()

    cli._metrics_dir(settings)  # a first instance, still running
    first, first_lock = Path(os.environ.pop("PROMETHEUS_MULTIPROC_DIR")), cli._metrics_lock_fd
    (first / "counter_1.db").write_bytes(b"counts")
    cli._metrics_dir(settings)  # a second one starts beside it
    second, second_lock = Path(os.environ.pop("PROMETHEUS_MULTIPROC_DIR")), cli._metrics_lock_fd

    assert first != second
    assert (first / "counter_1.db").read_bytes() == b"counts"
    assert first.parent == second.parent == tmp_path / "data" / "metrics"

    assert first_lock is not None
    os.close(first_lock)  # the first instance stops
    cli._metrics_dir(settings)  # a third one cleans up after it
    assert not first.exists()
    assert second.exists()
    for fd in (second_lock, cli._metrics_lock_fd):
        assert fd is not None
        os.close(fd)


# -- a store that must exist --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["deadletters", "list"],
        ["deadletters", "show", "1"],
        ["forget", "--user-id", "u1"],
        ["purge"],
        ["replay", "--destination", "log", "--since", "1h"],
    ],
)
def test_a_mistyped_data_directory_is_an_error_not_a_new_store(
    argv: list[str], tmp_path: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "dta"

    code = run(
        *argv, "--data-dir", missing, *(["--rules", write_rules(RULES)] * (argv[0] == "replay"))
    )

    assert code == 2
    assert capsys.readouterr().err == (
        f"tagrelay: no store at {missing / 'tagrelay.db'} (--data-dir {missing})\n"
    )
    assert not missing.exists()


def test_preview_with_a_data_directory_without_a_store_is_an_error(
    tmp_path: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    event = tmp_path / "event.json"
    event.write_text('{"event_name": "sale"}')

    code = run("preview", event, "--rules", write_rules(RULES), "--data-dir", tmp_path / "dta")

    assert code == 2
    assert "tagrelay: no store at" in capsys.readouterr().err
    assert not (tmp_path / "dta").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["deadletters", "list"],
        ["forget", "--email", "a@example.com"],
        ["purge"],
        ["replay", "--destination", "log", "--since", "1h"],
        ["preview", "EVENT"],
    ],
)
def test_a_store_that_is_not_a_database_is_a_clear_error(
    argv: list[str], tmp_path: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tagrelay.db").write_text("not a database, just some text " * 200)
    event = tmp_path / "event.json"
    event.write_text('{"event_name": "sale"}')
    argv = [str(event) if a == "EVENT" else a for a in argv]
    rules = ["--rules", str(write_rules(RULES))] if argv[0] in ("replay", "preview") else []

    code = run(*argv, *rules, "--data-dir", data)

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"tagrelay: the store {data / 'tagrelay.db'} cannot be used: ")
    assert "not a database" in err
    assert "Traceback" not in err
