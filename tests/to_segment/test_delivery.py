"""The delivery worker: stored events mapped at delivery, and Segment's answers (responses mocks the HTTP): retry, backoff, dead letters."""

from __future__ import annotations

import gzip
import json
import logging
import time

import pytest
import requests
import responses
from sqlalchemy import update

from refiner_source.delivery.backoff import Backoff
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.ops.upkeep import Upkeep
from refiner_source.store import SEGMENT, events
from refiner_source.to_segment.delivery import Item, pack, segment_loop
from tests.conftest import entry_for

HOST = "https://segment.test"
URL = HOST + "/v1/batch"


def message(i: int, size: int = 10) -> dict:
    return {"messageId": f"m-{i}", "type": "track", "event": "E", "userId": "u", "properties": {"x": "y" * size}}


def mid(i: int, call: str = "track") -> str:
    return f"refiner-r{i}-completed-survey-{call}"


@pytest.fixture
def worker(outbox):
    return segment_loop(outbox, "wk", HOST, batch_size=50, idle_poll=0.01, backoff=Backoff(base=0.01, cap=0.05))


def fill(outbox, n: int, size: int = 10) -> None:
    """n Completed Survey events, r0 to r<n-1>: three messages each, an answer of `size` characters in two of them."""
    outbox.store_many([entry_for(i, answer="y" * size) for i in range(n)])


def make_due(outbox) -> None:
    with outbox.engine.begin() as conn:  # due again now, not after the backoff
        conn.execute(update(events).values(available_at=0))


def sent_batches() -> list[list[dict]]:
    return [json.loads(gzip.decompress(call.request.body))["batch"] for call in responses.calls]


@responses.activate
def test_batch_is_posted_gzipped_with_the_write_key_and_marked_delivered(worker, outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 2)
    worker.run_once()
    (call,) = responses.calls
    assert call.request.headers["Content-Encoding"] == "gzip"
    assert call.request.headers["Authorization"].startswith("Basic ")
    body = json.loads(gzip.decompress(call.request.body))
    expected = [mid(r, call) for r in range(2) for call in ("identify", "group", "track")]
    assert body["writeKey"] == "wk" and [m["messageId"] for m in body["batch"]] == expected  # in order, mapped at delivery
    assert outbox.stats(SEGMENT).delivered == 2


@responses.activate
def test_events_are_mapped_with_the_mapping_file_in_force_when_they_are_sent(outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 1)
    renamed = MappingRules(traits={"what_is_your_job_role": "job_role"}, events={"Completed Survey": "Feedback Given"})
    segment_loop(outbox, "wk", HOST, rules=renamed).run_once()
    (batch,) = sent_batches()
    identify, _group, track = batch
    assert identify["traits"]["job_role"] == "y" * 10 and track["event"] == "Feedback Given"
    assert identify["integrations"] == {"Refiner": False}


@responses.activate
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 423, 429])
def test_retryable_status_is_retried_with_backoff(worker, outbox, status, monkeypatch):
    responses.post(URL, status=status, json={"code": "x", "message": "later"})
    responses.post(URL, json={"success": True})
    worker.backoff = Backoff(base=10, cap=10)
    fill(outbox, 2)
    wait = worker.run_once()
    assert 5 <= wait <= 10
    assert outbox.stats(SEGMENT).pending == 2 and outbox.stats(SEGMENT).dead == 0
    worker.run_once()  # not due yet: nothing is sent before the delay is over
    assert len(responses.calls) == 1
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + wait + 0.5)  # the clock, not a sleep: no flakiness
    worker.run_once()
    assert outbox.stats(SEGMENT).delivered == 2


@responses.activate
def test_retry_after_is_honoured(worker, outbox):
    responses.post(URL, status=429, headers={"Retry-After": "7"}, json={"code": "rate_limited", "message": "slow down"})
    fill(outbox, 1)
    assert worker.run_once() == 7
    assert 6.5 < outbox.next_due_in(SEGMENT) <= 7


@responses.activate
def test_network_error_is_retried(worker, outbox):
    responses.post(URL, body=requests.ConnectionError("refused"))
    fill(outbox, 1)
    assert worker.run_once() > 0
    assert outbox.stats(SEGMENT).pending == 1


