"""Storage: the interface and its backends."""

from engine.store.base import Acceptance, Accepted, Decision, Delivery, Status, Store, StoredEvent

__all__ = ["Acceptance", "Accepted", "Decision", "Delivery", "Status", "Store", "StoredEvent"]
