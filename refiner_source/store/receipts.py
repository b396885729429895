"""Storing accepted events: each receipt once (a resent webhook is a duplicate), many in one
transaction (a backfill's page), or one webhook's committed with whatever other threads store
meanwhile (group commit)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from refiner_source.directions.entry import Entry
from refiner_source.store.cursors import BackfillState, Cursors
from refiner_source.store.database import InsertMany, chunks, insert_ignoring_conflict
from refiner_source.store.tables import PENDING, events
from refiner_source.store.writing import GroupCommit, first_of_each


class Receipts(Cursors):
    """Writes new events; a backfill's cursor moves in the same transaction as its page, hence Cursors."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        super().__init__(url, engine)
        self._insert = insert_ignoring_conflict(self.engine.dialect.name, events).returning(events.c.destination, events.c.receipt_key)
        # One statement of many rows on the driver's cursor, where the database has RETURNING (SQLite 3.35+).
        returning = self.engine.dialect.insert_returning
        self._insert_many = InsertMany(self.engine.dialect, events, ("destination", "receipt_key")) if returning else None
        # _insert_rows called through self, so that it can be replaced on the instance.
        self._group = GroupCommit(self._held, lambda conn, rows: self._insert_rows(conn, rows), _key)

    def store_many(self, entries: Sequence[Entry], backfill: tuple[str, BackfillState] | None = None) -> int:
        """Commit the entries not seen before, and where a backfill stands, in one transaction.

        `backfill` is (run key, state after this page, its `stored` counting what came before);
        the entries found new here are added to it. Returns how many were new. Only the receipt's
        ON CONFLICT makes an entry "seen before": any other integrity error is a bug to surface,
        never a reason to drop a response.
        """
        now = time.time()
        rows = _rows(entries, now)  # prepared before the write lock
        with self._write() as conn:
            new = len(self._insert_rows(conn, rows))
            if backfill is not None:
                run_key, state = backfill
                self._save_backfill(conn, run_key, replace(state, stored=state.stored + new), now)
        return new

    def store_grouped(self, entry: Entry) -> bool:
        """Store one entry (True: new), committed together with whatever other threads of this
        process store meanwhile: one transaction and one fsync for all (store/writing.py's group
        commit). The webhook's path: with SQLite's synchronous=FULL, each commit's fsync is what
        limits ingest. Each caller still gets its own answer, or the error."""
        return self._group.commit(_row(entry, time.time()))

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """Insert the rows whose receipt is new; their (destination, receipt key)."""
        if not rows:
            return set()
        if self._insert_many is not None:  # a row back means inserted (rowcount is -1 on psycopg)
            return set(self._insert_many(conn, rows))
        return {(r.destination, r.receipt_key) for r in conn.execute(self._insert, rows)}

    def known_receipts(self, keys: Sequence[str], *, destination: str) -> set[str]:
        """Which of these receipts exist already (for a dry run)."""
        found: set[str] = set()
        with self._guard(), self.engine.connect() as conn:
            for chunk in chunks(keys, 500):
                stmt = select(events.c.receipt_key).where(events.c.destination == destination, events.c.receipt_key.in_(chunk))
                found.update(conn.execute(stmt).scalars())
        return found


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["destination"], row["receipt_key"]


def _row(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "destination": entry.destination,
        "receipt_key": entry.receipt_key,
        "source_id": entry.source_id,
        "triggered_event": entry.triggered_event,
        "form_uuid": entry.form_uuid,
        "occurred_at": entry.occurred_at,
        "event": entry.event,
        "message_count": entry.message_count,
        "generation": None,
        "status": PENDING,
        "attempts": 0,
        "available_at": now,
        "claimed_by": None,
        "last_error": None,
        "created_at": now,
        "queued_at": now,
        "delivered_at": None,
        "contact": entry.contact,
    }


def _rows(entries: Sequence[Entry], now: float) -> list[dict[str, Any]]:
    """Rows of the entries, ready to insert; an entry whose receipt comes twice is written once."""
    return list(first_of_each([_row(e, now) for e in entries], _key).values())
