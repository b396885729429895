"""Whom a Segment event concerns, as `refiner-source forget` names people: its userId, its
anonymousId, and the emails it carries (traits.email, context.traits.email). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from refiner_source.privacy import pairs
from refiner_source.to_refiner.mapping import email_of


def people_of(event: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """Its userId, anonymousId, the email sent to Refiner (email_of), and any other email it carries
    in `traits` or `context.traits`: an event that names a forgotten address anywhere is theirs."""
    found = pairs(user=event.get("userId"), email=email_of(event), anonymous=event.get("anonymousId"))
    for traits in (event.get("traits"), (event.get("context") or {}).get("traits") if isinstance(event.get("context"), Mapping) else None):
        if isinstance(traits, Mapping):
            found |= pairs(email=traits.get("email"))
    return frozenset(found)


def people_of_stored(event: str | None, _messages: str | None = None) -> frozenset[tuple[str, str]]:
    return people_of(json.loads(event)) if event else frozenset()
