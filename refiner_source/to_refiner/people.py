"""Whom a Segment event concerns, as `refiner-source forget` names people: its userId, its
anonymousId, and the emails it carries (traits.email, context.traits.email). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from refiner_source.privacy import pairs


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
