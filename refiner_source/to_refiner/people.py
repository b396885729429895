"""Whom a Segment event concerns, as `refiner-source forget` names people: its userId, its
anonymousId, and the emails it carries (traits.email, context.traits.email); and the contact keys
the store keeps of a person's events (its contact column, which keeps one contact's calls in
order). Pure."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from refiner_source.directions.validation import storable
from refiner_source.privacy import EMAIL, USER, pairs


def people_of(event: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """Its userId, anonymousId, and every email it carries in `traits` or `context.traits` (what is
    sent to Refiner as the contact's email is one of them): an event that names a forgotten address
    anywhere is theirs."""
    found = pairs(user=event.get("userId"), anonymous=event.get("anonymousId"))
    context = event.get("context")
    for traits in (event.get("traits"), context.get("traits") if isinstance(context, Mapping) else None):
        if isinstance(traits, Mapping):
            found |= pairs(email=traits.get("email"))
    return frozenset(found)


def people_of_stored(event: str | None) -> frozenset[tuple[str, str]]:
    return people_of(json.loads(event)) if event else frozenset()


MAX_CONTACT_LENGTH = 255  # the store's contact column


def storable_contact(key: str | None) -> str | None:
    """The contact key as the store can keep it: a digest of it when it is too long for the column
    ("id:" + a 255-character userId, a long email) or not encodable (a lone surrogate in an email).
    The key is only compared for equality, so a digest keeps one contact's events together."""
    if key is None or (len(key) <= MAX_CONTACT_LENGTH and storable(key)):
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def contact_keys(person: frozenset[tuple[str, str]]) -> list[str]:
    """What the store's contact column holds for this person's events (it is kept past retention)."""
    keys = [storable_contact(f"id:{value}") for kind, value in person if kind == USER]
    keys += [storable_contact(f"email:{value}") for kind, value in person if kind == EMAIL]
    return [key for key in keys if key is not None]
