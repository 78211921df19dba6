"""One lock per process around CPU-heavy work, so a store writer is not kept waiting for the GIL.

Every SQLite call releases the GIL. A thread holding the database's write lock gets the GIL
back only when the thread that took it meanwhile blocks, or after the interpreter's switch
interval (5 ms): with the other request threads busy evaluating rules, each statement of a
write transaction could wait that long, and the whole host's writers with it, since the write
lock is the file's. Rule evaluation and store transactions therefore take turns on this lock:
while a transaction runs, no other thread of the process starts CPU work, so the GIL comes
back to the writer as soon as SQLite returns. Threads that wait here sleep on the lock, not on
the GIL, and socket I/O is never done under it.
"""

from __future__ import annotations

import os
import threading

CPU = threading.RLock()  # reentrant: a store write inside gated work must not deadlock


def _reset() -> None:
    global CPU  # a lock held by another thread at fork time would never be released
    CPU = threading.RLock()


os.register_at_fork(after_in_child=_reset)
