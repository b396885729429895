"""The store on SQLite and PostgreSQL: one row per event, duplicates, exclusive claims, leases, dead letters,
replay, retention (and that what it forgets leaves no byte in a SQLite store's files), and the schema's migrations."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from refiner_source.config import normalize_database_url
from refiner_source.store import (
    REFINER,
    SEGMENT,
    DeadLetter,
    Entry,
    Store,
    StoreMisconfigured,
    StoreUnavailable,
    events,
    head_revision,
    metadata,
)
from tests.conftest import dead_row_versions, entry_for


def store(outbox: Store, *ids) -> None:
    assert outbox.store_many([entry_for(i) for i in ids]) == len(ids)


def test_store_commits_one_row_per_event_with_its_receipt(outbox):
    assert outbox.store_grouped(entry_for(1)) is True
    stats = outbox.stats(SEGMENT)
    assert (stats.pending, stats.delivered, stats.dead) == (1, 0, 0)
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age < 60
    with outbox.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM refiner_events").scalar() == 1


def test_store_of_a_receipt_seen_before_writes_nothing(outbox):
    store(outbox, 1)
    assert outbox.store_grouped(entry_for(1)) is False
    assert outbox.store_many([entry_for(1)]) == 0
    assert outbox.stats(SEGMENT).pending == 1


def test_claim_is_exclusive_until_the_lease_runs_out(outbox, monkeypatch):
    store(outbox, 1, 2)
    first = outbox.claim(SEGMENT, 10, lease_seconds=60, worker="a")
    assert [c.source_id for c in first] == ["r1", "r2"] and all(c.event for c in first)
    assert outbox.claim(SEGMENT, 10, 60, "b") == []
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)  # worker "a" died: its lease runs out
    assert len(outbox.claim(SEGMENT, 10, 60, "b")) == 2
    assert outbox.claim("elsewhere", 10, 60, "c") == []  # claims are per destination


def test_concurrent_claims_never_share_an_event(outbox, settings):
    store(outbox, *range(300))
    seen: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        box = Store(settings.database_url)
        while batch := box.claim(SEGMENT, 7, 60, name):
            with lock:
                seen.extend(c.id for c in batch)
            box.settle(name, delivered=[c.id for c in batch], destination=SEGMENT)
        box.dispose()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 300 and len(set(seen)) == 300
    assert outbox.stats(SEGMENT).delivered == 300


def test_release_makes_events_due_again_after_the_delay(outbox, monkeypatch):
    store(outbox, 1)
    (claimed,) = outbox.claim(SEGMENT, 10, 60, "a")
    outbox.settle("a", released=[claimed.id], delay=30, error="HTTP 503", destination=SEGMENT)
    assert outbox.claim(SEGMENT, 10, 60, "a") == []
    assert 25 < outbox.next_due_in(SEGMENT) <= 30
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 31)
    (again,) = outbox.claim(SEGMENT, 10, 60, "a")
    assert again.attempts == 1


def test_settle_only_while_the_worker_still_holds_the_claim(outbox, monkeypatch):
    store(outbox, 1)
    (claimed,) = outbox.claim(SEGMENT, 10, 60, "slow")
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    (taken,) = outbox.claim(SEGMENT, 10, 60, "other")  # the lease ran out: another worker has it
    outbox.settle("slow", delivered=[claimed.id], destination=SEGMENT)  # late: changes nothing
    assert outbox.stats(SEGMENT).pending == 1
    outbox.settle("other", delivered=[taken.id], destination=SEGMENT)
    assert outbox.stats(SEGMENT).delivered == 1


def test_dead_letters_are_kept_and_replay_puts_their_events_back(outbox):
    store(outbox, 1, 2)
    a, b = outbox.claim(SEGMENT, 10, 60, "w")
    outbox.settle(
        "w",
        delivered=[b.id],
        dead=[DeadLetter(a.id, "refiner-r1-completed-survey-group", "group", "HTTP 400 invalid: bad")],
        destination=SEGMENT,
    )
    stats = outbox.stats(SEGMENT)
    assert (stats.pending, stats.delivered, stats.dead) == (0, 1, 1)
    assert outbox.dead_letters(destination=SEGMENT) == [("r1", "refiner-r1-completed-survey-group", "HTTP 400 invalid: bad")]
    assert outbox.replay_dead(destination=SEGMENT) == 1
    assert outbox.dead_letters(destination=SEGMENT) == []
    (again,) = outbox.claim(SEGMENT, 10, 60, "w")
    assert again.id == a.id and again.attempts == 0


def test_requeue_selects_by_response_form_and_time_with_a_new_generation(outbox):
    store(outbox, 1, 2)
    for claimed in outbox.claim(SEGMENT, 10, 60, "w"):
        outbox.settle("w", delivered=[claimed.id], destination=SEGMENT)
    result = outbox.requeue(source_id="r2", generation="r123", destination=SEGMENT)
    assert (result.matched, result.queued, result.forgotten) == (1, 1, 0)
    (again,) = outbox.claim(SEGMENT, 10, 60, "w")
    assert again.source_id == "r2" and again.generation == "r123"
    assert outbox.requeue(source_id="nobody", destination=SEGMENT).matched == 0
    occurred = entry_for(1).occurred_at
    assert outbox.requeue(since=occurred + 1, destination=SEGMENT).matched == 0
    assert outbox.requeue(since=occurred, until=occurred + 1, destination=SEGMENT).matched == 2


def test_init_schema_is_safe_to_run_twice(outbox):
    outbox.init_schema()
    outbox.init_schema()
    assert outbox.stats(SEGMENT).pending == 0 and outbox.schema_version() == head_revision()


# Each process connects, says "ready", and waits for a line on stdin: they all begin init_schema at once.
INIT_SCHEMA_PROCESS = """
import sys
from refiner_source.store import Store
box = Store(sys.argv[1])
box.engine.connect().close()  # connected first, so that what races is init_schema itself
print("ready", flush=True)
sys.stdin.readline()
box.init_schema()
box.dispose()
print("done", flush=True)
"""


def test_init_schema_run_concurrently_by_several_processes_is_safe(store_url):
    """serve, worker and Heroku's release phase are separate processes that may all start at once."""
    url = normalize_database_url(store_url)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", INIT_SCHEMA_PROCESS, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    try:
        deadline = time.monotonic() + 60
        for process in processes:
            ready, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "a process did not get ready in time"
            line = process.stdout.readline().strip()
            if line != "ready":  # it ended before it was ready: what it said
                process.wait(10)
                raise AssertionError(f"a process ended before it was ready ({process.returncode}): {process.stderr.read()}")
        for process in processes:  # the start signal, to all as nearly together as can be
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [p.returncode for p in processes] == [0] * 6, [_last_error(err) for _, err in results if err.strip()]
    assert all(out.strip() == "done" for out, _ in results)
    box = Store(url)
    try:
        with box.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT id, version FROM refiner_schema").all() == [(1, 5)]
            assert conn.exec_driver_sql("SELECT version_num FROM refiner_alembic_version").all() == [(head_revision(),)]
        assert box.store_many([entry_for(1)]) == 1 and box.stats(SEGMENT).pending == 1
    finally:
        box.dispose()


