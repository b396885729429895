"""What the webhook does with a validated Segment event: make the entry the store keeps (its
receipt, its contact, the event as stored). Pure: no database, no web framework."""

from __future__ import annotations

import json
from typing import Any

from refiner_source.directions import REFINER
from refiner_source.directions.entry import Entry
from refiner_source.to_refiner.events import normalise
from refiner_source.to_refiner.mapping import CALLS_PER_EVENT, contact_key
from refiner_source.to_refiner.people import people_of, storable_contact


def prepare(event: dict[str, Any]) -> Entry:
    """The entry of a validated, forwarded event (ignored_reason is None): its messageId is the
    receipt (a resend is a duplicate), its contact keeps its place in line. Its call is made at
    delivery: the mapping does not run here."""
    stored = normalise(event)
    return Entry(
        receipt_key=event["messageId"],
        source_id=event["messageId"],
        triggered_event=event["type"] if event["type"] != "track" else f"track {event['event']}"[:255],
        # ASCII escapes: a lone surrogate in a trait (valid JSON: "\\ud800") is stored, not refused by the store.
        event=json.dumps(stored, separators=(",", ":")),
        message_count=CALLS_PER_EVENT,
        occurred_at=None,
        destination=REFINER,
        contact=storable_contact(contact_key(stored)),
        people=people_of(stored),
    )
