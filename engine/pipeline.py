"""The intake pipeline: validate -> evaluate rules -> dedup + store -> (outbox).

Rule evaluation runs before the store transaction (it is pure CPU work); the store then claims
the event ID and the tags' dedup keys and writes the event with its deliveries in one
transaction, so a crash can never leave an event half-accepted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from engine import event as events
from engine import gate, identity, metrics
from engine.errors import BadRequest, DiskLow, RulesError, UnstorablePayload
from engine.logs import Throttle
from engine.rules import Container, compile_container
from engine.rules.model import without_unstorable
from engine.rules.source import rule_files
from engine.store.base import Acceptance, Accepted, Store

log = logging.getLogger(__name__)


def file_times(path: Path) -> dict[str, float]:
    """The modification time of each rule file at ``path`` ({} when it cannot be read); a link
    to nothing counts as a file of time 0, so that restoring what it points to is a change."""
    times: dict[str, float] = {}
    try:
        for file in rule_files(path):
            try:
                times[str(file)] = file.stat().st_mtime
            except FileNotFoundError:
                times[str(file)] = 0.0
    except OSError:
        return {}
    return times


class RulesHolder:
    """The live container, reloaded when its files change; a bad edit never replaces a good one.

    Checks file modification times at most every ``interval`` seconds, on the request path but
    without blocking it for more than a ``stat`` per file.
    """

    def __init__(
        self,
        path: Path,
        container: Container,
        interval: float = 2.0,
        mtimes: dict[str, float] | None = None,
    ) -> None:
        """``mtimes``: :func:`file_times` taken before ``container`` was compiled (else now),
        so that a file changed during the compile is compiled again."""
        self.path = path
        self._container = container
        self._interval = interval
        self._checked = time.monotonic()
        self._mtimes = file_times(path) if mtimes is None else mtimes
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def _scan(self) -> dict[str, float]:
        return file_times(self.path)

    @property
    def container(self) -> Container:
        """The current container (reloaded first if the files changed)."""
        if self._interval > 0 and time.monotonic() - self._checked >= self._interval:
            self.maybe_reload()
        return self._container

    def maybe_reload(self) -> bool:
        """Reload if the rule files changed; returns whether a new container was installed."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._checked = time.monotonic()
            mtimes = self._scan()
            if mtimes == self._mtimes:
                return False
            changed = sorted(p for p, t in mtimes.items() if self._mtimes.get(p) != t)
            # Recorded first: files that fail are not compiled again on every request, only
            # after their next change.
            self._mtimes = mtimes
            try:
                container, problems = compile_container(self.path)
            except Exception as exc:  # noqa: BLE001 - a reload must never fail a request
                # e.g. RecursionError from a deeply nested or self-referencing YAML file. The
                # message may quote the files (values of secrets included): only the type.
                error = type(exc).__name__
                self.last_error = f"rules reload failed: {error} (changed: {', '.join(changed)})"
                log.error(
                    "rules reload failed; keeping the previous rules",
                    extra={"error": error, "changed": changed[:20]},
                )
                return False
            if container is None:
                errors = [str(p) for p in problems if p.severity == "error"]
                self.last_error = "; ".join(errors[:5])
                log.error(
                    "rules reload refused; keeping the previous rules",
                    extra={"problems": errors[:20]},
                )
                return False
            self.last_error = None  # the files check again, even if they are back as they were
            if container.fingerprint == self._container.fingerprint:
                return False
            self._container = container
            log.info("rules reloaded", extra={"tags": len(container.tags)})
            return True
        finally:
            self._lock.release()


