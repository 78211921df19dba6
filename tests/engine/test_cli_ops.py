"""The operator's commands: the metrics directory of `serve`, store commands on a store that
must exist, clear errors and exit codes, the worker's housekeeping."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main, processes
from engine.config import Settings
from engine.errors import ConfigError
from engine.maintenance import Maintenance
from engine.store.base import Acceptance, Decision
from engine.store.sqlite import SQLiteStore
from tests.support.server import LOG_ALL_RULES

WriteRules = Callable[..., Path]
T0 = 1_795_185_045.0
RULES = LOG_ALL_RULES


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
    for name in ("PROMETHEUS_MULTIPROC_DIR", processes.OWN_METRICS_DIR):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(processes, "_metrics_lock_fd", None)


def test_a_metrics_directory_that_does_not_exist_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_metrics_dir: None
) -> None:
    configured = tmp_path / "prom" / "multiproc"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(configured))

    processes._metrics_dir(Settings(data_dir=tmp_path / "data"))

    assert configured.is_dir()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(configured)


def test_a_metrics_directory_that_cannot_be_made_refuses_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_metrics_dir: None
) -> None:
    (tmp_path / "afile").touch()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "afile" / "metrics"))

    with pytest.raises(ConfigError, match=r"^PROMETHEUS_MULTIPROC_DIR .* cannot hold the metrics"):
        processes._metrics_dir(Settings(data_dir=tmp_path / "data"))


def test_instances_sharing_a_data_directory_keep_their_own_metrics(
    tmp_path: Path, no_metrics_dir: None
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    (tmp_path / "data").mkdir()

    processes._metrics_dir(settings)  # a first instance, still running
    first = Path(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"))
    first_lock = processes._metrics_lock_fd
    (first / "counter_1.db").write_bytes(b"counts")
    processes._metrics_dir(settings)  # a second one starts beside it
    second = Path(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"))
    second_lock = processes._metrics_lock_fd

    assert first != second
    assert (first / "counter_1.db").read_bytes() == b"counts"
    assert first.parent == second.parent == tmp_path / "data" / "metrics"

    assert first_lock is not None
    os.close(first_lock)  # the first instance stops
    processes._metrics_dir(settings)  # a third one cleans up after it
    assert not first.exists()
    assert second.exists()
    for fd in (second_lock, processes._metrics_lock_fd):
        assert fd is not None
        os.close(fd)


def test_a_re_executed_master_keeps_its_own_metrics_directory_while_it_exists(
    tmp_path: Path, no_metrics_dir: None
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    processes._metrics_dir(settings)  # the master before gunicorn's USR2 upgrade
    own = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    before = processes._metrics_lock_fd

    processes._metrics_dir(settings)  # re-executed with the same environment: the same directory
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == own
    after = processes._metrics_lock_fd
    assert before is not None and after is not None
    os.close(before)  # the old master leaves; the new one's lock keeps the directory
    del os.environ["PROMETHEUS_MULTIPROC_DIR"], os.environ[processes.OWN_METRICS_DIR]
    processes._metrics_dir(settings)  # another instance starts, and cleans up
    assert Path(own).is_dir()
    assert processes._metrics_lock_fd is not None
    os.close(processes._metrics_lock_fd)

    os.close(after)
    shutil.rmtree(own)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[processes.OWN_METRICS_DIR] = own
    processes._metrics_dir(settings)  # its directory is gone: a fresh one, not a missing one
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] != own
    assert Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).is_dir()
    assert processes._metrics_lock_fd is not None
    os.close(processes._metrics_lock_fd)


def test_a_master_upgraded_from_a_version_that_locked_exclusively_keeps_the_directory(
    tmp_path: Path, no_metrics_dir: None
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    old = tmp_path / "data" / "metrics" / "4242-abcdefgh"
    old.mkdir(parents=True)
    old_master = os.open(old / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(old_master, fcntl.LOCK_EX)  # as the previous version held it
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(old)  # and put it in the environment

    processes._metrics_dir(settings)  # the re-executed master: starts at once, same directory

    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(old)
    assert os.environ[processes.OWN_METRICS_DIR] == str(old)
    os.close(old_master)  # the old master leaves; the new one's lock is taken in a moment
    held = os.open(old / ".lock", os.O_RDWR)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break  # held (shared) by the new master
            fcntl.flock(held, fcntl.LOCK_UN)
            assert time.monotonic() < deadline, "the new master never took the lock"
            time.sleep(0.01)
    finally:
        os.close(held)
    processes._remove_stale_metrics(old.parent)  # another instance cleans up
    assert old.is_dir()
    assert processes._metrics_lock_fd is not None
    os.close(processes._metrics_lock_fd)


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


# -- dead letters -------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A store with delivery 1 dead and delivery 2 delivered."""
    data = tmp_path / "data"
    store = SQLiteStore(data / "tagrelay.db")
    for event_id in ("e1", "e2"):
        decision = Decision("log_all", "log", True, "trigger all matched", payload={"x": 1})
        event = {
            "event_name": "sale",
            "event_id": event_id,
            "timestamp": "2026-11-20T14:30:45.000Z",
        }
        store.accept(Acceptance(event, [decision], 60, T0))
    dead, delivered = store.lease("log", 10, 60.0, "w", T0)
    store.mark_dead([dead.id], "w", "HTTP 400", T0)
    store.mark_delivered([delivered.id], "w", T0)
    store.close()
    return data


