"""The outbox on SQLite and PostgreSQL: store, duplicates, exclusive claims, leases, dead letters."""

from __future__ import annotations

import threading
import time

from refiner_source.outbox import Outbox


def msgs(response: str, n: int = 3) -> list[dict]:
    return [{"messageId": f"{response}-{i}", "type": "track", "event": "E", "userId": "u"} for i in range(n)]


def test_store_commits_messages_with_receipt(outbox):
    assert outbox.store("r1\nCompleted Survey", "r1", "Completed Survey", msgs("r1")) is True
    stats = outbox.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (3, 0, 0)
    assert stats.oldest_pending_age is not None and stats.oldest_pending_age < 60


def test_store_of_a_receipt_seen_before_writes_nothing(outbox):
    outbox.store("r1\nE", "r1", "E", msgs("r1"))
    assert outbox.store("r1\nE", "r1", "E", msgs("r1")) is False
    assert outbox.stats().pending == 3


def test_claim_is_exclusive_until_the_lease_runs_out(outbox, monkeypatch):
    outbox.store("r1\nE", "r1", "E", msgs("r1"))
    first = outbox.claim(10, lease_seconds=60, worker="a")
    assert [c.message["messageId"] for c in first] == ["r1-0", "r1-1", "r1-2"]
    assert outbox.claim(10, 60, "b") == []
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)  # worker "a" died: its lease runs out
    assert len(outbox.claim(10, 60, "b")) == 3


def test_concurrent_claims_never_share_a_message(outbox, settings):
    for r in range(60):
        outbox.store(f"r{r}\nE", f"r{r}", "E", msgs(f"r{r}", 5))
    seen: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        box = Outbox(settings.database_url)
        while batch := box.claim(7, 60, name):
            with lock:
                seen.extend(c.id for c in batch)
            box.mark_delivered([c.id for c in batch])
        box.dispose()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 300 and len(set(seen)) == 300
    assert outbox.stats().delivered == 300


def test_release_makes_messages_due_again_after_the_delay(outbox, monkeypatch):
    outbox.store("r1\nE", "r1", "E", msgs("r1", 1))
    (claimed,) = outbox.claim(10, 60, "a")
    outbox.release([claimed.id], delay=30, error="HTTP 503")
    assert outbox.claim(10, 60, "a") == []
    assert 25 < outbox.next_due_in() <= 30
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 31)
    (again,) = outbox.claim(10, 60, "a")
    assert again.attempts == 1


def test_dead_letters_are_kept_and_replay_puts_them_back(outbox):
    outbox.store("r1\nE", "r1", "E", msgs("r1", 2))
    a, b = outbox.claim(10, 60, "w")
    outbox.mark_dead([a.id], "HTTP 400 invalid: bad message")
    outbox.mark_delivered([b.id])
    stats = outbox.stats()
    assert (stats.pending, stats.delivered, stats.dead) == (0, 1, 1)
    assert outbox.dead_letters() == [("r1", "r1-0", "HTTP 400 invalid: bad message")]
    assert outbox.replay_dead() == 1
    (again,) = outbox.claim(10, 60, "w")
    assert again.message["messageId"] == "r1-0"


def test_init_schema_is_safe_to_run_twice(outbox):
    outbox.init_schema()
    outbox.init_schema()
    assert outbox.stats().pending == 0


