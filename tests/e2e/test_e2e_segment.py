"""End to end, Segment to Refiner: `refiner-source serve` as a user starts it, with
SEGMENT_SHARED_SECRET and REFINER_API_KEY set, a local HTTP server standing in for Refiner's REST API (tests/refiner_stub.py)
and one for Segment (tests/segment_stub.py). Events are posted as Segment's Webhooks destination posts them."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest
import requests

from tests.browser_events import LARGEST_BATCH, browser_event
from tests.browser_events import batch as browser_batch
from tests.conftest import SECRET, load_fixture
from tests.refiner_stub import RefinerStub
from tests.service import Service, command, free_port, wait_until

SHARED_SECRET = "segment-shared-secret-0123456789"
API_KEY = "refiner-e2e-key"
WRITE_KEY = "e2e-write-key"
SEGMENT_TIMEOUT = 10  # seconds: Segment's Webhooks (Actions) destination gives up on a request then, and retries it


# --- the service and its two stand-ins ---------------------------------------------------------------


@pytest.fixture
def refiner():
    with RefinerStub(api_key=API_KEY) as stub:
        yield stub


@pytest.fixture
def make_service(tmp_path, refiner, segment):
    started: list[Service] = []

    def make(database_url: str | None = None, **env: str) -> Service:
        service = Service(
            ["serve"],
            {
                "PORT": str(free_port()),
                "WEB_CONCURRENCY": "2",
                "DATABASE_URL": database_url or f"sqlite:///{tmp_path / 'e2e-segment.db'}",
                "SEGMENT_HOST": segment.url,
                "SEGMENT_WRITE_KEY": WRITE_KEY,
                "REFINER_WEBHOOK_SECRET": SECRET,
                "SEGMENT_SHARED_SECRET": SHARED_SECRET,
                "REFINER_API_KEY": API_KEY,
                "REFINER_API_URL": refiner.url,
                **env,
            },
            tmp_path / f"service-{len(started)}.log",
        )
        started.append(service)
        return service

    yield make
    problems = []
    for service in started:
        running = service.process is not None and service.process.poll() is None
        began = time.monotonic()
        code = service.stop()
        if running and (code != 0 or time.monotonic() - began > 10):
            problems.append(f"SIGTERM: exit {code} after {time.monotonic() - began:.1f}s:\n{service.logs()[-2000:]}")
    assert not problems, problems[0]


def status(service: Service) -> dict[str, Any]:
    """`refiner-source status --json --to refiner`, run as the operator would, with the service's settings."""
    done = subprocess.run([*command(), "status", "--json", "--to", "refiner"], env=service.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["directions"]["refiner"]


def settled(service: Service, delivered: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until nothing is pending and `delivered` events are delivered; the status."""
    return wait_until(
        lambda: (s := status(service))["pending"] == 0 and s["delivered"] >= delivered and s,
        timeout,
        f"{delivered} delivered and none pending",
    )


# --- posting as Segment does ---------------------------------------------------------------------------


def sign(raw: bytes, secret: str = SHARED_SECRET) -> str:
    return hmac.new(secret.encode(), raw, hashlib.sha1).hexdigest()


def batch_text(events: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(a batch's body, the exact text of its first element), spaced as no re-serialisation would be."""
    elements = [json.dumps(e, indent=1).encode() for e in events]
    return b"[\n  " + b" ,\n  ".join(elements) + b"\n]\n", elements[0]


def post_segment(service: Service, raw: bytes, headers: dict[str, str] | None = None, query: str = "", timeout: float = 10):
    return requests.post(
        f"{service.url}/webhooks/segment{query}",
        data=raw,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=timeout,
    )


def post_signed(service: Service, event: dict[str, Any], timeout: float = 10) -> requests.Response:
    raw = json.dumps(event).encode()
    return post_segment(service, raw, {"X-Signature": sign(raw)}, timeout=timeout)


def accepted(answer: requests.Response, new: int, duplicate: int = 0, ignored: int = 0) -> bool:
    """The answer is 200 with these counts, and nothing invalid."""
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["accepted"], body["duplicate"], body["ignored"], body["invalid"]) == (
        "accepted",
        new,
        duplicate,
        ignored,
        [],
    ), body
    return True


def message_id() -> str:
    return f"ajs-{uuid.uuid4()}"


def segment_track(user: str, name: str, mid: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": mid or message_id(),
        "userId": user,
        "anonymousId": f"anon-{user}",
        "event": name,
        "properties": {"revenue": 99, "plan": "pro"},
        "context": {"library": {"name": "analytics.js", "version": "4.1.0"}, "ip": "203.0.113.9"},
        "timestamp": "2026-11-18T16:42:57.000Z",
        "receivedAt": "2026-11-18T16:42:58.120Z",
        "sentAt": "2026-11-18T16:42:57.900Z",
        "integrations": {},
        "version": 2,
        **fields,
    }


def calls_of(refiner: RefinerStub, status: int | None = 200) -> list[tuple[str, dict[str, Any]]]:
    return sorted(((c["path"], c["body"]) for c in refiner.posted(status=status)), key=lambda pb: json.dumps(pb, sort_keys=True))


# --- mapping, signatures ------------------------------------------------------------------------------


def test_e2e_single_and_batched_events_signed_both_ways_arrive_as_the_mapping_calls(make_service, refiner, store_url):
    service = make_service(store_url).start()
    identify = {
        "type": "identify",
        "messageId": message_id(),
        "userId": "u1",
        "anonymousId": "anon-1",
        "traits": {
            "email": "ada@example.com",
            "name": "Ada",
            "address": {"city": "Paris", "country": "FR"},
            "plan": None,
            "order_completed_last_30days": True,  # an Engage audience, as a trait
        },
        "context": {"ip": "203.0.113.9", "library": {"name": "analytics.js", "version": "4.1.0"}},
        "timestamp": "2026-11-18T16:42:57.000Z",
    }
    group = {
        "type": "group",
        "messageId": message_id(),
        "userId": "u2",
        "groupId": "acct-1",
        "traits": {"name": "Initech", "employees": 50, "address": {"country": "US"}},
        "context": {"traits": {"email": "u2@example.com", "name": "Bob"}},
    }
    track = segment_track("u3", "Plan Upgraded")
    page = {
        "type": "page",
        "messageId": message_id(),
        "anonymousId": "anon-4",
        "name": "Pricing",
        "properties": {"path": "/pricing", "url": "https://example.com/pricing"},
        "context": {"traits": {"email": "visitor@example.com"}, "page": {"path": "/pricing"}},
    }
    personas = {"computation_key": "power_users", "computation_class": "audience", "space_id": "spa_1", "computation_id": "aud_1"}
    entered = segment_track("u5", "Audience Entered", properties={"audience_key": "power_users", "power_users": True})
    entered["context"] = {"personas": personas}
    exited = segment_track("u6", "Audience Exited", properties={"audience_key": "power_users", "power_users": False})
    exited["context"] = {"personas": personas, "traits": {"email": "u6@example.com"}}

    raw = json.dumps(identify).encode()
    assert accepted(post_segment(service, raw, {"X-Signature": sign(raw)}), 1)  # over the raw body
    batch, first = batch_text([group, track, page])
    assert accepted(post_segment(service, batch, {"X-Signature": sign(first)}), 3)  # over the batch's first element
    assert accepted(post_segment(service, json.dumps(entered).encode(), {"Authorization": f"Bearer {SHARED_SECRET}"}), 1)
    assert accepted(post_segment(service, json.dumps([exited]).encode(), query=f"?token={SHARED_SECRET}"), 1)

    refiner.wait_for_calls(lambda calls: len(calls) >= 6, timeout=20)
    assert calls_of(refiner, status=None) == sorted(
        [
            (
                "/identify-user",
                {
                    "id": "u1",
                    "email": "ada@example.com",
                    "name": "Ada",
                    "address_city": "Paris",
                    "address_country": "FR",
                    "order_completed_last_30days": True,
                },
            ),
            (
                "/identify-user",
                {
                    "id": "u2",
                    "email": "u2@example.com",
                    "account": {"id": "acct-1", "name": "Initech", "employees": 50, "address_country": "US"},
                },
            ),
            ("/track-event", {"id": "u3", "event": "Plan Upgraded"}),
            ("/track-event", {"email": "visitor@example.com", "event": "pageview"}),
            ("/identify-user", {"id": "u5", "power_users": True}),
            ("/identify-user", {"id": "u6", "email": "u6@example.com", "power_users": False}),
        ],
        key=lambda pb: json.dumps(pb, sort_keys=True),
    )
    assert {c["auth"] for c in refiner.posted()} == {f"Bearer {API_KEY}"}
    final = settled(service, 6)
    assert (final["delivered"], final["dead"]) == (6, 0)
    logs = service.logs()
    assert "Traceback" not in logs
    assert SHARED_SECRET not in logs and API_KEY not in logs and "ada@example.com" not in logs


def test_e2e_bad_signature_is_401_and_stores_nothing(make_service, refiner):
    service = make_service().start()
    event = segment_track("intruder", "Signed Up")
    raw = json.dumps(event).encode()
    batch, first = batch_text([segment_track("intruder", "First"), event])
    second = json.dumps(event, indent=1).encode()
    refused = [
        ("signed with another secret", post_segment(service, raw, {"X-Signature": sign(raw, "another-secret-0123456789")})),
        ("signature of another body", post_segment(service, raw.replace(b"Signed Up", b"Signed Out"), {"X-Signature": sign(raw)})),
        ("batch signed over its second element", post_segment(service, batch, {"X-Signature": sign(second)})),
        (
            "batch whose first element was changed",
            post_segment(service, batch.replace(b'"First"', b'"Other"', 1), {"X-Signature": sign(first)}),
        ),
        ("no signature, no token", post_segment(service, raw)),
        ("wrong bearer", post_segment(service, raw, {"Authorization": "Bearer " + "x" * len(SHARED_SECRET)})),
        ("wrong token", post_segment(service, raw, query="?token=" + SHARED_SECRET[:-1])),
        ("the Refiner webhook's token", post_segment(service, raw, query=f"?token={SECRET}")),
    ]
    for name, answer in refused:
        assert answer.status_code == 401, (name, answer.status_code, answer.text)
        assert answer.json()["error"], name
    assert {k: status(service)[k] for k in ("pending", "delivered", "dead")} == {"pending": 0, "delivered": 0, "dead": 0}

    # The worker is running: a good event, posted after the bad ones, is the only one to arrive.
    assert accepted(post_signed(service, segment_track("welcome", "Signed Up")), 1)
    refiner.wait_for_calls(lambda calls: len(calls) >= 1, timeout=20)
    assert settled(service, 1)["delivered"] == 1
    assert calls_of(refiner, status=None) == [("/track-event", {"id": "welcome", "event": "Signed Up"})]


def test_e2e_same_message_id_twice_makes_one_call(make_service, refiner):
    service = make_service().start()
    event = segment_track("u1", "Signed Up")
    assert accepted(post_signed(service, event), 1)
    assert accepted(post_signed(service, event), 0, duplicate=1)
    other = segment_track("u2", "Signed Up")
    batch, first = batch_text([other, other, event])  # Segment retrying a batch, with a repeat inside it
    assert accepted(post_segment(service, batch, {"X-Signature": sign(first)}), 1, duplicate=2)

    refiner.wait_for_calls(lambda calls: len(calls) >= 2, timeout=20)
    settled(service, 2)
    assert accepted(post_signed(service, event), 0, duplicate=1)  # after delivery too
    assert accepted(post_signed(service, segment_track("u3", "Signed Up")), 1)
    refiner.wait_for_calls(lambda calls: any(c["body"]["id"] == "u3" for c in calls), timeout=20)
    assert settled(service, 3)["delivered"] == 3
    assert Counter(c["body"]["id"] for c in refiner.posted(status=None)) == {"u1": 1, "u2": 1, "u3": 1}


def test_e2e_loop_guard_refiner_false_and_refiner_sources_own_messages_make_no_call(make_service, refiner, segment):
    service = make_service().start()
    # What refiner-source sends to Segment, which a workspace's Webhooks destination sends back here.
    assert (
        requests.post(
            f"{service.url}/webhooks/refiner?token={SECRET}", json=load_fixture("webhook_completed_survey.json"), timeout=10
        ).status_code
        == 202
    )
    own = segment.wait_for(lambda received: len(received) >= 3, timeout=20)
    assert {m["integrations"].get("Refiner") for m in own} == {False}
    batch, first = batch_text(own)
    answer = post_segment(service, batch, {"X-Signature": sign(first)})
    assert accepted(answer, 0, ignored=3)
    assert all("integrations.Refiner" in r["reason"] for r in answer.json()["ignored_reasons"])

    assert accepted(post_signed(service, segment_track("u1", "Signed Up", integrations={"Refiner": False})), 0, ignored=1)
    assert accepted(post_signed(service, segment_track("u2", "Signed Up", integrations={"All": False})), 0, ignored=1)
    assert accepted(post_signed(service, segment_track("u3", "Signed Up", integrations={"All": False, "Refiner": True})), 1)
    assert accepted(post_signed(service, segment_track("u4", "Signed Up", integrations={"All": True, "Webhooks": True})), 1)

    refiner.wait_for_calls(lambda calls: len(calls) >= 2, timeout=20)
    assert settled(service, 2)["delivered"] == 2
    assert calls_of(refiner, status=None) == [
        ("/track-event", {"id": "u3", "event": "Signed Up"}),
        ("/track-event", {"id": "u4", "event": "Signed Up"}),
    ]
    assert len(segment.received()) == 3, "an event came back to Segment"


# --- Refiner saying "not now" -------------------------------------------------------------------------


def test_e2e_refiner_429_with_retry_after_then_503_for_a_while_then_everything_delivered_in_order(make_service, refiner):
    refiner.post_script.append((429, {"Retry-After": "1"}, {"message": "Too Many Attempts."}))
    refiner.post_script.extend([(503, {}, {"message": "Service Unavailable"})] * 5)
    service = make_service().start()
    users = [f"user-{i}" for i in range(4)]
    events = [segment_track(user, f"{user} step {step}") for step in range(5) for user in users]
    batch, first = batch_text(events)
    assert accepted(post_segment(service, batch, {"X-Signature": sign(first)}), 20)

    refiner.wait_for_calls(lambda calls: len({c["body"]["event"] for c in calls}) >= 20, timeout=45)
    final = settled(service, 20)
    assert (final["delivered"], final["dead"]) == (20, 0)
    calls = sorted(refiner.posted(status=None), key=lambda c: c["at"])
    assert Counter(c["status"] for c in calls) == {429: 1, 503: 5, 200: 20}
    for user in users:
        mine = [c for c in calls if c["body"]["id"] == user]
        assert [c["body"]["event"] for c in mine if c["status"] == 200] == [f"{user} step {step}" for step in range(5)]
        for refused, following in zip(mine, mine[1:], strict=False):
            if refused["status"] == 429:
                assert following["at"] - refused["done"] >= 0.99, "Retry-After: 1 was not honoured"
            if refused["status"] != 200:
                assert following["body"] == refused["body"], "a later call overtook one being retried"


# --- a crash mid-burst -------------------------------------------------------------------------------


def _burst(service: Service, events: list[dict[str, Any]], acknowledged: list[str], stop: threading.Event) -> None:
    session = requests.Session()
    for event in events:
        if stop.is_set():
            return
        raw = json.dumps(event).encode()
        try:
            answer = session.post(
                f"{service.url}/webhooks/segment",
                data=raw,
                headers={"X-Signature": sign(raw), "Content-Type": "application/json"},
                timeout=5,
            )
        except requests.RequestException:
            continue
        if answer.status_code == 200 and answer.json()["accepted"] == 1:
            acknowledged.append(event["messageId"])


def test_e2e_sigkill_mid_burst_then_restart_delivers_every_acknowledged_event(make_service, refiner):
    down = [True]  # Refiner answers 503 until the restart: only the store holds the events at the kill
    refiner.respond = lambda path, body: (503, {}, {"message": "Service Unavailable"}) if down else None
    first = make_service().start()
    port = first.port
    mids = [message_id() for _ in range(300)]
    events = [segment_track(f"user-{i % 10}", f"burst {mid}", mid) for i, mid in enumerate(mids)]
    acknowledged: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_burst, args=(first, events[k::3], acknowledged, stop)) for k in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 100 or not any(t.is_alive() for t in threads), 30, "100 events acknowledged")
    first.kill(signal.SIGKILL)  # the whole process group, while the threads are still posting
    first.process.wait(10)
    stop.set()
    for thread in threads:
        thread.join()
    assert 100 <= len(acknowledged) < 300, "the kill did not land mid-burst"
    assert refiner.posted() == [], "something was delivered before the kill"

    down.clear()
    make_service(PORT=str(port)).start()
    # A round in flight at the kill keeps its events until their lease (60 s) runs out: allow for it.
    calls = refiner.wait_for_calls(
        lambda calls: {c["body"]["event"] for c in calls} >= {f"burst {mid}" for mid in acknowledged}, timeout=75
    )
    sent = Counter(c["body"]["event"] for c in calls)
    assert set(sent) <= {e["event"] for e in events}
    # Nothing was delivered before the kill, so nothing needed to be sent twice after it.
    assert set(sent.values()) == {1}, [name for name, n in sent.items() if n > 1]


