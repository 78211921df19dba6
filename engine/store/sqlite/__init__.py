"""The embedded store: one SQLite file in WAL mode, shared by every worker process on a host.

Concurrency: each process has one connection for its writes (opened lazily, reopened after a
fork), which also serves lookups by key while no write is running; other reads use a connection of
the reading thread (see "connections" in connection.py). Writes take SQLite's write lock up front
(``BEGIN IMMEDIATE``) so the check-then-insert of dedup keys is atomic across processes; readers
never block writers in WAL mode.

Durability: ``synchronous=NORMAL`` (the default here) survives any crash of tagrelay itself,
``kill -9`` included, because a committed transaction is in the WAL before ``accept`` returns;
only a power loss or kernel crash can lose the last transactions. ``synchronous=FULL`` closes that
gap at the cost of an fsync per commit (set ``TAGRELAY_SQLITE_SYNC=full``).

The package, one idea a module (``SQLiteStore`` is assembled in store.py from a part per
responsibility, each a class over the connections):

- ``schema``: the tables and indexes, and the in-place upgrade of an earlier version's file.
- ``connection``: connections, the process and host writer locks, write and read
  transactions, retries while SQLite is busy, background checkpoints.
- ``sql``: compact JSON for the columns, statements over many rows, event rows.
- ``intake``: accept_many's group commit, dedup by event ID and tag dedup key.
- ``visitors``: what events teach about their visitors (written at intake), and recall.
- ``outbox``: leases, their renewal and settlement, dead letters and replay.
- ``persons``: which events are a person's (their IDs, their e-mail address), for forget.
- ``erasure``: forget, retention (purge) and the expiry of dedup keys.
- ``store``: SQLiteStore itself: opening the file, secrets, rate counters.
"""

from engine.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore"]
