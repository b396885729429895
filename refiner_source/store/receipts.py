"""Storing accepted events: each receipt once (a resent webhook is a duplicate), many in one
transaction (a backfill's page), or one webhook's committed with whatever other threads store
meanwhile (group commit)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from refiner_source.directions.entry import Entry
from refiner_source.store.cursors import BackfillState, Cursors
from refiner_source.store.database import chunks, insert_ignoring_conflict
from refiner_source.store.tables import PENDING, events


class Receipts(Cursors):
    """Writes new events; a backfill's cursor moves in the same transaction as its page, hence Cursors."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        super().__init__(url, engine)
        self._leader_lock = threading.Lock()
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._insert = insert_ignoring_conflict(self.engine.dialect.name, events).returning(events.c.destination, events.c.receipt_key)

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
        process store meanwhile: one transaction and one fsync for all (group commit).

        The webhook's path: with SQLite's synchronous=FULL, each commit's fsync is what limits
        ingest. The group is taken only once the write lock is held, so that everything that
        arrived while the previous commit was syncing goes into this one. Each caller still
        gets its own answer, or the error.
        """
        waiting = _Waiting(entry, _row(entry, time.time()))
        with self._waiting_lock:
            self._waiting.append(waiting)
        with self._leader_lock:  # one leader per process at a time; the others queue here
            if not waiting.done:  # nobody has committed this entry yet: lead the next group
                group: list[_Waiting] = []
                try:
                    with self._write_held() as conn:
                        with self._waiting_lock:
                            group, self._waiting = self._waiting, []
                        # The same receipt twice in one group (a webhook resent at once): only the
                        # first one's row is written, and only it can be new.
                        first = _first_of_each(group, lambda w: _key(w.row))
                        new_keys = self._insert_rows(conn, [w.row for w in first.values()])
                    for w in group:
                        w.result = w is first.get(_key(w.row)) and _key(w.row) in new_keys
                except BaseException as exc:
                    if not group:  # failed before taking the group: this entry alone fails, and
                        with self._waiting_lock:  # must not be committed later by another leader
                            if waiting in self._waiting:
                                self._waiting.remove(waiting)
                        group = [waiting]
                    for w in group:
                        w.error = exc
                finally:
                    for w in group:
                        w.done = True
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """Insert the rows whose receipt is new; their (destination, receipt key)."""
        if not rows:
            return set()
        # executemany with RETURNING: SQLAlchemy batches it into multi-row statements from one cached
        # compilation ("insertmanyvalues"). A row back means inserted (rowcount is -1 on psycopg here).
        return {(r.destination, r.receipt_key) for r in conn.execute(self._insert, rows)}

    def known_receipts(self, keys: Sequence[str], *, destination: str) -> set[str]:
        """Which of these receipts exist already (for a dry run)."""
        found: set[str] = set()
        with self._guard(), self.engine.connect() as conn:
            for chunk in chunks(keys, 500):
                stmt = select(events.c.receipt_key).where(events.c.destination == destination, events.c.receipt_key.in_(chunk))
                found.update(conn.execute(stmt).scalars())
        return found


@dataclass
class _Waiting:
    """One thread's entry in store_grouped(): filled in by whichever thread commits its group."""

    entry: Entry
    row: dict[str, Any]
    done: bool = False
    result: bool = False
    error: BaseException | None = None


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
    return list(_first_of_each([_row(e, now) for e in entries], _key).values())


def _first_of_each(items: Sequence[Any], key) -> dict[Any, Any]:
    """key -> the first item with that key, in the order the keys first appear."""
    first: dict[Any, Any] = {}
    for item in items:
        first.setdefault(key(item), item)
    return first