def test_e2e_sigterm_stops_both_delivery_loops_at_once(make_service, refiner):
    """The Refiner loop runs in a thread of the delivery worker: SIGTERM to the group (Heroku's
    restart) still ends everything at once, several times over (it once hung until SIGKILL)."""
    for attempt in range(3):
        service = make_service().start()
        assert accepted(post_signed(service, segment_track(f"u{attempt}", "Signed Up")), 1)
        refiner.wait_for_calls(lambda calls, n=attempt + 1: len(calls) >= n, timeout=20)
        began = time.monotonic()
        service.kill(signal.SIGTERM)
        try:
            code = service.process.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the service within 20 s:\n{service.logs()[-2000:]}")
        assert code == 0, service.logs()[-2000:]
        assert time.monotonic() - began < 5, "SIGTERM took the supervisor's deadline"
        stopped = [json.loads(line) for line in service.logs().splitlines() if '"delivery worker stopped"' in line]
        assert sorted(entry["destination"] for entry in stopped) == ["refiner", "segment"]


# --- Segment's largest batches ---------------------------------------------------------------------------


def test_e2e_largest_batch_segment_sends_is_taken_whole_within_segments_timeout_and_each_event_reaches_refiner_once(
    make_service, refiner
):
    """4,000 events as analytics.js sends them, over 8 MiB, signed by their first as Segment signs a
    batch; posted with Segment's own 10 s timeout, which a slower answer would exceed."""
    service = make_service().start()
    events = [browser_event(i, "e2e-largest") for i in range(LARGEST_BATCH)]
    body, first = browser_batch(events)
    assert len(body) > 8 << 20
    assert accepted(post_segment(service, body, {"X-Signature": sign(first)}, timeout=SEGMENT_TIMEOUT), LARGEST_BATCH)
    assert accepted(post_segment(service, body, {"X-Signature": sign(first)}, timeout=SEGMENT_TIMEOUT), 0, duplicate=LARGEST_BATCH)

    expected = Counter((e["userId"], e.get("event", "pageview")) for e in events)
    refiner.wait_for_calls(lambda calls: len(calls) >= LARGEST_BATCH, timeout=120)
    assert settled(service, LARGEST_BATCH, timeout=60)["dead"] == 0
    assert Counter((c["body"]["id"], c["body"]["event"]) for c in refiner.posted()) == expected


def test_e2e_largest_batch_with_one_bad_event_stores_all_the_others(make_service, refiner):
    service = make_service().start()
    events = [browser_event(i, "e2e-one-bad") for i in range(LARGEST_BATCH)]
    del events[1234]["messageId"]
    body, first = browser_batch(events)
    answer = post_segment(service, body, {"X-Signature": sign(first)}, timeout=SEGMENT_TIMEOUT)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["accepted"], [i["index"] for i in answer.json()["invalid"]]) == (LARGEST_BATCH - 1, [1234])
    assert "messageId" in answer.json()["invalid"][0]["error"]
    refiner.wait_for_calls(lambda calls: len(calls) >= LARGEST_BATCH - 1, timeout=120)
    assert settled(service, LARGEST_BATCH - 1, timeout=60)["delivered"] == LARGEST_BATCH - 1
