"""The store: the only SQL in the project, one module per concern, and `Store`, the one object callers hold.

One row per accepted event of either direction (its receipt, its destination, its state), written
before the webhook is answered; what the event becomes is decided when it is sent.
"""

from __future__ import annotations

from refiner_source.directions import REFINER, SEGMENT
from refiner_source.directions.entry import Entry
from refiner_source.store.alert_state import AlertState
from refiner_source.store.claims import Claimed, Claims, DeadLetter
from refiner_source.store.contents import Contents
from refiner_source.store.counts import Counts
from refiner_source.store.cursors import BackfillState
from refiner_source.store.errors import StoreMisconfigured, StoreUnavailable
from refiner_source.store.operations import Operations, Stats
from refiner_source.store.receipts import Receipts
from refiner_source.store.schema import Schema, head_revision
from refiner_source.store.suppression import Erased, Suppression
from refiner_source.store.tables import (
    DEAD,
    PENDING,
    PURGED,
    alerts,
    dead_letters,
    events,
    last_errors,
    metadata,
    suppressed,
)

__all__ = [
    "DEAD",
    "PENDING",
    "PURGED",
    "REFINER",
    "SEGMENT",
    "BackfillState",
    "Claimed",
    "DeadLetter",
    "Erased",
    "Entry",
    "Stats",
    "Store",
    "StoreMisconfigured",
    "StoreUnavailable",
    "alerts",
    "dead_letters",
    "events",
    "head_revision",
    "last_errors",
    "metadata",
    "suppressed",
]


class Store(Receipts, Claims, Operations, Contents, Counts, AlertState, Suppression, Schema):
    """The durable store of accepted events. Every method is one short transaction.

    Composed of one class per concern, each built on Database (engine, write lock, error
    translation), so that each concern's SQL reads on its own while callers hold a single object.
    """