def _last_error(stderr: str) -> str:
    """The line of a traceback that says what went wrong (the exception's, not SQLAlchemy's link)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("(Background on this error")]
    errors = [line for line in lines if "Error" in line.split(":", 1)[0]]
    return (errors or lines or [""])[-1][:300]


def test_purge_forgets_answers_then_receipts_but_never_touches_pending_or_dead(outbox):
    store(outbox, "delivered", "dead", "pending")
    delivered, dead, _pending = outbox.claim(SEGMENT, 3, 60, "w")
    outbox.settle(
        "w", delivered=[delivered.id], dead=[DeadLetter(dead.id, None, None, "HTTP 400")], released=[_pending.id], destination=SEGMENT
    )
    assert outbox.purge(delivered_before=time.time() - 60, receipts_before=time.time() - 60) == (0, 0)
    assert outbox.purge(delivered_before=time.time() + 1, receipts_before=time.time() - 60) == (1, 0)  # answers forgotten
    assert outbox.requeue(source_id="rdelivered", destination=SEGMENT).forgotten == 1
    assert outbox.purge(delivered_before=time.time() + 1, receipts_before=time.time() + 1) == (0, 1)  # receipt gone
    assert outbox.store_many([entry_for("delivered")]) == 1  # so a resend is new again
    stats = outbox.stats(SEGMENT)
    assert (stats.dead, stats.pending) == (1, 2)
    assert outbox.purge_dead(before=time.time() + 1, destination=SEGMENT) == 1
    assert outbox.stats(SEGMENT).dead == 0 and outbox.dead_letters(destination=SEGMENT) == []
    assert outbox.store_many([entry_for("dead")]) == 0  # given up on, but still a duplicate


def test_answers_forgotten_by_retention_leave_no_byte_in_any_file_of_a_sqlite_store(tmp_path):
    answer = "zq7-answer-past-retention-0815"
    folder = tmp_path / "store"
    folder.mkdir()
    box = Store(normalize_database_url(f"sqlite:///{folder / 'refiner-source.db'}"))
    try:
        box.init_schema()
        assert box.store_many([entry_for(i, answer=answer) for i in range(20)]) == 20
        claimed = box.claim(SEGMENT, 20, 60, "w")
        box.settle("w", delivered=[c.id for c in claimed], destination=SEGMENT)

        def files_holding_it() -> list[str]:  # the database, its -wal and -shm, the writer lock
            return [p.name for p in sorted(folder.iterdir()) if answer.encode() in p.read_bytes()]

        assert files_holding_it()
        assert box.purge(delivered_before=time.time() + 1, receipts_before=0) == (20, 0)
        assert files_holding_it() == []  # read with the store still open, as a process killed now leaves it
    finally:
        box.dispose()


def test_a_purge_on_postgresql_leaves_no_dead_row_versions_of_the_answers_it_forgot(pg_database_url):
    box = Store(pg_database_url)
    box.init_schema()
    try:
        store(box, 1, 2, 3)
        claimed = box.claim(SEGMENT, 3, 60, "w")
        box.settle("w", delivered=[c.id for c in claimed], destination=SEGMENT)
        assert box.purge(delivered_before=time.time() + 1, receipts_before=0) == (3, 0)
        with box.engine.connect() as conn:
            assert dead_row_versions(conn, events.name) == 0
    finally:
        box.dispose()


def test_every_connection_of_a_sqlite_store_has_secure_delete_on(tmp_path):
    box = Store(normalize_database_url(f"sqlite:///{tmp_path / 'refiner-source.db'}"))

    def as_a_build_without_it(dbapi_connection, _record):
        dbapi_connection.execute("PRAGMA secure_delete=OFF")  # this machine's SQLite may have it on by default

    event.listen(box.engine, "connect", as_a_build_without_it, insert=True)  # before the store's own listener
    try:
        with box.engine.connect() as first, box.engine.connect() as second:
            assert [c.exec_driver_sql("PRAGMA secure_delete").scalar() for c in (first, second)] == [1, 1]
    finally:
        box.dispose()


def test_a_failed_statements_error_on_sqlite_quotes_none_of_its_values(tmp_path):
    # SQLite only: PostgreSQL's own message may quote the row it refused (privacy.md says so).
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    box = Store(normalize_database_url(f"sqlite:///{tmp_path / 'refiner-source.db'}"))
    box.init_schema()
    row = {"destination": SEGMENT, "receipt_key": "k", "source_id": "zq7-user@quoted.example", "triggered_event": "t", "status": None}
    try:
        with pytest.raises(IntegrityError) as failed, box._write() as conn:  # status may not be null
            conn.execute(insert(events).values(**row, available_at=0, created_at=0, queued_at=0))
    finally:
        box.dispose()
    assert "zq7-user@quoted.example" not in str(failed.value)  # what a logged traceback would say


def test_store_raises_on_a_broken_entry_instead_of_calling_it_a_duplicate(outbox):
    from sqlalchemy.exc import IntegrityError

    good = entry_for(1)
    broken = Entry(good.receipt_key, None, good.triggered_event, good.event, destination=good.destination)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        outbox.store_many([broken])
    assert outbox.store_many([good]) == 1  # nothing half-written, receipt included


def test_store_grouped_commits_concurrent_entries_and_answers_each_thread(outbox):
    from concurrent.futures import ThreadPoolExecutor

    keys = [i % 40 for i in range(120)]  # 40 distinct responses, each sent three times at once
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: outbox.store_grouped(entry_for(i)), keys))
    assert sum(answers) == 40  # exactly one "new" per response, whatever the grouping
    assert outbox.stats(SEGMENT).pending == 40
    assert outbox.store_grouped(entry_for(0)) is False


def test_store_grouped_gives_every_waiting_thread_the_error(outbox, monkeypatch):
    real_write = outbox._group.write
    leader_writing = threading.Event()

    @contextmanager
    def failing_commit():
        # The leader's write holds until a second caller waits in its group, then its commit fails.
        with real_write() as conn:
            leader_writing.set()
            deadline = time.monotonic() + 10
            while len(outbox._group.waiting) < 2:
                assert time.monotonic() < deadline, "the second caller never joined the group"
                time.sleep(0.005)
            yield conn
            raise StoreUnavailable("the commit was lost")

    monkeypatch.setattr(outbox._group, "write", failing_commit)
    answers: dict[str, object] = {}

    def call(name: str, entry: Entry) -> None:
        try:
            answers[name] = outbox.store_grouped(entry)
        except Exception as exc:  # noqa: BLE001 - the answer each caller got, asserted below
            answers[name] = exc

    leader = threading.Thread(target=call, args=("leader", entry_for("lead")))
    leader.start()
    assert leader_writing.wait(10), "the leader never began its write"
    follower = threading.Thread(target=call, args=("follower", entry_for("follow")))
    follower.start()
    for thread in (leader, follower):
        thread.join(10)
        assert not thread.is_alive(), "a caller of store_grouped() never got its answer"
    assert isinstance(answers["leader"], StoreUnavailable), answers
    assert isinstance(answers["follower"], StoreUnavailable), answers  # its webhook answers 503, not 200 "duplicate"
    monkeypatch.setattr(outbox._group, "write", real_write)
    keys = [entry_for(i).receipt_key for i in ("lead", "follow")]
    assert outbox.known_receipts(keys, destination=SEGMENT) == set() and outbox.stats(SEGMENT).pending == 0
    assert outbox._group.waiting == []


def test_store_grouped_entry_answered_503_is_never_committed_later(outbox, monkeypatch):
    real_write = outbox._group.write

    def failing_once():
        monkeypatch.setattr(outbox._group, "write", real_write)
        raise StoreUnavailable("down")

    monkeypatch.setattr(outbox._group, "write", failing_once)
    with pytest.raises(StoreUnavailable):
        outbox.store_grouped(entry_for("failed"))
    assert outbox.store_grouped(entry_for("next")) is True
    failed, following = entry_for("failed").receipt_key, entry_for("next").receipt_key
    assert outbox.known_receipts([failed, following], destination=SEGMENT) == {following}  # the 503 one was not stored
    assert outbox.store_grouped(entry_for("failed")) is True  # Refiner's retry


def test_the_grouped_writer_keeps_its_connection_only_while_webhooks_keep_coming(outbox):
    outbox.store_grouped(entry_for("a"))
    held = outbox._held.connection
    outbox.store_grouped(entry_for("b"))
    assert outbox._held.connection is held  # under load: no checkout per group
    outbox._held.used_at -= 2  # idle for two seconds
    outbox.store_grouped(entry_for("c"))
    assert outbox._held.connection is not held and held.closed  # back to the pool; the next one is checked out (and pinged)
    assert outbox.stats(SEGMENT).pending == 3


def test_a_failed_group_gives_back_its_connection_and_the_next_one_is_stored(outbox, monkeypatch):
    outbox.store_grouped(entry_for("before"))
    held = outbox._held.connection

    def lost(conn, rows):
        raise StoreUnavailable("connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "_insert_rows", lost)
        with pytest.raises(StoreUnavailable):
            outbox.store_grouped(entry_for("during"))
    assert outbox._held.connection is None and held.closed
    assert outbox.store_grouped(entry_for("after")) is True
    assert outbox.known_receipts([entry_for(k).receipt_key for k in ("before", "during", "after")], destination=SEGMENT) == {
        entry_for("before").receipt_key,
        entry_for("after").receipt_key,
    }


def test_same_receipt_twice_in_one_group_is_stored_once(outbox):
    from refiner_source.store.receipts import _row
    from refiner_source.store.writing import Waiting

    entry = entry_for(1)
    queued = Waiting(_row(entry, time.time()))
    outbox._group.waiting.append(queued)  # another thread's copy, waiting for a leader
    answer = outbox.store_grouped(entry)
    assert sorted([answer, queued.result]) == [False, True] and queued.done
    assert outbox.stats(SEGMENT).pending == 1
    assert outbox.store_many([entry, entry]) == 0 and outbox.stats(SEGMENT).pending == 1


def test_store_many_with_a_receipt_twice_writes_one_row(outbox):
    entry = entry_for(2)
    assert outbox.store_many([entry, entry]) == 1
    assert outbox.stats(SEGMENT).pending == 1


def test_sqlite_writer_lock_held_by_a_stopped_process_gives_store_unavailable(tmp_path):
    import fcntl
    import os

    from refiner_source.store.writing import SqliteWriterLock

    path = str(tmp_path / "x.db-writer.lock")
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process, stopped while writing
    lock = SqliteWriterLock(path, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="held"):
        with lock:
            pass
    assert time.monotonic() - started < 2
    fcntl.flock(other, fcntl.LOCK_UN)
    with lock:  # and the turn comes once it is released; the thread lock was given back
        pass
    os.close(other)


def test_replay_leaves_pending_events_alone_so_one_in_flight_is_not_sent_twice(outbox):
    store(outbox, 1)
    (in_flight,) = outbox.claim(SEGMENT, 10, 60, "w")
    result = outbox.requeue(source_id="r1", generation="r1", destination=SEGMENT)
    assert (result.matched, result.queued, result.pending) == (1, 0, 1)
    outbox.settle("w", delivered=[in_flight.id], destination=SEGMENT)  # the worker still holds it: its answer counts
    assert outbox.stats(SEGMENT).delivered == 1


def test_oldest_pending_age_counts_from_the_replay_not_from_the_first_receipt(outbox, monkeypatch):
    store(outbox, 1)
    outbox.settle("w", delivered=[c.id for c in outbox.claim(SEGMENT, 10, 60, "w")], destination=SEGMENT)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 30 * 86400)  # a month later
    outbox.requeue(source_id="r1", destination=SEGMENT)
    assert outbox.stats(SEGMENT).oldest_pending_age < 60


def test_a_receipt_outlives_a_late_delivery_by_the_full_receipt_retention(outbox, monkeypatch):
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 100 * 86400)  # received 100 days ago...
    store(outbox, 1)
    monkeypatch.setattr(time, "time", lambda: now)
    outbox.settle("w", delivered=[c.id for c in outbox.claim(SEGMENT, 10, 60, "w")], destination=SEGMENT)  # ...delivered today
    assert outbox.purge(delivered_before=now - 7 * 86400, receipts_before=now - 90 * 86400) == (0, 0)
    assert outbox.store_many([entry_for(1)]) == 0


# --- Segment to Refiner: one contact's events in order ---------------------------------------


def refiner_entry(message_id: str, contact: str) -> Entry:
    return Entry(receipt_key=message_id, source_id=message_id, triggered_event="identify", event="{}", destination=REFINER, contact=contact)


def test_one_contacts_calls_keep_their_order_while_an_earlier_one_waits_to_be_retried(outbox):
    outbox.store_many([refiner_entry("a1", "id:a"), refiner_entry("b1", "id:b")])
    a1, b1 = outbox.claim(REFINER, 10, 60, "w", contact_order=True)
    outbox.settle("w", delivered=[b1.id], released=[a1.id], delay=30, destination=SEGMENT)  # a1 waits 30 s to be retried
    outbox.store_many([refiner_entry("a2", "id:a"), refiner_entry("b2", "id:b")])
    claimed = outbox.claim(REFINER, 10, 60, "w", contact_order=True)
    assert [c.source_id for c in claimed] == ["b2"]  # a2 waits behind a1; b's calls go on
    assert outbox.claim(SEGMENT, 10, 60, "w") == []  # each destination has its own line


def test_a_contact_claimed_by_one_worker_is_not_claimed_by_another(outbox):
    outbox.store_many([refiner_entry("a1", "id:a")])
    (held,) = outbox.claim(REFINER, 10, 60, "first", contact_order=True)
    outbox.store_many([refiner_entry("a2", "id:a")])
    assert outbox.claim(REFINER, 10, 60, "second", contact_order=True) == []
    outbox.settle("first", delivered=[held.id], destination=SEGMENT)
    assert [c.source_id for c in outbox.claim(REFINER, 10, 60, "second", contact_order=True)] == ["a2"]


# --- the schema: Alembic's -----------------------------------------------------------------


def test_init_db_makes_exactly_the_tables_the_code_describes(store_url):
    """The migrations and tables.py agree: a change to a table without its revision fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    box = Store(store_url)
    box.init_schema()
    with box.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": "refiner_alembic_version"})
        assert compare_metadata(context, metadata) == []
    assert box.schema_version() == head_revision()
    box.dispose()