@dataclass(frozen=True)
class Outcome:
    """The result for one event of a request: accepted (possibly duplicate) or rejected."""

    accepted: Accepted | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The per-event JSON the API answers with."""
        if self.accepted is None:
            return {"success": False, "error": self.error}
        return {
            "success": True,
            "event_id": self.accepted.event_id,
            "duplicate": self.accepted.duplicate,
            "fired": self.accepted.fired,
        }


@dataclass(frozen=True)
class Privacy:
    """What the pipeline keeps about people (see README, "Privacy")."""

    ip_storage: str = "consent"  # consent | truncate | drop | keep
    click_id_window: float = 30 * 86400.0
    click_id_windows: Mapping[str, float] = field(default_factory=dict)  # per click ID name
    redact_query_params: frozenset[str] = frozenset()  # page URL fields always redacted


# How far a backend's clock may be behind the server's: a click seen up to this long after a
# server event's time may still be the one that led to it.
CLOCK_SKEW = 60.0


def enrich_from_store(
    store: Store,
    privacy: Privacy,
    event: dict[str, Any],
    now: datetime,
    granted: frozenset[str],
    signed_out: bool = False,
) -> list[str]:
    """Add what ``store`` remembers about the event's visitor or user, as the event's consent
    (``granted``) allows; the fields added. ``signed_out``: the client sent ``"user_id":
    null`` (:func:`engine.event.signs_out`), so no user ID is added."""
    visitor, user = event.get("visitor_id"), event.get("user_id")
    if not visitor and not user:
        return []
    at = now.timestamp()
    if event.get("source") != "browser":
        # A backend's event sent after it happened (a queue, a CRM's sale of yesterday) is
        # enriched as of its time: a click seen after the sale did not lead to it (Google Ads
        # refuses the conversion, Meta credits the wrong ad), and the windows run to the sale.
        # A page's time is the visitor's clock, read only up to the server's (at_most_now).
        at = min(at, events.event_time(event).timestamp() + CLOCK_SKEW)
    found = store.recall(
        str(visitor) if visitor else None,
        str(user) if user else None,
        at,
        privacy.click_id_windows,
        privacy.click_id_window,
    )
    return identity.enrich(event, found, granted, signed_out) if found else []


class FreeSpace:
    """Intake's reserve of free disk at the store: below it, events are refused (503) before
    anything is written, and the space left is kept for what must still be written (delivery
    outcomes, retention's deletes, checkpoints). A full disk fails intake too, but also every
    delivery outcome, and a delivered item whose outcome cannot be recorded is sent again.

    The store is asked at most every ``interval`` seconds; a store that cannot tell is taken
    to have room.
    """

    def __init__(self, store: Store, reserve_bytes: int, interval: float = 1.0) -> None:
        self.store = store
        self.reserve_bytes = reserve_bytes
        self.interval = interval
        self._checked = -interval
        self._free: int | None = None
        self._reported = Throttle()  # once a minute, not once a request

    def free(self) -> int | None:
        """Bytes free at the store (as of at most ``interval`` seconds ago), None if unknown."""
        now = time.monotonic()
        if now - self._checked >= self.interval:
            self._checked = now
            self._free = self.store.free_bytes()
        return self._free

    @property
    def low(self) -> bool:
        """Whether the store has less free space than the reserve."""
        free = self.free() if self.reserve_bytes > 0 else None
        return free is not None and free < self.reserve_bytes

    def check(self) -> None:
        """Raises:
        DiskLow: the store has less free space than the reserve.
        """
        if not self.low:
            return
        if self._reported.due():
            log.error(
                "intake refused: the store's disk is below its reserve",
                extra={
                    "free_mb": (self._free or 0) // 2**20,
                    "min_free_mb": self.reserve_bytes // 2**20,
                },
            )
        raise DiskLow("the server's disk is nearly full: nothing was accepted; retry later")


class StoreOutage:
    """Requests refused because the store failed, logged at ERROR at most once a minute per
    process, and the outage's end once, with the first event committed after it.

    A full disk or a store that stays locked refuses every request: a line each was thousands a
    second at full load, drowning what else the log has to say (and, with the log on the full
    disk, filling it further). Each line says how many were refused since the last.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._throttle = Throttle(interval)
        self._since = 0  # refused since the last line
        self._total = 0  # refused since the outage began
        self._began: float | None = None  # time.monotonic() of its first refusal; None: no outage

    def refused(self, exc: Exception) -> None:
        """Count one refusal; log it (with those since the last line) when a minute has passed."""
        with self._lock:
            self._since += 1
            self._total += 1
            if self._began is None:
                self._began = time.monotonic()
            if not self._throttle.due():
                return
            count, self._since = self._since, 0
        log.error(
            "store unavailable; requests refused",
            extra={"error": str(exc)[:200], "refused": count},
        )

    def over(self) -> None:
        """The store committed: if an outage was going on, log its end (once)."""
        if self._began is None:  # the usual case, without taking the lock
            return
        with self._lock:
            if self._began is None:
                return
            seconds = time.monotonic() - self._began
            total, self._total, self._since, self._began = self._total, 0, 0, None
            self._throttle = Throttle(self._throttle.interval)  # the next outage's first line
        log.warning(
            "store available again; intake resumed",
            extra={"refused": total, "outage_seconds": round(seconds, 1)},
        )


class Pipeline:
    """Accepts events: the one path every intake endpoint goes through.

    validate -> enrich from the visitor's identity -> IP policy -> rules -> one store
    transaction (dedup, event, deliveries, identity update).
    """

    def __init__(
        self,
        store: Store,
        rules: RulesHolder,
        privacy: Privacy | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        """``reserve_bytes``: free disk at the store below which intake is refused (0: none)."""
        self.store = store
        self.rules = rules
        self.privacy = privacy or Privacy()
        self.space = FreeSpace(store, reserve_bytes)
        self.outage = StoreOutage()

    def enrich(
        self,
        event: dict[str, Any],
        now: datetime,
        granted: frozenset[str],
        signed_out: bool = False,
    ) -> list[str]:
        """Add what the store remembers about the event's visitor or user, as its consent
        allows; the fields added (no user ID when ``signed_out``: see enrich_from_store)."""
        return enrich_from_store(self.store, self.privacy, event, now, granted, signed_out)

    def prepare(
        self,
        raw: Any,
        container: Container,
        now: datetime,
        enrich: bool = True,
        source: str = "server",
    ) -> Acceptance:
        """Validate, enrich and evaluate one event (reads the store, writes nothing).

        ``source``: the endpoint that took it, ``server`` or ``browser`` (see
        :func:`engine.event.normalize`); event IDs are deduplicated per source.

        Raises:
            BadRequest: the event is invalid.
        """
        normalized = events.normalize(raw, now, self.privacy.redact_query_params, source)
        # "user_id": null, which normalize leaves out: nobody is signed in (reset(), a logout).
        signed_out = events.signs_out(raw)
        # Computed once for the enrichment, the IP policy, every tag and the identity update;
        # neither the enrichment nor the IP policy touches the event's consent.
        consent = container.consent(normalized)
        added = self.enrich(normalized, now, consent.granted, signed_out) if enrich else []
        identity.apply_ip_policy(normalized, self.privacy.ip_storage, consent.granted)
        if added and (held := identity.still_held(normalized, added)):
            normalized["enriched"] = held
        decisions = container.evaluate(normalized, now=now, consent=consent)
        received_at = now.timestamp()
        update = identity.identity_update(
            normalized, consent.granted, received_at, added, signed_out
        )
        return Acceptance(normalized, decisions, container.dedup_window, received_at, update)

    def accept(
        self, raws: Sequence[Any], now: datetime | None = None, source: str = "server"
    ) -> list[Outcome]:
        """Accept a list of raw events; one outcome per event, in order. ``source``: see
        :meth:`prepare`.

        Raises:
            StoreError: the store could not commit, or (DiskLow) its disk is below the reserve;
                nothing of this call was accepted.
        """
        self.space.check()
        now = now or datetime.now(UTC)
        container = self.rules.container
        outcomes: list[Outcome | None] = []
        prepared: list[Acceptance] = []
        for raw in raws:
            try:
                with gate.CPU:
                    prepared.append(self.prepare(raw, container, now, source=source))
                outcomes.append(None)
            except BadRequest as exc:
                outcomes.append(Outcome(error=str(exc)))
        try:
            stored = iter(self.store.accept_many(prepared) if prepared else [])
        except UnstorablePayload:
            # A plugin's payload that JSON cannot carry (the store found it while encoding;
            # nothing was written): its tag does not fire, and the rest is accepted.
            prepared = [
                replace(acc, decisions=without_unstorable(acc.decisions, container.destinations))
                for acc in prepared
            ]
            stored = iter(self.store.accept_many(prepared))
        if prepared:
            self.outage.over()
        result = [o if o is not None else Outcome(accepted=next(stored)) for o in outcomes]
        _count(result)
        return result


def _count(outcomes: Sequence[Outcome]) -> None:
    counts: list[tuple[Counter, tuple[str, ...]]] = []
    for outcome in outcomes:
        accepted = outcome.accepted
        if accepted is None:
            counts.append((metrics.EVENTS, ("rejected",)))
        elif accepted.duplicate:
            counts.append((metrics.EVENTS, ("duplicate",)))
        else:
            counts.append((metrics.EVENTS, ("accepted",)))
            for d in accepted.decisions:
                fired = bool(d.get("fired"))
                reason = "fired" if fired else metrics.reason_kind(str(d.get("reason", "")))
                counts.append((metrics.TAGS, (d["tag"], "fired" if fired else "blocked", reason)))
    metrics.TALLY.add_many(counts)


def load_rules(path: Path, interval: float = 2.0) -> RulesHolder:
    """Compile the container at ``path`` for serving.

    Raises:
        RulesError: the container does not check; the server must not start.
    """
    mtimes = file_times(path)  # before compiling: a file changed meanwhile is compiled again
    container, problems = compile_container(path)
    if container is None:
        raise RulesError([p for p in problems if p.severity == "error"])
    return RulesHolder(path, container, interval, mtimes)
