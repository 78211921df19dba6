"""The host's writer lock: an exclusive ``flock`` on ``<database>-writer``, waited for with a limit.

Every tagrelay process writing the file takes it before ``BEGIN IMMEDIATE``; the kernel hands it
to the next waiter the moment it is freed (and frees it when its holder dies), which SQLite's own
lock, retried with sleeps, cannot do. But ``flock`` itself waits without a limit: one process
stopped while holding it (SIGSTOP, a frozen cgroup, a debugger, a machine swapping hard) would
hang every write of every other process for good, the intake's included, instead of their
answering 503.

So a lock that is free is taken at once (``LOCK_NB``), and one that is taken is tried again
after short sleeps for up to 2 ms: another process holds it for one commit, and most waits end
there. A longer wait is handed to a thread of the process that blocks in ``flock`` for it, and
the writer waits for that thread with a deadline. (Handing every wait over cost a contended
write about 40 µs of CPU more than blocking in ``flock`` itself, in thread switches and GIL
hand-offs; trying again first takes back most of it with two processes writing, less with
eight.) A writer that gives up leaves the thread waiting: the next writer of the
process takes its place in the kernel's queue instead of joining it anew, and a lock that
comes when nobody wants it any more is given back at once. Each process opens the file on its
own (an open file description inherited across a fork would share its lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time

from engine.errors import StoreError

POLL_SECONDS = 0.002
"""How long a writer tries the lock without blocking before it hands the wait to the waiter
thread (see :meth:`HostLock._poll`)."""
POLL_FIRST_PAUSE = 0.00005
POLL_LONGEST_PAUSE = 0.0005


class HostLock:
    """The exclusive lock on ``path`` for the writers of one process, one at a time.

    Callers hold a lock of their own process around :meth:`acquire` and :meth:`release` (the
    store's process lock): one writer of the process asks at a time.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = -1
        self._fd = -1  # this process's descriptor of the lock file; -1 when closed
        self._cond = threading.Condition()
        self._blocked = False  # a waiter thread is in its blocking flock (on self._fd)
        self._wanted = False  # a writer waits for the waiter thread's lock
        self._granted = False  # the waiter thread took the lock for that writer
        self._asked = -1  # the descriptor the waiter thread is to wait on next, if any
        self._waiter: threading.Thread | None = None  # started at the first wait, kept

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most ``timeout`` seconds.

        Raises:
            StoreError: the lock file cannot be opened, or another process held the lock for
                the whole time.
        """
        deadline = time.monotonic() + timeout
        if self._pid != os.getpid():
            self._fresh()
        if self._poll(min(deadline, time.monotonic() + POLL_SECONDS)):
            return
        with self._cond:
            fd = self._own_fd()
            if not self._blocked:
                if self._take(fd):
                    return
                self._blocked, self._asked = True, fd
                if self._waiter is None:
                    waiter = threading.Thread(
                        target=self._wait_for_locks, name="sqlite-writer-lock", daemon=True
                    )
                    try:
                        waiter.start()
                    except RuntimeError as exc:  # no thread to be had: try again next time
                        self._blocked, self._asked = False, -1
                        raise StoreError("the store is busy (no thread to wait with)") from exc
                    self._waiter = waiter
                self._cond.notify_all()
            self._wanted, self._granted = True, False
            while not self._granted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._blocked:
                    self._wanted = False
                    raise StoreError(
                        f"the store is busy: another process held its write lock for {timeout:g} s"
                        if remaining <= 0
                        else "the store's write lock failed"
                    )
                self._cond.wait(remaining)
            self._wanted = self._granted = False

    def _poll(self, until: float) -> bool:
        """Whether the lock was taken by trying it without blocking until ``until``, sleeping
        a little longer between tries; False at once while the waiter thread waits for it.

        Another process holds the lock for one commit, a fraction of a millisecond: trying
        again after a short sleep takes it about as soon as it is free, for two system calls,
        where handing the wait to the waiter thread costs four thread switches and the GIL
        twice. Past ``until`` the wait is handed over to a thread blocked in ``flock``, which
        the kernel wakes when the lock is freed: a process that only polled could be overtaken
        for as long as the others kept the lock busy. (A poller can still take the lock ahead
        of another process's blocked waiter; ``flock`` promises no order anyway.)
        """
        pause = POLL_FIRST_PAUSE
        while True:
            with self._cond:
                if self._blocked:
                    return False
                if self._take(self._own_fd()):
                    return True
            if time.monotonic() + pause > until:
                return False
            time.sleep(pause)
            pause = min(pause * 2, POLL_LONGEST_PAUSE)

    @staticmethod
    def _take(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        """Give the lock back."""
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file; a waiter thread still blocked on it closes it when it is done."""
        if self._pid != os.getpid():
            return  # nothing of this process's to close (the parent's is the parent's)
        with self._cond:
            if self._fd < 0:
                return
            if not self._blocked:
                os.close(self._fd)
            self._fd = -1

    def _fresh(self) -> None:
        """Start over in a forked child: none of the parent's threads came along, its waiter
        may have held the condition's lock at the fork, and its descriptor shares the parent's
        lock. (Called before the condition is taken, by the child's only writer.)"""
        if self._fd >= 0:
            # The parent's descriptor shares the parent's lock: kept open here, it would keep
            # the lock held for every process if the parent died holding it. Closing this copy
            # releases nothing of the parent's.
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._pid, self._fd, self._waiter = os.getpid(), -1, None
        self._cond = threading.Condition()
        self._blocked = self._wanted = self._granted = False
        self._asked = -1

    def _own_fd(self) -> int:
        """This process's descriptor of the lock file, opened on first use (and after close)."""
        if self._fd < 0:
            if self._blocked:
                raise StoreError("the store was closed while a write waited for its lock")
            # Read-only is enough for flock, so an operator's command run as another user who
            # can read the database can take it too.
            try:
                self._fd = os.open(
                    f"{self.path}-writer", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            except OSError as exc:
                raise StoreError(f"cannot open the store's writer lock: {exc}") from exc
        return self._fd

    def _wait_for_locks(self) -> None:
        """The waiter thread: whenever asked, take the lock for whichever writer of the process
        wants it when it comes, or give it back at once if none does any more.

        One thread per process, kept: starting a thread for each wait cost more than the wait
        itself when processes take turns often.
        """
        while True:
            with self._cond:
                while self._asked < 0:
                    self._cond.wait()
                fd, self._asked = self._asked, -1
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
                taken = True
            except OSError:
                taken = False
            with self._cond:
                self._blocked = False
                current = fd == self._fd
                if taken and current and self._wanted:
                    self._granted = True
                elif taken:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if not current:  # closed meanwhile: the descriptor was left to this thread
                    os.close(fd)
                self._cond.notify_all()
