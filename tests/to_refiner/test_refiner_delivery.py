"""The delivery worker to Refiner (each contact's calls in order, merged identifies, retries): Loop against a real local
HTTP server standing in for Refiner's REST API, on SQLite and PostgreSQL. Nothing of ours is mocked."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from itertools import count
from typing import Any

import pytest
from sqlalchemy import select, update

from refiner_source.delivery.backoff import Backoff
from refiner_source.delivery.loop import Loop
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.store import PENDING, REFINER, Store
from refiner_source.store import events as events_table
from refiner_source.to_refiner import events as segment_events
from refiner_source.to_refiner.api import RefinerApi
from refiner_source.to_refiner.delivery import refiner_loop
from refiner_source.to_refiner.intake import prepare
from tests.refiner_stub import RefinerStub, max_in_flight
from tests.service import free_port

KEY = "refiner-key"
RULES = MappingRules()
_ids = count()


# --- Segment events as the Webhooks destination posts them ------------------------------------------


def _event(kind: str, user: str | None, mid: str | None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": kind, "messageId": mid or f"msg-{next(_ids)}", **fields}
    if user is not None:
        event["userId"] = user
    return event


def identify(user: str | None, mid: str | None = None, **traits: Any) -> dict[str, Any]:
    return _event("identify", user, mid, traits=traits)


def track(user: str | None, name: str, mid: str | None = None, **fields: Any) -> dict[str, Any]:
    return _event("track", user, mid, event=name, **fields)


def audience(user: str, key: str, entered: bool = True, mid: str | None = None) -> dict[str, Any]:
    name = "Audience Entered" if entered else "Audience Exited"
    return track(user, name, mid, properties={key: entered}, context={"personas": {"computation_key": key}})


def store(outbox: Store, *events: dict[str, Any]) -> list[str]:
    """Store the events as the webhook does; their messageIds."""
    entries = [prepare(segment_events.load(e)) for e in events]
    assert outbox.store_many(entries) == len(entries)
    return [e["messageId"] for e in events]


# --- the store, read directly ------------------------------------------------------------------------


def rows(outbox: Store) -> dict[str, Any]:
    """messageId -> the event's row."""
    with outbox.engine.connect() as conn:
        found = conn.execute(select(events_table).where(events_table.c.destination == REFINER)).all()
    return {r.response_id: r for r in found}


def time_passes(outbox: Store) -> None:
    """Whatever waits to be retried is due now: the wait itself is checked on the row, not slept."""
    with outbox.engine.begin() as conn:
        conn.execute(
            update(events_table)
            .where(events_table.c.destination == REFINER, events_table.c.status == PENDING, events_table.c.claimed_by.is_(None))
            .values(available_at=time.time() - 0.001)
        )


def bodies(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["body"] for c in sorted(calls, key=lambda c: c["at"])]


