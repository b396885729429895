"""What the webhook and the backfill both do with a SurveyEvent: map it, and wrap it for the outbox."""

from __future__ import annotations

from datetime import datetime

from .config import MappingRules
from .mapping import map_event
from .outbox import Entry
from .schemas import SurveyEvent, event_to_json


def receipt_key(response_uuid: str, triggered_event: str) -> str:
    """What makes two deliveries of an event "the same": the response and the Refiner event."""
    return f"{response_uuid}\n{triggered_event}"


def prepare(event: SurveyEvent, rules: MappingRules, now: datetime) -> Entry:
    """The event's Segment messages, with the receipt that makes a resend a duplicate and what
    replay needs to map it again later."""
    occurred = event.completed_at or event.dismissed_at or event.received_at
    return Entry(
        receipt_key=receipt_key(event.response_uuid, event.triggered_event),
        response_id=event.response_uuid,
        triggered_event=event.triggered_event,
        messages=map_event(event, rules, now),
        form_uuid=event.form_uuid,
        occurred_at=occurred.timestamp() if occurred else None,
        event=event_to_json(event),
    )