def make_v5_store(url: str) -> None:
    """A store as `init-db` made it before Alembic: today's tables, refiner_schema at 5, no Alembic version table."""
    box = Store(url)
    with box.engine.begin() as conn:
        metadata.create_all(conn)
        conn.exec_driver_sql("INSERT INTO refiner_schema (id, version) VALUES (1, 5)")
    box.store_many([entry_for("waiting"), refiner_entry("m1", "id:a")])
    box.dispose()


def test_init_db_takes_in_a_version_5_store_made_before_alembic(store_url):
    make_v5_store(store_url)
    box = Store(store_url)
    assert box.schema_version() is None
    box.init_schema()
    box.init_schema()  # and again: nothing more happens
    assert box.schema_version() == head_revision()
    assert (box.stats(SEGMENT).pending, box.stats(REFINER).pending) == (1, 1)  # what it held is there, delivered as before
    assert box.store_many([entry_for("waiting")]) == 0
    assert [c.source_id for c in box.claim(SEGMENT, 10, 60, "w")] == ["rwaiting"]
    assert [c.contact for c in box.claim(REFINER, 10, 60, "w", contact_order=True)] == ["id:a"]
    with box.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id, version FROM refiner_schema").all() == [(1, 5)]  # as a rollback reads it
    box.dispose()