def test_show_says_when_a_delivery_is_not_a_dead_letter(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run("deadletters", "show", "2", "--data-dir", data_dir)

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err == "delivery 2 is not a dead letter (it is delivered)\n"
    assert captured.out == ""


def test_show_prints_a_dead_letter(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run("deadletters", "show", "1", "--data-dir", data_dir)

    shown = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (shown["id"], shown["status"], shown["last_error"]) == (1, "dead", "HTTP 400")


@pytest.mark.parametrize(
    "argv",
    [
        ["deadletters", "show", "99999999999999999999999"],
        ["deadletters", "replay", "0"],
        ["deadletters", "list", "--limit", "99999999999999999999999"],
        ["purge", "--days", "99999999999999999999999"],
        ["purge", "--days", "-1"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(
    argv: list[str], data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(*argv, "--data-dir", data_dir)

    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "must be" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_replaying_nothing_that_is_a_dead_letter_exits_1(
    data_dir: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = write_rules(RULES)

    code = run("deadletters", "replay", "999999", "2", "--rules", rules, "--data-dir", data_dir)

    out = capsys.readouterr().out
    assert code == 1
    assert "skipped delivery 999999: no such delivery" in out
    assert "skipped delivery 2: not a dead letter" in out
    assert "replayed 0 dead letters" in out


def test_replaying_a_dead_letter_whose_tag_no_longer_fires_replays_none_and_exits_1(
    data_dir: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = write_rules(RULES.replace('event: "*"', "event: purchase"))

    code = run("deadletters", "replay", "1", "--rules", rules, "--data-dir", data_dir)

    out = capsys.readouterr().out
    assert code == 1
    assert "replayed 0 dead letters: 0 deliveries queued" in out
    assert [d.id for d in SQLiteStore(data_dir / "tagrelay.db").dead_letters()] == [1]  # stays


def test_replaying_all_dead_letters_when_there_are_none_exits_1_not_as_bad_usage(
    tmp_path: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "tagrelay.db").close()

    code = run(
        "deadletters", "replay", "--all", "--rules", write_rules(RULES), "--data-dir", tmp_path
    )

    assert code == 1
    assert capsys.readouterr().out == "no dead letters to replay\n"


def test_replaying_a_dead_letter_exits_0(
    data_dir: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run("deadletters", "replay", "1", "--rules", write_rules(RULES), "--data-dir", data_dir)

    assert code == 0
    assert "replayed 1 dead letters: 1 deliveries queued" in capsys.readouterr().out


def test_replay_since_further_back_than_dates_go_is_a_clear_error(
    data_dir: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = write_rules(RULES)

    code = run(
        "replay", "--destination", "log", "--since", "99999999999d", "--rules", rules,
        "--data-dir", data_dir,
    )  # fmt: skip

    assert code == 2
    assert capsys.readouterr().err == (
        "tagrelay: --since 99999999999d goes back further than the year 1\n"
    )


# -- preview and schema -----------------------------------------------------------------------


def test_preview_of_a_deeply_nested_event_is_refused_like_intake(
    tmp_path: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    event = tmp_path / "deep.json"
    event.write_text(
        '{"event_name": "sale", "properties": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    )

    code = run("preview", event, "--rules", write_rules(RULES))

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"cannot read {event}: the JSON is nested too deeply (at most 64 levels)\n"


def test_preview_reads_the_rules_from_tagrelay_rules_like_serve(
    tmp_path: Path,
    write_rules: WriteRules,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = tmp_path / "event.json"
    event.write_text('{"event_name": "sale"}')
    monkeypatch.setenv("TAGRELAY_RULES", str(write_rules(RULES)))
    monkeypatch.chdir(tmp_path)  # no rules/ here

    code = run("preview", event, "--json")

    assert code == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["tags"]] == ["log_all"]


def test_schema_to_a_directory_that_does_not_exist_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "nonexistent" / "x.json"

    code = run("schema", "-o", target)

    assert code == 2
    assert (
        capsys.readouterr().err == f"tagrelay: cannot write {target}: No such file or directory\n"
    )


# -- the worker ---------------------------------------------------------------------------------


@pytest.fixture
def unconfigured_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's logging set-up left out: pytest keeps the logs (a handler on a captured
    stream would outlive the test)."""
    monkeypatch.setattr("engine.logs.configure", lambda level: None)


@pytest.mark.usefixtures("unconfigured_logs")
def test_the_worker_applies_retention_like_serve(
    data_dir: Path,
    write_rules: WriteRules,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[Maintenance] = []
    start = Maintenance.start

    def record(self: Maintenance) -> None:
        start(self)
        started.append(self)
        os.kill(os.getpid(), signal.SIGTERM)  # and stop the worker at once

    monkeypatch.setattr(Maintenance, "start", record)
    monkeypatch.setenv("TAGRELAY_RETENTION_DAYS", "30")
    handler = signal.getsignal(signal.SIGTERM)
    # Should the worker never start its maintenance, it is stopped anyway and the test fails.
    deadline = threading.Timer(10, os.kill, (os.getpid(), signal.SIGTERM))
    deadline.start()

    try:
        code = run("worker", "--rules", write_rules(RULES), "--data-dir", data_dir)
    finally:
        deadline.cancel()

    assert code == 0
    [maintenance] = started
    assert maintenance.retention_days == 30
    assert isinstance(maintenance.store, SQLiteStore)
    assert Path(maintenance.store.path) == data_dir / "tagrelay.db"
    assert not maintenance._thread.is_alive()  # stopped with the worker
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is back
    assert "tagrelay worker: delivering from" in capsys.readouterr().out


@pytest.mark.usefixtures("unconfigured_logs")
def test_the_worker_compiles_again_a_file_edited_while_it_started(
    data_dir: Path, write_rules: WriteRules, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its time was taken after the compile: the worker kept the rules of before the edit.
    from engine.pipeline import RulesHolder

    rules = write_rules(RULES)
    file = rules / "rules.yaml"
    load = processes.load_container
    holders: list[RulesHolder] = []

    def edited_meanwhile(path: Path) -> Any:
        container = load(path)
        file.write_text(RULES.replace("log_all", "log_everything"))
        stat = file.stat()
        os.utime(file, (stat.st_atime + 5, stat.st_mtime + 5))
        return container

    def kept(self: RulesHolder, *args: Any) -> None:
        init(self, *args)
        holders.append(self)

    def stop(self: Maintenance) -> None:
        start(self)
        os.kill(os.getpid(), signal.SIGTERM)  # the worker has started: stop it at once

    init, start = RulesHolder.__init__, Maintenance.start
    monkeypatch.setattr(processes, "load_container", edited_meanwhile)
    monkeypatch.setattr(RulesHolder, "__init__", kept)
    monkeypatch.setattr(Maintenance, "start", stop)

    code = run("worker", "--rules", rules, "--data-dir", data_dir)

    assert code == 0
    [holder] = holders
    assert holder.maybe_reload() is True
    assert [t.name for t in holder.container.tags] == ["log_everything"]


@pytest.mark.usefixtures("unconfigured_logs")
def test_the_worker_refuses_rules_with_errors_with_exit_1_like_serve(
    data_dir: Path, write_rules: WriteRules, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run("worker", "--rules", write_rules("destinations:\n  log: {type: lg}\n"))

    assert code == 1
    err = capsys.readouterr().err
    assert "unknown destination type 'lg'" in err
    assert "refusing to start" in err


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("unix:/tmp/m.sock", "must be HOST:PORT or [IPv6 address]:PORT (not a unix socket)"),
        ("localhost:99999", "must be HOST:PORT with a port from 1 to 65535"),
        ("localhost", "must be HOST:PORT or [IPv6 address]:PORT, with its port (8080 is the"),
    ],
)
@pytest.mark.usefixtures("unconfigured_logs")
def test_a_worker_metrics_address_that_is_no_tcp_address_is_refused(
    data_dir: Path,
    write_rules: WriteRules,
    capsys: pytest.CaptureFixture[str],
    given: str,
    message: str,
) -> None:
    code = run("worker", "--rules", write_rules(RULES), "--metrics-bind", given)

    assert code == 2
    assert capsys.readouterr().err.startswith(f"tagrelay: --metrics-bind {message}")


def test_purge_runs_retention_though_the_key_expiry_fails_and_exits_1_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    SQLiteStore(tmp_path / "tagrelay.db")
    purged: list[float] = []
    purge = SQLiteStore.purge

    def broken(self: SQLiteStore, now: float) -> int:
        raise ValueError("no such row: jane@example.com")

    def counted(self: SQLiteStore, before: float, now: float | None = None) -> dict[str, int]:
        purged.append(before)
        return purge(self, before, now)

    monkeypatch.setattr(SQLiteStore, "purge_expired", broken)
    monkeypatch.setattr(SQLiteStore, "purge", counted)

    # Act
    code = run("purge", "--data-dir", tmp_path)

    # Assert
    assert code == 1
    assert len(purged) == 1
    output = capsys.readouterr()
    assert output.out.startswith("removed: ")
    assert output.err == "tagrelay: housekeeping steps failed: dedup_keys (ValueError)\n"
