"""The outbox: SQLAlchemy Core tables and the only SQL in the project (store, claim, mark, stats)."""

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
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

if TYPE_CHECKING:
    from .intake import Entry  # only a type here: the outbox itself never imports the mapping

SCHEMA_VERSION = 2
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a table that does not exist (init-db not run)

metadata = MetaData()

# One row per (response, Refiner event) ever accepted: what makes a resent webhook a duplicate.
receipts = Table(
    "refiner_receipts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("receipt_key", String(600), nullable=False, unique=True),
    Column("response_id", String(255), nullable=False),
    Column("triggered_event", String(255), nullable=False),
    Column("messages", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    # v2: what replay needs to re-map a response with the current mapping file. `event` holds
    # answers, so it is cleared with the delivered messages after REFINER_RETENTION_DAYS.
    Column("form_uuid", String(255)),
    Column("occurred_at", Float),
    Column("event", Text),
    Index("ix_refiner_receipts_response", "response_id"),
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

# Upgrades of tables that exist already; create_all() makes new tables and new installs whole.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        "ALTER TABLE refiner_receipts ADD COLUMN form_uuid VARCHAR(255)",
        "ALTER TABLE refiner_receipts ADD COLUMN occurred_at FLOAT",
        "ALTER TABLE refiner_receipts ADD COLUMN event TEXT",
        "CREATE INDEX IF NOT EXISTS ix_refiner_receipts_response ON refiner_receipts (response_id)",
    ],
}

# One row per Segment message; `available_at` is both the retry time and the claim lease.
messages = Table(
    "refiner_messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(100), nullable=False),
    Column("response_id", String(255), nullable=False),
    Column("call", String(16), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False, default=PENDING),
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", Float, nullable=False),
    Column("claimed_by", String(64)),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
    Index("ix_refiner_messages_status_available", "status", "available_at"),
    Index("ix_refiner_messages_response", "response_id"),
)

schema_info = Table(
    "refiner_schema",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)


class StoreUnavailable(Exception):
    """The database did not answer (down, locked too long, connection cut): callers answer 503."""


class StoreMisconfigured(StoreUnavailable):
    """The database answers but cannot serve: no schema yet, a SQLite folder missing or not writable.
    str() is the whole line for the operator, with the resolved path."""