def test_init_db_refuses_a_version_5_store_still_holding_messages_kept_from_before_version_3(store_url):
    make_v5_store(store_url)
    box = Store(store_url)
    with box.engine.begin() as conn:  # what the upgrade from version 2 made of messages still waiting
        conn.execute(events.update().where(events.c.source_id == "rwaiting").values(messages='[{"type": "track"}]'))
    with pytest.raises(StoreMisconfigured, match="1 event still holds messages kept from before version 3") as refused:
        box.init_schema()
    assert "with the release that made the store, let them be delivered" in str(refused.value)
    assert box.schema_version() is None and box.stats(SEGMENT).pending == 1
    box.dispose()


def test_a_store_at_a_newer_revision_than_this_release_knows_is_left_as_it_is(store_url, caplog):
    """A rollback: the dynos of the release before start on a store a later release has migrated."""
    box = Store(store_url)
    box.init_schema()
    with box.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE refiner_alembic_version SET version_num = '9999'")
    with caplog.at_level("WARNING", logger="refiner_source.store.schema"):
        box.init_schema()
    assert box.schema_version() == "9999"
    assert "a revision this release does not know" in caplog.text
    assert box.store_many([entry_for(1)]) == 1 and box.stats(SEGMENT).pending == 1
    box.dispose()


