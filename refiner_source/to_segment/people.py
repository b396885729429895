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
                found |= pairs(user=message.get("userId"), anonymous=message.get("anonymousId"))
                traits: Any = message.get("traits") if message.get("type") == "identify" else None
                # Those versions wrote the contact's email as a prefixed trait (`refiner_email` by
                # default, or the mapping file's name): any trait named like an email is taken.
                for name, value in traits.items() if isinstance(traits, dict) else ():
                    if isinstance(name, str) and name.lower().endswith("email"):
                        found |= pairs(email=value)
    return frozenset(found)
