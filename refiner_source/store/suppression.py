"""Erasing a person, and the suppression list: every stored event that concerns them (both
directions, any state) erased in one transaction, their hashes added in the same one; the list read
by each process, and counted for the operator.

The store knows no direction: the caller says which rows may concern the person (LIKE patterns on
the stored JSON, values of the contact column) and which of those really do (`concerns`, on the
parsed event). An erased event keeps its row as a bare receipt, as retention and purge-dead leave
one: every column that could hold personal data (the event, kept messages, the contact, the last
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
from refiner_source.store.tables import PENDING, PURGED, dead_letters, events, suppressed

LIKE_ESCAPE = "!"

# (destination, stored event JSON, messages kept from before version 3) -> whether it concerns the person
Concerns = Callable[[str, str | None, str | None], bool]


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
    ) -> dict[str, Erased]:
        """Erase every event that concerns a person, and add `hashes` ((kind, hash) made with the key
        `key_id`) to the suppression list, in one transaction; destination -> what was erased.

        The candidates are found first by a read (on SQLite, webhooks keep writing meanwhile); the
        write transaction then checks them again and takes in the rows stored since."""
        prefilter = or_(
            *(column.ilike(p, escape=LIKE_ESCAPE) for p in patterns for column in (events.c.event, events.c.messages)),
            events.c.contact.in_(list(contacts)),
        )
        columns = (events.c.id, events.c.destination, events.c.status, events.c.event, events.c.messages, events.c.contact)
        with self._guard(), self.engine.connect() as conn:
            last = conn.execute(select(func.max(events.c.id))).scalar() or 0
            candidates = [r.id for r in conn.execute(select(events.c.id).where(prefilter, events.c.id <= last)).all()]
        with self._write() as conn:
            rows = []
            for chunk in chunks(candidates, 500):
                rows += conn.execute(select(*columns).where(events.c.id.in_(chunk))).all()
            rows += conn.execute(select(*columns).where(prefilter, events.c.id > last)).all()
            chosen = [r for r in rows if r.contact in contacts or concerns(r.destination, r.event, r.messages)]
            erased: dict[str, Erased] = {}
            for row in chosen:
                counts = erased.setdefault(row.destination, Erased())
                counts.events += 1
                counts.waiting += row.status == PENDING
                counts.ids.append(row.id)
            for counts in erased.values():
                counts.dead_letters = self._dead_letters_of(conn, counts.ids)
            if not dry_run:
                self._erase(conn, [r.id for r in chosen])
                self._suppress(conn, hashes, key_id)
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
                    messages=None,
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

    def suppression_counts(self, key_id: str | None) -> tuple[int, int]:
        """(people suppressed with the key `key_id`, with another key). A person is what one `forget`
        added (its identifiers share the time they were added)."""
        people = select(suppressed.c.key_id, suppressed.c.created_at).distinct().subquery()
        stmt = select(people.c.key_id, func.count()).group_by(people.c.key_id)
        with self._guard(), self.engine.connect() as conn:
            counts = {k: int(n) for k, n in conn.execute(stmt).all()}
        current = counts.pop(key_id, 0) if key_id else 0
        return current, sum(counts.values())
