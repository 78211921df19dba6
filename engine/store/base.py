"""The storage interface: accepted events, dedup keys and the delivery outbox.

One interface, designed for more than one backend. Today there is one: SQLite
(:mod:`engine.store.sqlite`, the embedded default), shared by any number of processes (gunicorn
workers, ``tagrelay worker`` processes) on one host. A Redis backend, for several hosts, is
planned: nothing here assumes a file or a host, and the pipeline and the delivery workers only
ever talk to :class:`Store`.

Guarantees every backend gives:

- :meth:`Store.accept` is atomic: the event, its dedup keys and its deliveries are committed
  together or not at all, and it returns only after the commit.
- A dedup key (an event ID, or a tag's dedup key) is claimed by exactly one event within its
  window, across processes and restarts.
- A leased delivery is invisible to other workers until its lease expires; an expired lease is
  taken over, so a killed worker loses nothing.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.identity import Identity, IdentityUpdate


class Status(enum.Enum):
    """Where a delivery is in its life."""

    PENDING = "pending"  # waiting for its next attempt
    LEASED = "leased"  # a worker is sending it
    DELIVERED = "delivered"
    DEAD = "dead"  # a dead letter: out of attempts or age, or rejected for good


@dataclass(slots=True)
class Decision:
    """What one tag decided for an accepted event (the record kept with the event).

    Read-only by contract (:meth:`blocked` makes a new one). Not a frozen dataclass only because
    every tag of every event makes one, and a frozen dataclass's constructor costs five times
    as much.
    """

    tag: str
    destination: str
    fired: bool
    reason: str
    consent: str | None = None
    anonymous: bool = False
    payload: Mapping[str, Any] | None = None
    dedup_key: str | None = None

    def blocked(self, reason: str) -> Decision:
        """The same decision, not fired, for ``reason``."""
        return Decision(self.tag, self.destination, False, reason, self.consent, self.anonymous)

    def summary(self) -> dict[str, Any]:
        """The decision without its payload, as stored and returned to clients."""
        out: dict[str, Any] = {
            "tag": self.tag,
            "destination": self.destination,
            "fired": self.fired,
            "reason": self.reason,
        }
        if self.consent:
            out["consent"] = self.consent
        if self.anonymous:
            out["anonymous"] = True
        return out


# Event IDs are deduplicated per source (the event's ``source``, set at intake): any page may
# send any ID to /v1/collect, so a page's IDs are kept apart from the server endpoints', and a
# page that sends a backend's event ID (an order ID) first neither makes the backend's event a
# duplicate nor, sending it after, learns that it exists. The server's keep the prefix they
# had before sources existed.
_ID_PREFIXES = {"server": "event", "browser": "browser"}


def event_id_key(event_id: str, source: str = "server") -> str:
    """The dedup key of an event ID among the events of its source (``server``, ``browser``)."""
    return f"{_ID_PREFIXES.get(source, 'event')}:{event_id}"


def event_id_keys(event_id: str) -> list[str]:
    """The dedup keys an event ID may have: the server's first, then a page's."""
    return [f"{prefix}:{event_id}" for prefix in _ID_PREFIXES.values()]


def given_up(answer: str, why: str) -> str:
    """A dead letter's error when the worker gives up on a delivery: the request's answer, then
    why (``gave up after retries``). :func:`answer_of` reads the answer back."""
    return f"{answer} ({why})"


GAVE_UP_AFTER_RETRIES = "gave up after retries"
_PAST_MAX_AGE = "Retry-After {} s reaches past max_age"
_GIVEN_UP = re.compile(
    r" \((?:{}|{})\)$".format(
        re.escape(GAVE_UP_AFTER_RETRIES), re.escape(_PAST_MAX_AGE).replace(r"\{\}", r"\S+")
    )
)


def answer_of(error: str) -> str:
    """The request's answer in a delivery's error, without why the worker gave up on it (see
    :func:`given_up`): the deliveries of one request keep the same answer, those given up on
    with why appended."""
    return _GIVEN_UP.sub("", error)


def past_max_age(wait: float) -> str:
    """Why a delivery is given up on whose Retry-After reaches past its ``max_age``."""
    return _PAST_MAX_AGE.format(f"{wait:g}")


@dataclass(slots=True)
class Acceptance:
    """An event to accept, with what the rules decided for it.

    Read-only by contract; not frozen because one is made for every event (see Decision).
    """

    event: Mapping[str, Any]
    decisions: Sequence[Decision]
    window: float  # dedup window in seconds
    received_at: float  # Unix seconds
    identity: IdentityUpdate | None = None  # what to remember about the visitor


@dataclass(frozen=True)
class Accepted:
    """The stored outcome of an accept: the original's, when it was a duplicate."""

    event_id: str
    duplicate: bool
    decisions: Sequence[Mapping[str, Any]] = field(default_factory=list)

    @property
    def fired(self) -> list[str]:
        """Names of the tags that queued a delivery."""
        return [d["tag"] for d in self.decisions if d.get("fired")]


