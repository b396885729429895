"""The two directions, named once, by the destination their events are stored under: their titles,
their webhooks, and the pair of settings that turns each on. No imports: the settings, the store,
the mapping processes of a backfill and the web app all read these."""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT = "segment"  # Refiner's responses, to Segment
REFINER = "refiner"  # Segment's events, to Refiner


@dataclass(frozen=True)
class Direction:
    title: str  # what the operator reads
    source: str  # the webhook whose events go this way (/webhooks/<source>)
    target: str  # who receives them
    variables: tuple[str, str]  # the pair of settings that turns it on
    arrow: str  # the title as start-up errors write it


DIRECTIONS = {
    SEGMENT: Direction("Refiner to Segment", "refiner", "Segment", ("SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET"), "Refiner -> Segment"),
    REFINER: Direction(
        "Segment to Refiner", "segment", "Refiner's API", ("SEGMENT_SHARED_SECRET", "REFINER_API_KEY"), "Segment -> Refiner"
    ),
}
