"""The framework ceiling: a bare Flask app under exactly tagrelay's gunicorn options.

``POST /v1/track`` here only parses the JSON body and answers a small JSON object: no auth, no
validation, no rules, no store. :class:`BareServer` subclasses tagrelay's own
:class:`~engine.server.TagrelayServer` and replaces only the WSGI app it loads, so the bind,
worker class, workers, threads (``TAGRELAY_THREADS``), keep-alive and log settings are the
same by construction.

With ``--commit FILE`` it is the *durable floor* instead: the same app, except that each event
is committed to a SQLite file before the answer, as tagrelay must (an accepted event is stored
before the response says so): one row per event ID in WAL mode with tagrelay's default
``synchronous=NORMAL``, a repeated ID answered as a duplicate, written with the store's
discipline (group commit within a process, an ``flock`` queue between processes). Nothing
else: no auth, validation, rules, outbox or identity. The gap between bare and floor is what
committing before answering costs on this machine; the gap between floor and tagrelay is
tagrelay's own work.

Run: ``python bench/bare_app.py --bind 127.0.0.1:8090 --workers 2 [--commit floor.db]``
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from engine import logs
from engine.config import Settings
from engine.server import TagrelayServer


def create_bare_app() -> Flask:
    """A Flask app whose track endpoint parses JSON and answers, nothing else."""
    app = Flask("bare")

    @app.post("/v1/track")
    def track() -> tuple[Response, int]:
        raw = request.get_json(force=True)
        event_id = raw.get("event_id") if isinstance(raw, dict) else None
        return jsonify({"success": True, "event_id": event_id}), 200

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify({"status": "ok"}), 200

    return app


@dataclass
class _Pending:
    """One event waiting in a group commit."""

    event_id: str
    body: str
    done: bool = False
    fresh: bool = False
    error: BaseException | None = None


class _Rows:
    """One SQLite connection per process, with the write discipline tagrelay's store uses.

    Group commit: an insert that arrives while another thread of the process is committing
    waits, and is then committed with the others queued by then, by one of them, in one
    transaction; every caller returns only after its own row is committed. Processes take
    turns on an ``flock`` of ``<file>-writer`` (the kernel hands it straight to the next
    waiter), so ``BEGIN IMMEDIATE`` never waits. One transaction per request instead, with the
    threads of a process queued on a lock, makes the threads convoy on the lock and the GIL:
    the floor would then measure that convoy, not what committing costs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._group = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False
        self._pid = 0
        self._db: sqlite3.Connection | None = None
        self._fd = -1

    def _open(self) -> tuple[sqlite3.Connection, int]:
        if self._db is None or self._pid != os.getpid():  # a connection must not cross a fork
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute(
                "CREATE TABLE IF NOT EXISTS events "
                "(seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"
            )
            self._fd = os.open(f"{self.path}-writer", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC)
            self._db, self._pid = db, os.getpid()
        return self._db, self._fd

    def insert(self, event_id: str, body: str) -> bool:
        """Commit one event; False if its ID was already stored."""
        slot = _Pending(event_id, body)
        with self._group:
            self._queue.append(slot)
            while not slot.done and self._leading:
                self._group.wait()
            if not slot.done:
                self._leading = True
        if not slot.done:
            self._commit_queue()
        if slot.error is not None:
            raise slot.error
        return slot.fresh

    def _commit_queue(self) -> None:
        """As the leader: commit everything queued, in one transaction, then wake the others."""
        batch: list[_Pending] = []
        error: BaseException | None = None
        try:
            db, fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with self._group:  # taken only now: whoever queued meanwhile joins this commit
                    batch, self._queue = self._queue, []
                db.execute("BEGIN IMMEDIATE")
                try:
                    for row in batch:
                        cur = db.execute(
                            "INSERT OR IGNORE INTO events (event_id, body) VALUES (?, ?)",
                            (row.event_id, row.body),
                        )
                        row.fresh = cur.rowcount == 1
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException as exc:  # handed to every member of the batch
            error = exc
        with self._group:
            if not batch:  # failed before the batch was taken: it fails with it
                batch, self._queue = self._queue, []
            for row in batch:
                row.done, row.error = True, error
            self._leading = False
            self._group.notify_all()


def create_floor_app(path: Path) -> Flask:
    """The bare app, except that each event is committed to ``path`` before the answer."""
    app = Flask("floor")
    rows = _Rows(path)

    @app.post("/v1/track")
    def track() -> tuple[Response, int]:
        raw = request.get_json(force=True)
        event_id = raw.get("event_id") if isinstance(raw, dict) else None
        if not isinstance(event_id, str):
            return jsonify({"success": False, "error": "event_id: a string is required"}), 400
        fresh = rows.insert(event_id, json.dumps(raw, separators=(",", ":")))
        return jsonify({"success": True, "event_id": event_id, "duplicate": not fresh}), 200

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify({"status": "ok"}), 200

    return app


class BareServer(TagrelayServer):
    """tagrelay's gunicorn application with the bare (or floor) app in place of tagrelay's."""

    def __init__(self, settings: Settings, commit: Path | None = None) -> None:
        self.commit = commit
        super().__init__(settings)

    def load(self) -> Any:
        """The bare WSGI app (logging configured as tagrelay's is)."""
        logs.configure(self.settings.log_level)
        return create_bare_app() if self.commit is None else create_floor_app(self.commit)


def main() -> None:
    """Serve the bare app until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8090")
    parser.add_argument("--workers", type=int, default=Settings.workers)
    parser.add_argument("--log-level", default=Settings.log_level)
    parser.add_argument("--commit", type=Path, help="SQLite file: serve the durable floor")
    args = parser.parse_args()
    settings = Settings(bind=args.bind, workers=args.workers, log_level=args.log_level.upper())
    BareServer(settings, args.commit).run()


if __name__ == "__main__":
    main()
