"""The delivery worker's handling of Segment's answers (responses mocks the HTTP), SPEC section 4."""

from __future__ import annotations

import gzip
import json
import logging
import time

import pytest
import requests
import responses
from sqlalchemy import update

from refiner_source.backoff import Backoff
from refiner_source.delivery import Worker, pack
from refiner_source.outbox import Claimed, messages

HOST = "https://segment.test"
URL = HOST + "/v1/batch"


def message(i: int, size: int = 10) -> dict:
    return {"messageId": f"m-{i}", "type": "track", "event": "E", "userId": "u", "properties": {"x": "y" * size}}


@pytest.fixture
def worker(outbox):
    return Worker(outbox, "wk", HOST, batch_size=50, idle_poll=0.01, backoff=Backoff(base=0.01, cap=0.05))


def fill(outbox, n: int, size: int = 10) -> None:
    outbox.store("r\nE", "r", "E", [message(i, size) for i in range(n)])


def sent_batches() -> list[list[dict]]:
    return [json.loads(gzip.decompress(call.request.body))["batch"] for call in responses.calls]


@responses.activate
def test_batch_is_posted_gzipped_with_the_write_key_and_marked_delivered(worker, outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 3)
    worker.run_once()
    (call,) = responses.calls
    assert call.request.headers["Content-Encoding"] == "gzip"
    assert call.request.headers["Authorization"].startswith("Basic ")
    body = json.loads(gzip.decompress(call.request.body))
    assert body["writeKey"] == "wk" and [m["messageId"] for m in body["batch"]] == ["m-0", "m-1", "m-2"]
    assert outbox.stats().delivered == 3


@responses.activate
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_retryable_status_is_retried_with_backoff(worker, outbox, status, monkeypatch):
    responses.post(URL, status=status, json={"code": "x", "message": "later"})
    responses.post(URL, json={"success": True})
    worker.backoff = Backoff(base=10, cap=10)
    fill(outbox, 2)
    wait = worker.run_once()
    assert 5 <= wait <= 10
    assert outbox.stats().pending == 2 and outbox.stats().dead == 0
    worker.run_once()  # not due yet: nothing is sent before the delay is over
    assert len(responses.calls) == 1
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + wait + 0.5)  # the clock, not a sleep: no flakiness
    worker.run_once()
    assert outbox.stats().delivered == 2


@responses.activate
def test_retry_after_is_honoured(worker, outbox):
    responses.post(URL, status=429, headers={"Retry-After": "7"}, json={"code": "rate_limited", "message": "slow down"})
    fill(outbox, 1)
    assert worker.run_once() == 7
    assert 6.5 < outbox.next_due_in() <= 7


@responses.activate
def test_network_error_is_retried(worker, outbox):
    responses.post(URL, body=requests.ConnectionError("refused"))
    fill(outbox, 1)
    assert worker.run_once() > 0
    assert outbox.stats().pending == 1


def test_backoff_is_capped_exponential_with_jitter():
    backoff = Backoff(base=0.5, cap=60)
    assert [backoff.delay(a, rng=lambda: 1.0) for a in range(9)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(3, rng=lambda: 0.0) == 2  # jitter spans half the ceiling up to the ceiling
    assert backoff.delay(1000, rng=lambda: 1.0) == 60


@responses.activate
def test_4xx_splits_the_batch_and_dead_letters_only_the_bad_message(worker, outbox):
    def answer(request):
        batch = json.loads(gzip.decompress(request.body))["batch"]
        if any(m["messageId"] == "m-5" for m in batch):
            return 400, {}, json.dumps({"code": "invalid_request", "message": "bad message"})
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 8)
    worker.run_once()
    stats = outbox.stats()
    assert (stats.delivered, stats.dead) == (7, 1)
    assert outbox.dead_letters() == [("r", "m-5", "HTTP 400 invalid_request: bad message")]
    delivered = [m["messageId"] for batch in sent_batches() for m in batch if "m-5" not in [x["messageId"] for x in batch]]
    assert sorted(set(delivered)) == sorted(f"m-{i}" for i in range(8) if i != 5)


@responses.activate
@pytest.mark.parametrize("status", [401, 403])
def test_rejected_write_key_is_retried_not_dead_lettered(worker, outbox, status):
    responses.post(URL, status=status, json={"code": "unauthorized", "message": "bad write key"})
    fill(outbox, 4)
    worker.run_once()
    assert outbox.stats().dead == 0 and outbox.stats().pending == 4


