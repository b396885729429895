"""The two directions, named once, by the destination their events are stored under. No imports:
the store, the mapping processes of a backfill and the web app all read these."""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT = "segment"  # Refiner's responses, to Segment
REFINER = "refiner"  # Segment's events, to Refiner


@dataclass(frozen=True)
class Direction:
    title: str  # what the operator reads
    source: str  # the webhook whose events go this way (/webhooks/<source>)
    target: str  # who receives them


DIRECTIONS = {
    SEGMENT: Direction("Refiner to Segment", "refiner", "Segment"),
    REFINER: Direction("Segment to Refiner", "segment", "Refiner's API"),
}