def by_contact(calls: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    contacts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in sorted(calls, key=lambda c: c["at"]):
        contacts[call["body"].get("id") or call["body"].get("email")].append(call)
    return contacts


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def refiner():
    with RefinerStub() as stub:
        yield stub


@pytest.fixture
def make_worker(outbox, refiner):
    made: list[Loop] = []

    def make(api_key: str = KEY, url: str | None = None, **options: Any) -> Loop:
        options.setdefault("idle_poll", 0.01)
        worker = refiner_loop(outbox, RefinerApi(url or refiner.url, api_key, timeout=5), rules=RULES, **options)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.pool.shutdown(wait=True)


# --- 2xx is delivered ---------------------------------------------------------------------------------


def test_2xx_is_delivered_each_event_as_its_refiner_call(outbox, refiner, make_worker):
    ids = store(
        outbox,
        identify("u1", email="ada@example.com", plan="pro", address={"city": "Paris", "zip": None}, nothing=None),
        _event("group", "u2", None, groupId="acct-9", traits={"name": "Initech", "employees": 50}),
        track("u3", "Signed Up", properties={"plan": "pro"}, context={"traits": {"email": "u3@example.com"}}),
        _event("page", None, None, anonymousId="anon-4", name="Pricing", context={"traits": {"email": "page@example.com"}}),
        audience("u5", "power_users"),
        audience("u6", "churn_risk", entered=False),
    )
    worker = make_worker()
    worker.run_once()

    calls = refiner.posted(status=None)
    assert {c["status"] for c in calls} == {200}
    assert {c["auth"] for c in calls} == {f"Bearer {KEY}"}
    assert sorted((c["path"], sorted(c["body"].items(), key=str)) for c in calls) == sorted(
        (path, sorted(body.items(), key=str))
        for path, body in [
            ("/identify-user", {"id": "u1", "email": "ada@example.com", "plan": "pro", "address_city": "Paris"}),
            ("/identify-user", {"id": "u2", "account": {"id": "acct-9", "name": "Initech", "employees": 50}}),
            ("/track-event", {"id": "u3", "email": "u3@example.com", "event": "Signed Up"}),
            ("/track-event", {"email": "page@example.com", "event": "pageview"}),
            ("/identify-user", {"id": "u5", "power_users": True}),
            ("/identify-user", {"id": "u6", "churn_risk": False}),
        ]
    )
    assert {mid: r.status for mid, r in rows(outbox).items()} == dict.fromkeys(ids, "delivered")
    stats = outbox.stats(REFINER)
    assert (stats.pending, stats.delivered, stats.dead) == (0, 6, 0)
    worker.run_once()
    assert len(refiner.calls) == 6, "a delivered event was sent again"


# --- 429 with Retry-After; 5xx, 408 and network errors: retried ---------------------------------------


def test_429_with_retry_after_is_retried_after_that_delay(outbox, refiner, make_worker):
    refiner.post_script.append((429, {"Retry-After": "7"}, {"message": "Too Many Attempts."}))
    (mid,) = store(outbox, track("u1", "Signed Up"))
    worker = make_worker()
    before = time.time()
    wait = worker.run_once()
    after = time.time()

    assert 6.9 <= wait <= 7.0
    row = rows(outbox)[mid]
    assert row.status == "pending" and row.claimed_by is None and row.attempts == 1
    assert before + 6.9 <= row.available_at <= after + 7.01
    assert "429" in row.last_error
    assert outbox.dead_letters(destination=REFINER) == []

    worker.run_once()
    assert len(refiner.calls) == 1, "retried before Retry-After"
    time_passes(outbox)
    worker.run_once()
    assert [c["status"] for c in refiner.calls] == [429, 200]
    assert rows(outbox)[mid].status == "delivered"


def test_retry_after_is_honoured_even_when_another_contact_is_retried_first(outbox, refiner, make_worker):
    """Contact A's call fails without Retry-After (a short backoff) and contact B's gets 429
    Retry-After: 30 in the same round: A is retried soon, B not before 30 s."""
    answers = {"a": (503, {}, {"message": "down"}), "b": (429, {"Retry-After": "30"}, {"message": "Too Many Attempts."})}
    refiner.respond = lambda path, body: answers.pop(body["id"], None)
    first, second = store(outbox, track("a", "First"), track("b", "Second"))
    worker = make_worker(backoff=Backoff(base=0.5, cap=60))
    before = time.time()
    wait = worker.run_once()

    assert sorted(c["status"] for c in refiner.calls) == [429, 503]
    assert rows(outbox)[second].available_at >= before + 29.9, "Refiner's Retry-After: 30 was not honoured"
    assert wait < 1.0  # the backoff of A, which is not bound by B's Retry-After
    time.sleep(wait)
    worker.run_once()
    assert rows(outbox)[first].status == "delivered"
    assert [c["body"]["id"] for c in refiner.calls].count("b") == 1, "B was called again before its Retry-After"


@pytest.mark.parametrize("status", [408, 500, 502, 503])
def test_5xx_and_408_are_retried_with_backoff(outbox, refiner, make_worker, status):
    refiner.post_script.append((status, {}, {"message": "Server Error"}))
    (mid,) = store(outbox, identify("u1", plan="pro"))
    worker = make_worker(backoff=Backoff(base=8.0, cap=64.0))
    before = time.time()
    wait = worker.run_once()

    assert 4.0 <= wait <= 8.0  # the first backoff: between half the ceiling and the ceiling
    row = rows(outbox)[mid]
    assert row.status == "pending" and before + 3.9 <= row.available_at <= time.time() + 8.01
    assert str(status) in row.last_error
    assert outbox.dead_letters(destination=REFINER) == []
    time_passes(outbox)
    worker.run_once()
    assert [c["status"] for c in refiner.calls] == [status, 200]
    assert rows(outbox)[mid].status == "delivered"


def test_network_errors_are_retried_with_growing_backoff(outbox, refiner, make_worker):
    (mid,) = store(outbox, track("u1", "Signed Up"))
    worker = make_worker(url=f"http://127.0.0.1:{free_port()}/v1", backoff=Backoff(base=8.0, cap=64.0))  # nothing listens there
    first = worker.run_once()
    time_passes(outbox)
    second = worker.run_once()

    assert 4.0 <= first <= 8.0 and 8.0 <= second <= 16.0
    row = rows(outbox)[mid]
    assert row.status == "pending" and row.attempts == 2 and "network" in row.last_error
    assert outbox.dead_letters(destination=REFINER) == []
    worker.to.api = RefinerApi(refiner.url, KEY, timeout=5)  # Refiner reachable again
    time_passes(outbox)
    worker.run_once()
    assert bodies(refiner.posted()) == [{"id": "u1", "event": "Signed Up"}]
    assert rows(outbox)[mid].status == "delivered"


# --- 401/403: retried, logged as a key problem --------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_retried_and_logged_as_a_key_problem(outbox, refiner, make_worker, caplog, status):
    caplog.set_level(logging.INFO)
    forbidden = [True]
    if status == 401:
        worker = make_worker(api_key="not-the-projects-key")  # the stub checks the Bearer key itself
    else:
        refiner.respond = lambda path, body: (403, {}, {"message": "This action is unauthorized."}) if forbidden else None
        worker = make_worker()
    ids = store(outbox, track("u1", "Signed Up"), identify("u2", plan="pro"))
    wait = worker.run_once()

    assert wait > 0
    assert {r.status for r in rows(outbox).values()} == {"pending"}
    assert outbox.dead_letters(destination=REFINER) == [] and outbox.stats(REFINER).dead == 0
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR and "REFINER_API_KEY" in r.getMessage()]
    assert problems and getattr(problems[0], "status", None) == status, [r.getMessage() for r in caplog.records]
    assert "not-the-projects-key" not in caplog.text

    assert {c["status"] for c in refiner.calls} == {status}
    if status == 401:
        worker.to.api = RefinerApi(refiner.url, KEY, timeout=5)  # the operator fixed REFINER_API_KEY
    forbidden.clear()
    time_passes(outbox)
    worker.run_once()
    assert {mid: r.status for mid, r in rows(outbox).items()} == dict.fromkeys(ids, "delivered")
    assert {c["auth"] for c in refiner.posted()} == {f"Bearer {KEY}"}


