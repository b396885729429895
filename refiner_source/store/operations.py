"""What the operator sees and does: counts and the oldest wait, dead letters, one event's story,
replay, and retention (forgetting answers, then receipts)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, or_, select, update

from refiner_source.store.dead import KEPT, LARGEST_ID, DeadLetters
from refiner_source.store.tables import DEAD, DELIVERED, PENDING, PURGED, dead_letters, events, last_errors


@dataclass(frozen=True)
class Stats:
    """Counts of events (one per accepted webhook or backfilled response), not of messages."""

    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None
    last_delivered_age: float | None = None  # since the newest delivery still kept (see retention)


@dataclass(frozen=True)
class Requeued:
    matched: int  # events the selection found
    queued: int  # put back in line
    forgotten: int  # past retention: their answers are gone, they cannot be mapped again
    pending: int = 0  # not sent yet: left in line as they are
    suppressed: int = 0  # of people on the suppression list (`skip`): not queued


class Operations(DeadLetters):
    """Reads for the status page and the CLI, and the commands that put events back in line or forget them."""

    def stats(self, destination: str) -> Stats:
        mine = events.c.destination == destination
        with self._guard(), self.engine.connect() as conn:
            counts = dict(conn.execute(select(events.c.status, func.count()).where(mine).group_by(events.c.status)).all())
            oldest = conn.execute(select(func.min(events.c.queued_at)).where(mine, events.c.status == PENDING)).scalar()
            newest = conn.execute(select(func.max(events.c.delivered_at)).where(mine, events.c.status == DELIVERED)).scalar()
        now = time.time()
        return Stats(
            pending=counts.get(PENDING, 0),
            delivered=counts.get(DELIVERED, 0),
            dead=counts.get(DEAD, 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            last_delivered_age=None if newest is None else max(0.0, now - newest),
        )

    def requeue(
        self,
        source_id: str | None = None,
        form_uuid: str | None = None,
        since: float | None = None,
        until: float | None = None,
        generation: str | None = None,
        *,
        destination: str,
        skip: Callable[[str | None], bool] | None = None,
    ) -> Requeued:
        """Put the delivered or dead events a replay selects back in line, to be mapped again (with
        `generation`, new messageIds). Pending events are left as they are: they will be mapped when
        sent anyway, and one in flight must not go out twice. Events past retention are counted, not
        queued: their answers are gone. Events `skip` (of their stored event) says are
        of a forgotten person are counted, not queued."""
        selection = [events.c.destination == destination]
        if source_id is not None:
            selection.append(events.c.source_id == source_id)
        if form_uuid is not None:
            selection.append(events.c.form_uuid == form_uuid)
        if since is not None:
            selection.append(events.c.occurred_at >= since)
        if until is not None:
            selection.append(events.c.occurred_at < until)
        with self._guard(), self.engine.connect() as conn:  # a read: no write lock while it scans
            already = conn.execute(select(func.count()).select_from(events).where(*selection, events.c.status == PENDING)).scalar()
            settled = events.c.status.in_([DEAD, DELIVERED])
            content = (events.c.event,) if skip is not None else ()
            rows = conn.execute(select(events.c.id, KEPT, *content).where(*selection, settled)).all()
        kept = [r for r in rows if r[1]]
        ids = [r[0] for r in kept if skip is None or not skip(r[2])]
        queued = self._requeue(ids, generation)
        return Requeued(
            matched=len(rows) + already, queued=queued, forgotten=len(rows) - len(kept), pending=already, suppressed=len(kept) - len(ids)
        )

    def purge(self, delivered_before: float, receipts_before: float) -> tuple[int, int]:
        """Forget the answers of events delivered before `delivered_before`; delete the rows of events
        received and settled before `receipts_before` (their receipts: a resend is then accepted
        anew), never before their answers are forgotten. (forgotten, deleted). Pending and dead
        events are never touched. When rows changed, the old answers are scrubbed from the database's
        files (Database._scrub)."""
        receipts_before = min(receipts_before, delivered_before)
        done = events.c.status.in_([DELIVERED, PURGED])
        with self._write() as conn:
            forgotten = conn.execute(
                update(events).where(done, events.c.delivered_at < delivered_before, events.c.event.is_not(None)).values(event=None)
            ).rowcount
            deleted = conn.execute(
                delete(events).where(done, events.c.delivered_at < receipts_before, events.c.created_at < receipts_before)
            ).rowcount
        if forgotten or deleted:
            self._scrub(events)
        return forgotten, deleted

    def last_error(self, destination: str) -> tuple[str | None, float | None]:
        """The newest delivery error of a destination (a retry or a dead letter) and when, even if it recovered since."""
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(select(last_errors.c.error, last_errors.c.at).where(last_errors.c.destination == destination)).first()
        return (row.error, row.at) if row else (None, None)

    def last_delivered_at(self, destination: str) -> float | None:
        """When the newest delivery still kept happened: after the last error's time, delivery has recovered."""
        stmt = select(func.max(events.c.delivered_at)).where(events.c.destination == destination, events.c.status == DELIVERED)
        with self._guard(), self.engine.connect() as conn:
            return conn.execute(stmt).scalar()

    def find_events(self, key: str, limit: int = 20) -> list[dict[str, Any]]:
        """The events a response id or a Segment messageId names (both directions; a messageId sent to
        Segment when it is a dead letter's), newest first, without their content; each with its dead letters."""
        named = or_(events.c.source_id == key, events.c.id.in_(select(dead_letters.c.event_id).where(dead_letters.c.message_id == key)))
        return self._find(named, limit)

    def find_event(self, event_id: int) -> list[dict[str, Any]]:
        """One event's state and dead letters (as find_events), by its id; [] when there is none."""
        return self._find(events.c.id == event_id, 1) if 0 < event_id <= LARGEST_ID else []

    def _find(self, condition, limit: int) -> list[dict[str, Any]]:
        columns = [c for c in events.c if c.name not in ("event", "messages")]  # no content: states only
        with self._guard(), self.engine.connect() as conn:
            # Labelled by the code's names (source_id, not the column's name of version 1), as Claimed is.
            rows = conn.execute(select(*(c.label(c.key) for c in columns)).where(condition).order_by(events.c.id.desc()).limit(limit)).all()
            letters = conn.execute(
                select(dead_letters).where(dead_letters.c.event_id.in_([r.id for r in rows])).order_by(dead_letters.c.id)
            ).all()
        found = [dict(r._mapping) for r in rows]
        for item in found:
            item["dead_letters"] = [dict(d._mapping) for d in letters if d.event_id == item["id"]]
        return found

    def event_content(self, event_id: int) -> tuple[str, str | None, str | None, float] | None:
        """(destination, stored event JSON, generation, created_at) of one event."""
        if not 0 < event_id <= LARGEST_ID:
            return None
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(
                select(events.c.destination, events.c.event, events.c.generation, events.c.created_at).where(events.c.id == event_id)
            ).first()
        if row is None:
            return None
        return row.destination, row.event, row.generation, row.created_at
