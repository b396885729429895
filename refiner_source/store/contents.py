"""Reading the stored events' content in bulk (what `refiner-source questions` counts), a page at a time."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select

from refiner_source.store.database import Database
from refiner_source.store.tables import events


class Contents(Database):
    def event_contents(self, destination: str, page: int = 500) -> Iterator[str]:
        """The stored event JSON of every event of `destination` that still holds it (not past
        retention), oldest first, read `page` rows to a short transaction."""
        last = 0
        while True:
            stmt = (
                select(events.c.id, events.c.event)
                .where(events.c.destination == destination, events.c.id > last, events.c.event.is_not(None))
                .order_by(events.c.id)
                .limit(page)
            )
            with self._guard(), self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            last = rows[-1].id
            yield from (row.event for row in rows)
