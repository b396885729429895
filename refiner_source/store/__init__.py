"""The store: SQLAlchemy Core tables and the only SQL in the project.

One row per accepted event (its receipt, its destination, its state), written before the
answer; what the event becomes is decided when it is sent (DESIGN.md, "Two directions, one
store"). Store, claim, mark, replay, stats, retention, and where each backfill stands.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

from refiner_source.directions import REFINER as REFINER  # re-exported: the store names its destinations
from refiner_source.directions import SEGMENT

if TYPE_CHECKING:
    from refiner_source.to_segment.intake import Entry  # only a type here: the store never imports the mapping

SCHEMA_VERSION = 4
PENDING, DELIVERED, DEAD, PURGED = "pending", "delivered", "dead", "purged"
LEGACY_EVENT = "(messages kept from before version 3)"  # the rows an upgrade makes of waiting messages
UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a table that does not exist (init-db not run)

metadata = MetaData()

# One row per accepted event and destination. The row is the receipt that makes a resent
# webhook a duplicate (kept 90 days), the event as received, normalised (`event`, the answers:
# forgotten REFINER_RETENTION_DAYS after delivery), and the delivery state; `available_at` is both
# the retry time and the claim lease.
events = Table(
    "refiner_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("destination", String(32), nullable=False),
    Column("receipt_key", String(600), nullable=False),
    Column("response_id", String(255), nullable=False),
    Column("triggered_event", String(255), nullable=False),
    Column("form_uuid", String(255)),
    Column("occurred_at", Float),
    Column("message_count", Integer, nullable=False, default=0),
    Column("generation", String(32)),  # replay --new-ids: a suffix for the messageIds
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", Float, nullable=False),
    Column("claimed_by", String(255)),
    Column("created_at", Float, nullable=False),
    Column("queued_at", Float, nullable=False),  # received, or put back in line by replay: what "waiting" counts from
    Column("delivered_at", Float),
    # Whose event it is, where the destination keeps one contact's events in order (Refiner): a
    # later event of a contact waits while an earlier one waits to be retried.
    Column("contact", String(255)),
    # The long texts last: SQLite reads a row's columns in order, and the scans of stats and
    # retention stop before them.
    Column("last_error", Text),
    Column("event", Text),
    # Messages built before version 3 (a store upgraded with messages still to send): sent as they
    # are, since a version 1 store kept no event to map again.
    Column("messages", Text),
    UniqueConstraint("destination", "receipt_key", name="uq_refiner_events_receipt"),
    Index("ix_refiner_events_due", "destination", "status", "available_at"),
    Index("ix_refiner_events_settled", "status", "delivered_at"),
    Index("ix_refiner_events_response", "response_id"),
    Index("ix_refiner_events_contact", "destination", "contact", "status", "id"),  # a contact's earlier pending events
)

# The messages a destination refused for a reason of their own, one row each (an event's other
# messages are delivered); kept until replayed or purged.
dead_letters = Table(
    "refiner_dead_letters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", Integer, nullable=False),
    Column("message_id", String(100)),
    Column("call", String(32)),
    Column("error", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_refiner_dead_letters_event", "event_id"),
)

# Where each backfill (one per --since/--until/--form) stands: the next page to ask for.
backfills = Table(
    "refiner_backfills",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_key", String(600), nullable=False, unique=True),
    Column("next_cursor", Text),
    Column("next_page", Integer),
    Column("done", Integer, nullable=False, default=0),
    Column("pages", Integer, nullable=False, default=0),
    Column("seen", Integer, nullable=False, default=0),
    Column("stored", Integer, nullable=False, default=0),
    Column("updated_at", Float, nullable=False),
)

# What came in and went out, per minute: webhooks by source and outcome, deliveries by destination
# and outcome, and the webhook-to-delivery latency histogram's buckets. Every process adds its
# counts here, so the figures are the same across gunicorn's workers, the delivery worker and
# dynos. Minutes older than a day are folded into minute 0, which keeps the totals.
traffic = Table(
    "refiner_traffic",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("minute", Integer, nullable=False),  # unix time // 60; 0: everything older than a day
    Column("kind", String(16), nullable=False),  # webhook, delivery, latency
    Column("name", String(32), nullable=False),  # the source (webhook) or the destination
    Column("outcome", String(32), nullable=False),
    Column("count", BigInteger, nullable=False),  # latency sums in ms outgrow 32 bits
    UniqueConstraint("minute", "kind", "name", "outcome", name="uq_refiner_traffic"),
)

# The newest delivery error of each destination and when it happened (kept after it recovers).
last_errors = Table(
    "refiner_last_errors",
    metadata,
    Column("destination", String(32), primary_key=True),
    Column("error", Text, nullable=False),
    Column("at", Float, nullable=False),
)

# Alerts (ALERT_WEBHOOK_URL), one row per kind ("dead:segment", "stuck:refiner", ...): when one was
# last sent and what it said (`value`: the dead count alerted; 1 while a direction is alerted as
# stuck). In the store, so that every worker process and dyno keeps the 15-minute rule together;
# `version` makes each change a compare-and-set, so two workers never both send one alert.
alerts = Table(
    "refiner_alerts",
    metadata,
    Column("kind", String(64), primary_key=True),
    Column("value", Integer, nullable=False, default=0),
    Column("sent_at", Float, nullable=False, default=0.0),
    Column("version", Integer, nullable=False, default=0),
)

schema_info = Table(
    "refiner_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

# Tables of versions 1 and 2, read once by the upgrade to version 3 and then dropped.
V2_ALTERATIONS = [
    "ALTER TABLE refiner_receipts ADD COLUMN form_uuid VARCHAR(255)",
    "ALTER TABLE refiner_receipts ADD COLUMN occurred_at FLOAT",
    "ALTER TABLE refiner_receipts ADD COLUMN event TEXT",
]


class StoreUnavailable(Exception):
    """The database did not answer (down, locked too long, connection cut): callers answer 503."""


class StoreMisconfigured(StoreUnavailable):
    """The database answers but cannot serve: no schema yet, a SQLite folder missing or not writable.
    str() is the whole line for the operator, with the resolved path."""


@dataclass(frozen=True)
class Claimed:
    """An event claimed for delivery: what its destination's mapping needs."""

    id: int
    response_id: str
    event: str | None  # the stored event as JSON
    messages: list[dict[str, Any]] | None  # messages built before version 3, sent as they are
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


