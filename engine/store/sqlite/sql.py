"""What the parts of the SQLite store share: compact JSON, statements over many rows, events."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from engine import jsonio
from engine.store.base import StoredEvent


def _dumps(value: Any) -> str:
    """The store's JSON: compact, not ASCII-escaped, but for what orjson refuses (see
    engine.jsonio.dumpb).

    ``jsonio.dumps`` writes a lone surrogate (in a plugin's payload, say) as it is: text that
    UTF-8, and so SQLite, cannot carry, and binding it failed the write of the whole group
    commit (a 503 for every caller in it, and for that event for ever). Escaped, it is read
    back as it was.

    Raises:
        TypeError: a value JSON cannot hold.
        ValueError, RecursionError: as ``json.dumps``.
    """
    return jsonio.dumpb(value).decode("utf-8")


WITHHELD = "(error withheld: it may quote a person since erased)"


def _withheld(error: str) -> str:
    """A delivery's error without its text, but with its kind (``permanent: HTTP 400: ...``).

    An error answers a whole request, and may quote any of its events (a receiver that echoes
    the body): it is kept so in the other deliveries of a request one of whose events was
    erased (forget).
    """
    kind, sep, _ = error.partition(": ")
    return f"{kind}: {WITHHELD}" if sep and " " not in kind else WITHHELD


def _marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)


def _chunks(values: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _stored_event(row: sqlite3.Row) -> StoredEvent:
    return StoredEvent(
        seq=row["seq"],
        event_id=row["event_id"],
        event=jsonio.loads(row["body"]),
        received_at=row["received_at"],
        decisions=jsonio.loads(row["decisions"]),
    )


# One transaction accepts every event of a group commit with a fixed number of statements
# (multi-row INSERTs, IN lookups), not a handful per event: each statement releases the GIL,
# and with the other request threads of the process waiting for it, every release is a thread
# switch made while this process holds the database's write lock.

_MAX_PARAMS = 900  # per statement; under SQLite's historical limit of 999 host parameters


@functools.lru_cache(maxsize=512)
def _values_sql(head: str, rows: int, width: int, tail: str) -> str:
    marks = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([marks] * rows)}{tail}"


@functools.lru_cache(maxsize=512)
def _in_sql(sql: str, count: int) -> str:
    return sql.format(marks=", ".join("?" * count))


def _insert_rows(
    db: sqlite3.Connection,
    head: str,
    rows: Sequence[Sequence[Any]],
    tail: str = "",
    rowids: bool = False,
) -> list[int]:
    """``head VALUES (...), (...) tail`` for all ``rows`` (chunked); with ``rowids``, the rowid
    of every row.

    The rowids are only meaningful for a rowid table whose keys SQLite assigns (AUTOINCREMENT):
    one multi-row INSERT then numbers its rows consecutively, the write lock being ours, so
    the last rowid of a chunk gives all of them.
    """
    if not rows:
        return []
    width = len(rows[0])
    size = max(1, _MAX_PARAMS // width)
    out: list[int] = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        params = chunk[0] if len(chunk) == 1 else list(itertools.chain.from_iterable(chunk))
        cursor = db.execute(_values_sql(head, len(chunk), width, tail), params)
        if rowids:
            last = int(cursor.lastrowid or 0)
            out += range(last - len(chunk) + 1, last + 1)
    return out


def _select_in(db: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> list[sqlite3.Row]:
    """``sql`` with its ``{marks}`` filled in for ``keys`` (chunked)."""
    rows: list[sqlite3.Row] = []
    for start in range(0, len(keys), _MAX_PARAMS):
        chunk = keys[start : start + _MAX_PARAMS]
        rows += db.execute(_in_sql(sql, len(chunk)), chunk).fetchall()
    return rows