def test_backoff_is_capped_exponential_with_jitter():
    backoff = Backoff(base=0.5, cap=60)
    assert [backoff.delay(a, rng=lambda: 1.0) for a in range(9)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(3, rng=lambda: 0.0) == 2  # jitter spans half the ceiling up to the ceiling
    assert backoff.delay(1000, rng=lambda: 1.0) == 60


def test_no_answer_has_no_retry_after():
    from refiner_source.delivery.answers import retry_after

    assert retry_after(None) is None
    answer = requests.Response()
    answer.headers["Retry-After"] = "7"
    assert retry_after(answer) == 7


# Mutation testing (bench/mutation.py) leaves one change to backoff.py alive that cannot change a
# wait: the exponent's bound, 30 made 31. 2**30 times any base above 60 / 2**30 seconds (56 ns) is
# over the cap already, so the ceiling is the cap either way.


@responses.activate
def test_4xx_splits_the_batch_and_dead_letters_only_the_bad_message(worker, outbox):
    def answer(request):
        batch = json.loads(gzip.decompress(request.body))["batch"]
        if any(m["messageId"] == mid(5) for m in batch):
            return 400, {}, json.dumps({"code": "invalid_request", "message": "bad message"})
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 8)
    worker.run_once()
    stats = outbox.stats(SEGMENT)
    assert (stats.delivered, stats.dead) == (7, 1)  # events: r5 is dead, for its track alone
    assert outbox.dead_letters(destination=SEGMENT) == [("r5", mid(5), "HTTP 400 invalid_request: bad message")]
    accepted = {m["messageId"] for batch in sent_batches() for m in batch if mid(5) not in [x["messageId"] for x in batch]}
    everything = {mid(r, call) for r in range(8) for call in ("identify", "group", "track")}
    assert accepted == everything - {mid(5)}  # the event's other messages were delivered


@responses.activate
@pytest.mark.parametrize("status", [401, 403, 404])
def test_rejected_write_key_or_host_is_retried_not_dead_lettered(worker, outbox, status):
    responses.post(URL, status=status, json={"code": "unauthorized", "message": "bad write key"})
    fill(outbox, 4)
    worker.run_once()
    assert outbox.stats(SEGMENT).dead == 0 and outbox.stats(SEGMENT).pending == 4


def test_pack_keeps_every_request_under_500_kb_in_order_and_an_events_messages_together():
    items = [Item(i // 3, f"r{i // 3}", message(i, size=30_000), len(json.dumps(message(i, size=30_000)))) for i in range(45)]
    chunks = pack(items)
    assert [item.message["messageId"] for chunk in chunks for item in chunk] == [f"m-{i}" for i in range(45)]
    assert all(
        len(json.dumps({"batch": [c.message for c in chunk], "sentAt": "x" * 32, "writeKey": "k" * 64})) < 500_000 for chunk in chunks
    )
    assert all(
        len({item.event_id for item in chunk} & {item.event_id for item in other}) == 0
        for chunk, other in zip(chunks, chunks[1:], strict=False)
    )
    assert len(chunks) == 3


@responses.activate
def test_large_claim_is_sent_in_several_requests(worker, outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 20, size=30_000)  # two answers of 30 KB an event
    worker.run_once()
    assert len(responses.calls) == 3 and outbox.stats(SEGMENT).delivered == 20


@responses.activate
def test_stop_finishes_the_request_in_flight_and_hands_back_the_rest(worker, outbox):
    def answer(request):
        worker.stop()  # SIGTERM arrives while the first request is in flight
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 20, size=30_000)
    worker.run_once()
    stats = outbox.stats(SEGMENT)
    assert len(responses.calls) == 1 and stats.delivered > 0 and stats.pending == 20 - stats.delivered
    assert outbox.next_due_in(SEGMENT) == 0  # given back at once for the next worker


def test_upkeep_forgets_answers_after_retention_days_and_receipts_after_90(outbox, monkeypatch):
    worker = Upkeep(outbox, retention_days=7)
    fill(outbox, 2)
    (a, b) = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", delivered=[a.id, b.id], destination=SEGMENT)
    worker.purge_if_due()
    assert outbox.requeue(source_id="r0", destination=SEGMENT).forgotten == 0  # younger than 7 days: kept
    outbox.settle("w", delivered=[c.id for c in outbox.claim(SEGMENT, 2, 60, "w")], destination=SEGMENT)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 8 * 86400)
    worker._next_purge = 0
    worker.purge_if_due()
    assert outbox.requeue(source_id="r1", destination=SEGMENT).forgotten == 1 and outbox.stats(SEGMENT).delivered == 2
    monkeypatch.setattr(time, "time", lambda: now + 91 * 86400)
    worker._next_purge = 0
    worker.purge_if_due()
    assert outbox.stats(SEGMENT).delivered == 0


@responses.activate
def test_dead_letter_keeps_its_own_error_when_the_rest_of_its_batch_meets_an_outage(worker, outbox):
    def answer(request):
        ids = [m["messageId"] for m in json.loads(gzip.decompress(request.body))["batch"]]
        if mid(1) in ids:
            return 400, {}, json.dumps({"code": "invalid_request", "message": "bad message"})
        if mid(6) in ids:
            return 503, {}, json.dumps({"code": "unavailable", "message": "down"})
        return 200, {}, json.dumps({"success": True})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 8)
    worker.run_once()
    assert outbox.dead_letters(destination=SEGMENT) == [("r1", mid(1), "HTTP 400 invalid_request: bad message")]
    stats = outbox.stats(SEGMENT)
    assert stats.dead == 1 and stats.delivered + stats.pending == 7 and stats.pending > 0


