"""What every direction shares, below them all: here, the one registry of the directions, keyed by
the destination their events are stored under (each one's titles, its webhook's path and body
limit, the pair of settings that turns it on, and the package that holds its schemas, admission,
mapping, people and delivery); beside it, the row an admission hands the store (`entry`), how a
body is refused (`validation`) and the mapping file's rules (`mapping_file`). Nothing is added to
the registry at import time, and nothing here imports another part of refiner_source but its
errors: the settings, the store, a backfill's mapping processes and the web app all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SEGMENT = "segment"  # Refiner's responses, to Segment
REFINER = "refiner"  # Segment's events, to Refiner


@dataclass(frozen=True)
class Direction:
    title: str  # what the operator reads
    source: str  # the webhook whose events go this way (/webhooks/<source>)
    target: str  # who receives them
    variables: tuple[str, str]  # the pair of settings that turns it on
    arrow: str  # the title as start-up errors write it
    body_limit: int  # the largest body its webhook takes, in bytes
    package: str  # its package: <package>.delivery (build_loop, preview) and <package>.people (people_of_stored, contact_keys)
    on: Callable[[Any], bool]  # of the Settings: whether it is on (its pair of settings both set)

    @property
    def path(self) -> str:
        """Its webhook's route."""
        return f"/webhooks/{self.source}"


# Segment's largest batch is 4,000 events of at most 32 KB each (125 MiB): a body it can send is never
# refused. Segment -> Refiner's webhook reads a batch as it arrives, so this costs no memory.
LARGEST_BODY_BYTES = 256 << 20

DIRECTIONS = {
    SEGMENT: Direction(
        "Refiner to Segment",
        "refiner",
        "Segment",
        ("SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET"),
        "Refiner -> Segment",
        body_limit=1 << 20,
        package="refiner_source.to_segment",
        on=lambda settings: bool(settings.segment_write_key and settings.webhook_secrets),
    ),
    REFINER: Direction(
        "Segment to Refiner",
        "segment",
        "Refiner's API",
        ("SEGMENT_SHARED_SECRET", "REFINER_API_KEY"),
        "Segment -> Refiner",
        body_limit=LARGEST_BODY_BYTES,
        package="refiner_source.to_refiner",
        on=lambda settings: bool(settings.segment_shared_secret and settings.refiner_api_key),
    ),
}


def by_path(path: str) -> Direction | None:
    """The direction whose webhook is at `path` (None: no webhook's)."""
    return next((d for d in DIRECTIONS.values() if d.path == path), None)