@dataclass(frozen=True)
class Delivery:
    """One delivery of one event to one destination by one tag (an outbox row)."""

    id: int
    event_id: str
    tag: str
    destination: str
    payload: Mapping[str, Any]
    status: Status
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    """An accepted event as stored, with its decisions."""

    seq: int
    event_id: str
    event: Mapping[str, Any]
    received_at: float
    decisions: Sequence[Mapping[str, Any]]


class Store(abc.ABC):
    """What every storage backend implements."""

    # -- intake ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def accept_many(self, acceptances: Sequence[Acceptance]) -> list[Accepted]:
        """Accept events atomically, in order; returns one outcome per event.

        For each event: if its event ID was accepted within the window (among the events of
        its ``source``: see :func:`event_id_key`), nothing is written and the original outcome
        comes back with ``duplicate=True``. Otherwise the event is stored, every fired decision
        whose dedup key is already claimed is turned into a "not fired" decision naming the
        original event, and a pending delivery is queued for every decision still fired.
        Returns only after the commit.

        Raises:
            StoreError: nothing was committed; a retry is safe.
        """

    def accept(self, acceptance: Acceptance) -> Accepted:
        """Accept one event (see :meth:`accept_many`)."""
        return self.accept_many([acceptance])[0]

    @abc.abstractmethod
    def get_event(self, event_id: str) -> StoredEvent | None:
        """The most recent accepted event with this ID (of the server's, else a page's)."""

    # -- outbox ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def lease(
        self, destination: str, limit: int, lease_seconds: float, owner: str, now: float
    ) -> list[Delivery]:
        """Take up to ``limit`` due deliveries of a destination (pending and due, or leased
        with an expired lease), oldest first, and lease them to ``owner``."""

    # A worker settles only what it still holds: once its lease has expired, another worker may
    # have taken the delivery over (and sent it), and a late answer must not overwrite that.

    @abc.abstractmethod
    def renew(self, ids: Sequence[int], owner: str, lease_seconds: float, now: float) -> list[int]:
        """Extend ``owner``'s lease on ``ids`` to ``now + lease_seconds``; the IDs it still holds.

        A delivery taken over by another worker, or already settled, is not held any more.
        """

    @abc.abstractmethod
    def mark_delivered(self, ids: Sequence[int], owner: str, now: float) -> int:
        """Deliveries that reached the platform; how many were still leased to ``owner``."""

    @abc.abstractmethod
    def mark_retry(
        self,
        ids: Sequence[int],
        owner: str,
        next_attempt_at: float,
        error: str,
        count_attempt: bool = True,
        answered: Sequence[int] = (),
    ) -> int:
        """Deliveries to try again at ``next_attempt_at``, counting one attempt unless
        ``count_attempt`` is false; how many were still leased to ``owner``.

        ``answered``: the deliveries of the request that ``error`` answered (``ids`` among
        them). When one of them was erased meanwhile (forget), the error is kept without its
        text, which may quote that delivery's event.
        """

    @abc.abstractmethod
    def mark_dead(
        self,
        ids: Sequence[int],
        owner: str,
        error: str,
        now: float,
        count_attempt: bool = True,
        answered: Sequence[int] = (),
    ) -> int:
        """Deliveries that will not be retried (dead letters), counting one attempt unless
        ``count_attempt`` is false; how many were still leased to ``owner``. ``answered`` as
        for :meth:`mark_retry`."""

    @abc.abstractmethod
    def release(self, ids: Sequence[int], owner: str) -> int:
        """Give leased deliveries back untouched (shutdown), no attempt counted; how many were
        still leased to ``owner``."""

    @abc.abstractmethod
    def destinations_due(self, now: float) -> dict[str, tuple[int, float]]:
        """Destinations with deliveries due now: how many, and since when the oldest is due."""

    @abc.abstractmethod
    def depth(self) -> dict[str, int]:
        """Undelivered (pending or leased) deliveries per destination."""

    @abc.abstractmethod
    def dead_letters(self, destination: str | None = None, limit: int = 100) -> list[Delivery]:
        """Dead letters, newest first."""

    @abc.abstractmethod
    def get_delivery(self, delivery_id: int) -> Delivery | None:
        """One delivery by ID."""

    @abc.abstractmethod
    def event_for_delivery(self, delivery_id: int) -> StoredEvent | None:
        """The event a delivery belongs to."""

    @abc.abstractmethod
    def events_since(self, since: float, destination: str | None = None) -> Iterator[StoredEvent]:
        """Accepted events received at or after ``since`` (for replay), oldest first.

        Read as they are iterated, a page at a time (memory stays bounded however many), and
        only those accepted before the call: events accepted while a replay runs have their own
        deliveries, and replaying them too would send them twice. With ``destination``, only
        events that had a decision for it."""

    @abc.abstractmethod
    def requeue(
        self,
        event: StoredEvent,
        decisions: Sequence[Decision],
        window: float,
        now: float,
        supersedes: Sequence[int] = (),
        replace_waiting: bool = False,
    ) -> list[Decision]:
        """Queue new deliveries for an already accepted event (replay), atomically.

        Fired decisions whose dedup key is held by *another* event are turned into "not fired";
        ``supersedes`` (the dead letters being replayed) are removed in the same transaction
        if anything was queued in their place. With ``replace_waiting``, so are the event's
        deliveries by the same tag to the same destination that still wait (pending, not
        leased): sent as well, the event went twice, the second time as the old rules made it;
        and its dead letters by that tag, which a later dead-letter replay sent again.
        Nothing is queued if the event is no longer stored, or if one of ``supersedes`` is no
        longer a dead letter (replayed meanwhile). Returns the decisions as applied.
        """

    # -- identity and privacy -------------------------------------------------------------------

    @abc.abstractmethod
    def recall(
        self,
        visitor_id: str | None,
        user_id: str | None,
        now: float,
        windows: Mapping[str, float],
        default_window: float,
    ) -> Identity | None:
        """What is remembered about a visitor (or the latest visitor linked to ``user_id`` that
        no other user has signed in on since).

        As of ``now``: click IDs and cookies first seen after it, or longer before it than
        their window, are left out, and so are the user agent and IP when last seen longer
        before it than ``default_window`` (or at a time not known).
        """

    @abc.abstractmethod
    def forget(
        self, user_id: str | None = None, visitor_id: str | None = None, email: str | None = None
    ) -> dict[str, int]:
        """Erase what is or may be a person's, never what is provably another user's.

        The person's user IDs are ``user_id`` and, with ``email``, those the client sent on
        the events with that address; their visitors are ``visitor_id``, those the client sent
        on such events, and every visitor linked to one of their user IDs (one step, no
        further). Erased: events with one of their user IDs; events on one of their visitors
        with no user ID, or with one the pipeline only copied from the visitor's identity
        (listed under ``enriched``); events with ``email`` as ``user_data.email``, plain or
        SHA-256, normalized as the adapters do before hashing. Events the client sent with
        another user's ID stay. The deliveries of erased events go with them (pending ones
        too), and so do the person's visitor rows and every link of their visitors and user
        IDs; other events' deliveries keep no error that quotes the erased events (``errors``:
        withheld). Returns how many of each kind were removed.
        """

    @abc.abstractmethod
    def purge(self, before: float, now: float | None = None) -> dict[str, int]:
        """Erase events received, and identities last seen, before ``before`` (retention).

        Of the identities still seen, the values remembered from before ``before`` go: click
        IDs and cookies first seen, the user agent and IP last seen (or at a time not known),
        before it (``visitor_values`` in the result), and so do their links to user IDs last
        made before it, with the user ID the visitor row holds from such a link (``links``).

        Deliveries still to send, and their events, are kept; so are events whose ID is still
        deduplicated at ``now`` (default: the current time), until their window ends. Backends
        should work in bounded steps (it runs hourly, beside intake) and must tolerate running
        in several processes.
        """

    @abc.abstractmethod
    def rate_hit(self, key: str, window_start: float, count: int = 1) -> int:
        """Add ``count`` requests for ``key`` in the window; returns the total so far."""

    @abc.abstractmethod
    def purge_rate_counters(self, before: float) -> int:
        """Drop the rate counters of windows that started before ``before``; returns how many.

        Runs hourly whatever the retention setting (counters are only of use for a minute).
        """

    @abc.abstractmethod
    def secret(self, name: str) -> bytes:
        """The random secret named ``name`` (32 bytes), made on first use and kept in the store.

        Every process using the store (and, with a backend several hosts share, every host)
        gets the same one, so that what they make with it (say, the names rate counters are
        shared under) agrees; it never leaves the store otherwise.

        Raises:
            StoreError: the store could not be read or written.
        """

    # -- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers (readiness)."""

    @abc.abstractmethod
    def purge_expired(self, now: float) -> int:
        """Drop dedup keys past their window, in bounded steps; returns how many."""

    def free_bytes(self) -> int | None:
        """Bytes free to the store where it writes (its file system), or None when it cannot
        tell; intake stops below a reserve (``TAGRELAY_MIN_FREE_MB``)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release connections."""
