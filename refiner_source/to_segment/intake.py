"""What the webhook and the backfill both do with a validated SurveyEvent: make the entry the store keeps.

Pure (no database, no web framework), so a backfill can run it in worker processes. The event is
stored as it is, normalised; the delivery worker maps it when it sends it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from refiner_source.directions import SEGMENT
from refiner_source.directions.entry import Entry
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.directions.validation import error_fields
from refiner_source.to_segment.events import ApiResponseSchema, SurveyEvent, event_to_json
from refiner_source.to_segment.mapping import calls
from refiner_source.to_segment.people import people_of

_api_item = ApiResponseSchema()


def receipt_key(response_uuid: str, triggered_event: str) -> str:
    """What makes two deliveries of an event "the same": the response and the Refiner event."""
    return f"{response_uuid}\n{triggered_event}"


def prepare(event: SurveyEvent, rules: MappingRules) -> Entry:
    """The entry of an event: its receipt (a resend is a duplicate), what replay selects it by, the event."""
    occurred = event.completed_at or event.dismissed_at or event.received_at
    return Entry(
        receipt_key=receipt_key(event.response_uuid, event.triggered_event),
        source_id=event.response_uuid,
        triggered_event=event.triggered_event,
        event=event_to_json(event),
        message_count=len(calls(event, rules)),
        form_uuid=event.form_uuid,
        occurred_at=occurred.timestamp() if occurred else None,
        destination=SEGMENT,
        people=people_of(event),
    )


@dataclass(frozen=True)
class Skipped:
    """An API item that is not a valid response: its id (when it has one) and the failing field paths, never values."""

    response_id: str | None
    fields: list[str]


@dataclass
class MappedPage:
    """What one page of Refiner's REST API becomes. Returned, not logged, by a mapping process: that
    process has no logging set up, so the process that stores the page logs what was skipped."""

    entries: list[Entry] = field(default_factory=list)
    not_completed: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def map_api_page(items: list[Any], rules: MappingRules) -> MappedPage:
    """The entries of one page of Refiner's REST API, and what it skipped."""
    page = MappedPage()
    for item in items:
        try:
            event = _api_item.load(item)
        except ValidationError as exc:
            response_id = item.get("uuid") if isinstance(item, dict) and isinstance(item.get("uuid"), str) else None
            page.skipped.append(Skipped(response_id, sorted(error_fields(exc))))
            continue
        if event.completed_at is None:
            page.not_completed += 1
            continue
        page.entries.append(prepare(event, rules))
    return page


def ignore_stop_signals() -> None:
    """Initializer of a backfill's mapping processes. Ctrl-C and SIGTERM reach the whole process
    group: the main process stops the run and finishes the pages in flight, which these must
    live to map. (Here, not in backfill.py: these processes import only this module's world.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