def test_init_schema_run_concurrently_by_several_processes_is_safe(store_url):
    errors: list[Exception] = []

    def init() -> None:
        box = Outbox(store_url)
        try:
            box.init_schema()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            box.dispose()

    threads = [threading.Thread(target=init) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_purge_drops_old_delivered_messages_and_receipts_but_never_pending_or_dead(outbox):
    outbox.store("r1\nE", "r1", "E", msgs("r1", 3))
    delivered, dead, _pending = outbox.claim(3, 60, "w")
    outbox.mark_delivered([delivered.id])
    outbox.mark_dead([dead.id], "HTTP 400")
    assert outbox.purge(delivered_before=time.time() - 60, receipts_before=time.time() - 60) == (0, 0)
    assert outbox.purge(delivered_before=time.time() + 1, receipts_before=time.time() + 1) == (1, 1)
    stats = outbox.stats()
    assert (stats.delivered, stats.dead, stats.pending) == (0, 1, 1)
    assert outbox.purge_dead(before=time.time() + 1) == 1
    assert outbox.stats().dead == 0


def test_store_raises_on_a_broken_message_instead_of_calling_it_a_duplicate(outbox):
    import pytest
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        outbox.store("r1\nE", "r1", "E", [{"messageId": None, "type": "track"}])
    assert outbox.store("r1\nE", "r1", "E", msgs("r1")) is True  # nothing half-written, receipt included


def test_store_grouped_commits_concurrent_entries_and_answers_each_thread(outbox):
    from concurrent.futures import ThreadPoolExecutor

    from refiner_source.intake import Entry

    def entry(i: int) -> Entry:
        return Entry(f"r{i}\nE", f"r{i}", "E", msgs(f"r{i}", 3))

    keys = [i % 40 for i in range(120)]  # 40 distinct responses, each sent three times at once
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: outbox.store_grouped(entry(i)), keys))
    assert sum(answers) == 40  # exactly one "new" per response, whatever the grouping
    assert outbox.stats().pending == 40 * 3
    assert outbox.store_grouped(entry(0)) is False


def test_store_grouped_gives_every_waiting_thread_the_error(store_url):
    from refiner_source.intake import Entry

    box = Outbox(store_url)  # no schema: the store fails
    import pytest

    from refiner_source.outbox import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        box.store_grouped(Entry("k", "r", "E", msgs("r", 1)))
    box.dispose()


def test_store_grouped_entry_answered_503_is_never_committed_later(outbox, monkeypatch):
    import pytest

    from refiner_source.intake import Entry
    from refiner_source.outbox import StoreUnavailable

    real_write = outbox._write

    def failing_once():
        monkeypatch.setattr(outbox, "_write", real_write)
        raise StoreUnavailable("down")

    monkeypatch.setattr(outbox, "_write", failing_once)
    with pytest.raises(StoreUnavailable):
        outbox.store_grouped(Entry("failed\nE", "failed", "E", msgs("failed", 3)))
    assert outbox.store_grouped(Entry("next\nE", "next", "E", msgs("next", 3))) is True
    assert outbox.known_receipts(["failed\nE", "next\nE"]) == {"next\nE"}  # the 503 one was not stored
    assert outbox.store_grouped(Entry("failed\nE", "failed", "E", msgs("failed", 3))) is True  # Refiner's retry


def test_same_receipt_twice_in_one_group_is_stored_once(outbox):
    import time as clock

    from refiner_source.intake import Entry
    from refiner_source.outbox import _rows, _Waiting

    entry = Entry("r1\nE", "r1", "E", msgs("r1", 3))
    queued = _Waiting(entry, _rows([entry], clock.time()))
    outbox._waiting.append(queued)  # another thread's copy, waiting for a leader
    answer = outbox.store_grouped(entry)
    assert sorted([answer, queued.result]) == [False, True] and queued.done
    assert outbox.stats().pending == 3
    assert outbox.store_many([entry, entry]) == 0 and outbox.stats().pending == 3


def test_store_many_with_a_receipt_twice_writes_one_set(outbox):
    from refiner_source.intake import Entry

    entry = Entry("r2\nE", "r2", "E", msgs("r2", 3))
    assert outbox.store_many([entry, entry]) == 1
    assert outbox.stats().pending == 3


def test_sqlite_writer_lock_held_by_a_stopped_process_gives_store_unavailable(tmp_path):
    import fcntl
    import os

    import pytest

    from refiner_source.outbox import StoreUnavailable, _SqliteWriterLock

    path = str(tmp_path / "x.db-writer.lock")
    other = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)  # another process, stopped while writing
    lock = _SqliteWriterLock(path, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="held"):
        with lock:
            pass
    assert time.monotonic() - started < 2
    fcntl.flock(other, fcntl.LOCK_UN)
    with lock:  # and the turn comes once it is released; the thread lock was given back
        pass
    os.close(other)
