"""Whom a stored stand-in event concerns: its "user"."""

from __future__ import annotations

import json

from refiner_source.privacy import pairs


def people_of_stored(event: str | None) -> frozenset[tuple[str, str]]:
    return frozenset(pairs(user=json.loads(event).get("user"))) if event else frozenset()


def contact_keys(person: frozenset[tuple[str, str]]) -> list[str]:
    return []  # its events keep no contact's order
