"""Cutting a batch into requests: an adapter's ``split``, checked against its contract (used by
:mod:`engine.delivery`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from destinations.base import Destination, Item
from engine.store.base import Delivery


class SplitError(Exception):
    """An adapter's :meth:`~destinations.base.Destination.split` raised or broke its contract."""


def split_group(
    adapter: Destination, group: Sequence[tuple[Delivery, Item]]
) -> list[list[tuple[Delivery, Item]]]:
    """``group`` cut into requests by ``adapter.split``, as the engine's own pairs.

    Raises:
        SplitError: the split raised, or its answer is not the group's items each in exactly
            one request of 1 to ``max_batch`` items; the message names the problem.
    """
    items = [item for _, item in group]
    try:
        requests = [list(request) for request in adapter.split(items)]
    except Exception as exc:  # a plugin bug: its group fails alone
        raise SplitError(f"{type(exc).__name__} in the adapter's split of a batch") from exc
    if problem := split_problem(requests, items, adapter.max_batch):
        raise SplitError(f"the adapter's split of a batch is invalid: {problem}")
    # By identity: Item holds a dict, so it cannot be hashed, and a copy is not the item.
    pair_of = {id(item): pair for pair, item in zip(group, items, strict=True)}
    return [[pair_of[id(item)] for item in request] for request in requests]


def split_problem(requests: list[list[Any]], items: Sequence[Item], limit: int) -> str | None:
    """What makes ``requests`` no split of ``items`` into requests of 1 to ``limit``, or None."""
    if any(not request for request in requests):
        return "an empty request"
    if any(len(request) > limit for request in requests):
        return f"a request of more than max_batch ({limit}) items"
    given = {id(item) for item in items}
    returned = Counter(id(item) for request in requests for item in request)
    if any(count > 1 for count in returned.values()):
        return "an item more than once"
    if set(returned) - given:
        return "an item that is not in the batch"
    if missing := len(given - set(returned)):
        return f"{missing} item(s) left out"
    return None
