"""Whom a Refiner response concerns, as `refiner-source forget` names people: the contact's
remote_id (Segment's userId), its email, and its Refiner uuid (the anonymousId the mapping sends
when there is no remote_id). Pure."""

from __future__ import annotations

import json

from refiner_source.privacy import pairs
from refiner_source.to_segment.events import SurveyEvent


def people_of(event: SurveyEvent) -> frozenset[tuple[str, str]]:
    return frozenset(pairs(user=event.remote_id, email=event.email, anonymous=event.contact_uuid))


def people_of_stored(event: str | None) -> frozenset[tuple[str, str]]:
    """The identifiers of a stored event (its JSON)."""
    if not event:
        return frozenset()
    data = json.loads(event)
    return frozenset(pairs(user=data.get("remote_id"), email=data.get("email"), anonymous=data.get("contact_uuid")))


def contact_keys(person: frozenset[tuple[str, str]]) -> list[str]:
    """What the store's contact column holds for this person's events: nothing (Segment's calls
    keep no contact's order)."""
    return []
