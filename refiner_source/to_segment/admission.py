"""What the Refiner webhook decides of a parsed body, with no web framework: the entry to store,
ignored (and why), or refused (the error the webhook answers). `refiner-source preview` decides
with the same code, so that it refuses exactly what the webhook refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from refiner_source.directions.entry import Entry
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.directions.validation import Refused, error_fields
from refiner_source.to_segment.events import WebhookSchema, check_limits, well_formed_event_name
from refiner_source.to_segment.intake import prepare
from refiner_source.to_segment.mapping import event_name

_webhook = WebhookSchema()


@dataclass(frozen=True)
class Ignored:
    """A body answered 200 ignored: its event is not forwarded."""

    reason: str
    triggered_event: str


def admit(body: Any, rules: MappingRules) -> Entry | Ignored:
    """The entry of a Refiner webhook body, or Ignored; raises Refused (422) for a body of the wrong shape."""
    if not isinstance(body, dict):
        raise Refused(422, "invalid_shape", "Expected a JSON object.", {"_schema": ["Expected a JSON object."]})
    limit = check_limits(body)
    if limit is not None:
        raise Refused(422, limit.code, limit.message, {limit.path: [limit.message]})
    triggered_event = body.get("triggered_event")
    # Not forwarded: answered 200 ignored, the rest unvalidated. A name that is not a
    # valid one (empty, too long, NUL) goes on to validation, which says so with a 422.
    if well_formed_event_name(triggered_event) and event_name(triggered_event, rules) is None:
        reason = "turned off in the mapping file" if triggered_event in rules.events else "not a forwarded event"
        return Ignored(f"triggered_event {triggered_event!r}: {reason}", triggered_event)
    try:
        event = _webhook.load(body)  # the one validation pass
    except ValidationError as exc:
        raise Refused(422, "invalid_payload", "The body does not have the shape of a Refiner webhook.", error_fields(exc)) from None
    return prepare(event, rules)
