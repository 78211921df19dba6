"""Scheduled housekeeping: retention (events and identities older than N days), expired keys
and rate counters.

Runs in a background thread of every server or worker process, once an hour (the first run a
minute after start); expired dedup keys are dropped every six hours (KEY_INTERVAL). Running it
in several processes at once is harmless: each purge is a series of short transactions of
idempotent deletes, so intake is never held up for long. Each step (expired keys, rate
counters, retention) runs whether or not the others failed; a step or run that fails (the
store is unavailable, or anything else goes wrong) is logged and the thread carries on: the
next run tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engine.errors import StoreError, TagrelayError
from engine.ratelimit import COUNTER_TTL
from engine.store.base import Store

log = logging.getLogger(__name__)

DAY = 86400.0


KEY_INTERVAL = 6 * 3600.0
"""How often the hourly job also drops expired dedup keys.

Keys are random, so the keys that expire within an hour lie on most pages of the table, and
dropping them rewrites those pages. Every six hours that rewrite happens four times a day
instead of twenty-four: a quarter of the writes (measured: 0.5 GB a day instead of 1.9 GB at
a million keys), for a table at most six hours of keys larger. An expired key never counts as
a duplicate, whenever it is dropped."""


class PurgeIncomplete(TagrelayError):
    """Some housekeeping steps failed; the others ran. Retrying (the next run) is safe.

    Attributes:
        removed: what the steps that ran removed, as :func:`run_once` returns it.
        failed: each failed step's name and its error's type (never its message, which can
            quote stored data).
    """

    def __init__(self, removed: dict[str, int], failed: dict[str, str]) -> None:
        steps = ", ".join(f"{step} ({error_type})" for step, error_type in failed.items())
        super().__init__(f"housekeeping steps failed: {steps}")
        self.removed = removed
        self.failed = failed


def run_once(
    store: Store, retention_days: int, now: float | None = None, keys: bool = True
) -> dict[str, int]:
    """Purge what is past retention, rate counters past use (whatever the retention: their
    keys are made from client IPs) and, with ``keys``, dedup keys past their window; returns
    what was removed.

    Each step runs whatever became of the others: a failure in one (dropping expired keys,
    say) must not keep personal data past retention. A failed step is logged with its error's
    type only (a message can quote stored data).

    Raises:
        PurgeIncomplete: a step failed, after every step was tried.
    """
    now = time.time() if now is None else now
    steps: list[tuple[str, Callable[[], dict[str, int]]]] = []
    if keys:
        steps.append(("dedup_keys", lambda: {"dedup_keys": store.purge_expired(now)}))
    steps.append(
        (
            "rate_counters",
            lambda: {"rate_counters": store.purge_rate_counters(now - COUNTER_TTL)},
        )
    )
    if retention_days > 0:
        steps.append(("retention", lambda: store.purge(now - retention_days * DAY, now)))
    removed: dict[str, int] = {}
    failed: dict[str, str] = {}
    for step, run in steps:
        try:
            removed.update(run())
        except StoreError as exc:
            failed[step] = type(exc).__name__
            log.warning(
                "housekeeping step skipped: store unavailable",
                extra={"step": step, "error_type": type(exc).__name__},
            )
        except Exception as exc:  # noqa: BLE001 - the other steps must run whatever this was
            failed[step] = type(exc).__name__
            log.error(
                "housekeeping step failed; retried at the next run",
                extra={"step": step, "error_type": type(exc).__name__},
            )
    if failed:
        raise PurgeIncomplete(removed, failed)
    return removed


class Maintenance:
    """The housekeeping thread."""

    def __init__(
        self,
        store: Store,
        retention_days: int,
        interval: float = 3600.0,
        delay: float = 60.0,
        key_interval: float = KEY_INTERVAL,
    ) -> None:
        self.store = store
        self.retention_days = retention_days
        self.interval = interval
        self.delay = delay
        self.key_interval = key_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (it finishes the purge it is in)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        wait = self.delay
        keys_due = 0.0  # time.monotonic() when expired dedup keys are next dropped
        while not self._stop.wait(wait):
            wait = self.interval
            keys = time.monotonic() >= keys_due
            try:
                removed = run_once(self.store, self.retention_days, keys=keys)
            except PurgeIncomplete as exc:
                # Each failed step is logged by run_once; the next run tries it again.
                if keys and "dedup_keys" not in exc.failed:
                    keys_due = time.monotonic() + self.key_interval
                log.info(
                    "retention purge done in part",
                    extra={"removed": exc.removed, "failed": sorted(exc.failed)},
                )
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one run
                # Uncaught, it ended the thread for good, unlogged (Python's default hook
                # printed the traceback, message included, to stderr): nothing was purged
                # again until a restart, and personal data stayed past retention. The type
                # alone: a message or traceback can quote stored data.
                log.error(
                    "retention purge failed; retried at the next run",
                    extra={"error_type": type(exc).__name__},
                )
            else:
                if keys:
                    keys_due = time.monotonic() + self.key_interval
                log.info("retention purge done", extra={"removed": removed})
