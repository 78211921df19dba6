"""The ``tagrelay`` command: serve | worker | check | test | preview | schema | deadletters |
replay | forget | purge.

Exit codes: 0 success; 1 the rules or tests failed, or there was nothing to do that was asked
for (no such dead letter); 2 bad usage, bad settings, or an unreadable file or store.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.config import (
    MAX_DAYS,
    Settings,
    ensure_server_key,
    load_setting,
    load_settings,
    prepare_data_dir,
)
from engine.errors import BadRequest, ConfigError, RulesError, StoreError
from engine.rules import compile_container
from engine.rules.model import Container
from engine.rules.schema import RULES_SCHEMA

if TYPE_CHECKING:
    from engine.store.base import Delivery
    from engine.store.sqlite import SQLiteStore

SCHEMA_FILE = "tagrelay.schema.json"


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _load(path: Path) -> Container | None:
    container, problems = compile_container(path)
    for problem in problems:
        _err(str(problem))
    return container


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a container; every problem with file:line:column."""
    path = Path(args.path)
    container, problems = compile_container(path)
    for problem in problems:
        _out(str(problem))
    if container is None:
        errors = sum(1 for p in problems if p.severity == "error")
        _out(f"{path}: {errors} error{'s' if errors != 1 else ''}")
        return 1
    _out(
        f"{path}: ok ({len(container.destinations)} destinations, {len(container.tags)} tags, "
        f"{len(container.tests)} tests)"
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """Run the rule files' tests."""
    from engine.rules.testing import run_tests

    container = _load(Path(args.path))
    if container is None:
        return 1
    # The server's IP policy applies before the rules, so the tests see what it would send;
    # only that setting is read, so the server's other settings cannot fail a rules test.
    results = run_tests(container, ip_storage=load_setting("ip_storage"))
    failed = [r for r in results if not r.passed]
    for result in results:
        mark = "ok  " if result.passed else "FAIL"
        _out(f"{mark} {result.test.name}  ({result.test.position})")
        for diff in result.differences:
            _out(f"       {diff}")
    _out(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_preview(args: argparse.Namespace) -> int:
    """Dry-run one event: per tag, fired or not and why, and the request it would send."""
    from engine.api import parse_json_body
    from engine.preview import preview

    settings = _settings(args)
    container = _load(settings.rules)
    if container is None:
        return 1
    try:
        # The limits of intake (depth, NaN, numbers out of range): what the server would refuse
        # is refused here, and a deeply nested file is an error, not a RecursionError.
        raw = parse_json_body(Path(args.event).read_bytes(), "application/json")
    except OSError as exc:
        _err(f"cannot read {args.event}: {exc.strerror or exc}")
        return 2
    except BadRequest as exc:
        _err(f"cannot read {args.event}: {exc}")
        return 2
    enricher = None
    # Enrich from the store when there is one; a --data-dir given must hold one.
    if args.data_dir or settings.database_path.is_file():
        from engine.pipeline import Privacy, enrich_from_store

        store = _existing_store(settings)
        privacy = Privacy(settings.ip_storage, settings.click_id_window)

        def enricher(event: dict[str, Any], now: datetime) -> list[str]:
            return enrich_from_store(store, privacy, event, now)

    try:
        result = preview(container, raw, enricher=enricher, ip_storage=settings.ip_storage)
    except BadRequest as exc:
        _err(f"{args.event}: invalid event: {exc}")
        return 2
    if args.json:
        _out(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    event = result["event"]
    _out(f"event {event['event_name']!r} (event_id {event['event_id']})")
    if event.get("enriched"):
        _out(f"  enriched from the visitor's identity: {', '.join(event['enriched'])}")
    for tag in result["tags"]:
        mark = "FIRED  " if tag["fired"] else "skipped"
        _out(f"  {mark} {tag['name']} -> {tag['destination']}: {tag['reason']}")
        if tag.get("consent"):
            suffix = " (anonymous)" if tag.get("anonymous") else ""
            _out(f"          consent: {tag['consent']}{suffix}")
        if tag["request"]:
            req = tag["request"]
            _out(f"          {req['method']} {req['url']}")
            for name, value in req["headers"].items():
                _out(f"          {name}: {value}")
            body = json.dumps(req["body"], indent=2, ensure_ascii=False)
            _out("\n".join("          " + line for line in body.splitlines()))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Write the rule-file JSON Schema (for editors)."""
    text = json.dumps(RULES_SCHEMA, indent=2) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as exc:
        _err(f"tagrelay: cannot write {args.output}: {exc.strerror or exc}")
        return 2
    _out(f"wrote {args.output}")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """Settings with the command's flags over the environment and the config file."""
    flags = {name: getattr(args, name, None) for name in ("bind", "workers", "rules", "data_dir")}
    return load_settings(flags=flags)


# The per-instance metrics directory stays locked (flock) while the instance runs; the lock
# file descriptor is inherited by the gunicorn workers, so it is held until all have exited.
_METRICS_LOCK = ".lock"
_metrics_lock_fd: int | None = None


def _writable_dir(path: Path, name: str) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{name} {path} cannot hold the metrics files: {exc.strerror or exc}"
        ) from exc


def _remove_stale_metrics(root: Path) -> None:
    """Remove the metrics directories of instances that no longer run (nobody holds their lock)."""
    for path in root.iterdir():
        if not path.is_dir():
            continue
        try:
            fd = os.open(path / _METRICS_LOCK, os.O_RDWR)
        except OSError:
            continue  # being created right now, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # an instance that runs
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _metrics_dir(settings: Settings) -> None:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at a directory where the workers' counts are summed.

    Must run in the master before prometheus_client is imported. A directory set by the
    operator is created if missing and must be writable (metrics written nowhere would fail
    every request after its event was committed). Otherwise each instance gets a fresh
    directory of its own under ``<data dir>/metrics``, so several instances sharing a data
    directory neither wipe nor sum each other's counts; the directories of instances that
    have stopped are removed.

    Raises:
        ConfigError: the directory cannot be created or written.
    """
    global _metrics_lock_fd
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        _writable_dir(Path(configured), "PROMETHEUS_MULTIPROC_DIR")
        return
    root = settings.data_dir / "metrics"
    _writable_dir(root, f"{settings.name_of('data_dir')}: the metrics directory")
    _remove_stale_metrics(root)
    for _ in range(3):
        path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
        fd = os.open(path / _METRICS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Another instance's clean-up may have taken the lock between the open and the flock
        # and removed the directory; then start again.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path / _METRICS_LOCK)):
                _metrics_lock_fd = fd
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
                return
        os.close(fd)
    raise ConfigError(f"cannot create a metrics directory in {root}")


def _prepare_data_dir(settings: Settings) -> None:
    for note in prepare_data_dir(settings):
        _err(f"tagrelay: {note}")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server under gunicorn."""
    settings = _settings(args)
    _prepare_data_dir(settings)
    _metrics_dir(settings)
    from engine.server import run

    container = _load(settings.rules)
    if container is None:
        _err(f"tagrelay: refusing to start: {settings.rules} has errors (see above)")
        return 1
    configured = bool(settings.server_keys)
    settings, generated = ensure_server_key(settings)
    key_file = settings.data_dir / "server_key"
    if generated:
        _out(f"tagrelay: generated a server key (kept in {key_file}): {generated}")
    elif not configured:
        _out(f"tagrelay: server key kept in {key_file}")
    delivery = "delivering" if settings.deliver else "delivery off"
    _out(
        f"tagrelay {__version__}: serving {settings.rules} on http://{settings.bind} "
        f"({settings.workers} workers, {delivery}, store {settings.database_path})"
    )
    sys.stdout.flush()
    run(settings)
    return 0


def _store(settings: Settings) -> SQLiteStore:
    """The store, created when there is none (``serve`` and ``worker``)."""
    from engine.store.sqlite import SQLiteStore

    try:
        return SQLiteStore(settings.database_path, settings.sqlite_sync)
    except StoreError as exc:
        raise StoreError(f"the store {settings.database_path} cannot be used: {exc}") from exc


def _existing_store(settings: Settings) -> SQLiteStore:
    """The store, which must exist: a mistyped directory is an error, not a new empty store.

    Raises:
        ConfigError: there is no store file where the settings point.
    """
    path = settings.database_path
    if not path.is_file():
        key = "db" if settings.database is not None else "data_dir"
        given = settings.database if settings.database is not None else settings.data_dir
        raise ConfigError(f"no store at {path} ({settings.name_of(key)} {given})")
    return _store(settings)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def cmd_worker(args: argparse.Namespace) -> int:
    """Deliver the outbox and apply retention without serving HTTP, until SIGTERM or SIGINT."""
    from engine import logs
    from engine.delivery import DeliveryWorker
    from engine.maintenance import Maintenance
    from engine.pipeline import load_rules

    settings = _settings(args)
    _prepare_data_dir(settings)
    logs.configure(settings.log_level)
    rules = load_rules(settings.rules, settings.reload_interval)
    store = _store(settings)
    worker = DeliveryWorker(store, lambda: rules.container)
    # Retention runs where the store is used; a host with only workers purges too.
    maintenance = Maintenance(store, settings.retention_days)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        worker.start()
        maintenance.start()
        _out(f"tagrelay worker: delivering from {settings.database_path}")
        sys.stdout.flush()
        stop.wait()
    finally:
        worker.stop()
        maintenance.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _delivery_json(d: Delivery) -> dict[str, object]:
    return {
        "id": d.id,
        "event_id": d.event_id,
        "tag": d.tag,
        "destination": d.destination,
        "status": d.status.value,
        "attempts": d.attempts,
        "created_at": datetime.fromtimestamp(d.created_at, UTC).isoformat(),
        "last_error": d.last_error,
    }


def cmd_deadletters(args: argparse.Namespace) -> int:
    """List, show or replay dead letters."""
    from engine.store.base import Status

    settings = _settings(args)
    store = _existing_store(settings)
    if args.action == "list":
        letters = store.dead_letters(args.destination, args.limit)
        if args.json:
            _out(json.dumps([_delivery_json(d) for d in letters], indent=2))
            return 0
        for d in letters:
            when = datetime.fromtimestamp(d.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
            error = (d.last_error or "")[:80]
            _out(f"{d.id:>8}  {when}  {d.destination:<14} {d.tag:<20} {d.event_id}  {error}")
        _out(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}")
        return 0
    if args.action == "show":
        if not args.ids:
            _err("deadletters show needs a delivery ID")
            return 2
        delivery = store.get_delivery(args.ids[0])
        if delivery is None:
            _err(f"no delivery {args.ids[0]}")
            return 1
        if delivery.status is not Status.DEAD:
            _err(f"delivery {delivery.id} is not a dead letter (it is {delivery.status.value})")
            return 1
        shown = _delivery_json(delivery)
        shown["payload"] = delivery.payload
        _out(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    from engine.replay import replay_dead_letters

    container = _load(settings.rules)
    if container is None:
        return 1
    ids = list(args.ids)
    if args.all:
        ids += [d.id for d in store.dead_letters(args.destination, limit=1_000_000)]
    if not ids:
        _err("deadletters replay needs delivery IDs or --all")
        return 2
    report = replay_dead_letters(store, container, ids)
    for line in report.skipped:
        _out(f"skipped {line}")
    _out(f"replayed {report.events} dead letters: {report.queued} deliveries queued")
    return 0 if report.events else 1


def _parse_since(text: str) -> datetime:
    """``--since``: a duration back from now, or an ISO 8601 time.

    Raises:
        ValueError: neither, or a duration further back than dates go; the message says so.
    """
    from engine.rules import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"--since {text} goes back further than the year 1") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("--since takes an ISO 8601 time or a duration such as 2h or 7d") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def cmd_replay(args: argparse.Namespace) -> int:
    """Send the events accepted since a time to one destination again (current rules)."""
    from engine.replay import replay_destination

    settings = _settings(args)
    container = _load(settings.rules)
    if container is None:
        return 1
    if args.destination not in container.destinations:
        known = ", ".join(container.destinations)
        _err(f"unknown destination {args.destination!r} (known: {known})")
        return 2
    try:
        since = _parse_since(args.since)
    except ValueError as exc:
        _err(f"tagrelay: {exc}")
        return 2
    report = replay_destination(_existing_store(settings), container, args.destination, since)
    for line in report.skipped:
        _out(f"skipped {line}")
    _out(f"replayed {report.events} events: {report.queued} deliveries queued")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase a person's events, identities and pending deliveries; report what was removed."""
    if not (args.user_id or args.visitor_id or args.email):
        _err("forget needs --user-id, --visitor-id or --email")
        return 2
    store = _existing_store(_settings(args))
    removed = store.forget(user_id=args.user_id, visitor_id=args.visitor_id, email=args.email)
    if args.json:
        _out(json.dumps(removed))
    else:
        _out("removed: " + ", ".join(f"{n} {kind}" for kind, n in removed.items()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Apply retention now (the server also does it hourly)."""
    from engine.maintenance import run_once

    settings = _settings(args)
    days = args.days if args.days is not None else settings.retention_days
    removed = run_once(_existing_store(settings), days)
    _out("removed: " + ", ".join(f"{n} {kind}" for kind, n in removed.items()))
    return 0


def _whole(minimum: int, maximum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number in a range (a store ID or limit must fit in 64 bits)."""

    def parse(text: str) -> int:
        number = int(text) if re.fullmatch(r"\s*[0-9]{1,19}\s*", text) else -1
        if not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"{what} must be {minimum} to {maximum}, not {text!r}")
        return number

    return parse


_ID = _whole(1, 2**63 - 1, "a delivery ID")
_LIMIT = _whole(1, 2**63 - 1, "the limit")
_DAYS = _whole(0, MAX_DAYS, "the days")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tagrelay`` command."""
    parser = argparse.ArgumentParser(prog="tagrelay", description="Server-side tag manager.")
    parser.add_argument("--version", action="version", version=f"tagrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (gunicorn)")
    serve.add_argument("--bind", help="address:port (env TAGRELAY_BIND; default 127.0.0.1:8080)")
    serve.add_argument("--workers", help="gunicorn workers (env TAGRELAY_WORKERS; default 2)")
    serve.add_argument("--rules", help="rule container (env TAGRELAY_RULES; default rules/)")
    serve.add_argument("--data-dir", help="store and key directory (env TAGRELAY_DATA_DIR)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="deliver the outbox without serving HTTP")
    worker.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    worker.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    worker.set_defaults(func=cmd_worker)

    dead = sub.add_parser("deadletters", help="list, show or replay dead letters")
    dead.add_argument("action", choices=["list", "show", "replay"])
    dead.add_argument("ids", nargs="*", type=_ID, help="delivery IDs (show, replay)")
    dead.add_argument("--destination", help="only this destination")
    dead.add_argument("--limit", type=_LIMIT, default=100)
    dead.add_argument("--all", action="store_true", help="replay every dead letter")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    dead.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    dead.set_defaults(func=cmd_deadletters)

    replay = sub.add_parser("replay", help="send events since a time to a destination again")
    replay.add_argument("--destination", required=True)
    replay.add_argument("--since", required=True, help="ISO 8601 time, or a duration like 6h")
    replay.add_argument("--rules", help="rule container (env TAGRELAY_RULES)")
    replay.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    replay.set_defaults(func=cmd_replay)

    forget = sub.add_parser("forget", help="erase a person's events, identities, deliveries")
    forget.add_argument("--user-id")
    forget.add_argument("--visitor-id")
    forget.add_argument("--email")
    forget.add_argument("--json", action="store_true")
    forget.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    forget.set_defaults(func=cmd_forget)

    purge = sub.add_parser("purge", help="apply the retention period now")
    purge.add_argument("--days", type=_DAYS, help="default: TAGRELAY_RETENTION_DAYS (395)")
    purge.add_argument("--data-dir", help="store directory (env TAGRELAY_DATA_DIR)")
    purge.set_defaults(func=cmd_purge)

    check = sub.add_parser("check", help="validate a rule container")
    check.add_argument("path", nargs="?", default="rules")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="run the rule files' tests")
    test.add_argument("path", nargs="?", default="rules")
    test.set_defaults(func=cmd_test)

    prev = sub.add_parser("preview", help="dry-run one event through the rules")
    prev.add_argument("event", help="a JSON file with one event")
    prev.add_argument("--rules", help="rule container (env TAGRELAY_RULES; default rules/)")
    prev.add_argument("--json", action="store_true", help="print one JSON object")
    prev.add_argument("--data-dir", help="enrich from this store (env TAGRELAY_DATA_DIR)")
    prev.set_defaults(func=cmd_preview)

    schema = sub.add_parser("schema", help="print or write the rule-file JSON Schema")
    schema.add_argument("-o", "--output", default="-")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tagrelay`` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, RulesError, StoreError) as exc:
        _err(f"tagrelay: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