# --- other 4xx: a dead letter with Refiner's answer, the others delivered ----------------------------


@pytest.mark.parametrize("status", [400, 409, 422])
def test_other_4xx_makes_a_dead_letter_with_refiners_answer_while_the_others_are_delivered(outbox, refiner, make_worker, status):
    refusal = {"message": "The email must be a valid email address.", "errors": {"email": ["invalid"]}}
    refiner.respond = lambda path, body: (status, {}, refusal) if body.get("email") == "not-an-email" else None
    ids = store(
        outbox,
        track("u1", "Signed Up"),
        identify("bad", email="not-an-email"),
        track("bad", "Later"),  # the same contact's next call is not at fault
        identify("u2", plan="pro"),
        track("u3", "Plan Upgraded"),
    )
    make_worker().run_once()

    ((message_id, letter_id, error),) = outbox.dead_letters(destination=REFINER)
    assert message_id == ids[1] and letter_id == ids[1]
    assert error.startswith(f"HTTP {status}") and "The email must be a valid email address." in error
    assert {mid: r.status for mid, r in rows(outbox).items()} == {**dict.fromkeys(ids, "delivered"), ids[1]: "dead"}
    assert {"id": "bad", "event": "Later"} in bodies(refiner.posted())
    stats = outbox.stats(REFINER)
    assert (stats.pending, stats.delivered, stats.dead) == (0, 4, 1)
    assert len(refiner.calls) == 5  # each once: the refused call is not retried


