"""What the webhook and the backfill both do with a SurveyEvent: map it, and wrap it for the outbox.

Pure (no database, no web framework), so a backfill can run it in worker processes.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from marshmallow import ValidationError

from .config import MappingRules
from .mapping import map_event
from .schemas import ApiResponseSchema, SurveyEvent, error_fields, event_to_json

log = logging.getLogger(__name__)
_api_item = ApiResponseSchema()


@dataclass(frozen=True)
class Entry:
    """One response event to store: its receipt and its Segment messages."""

    receipt_key: str
    response_id: str
    triggered_event: str
    messages: Sequence[dict[str, Any]]
    form_uuid: str | None = None
    occurred_at: float | None = None
    event: str | None = None  # the normalised event as JSON, for replay


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


def map_api_page(items: list[Any], rules: MappingRules) -> tuple[list[Entry], int, int]:
    """(entries, not completed, invalid) of one page of Refiner's REST API."""
    entries: list[Entry] = []
    not_completed = invalid = 0
    now = datetime.now(UTC)
    for item in items:
        try:
            event = _api_item.load(item)
        except ValidationError as exc:
            invalid += 1
            response_id = item.get("uuid") if isinstance(item, dict) and isinstance(item.get("uuid"), str) else None
            fields = sorted(error_fields(exc))
            log.warning("skipped an API item that is not a valid response", extra={"response_id": response_id, "fields": fields})
            continue
        if event.completed_at is None:
            not_completed += 1
            continue
        entries.append(prepare(event, rules, now))
    return entries, not_completed, invalid


def ignore_stop_signals() -> None:
    """Initializer of a backfill's mapping processes. Ctrl-C and SIGTERM reach the whole process
    group: the main process stops the run and finishes the pages in flight, which these must
    live to map. (Here, not in backfill.py: these processes import only this module's world.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
