"""Whom a Refiner response concerns, as `refiner-source forget` names people: the contact's
remote_id (Segment's userId), its email, and its Refiner uuid (the anonymousId the mapping sends
when there is no remote_id). Pure."""

from __future__ import annotations

import json
from typing import Any

from refiner_source.privacy import pairs
from refiner_source.to_segment.events import SurveyEvent


def people_of(event: SurveyEvent) -> frozenset[tuple[str, str]]:
    return frozenset(pairs(user=event.remote_id, email=event.email, anonymous=event.contact_uuid))


def people_of_stored(event: str | None, messages: str | None) -> frozenset[tuple[str, str]]:
    """The identifiers of a stored event (its JSON), or of the Segment messages a store from before
    version 3 kept instead (their userId, anonymousId and traits' email)."""
    found: set[tuple[str, str]] = set()
    if event:
        data = json.loads(event)
        found |= pairs(user=data.get("remote_id"), email=data.get("email"), anonymous=data.get("contact_uuid"))
    if messages:
        for message in json.loads(messages):
            if isinstance(message, dict):
                traits: Any = message.get("traits") if message.get("type") == "identify" else None
                email = traits.get("email") if isinstance(traits, dict) else None
                found |= pairs(user=message.get("userId"), email=email, anonymous=message.get("anonymousId"))
    return frozenset(found)