def delivery_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name in ("refiner_source.to_segment.delivery", "refiner_source.delivery.loop")]


@responses.activate
def test_every_delivery_log_line_carries_an_outcome(worker, outbox, caplog):
    caplog.set_level(logging.INFO)
    fill(outbox, 2)
    responses.post(URL, status=503, json={"code": "unavailable", "message": "later"})
    worker.run_once()
    make_due(outbox)
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
    assert any(t.startswith("Segment answered HTTP 401; will retry") and "SEGMENT_WRITE_KEY" in t for t in texts)
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
    assert outbox.stats(SEGMENT).dead == 0 and outbox.stats(SEGMENT).pending == 2


@responses.activate
def test_a_message_that_cannot_be_shrunk_under_32_kb_is_a_dead_letter_with_its_reason(worker, outbox, monkeypatch):
    from refiner_source.to_segment import delivery
    from refiner_source.to_segment.mapping import MessageTooLarge

    real_map = delivery.map_event

    def mapping(event, *args, **kwargs):  # what the mapping raises when nothing is left to shorten
        if event.response_uuid == "r1":
            raise MessageTooLarge("identify for response r1 is over 32 KB with nothing left to shorten")
        return real_map(event, *args, **kwargs)

    monkeypatch.setattr(delivery, "map_event", mapping)
    responses.post(URL, json={"success": True})
    fill(outbox, 2)
    worker.run_once()
    assert (outbox.stats(SEGMENT).dead, outbox.stats(SEGMENT).delivered) == (1, 1)
    assert outbox.dead_letters(destination=SEGMENT) == [
        ("r1", "-", "too large for Segment: identify for response r1 is over 32 KB with nothing left to shorten")
    ]
    assert {m["userId"] for batch in sent_batches() for m in batch} == {"user-0"}


@responses.activate
def test_replay_sends_an_event_again_mapped_anew_with_new_ids(worker, outbox):
    responses.post(URL, json={"success": True})
    fill(outbox, 1)
    worker.run_once()
    assert outbox.requeue(source_id="r0", generation="r1700000000000", destination=SEGMENT).queued == 1
    worker.run_once()
    first, second = sent_batches()
    assert [m["messageId"] for m in second] == [f"{m['messageId']}-r1700000000000" for m in first]


@responses.activate
def test_sigterm_while_bisecting_hands_the_claim_back_instead_of_going_on(worker, outbox):
    def answer(request):
        worker.stop()  # SIGTERM during the first request, which Segment rejects
        return 400, {}, json.dumps({"code": "invalid_request", "message": "bad message"})

    responses.add_callback(responses.POST, URL, callback=answer)
    fill(outbox, 8)
    worker.run_once()
    assert len(responses.calls) == 1  # no bisecting after the stop
    stats = outbox.stats(SEGMENT)
    assert (stats.pending, stats.dead) == (8, 0) and outbox.next_due_in(SEGMENT) == 0


@responses.activate
def test_an_unexpected_error_in_a_round_hands_the_claim_back(worker, outbox, monkeypatch):
    from refiner_source.to_segment import api

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "post", broken)
    fill(outbox, 3)
    with pytest.raises(RuntimeError):
        worker.run_once()
    assert len(outbox.claim(SEGMENT, 10, 60, "next")) == 3  # due again at once, not after the lease


@responses.activate
def test_segment_down_backs_off_more_and_more_whatever_new_events_arrive(outbox):
    worker = segment_loop(outbox, "wk", HOST, batch_size=50, idle_poll=0.01, backoff=Backoff(base=1.0, cap=64.0))
    responses.post(URL, body=requests.ConnectionError("refused"))
    waits = []
    for round_ in range(6):
        outbox.store_many([entry_for(f"new-{round_}")])  # a fresh event (no tries yet) in every claim
        make_due(outbox)
        waits.append(worker.run_once())
    ceilings = [min(64.0, 2.0**n) for n in range(6)]
    assert all(ceiling / 2 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True)), waits
    responses.replace(responses.POST, URL, json={"success": True})
    make_due(outbox)
    worker.run_once()
    assert worker._failures == 0  # delivered: the next outage starts from the bottom again


@responses.activate
def test_segment_rate_limit_after_a_delivered_batch_still_waits_its_retry_after(outbox):
    worker = segment_loop(outbox, "wk", HOST, batch_size=50, idle_poll=0.01, backoff=Backoff(base=0.01, cap=0.05))
    answers = iter([(200, {}, json.dumps({"success": True})), (429, {"Retry-After": "7"}, json.dumps({"code": "rate_limited"}))])
    responses.add_callback(responses.POST, URL, callback=lambda request: next(answers))
    fill(outbox, 12, size=60_000)  # messages near Segment's 32 KB: several batches of 500 KB in one round
    assert worker.run_once() == 7  # the round got somewhere, then was told to wait: it waits
    assert len(responses.calls) == 2 and outbox.stats(SEGMENT).delivered > 0 and outbox.stats(SEGMENT).pending > 0
