"""Where each backfill stands: the next page to ask Refiner's API for, and what it has counted so far."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import insert, select, update

from refiner_source.store.database import Database
from refiner_source.store.tables import backfills


@dataclass(frozen=True)
class BackfillState:
    next_cursor: str | None
    next_page: int | None
    done: bool
    pages: int
    seen: int
    stored: int


class Cursors(Database):
    """One row per backfill run; saved in the same transaction as the page's events (see store_many)."""

    def backfill_state(self, run_key: str) -> BackfillState | None:
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(select(backfills).where(backfills.c.run_key == run_key)).first()
        if row is None:
            return None
        return BackfillState(row.next_cursor, row.next_page, bool(row.done), row.pages, row.seen, row.stored)

    def _save_backfill(self, conn, run_key: str, state: BackfillState, now: float) -> None:
        values = {
            "next_cursor": state.next_cursor,
            "next_page": state.next_page,
            "done": int(state.done),
            "pages": state.pages,
            "seen": state.seen,
            "stored": state.stored,
            "updated_at": now,
        }
        if conn.execute(update(backfills).where(backfills.c.run_key == run_key).values(**values)).rowcount == 0:
            conn.execute(insert(backfills).values(run_key=run_key, **values))
