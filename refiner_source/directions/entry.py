"""The row type of the store: one accepted event, as either direction hands it over to be kept.

Here rather than in the store package, and importing nothing heavy, because a backfill's mapping
processes build entries and must not load the database (importing any module of the store package
loads it all). The store re-exports it: `from refiner_source.store import Entry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """One accepted event to store: its receipt, what replay selects it by, and the event itself."""

    receipt_key: str
    source_id: str  # the id its source gave it: a Refiner response's uuid, a Segment messageId
    triggered_event: str
    event: str  # the normalised event as JSON
    message_count: int = 0  # what the webhook answers; the messages are made at delivery
    form_uuid: str | None = None
    occurred_at: float | None = None
    destination: str = field(kw_only=True)  # always said: no direction is the default
    contact: str | None = None  # whose event, where the destination keeps one contact's order (Refiner)
    # Whom it concerns: (kind, normalised identifier) pairs (refiner_source.privacy), checked against
    # the suppression list before it is stored; not stored as such.
    people: frozenset[tuple[str, str]] = frozenset()