# --- one contact's calls keep their order -----------------------------------------------------------


def test_one_contacts_calls_keep_their_order(outbox, refiner, make_worker):
    refiner.delay = 0.02
    contacts = ["a", "b", "c", "d", "e", "f"]
    for step in range(5):
        store(outbox, *[track(user, f"{user}{step}") for user in contacts])
    store(outbox, *[identify(user, seen=True) for user in contacts], *[track(user, f"{user}5") for user in contacts])
    make_worker(concurrency=4).run_once()

    sent = by_contact(refiner.posted())
    assert sorted(sent) == contacts
    for user, calls in sent.items():
        names = [c["body"].get("event", "identify") for c in calls]
        assert names == [f"{user}{i}" for i in range(5)] + ["identify", f"{user}5"]
        for earlier, later in zip(calls, calls[1:], strict=False):
            assert later["at"] >= earlier["done"], f"{user}: a call was sent before the one before it was answered"


def test_a_later_call_of_a_contact_never_overtakes_one_being_retried_while_other_contacts_go_on(outbox, refiner, make_worker):
    failed = []

    def respond(path, body):
        if body.get("event") == "a1" and not failed:
            failed.append(body)
            return (503, {}, {"message": "down"})
        return None

    refiner.respond = respond
    store(outbox, track("a", "a1"), track("b", "b1"), track("a", "a2"), track("a", "a3"), track("b", "b2"))
    worker = make_worker(backoff=Backoff(base=10.0, cap=10.0))
    worker.run_once()
    assert [c["body"]["event"] for c in refiner.posted()] == ["b1", "b2"]
    assert [c["body"]["event"] for c in refiner.posted(status=503)] == ["a1"]

    # Round two, while a1 waits to be retried: a new call of `a` waits behind it, `b` goes on.
    store(outbox, track("a", "a4"), track("b", "b3"))
    worker.run_once()
    assert [c["body"]["event"] for c in refiner.posted()] == ["b1", "b2", "b3"]
    assert {r.response_id for r in rows(outbox).values() if r.status == "pending"} == {
        r.response_id for r in rows(outbox).values() if r.contact == "id:a"
    }

    time_passes(outbox)
    worker.run_once()
    assert [c["body"]["event"] for c in by_contact(refiner.posted(status=None))["a"]] == ["a1", "a1", "a2", "a3", "a4"]
    assert outbox.stats(REFINER).pending == 0 and outbox.stats(REFINER).delivered == 7


def test_two_workers_on_one_store_keep_each_contacts_order(outbox, refiner, make_worker):
    refiner.delay = 0.01
    contacts = [f"c{i}" for i in range(8)]
    for step in range(6):
        store(outbox, *[track(user, f"{user}-{step}") for user in contacts])
    workers = [make_worker(concurrency=3, batch_size=5) for _ in range(2)]
    deadline = time.monotonic() + 30

    def drain(worker: Loop) -> None:
        while outbox.stats(REFINER).pending and time.monotonic() < deadline:
            worker.run_once()

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outbox.stats(REFINER).delivered == 48
    sent = by_contact(refiner.posted(status=None))
    for user in contacts:
        calls = sent[user]
        assert [c["body"]["event"] for c in calls] == [f"{user}-{step}" for step in range(6)]
        for earlier, later in zip(calls, calls[1:], strict=False):
            assert later["at"] >= earlier["done"]


# --- identify calls of one contact waiting together are merged (later values win) --------------------


