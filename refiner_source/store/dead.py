"""Dead letters: listing them (flat, or by event), putting dead events back in line, and giving up
on them, all of a direction or one event at a time."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, select, update

from refiner_source.store.database import Database, chunks
from refiner_source.store.tables import DEAD, DELIVERED, PENDING, PURGED, dead_letters, events

# What replay can send again: an event whose content is kept (not forgotten past retention).
KEPT = events.c.event.is_not(None)
LARGEST_ID = 2**31 - 1  # ids are 32-bit integers: a larger number names no event (and PostgreSQL would refuse it)


@dataclass(frozen=True)
class Letter:
    """One message a destination refused: its messageId (None when the whole event could not be
    mapped), the call (a Segment call type, or Refiner's API path), the error, and when."""

    message_id: str | None
    call: str | None
    error: str
    created_at: float


@dataclass(frozen=True)
class DeadEvent:
    """A dead event and its letters, oldest first."""

    id: int
    source_id: str  # a Refiner response id, or a Segment messageId
    triggered_event: str
    letters: tuple[Letter, ...]


class DeadLetters(Database):
    """What died, and the operator's two answers to it: send again, or give up."""

    def dead_letters(self, limit: int = 20, *, destination: str) -> list[tuple[str, str, str]]:
        """(response id, message id or "-", error) of the newest dead letters."""
        calls = self.dead_letter_calls(limit, destination=destination)
        return [(source_id, message_id or "-", error) for source_id, message_id, _call, error in calls]

    def dead_letter_calls(self, limit: int = 20, *, destination: str) -> list[tuple[str, str | None, str | None, str]]:
        """(event's id from its source, message id, call, error) of the newest dead letters."""
        stmt = (
            select(events.c.source_id, dead_letters.c.message_id, dead_letters.c.call, dead_letters.c.error)
            .join(events, events.c.id == dead_letters.c.event_id)
            .where(events.c.destination == destination, events.c.status == DEAD)
            .order_by(dead_letters.c.id.desc())
            .limit(limit)
        )
        with self._guard(), self.engine.connect() as conn:
            return [(r.source_id, r.message_id, r.call, r.error) for r in conn.execute(stmt).all()]

    def dead_events(self, limit: int = 20, *, destination: str) -> list[DeadEvent]:
        """The dead events whose letters are newest, each with all its letters (one event may have several)."""
        newest = func.max(dead_letters.c.id)
        mine = and_(events.c.destination == destination, events.c.status == DEAD)
        stmt = (
            select(events.c.id, events.c.source_id, events.c.triggered_event)
            .outerjoin(dead_letters, dead_letters.c.event_id == events.c.id)
            .where(mine)
            .group_by(events.c.id, events.c.source_id, events.c.triggered_event)
            # An event without letters (dead before letters were kept) sorts last.
            .order_by(func.coalesce(newest, 0).desc(), events.c.id.desc())
            .limit(limit)
        )
        with self._guard(), self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
            letters = conn.execute(
                select(dead_letters).where(dead_letters.c.event_id.in_([r.id for r in rows])).order_by(dead_letters.c.id)
            ).all()
        by_event: dict[int, list[Letter]] = {}
        for d in letters:
            by_event.setdefault(d.event_id, []).append(Letter(d.message_id, d.call, d.error, d.created_at))
        return [DeadEvent(r.id, r.source_id, r.triggered_event, tuple(by_event.get(r.id, ()))) for r in rows]

    def dead_letter_count(self, destination: str) -> int:
        """How many messages are dead letters (an event may have several; stats().dead counts events)."""
        stmt = (
            select(func.count())
            .select_from(dead_letters.join(events, events.c.id == dead_letters.c.event_id))
            .where(events.c.destination == destination, events.c.status == DEAD)
        )
        with self._guard(), self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar() or 0)

    def replay_dead(self, destination: str) -> int:
        """Put every dead event back in line, to be mapped again with the current mapping; how many."""
        with self._guard(), self.engine.connect() as conn:
            ids = list(conn.execute(select(events.c.id).where(events.c.destination == destination, events.c.status == DEAD)).scalars())
        return self._requeue(ids, generation=None)

    def replay_dead_event(self, event_id: int) -> int:
        """Put one dead event back in line (1), or nothing when it is not dead (0: replayed or purged meanwhile)."""
        if not 0 < event_id <= LARGEST_ID:
            return 0
        with self._guard(), self.engine.connect() as conn:
            ids = list(conn.execute(select(events.c.id).where(events.c.id == event_id, events.c.status == DEAD)).scalars())
        return self._requeue(ids, generation=None)

    def _requeue(self, ids: Sequence[int], generation: str | None) -> int:
        """Back in line, 500 to a transaction (webhooks keep their turns at the write lock)."""
        queued = 0
        for chunk in chunks(list(ids), 500):
            now = time.time()
            values: dict[str, Any] = {
                "status": PENDING,
                "available_at": now,
                "queued_at": now,
                "attempts": 0,
                "claimed_by": None,
                "last_error": None,
            }
            if generation is not None:
                values["generation"] = generation
            with self._write() as conn:
                # Still delivered or dead, and still kept (a purge may have come in between): mapped anew when sent.
                stmt = update(events).where(events.c.id.in_(chunk), events.c.status.in_([DELIVERED, DEAD]), KEPT)
                queued += conn.execute(stmt.values(**values)).rowcount
                requeued = select(events.c.id).where(events.c.id.in_(chunk), events.c.status == PENDING)
                conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(requeued)))
        return queued

    def purge_dead(self, before: float, *, destination: str) -> int:
        """Give up on dead events that arrived before `before` (an operator's decision, by command):
        their letters and answers are deleted; the receipt stays, so a resend is still a duplicate."""
        return self._give_up(and_(events.c.destination == destination, events.c.status == DEAD, events.c.created_at < before))

    def purge_dead_event(self, event_id: int) -> int:
        """Give up on one dead event, as purge_dead does (1), or nothing when it is not dead (0)."""
        if not 0 < event_id <= LARGEST_ID:
            return 0
        return self._give_up(and_(events.c.id == event_id, events.c.status == DEAD))

    def _give_up(self, chosen) -> int:
        with self._write() as conn:
            ids = list(conn.execute(select(events.c.id).where(chosen)).scalars())
            given_up = 0
            for chunk in chunks(ids, 500):
                # Still dead: a replay from another process may have put one back in line meanwhile.
                given_up += conn.execute(
                    update(events)
                    .where(events.c.id.in_(chunk), events.c.status == DEAD)
                    .values(status=PURGED, event=None, delivered_at=time.time())
                ).rowcount
                gone = select(events.c.id).where(events.c.id.in_(chunk), events.c.status == PURGED)
                conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(gone)))
        return given_up
