"""SQLiteStore: its parts assembled, the file opened, the store's secrets and rate counters."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from engine.errors import StoreError
from engine.store.base import Store
from engine.store.sqlite.connection import _retry_busy
from engine.store.sqlite.erasure import _Erasure
from engine.store.sqlite.intake import _Intake
from engine.store.sqlite.outbox import _Outbox
from engine.store.sqlite.schema import _SCHEMA, _upgrade
from engine.store.sqlite.visitors import _Visitors


class SQLiteStore(_Intake, _Outbox, _Visitors, _Erasure, Store):
    """The SQLite backend. Safe to share between threads and (through the file) processes."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        super().__init__(path, synchronous)  # the connections, then the group commit's state
        try:
            # The script only writes when it creates or replaces something (a new file, or the
            # first open of a file an older version made); every statement is idempotent.
            with self._write_locks():
                db = self._writer_conn()
                _retry_busy(lambda: db.executescript(_SCHEMA))
                _retry_busy(lambda: _upgrade(db))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the SQLite schema: {exc}") from exc

    def rate_hit(self, key: str, window_start: float, count: int = 1) -> int:
        """See :meth:`Store.rate_hit`."""
        with self._write() as db:
            rows = db.execute(
                "INSERT INTO rate_counters (key, window, n) VALUES (?, ?, ?) "
                "ON CONFLICT (key, window) DO UPDATE SET n = n + excluded.n RETURNING n",
                (key, window_start, count),
            ).fetchall()
        return int(rows[0][0])

    def purge_rate_counters(self, before: float) -> int:
        """See :meth:`Store.purge_rate_counters`.

        One statement that reads the whole table: it holds about an hour of counters (the
        housekeeping runs hourly), a row per server key and per client IP of a publishable
        key, per minute.
        """
        with self._write() as db:
            return int(db.execute("DELETE FROM rate_counters WHERE window < ?", (before,)).rowcount)

    def secret(self, name: str) -> bytes:
        """See :meth:`Store.secret`."""
        rows = self._read("SELECT value FROM secrets WHERE name = ?", (name,), lookup=True)
        if rows:
            return bytes(rows[0][0])
        with self._write() as db:  # the first of several processes to get here makes it
            db.execute(
                "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, os.urandom(32)),
            )
            row = db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    def ping(self) -> None:
        """See :meth:`Store.ping`."""
        self._read("SELECT 1")

    def free_bytes(self) -> int | None:
        """See :meth:`Store.free_bytes`: what the file system holding the file leaves to an
        unprivileged process."""
        if self.path == ":memory:":
            return None
        try:
            stat = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize
