"""How the store writes: the SQLite writer lock waited for in the kernel (never by polling), with its
timeout kept, and the webhooks' rows inserted many to a statement on the driver's cursor."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from refiner_source.directions.entry import Entry
from refiner_source.store import SEGMENT, StoreUnavailable, writing
from refiner_source.store.database import InsertMany, driver_errors
from refiner_source.store.writing import SqliteWriterLock
from tests.conftest import entry_for


def holder(path: str) -> int:
    """Another process's hold on the lock file (a descriptor of its own conflicts as one would)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_closed(fd: int, path: str) -> None:
    """Until `fd` no longer is a descriptor of the lock file at `path` (closed; its number may be reused)."""
    inode = os.stat(path).st_ino
    deadline = time.monotonic() + 10
    while True:
        try:
            if os.fstat(fd).st_ino != inode:
                return
        except OSError:
            return
        assert time.monotonic() < deadline, "the abandoned turn was never let go"
        time.sleep(0.01)


def recording_opens(lock: SqliteWriterLock) -> list[int]:
    opened: list[int] = []
    real_open = lock._open
    lock._open = lambda: opened.append(real_open()) or opened[-1]  # type: ignore[method-assign]
    return opened


def test_a_busy_writer_lock_is_waited_for_in_the_kernel_not_by_polling(tmp_path, monkeypatch):
    path = str(tmp_path / "x.db-writer.lock")
    other = holder(path)

    real_sleep = time.sleep
    slept: list[float] = []

    def no_polling(seconds: float) -> None:  # the writer thread's sleeps are polling; others' are theirs
        if threading.current_thread().name == "writer":
            slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(writing.time, "sleep", no_polling)
    lock = SqliteWriterLock(path, timeout=30)
    entered = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            with lock:
                entered.set()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failure.append(exc)

    thread = threading.Thread(target=writer, name="writer")
    thread.start()
    assert not entered.wait(0.3)  # the file is busy: no turn yet
    fcntl.flock(other, fcntl.LOCK_UN)
    assert entered.wait(10), "the turn never came after the holder let go"
    thread.join(10)
    assert failure == [] and slept == []  # it slept in the kernel, not in steps
    os.close(other)


def test_a_writer_that_gave_up_waiting_leaves_the_lock_free_once_the_holder_lets_go(tmp_path):
    path = str(tmp_path / "x.db-writer.lock")
    other = holder(path)
    lock = SqliteWriterLock(path, timeout=0.2)
    opened = recording_opens(lock)
    with pytest.raises(StoreUnavailable, match="held"):
        with lock:
            pass
    abandoned = opened[-1]  # the descriptor the waiting thread is blocked on
    fcntl.flock(other, fcntl.LOCK_UN)
    # The abandoned turn comes to the lock's waiting thread, which lets it go and closes it.
    wait_closed(abandoned, path)
    third = os.open(path, os.O_RDWR)
    fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process gets the file
    fcntl.flock(third, fcntl.LOCK_UN)
    with lock:  # and this process's next writer too
        pass
    for fd in (other, third):
        os.close(fd)


def test_writers_of_one_file_in_two_stores_never_overlap(tmp_path):
    path = str(tmp_path / "x.db-writer.lock")
    locks = [SqliteWriterLock(path), SqliteWriterLock(path)]  # two processes' locks, as flock sees them
    inside = 0
    turns = 0
    overlaps: list[int] = []
    failures: list[BaseException] = []

    def write(lock: SqliteWriterLock) -> None:
        nonlocal inside, turns
        try:
            for _ in range(200):
                with lock:
                    inside += 1
                    turns += 1
                    if inside > 1:
                        overlaps.append(inside)
                    time.sleep(0)  # let the other threads run while this one holds the file
                    inside -= 1
        except BaseException as exc:  # noqa: BLE001 - asserted below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(lock,)) for lock in locks for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a writer never got its turns"
    assert failures == [] and overlaps == [] and turns == 800
    assert any(lock.waiter is not None for lock in locks)  # some turns were waited for in the kernel


