"""Alerts to ALERT_WEBHOOK_URL (issue 12): dead letters, a stuck direction and its recovery, once
per kind per 15 minutes across workers, never an answer or an email; a real local HTTP server receives them."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import pytest
import requests
from sqlalchemy import update

from refiner_source.ops.alerts import QUIET_SECONDS, Alerts
from refiner_source.ops.upkeep import Upkeep
from refiner_source.store import REFINER, SEGMENT, DeadLetter, Store, events
from tests.conftest import SECRET, entry_for, load_fixture
from tests.http_stub import JsonHandler, LoopbackServer
from tests.segment_stub import SegmentStub
from tests.service import Service, free_port

EMAIL = "ada@initech.example"  # the fixture's contact
ANSWER = "Zebra-Hotel-Answer-4711"  # a recognisable answer
HOOK_PATH = "/services/T000/B000/secret-part-of-the-url"


class AlertReceiver(LoopbackServer):
    """Stands in for Slack's incoming webhook: records each JSON body; `fail` holds statuses to answer first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bodies: list[dict[str, Any]] = []
        self.fail: deque[int] = deque()
        receiver = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    status = receiver.fail.popleft() if receiver.fail else 200
                    if status == 200:
                        assert self.headers["Content-Type"] == "application/json"
                        receiver.bodies.append(json.loads(raw))
                self.send_json(status, {"ok": status == 200})

        super().__init__(Handler)
        self.url = self.base + HOOK_PATH

    def texts(self) -> list[str]:
        with self.lock:
            return [b["text"] for b in self.bodies]

    def wait_for(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(texts := self.texts()) >= count:
                return texts
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {count} alert(s); got {self.texts()}")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def receiver():
    with AlertReceiver() as server:
        yield server


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def alerts(outbox, receiver, clock):
    return Alerts(outbox, receiver.url, 900, clock=clock)


_numbers = iter(range(1_000_000))


def add_dead(outbox: Store, n: int = 1, destination: str = SEGMENT, error: str = "HTTP 400 invalid: bad message") -> None:
    """n events that became dead letters (as a worker settles them)."""
    entries = [dataclasses.replace(entry_for(next(_numbers), answer=ANSWER), destination=destination) for _ in range(n)]
    outbox.store_many(entries)
    claimed = outbox.claim(destination, n, 60, "w")
    outbox.settle("w", dead=[DeadLetter(c.id, f"m-{c.id}", "track", error) for c in claimed], destination=destination)


def add_pending(outbox: Store, waited: float, destination: str = SEGMENT) -> None:
    """One pending event that has waited `waited` seconds (and waits to be retried: add_dead does not claim it)."""
    entry = dataclasses.replace(entry_for(next(_numbers), answer=ANSWER), destination=destination)
    outbox.store_many([entry])
    with outbox.engine.begin() as conn:
        stmt = update(events).where(events.c.receipt_key == entry.receipt_key)
        conn.execute(stmt.values(queued_at=time.time() - waited, available_at=time.time() + 3600))


def deliver_all(outbox: Store, destination: str = SEGMENT) -> None:
    with outbox.engine.begin() as conn:
        conn.execute(update(events).where(events.c.destination == destination, events.c.status == "pending").values(available_at=0))
    claimed = outbox.claim(destination, 1000, 60, "w")
    outbox.settle("w", delivered=[c.id for c in claimed], destination=destination)


def test_dead_letters_appearing_send_one_alert_and_no_second_within_15_minutes(outbox, alerts, receiver, clock):
    add_dead(outbox)
    (text,) = alerts.check()
    assert "1 new dead letter (1 in all)" in text and "Refiner to Segment" in text
    assert "`refiner-source status --to segment`" in text and "`refiner-source replay --to segment`" in text
    add_dead(outbox, 2)
    for _ in range(29):  # every 30 s for the rest of the quarter hour
        clock.advance(30)
        assert alerts.check() == []
    assert receiver.texts() == [text]


def test_more_dead_letters_after_15_minutes_send_a_second_alert_counting_them(outbox, alerts, receiver, clock):
    add_dead(outbox)
    alerts.check()
    add_dead(outbox, 2)
    clock.advance(QUIET_SECONDS)
    (text,) = alerts.check()
    assert "2 new dead letters (3 in all)" in text
    clock.advance(QUIET_SECONDS)
    assert alerts.check() == []  # nothing new since
    assert len(receiver.texts()) == 2


def test_dead_letters_replayed_then_dying_again_are_new_again(outbox, alerts, receiver, clock):
    add_dead(outbox, 2)
    alerts.check()
    outbox.replay_dead(SEGMENT)
    alerts.check()  # 0 dead now: counting starts again from 0
    deliver_all(outbox)
    add_dead(outbox)
    clock.advance(QUIET_SECONDS)
    (text,) = alerts.check()
    assert "1 new dead letter (1 in all)" in text


def test_each_direction_is_alerted_on_its_own_with_its_own_commands(outbox, alerts, receiver):
    add_dead(outbox, 1, SEGMENT)
    add_dead(outbox, 2, REFINER)
    segment, refiner = alerts.check()
    assert "Refiner to Segment" in segment and "--to segment" in segment
    assert "Segment to Refiner" in refiner and "2 new dead letters" in refiner and "--to refiner" in refiner
    assert receiver.texts() == [segment, refiner]


def test_stuck_pending_sends_one_alert_and_its_recovery_one_message(outbox, alerts, receiver, clock):
    add_pending(outbox, 100)
    assert alerts.check() == []  # under ALERT_PENDING_SECONDS
    add_pending(outbox, 1000)
    (stuck,) = alerts.check()
    assert "Refiner to Segment" in stuck and "stuck" in stuck and "2 pending events" in stuck and "16 min" in stuck
    assert "`refiner-source status --to segment`" in stuck
    for _ in range(5):
        clock.advance(30)
        assert alerts.check() == []  # still stuck: said once
    deliver_all(outbox)
    (recovered,) = alerts.check()
    assert "recovered" in recovered and "nothing pending" in recovered and "Refiner to Segment" in recovered
    clock.advance(30)
    assert alerts.check() == []
    assert receiver.texts() == [stuck, recovered]


def test_stuck_again_within_15_minutes_is_not_alerted_again(outbox, alerts, receiver, clock):
    add_pending(outbox, 1000)
    alerts.check()
    deliver_all(outbox)
    clock.advance(60)
    alerts.check()  # recovered
    add_pending(outbox, 1000)
    clock.advance(60)
    assert alerts.check() == []  # a second "stuck" only 2 minutes after the first: not sent
    clock.advance(QUIET_SECONDS)
    (again,) = alerts.check()
    assert "stuck" in again
    assert len(receiver.texts()) == 3


def test_a_recovery_without_a_stuck_alert_before_it_says_nothing(outbox, alerts, receiver):
    add_pending(outbox, 10)
    alerts.check()
    deliver_all(outbox)
    assert alerts.check() == [] and receiver.texts() == []


def at_the_same_moment(calls: list) -> list:
    """Run the calls in threads released together; their results."""
    start = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_workers_checking_at_the_same_moment_send_one_message(outbox, receiver, clock):
    second_store = Store(outbox.url)
    workers = [Alerts(outbox, receiver.url, 900, clock=clock), Alerts(second_store, receiver.url, 900, clock=clock)]
    try:
        for round_ in range(4):
            add_dead(outbox)
            if round_ == 0:
                add_pending(outbox, 1000)
            sent = at_the_same_moment([w.check for w in workers])
            expected = 2 if round_ == 0 else 1  # dead (and, the first time, stuck), each by one of the two
            assert len(sent[0]) + len(sent[1]) == expected, sent
            clock.advance(QUIET_SECONDS)
        texts = receiver.texts()
        assert len(texts) == 5 and sum("stuck" in t for t in texts) == 1
    finally:
        second_store.dispose()


def test_no_answer_email_or_error_text_in_any_message(outbox, alerts, receiver, clock):
    echoed = f"HTTP 400 invalid: traits.email {EMAIL} / {ANSWER} is not allowed"  # a destination quoting the data
    add_dead(outbox, 1, SEGMENT, error=echoed)
    add_dead(outbox, 1, REFINER, error=echoed)
    add_pending(outbox, 1000)
    sent = alerts.check()
    deliver_all(outbox)
    sent += alerts.check()
    assert len(sent) == 4 and receiver.texts() == sent
    everything = json.dumps(receiver.bodies)
    for secret in (EMAIL, ANSWER, "Product Manager", "invalid", "user-", "Ada"):
        assert secret not in everything


def test_a_failed_send_is_logged_not_counted_and_sent_on_the_next_check(outbox, alerts, receiver, clock, caplog):
    receiver.fail.extend([500, 503])
    add_dead(outbox)
    with caplog.at_level(logging.WARNING, logger="refiner_source.ops.alerts"):
        assert alerts.check() == []
        clock.advance(30)
        assert alerts.check() == []
    warnings = [r for r in caplog.records if r.msg.startswith("could not send an alert")]
    assert [r.error for r in warnings] == ["HTTP 500", "HTTP 503"]
    assert all(HOOK_PATH not in r.getMessage() + str(r.__dict__) for r in caplog.records)  # the URL is a secret
    clock.advance(30)  # well within 15 minutes of the first try: a failure is not a message sent
    (text,) = alerts.check()
    assert "1 new dead letter" in text and len(receiver.texts()) == 1


def test_an_unreachable_webhook_does_not_raise_from_the_workers_check(outbox, clock):
    alerts = Alerts(outbox, f"http://127.0.0.1:{free_port()}{HOOK_PATH}", 900, clock=clock)
    add_dead(outbox)
    assert alerts.check_if_due() == []
    outbox.dispose()
    broken = Alerts(Store("sqlite:////nonexistent-folder/x.db"), "http://127.0.0.1:9/", 900, clock=clock)
    assert broken.check_if_due() == []  # a store that cannot answer: logged, delivery goes on


def test_checks_are_at_most_every_30_seconds_or_a_third_of_the_threshold(outbox, receiver, clock):
    assert Alerts(outbox, receiver.url, 900, clock=clock).every == 30
    assert Alerts(outbox, receiver.url, 15, clock=clock).every == 5
    alerts = Alerts(outbox, receiver.url, 900, clock=clock)
    assert alerts.check_if_due() == []  # at start
    add_dead(outbox)
    clock.advance(29)
    assert alerts.check_if_due() == []  # not yet due
    clock.advance(1)
    assert len(alerts.check_if_due()) == 1


def test_upkeep_checks_both_directions_whichever_loops_run(outbox, receiver):
    add_dead(outbox, 1, REFINER)
    upkeep = Upkeep(outbox, alert_webhook_url=receiver.url, alert_pending_seconds=900)
    upkeep.run_due()
    (text,) = receiver.texts()
    assert "Segment to Refiner" in text
    assert Upkeep(outbox).alerts is None  # no ALERT_WEBHOOK_URL: no alerts


# --- end to end: `refiner-source serve`, a Segment outage, a local server as the alert webhook ------------


def test_e2e_a_segment_outage_sends_exactly_one_alert_and_one_recovery(tmp_path, receiver):
    with SegmentStub() as segment:
        segment.down = True  # every request answers 503
        service = Service(
            ["serve"],
            {
                "PORT": str(free_port()),
                "WEB_CONCURRENCY": "2",
                "DATABASE_URL": f"sqlite:///{tmp_path / 'refiner-source.db'}",
                "SEGMENT_HOST": segment.url,
                "SEGMENT_WRITE_KEY": "e2e-write-key",
                "REFINER_WEBHOOK_SECRET": SECRET,
                "ALERT_WEBHOOK_URL": receiver.url,
                "ALERT_PENDING_SECONDS": "2",
            },
            tmp_path / "service.log",
        )
        try:
            service.start()
            body = load_fixture("webhook_completed_survey.json")
            body["response"]["data"]["what_is_your_job_role"] = ANSWER
            answer = requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=body, timeout=10)
            assert answer.status_code == 202

            (stuck,) = receiver.wait_for(1, timeout=20)
            assert "Refiner to Segment" in stuck and "stuck" in stuck and "1 pending event" in stuck
            assert segment.received() == [] and any(r["status"] == 503 for r in segment.requests)

            segment.down = False  # Segment is back
            segment.wait_for(lambda r: len(r) >= 3, timeout=30)
            texts = receiver.wait_for(2, timeout=30)
            time.sleep(2)  # a few more checks (every 2/3 s here): nothing more to say
            texts = receiver.texts()
            assert len(texts) == 2, texts
            assert texts[0] == stuck and "recovered" in texts[1] and "Refiner to Segment" in texts[1]
            for secret in (EMAIL, ANSWER, "Ada Park"):
                assert secret not in json.dumps(receiver.bodies)
            assert HOOK_PATH not in service.logs()  # the webhook URL is a secret
        finally:
            service.stop()
