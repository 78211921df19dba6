"""Connections, locks and transactions: how the processes of a host share one SQLite file.

See the package docstring for the concurrency and durability this gives, and "connections" in
_Connections for why one connection per process makes the writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from engine import gate
from engine.errors import StoreError
from engine.store.sqlite.hostlock import HostLock
from engine.store.sqlite.persons import _EMAIL_KEY, _email_key

BUSY_TIMEOUT = 30.0
CHECKPOINT_INTERVAL = 1.0
WAL_CHECKPOINT_PAGES = 4000
"""The WAL size (in pages, 16 MB at 4 KB) past which the committing writer checkpoints itself.

The background checkpoint alone never lets the WAL restart under sustained writes: a PASSIVE
checkpoint cannot catch up with frames appended while it runs, and SQLite only rewinds the WAL
when a writer finds it fully copied. The file would then grow without bound (a single-event
commit adds about 45 KB of frames: gigabytes within minutes at full intake), and every commit
would pay for extending it. The writer's own
checkpoint finishes what the background one left, so the next transaction rewinds the WAL."""

log = logging.getLogger(__name__)
_PID = os.getpid()


def _after_fork() -> None:
    global _PID  # the one process-wide fact a fork changes
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)

# Held by a checkpointer thread while it is inside SQLite, and by a forking thread across the
# fork: a child must not start with a lock SQLite holds inside (its allocator's, say) taken
# by a thread that did not come along. gunicorn's master opens the store (preload_app), so its
# checkpointer runs while it forks the workers; one forked mid-checkpoint would hang at its
# first query, for good.
_IN_SQLITE = threading.Lock()
os.register_at_fork(
    before=_IN_SQLITE.acquire,
    after_in_parent=_IN_SQLITE.release,
    after_in_child=_IN_SQLITE.release,
)


def _checkpoint_loop(store_ref: weakref.ReferenceType[_Connections], path: str) -> None:
    """Move WAL pages into the database every second, while the store is alive.

    PASSIVE never blocks writers or readers; a busy moment just leaves the work for the next
    round. One connection of its own, opened in the process that runs it.
    """
    try:
        with _IN_SQLITE:
            conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    except sqlite3.Error:
        return
    try:
        while True:
            store = store_ref()
            if store is None or store._closed.wait(CHECKPOINT_INTERVAL):
                return
            del store
            with _IN_SQLITE, contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        with _IN_SQLITE:
            conn.close()


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock another connection holds (worth waiting for)."""
    text = str(exc)
    return "locked" in text or "busy" in text


_T = TypeVar("_T")


