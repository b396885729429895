"""Each direction's delivery module (<package>.delivery, named by the registry in directions.py):
the loop that sends its events and the preview of what a stored event becomes. Imported when used:
a process loads only what it runs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from refiner_source.directions import DIRECTIONS

if TYPE_CHECKING:
    from refiner_source.config import Settings
    from refiner_source.delivery.loop import Loop
    from refiner_source.directions.mapping_file import MappingRules
    from refiner_source.store import Store

def delivery_loops(settings: Settings, outbox: Store) -> list[Loop]:
    """A delivery loop for each direction that is on, each dropping the events of people on the suppression list."""
    from refiner_source.config import key_of
    from refiner_source.privacy import Suppressed

    loops = [_module(d).build_loop(settings, outbox) for d in DIRECTIONS if settings.direction_on(d)]
    for loop in loops:
        loop.suppressed = Suppressed(outbox, key_of(settings), refresh=0)  # fresh before each claim is sent
    return loops


def preview(destination: str, stored: str | None, generation: str | None, created_at: float, rules: MappingRules) -> list[dict[str, Any]]:
    """The calls a stored event of `destination` becomes now with `rules`, made by the same code as
    its delivery (raises what its mapping raises)."""
    return _module(destination).preview(stored, generation, created_at, rules)


def _module(destination: str):
    return importlib.import_module(DIRECTIONS[destination].package + ".delivery")
