"""Erasing a person, and the suppression list: every stored event that concerns them (both
directions, any state) erased in one transaction, their hashes added in the same one; the list read
by each process, and counted for the operator.

The store knows no direction: the caller says which rows may concern the person (LIKE patterns on
the stored JSON, values of the contact column) and which of those really do (`concerns`, on the
parsed event). An erased event keeps its row as a bare receipt, as retention and purge-dead leave
one: every column that could hold personal data (the event, the contact, the last
error) is cleared, its dead letters are deleted, and its state becomes purged, so that it is never
sent, replayed or shown, a resent webhook is still a duplicate, and the row goes with the other
receipts after 90 days.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.engine import Connection

from refiner_source.store.database import Database, chunks, insert_ignoring_conflict
from refiner_source.store.tables import PENDING, PURGED, dead_letters, events, last_errors, suppressed

LIKE_ESCAPE = "!"
# How much earlier than an erase's read a row still being written may have been made: a webhook's row
# is made before it waits for the write lock, which it waits for 30 s at most.
STORED_MARGIN_SECONDS = 60.0
ERASED_ERROR = "(this error's text named a person since forgotten: erased)"

# (destination, stored event JSON) -> whether it concerns the person
Concerns = Callable[[str, str | None], bool]


@dataclass
class Erased:
    """What was (or, in a dry run, would be) erased of one direction: events (any state), the dead
    letters among them (messages refused), and the events still waiting to be sent (pending, or
    claimed by a worker)."""

    events: int = 0
    dead_letters: int = 0
    waiting: int = 0
    ids: list[int] = field(default_factory=list, repr=False)


class Suppression(Database):
    """Erase a person's events and keep their hashes; read the list."""

    def erase_person(
        self,
        patterns: Sequence[str],
        contacts: Collection[str],
        concerns: Concerns,
        *,
        hashes: Collection[tuple[str, str]] = (),
        key_id: str | None = None,
        dry_run: bool = False,
        mentions: Callable[[str], bool] = lambda text: False,
    ) -> dict[str, Erased]:
        """Erase every event that concerns a person (and a destination's last error whose text
        `mentions` them), and add `hashes` ((kind, hash) made with the key
        `key_id`) to the suppression list, in one transaction; destination -> what was erased.

        The events are found, and checked exactly, by a read (on SQLite webhooks keep writing
        meanwhile: the write lock is held only for what follows). The write transaction then checks
        the rows stored since the read began, with a margin for a webhook whose row was made before
        (row ids are no guide: on PostgreSQL a later id may commit first), and erases. Then the old values
        are scrubbed from the database's files (Database._scrub). A dry run only reads."""
        prefilter = or_(
            *(events.c.event.ilike(p, escape=LIKE_ESCAPE) for p in patterns),
            events.c.contact.in_(list(contacts)),
        )
        columns = (events.c.id, events.c.destination, events.c.status, events.c.event, events.c.contact)

        def chosen(rows) -> dict[int, str]:
            return {r.id: r.destination for r in rows if r.contact in contacts or concerns(r.destination, r.event)}

        read_started = time.time()
        with self._guard(), self.engine.connect() as conn:
            found = chosen(conn.execute(select(*columns).where(prefilter)))
            if dry_run:
                return self._tally(conn, found)
        with self._write() as conn:
            recent = select(*columns).where(prefilter, events.c.created_at >= read_started - STORED_MARGIN_SECONDS)
            found.update(chosen(conn.execute(recent)))
            erased = self._tally(conn, found)
            self._erase(conn, sorted(found))
            self._suppress(conn, hashes, key_id)
            for row in conn.execute(select(last_errors.c.destination, last_errors.c.error)).all():
                if mentions(row.error):  # a destination's answer may quote what it was sent
                    conn.execute(update(last_errors).where(last_errors.c.destination == row.destination).values(error=ERASED_ERROR))
        self._scrub(events, dead_letters, last_errors)  # the tables written above
        return erased

    def _tally(self, conn: Connection, found: dict[int, str]) -> dict[str, Erased]:
        """What erasing these events (id -> destination) erases, by destination, as they stand now."""
        erased: dict[str, Erased] = {}
        for chunk in chunks(sorted(found), 500):
            for row in conn.execute(select(events.c.id, events.c.destination, events.c.status).where(events.c.id.in_(chunk))):
                counts = erased.setdefault(row.destination, Erased())
                counts.events += 1
                counts.waiting += row.status == PENDING
                counts.ids.append(row.id)
        for counts in erased.values():
            counts.dead_letters = self._dead_letters_of(conn, counts.ids)
        return erased

    def _dead_letters_of(self, conn: Connection, ids: list[int]) -> int:
        total = 0
        for chunk in chunks(ids, 500):
            stmt = select(func.count()).select_from(dead_letters).where(dead_letters.c.event_id.in_(chunk))
            total += conn.execute(stmt).scalar() or 0
        return total

    def _erase(self, conn: Connection, ids: list[int]) -> None:
        now = time.time()
        for chunk in chunks(ids, 500):
            conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(chunk)))
            conn.execute(
                update(events)
                .where(events.c.id.in_(chunk))
                .values(
                    status=PURGED,
                    event=None,
                    contact=None,
                    last_error=None,
                    claimed_by=None,
                    delivered_at=func.coalesce(events.c.delivered_at, now),
                )
            )

    def _suppress(self, conn: Connection, hashes: Collection[tuple[str, str]], key_id: str | None) -> None:
        if hashes and key_id:
            insert = insert_ignoring_conflict(conn.dialect.name, suppressed)
            now = time.time()
            conn.execute(insert, [{"kind": kind, "hash": digest, "key_id": key_id, "created_at": now} for kind, digest in sorted(hashes)])

    def drop_claimed(self, ids: Sequence[int], worker: str) -> int:
        """Erase events a delivery worker claimed and found to be of a suppressed person, as erase_person
        does; only while `worker` still holds them. How many."""
        with self._write() as conn:
            mine = list(
                conn.execute(
                    select(events.c.id).where(events.c.id.in_(list(ids)), events.c.claimed_by == worker, events.c.status == PENDING)
                ).scalars()
            )
            self._erase(conn, mine)
        return len(mine)

    def unsuppress(self, hashes: Collection[tuple[str, str]]) -> int:
        """Take these (kind, hash) off the list, whatever key made them (a hash is of one key). How many rows went."""
        removed = 0
        with self._write() as conn:
            for kind, digest in sorted(hashes):
                removed += conn.execute(delete(suppressed).where(suppressed.c.kind == kind, suppressed.c.hash == digest)).rowcount
        return removed

    def suppressed_hashes(self, key_id: str | None) -> tuple[set[tuple[str, str]], int]:
        """((kind, hash) made with the key `key_id`, how many people were suppressed with another key)."""
        with self._guard(), self.engine.connect() as conn:
            rows = conn.execute(select(suppressed.c.kind, suppressed.c.hash, suppressed.c.key_id, suppressed.c.created_at)).all()
        stale = {(r.key_id, r.created_at) for r in rows if r.key_id != key_id}
        return {(r.kind, r.hash) for r in rows if r.key_id == key_id}, len(stale)

    def suppression_version(self) -> tuple[int, float]:
        """What changes whenever the list does (a row added or taken off): (rows, newest row's time).
        One aggregate over the list: what a delivery round asks before each claim is sent."""
        with self._guard(), self.engine.connect() as conn:
            count, newest = conn.execute(select(func.count(), func.max(suppressed.c.created_at))).one()
        return int(count), float(newest or 0.0)

    def suppression_counts(self, key_id: str | None) -> tuple[int, int]:
        """(people suppressed with the key `key_id`, with another key). A person is what one `forget`
        added (its identifiers share the time they were added)."""
        people = select(suppressed.c.key_id, suppressed.c.created_at).distinct().subquery()
        stmt = select(people.c.key_id, func.count()).group_by(people.c.key_id)
        with self._guard(), self.engine.connect() as conn:
            counts = {k: int(n) for k, n in conn.execute(stmt).all()}
        current = counts.pop(key_id, 0) if key_id else 0
        return current, sum(counts.values())
