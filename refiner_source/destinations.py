"""The destinations, registered once: which delivery loop each direction that is on runs.

A third destination is a package beside to_segment/ and to_refiner/ (its mapping and its API
client) and one entry here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refiner_source.config import Settings
    from refiner_source.delivery.loop import Loop
    from refiner_source.store import Outbox


def _to_segment(settings: Settings, outbox: Outbox) -> Loop:
    from refiner_source.to_segment.delivery import Worker

    return Worker(outbox, settings.segment_write_key, settings.segment_host, rules=settings.rules)


def _to_refiner(settings: Settings, outbox: Outbox) -> Loop:
    from refiner_source.refiner_rest import RefinerApi
    from refiner_source.to_refiner.delivery import RefinerWorker

    api = RefinerApi(settings.refiner_api_url, settings.refiner_api_key, timeout=15.0)
    return RefinerWorker(outbox, api, rules=settings.rules, concurrency=settings.refiner_api_concurrency)


# destination -> its delivery loop, built from the settings (imports inside: a process loads only what it runs)
LOOPS = {"segment": _to_segment, "refiner": _to_refiner}


def delivery_loops(settings: Settings, outbox: Outbox) -> list[Loop]:
    """A loop for each direction that is on."""
    return [build(settings, outbox) for destination, build in LOOPS.items() if settings.direction_on(destination)]
