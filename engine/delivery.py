"""The outbox worker: lease, batch, send, read per-item results, retry with backoff, dead-letter.

One :class:`DeliveryWorker` runs per process (a thread in each gunicorn worker, or the
``tagrelay worker`` process). Workers share the outbox through leases: a worker leases a batch,
and a lease that expires because its worker died is taken over by another. Delivery is at least
once; the event ID travels in every payload so platforms deduplicate.

Per destination: batches up to the adapter's ``max_batch`` (or whatever is due once the oldest
item has waited ``batch_wait``), sent in the requests the adapter's ``split`` makes of each batch
key's items; at most ``concurrency`` requests in flight per process; and a circuit breaker that
pauses a destination after consecutive failures and probes it again later.
A slow or failing destination therefore never holds up the others.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from destinations.base import (
    Destination,
    HttpRequest,
    HttpResponse,
    Item,
    ItemResult,
    Outcome,
    SendContext,
    redact_values,
    retry_after_seconds,
)
from engine import metrics
from engine.batching import SplitError, split_group
from engine.breaker import Backoff, CircuitBreaker
from engine.errors import StoreError
from engine.rules.model import Container, DeliveryOptions, DestinationInstance
from engine.store.base import GAVE_UP_AFTER_RETRIES, Delivery, Store, given_up, past_max_age
from engine.transport import Transport, TransportError

log = logging.getLogger(__name__)

AUTH_RETRY_FLOOR = 60.0  # credentials rarely fix themselves within seconds
# Outcomes that count as a failed request for the circuit breaker.
_FAILED = frozenset({Outcome.RETRYABLE, Outcome.AUTH})
MISSING_DESTINATION_RETRY = 60.0
STORE_SLACK = 10.0
"""Seconds of a lease kept for the store and the scheduler, beyond its requests' own time."""
RENEW_TRIES = 3  # renewals of one lease before a request, while each is slower than STORE_SLACK
MAX_THREADS = 4096
"""The delivery pool's bound, only against runaway settings: what bounds the threads is each
destination's ``concurrency`` (the batches in flight, queued included, that :meth:`tick` allows
it), and threads are made as batches need them. A pool smaller than the concurrencies added up
let a slow destination's batches take every thread and hold up the others."""


@dataclass
class _TokenCache:
    value: str | None = None
    expires_at: float = 0.0
    # The exchange that gave the token: a reload that changes the destination's credentials
    # (another client, account or refresh token) changes it, and the token is not used again.
    exchange: bytes = b""
    # The adapter instance that obtained it (a weak reference, None if it takes none): its
    # settings do not change, so its token is its own however its exchange differs from one
    # call to the next (a plugin's may carry the time: a JWT assertion, a nonce).
    owner: weakref.ref[Destination] | None = None

    def usable(self, exchange: bytes, adapter: Destination) -> bool:
        """Still valid, and given to this adapter or for these credentials."""
        if not self.value or time.time() >= self.expires_at:
            return False
        return (self.owner is not None and self.owner() is adapter) or self.exchange == exchange


def _owner(adapter: Destination) -> weakref.ref[Destination] | None:
    try:
        return weakref.ref(adapter)
    except TypeError:  # a plugin object that takes no weak reference: told by its exchange
        return None


def _exchange_digest(request: HttpRequest) -> bytes:
    """A digest of a token exchange as it would be sent (its credentials included)."""
    digest = hashlib.sha256()
    for part in (request.method, request.url, *sorted(request.headers.items())):
        digest.update(repr(part).encode() + b"\0")
    digest.update(request.body)
    return digest.digest()


class StoreTooSlow(StoreError):
    """A lease could not be renewed within :data:`STORE_SLACK`, :data:`RENEW_TRIES` times in a
    row: the batch stops before its next request."""


