"""Whom a Segment event concerns, as `refiner-source forget` names people: its userId, its
anonymousId, and the contact's email (traits.email, else context.traits.email). Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from refiner_source.privacy import pairs
from refiner_source.to_refiner.mapping import email_of


def people_of(event: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset(pairs(user=event.get("userId"), email=email_of(event), anonymous=event.get("anonymousId")))


def people_of_stored(event: str | None, _messages: str | None = None) -> frozenset[tuple[str, str]]:
    return people_of(json.loads(event)) if event else frozenset()
