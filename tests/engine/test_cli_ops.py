"""The operator's commands: the metrics directory of `serve`."""

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