@dataclass(frozen=True)
class Claimed:
    id: int
    message: dict[str, Any]
    attempts: int
    response_id: str
    size: int = 0  # bytes of the message as JSON (its stored payload)


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
    pending: int
    delivered: int
    dead: int
    oldest_pending_age: float | None
    last_delivered_age: float | None = None  # since the newest delivery still kept (see retention)


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
    """Durable queue of Segment messages. Every method is one short transaction."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._writer = self.engine.execution_options(refiner_write=True)
        self._write_lock = _writer_lock(self.engine) if self.engine.dialect.name == "sqlite" else nullcontext()
        self._leader_lock = threading.Lock()
        self._waiting_lock = threading.Lock()
        self._waiting: list[_Waiting] = []

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
            for target in sorted(MIGRATIONS):
                if version is not None and version < target:
                    for statement in MIGRATIONS[target]:
                        conn.execute(text(statement))
            metadata.create_all(conn, checkfirst=True)
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

    def store(self, receipt_key: str, response_id: str, triggered_event: str, batch: Sequence[dict[str, Any]], **extra: Any) -> bool:
        """Commit one event's messages with its receipt; False (nothing written) when seen before."""
        from .intake import Entry

        return self.store_many([Entry(receipt_key, response_id, triggered_event, batch, **extra)]) == 1

    def store_many(self, entries: Sequence[Entry], backfill: tuple[str, BackfillState] | None = None) -> int:
        """Commit the entries not seen before, and where a backfill stands, in one transaction.

        `backfill` is (run key, state after this page, its `stored` counting what came before);
        the entries found new here are added to it. Returns how many were new. Only a receipt's
        ON CONFLICT makes an entry "seen before": any other integrity error is a bug to surface,
        never a reason to drop a response.
        """
        now = time.time()
        receipt_rows, message_rows = _rows(entries, now)  # prepared before the write lock
        with self._write() as conn:
            new_keys = _insert(conn, receipt_rows, message_rows)
            if backfill is not None:
                run_key, state = backfill
                self._save_backfill(conn, run_key, replace(state, stored=state.stored + len(new_keys)), now)
        return len(new_keys)

    def store_grouped(self, entry: Entry) -> bool:
        """Store one entry (True: new), committed together with whatever other threads of this
        process store meanwhile: one transaction and one fsync for all (group commit).

        The webhook's path: with SQLite's synchronous=FULL, each commit's fsync is what limits
        ingest. The group is taken only once the write lock is held, so that everything that
        arrived while the previous commit was syncing goes into this one. Each caller still
        gets its own answer, or the error.
        """
        waiting = _Waiting(entry, _rows([entry], time.time()))
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
                        # first one's rows are written, and only it can be new.
                        first = list({w.entry.receipt_key: w for w in reversed(group)}.values())
                        receipt_rows = [row for w in first for row in w.rows[0]]
                        message_rows = [row for w in first for row in w.rows[1]]
                        new_keys = _insert(conn, receipt_rows, message_rows)
                    for w in group:
                        w.result = w.entry.receipt_key in new_keys
                        new_keys.discard(w.entry.receipt_key)
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

    def known_receipts(self, keys: Sequence[str]) -> set[str]:
        """Which of these receipts exist already (for a dry run)."""
        found: set[str] = set()
        with self._guard(), self.engine.connect() as conn:
            for chunk in _chunks(keys, 500):
                found.update(conn.execute(select(receipts.c.receipt_key).where(receipts.c.receipt_key.in_(chunk))).scalars())
        return found

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

    def replay_sources(
        self, response_id: str | None = None, form_uuid: str | None = None, since: float | None = None, until: float | None = None
    ) -> Iterator[tuple[str, str | None]]:
        """(receipt key, stored event JSON or None once purged) of the receipts a replay selects,
        read 500 at a time in short transactions: a whole form's answers never sit in memory."""
        stmt = select(receipts.c.id, receipts.c.receipt_key, receipts.c.event).order_by(receipts.c.id).limit(500)
        if response_id is not None:
            stmt = stmt.where(receipts.c.response_id == response_id)
        if form_uuid is not None:
            stmt = stmt.where(receipts.c.form_uuid == form_uuid)
        if since is not None:
            stmt = stmt.where(receipts.c.occurred_at >= since)
        if until is not None:
            stmt = stmt.where(receipts.c.occurred_at < until)
        after = 0
        while True:
            with self._guard(), self.engine.connect() as conn:
                rows = conn.execute(stmt.where(receipts.c.id > after)).all()
            yield from ((r.receipt_key, r.event) for r in rows)
            if len(rows) < 500:
                return
            after = rows[-1].id

    def enqueue(self, batch: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> None:
        """Queue (response id, messages) of responses already received (replay): no receipt check."""
        now = time.time()
        rows = [_message_row(m, response_id, now) for response_id, messages in batch for m in messages]
        if not rows:
            return
        with self._write() as conn:
            conn.execute(insert(messages), rows)

    def claim(self, limit: int, lease_seconds: float, worker: str) -> list[Claimed]:
        """Take up to `limit` due messages for `lease_seconds`; no other worker gets them meanwhile.

        PostgreSQL: the row locks of FOR UPDATE SKIP LOCKED make concurrent claims disjoint.
        SQLite: BEGIN IMMEDIATE serialises writers. A worker that dies lets its lease run out.
        """
        now = time.time()
        due = (
            select(messages.c.id)
            .where(messages.c.status == PENDING, messages.c.available_at <= now)
            .order_by(messages.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            update(messages)
            .where(messages.c.id.in_(due.scalar_subquery()), messages.c.status == PENDING, messages.c.available_at <= now)
            .values(available_at=now + lease_seconds, claimed_by=worker)
            .returning(messages.c.id, messages.c.payload, messages.c.attempts, messages.c.response_id)
        )
        with self._write() as conn:
            rows = conn.execute(stmt).all()
        rows.sort(key=lambda r: r.id)
        return [Claimed(r.id, json.loads(r.payload), r.attempts, r.response_id, len(r.payload)) for r in rows]

    def mark_delivered(self, ids: Sequence[int]) -> None:
        self._set(ids, status=DELIVERED, delivered_at=time.time(), claimed_by=None, last_error=None)

    def release(self, ids: Sequence[int], delay: float, error: str) -> None:
        """Give messages back for a later attempt (retryable failure); delivered or dead ones stay so."""
        self._set(
            ids,
            only_pending=True,
            available_at=time.time() + delay,
            claimed_by=None,
            attempts=messages.c.attempts + 1,
            last_error=error[:2000],
        )

    def mark_dead(self, ids: Sequence[int], error: str) -> None:
        self._set(ids, status=DEAD, claimed_by=None, attempts=messages.c.attempts + 1, last_error=error[:2000])

    def _set(self, ids: Sequence[int], only_pending: bool = False, **values: Any) -> None:
        if not ids:
            return
        stmt = update(messages).where(messages.c.id.in_(list(ids)))
        if only_pending:
            stmt = stmt.where(messages.c.status == PENDING)
        with self._write() as conn:
            conn.execute(stmt.values(**values))

    def next_due_in(self) -> float | None:
        """Seconds until the next pending message is due (0 if one is due now), None if none is pending."""
        with self._guard(), self.engine.connect() as conn:
            first = conn.execute(select(func.min(messages.c.available_at)).where(messages.c.status == PENDING)).scalar()
        return None if first is None else max(0.0, first - time.time())

    def stats(self) -> Stats:
        with self._guard(), self.engine.connect() as conn:
            counts = dict(conn.execute(select(messages.c.status, func.count()).group_by(messages.c.status)).all())
            oldest = conn.execute(select(func.min(messages.c.created_at)).where(messages.c.status == PENDING)).scalar()
            newest = conn.execute(select(func.max(messages.c.delivered_at)).where(messages.c.status == DELIVERED)).scalar()
        now = time.time()
        return Stats(
            pending=counts.get(PENDING, 0),
            delivered=counts.get(DELIVERED, 0),
            dead=counts.get(DEAD, 0),
            oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            last_delivered_age=None if newest is None else max(0.0, now - newest),
        )

    def dead_letters(self, limit: int = 20) -> list[tuple[str, str, str | None]]:
        """(response id, message id, error) of the newest dead letters."""
        stmt = (
            select(messages.c.response_id, messages.c.message_id, messages.c.last_error)
            .where(messages.c.status == DEAD)
            .order_by(messages.c.id.desc())
            .limit(limit)
        )
        with self._guard(), self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(stmt).all()]

    def replay_dead(self) -> int:
        """Put every dead letter back in line; returns how many."""
        stmt = (
            update(messages).where(messages.c.status == DEAD).values(status=PENDING, available_at=time.time(), attempts=0, claimed_by=None)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    def purge(self, delivered_before: float, receipts_before: float) -> tuple[int, int]:
        """Delete delivered messages and old receipts, and forget old events (they hold answers).

        Dead and pending messages are never touched.
        """
        with self._write() as conn:
            messages_gone = conn.execute(
                delete(messages).where(messages.c.status == DELIVERED, messages.c.delivered_at < delivered_before)
            ).rowcount
            receipts_gone = conn.execute(delete(receipts).where(receipts.c.created_at < receipts_before)).rowcount
            conn.execute(update(receipts).where(receipts.c.created_at < delivered_before, receipts.c.event.is_not(None)).values(event=None))
        return messages_gone, receipts_gone

    def purge_dead(self, before: float) -> int:
        """Delete dead letters that died before `before` (an operator's decision, by command)."""
        stmt = delete(messages).where(messages.c.status == DEAD, messages.c.created_at < before)
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    def dispose(self) -> None:
        self.engine.dispose()

    def _guard(self):
        return _translate_errors(self.engine)


@dataclass
class _Waiting:
    """One thread's entry in store_grouped(): filled in by whichever thread commits its group."""

    entry: Entry
    rows: tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]
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


def _rows(entries: Sequence[Entry], now: float) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """(receipt rows, (receipt key, message row) pairs) of entries, ready to insert; an entry whose
    receipt comes twice is written once."""
    entries = list({e.receipt_key: e for e in reversed(entries)}.values())[::-1]
    receipt_rows = [
        {
            "receipt_key": e.receipt_key,
            "response_id": e.response_id,
            "triggered_event": e.triggered_event,
            "messages": len(e.messages),
            "created_at": now,
            "form_uuid": e.form_uuid,
            "occurred_at": e.occurred_at,
            "event": e.event,
        }
        for e in entries
    ]
    return receipt_rows, [(e.receipt_key, _message_row(m, e.response_id, now)) for e in entries for m in e.messages]


def _insert(conn: Connection, receipt_rows: list[dict[str, Any]], message_rows: list[tuple[str, dict[str, Any]]]) -> set[str]:
    """Insert the receipts not seen before and their messages; their receipt keys."""
    if not receipt_rows:
        return set()
    # executemany with RETURNING: SQLAlchemy batches it into multi-row statements from one cached
    # compilation ("insertmanyvalues"); a literal multi-VALUES insert would be compiled afresh
    # each time. A row back means inserted (rowcount is -1 on psycopg for this statement).
    stmt = _insert_ignoring_conflict(conn.dialect.name, receipts).returning(receipts.c.receipt_key)
    new_keys = set(conn.execute(stmt, receipt_rows).scalars())
    rows = [row for key, row in message_rows if key in new_keys]
    if rows:
        conn.execute(insert(messages), rows)
    return new_keys


def _message_row(message: dict[str, Any], response_id: str, now: float) -> dict[str, Any]:
    return {
        "message_id": message["messageId"],
        "response_id": response_id,
        "call": message["type"],
        # Default separators, as segment-analytics-python's post() writes the batch: the stored
        # length is then the message's exact size in the request (delivery.pack relies on it).
        "payload": json.dumps(message),
        "status": PENDING,
        "attempts": 0,
        "available_at": now,
        "created_at": now,
    }


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