def _retry_busy(run: Callable[[], _T]) -> _T:
    """``run()``, tried again with growing sleeps while SQLite answers busy or locked.

    busy_timeout is 0 (see _open): SQLite's own handler sleeps in steps of milliseconds.
    Raises the last error after BUSY_TIMEOUT seconds, or at once for any other error.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.0001
    while True:
        try:
            return run()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.005)


def _create_private(path: str) -> None:
    """Create the database file, empty and readable by its owner only, if it does not exist.

    SQLite makes its WAL and shared-memory files with the database file's mode, which it
    would otherwise take from the umask (0644, most often): in a directory others can read (a
    shared data directory, or a ``TAGRELAY_DB``'s that existed) every user could read the
    events. An existing file keeps its mode. SQLite reads an empty file as an empty database.
    """
    with contextlib.suppress(OSError):  # exists, or cannot be made: sqlite3 says which
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


class _Connections:
    """The connections, locks and transactions every part of SQLiteStore works through."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        self.path = str(path)
        if synchronous.lower() not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        self.synchronous = synchronous.upper()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            _create_private(self.path)
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._writer_pid = -1
        self._host = HostLock(self.path)  # the host's writer lock (see _write_locks)
        self._checkpointer_pid = -1
        self._closed = threading.Event()
        self._wlock = threading.Lock()
        self._lock_pid = _PID

    # -- connections ----------------------------------------------------------------------------
    #
    # One connection per process makes every write, and the lookups by key made while it is idle
    # (recall, for every event); other reads, and lookups while a write runs, use a connection
    # of the reading thread. In WAL mode a connection drops its whole page cache whenever
    # another connection has committed since its last transaction: with a connection per
    # thread, nearly every transaction started cold and read again each B-tree page it touched
    # (~25 reads of 4 KB for a single-event accept, with request threads taking turns). The
    # shared writer only starts cold after another process has committed.

    def _writer_conn(self) -> sqlite3.Connection:
        """The process's shared connection; the caller holds the process lock."""
        conn = self._writer
        if conn is not None and self._writer_pid == _PID:
            if not conn.in_transaction:
                return conn
            # A transaction whose ROLLBACK failed (an I/O error) must not become the next
            # caller's: the connection is replaced.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        conn = self._writer = self._open()
        self._writer_pid = _PID
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's own connection, for reads while the writer is busy."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == _PID:
            return conn
        conn = self._open()
        self._local.conn = conn
        self._local.pid = _PID
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # Waiting for the write lock is ours to do (_write_locks, then _retry_busy): SQLite's
            # own busy handler sleeps in steps of milliseconds, wasting most of them under load.
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA foreign_keys=OFF")
            # Deleted rows are overwritten, not just freed: what `tagrelay forget` and the
            # retention purge delete must not stay readable in the file. (Debian's SQLite is
            # built with this on; others are not.)
            conn.execute("PRAGMA secure_delete=ON")
            conn.create_function(_EMAIL_KEY, 1, _email_key, deterministic=True)
            # Checkpoints (which fsync the database) run mostly in a background thread; the
            # writer only finishes the remainder when the WAL has grown past the threshold
            # (see WAL_CHECKPOINT_PAGES).
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store: {exc}") from exc
        self._start_checkpointer()
        return conn

    def _start_checkpointer(self) -> None:
        if self.path == ":memory:" or self._checkpointer_pid == _PID:
            return
        self._checkpointer_pid = _PID
        thread = threading.Thread(
            target=_checkpoint_loop,
            args=(weakref.ref(self), self.path),
            name="sqlite-checkpoint",
            daemon=True,
        )
        thread.start()

    def _process_lock(self) -> threading.Lock:
        # One writer per process at a time: threads queue on a Python lock (cheap, fair enough)
        # instead of all spinning on SQLite's. A lock must not cross a fork, hence per pid.
        pid = _PID
        if self._lock_pid != pid:
            self._wlock = threading.Lock()
            self._lock_pid = pid
        return self._wlock

    @contextmanager
    def _write_locks(self) -> Iterator[None]:
        """Hold this process's writer lock, then the host's (see :mod:`.hostlock`): one writing
        thread per process and one writing process per host, the kernel queueing processes.

        Waits at most BUSY_TIMEOUT for both, then raises StoreError (a 503 at intake): a process
        stopped while it held the host's lock must not hang every write of the others.
        ``BEGIN IMMEDIATE`` then rarely has to retry: only when a process that is not tagrelay
        writes.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT
        lock = self._process_lock()
        if not lock.acquire(timeout=BUSY_TIMEOUT):
            raise StoreError(f"the store is busy: no write could start for {BUSY_TIMEOUT:g} s")
        try:
            if self.path == ":memory:":
                yield
                return
            host = self._host
            host.acquire(max(0.0, deadline - time.monotonic()))
            try:
                yield
            finally:
                host.release()
        finally:
            lock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_locks():
            db = self._writer_conn()
            try:
                _retry_busy(lambda: db.execute("BEGIN IMMEDIATE"))
            except sqlite3.Error as exc:
                raise StoreError(f"the store is busy or unwritable: {exc}") from exc
            try:
                with gate.CPU:
                    yield db
                    db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store write failed: {exc}") from exc
                raise

    def _read(
        self, sql: str, params: Sequence[Any] = (), lookup: bool = False
    ) -> list[sqlite3.Row]:
        """Rows of a query; a ``lookup`` (a few rows found by key) uses the writer when it is idle.

        A read never waits for the writer: it takes the writer only if no write is running,
        and then holds it for its whole length, which is why scans use their own connection.
        In ":memory:" every read takes the writer, waiting if need be: another connection
        would be another, empty database.
        """
        memory = self.path == ":memory:"
        lock = self._process_lock()
        if (lookup or memory) and lock.acquire(blocking=memory):
            try:
                return list(self._writer_conn().execute(sql, params).fetchall())
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise StoreError(f"store read failed: {exc}") from exc
                # retried below, on this thread's connection, with the process lock released
            except sqlite3.Error as exc:
                raise StoreError(f"store read failed: {exc}") from exc
            finally:
                lock.release()
        try:
            conn = self._conn()
            return list(_retry_busy(lambda: conn.execute(sql, params)).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def _snapshot(self, run: Callable[[sqlite3.Connection], _T]) -> _T:
        """``run(connection)`` in one read transaction, outside the write lock.

        For long reads that must see one state of the file. In ":memory:" it runs in a write
        transaction instead: another connection would be another, empty database.
        """
        if self.path == ":memory:":
            with self._write() as db:
                return run(db)
        conn = self._conn()
        try:
            _retry_busy(lambda: conn.execute("BEGIN"))
            try:
                return run(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    def _reset_wal(self, patience: float = 5.0) -> None:
        """Copy the WAL into the database and empty it (``wal_checkpoint(TRUNCATE)``).

        After deleting personal data (an erasure, retention, expired dedup keys): secure_delete
        overwrites what was deleted in the database, but the WAL still holds earlier images of
        those pages until it is reset. Tried for up to
        ``patience`` seconds while readers or writers hold it; then logged and left.
        """
        if self.path == ":memory:":
            return
        deadline = time.monotonic() + patience
        try:
            conn = self._conn()
            while True:
                row = _retry_busy(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
                busy = row.fetchone()
                if not (busy and busy[0]) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        except sqlite3.Error as exc:
            log.warning(
                "WAL not reset after deleting personal data",
                extra={"error_type": type(exc).__name__},
            )
            return
        if busy and busy[0]:
            log.warning(
                "WAL not reset after deleting personal data: other connections kept using it"
            )

    def close(self) -> None:
        """Close this thread's connection and the process's writer (and stop checkpointing)."""
        self._closed.set()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._process_lock():
            if self._writer is not None and self._writer_pid == _PID:
                self._writer.close()
            self._writer = None
            self._host.close()
