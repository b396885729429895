"""Forgetting a person at the edges: events stored while the erase reads, the delivery loops as the
worker builds them, a dry run without a key, messages kept by an old store, every email a Segment
event carries, a destination's last error that quoted the person, and a SQLite log that readers keep
from being emptied."""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import replace

import pytest

from refiner_source.config import Settings, normalize_database_url
from refiner_source.destinations import delivery_loops
from refiner_source.erasure import erase
from refiner_source.privacy import pairs
from refiner_source.store import PURGED, REFINER, SEGMENT, Store, database
from refiner_source.store.suppression import ERASED_ERROR
from tests.conftest import SECRET, entry_for
from tests.test_forget import SHARED, rows, segment_event


@pytest.fixture
def both(settings, segment, refiner):
    return replace(
        settings, segment_shared_secret=SHARED, refiner_api_key=refiner.api_key, refiner_api_url=refiner.url, segment_host=segment.url
    )


def test_an_event_stored_while_the_erase_reads_is_erased_too(outbox, both):
    outbox.store_many([entry_for(1)])
    person = frozenset(pairs(user="user-1"))
    real = outbox.erase_person
    stored_meanwhile = []

    def erase_person(patterns, contacts, concerns, **kwargs):
        def concerns_while_a_webhook_commits(destination, event):
            if not stored_meanwhile:  # the webhook of another process commits during the read
                stored_meanwhile.append(outbox.store_many([entry_for(1, "Dismissed Survey")]))
            return concerns(destination, event)

        return real(patterns, contacts, concerns_while_a_webhook_commits, **kwargs)

    outbox.erase_person = erase_person
    erased = erase(outbox, both, person)
    assert stored_meanwhile == [1]
    assert erased[SEGMENT].events == 2
    assert {r["status"] for r in rows(outbox).values()} == {PURGED}


def test_the_workers_loops_drop_an_event_stored_after_a_forget_before_it_is_sent(outbox, both, segment, refiner):
    loops = {loop.destination: loop for loop in delivery_loops(both, outbox)}
    assert set(loops) == {SEGMENT, REFINER}
    outbox.store_many([entry_for(3), segment_event("m-3", user="user-3")])
    for loop in loops.values():
        loop.run_once()  # each sends one event, having read the (empty) list
    erase(outbox, both, frozenset(pairs(user="user-1", email="ada@example.com")))
    # Stored by a web process whose copy of the list is up to 2 seconds old:
    outbox.store_many([entry_for(1), entry_for(2)])
    outbox.store_many([segment_event("m-1", user="user-1"), segment_event("m-2", email="Ada@Example.com", kind="track")])
    loops[SEGMENT].run_once()
    loops[REFINER].run_once()
    sent = {m["messageId"].split("-")[1] for m in segment.received()}
    assert sent == {"r2", "r3"}  # user-1's response never left
    assert {c["body"].get("id") for c in refiner.calls} == {"user-3"}
    after = rows(outbox)
    assert after[(REFINER, "m-1")]["status"] == after[(REFINER, "m-2")]["status"] == PURGED  # dropped, not sent


def test_a_dry_run_needs_no_key(outbox, settings):
    keyless = replace(settings, webhook_secrets=(), segment_write_key=None)
    outbox.store_many([entry_for(1)])
    assert erase(outbox, keyless, frozenset(pairs(user="user-1")), dry_run=True)[SEGMENT].events == 1


def test_a_segment_event_naming_the_address_in_either_traits_is_theirs(outbox, both):
    from refiner_source.to_refiner.events import load
    from refiner_source.to_refiner.intake import prepare

    event = {
        "type": "identify",
        "messageId": "two",
        "userId": "u",
        "traits": {"email": "a@example.com"},
        "context": {"traits": {"email": "b@example.com"}},
    }
    outbox.store_many([prepare(load(event))])
    assert erase(outbox, both, frozenset(pairs(email="B@example.com")))[REFINER].events == 1


def test_a_destinations_last_error_that_quoted_the_person_is_erased_and_another_kept(outbox, both):
    with outbox._write() as conn:
        outbox._record_error(conn, REFINER, 'HTTP 400 {"message": "invalid email ada@example.com"}', time.time())
        outbox._record_error(conn, SEGMENT, "HTTP 503 unavailable", time.time())
    erase(outbox, both, frozenset(pairs(email="ada@example.com")))
    assert outbox.last_error(REFINER)[0] == ERASED_ERROR
    assert outbox.last_error(SEGMENT)[0] == "HTTP 503 unavailable"


def test_metrics_count_the_suppressed_people_under_the_key_in_force_and_under_another(outbox, both):
    import base64

    from prometheus_client.parser import text_string_to_metric_families

    from refiner_source import create_app

    def suppressed(settings) -> dict[str, float]:
        app = create_app(replace(settings, admin_password="admin-password-0123456789"))
        auth = base64.b64encode(b"op:admin-password-0123456789").decode()
        text = app.test_client().get("/metrics", headers={"Authorization": f"Basic {auth}"}).get_data(as_text=True)
        family = next(f for f in text_string_to_metric_families(text) if f.name == "refiner_source_suppressed_people")
        return {s.labels["key"]: s.value for s in family.samples}

    assert suppressed(both) == {"current": 0, "other": 0}
    erase(outbox, both, frozenset(pairs(user="user-1")))
    erase(outbox, both, frozenset(pairs(email="b@example.com")))
    assert suppressed(both) == {"current": 2, "other": 0}
    rotated = replace(both, webhook_secrets=("another-secret-0123456789",))
    assert suppressed(rotated) == {"current": 0, "other": 2}


def test_a_forget_whose_sqlite_log_a_reader_keeps_busy_is_done_all_the_same_and_warns(tmp_path, monkeypatch, caplog):
    path = tmp_path / "refiner-source.db"
    url = normalize_database_url(f"sqlite:///{path}")
    both = Settings(webhook_secrets=(SECRET,), database_url=url, segment_shared_secret=SHARED, refiner_api_key="refiner-key")
    box = Store(url)
    box.init_schema()
    box.store_many([entry_for(1)])
    monkeypatch.setattr(database, "CHECKPOINT_BUSY_MS", 20)
    monkeypatch.setattr(database, "CHECKPOINT_PAUSE", 0.0)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM refiner_events").fetchone()  # a snapshot older than the erase
        with caplog.at_level(logging.WARNING, logger=database.__name__):
            erased = erase(box, both, frozenset(pairs(user="user-1")))
        assert erased[SEGMENT].events == 1 and {r["status"] for r in rows(box).values()} == {PURGED}
        assert [r.getMessage() for r in caplog.records if r.name == database.__name__] == [
            "could not empty the SQLite log after erasing (readers kept it busy); the erased values stay in its -wal file "
            "until SQLite reuses it"
        ]
    finally:
        reader.close()
        box.dispose()
