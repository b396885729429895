"""The store's connection to its database: the engine, its two ways in (a write transaction, under
the writer lock of store/writing.py; a guarded read), and driver errors turned into "the store
cannot serve now"; the base class every part of the store builds on."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from refiner_source.store.errors import StoreMisconfigured, StoreUnavailable, sqlite_file_problem
from refiner_source.store.writing import HeldWriter, writer_lock

UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a table that does not exist (init-db not run)
BUSY_TIMEOUT_MS = 30000  # how long SQLite waits for a lock before the store "is not answering"
# A truncating checkpoint waits for readers still on an older snapshot: a few short tries, each with the
# writer lock held no longer than a webhook would tolerate, between which the other writers go on.
CHECKPOINT_TRIES = 5
CHECKPOINT_BUSY_MS = 1000
CHECKPOINT_PAUSE = 0.2

log = logging.getLogger(__name__)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, write-locking transactions and secure_delete.
    Its errors never quote a statement's values (hide_parameters): they are events, and a traceback is logged."""
    if url.startswith("sqlite"):
        # A pool, not a connection per transaction: in WAL mode the last connection to close
        # checkpoints the log, which would cost every webhook a checkpoint.
        engine = create_engine(
            url, pool_size=5, max_overflow=5, hide_parameters=True, connect_args={"timeout": 30, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (SQLAlchemy's
            # documented recipe), so that writes can BEGIN IMMEDIATE: writers queue on the lock
            # at the start instead of failing to upgrade a read lock half-way.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Deleted and overwritten content is zeroed, not left in freed space: what forget and
            # retention erase must not stay readable in the file (builds differ in their default).
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get("refiner_write") else "BEGIN"
            # On the driver's connection: through exec_driver_sql it cost a tenth of a webhook's store
            # (bench/README.md). Its error goes up as SQLAlchemy's, as exec_driver_sql's would.
            with driver_errors(conn, statement):
                conn.connection.driver_connection.execute(statement)

        return engine
    # One gunicorn worker runs 4 threads: 4 connections each, a few more for bursts. With the
    # default WEB_CONCURRENCY=2 and a worker, that stays far below Heroku Postgres's 20.
    # pre_ping replaces connections a database restart has cut, so the service recovers alone.
    return create_engine(
        url,
        hide_parameters=True,
        pool_size=4,
        max_overflow=2,
        pool_pre_ping=True,
        pool_timeout=5,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )


class Database:
    """The engine and the two ways in: `_write()` for a write transaction, `_guard()` around a read.
    Every method of the store is one short transaction through one of them."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._writer = self.engine.execution_options(refiner_write=True)
        self._write_lock = writer_lock(self.engine) if self.engine.dialect.name == "sqlite" else nullcontext()
        self._held = HeldWriter(self._writer, self._guard, self._write_lock)  # the webhooks' group commit writes on it

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); reads use plain connect()."""
        with self._guard(), self._write_lock, self._writer.begin() as conn:
            yield conn

    def _guard(self):
        return _translate_errors(self.engine)

    def _scrub(self, *tables: Table) -> None:
        """Make what a committed erase cleared unreadable outside the rows too, as far as the database
        allows; called after a forget and after a retention purge that changed rows.

        SQLite (with secure_delete on, see make_engine) zeroes erased content in the pages it writes,
        but those pages go to the -wal file first, and the frames holding the old values stay there
        until SQLite happens to overwrite them: a truncating checkpoint copies the log into the
        database and empties it. It takes the writer lock, as every writer does, and waits briefly
        for readers still on an older snapshot. PostgreSQL keeps old row versions in the table's pages
        until a vacuum: `tables` are vacuumed (outside a transaction, as VACUUM must be).

        Never raises: the erase has committed, and what could not be scrubbed now is logged as a
        warning (SQLite reuses its log, PostgreSQL's autovacuum comes by)."""
        try:
            if self.engine.dialect.name == "sqlite":
                self._truncate_log()
            elif tables:
                names = ", ".join(self.engine.dialect.identifier_preparer.format_table(t) for t in tables)
                with self._guard(), self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql(f"VACUUM {names}")
        except Exception as exc:
            log.warning(
                "could not scrub the store after erasing: what was erased stays in its files until reused", extra={"error": str(exc)}
            )

    def _truncate_log(self) -> None:
        for attempt in range(CHECKPOINT_TRIES):
            if attempt:
                time.sleep(CHECKPOINT_PAUSE)  # the lock released: writers waiting go first
            with self._guard(), self._write_lock:
                raw = self.engine.raw_connection()  # under SQLAlchemy's begin, the checkpoint would run in a transaction
                try:
                    cursor = raw.cursor()
                    cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
                    try:
                        busy, _, _ = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    finally:
                        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                        cursor.close()
                finally:
                    raw.close()
            if not busy:
                return
        log.warning(
            "could not empty the SQLite log after erasing (readers kept it busy); the erased values stay in its -wal file "
            "until SQLite reuses it",
            extra={"tries": CHECKPOINT_TRIES},
        )

    def dispose(self) -> None:
        self._held.close()
        self.engine.dispose()


def chunks(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextmanager
def driver_errors(conn: Connection, statement: str) -> Iterator[None]:
    """Around a call on the driver's own connection: its error goes up as SQLAlchemy's would (the
    store's guard reads those), without the statement's values, and a connection the error shows
    lost is invalidated, so that the pool never hands it out again. (SQLAlchemy's own handler would
    also invalidate the rest of the pool; here PostgreSQL's pre-ping finds those at checkout.)"""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, conn.connection.dbapi_connection, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, dbapi.Error, hide_parameters=True, dialect=conn.dialect, connection_invalidated=lost
        ) from exc


class InsertMany:
    """INSERT of many rows in one statement (VALUES (...), (...) ... ON CONFLICT DO NOTHING RETURNING),
    run on the driver's cursor: the webhooks' group commit and a backfill's page. Through SQLAlchemy's
    execute, a group's insert cost as much CPU as the rest of the store's work for it (bench/README.md).
    The statement is made from the table's columns, once per number of rows; rows are dicts keyed
    by column key, all with the keys of the first."""

    ROWS_PER_STATEMENT = 500  # SQLite allows 32,766 values a statement, PostgreSQL 65,535
    STATEMENTS_KEPT = 32  # texts kept, the most recently made: the group sizes under load come back

    def __init__(self, dialect: Dialect, table: Table, returning: Sequence[str]) -> None:
        self.dialect = dialect
        self.table = table
        self.returning = returning
        self.placeholder = "?" if dialect.name == "sqlite" else "%s"
        self._statements: dict[tuple[tuple[str, ...], int], str] = {}

    def __call__(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """The `returning` columns of the rows inserted (not those whose key existed)."""
        if not rows:
            return []
        keys = tuple(rows[0])
        inserted: list[tuple[Any, ...]] = []
        for chunk in chunks(rows, self.ROWS_PER_STATEMENT):
            statement = self._statement(keys, len(chunk))
            values = [row[key] for row in chunk for key in keys]
            with driver_errors(conn, statement):
                cursor = conn.connection.driver_connection.cursor()
                try:
                    cursor.execute(statement, values)
                    inserted.extend(tuple(found) for found in cursor.fetchall())
                finally:
                    cursor.close()
        return inserted

    def _statement(self, keys: tuple[str, ...], count: int) -> str:
        statement = self._statements.get((keys, count))
        if statement is None:
            quote = self.dialect.identifier_preparer.quote
            columns = ", ".join(quote(self.table.c[key].name) for key in keys)
            one = "(" + ", ".join([self.placeholder] * len(keys)) + ")"
            returning = ", ".join(quote(self.table.c[key].name) for key in self.returning)
            statement = (
                f"INSERT INTO {self.dialect.identifier_preparer.format_table(self.table)} ({columns}) "
                f"VALUES {', '.join([one] * count)} ON CONFLICT DO NOTHING RETURNING {returning}"
            )
            if len(self._statements) >= self.STATEMENTS_KEPT:  # up to 500 sizes of up to 28 KB each otherwise
                del self._statements[next(iter(self._statements))]
            self._statements[(keys, count)] = statement
        return statement


def insert_ignoring_conflict(dialect: str, table: Table):
    if dialect == "postgresql":
        return postgresql_insert(table).on_conflict_do_nothing()
    return sqlite_insert(table).on_conflict_do_nothing()


class _translate_errors:
    """Turn driver errors that mean "the store cannot serve now" into StoreUnavailable.

    Connection loss, a locked or missing SQLite file, a missing table: OperationalError and
    InterfaceError, and PostgreSQL's undefined_table (SQLite says OperationalError for that); and
    the pool's TimeoutError, every connection busy for pool_timeout (a burst of Segment batches).
    A missing schema and a SQLite file that cannot be opened are StoreMisconfigured, which says
    which, with the resolved path. A DataError or IntegrityError is about what was written, and
    retrying would not help; it propagates as the bug it is.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, PoolTimeout):
            raise StoreUnavailable(f"no database connection came free: {str(exc).splitlines()[0]}") from exc
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
            raise StoreMisconfigured(sqlite_file_problem(os.path.abspath(self.engine.url.database), reason)) from exc
        if isinstance(exc, ProgrammingError):
            return False
        raise StoreUnavailable(reason) from exc