def test_identify_calls_of_one_contact_waiting_together_are_merged_later_values_win(outbox, refiner, make_worker):
    # An Engage first sync: one identify per audience the user is in, all at once.
    first_sync = [identify("u1", **{f"audience_{i}": True}) for i in range(5)]
    first_sync[0]["traits"].update(email="ada@example.com", plan="free")
    first_sync[3]["traits"].update(plan="pro")
    ids = store(
        outbox,
        *first_sync,
        identify("u2", plan="team"),
        audience("u1", "power_users"),
        audience("u1", "power_users", entered=False),  # later values win
    )
    make_worker().run_once()

    calls = refiner.posted(status=None)
    assert len(calls) == 2
    assert by_contact(calls)["u1"][0]["body"] == {
        "id": "u1",
        "email": "ada@example.com",
        "plan": "pro",
        "audience_0": True,
        "audience_1": True,
        "audience_2": True,
        "audience_3": True,
        "audience_4": True,
        "power_users": False,
    }
    assert by_contact(calls)["u2"][0]["body"] == {"id": "u2", "plan": "team"}
    assert {mid: r.status for mid, r in rows(outbox).items()} == dict.fromkeys(ids, "delivered")


def test_merging_never_moves_an_identify_across_a_track_of_the_same_contact(outbox, refiner, make_worker):
    store(outbox, identify("u1", plan="free"), track("u1", "Plan Upgraded"), identify("u1", plan="pro"), identify("u1", seats=3))
    make_worker().run_once()
    assert bodies(refiner.posted(status=None)) == [
        {"id": "u1", "plan": "free"},
        {"id": "u1", "event": "Plan Upgraded"},
        {"id": "u1", "plan": "pro", "seats": 3},
    ]


def test_a_merged_call_refused_is_resent_call_by_call_and_only_the_culprit_is_dead(outbox, refiner, make_worker):
    refusal = {"message": "The given data was invalid.", "errors": {"birthday": ["not a date"]}}
    refiner.respond = lambda path, body: (422, {}, refusal) if "birthday" in body else None
    ids = store(
        outbox,
        identify("u1", plan="pro"),
        identify("u1", birthday="someday"),
        identify("u1", seats=3),
        identify("u2", plan="team"),
    )
    make_worker().run_once()

    sent = by_contact(refiner.posted(status=None))
    assert [(c["status"], c["body"]) for c in sent["u1"]] == [
        (422, {"id": "u1", "plan": "pro", "birthday": "someday", "seats": 3}),
        (200, {"id": "u1", "plan": "pro"}),
        (422, {"id": "u1", "birthday": "someday"}),
        (200, {"id": "u1", "seats": 3}),
    ]
    assert [(c["status"], c["body"]) for c in sent["u2"]] == [(200, {"id": "u2", "plan": "team"})]
    ((message_id, _letter, error),) = outbox.dead_letters(destination=REFINER)
    assert message_id == ids[1] and error.startswith("HTTP 422") and "not a date" in error
    assert {mid: r.status for mid, r in rows(outbox).items()} == {**dict.fromkeys(ids, "delivered"), ids[1]: "dead"}


# --- REFINER_API_CONCURRENCY: the most requests in flight ------------------------------------------


def test_more_requests_are_in_flight_while_refiner_answers_quickly_up_to_the_ceiling(outbox, refiner, make_worker):
    refiner.delay = 0.05
    store(outbox, *[track(f"u{i}", "Signed Up") for i in range(60)])
    worker = make_worker(concurrency=12)
    worker.run_once()
    calls = refiner.posted()
    assert len(calls) == 60
    assert 4 < max_in_flight(calls) <= 12 and worker.window.limit > 4  # it started at 4, and grew


def test_fewer_requests_are_in_flight_once_refiner_answers_429(outbox, refiner, make_worker):
    refiner.delay = 0.2  # the three calls in flight at once
    refiner.post_script.extend([(429, {"Retry-After": "0"}, {"message": "Too Many Attempts."})] * 3)
    store(outbox, *[track(f"u{i}", "Signed Up") for i in range(3)])
    worker = make_worker(concurrency=32)
    worker.run_once()
    assert worker.window.halved == 1 and worker.window.limit == 2  # once: the three were in flight together
    assert outbox.stats(REFINER).pending == 3  # each to be retried


@pytest.mark.parametrize("concurrency", [2, 4])
def test_at_most_concurrency_requests_are_in_flight(outbox, refiner, make_worker, concurrency):
    refiner.delay = 0.2
    store(outbox, *[track(f"u{i}", "Signed Up") for i in range(8)])
    make_worker(concurrency=concurrency).run_once()

    calls = refiner.posted()
    assert len(calls) == 8
    assert max_in_flight(calls) == concurrency
