"""The store's connection to its database: the engine, the SQLite writer lock, and driver errors
turned into "the store cannot serve now"; the base class every part of the store builds on."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from sqlalchemy import Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

from refiner_source.errors import RefinerSourceError

UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a table that does not exist (init-db not run)
BUSY_TIMEOUT_MS = 30000  # how long SQLite waits for a lock before the store "is not answering"
# A truncating checkpoint waits for readers still on an older snapshot: a few short tries, each with the
# writer lock held no longer than a webhook would tolerate, between which the other writers go on.
CHECKPOINT_TRIES = 5
CHECKPOINT_BUSY_MS = 1000
CHECKPOINT_PAUSE = 0.2

log = logging.getLogger(__name__)


class StoreUnavailable(Exception):
    """The database did not answer (down, locked too long, connection cut): callers answer 503."""


class StoreMisconfigured(StoreUnavailable, RefinerSourceError):
    """The database answers but cannot serve: no schema yet, a SQLite folder missing or not writable.
    str() is the whole line for the operator, with the resolved path."""


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
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("refiner_write") else "BEGIN")

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
        self._write_lock = _writer_lock(self.engine) if self.engine.dialect.name == "sqlite" else nullcontext()
        self._held: Connection | None = None  # see _write_held()
        self._held_pid = 0
        self._held_at = 0.0

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite); reads use plain connect()."""
        with self._guard(), self._write_lock, self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _write_held(self) -> Iterator[Connection]:
        """A write transaction on a connection kept between calls while they come often: for the
        webhooks' group commit (one leader at a time per process), so that each group under load skips
        the pool's checkout, its pre-ping and its reset on return (bench/README.md has what it saves).
        Idle for a second, or failed, it goes back to the
        pool, and the next call checks out one that is pinged (PostgreSQL restarted meanwhile, say)."""
        with self._guard(), self._write_lock:
            now = time.monotonic()
            if self._held is not None and (self._held_pid != os.getpid() or now - self._held_at > 1.0):
                if self._held_pid == os.getpid():
                    self._held.close()
                self._held = None  # a forked child leaves its parent's connection alone
            if self._held is None:
                self._held, self._held_pid = self._writer.connect(), os.getpid()
            conn = self._held
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._held = None
                conn.close()  # SQLAlchemy has invalidated it if the error was a lost connection
                raise
            self._held_at = time.monotonic()

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
        if self._held is not None and self._held_pid == os.getpid():
            self._held.close()
        self._held = None
        self.engine.dispose()


class _SqliteWriterLock:
    """Writers of one SQLite file take turns here, in this process (threads) and across processes
    (flock on a file beside the database), before BEGIN IMMEDIATE.

    SQLite admits one writer at a time and makes the others wait in its busy handler, which
    sleeps 1, 2, 5, 10 ... 100 ms between tries: with gunicorn's workers and the delivery worker
    all writing, they would sleep while the database was free. A lock the kernel hands to the
    next waiter at once keeps the file busy instead.
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
            deadline, pause = time.monotonic() + self.timeout, 0.00005
            while True:  # a writer stopped mid-commit (SIGSTOP) must give 503s, not a hang
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreUnavailable(f"another process held {self.path} for {self.timeout:g} s") from None
                    time.sleep(pause)  # short steps (SQLite's own go up to 100 ms)
                    pause = min(pause * 2, 0.0005)
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


def chunks(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_ignoring_conflict(dialect: str, table: Table):
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