def test_pack_keeps_every_request_under_500_kb_and_in_order():
    items = [Claimed(i, message(i, size=30_000), 0, "r") for i in range(40)]
    chunks = pack(items)
    assert [c.id for chunk in chunks for c in chunk] == list(range(40))
    assert all(
        len(json.dumps({"batch": [c.message for c in chunk], "sentAt": "x" * 32, "writeKey": "k" * 64})) < 500_000 for chunk in chunks
    )
    assert len(chunks) == 3


@responses.activate
def test_large_claim_is_sent_in_several_requests(worker, outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 40, size=30_000)
    worker.run_once()
    assert len(responses.calls) == 3 and outbox.stats().delivered == 40


@responses.activate
def test_stop_finishes_the_request_in_flight_and_hands_back_the_rest(worker, outbox):
    def answer(request):
        worker.stop()  # SIGTERM arrives while the first request is in flight
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 40, size=30_000)
    worker.run_once()
    stats = outbox.stats()
    assert len(responses.calls) == 1 and stats.delivered > 0 and stats.pending == 40 - stats.delivered
    assert outbox.next_due_in() == 0  # given back at once for the next worker


def test_worker_purges_delivered_messages_after_retention_days(outbox, monkeypatch):
    worker = Worker(outbox, "wk", HOST, retention_days=7)
    fill(outbox, 2)
    (a, b) = outbox.claim(2, 60, "w")
    outbox.mark_delivered([a.id, b.id])
    worker.purge_if_due()
    assert outbox.stats().delivered == 2  # younger than 7 days
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 8 * 86400)
    worker._next_purge = 0
    worker.purge_if_due()
    assert outbox.stats().delivered == 0


@responses.activate
def test_dead_letter_keeps_its_own_error_when_the_rest_of_its_batch_meets_an_outage(worker, outbox):
    def answer(request):
        ids = [m["messageId"] for m in json.loads(gzip.decompress(request.body))["batch"]]
        if "m-1" in ids:
            return 400, {}, json.dumps({"code": "invalid_request", "message": "bad message"})
        if "m-6" in ids:
            return 503, {}, json.dumps({"code": "unavailable", "message": "down"})
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 8)
    worker.run_once()
    assert outbox.dead_letters() == [("r", "m-1", "HTTP 400 invalid_request: bad message")]
    stats = outbox.stats()
    assert stats.dead == 1 and stats.delivered + stats.pending == 7 and stats.pending > 0


def delivery_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "refiner_source.delivery"]


@responses.activate
def test_every_delivery_log_line_carries_an_outcome(worker, outbox, caplog):
    caplog.set_level(logging.INFO)
    fill(outbox, 2)
    responses.post(URL, status=503, json={"code": "unavailable", "message": "later"})
    worker.run_once()
    with outbox.engine.begin() as conn:  # due again now, not after the backoff
        conn.execute(update(messages).values(available_at=0))
    responses.replace(responses.POST, URL, json={"success": True})
    worker.run_once()
    outcomes = [getattr(r, "outcome", None) for r in delivery_records(caplog) if r.msg != "delivery worker started"]
    assert outcomes and None not in outcomes
    assert "retry" in outcomes and "delivered" in outcomes


@responses.activate
def test_a_401_is_logged_as_segment_answering_not_as_unreachable(worker, outbox, caplog):
    caplog.set_level(logging.INFO)
    responses.post(URL, status=401, json={"code": "unauthorized", "message": "bad key"})
    fill(outbox, 1)
    worker.run_once()
    texts = [r.getMessage() for r in delivery_records(caplog)]
    assert "Segment answered HTTP 401; will retry" in texts
    assert not any("not reachable" in t for t in texts)


@responses.activate
def test_the_segment_librarys_own_error_for_a_failed_post_is_not_logged_twice(worker, outbox, caplog):
    caplog.set_level(logging.INFO)
    responses.post(URL, status=503, body="<html>Service Unavailable</html>")  # not JSON: the library logs "Unknown error"
    fill(outbox, 1)
    worker.run_once()
    library = [r for r in caplog.records if r.name == "segment" and r.levelno >= logging.ERROR]
    assert library == []
    assert [r.getMessage() for r in delivery_records(caplog)] == ["Segment answered HTTP 503; will retry"]


@responses.activate
def test_a_redirect_is_a_host_problem_retried_not_a_dead_letter(worker, outbox):
    responses.post(URL, status=304)  # one requests does not follow: SEGMENT_HOST points at a redirector
    fill(outbox, 2)
    worker.run_once()
    assert outbox.stats().dead == 0 and outbox.stats().pending == 2