class DeliveryWorker:
    """Delivers the outbox, in a background thread, until :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        container: Callable[[], Container],
        transport: Transport | None = None,
        poll_interval: float = 0.2,
        backoff: Backoff | None = None,
    ) -> None:
        self.store = store
        self.container = container
        self.transport = transport or Transport()
        self.poll_interval = poll_interval
        self.backoff = backoff or Backoff()
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="deliver")
        self._in_flight: dict[str, int] = defaultdict(int)
        self._flight_lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._tokens: dict[str, _TokenCache] = {}
        self._token_lock = threading.Lock()
        self._token_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._stopping = False  # stop() was called (it runs once)
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the polling thread."""
        self._thread = threading.Thread(target=self._run, name="delivery", daemon=True)
        self._thread.start()
        log.info("delivery worker started", extra={"owner": self.owner})

    def stop(self, timeout: float = 20.0, heartbeat: Callable[[], object] | None = None) -> None:
        """Stop polling and let in-flight batches finish (their requests have timeouts).

        ``heartbeat``: called every second while waiting. A gunicorn worker passes its
        ``notify``: its master kills a worker silent for its ``timeout`` (30 s), and a worker
        restarted by a SIGHUP waits here, after its last request, for a delivery request that
        can take longer than that; killed, it left its lease held and the request was sent
        again once the lease ran out. Only the first call stops; later ones return at once.
        """
        with self._flight_lock:
            if self._stopping:
                return  # stopped already (a gunicorn worker stops it twice: see engine.server)
            self._stopping = True
        self._stop.set()
        if self._thread is not None:
            _join(self._thread, heartbeat, timeout)
        # The pool's shutdown waits for the batches in flight; in a thread, to beat meanwhile.
        finish = threading.Thread(
            target=self._pool.shutdown,
            kwargs={"wait": True, "cancel_futures": True},
            name="delivery-stop",
            daemon=True,
        )
        finish.start()
        _join(finish, heartbeat)
        log.info("delivery worker stopped", extra={"owner": self.owner})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except StoreError:
                log.warning("store unavailable; delivery paused")
                self._stop.wait(2.0)
            except Exception as exc:
                log.error(
                    "delivery loop error", exc_info=exc, extra={"error_type": type(exc).__name__}
                )
                self._stop.wait(1.0)
            self._stop.wait(self.poll_interval)

    def _holder(self) -> str:
        """Who holds the leases of the batch this thread runs: this worker and the thread.

        Two batches of one worker run at once, and one may lease again what the other leased and
        let run out (a batch sent request by request can outlast its lease); under one name for
        both, the renewal before each request told neither that the other had it, and both sent
        it. A thread runs one batch at a time.
        """
        return f"{self.owner}:{threading.get_ident()}"

    def breaker(self, destination: str) -> CircuitBreaker:
        """The circuit breaker of one destination."""
        return self._breakers.setdefault(destination, CircuitBreaker())

    # -- scheduling -----------------------------------------------------------------------------

    def tick(self, wait: bool = False) -> int:
        """One pass: start batches for every destination that is due and has room (as many
        as its due items fill and its free slots take; see :func:`_lease_size`).

        Args:
            wait: run the batches in this thread (tests, ``drain``) instead of the pool.

        Returns:
            how many batches were started.
        """
        now = time.time()
        container = self.container()
        started = 0
        for name, (count, oldest) in self.store.destinations_due(now).items():
            if self._stop.is_set():  # stopping: no batch is started any more
                break
            dest = container.destinations.get(name)
            if dest is None:
                self._park_missing(name, now)
                continue
            opts = dest.delivery
            full = count >= dest.adapter.max_batch
            if not full and now - oldest < opts.batch_wait and not wait:
                continue  # let the batch fill up, up to batch_wait
            size, batches = _lease_size(dest.adapter, count, opts.concurrency)
            breaker = self.breaker(name)
            # As many batches as the due items fill and the free slots take: one batch a tick
            # left the other slots idle for a poll interval each.
            for _ in range(batches):
                with self._flight_lock:
                    if self._in_flight[name] >= opts.concurrency:
                        break
                    allowed, probe = breaker.admit(time.monotonic())
                    if not allowed:
                        break
                    self._in_flight[name] += 1
                started += 1
                if wait:
                    self._run_batch(dest, probe, size)
                else:
                    self._submit(dest, probe, size)
                if probe:  # the one request let through a paused destination
                    break
        return started

    def _submit(self, dest: DestinationInstance, probe: int, size: int) -> None:
        """Hand a batch, whose slot is taken, to the pool."""
        task = _Queued()
        try:
            self._pool.submit(self._run_queued, task, dest, probe, size)
        except BaseException:
            # No thread to start (a process at its limit), or a pool shut down. The pool may
            # have queued the batch before failing to start a thread for it, for a thread it
            # has to run later: then that run gives the slot back. Otherwise it is given back
            # here, or the slot (and the breaker's probe) stayed taken for the life of the
            # process.
            if task.cancel():
                if probe:
                    self.breaker(dest.name).end_probe(probe)
                with self._flight_lock:
                    self._in_flight[dest.name] -= 1
            raise

    def _run_queued(self, task: _Queued, dest: DestinationInstance, probe: int, size: int) -> None:
        if task.start():  # not given up when it was queued
            self._run_batch(dest, probe, size)

    def drain(self, timeout: float = 30.0) -> None:
        """Deliver everything due now, in this thread (for tests and one-shot runs)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.tick(wait=True):
            pass

    def _park_missing(self, name: str, now: float) -> None:
        """Hold the due deliveries of a destination that is not in the rules; give up old ones.

        Nothing is attempted, so no attempt is counted: a destination put back within the
        default ``max_age`` still gets them all. Those older than that become dead letters
        (listed, replayable, and taken by retention with their events): left pending, they
        kept their events past retention for good.
        """
        items = self.store.lease(name, 500, 5.0, self._holder(), now)
        if not items:
            return
        log.error(
            "deliveries for a destination not in the current rules", extra={"destination": name}
        )
        max_age = DeliveryOptions().max_age  # the destination's own setting went with it
        expired = [d.id for d in items if now - d.created_at >= max_age]
        waiting = [d.id for d in items if now - d.created_at < max_age]
        if waiting:
            self.store.mark_retry(
                waiting,
                self._holder(),
                now + MISSING_DESTINATION_RETRY,
                f"destination {name} is not in the current rules",
                count_attempt=False,
            )
        if expired:
            error = (
                f"destination {name} is no longer in the rules "
                f"(gave up after {max_age / 86400:g} days)"
            )
            marked = self.store.mark_dead(expired, self._holder(), error, now, count_attempt=False)
            metrics.inc(metrics.DELIVERIES, (name, "dead_lettered"), marked)
            log.error(
                "deliveries dead-lettered",
                extra={"destination": name, "count": len(expired), "kind": "missing"},
            )

    # -- one batch ------------------------------------------------------------------------------

    def _run_batch(self, dest: DestinationInstance, probe: int = 0, size: int = 0) -> None:
        """One batch (see :meth:`_deliver`); ``probe``: its number from CircuitBreaker.admit
        when it is the probe."""
        try:
            self._deliver(dest, bool(probe), size)
        except StoreTooSlow as exc:
            log.warning(str(exc), extra={"destination": dest.name})
        except StoreError:
            log.warning("store unavailable during delivery", extra={"destination": dest.name})
        except Exception as exc:
            log.error(
                "delivery batch error",
                exc_info=exc,
                extra={"destination": dest.name, "error_type": type(exc).__name__},
            )
        finally:
            if probe:  # a probe that sent a request was judged by record(); this is a no-op then
                self.breaker(dest.name).end_probe(probe)
            with self._flight_lock:
                self._in_flight[dest.name] -= 1

    def _deliver(self, dest: DestinationInstance, probe: bool = False, size: int = 0) -> None:
        """Lease a batch of ``size`` items at most (0: ``max_batch``) and send it: the items of
        each batch key in the requests the adapter's
        :meth:`~destinations.base.Destination.split` makes of them.

        The lease covers one request. Before each further request (GA4 sends one per client,
        so a batch can take many in a row) the lease of what that request carries is renewed,
        and whatever another worker, or another batch of this one, has meanwhile taken over is
        left to it: an item is only ever sent by the batch that holds it.
        """
        if self._stop.is_set():
            # Handed to the pool as the worker began to stop: a request begun now could outlast
            # the server's graceful timeout, and the worker be killed with its lease held.
            return
        adapter, opts = dest.adapter, dest.delivery
        lease_seconds = self._lease_seconds(opts.timeout)
        asked = time.time()
        limit = size or adapter.max_batch
        leased = self.store.lease(dest.name, limit, lease_seconds, self._holder(), asked)
        if not leased:
            return
        ctx = SendContext(datetime.now(UTC))
        groups: dict[str, list[tuple[Delivery, Item]]] = defaultdict(list)
        for delivery in leased:
            item = Item(str(delivery.id), delivery.event_id, delivery.payload)
            try:
                problem = adapter.check_item(item, ctx)
                key = adapter.batch_key(item) if not problem else ""
                hash(key)  # a key that cannot group items (a list) fails its item here
            except Exception as exc:  # noqa: BLE001 - a plugin bug fails that item alone
                problem = f"{type(exc).__name__} in the adapter's check of the item"
            if problem:
                # str(): a plugin's reason that is no text (True, a dict) is still its reason.
                self._finish(dest, [delivery], ItemResult(Outcome.PERMANENT, str(problem)))
                continue
            groups[key].append((delivery, item))
        chunks = self._split(dest, groups.values())
        breaker = self.breaker(dest.name)
        for n, chunk in enumerate(chunks):
            batch = chunk
            if n:
                if self._stop.is_set():  # shutting down: what is not sent yet goes back now
                    self._release(dest, [pair for rest in chunks[n:] for pair in rest])
                    return
                probe = probe and breaker.is_open  # a success closed it: a batch like others
                # Paused by a failure of this batch or of another one, what is not sent yet goes
                # back, no attempt counted. A probe goes on while its requests fail, up to the
                # breaker's threshold: judged by its first alone, one item the platform always
                # refuses would keep a recovered destination paused.
                if breaker.is_open and (not probe or n >= breaker.threshold):
                    self._pause(dest, [pair for rest in chunks[n:] for pair in rest])
                    return
                batch = self._renew(dest, chunk, lease_seconds)
            elif time.time() - asked > STORE_SLACK:
                # The lease runs from when it was asked for: a wait for the store's write lock,
                # or settling the items found unsendable, ate into the time kept for the request.
                batch = self._renew(dest, chunk, lease_seconds)
            if batch:
                try:
                    self._send(dest, batch, lease_seconds)
                except StoreError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a plugin bug fails its request alone
                    self._failed(dest, batch, exc)

    def _split(
        self, dest: DestinationInstance, groups: Iterable[Sequence[tuple[Delivery, Item]]]
    ) -> list[list[tuple[Delivery, Item]]]:
        """The requests to send: each batch-key group as the adapter splits it.

        A group whose split raises, or breaks the contract (an item left out, in two requests or
        not of the group; an empty request; one over ``max_batch``), is a plugin bug: its items
        become dead letters naming the problem, and none of them is sent.
        """
        requests: list[list[tuple[Delivery, Item]]] = []
        for group in groups:
            try:
                requests += split_group(dest.adapter, group)
            except SplitError as exc:
                self._finish(dest, [d for d, _ in group], ItemResult(Outcome.PERMANENT, str(exc)))
        return requests

    def _failed(
        self, dest: DestinationInstance, batch: Sequence[tuple[Delivery, Item]], exc: Exception
    ) -> None:
        """A request broke off with an error no step expected (a plugin bug, most likely, such as
        a ``token_request`` that raises): what it still holds is retried, the attempt counted.

        Left leased, the items went again each time the lease ran out, for ever and with no
        attempt counted: sent again and again when the request had reached the platform, and
        never a dead letter. Counted, a bug that stays ends in dead letters naming it.
        """
        log.error(
            "delivery batch error",
            exc_info=exc,
            extra={"destination": dest.name, "error_type": type(exc).__name__},
        )
        error = f"{type(exc).__name__} in the delivery of a request"
        self._finish(dest, [d for d, _ in batch], ItemResult(Outcome.RETRYABLE, error))

    def _release(self, dest: DestinationInstance, batch: Sequence[tuple[Delivery, Item]]) -> None:
        released = self.store.release([d.id for d, _ in batch], self._holder())
        log.info(
            "delivery stopping; unsent deliveries released",
            extra={"destination": dest.name, "count": released},
        )

    def _pause(self, dest: DestinationInstance, batch: Sequence[tuple[Delivery, Item]]) -> None:
        """Give back what a batch has not sent when its destination pauses; what is past its
        max_age becomes a dead letter instead (no attempt counted), as it would on its next
        failed attempt, which a destination that stays down may not give it for long."""
        now = time.time()
        max_age = dest.delivery.max_age
        expired = [d.id for d, _ in batch if now - d.created_at >= max_age]
        if expired:
            error = "paused: the destination kept failing until max_age passed"
            self._dead(dest, expired, error, now, count_attempt=False)
        rest = [d.id for d, _ in batch if now - d.created_at < max_age]
        released = self.store.release(rest, self._holder()) if rest else 0
        log.info(
            "destination paused; unsent deliveries released",
            extra={"destination": dest.name, "count": released},
        )

    def _renew(
        self, dest: DestinationInstance, batch: Sequence[tuple[Delivery, Item]], seconds: float
    ) -> list[tuple[Delivery, Item]]:
        """The part of ``batch`` still leased to this batch, its lease renewed for ``seconds``."""
        holder = self._holder()
        held = {d.id for d, _ in batch}
        for _ in range(RENEW_TRIES):
            asked = time.time()
            held = set(self.store.renew(sorted(held), holder, seconds, asked))
            # Renewed from when it was asked for: a wait for the store's write lock longer than
            # the slack kept for it leaves the request too little of the lease; renewed again.
            if not held or time.time() - asked <= STORE_SLACK:
                break
        else:
            # Every write waits longer than the slack: no request could be sure of its lease.
            # The batch stops (its other requests would wait as long); the leases run out and
            # the items are leased again later (giving them back would be one more slow write).
            raise StoreTooSlow(
                "the store is too slow to renew a lease; the batch waits for its lease to end"
            )
        kept = [pair for pair in batch if pair[0].id in held]
        if len(kept) < len(batch):
            log.warning(
                "lease lost; another worker delivers these",
                extra={"destination": dest.name, "count": len(batch) - len(kept)},
            )
        return kept

    def _send(
        self,
        dest: DestinationInstance,
        batch: Sequence[tuple[Delivery, Item]],
        lease_seconds: float,
        hold_refusal: bool = False,
    ) -> ItemResult | None:
        """Send ``batch`` in one request and settle its items by their results.

        A request refused as a whole for an item the platform does not name (``whole_request``)
        is sent again in halves (:meth:`_isolate`); with ``hold_refusal`` such a refusal is
        returned instead, its items left unsettled, for the caller that is halving already.
        """
        adapter = dest.adapter
        deliveries = [d for d, _ in batch]
        items = [i for _, i in batch]
        uses_token = adapter.token_request() is not None
        response = self._attempt(dest, deliveries, items)
        if response is not None and response.status == 401 and uses_token:
            # Expired or revoked: fetch a fresh token and try once more, still holding the lease.
            self._forget_token(dest.name)
            if self._stop.is_set():
                self._release(dest, batch)
                return None
            batch = self._renew(dest, batch, lease_seconds)
            if not batch:
                return None
            deliveries = [d for d, _ in batch]
            items = [i for _, i in batch]
            response = self._attempt(dest, deliveries, items)
        if response is None:
            return None
        if response.status == 413:
            # Read here, never by the adapter: a refusal of the request's size, not of its items.
            wait = retry_after_seconds(response.headers)
            if wait is None and len(batch) > 1:
                self._halve(dest, batch, lease_seconds)
                return None
            reason = f"HTTP 413: {response.excerpt(200)}".strip()
            # With Retry-After the refusal is temporary (RFC 9110 §15.5.14); without, an item
            # alone too large for the receiver stays so.
            outcome = Outcome.PERMANENT if wait is None else Outcome.RETRYABLE
            results = [ItemResult(outcome, reason, wait)] * len(items)
        else:
            results = self._read(adapter, response, items)
        # Refused credentials fail every request alike until an operator acts: counted as
        # failures, they pause the destination, instead of sending (and logging at ERROR)
        # every batch of a backlog about once a minute.
        ok = any(r.outcome not in _FAILED for r in results)
        self.breaker(dest.name).record(ok, time.monotonic())
        if all(r.whole_request and r.outcome is Outcome.PERMANENT for r in results):
            if hold_refusal:
                return results[0]
            if len(batch) > 1:
                log.warning(
                    "request refused as a whole; sending it in halves to find the refused items",
                    extra={"destination": dest.name, "count": len(batch)},
                )
                self._isolate(dest, batch, lease_seconds)
                return None
        by_result: dict[ItemResult, list[Delivery]] = defaultdict(list)
        for delivery, result in zip(deliveries, results, strict=True):
            by_result[result].append(delivery)
        for result, group in by_result.items():
            self._finish(dest, group, result, response)
        return None

    def _halve(
        self,
        dest: DestinationInstance,
        batch: Sequence[tuple[Delivery, Item]],
        lease_seconds: float,
    ) -> None:
        """A 413 for a request of several items: the request was too large, not its items. Each
        half goes in a request of its own (halved again on another 413), one after the other,
        the lease renewed before each; an item that alone gets a 413 is permanent. A receiver
        that refuses everything so gets up to 2n - 1 requests for n items.

        A receiver's body limit is often unknown (a proxy in front of it): without this, every
        item of the batch became a dead letter, and a replay made the same batch again.
        """
        log.warning(
            "request too large for the destination; sending it in two halves",
            extra={"destination": dest.name, "count": len(batch)},
        )
        half = (len(batch) + 1) // 2
        for part in (batch[:half], batch[half:]):
            if self._stop.is_set():  # shutting down: what is not sent yet goes back now
                self._release(dest, part)
                continue
            if renewed := self._renew(dest, part, lease_seconds):
                self._send(dest, renewed, lease_seconds)

    def _isolate(
        self,
        dest: DestinationInstance,
        batch: Sequence[tuple[Delivery, Item]],
        lease_seconds: float,
    ) -> None:
        """Find the items that made the platform refuse ``batch`` as a whole (Meta and TikTok
        refuse a request for one bad event, without naming it), so that only they become dead
        letters and the others are delivered.

        Each half is sent on its own. When one half is refused, the other was not refused for
        its items, and the refused half is halved again: one bad item among n costs about
        2 log2(n) requests. When both halves are refused, the refusal is taken for every
        item's (a setting the platform refuses, several bad items), and both become dead
        letters, so that a refusal of everything costs three requests, not 2n - 1.
        """
        half = (len(batch) + 1) // 2
        refused: list[tuple[list[tuple[Delivery, Item]], ItemResult]] = []
        for part in (batch[:half], batch[half:]):
            if self._stop.is_set():  # shutting down: what is not sent yet goes back now
                self._release(dest, part)
                continue
            renewed = self._renew(dest, part, lease_seconds)
            if renewed and (refusal := self._send(dest, renewed, lease_seconds, True)):
                refused.append((renewed, refusal))
        if len(refused) == 1 and len(refused[0][0]) > 1:
            part, _ = refused[0]
            if self._stop.is_set():
                # Not a verdict on its items yet (the other half was not refused): it goes
                # back, to be sent and halved again, rather than all of it a dead letter.
                self._release(dest, part)
            elif renewed := self._renew(dest, part, lease_seconds):
                self._isolate(dest, renewed, lease_seconds)
            return
        for part, refusal in refused:
            self._finish(dest, [d for d, _ in part], refusal)

    def _attempt(
        self,
        dest: DestinationInstance,
        deliveries: Sequence[Delivery],
        items: Sequence[Item],
    ) -> HttpResponse | None:
        """Build and send one request; None when it failed and the batch was already settled."""
        adapter = dest.adapter
        try:
            token = self._token(dest)
            # The request's own time: a batch sends its requests one after another, and a
            # signature's timestamp (the webhook's), an event's age checked against a platform's
            # limit, are those of the request, not of the lease (a receiver with a replay window
            # refused the later requests of a backlog).
            ctx = SendContext(datetime.now(UTC), token)
            request = adapter.build_request(items, ctx)
        except _TokenBusy:
            # Nothing was attempted: the items go back, due at once, no attempt counted.
            released = self.store.release([d.id for d in deliveries], self._holder())
            log.warning(
                "another request's token fetch took too long; deliveries released",
                extra={"destination": dest.name, "count": released},
            )
            return None
        except TransportError as exc:
            self.breaker(dest.name).record(False, time.monotonic())
            self._finish(dest, deliveries, ItemResult(Outcome.RETRYABLE, f"token request: {exc}"))
            return None
        except TokenFailure as exc:
            if exc.outcome in _FAILED:
                self.breaker(dest.name).record(False, time.monotonic())
            self._finish(dest, deliveries, ItemResult(exc.outcome, f"token request: {exc}"))
            return None
        except Exception as exc:  # noqa: BLE001 - a plugin bug is a permanent failure of the batch
            message = _redact(
                adapter,
                f"build_request failed: {type(exc).__name__}: {exc}",
                self._tokens.get(dest.name),
            )
            self._finish(dest, deliveries, ItemResult(Outcome.PERMANENT, message))
            return None
        started = time.monotonic()
        try:
            response = self.transport.send(request, dest.delivery.timeout)
        except TransportError as exc:
            metrics.observe(metrics.REQUEST_SECONDS, (dest.name,), time.monotonic() - started)
            self.breaker(dest.name).record(False, time.monotonic())
            self._finish(dest, deliveries, ItemResult(Outcome.RETRYABLE, str(exc)))
            return None
        metrics.observe(metrics.REQUEST_SECONDS, (dest.name,), time.monotonic() - started)
        return response

    @staticmethod
    def _read(
        adapter: Destination, response: HttpResponse, items: Sequence[Item]
    ) -> list[ItemResult]:
        try:
            results = list(adapter.read_response(response, items))
        except Exception as exc:  # noqa: BLE001 - a plugin that cannot read an answer: retry
            return [
                ItemResult(Outcome.RETRYABLE, f"read_response failed: {type(exc).__name__}")
            ] * len(items)
        if len(results) != len(items):
            return [
                ItemResult(Outcome.RETRYABLE, "adapter returned the wrong number of results")
            ] * len(items)
        if not all(map(_valid_result, results)):
            return [
                ItemResult(Outcome.RETRYABLE, "adapter returned a result that is no ItemResult")
            ] * len(items)
        return results

    def _finish(
        self,
        dest: DestinationInstance,
        deliveries: Sequence[Delivery],
        result: ItemResult,
        response: HttpResponse | None = None,
    ) -> None:
        now = time.time()
        ids = [d.id for d in deliveries]
        # Metrics count what the store applied: a row whose lease another worker took over
        # mid-request keeps, and counts, that worker's outcome.
        if result.outcome is Outcome.DELIVERED:
            applied = self.store.mark_delivered(ids, self._holder(), now)
            self._settled(dest, len(ids), applied)
            metrics.inc(metrics.DELIVERIES, (dest.name, "delivered"), applied)
            for d in deliveries if applied == len(ids) else ():
                metrics.observe(metrics.LATENCY_SECONDS, (dest.name,), max(0.0, now - d.created_at))
            if result.error:
                # The platform had the item already (a retry after a lost answer, a replay) or
                # took it with a warning. Its words may quote the item: the log has only this.
                log.info(
                    "delivered: the platform had it already or took it with a warning",
                    extra={"destination": dest.name, "count": len(ids)},
                )
            else:
                log.debug("delivered", extra={"destination": dest.name, "count": len(ids)})
            return
        reason = _redact(dest.adapter, result.error or "failed", self._tokens.get(dest.name))
        error = f"{result.outcome.value}: {reason}"
        opts = dest.delivery
        if result.outcome is Outcome.PERMANENT:
            self._dead(dest, ids, error, now, answered=ids)
            return
        retry: list[int] = []
        dead: list[int] = []
        late: list[int] = []  # the platform asks to wait past their max_age
        wait = result.retry_after
        limit = opts.max_attempts
        for d in deliveries:
            attempt = d.attempts + 1
            if (limit is not None and attempt >= limit) or now - d.created_at >= opts.max_age:
                dead.append(d.id)
            elif wait is not None and now + wait > d.created_at + opts.max_age:
                late.append(d.id)
            else:
                retry.append(d.id)
        if dead:
            self._dead(dest, dead, given_up(error, GAVE_UP_AFTER_RETRIES), now, answered=ids)
        if late and wait is not None:  # (late holds something only with a wait)
            # Scheduled that late they stayed pending, unlisted and past retention, for as long
            # as the header said (years, from a broken proxy), and were never given up.
            self._dead(dest, late, given_up(error, past_max_age(wait)), now, answered=ids)
        if retry:
            attempts = max(d.attempts + 1 for d in deliveries)
            floor = AUTH_RETRY_FLOOR if result.outcome is Outcome.AUTH else 0.0
            delay = self.backoff.delay(attempts, result.retry_after, floor)
            # Cut as a dead letter's is: a plugin's error text can be any length.
            applied = self.store.mark_retry(
                retry, self._holder(), now + delay, error[:MAX_ERROR], answered=ids
            )
            self._settled(dest, len(retry), applied)
            metrics.inc(metrics.DELIVERIES, (dest.name, "retried"), applied)
            level = logging.ERROR if result.outcome is Outcome.AUTH else logging.WARNING
            log.log(
                level,
                "delivery will be retried",
                extra={
                    "destination": dest.name,
                    "count": len(retry),
                    "delay": round(delay, 2),
                    "outcome": result.outcome.value,
                    "status": response.status if response is not None else None,
                },
            )

    def _settled(self, dest: DestinationInstance, count: int, applied: int) -> None:
        if applied < count:  # the lease ran out mid-request, or `forget` erased the delivery
            log.warning(
                "lease lost before the answer (another worker took the delivery over, or it "
                "was erased); its outcome was not recorded",
                extra={"destination": dest.name, "count": count - applied},
            )

    def _dead(
        self,
        dest: DestinationInstance,
        ids: list[int],
        error: str,
        now: float,
        count_attempt: bool = True,
        answered: Sequence[int] = (),
    ) -> None:
        # ``answered``: the request's deliveries the error answered; if one was erased
        # meanwhile, the store keeps the error without its text (it may quote that event).
        marked = self.store.mark_dead(
            ids, self._holder(), error[:MAX_ERROR], now, count_attempt, answered
        )
        self._settled(dest, len(ids), marked)
        metrics.inc(metrics.DELIVERIES, (dest.name, "dead_lettered"), marked)
        # The error itself stays in the store (`tagrelay deadletters show`): a platform's answer
        # can echo payload fields, such as an IP, that must not reach a log.
        log.error(
            "deliveries dead-lettered",
            extra={"destination": dest.name, "count": marked, "kind": error.split(":", 1)[0]},
        )

    # -- OAuth tokens ---------------------------------------------------------------------------

    def _lease_seconds(self, timeout: float) -> float:
        """How long a lease lasts: longer than the longest a request can hold it.

        The transport ends each exchange within its connect timeout plus ``timeout``. A request
        can take three: waiting while another thread fetches the destination's token, fetching
        one itself when that failed, then sending; plus :data:`STORE_SLACK` for the store and
        the scheduler. Shorter, and another worker could take over a request still in flight
        and send its events again. (A lease whose worker died is taken over only when it runs
        out.) A lease runs from when it was asked for, so one that more than the slack has
        passed since (a wait for the store's write lock, items settled before the first request)
        is renewed before the request.
        """
        return 3 * self._exchange_seconds(timeout) + STORE_SLACK

    def _exchange_seconds(self, timeout: float) -> float:
        """The longest one exchange with a destination takes: connecting, sending, the answer."""
        return min(self.transport.connect_timeout, timeout) + timeout

    def _token(self, dest: DestinationInstance) -> str | None:
        request = dest.adapter.token_request()
        if request is None:
            return None
        exchange = _exchange_digest(request)
        cached = self._tokens.get(dest.name)
        if cached and cached.usable(exchange, dest.adapter):
            return cached.value
        with self._token_lock:  # one lock per destination: a slow token endpoint stalls no other
            lock = self._token_locks.setdefault(dest.name, threading.Lock())
        # Waiting at most one exchange keeps a request within its lease (see _lease_seconds):
        # behind a token endpoint that hangs, several batches queue here, and each fetches in
        # turn; the last ones would send after their leases ran out, and another worker that
        # had taken their items over meanwhile sent them too.
        if not lock.acquire(timeout=self._exchange_seconds(dest.delivery.timeout)):
            raise _TokenBusy
        try:
            cached = self._tokens.get(dest.name)
            if cached and cached.usable(exchange, dest.adapter):
                return cached.value  # another thread refreshed it meanwhile
            response = self.transport.send(request, dest.delivery.timeout)
            try:
                token = dest.adapter.read_token(response)
                # Refresh a minute before expiry, so a token never expires mid-request. A
                # lifetime the plugin passed on as text ("3600", as some servers send it) is
                # read as a number; one that is no number fails like an unreadable answer.
                expires_at = time.time() + max(0.0, float(token.expires_in) - 60)
                if not isinstance(token.value, str) or not math.isfinite(expires_at):
                    raise TypeError("read_token must give a Token of text and seconds")
            except Exception as exc:
                raise TokenFailure(
                    f"HTTP {response.status} ({type(exc).__name__})", _token_outcome(exc, response)
                ) from exc
            self._tokens[dest.name] = _TokenCache(
                token.value, expires_at, exchange, _owner(dest.adapter)
            )
            return token.value
        finally:
            lock.release()

    def _forget_token(self, name: str) -> None:
        with self._token_lock:
            self._tokens.pop(name, None)


MAX_ERROR = 1000
"""The characters of an error kept with a delivery (retried or dead)."""


def _token_outcome(exc: Exception, response: HttpResponse) -> Outcome:
    """How a failed token exchange should be retried: the adapter's word, else the status."""
    outcome = getattr(exc, "outcome", None)
    if isinstance(outcome, Outcome):
        return outcome
    if response.status in (408, 425, 429) or response.status >= 500:
        return Outcome.RETRYABLE
    return Outcome.AUTH


def _sends_alone(adapter: Destination) -> bool:
    try:
        return adapter.sends_alone() is True
    except Exception as exc:  # noqa: BLE001 - a plugin bug: batched as without the hook
        log.error(
            "the adapter's sends_alone failed; its destination is batched",
            extra={"adapter": type(adapter).__name__, "error_type": type(exc).__name__},
        )
        return False


# Each adapter instance's answer to sends_alone (an instance lives as long as its rules).
_ALONE: weakref.WeakKeyDictionary[Destination, bool] = weakref.WeakKeyDictionary()


def _lease_size(adapter: Destination, due: int, concurrency: int) -> tuple[int, int]:
    """How many items each batch of a destination leases, ``due`` being due, and how many
    batches a pass may start (as the free slots allow).

    ``max_batch``, the most one request carries, for a destination that batches, and only
    full batches past the first: the rest of a backlog waits for the next pass, where it
    goes once its oldest item has waited ``batch_wait`` (started at once, it went in a small
    request of what had just arrived). One whose requests carry an item each
    (:meth:`~destinations.base.Destination.sends_alone`) sends a batch request after
    request: the due items are shared among its ``concurrency`` slots, or one batch took a
    backlog of hundreds and sent it alone while the others found nothing.
    """
    try:
        alone = _ALONE.get(adapter)
    except TypeError:  # a plugin object with no weak reference or hash: asked every pass
        alone = _sends_alone(adapter)
    if alone is None:  # asked once per adapter: its settings do not change
        alone = _ALONE[adapter] = _sends_alone(adapter)
    if not alone:
        return adapter.max_batch, max(1, due // adapter.max_batch)
    size = max(1, min(adapter.max_batch, -(-due // max(concurrency, 1))))
    return size, -(-due // size)


class _Queued:
    """A batch handed to the pool: run, or given up by ``tick`` when the hand-over failed,
    whichever comes first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "queued"

    def start(self) -> bool:
        """Whether the batch may run (it was not given up)."""
        with self._lock:
            if self._state == "cancelled":
                return False
            self._state = "running"
            return True

    def cancel(self) -> bool:
        """Give the batch up unless it already runs; whether it was given up."""
        with self._lock:
            if self._state == "running":
                return False
            self._state = "cancelled"
            return True


class _TokenBusy(Exception):
    """Another thread's token fetch for the destination outlasted one exchange."""


class TokenFailure(Exception):
    """An OAuth token could not be obtained; ``outcome`` says whether retrying can help."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


def _valid_result(result: object) -> bool:
    """Whether ``result`` is an ItemResult the engine can act on (a Retry-After in seconds)."""
    if not isinstance(result, ItemResult) or not isinstance(result.outcome, Outcome):
        return False
    if result.error is not None and not isinstance(result.error, str):
        return False
    delay = result.retry_after
    return delay is None or (isinstance(delay, int | float) and not isinstance(delay, bool))


def _redact(adapter: Destination, text: str, token: _TokenCache | None = None) -> str:
    # Every encoded form too: a platform's error can echo the request's URL or form body.
    try:
        text = adapter.redact_text(text)
    except Exception as exc:  # noqa: BLE001 - a plugin's secrets() bug must not stall delivery
        # Nothing of the text can be shown safely without the adapter's secrets.
        return f"(error withheld: {type(exc).__name__} in the adapter's redaction)"
    # The OAuth token is no setting, so the adapter's secrets lack it; an answer can echo it
    # (a platform that takes it in the query string quotes the URL).
    return redact_values(text, [token.value]) if token and token.value else text


def _join(
    thread: threading.Thread, heartbeat: Callable[[], object] | None, timeout: float | None = None
) -> None:
    """Wait for ``thread`` (at most ``timeout`` seconds), calling ``heartbeat`` every second."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while thread.is_alive():
        left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if left <= 0:
            return
        if heartbeat is not None:
            heartbeat()
        thread.join(left)