def test_a_writer_interrupted_while_waiting_gives_its_turn_up(tmp_path):
    import signal

    path = str(tmp_path / "x.db-writer.lock")
    other = holder(path)
    lock = SqliteWriterLock(path, timeout=30)
    opened = recording_opens(lock)

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt  # Ctrl-C during a backfill's store_many

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(KeyboardInterrupt):
            with lock:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fcntl.flock(other, fcntl.LOCK_UN)
    wait_closed(opened[-1], path)  # its turn came to the waiting thread, which let it go
    third = os.open(path, os.O_RDWR)
    fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for fd in (other, third):
        os.close(fd)


def test_a_group_of_rows_is_one_statement_and_reports_only_the_new(outbox):
    statements: list[str] = []
    real = outbox._insert_many._statement

    def counted(keys, count):
        statement = real(keys, count)
        statements.append(statement)
        return statement

    outbox._insert_many._statement = counted
    assert outbox.store_many([entry_for(i) for i in range(3)]) == 3
    assert len(statements) == 1 and statements[0].count("(?") + statements[0].count("(%s") == 3
    assert outbox.store_many([entry_for(i) for i in range(5)]) == 2  # 0-2 exist already
    assert outbox.stats(SEGMENT).pending == 5


def test_more_rows_than_one_statement_takes_are_all_stored(outbox):
    entries = [entry_for(i) for i in range(InsertMany.ROWS_PER_STATEMENT * 2 + 7)]
    assert outbox.store_many(entries) == len(entries)
    assert outbox.store_many(entries) == 0
    assert outbox.stats(SEGMENT).pending == len(entries)


def test_a_broken_row_raises_sqlalchemys_integrity_error_without_the_statements_values(outbox):
    good = entry_for("zq9-secret-response")
    broken = Entry(good.receipt_key, None, good.triggered_event, good.event, destination=good.destination)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError) as failed:
        outbox.store_many([broken])
    assert "[parameters:" not in str(failed.value)  # hide_parameters, as SQLAlchemy's own execute has it
    if outbox.engine.dialect.name == "sqlite":  # PostgreSQL's own message quotes the failing row
        assert "zq9-secret-response" not in str(failed.value)
    assert outbox.store_grouped(good) is True  # nothing half-written


def test_a_driver_error_goes_up_as_sqlalchemys_which_the_stores_guard_reads(outbox):
    with outbox.engine.connect() as conn, pytest.raises(DBAPIError) as failed:
        with driver_errors(conn, "SELEC 1"):
            conn.connection.driver_connection.cursor().execute("SELEC 1")
    assert isinstance(failed.value.orig, conn.dialect.loaded_dbapi.Error)
    assert not failed.value.connection_invalidated  # a bad statement, not a lost connection


def test_without_returning_the_rows_go_through_sqlalchemys_insert(outbox):
    outbox._insert_many = None  # as on a SQLite older than 3.35
    assert outbox.store_many([entry_for(1), entry_for(2)]) == 2
    assert outbox.store_grouped(entry_for(2)) is False
    assert outbox.stats(SEGMENT).pending == 2


def test_every_connection_busy_past_the_pools_timeout_is_store_unavailable_not_a_bug(outbox):
    from sqlalchemy import create_engine

    from refiner_source.store import Store

    engine = create_engine(outbox.engine.url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    box = Store(outbox.url, engine=engine)
    try:
        with engine.connect():  # the only connection, busy (a long Segment batch, say)
            with pytest.raises(StoreUnavailable, match="no database connection came free"):
                box.store_many([entry_for(1)])
        assert box.store_many([entry_for(1)]) == 1  # and once one is free, it is stored
    finally:
        box.dispose()


def test_the_statements_kept_are_bounded_whatever_the_group_sizes(outbox):
    insert_many = outbox._insert_many
    for size in range(1, InsertMany.STATEMENTS_KEPT + 9):
        outbox.store_many([entry_for(f"{size}-{i}") for i in range(size)])
    assert len(insert_many._statements) == InsertMany.STATEMENTS_KEPT
    assert outbox.stats(SEGMENT).pending == sum(range(1, InsertMany.STATEMENTS_KEPT + 9))