def test_an_alembic_version_table_of_another_app_in_the_same_database_is_not_ours(store_url):
    box = Store(store_url)
    with box.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('their-head')")
    box.init_schema()
    assert box.schema_version() == head_revision()
    with box.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [("their-head",)]
    box.dispose()


def test_init_db_refuses_a_store_older_than_version_5_saying_what_to_do(store_url):
    make_v5_store(store_url)
    box = Store(store_url)
    with box.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE refiner_schema SET version = 4")
    with pytest.raises(StoreMisconfigured, match="schema is version 4, from before the first release") as refused:
        box.init_schema()
    assert "start with a new database" in str(refused.value)
    assert box.schema_version() is None and (box.stats(SEGMENT).pending, box.stats(REFINER).pending) == (1, 1)  # nothing lost
    box.dispose()


def test_traffic_counts_add_up_across_writers_and_fold_into_totals(outbox):
    outbox.add_traffic({(100, "webhook", "refiner", "accepted"): 2})
    outbox.add_traffic({(100, "webhook", "refiner", "accepted"): 3, (101, "delivery", "segment", "delivered"): 4})
    assert outbox.traffic_totals()[("webhook", "refiner", "accepted")] == 5
    assert outbox.traffic_per_minute("webhook", "refiner", ["accepted"], since_minute=100) == {100: 5}
    assert outbox.fold_traffic(before_minute=101) == 1  # minute 100 folded into minute 0; 101 kept
    assert outbox.traffic_totals()[("webhook", "refiner", "accepted")] == 5  # the total stays
    assert outbox.traffic_totals(since_minute=1) == {("delivery", "segment", "delivered"): 4}