@dataclass(frozen=True)
class BackfillState:
    next_cursor: str | None
    next_page: int | None
    done: bool
    pages: int
    seen: int
    stored: int


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


# What replay can send again: an event kept, or a dead row of messages kept from before version 3.
_KEPT = or_(events.c.event.is_not(None), and_(events.c.messages.is_not(None), events.c.status == DEAD))


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and write-locking transactions."""
    if url.startswith("sqlite"):
        # A pool, not a connection per transaction: in WAL mode the last connection to close
        # checkpoints the log, which cost every webhook a checkpoint (measured: ~1 ms of 3.7 ms).
        engine = create_engine(url, pool_size=5, max_overflow=5, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (SQLAlchemy's
            # documented recipe), so that writes can BEGIN IMMEDIATE: writers queue on the lock
            # at the start instead of failing to upgrade a read lock half-way.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("refiner_write") else "BEGIN")

        return engine
    # One gunicorn worker runs 4 threads: 4 connections each, a few more for bursts. With the
    # default WEB_CONCURRENCY=2 and a worker, that stays far below Heroku Postgres's 20.
    # pre_ping replaces connections a database restart has cut, so the service recovers alone.
    return create_engine(
        url,
        pool_size=4,
        max_overflow=2,
        pool_pre_ping=True,
        pool_timeout=5,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )


class Outbox:
    """The durable store of accepted events. Every method is one short transaction."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._writer = self.engine.execution_options(refiner_write=True)
        self._write_lock = _writer_lock(self.engine) if self.engine.dialect.name == "sqlite" else nullcontext()
        self._leader_lock = threading.Lock()
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._insert = _insert_ignoring_conflict(self.engine.dialect.name, events).returning(events.c.destination, events.c.receipt_key)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); reads use plain connect()."""
        with self._guard(), self._write_lock, self._writer.begin() as conn:
            yield conn

    def init_schema(self) -> None:
        """Create or upgrade the tables; safe to run any number of times, also concurrently."""
        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                # serve, worker and Heroku's release phase may all start at once.
                conn.execute(text("SELECT pg_advisory_xact_lock(8127349)"))
            existing = conn.dialect.has_table(conn, schema_info.name)
            version = conn.execute(select(schema_info.c.version)).scalar() if existing else None
            metadata.create_all(conn, checkfirst=True)
            # By the tables, not only by the version: an older release started again (a rollback)
            # makes its tables anew and fills them; rolling forward takes in what they hold.
            if conn.dialect.has_table(conn, "refiner_receipts"):
                _upgrade_to_v3(conn, version or 1)
            _upgrade_to_v4(conn)
            if version is None:
                conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
            elif version < SCHEMA_VERSION:
                conn.execute(update(schema_info).values(version=SCHEMA_VERSION))

    def schema_version(self) -> int | None:
        with self._guard(), self.engine.connect() as conn:
            return conn.execute(select(schema_info.c.version)).scalar()

    def ping(self) -> None:
        with self._guard(), self.engine.connect() as conn:
            conn.execute(select(1))

    # --- storing -------------------------------------------------------------------------------

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
                    with self._write() as conn:
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

    def known_receipts(self, keys: Sequence[str], destination: str = SEGMENT) -> set[str]:
        """Which of these receipts exist already (for a dry run)."""
        found: set[str] = set()
        with self._guard(), self.engine.connect() as conn:
            for chunk in _chunks(keys, 500):
                stmt = select(events.c.receipt_key).where(events.c.destination == destination, events.c.receipt_key.in_(chunk))
                found.update(conn.execute(stmt).scalars())
        return found

    # --- backfill progress -----------------------------------------------------------------------

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

    # --- delivery --------------------------------------------------------------------------------

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
                events.c.response_id,
                events.c.event,
                events.c.messages,
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
                r.response_id,
                r.event,
                json.loads(r.messages) if r.messages else None,
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
        destination: str | None = None,
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
            if newest_error and destination is not None:
                self._record_error(conn, destination, newest_error, now)
            if delivered:
                conn.execute(
                    update(events)
                    .where(events.c.id.in_(list(delivered)), mine)
                    # Messages kept from before version 3 are done with once delivered: never sent again.
                    .values(
                        status=DELIVERED, delivered_at=now, claimed_by=None, last_error=None, attempts=events.c.attempts + 1, messages=None
                    )
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
            conn.execute(_insert_ignoring_conflict(conn.dialect.name, last_errors).values(destination=destination, **values))

    def next_due_in(self, destination: str) -> float | None:
        """Seconds until the next pending event is due (0 if one is due now), None if none is pending."""
        stmt = select(func.min(events.c.available_at)).where(events.c.destination == destination, events.c.status == PENDING)
        with self._guard(), self.engine.connect() as conn:
            first = conn.execute(stmt).scalar()
        return None if first is None else max(0.0, first - time.time())

    # --- what the operator sees and does ---------------------------------------------------------

    def stats(self, destination: str = SEGMENT) -> Stats:
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

    def dead_letters(self, limit: int = 20, destination: str = SEGMENT) -> list[tuple[str, str, str]]:
        """(response id, message id, error) of the newest dead letters."""
        stmt = (
            select(events.c.response_id, dead_letters.c.message_id, dead_letters.c.error)
            .join(events, events.c.id == dead_letters.c.event_id)
            .where(events.c.destination == destination, events.c.status == DEAD)
            .order_by(dead_letters.c.id.desc())
            .limit(limit)
        )
        with self._guard(), self.engine.connect() as conn:
            return [(r.response_id, r.message_id or "-", r.error) for r in conn.execute(stmt).all()]

    def replay_dead(self, destination: str = SEGMENT) -> int:
        """Put every dead event back in line, to be mapped again with the current mapping; how many."""
        with self._guard(), self.engine.connect() as conn:
            ids = list(conn.execute(select(events.c.id).where(events.c.destination == destination, events.c.status == DEAD)).scalars())
        return self._requeue(ids, generation=None)

    def requeue(
        self,
        response_id: str | None = None,
        form_uuid: str | None = None,
        since: float | None = None,
        until: float | None = None,
        generation: str | None = None,
        destination: str = SEGMENT,
    ) -> Requeued:
        """Put the delivered or dead events a replay selects back in line, to be mapped again (with
        `generation`, new messageIds). Pending events are left as they are: they will be mapped when
        sent anyway, and one in flight must not go out twice. Events past retention are counted, not
        queued: their answers are gone."""
        selection = [events.c.destination == destination]
        if response_id is not None:
            selection.append(events.c.response_id == response_id)
        if form_uuid is not None:
            selection.append(events.c.form_uuid == form_uuid)
        if since is not None:
            selection.append(events.c.occurred_at >= since)
        if until is not None:
            selection.append(events.c.occurred_at < until)
        with self._guard(), self.engine.connect() as conn:  # a read: no write lock while it scans
            already = conn.execute(select(func.count()).select_from(events).where(*selection, events.c.status == PENDING)).scalar()
            settled = or_(events.c.status == DEAD, and_(events.c.status == DELIVERED, events.c.triggered_event != LEGACY_EVENT))
            rows = conn.execute(select(events.c.id, _KEPT).where(*selection, settled)).all()
        ids = [r[0] for r in rows if r[1]]
        queued = self._requeue(ids, generation)
        return Requeued(matched=len(rows) + already, queued=queued, forgotten=len(rows) - len(ids), pending=already)

    def _requeue(self, ids: Sequence[int], generation: str | None) -> int:
        """Back in line, 500 to a transaction (webhooks keep their turns at the write lock)."""
        queued = 0
        for chunk in _chunks(list(ids), 500):
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
                # Still delivered or dead, and still kept (a purge may have come in between). A dead
                # row of messages kept from before version 3 is sent again as it is; an event is mapped anew.
                stmt = update(events).where(events.c.id.in_(chunk), events.c.status.in_([DELIVERED, DEAD]), _KEPT)
                queued += conn.execute(stmt.values(**values)).rowcount
                requeued = select(events.c.id).where(events.c.id.in_(chunk), events.c.status == PENDING)
                conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(requeued)))
        return queued

    def purge(self, delivered_before: float, receipts_before: float) -> tuple[int, int]:
        """Forget the answers of events delivered before `delivered_before`; delete the rows of events
        received and settled before `receipts_before` (their receipts: a resend is then accepted
        anew), never before their answers are forgotten. (forgotten, deleted). Pending and dead
        events are never touched."""
        receipts_before = min(receipts_before, delivered_before)
        done = events.c.status.in_([DELIVERED, PURGED])
        with self._write() as conn:
            forgotten = conn.execute(
                update(events)
                .where(done, events.c.delivered_at < delivered_before, or_(events.c.event.is_not(None), events.c.messages.is_not(None)))
                .values(event=None, messages=None)
            ).rowcount
            deleted = conn.execute(
                delete(events).where(done, events.c.delivered_at < receipts_before, events.c.created_at < receipts_before)
            ).rowcount
        return forgotten, deleted

    def purge_dead(self, before: float, destination: str = SEGMENT) -> int:
        """Give up on dead events that arrived before `before` (an operator's decision, by command):
        their letters and answers are deleted; the receipt stays, so a resend is still a duplicate."""
        chosen = and_(events.c.destination == destination, events.c.status == DEAD, events.c.created_at < before)
        with self._write() as conn:
            ids = list(conn.execute(select(events.c.id).where(chosen)).scalars())
            for chunk in _chunks(ids, 500):
                conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(chunk)))
                conn.execute(
                    update(events).where(events.c.id.in_(chunk)).values(status=PURGED, event=None, messages=None, delivered_at=time.time())
                )
        return len(ids)

    # --- traffic: what came in and went out ----------------------------------------------------

    def add_traffic(self, counts: dict[tuple[int, str, str, str], int]) -> None:
        """Add (minute, kind, name, outcome) -> n to the counts, in one transaction."""
        if counts:
            with self._write() as conn:
                self._add_traffic(conn, counts)

    def _add_traffic(self, conn: Connection, counts: dict[tuple[int, str, str, str], int]) -> None:
        rows = [{"minute": m, "kind": k, "name": n, "outcome": o, "count": c} for (m, k, n, o), c in sorted(counts.items())]
        insert_ = postgresql_insert(traffic) if self.engine.dialect.name == "postgresql" else sqlite_insert(traffic)
        stmt = insert_.on_conflict_do_update(
            index_elements=["minute", "kind", "name", "outcome"], set_={"count": traffic.c.count + insert_.excluded.count}
        )
        conn.execute(stmt, rows)

    def traffic_totals(self, since_minute: int | None = None) -> dict[tuple[str, str, str], int]:
        """(kind, name, outcome) -> count, since ever or since a minute."""
        stmt = select(traffic.c.kind, traffic.c.name, traffic.c.outcome, func.sum(traffic.c.count)).group_by(
            traffic.c.kind, traffic.c.name, traffic.c.outcome
        )
        if since_minute is not None:
            stmt = stmt.where(traffic.c.minute >= since_minute)
        with self._guard(), self.engine.connect() as conn:
            return {(k, n, o): int(c) for k, n, o, c in conn.execute(stmt).all()}

    def traffic_per_minute(self, kind: str, name: str, outcomes: Sequence[str], since_minute: int) -> dict[int, int]:
        """minute -> count of these outcomes, for one kind and name, since a minute (a chart's points)."""
        stmt = (
            select(traffic.c.minute, func.sum(traffic.c.count))
            .where(traffic.c.kind == kind, traffic.c.name == name, traffic.c.outcome.in_(list(outcomes)), traffic.c.minute >= since_minute)
            .group_by(traffic.c.minute)
        )
        with self._guard(), self.engine.connect() as conn:
            return {int(m): int(c) for m, c in conn.execute(stmt).all()}

    def fold_traffic(self, before_minute: int) -> int:
        """Fold the minutes before `before_minute` into minute 0 (totals stay, the detail goes); rows folded."""
        with self._write() as conn:
            # What this transaction deleted is what it adds: two workers folding at once never add twice.
            gone = conn.execute(
                delete(traffic)
                .where(traffic.c.minute > 0, traffic.c.minute < before_minute)
                .returning(traffic.c.kind, traffic.c.name, traffic.c.outcome, traffic.c.count)
            ).all()
            totals: dict[tuple[int, str, str, str], int] = {}
            for kind, name, outcome, count in gone:
                totals[(0, kind, name, outcome)] = totals.get((0, kind, name, outcome), 0) + int(count)
            if totals:
                self._add_traffic(conn, totals)
        return len(gone)

    def last_error(self, destination: str = SEGMENT) -> tuple[str | None, float | None]:
        """The newest delivery error of a destination (a retry or a dead letter) and when, even if it recovered since."""
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(select(last_errors.c.error, last_errors.c.at).where(last_errors.c.destination == destination)).first()
        return (row.error, row.at) if row else (None, None)

    def find_events(self, key: str, limit: int = 20) -> list[dict[str, Any]]:
        """The events a response id or a Segment messageId names (both directions; a messageId sent to
        Segment when it is a dead letter's), newest first, without their content; each with its dead letters."""
        named = or_(events.c.response_id == key, events.c.id.in_(select(dead_letters.c.event_id).where(dead_letters.c.message_id == key)))
        return self._find(named, limit)

    def find_event(self, event_id: int) -> list[dict[str, Any]]:
        """One event's state and dead letters (as find_events), by its id; [] when there is none."""
        return self._find(events.c.id == event_id, 1)

    def _find(self, condition, limit: int) -> list[dict[str, Any]]:
        columns = [c for c in events.c if c.name not in ("event", "messages")]
        with self._guard(), self.engine.connect() as conn:
            rows = conn.execute(select(*columns).where(condition).order_by(events.c.id.desc()).limit(limit)).all()
            letters = conn.execute(
                select(dead_letters).where(dead_letters.c.event_id.in_([r.id for r in rows])).order_by(dead_letters.c.id)
            ).all()
        found = [dict(r._mapping) for r in rows]
        for item in found:
            item["dead_letters"] = [dict(d._mapping) for d in letters if d.event_id == item["id"]]
        return found

    def event_content(self, event_id: int) -> tuple[str, str | None, list[dict[str, Any]] | None, str | None, float] | None:
        """(destination, stored event JSON, messages kept from before version 3, generation, created_at) of one event."""
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(
                select(events.c.destination, events.c.event, events.c.messages, events.c.generation, events.c.created_at).where(
                    events.c.id == event_id
                )
            ).first()
        if row is None:
            return None
        return row.destination, row.event, json.loads(row.messages) if row.messages else None, row.generation, row.created_at

    # --- alerts ---

    def alert_states(self, kinds: Sequence[str]) -> dict[str, tuple[int, float, int]]:
        """kind -> (value, sent_at, version) of these alert kinds; a kind never changed is (0, 0.0, 0)."""
        with self._guard(), self.engine.connect() as conn:
            stmt = select(alerts.c.kind, alerts.c.value, alerts.c.sent_at, alerts.c.version).where(alerts.c.kind.in_(list(kinds)))
            found = {r.kind: (r.value, r.sent_at, r.version) for r in conn.execute(stmt)}
        return {kind: found.get(kind, (0, 0.0, 0)) for kind in kinds}

    def swap_alerts(self, changes: dict[str, tuple[int, int, float]]) -> bool:
        """Compare and set, all or nothing: each kind -> (version read, new value, new sent_at). Done,
        and True, only if no kind changed since it was read (another worker got there first: False).

        How a worker takes the right to send an alert: the rows are locked (FOR UPDATE on PostgreSQL,
        BEGIN IMMEDIATE on SQLite) while their versions are compared, so of two workers that read the
        same state, exactly one moves it."""
        kinds = sorted(changes)  # one order for every worker: no deadlock between two swaps
        with self._write() as conn:
            for kind in kinds:  # a row to lock, for the kinds never changed before (version 0)
                conn.execute(_insert_ignoring_conflict(conn.dialect.name, alerts).values(kind=kind, value=0, sent_at=0.0, version=0))
            rows = conn.execute(
                select(alerts.c.kind, alerts.c.version).where(alerts.c.kind.in_(kinds)).order_by(alerts.c.kind).with_for_update()
            ).all()
            if {r.kind: r.version for r in rows} != {kind: changes[kind][0] for kind in kinds}:
                return False
            for kind in kinds:
                version, value, sent_at = changes[kind]
                conn.execute(update(alerts).where(alerts.c.kind == kind).values(value=value, sent_at=sent_at, version=version + 1))
        return True

    def dispose(self) -> None:
        self.engine.dispose()

    def _guard(self):
        return _translate_errors(self.engine)


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["destination"], row["receipt_key"]


def _row(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "destination": entry.destination,
        "receipt_key": entry.receipt_key,
        "response_id": entry.response_id,
        "triggered_event": entry.triggered_event,
        "form_uuid": entry.form_uuid,
        "occurred_at": entry.occurred_at,
        "event": entry.event,
        "messages": None,
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


def _upgrade_to_v3(conn: Connection, version: int) -> None:
    """Versions 1 and 2 kept a receipt per event and a row per Segment message. Each receipt becomes
    an event row (delivered: it is the receipt, and replay's source); the messages not yet
    delivered become event rows of their own, one per response and state, which send exactly the
    stored messages (pending) or hold them as dead letters with their errors (dead). Then the old
    tables go, in the same transaction. Safe to repeat: what is there already is kept."""
    if version < 2:
        for statement in V2_ALTERATIONS:
            conn.execute(text(statement))
    conn.execute(
        text(
            "INSERT INTO refiner_events (destination, receipt_key, response_id, triggered_event, form_uuid, occurred_at, event,"
            " message_count, status, attempts, available_at, created_at, queued_at, delivered_at)"
            " SELECT :segment, receipt_key, response_id, triggered_event, form_uuid, occurred_at, event,"
            " messages, :delivered, 0, created_at, created_at, created_at, created_at FROM refiner_receipts"
            " WHERE 1 = 1"  # SQLite reads ON CONFLICT after a bare FROM as a join's; the WHERE ends the SELECT
            " ON CONFLICT (destination, receipt_key) DO NOTHING"
        ),
        {"segment": SEGMENT, "delivered": DELIVERED},
    )
    has_messages = conn.dialect.has_table(conn, "refiner_messages")
    legacy = (
        conn.execute(
            text(
                "SELECT id, message_id, response_id, call, payload, status, attempts, last_error, created_at"
                " FROM refiner_messages WHERE status IN (:pending, :dead) ORDER BY id"
            ),
            {"pending": PENDING, "dead": DEAD},
        ).all()
        if has_messages
        else []
    )
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in legacy:
        groups.setdefault((row.response_id, row.status), []).append(row)
    now = time.time()
    for (response_id, status), rows in groups.items():
        event_id = conn.execute(
            _insert_ignoring_conflict(conn.dialect.name, events)
            .values(
                destination=SEGMENT,
                receipt_key=f"v2 {status} messages\n{response_id}\n{rows[0].id}",
                response_id=response_id,
                triggered_event=LEGACY_EVENT,
                messages="[" + ",".join(r.payload for r in rows) + "]",
                message_count=len(rows),
                status=status,
                attempts=max(r.attempts for r in rows),
                available_at=now,
                created_at=min(r.created_at for r in rows),
                queued_at=min(r.created_at for r in rows),
                last_error=rows[-1].last_error,
            )
            .returning(events.c.id)
        ).scalar()
        if status == DEAD and event_id is not None:
            conn.execute(
                insert(dead_letters),
                [
                    {"event_id": event_id, "message_id": r.message_id, "call": r.call, "error": r.last_error or "dead", "created_at": now}
                    for r in rows
                ],
            )
    if has_messages:
        conn.execute(text("DROP TABLE refiner_messages"))
    conn.execute(text("DROP TABLE refiner_receipts"))


def _upgrade_to_v4(conn: Connection) -> None:
    """Version 4 adds the contact of an event (Segment to Refiner keeps each contact's order)."""
    columns = {c["name"] for c in inspect(conn).get_columns(events.name)}
    if "contact" not in columns:
        conn.execute(text("ALTER TABLE refiner_events ADD COLUMN contact VARCHAR(255)"))
    for index in events.indexes:
        index.create(conn, checkfirst=True)


@dataclass
class _Waiting:
    """One thread's entry in store_grouped(): filled in by whichever thread commits its group."""

    entry: Entry
    row: dict[str, Any]
    done: bool = False
    result: bool = False
    error: BaseException | None = None


class _SqliteWriterLock:
    """Writers of one SQLite file take turns here, in this process (threads) and across processes
    (flock on a file beside the database), before BEGIN IMMEDIATE.

    SQLite admits one writer at a time and makes the others wait in its busy handler, which
    sleeps 1, 2, 5, 10 ... 100 ms between tries: with gunicorn's workers and the delivery worker
    all writing, they slept while the database was free (measured: 270 webhooks/s, p99 860 ms).
    A lock the kernel hands to the next waiter at once keeps the file busy instead.
    """

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout  # as SQLite's own busy timeout: then the store "is not answering"
        self._reset()

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.threads = threading.Lock()
        self.fd: int | None = None  # opened on first use, in the process that uses it

    def __enter__(self) -> None:
        if self.pid != os.getpid():  # forked: the parent's descriptor would share its lock
            self._reset()
        if not self.threads.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"no turn to write to the database within {self.timeout:g} s")
        try:
            if self.fd is None:
                try:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError as exc:  # the database's folder is missing or not writable
                    raise StoreMisconfigured(_sqlite_file_problem(self.path, exc.strerror, "writer lock file")) from exc
            deadline, pause = time.monotonic() + self.timeout, 0.0002
            while True:  # a writer stopped mid-commit (SIGSTOP) must give 503s, not a hang
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreUnavailable(f"another process held {self.path} for {self.timeout:g} s") from None
                    time.sleep(pause)  # short steps (SQLite's own go up to 100 ms)
                    pause = min(pause * 2, 0.002)
        except BaseException:
            self.threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.threads.release()


def _writer_lock(engine: Engine) -> _SqliteWriterLock:
    return _SqliteWriterLock(os.path.abspath(engine.url.database) + "-writer.lock")


def _chunks(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert_ignoring_conflict(dialect: str, table: Table):
    if dialect == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    return sqlite_insert(table).on_conflict_do_nothing()


class _translate_errors:
    """Turn driver errors that mean "the store cannot serve now" into StoreUnavailable.

    Connection loss, a locked or missing SQLite file, a missing table: OperationalError and
    InterfaceError, and PostgreSQL's undefined_table (SQLite says OperationalError for that).
    A missing schema and a SQLite file that cannot be opened are StoreMisconfigured, which says
    which, with the resolved path. A DataError or IntegrityError is about what was written, and
    retrying would not help; it propagates as the bug it is.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not isinstance(exc, (OperationalError, InterfaceError, ProgrammingError)):
            return False
        reason = ((str(exc.orig) if exc.orig else str(exc)).strip().splitlines() or [repr(exc)])[0]
        sqlite = self.engine.dialect.name == "sqlite"
        if getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE or (sqlite and reason.startswith("no such table")):
            where = os.path.abspath(self.engine.url.database) if sqlite else self.engine.url.render_as_string(hide_password=True)
            raise StoreMisconfigured(
                f"the database at {where} has no refiner-source tables ({reason}): run `refiner-source init-db`, "
                "or check that DATABASE_URL names the right database"
            ) from exc
        if sqlite and "unable to open database file" in reason:
            raise StoreMisconfigured(_sqlite_file_problem(os.path.abspath(self.engine.url.database), reason)) from exc
        if isinstance(exc, ProgrammingError):
            return False
        raise StoreUnavailable(reason) from exc


def _sqlite_file_problem(path: str, reason: str, what: str = "SQLite database") -> str:
    """Why the file at `path` (the database, or its writer lock beside it) cannot be opened, as one line
    naming the folder or file at fault."""
    folder = os.path.dirname(path) or "."
    if not os.path.exists(folder):
        return f"the folder {folder} does not exist, so the {what} {path} cannot be created (check DATABASE_URL, or create it)"
    if not os.path.isdir(folder):
        return f"{folder} is not a folder, so the {what} {path} cannot be created there (check DATABASE_URL)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (
            f"the folder {folder} is not writable by this user, so the {what} {path} cannot be written "
            "(SQLite writes its database, -wal, -shm and writer lock files there)"
        )
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"the {what} {path} is not readable and writable by this user"
    return f"cannot open the {what} {path}: {reason}"
