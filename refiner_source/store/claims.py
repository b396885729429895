"""Delivery's side of the store: claim due events for a while, settle what became of them, and
say when the next one is due."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, exists, func, insert, select, text, update
from sqlalchemy.engine import Connection

from refiner_source.store.database import Database, insert_ignoring_conflict
from refiner_source.store.tables import DEAD, DELIVERED, PENDING, dead_letters, events, last_errors


@dataclass(frozen=True)
class Claimed:
    """An event claimed for delivery: what its destination's mapping needs."""

    id: int
    source_id: str  # the id its source gave it: a Refiner response's uuid, a Segment messageId
    event: str | None  # the stored event as JSON
    generation: str | None
    created_at: float
    attempts: int
    contact: str | None = None
    queued_at: float | None = None  # received, or put back in line by a replay


@dataclass(frozen=True)
class DeadLetter:
    event_id: int
    message_id: str | None
    call: str | None
    error: str


class Claims(Database):
    """Claim and settle, each one transaction; a claim is a lease that runs out if its worker dies."""

    def claim(self, destination: str, limit: int, lease_seconds: float, worker: str, *, contact_order: bool = False) -> list[Claimed]:
        """Take up to `limit` due events for `lease_seconds`; no other worker gets them meanwhile.

        PostgreSQL: the row locks of FOR UPDATE SKIP LOCKED make concurrent claims disjoint.
        SQLite: BEGIN IMMEDIATE serialises writers. A worker that dies lets its lease run out.

        `contact_order`: one contact's events are claimed in the order they came, never one while
        an earlier one of the same contact is pending and not due (waiting to be retried, or
        claimed by another worker). Such claims take turns (an advisory lock on PostgreSQL), so
        that each sees what the one before it claimed.
        """
        now = time.time()
        due = and_(events.c.destination == destination, events.c.status == PENDING, events.c.available_at <= now)
        if contact_order:
            earlier = events.alias("earlier")
            due = and_(
                due,
                ~exists().where(
                    earlier.c.destination == destination,
                    earlier.c.contact == events.c.contact,
                    earlier.c.id < events.c.id,
                    earlier.c.status == PENDING,
                    earlier.c.available_at > now,
                ),
            )
            order = (events.c.id,)
        else:
            # In the order of the due index, which then stops at the limit (by id, it read every due row).
            order = (events.c.available_at, events.c.id)
        # A CTE, materialized: PostgreSQL runs it once, so the rows it locked (skipping those another
        # worker holds) are exactly the rows updated; as an IN subquery the planner may run it again.
        ids = select(events.c.id).where(due).order_by(*order).limit(limit).with_for_update(skip_locked=True).cte("due_events")
        if self.engine.dialect.name == "postgresql":
            ids = ids.prefix_with("MATERIALIZED")
        stmt = (
            update(events)
            .where(events.c.id.in_(select(ids.c.id)), events.c.status == PENDING, events.c.available_at <= now)
            .values(available_at=now + lease_seconds, claimed_by=worker)
            .returning(
                events.c.id,
                events.c.source_id,
                events.c.event,
                events.c.generation,
                events.c.created_at,
                events.c.attempts,
                events.c.contact,
                events.c.queued_at,
            )
        )
        with self._write() as conn:
            if contact_order and conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(8127350)"))
            rows = conn.execute(stmt).all()
        rows.sort(key=lambda r: r.id)
        return [
            Claimed(
                r.id,
                r.source_id,
                r.event,
                r.generation,
                r.created_at,
                r.attempts,
                r.contact,
                r.queued_at,
            )
            for r in rows
        ]

    def settle(
        self,
        worker: str,
        delivered: Sequence[int] = (),
        dead: Sequence[DeadLetter] = (),
        released: Sequence[int] = (),
        delay: float = 0.0,
        error: str = "",
        *,
        destination: str,
    ) -> None:
        """Record, in one transaction, what became of claimed events: delivered; dead (with the
        letters of the messages at fault); or released for another try after `delay`.

        Only while `worker` still holds them: an event replayed meanwhile (claim cleared) is sent again.
        """
        now = time.time()
        mine = and_(events.c.claimed_by == worker, events.c.status == PENDING)
        dead_ids = sorted({d.event_id for d in dead})
        # What the operator wants to see: why a delivery failed, not that a claim was handed back unsent.
        retried = error if released and error and not error.startswith("handed back") else None
        newest_error = dead[-1].error if dead else retried
        with self._write() as conn:
            if newest_error:
                self._record_error(conn, destination, newest_error, now)
            if delivered:
                conn.execute(
                    update(events)
                    .where(events.c.id.in_(list(delivered)), mine)
                    .values(status=DELIVERED, delivered_at=now, claimed_by=None, last_error=None, attempts=events.c.attempts + 1)
                )
            still_mine: set[int] = set()
            for event_id in dead_ids:
                first_error = next(d.error for d in dead if d.event_id == event_id)
                marked = conn.execute(
                    update(events)
                    .where(events.c.id == event_id, mine)
                    .values(status=DEAD, claimed_by=None, attempts=events.c.attempts + 1, last_error=first_error[:2000])
                ).rowcount
                if marked:
                    still_mine.add(event_id)
            if dead:
                letters = [
                    {"event_id": d.event_id, "message_id": d.message_id, "call": d.call, "error": d.error[:2000], "created_at": now}
                    for d in dead
                    if d.event_id in still_mine
                ]
                if letters:
                    conn.execute(insert(dead_letters), letters)
            if released:
                conn.execute(
                    update(events)
                    .where(events.c.id.in_(list(released)), mine)
                    .values(available_at=now + delay, claimed_by=None, attempts=events.c.attempts + 1, last_error=error[:2000])
                )

    def _record_error(self, conn: Connection, destination: str, error: str, now: float) -> None:
        values = {"error": error[:2000], "at": now}
        if conn.execute(update(last_errors).where(last_errors.c.destination == destination).values(**values)).rowcount == 0:
            conn.execute(insert_ignoring_conflict(conn.dialect.name, last_errors).values(destination=destination, **values))

    def next_due_in(self, destination: str) -> float | None:
        """Seconds until the next pending event is due (0 if one is due now), None if none is pending."""
        stmt = select(func.min(events.c.available_at)).where(events.c.destination == destination, events.c.status == PENDING)
        with self._guard(), self.engine.connect() as conn:
            first = conn.execute(stmt).scalar()
        return None if first is None else max(0.0, first - time.time())