def test_the_last_delivery_error_is_kept_after_recovery_but_a_hand_back_is_not_one(outbox):
    store(outbox, 1, 2)
    a, b = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", released=[a.id, b.id], delay=0, error="handed back unsent", destination=SEGMENT)
    assert outbox.last_error(SEGMENT) == (None, None)
    a, b = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", released=[a.id], delay=0, error="HTTP 503: later", destination=SEGMENT)
    outbox.settle("w", delivered=[b.id], destination=SEGMENT)
    (a,) = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", delivered=[a.id], destination=SEGMENT)
    error, at = outbox.last_error(SEGMENT)
    assert error == "HTTP 503: later" and at is not None and outbox.last_error(REFINER) == (None, None)


def test_find_events_by_response_id_or_by_a_dead_letters_message_id(outbox):
    store(outbox, 1, 2)
    a, b = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", delivered=[a.id], dead=[DeadLetter(b.id, "refiner-x-track", "track", "HTTP 400")], destination=SEGMENT)
    assert [e["source_id"] for e in outbox.find_events("r1")] == ["r1"]  # one name, as Claimed has it
    (found,) = outbox.find_events("refiner-x-track")
    assert found["source_id"] == "r2" and "response_id" not in found
    assert found["status"] == "dead" and found["dead_letters"][0]["error"] == "HTTP 400"
    assert "event" not in found and outbox.find_events("nothing") == []


def test_traffic_counts_hold_more_than_32_bits(outbox):
    # The latency histogram's sum is in milliseconds: a drained backlog passes 2**31 quickly.
    outbox.add_traffic({(100, "latency", "segment", "sum_ms"): 3_000_000_000})
    outbox.add_traffic({(100, "latency", "segment", "sum_ms"): 3_000_000_000})
    assert outbox.traffic_totals()[("latency", "segment", "sum_ms")] == 6_000_000_000


def test_no_store_method_has_a_default_destination():
    """A forgotten argument must fail, not silently read or write the other direction."""
    import inspect

    defaulted = [
        name
        for name, method in inspect.getmembers(Store, inspect.isfunction)
        if (parameter := inspect.signature(method).parameters.get("destination")) is not None
        and parameter.default is not inspect.Parameter.empty
    ]
    assert defaulted == []
    assert "stats" in {n for n, m in inspect.getmembers(Store, inspect.isfunction) if "destination" in inspect.signature(m).parameters}
