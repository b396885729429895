"""End to end: `refiner-source serve` as the README starts it, a local HTTP server standing in for Segment."""

from __future__ import annotations

import base64
import copy
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests import expected
from tests.conftest import SECRET, load_fixture
from tests.service import Service, free_port

WRITE_KEY = "e2e-write-key"


@pytest.fixture
def make_service(tmp_path, store_url, segment):
    started: list[Service] = []

    def make(**env: str) -> Service:
        service = Service(
            ["serve"],
            {
                "PORT": str(free_port()),
                "WEB_CONCURRENCY": "2",
                "DATABASE_URL": store_url,
                "SEGMENT_HOST": segment.url,
                "SEGMENT_WRITE_KEY": WRITE_KEY,
                "REFINER_WEBHOOK_SECRET": SECRET,
                **env,
            },
            tmp_path / f"service-{len(started)}.log",
        )
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


def post(service: Service, body: dict, timeout: float = 10) -> requests.Response:
    return requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=body, timeout=timeout)


def unique_body(i: int) -> dict:
    body = copy.deepcopy(load_fixture("webhook_completed_survey.json"))
    body["response"]["uuid"] = f"resp-{i}-{uuid.uuid4().hex[:8]}"
    body["remote_id"] = f"user-{i}"
    return body


def tracks(received: list[dict]) -> set[str]:
    return {m["properties"]["response_id"] for m in received if m["type"] == "track"}


def test_e2e_fixture_arrives_as_identify_group_track_field_by_field(make_service, segment):
    service = make_service().start()
    body = load_fixture("webhook_completed_survey.json")
    answer = post(service, body)
    assert answer.status_code == 202 and answer.json()["messages"] == 3

    identify, group, track = segment.wait_for(lambda r: len(r) >= 3, timeout=20)
    for message in (identify, group, track):
        assert message["userId"] == "user-8812"
        assert message["timestamp"] == "2026-11-18T16:42:57.000+00:00"
        assert message["integrations"] == {"Refiner": False}
        assert message["context"]["library"]["name"] == "analytics-python"
        assert message["messageId"].startswith("refiner-a3e1c2f0-a5d1-11ef-b050-03a44b320007-completed-survey-")
    assert identify["type"] == "identify"
    assert identify["traits"] == expected.IDENTIFY_TRAITS
    assert group["type"] == "group" and group["groupId"] == "acct-initech"
    assert group["traits"] == expected.GROUP_TRAITS
    assert track["type"] == "track" and track["event"] == "Survey Completed"
    assert track["properties"] == expected.TRACK_PROPERTIES
    (request,) = segment.requests
    assert request["headers"]["Content-Encoding"] == "gzip"
    assert request["headers"]["Authorization"] == "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    assert request["body"]["writeKey"] == WRITE_KEY
    assert "Product Manager" not in service.logs() and "ada@initech.example" not in service.logs()
    assert SECRET not in service.logs()


def test_e2e_same_webhook_twice_gives_one_set_of_messages(make_service, segment):
    service = make_service().start()
    body = load_fixture("webhook_completed_survey.json")
    assert post(service, body).status_code == 202
    second = post(service, body)
    assert second.status_code == 200 and second.json()["status"] == "duplicate"
    segment.wait_for(lambda r: len(r) >= 3)
    time.sleep(1.0)
    assert len(segment.received()) == 3


def test_e2e_segment_503_then_429_with_retry_after_delivers_everything_after_the_wait(make_service, segment):
    segment.script.extend(
        [
            (503, {}, {"code": "unavailable", "message": "down"}),
            (503, {}, {"code": "unavailable", "message": "down"}),
            (429, {"Retry-After": "2"}, {"code": "rate_limited", "message": "slow down"}),
            (429, {"Retry-After": "1"}, {"code": "rate_limited", "message": "slow down"}),
        ]
    )
    service = make_service().start()
    ids = []
    for i in range(20):
        answer = post(service, unique_body(i))
        assert answer.status_code == 202
        ids.append(answer.json()["response_id"])
    received = segment.wait_for(lambda r: tracks(r) >= set(ids), timeout=60)
    assert len(received) == 60 and len({m["messageId"] for m in received}) == 60

    log = segment.requests
    statuses = [r["status"] for r in log]
    assert statuses[:4] == [503, 503, 429, 429] and set(statuses[4:]) == {200}
    assert log[3]["at"] - log[2]["at"] >= 1.9, "Retry-After: 2 was not honoured"
    assert log[4]["at"] - log[3]["at"] >= 0.9, "Retry-After: 1 was not honoured"


def _burst(service: Service, count: int, acknowledged: list[str], stop: threading.Event) -> None:
    def one(i: int) -> None:
        if stop.is_set():
            return
        try:
            answer = post(service, unique_body(i), timeout=5)
        except requests.RequestException:
            return
        if answer.status_code == 202:
            acknowledged.append(answer.json()["response_id"])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_e2e_service_killed_mid_burst_delivers_every_acknowledged_response_after_restart(make_service, segment, sig):
    segment.down = True  # nothing can be delivered before the kill: only the store has the responses
    first = make_service().start()
    port = first.port
    acknowledged: list[str] = []
    stop = threading.Event()
    burst = threading.Thread(target=_burst, args=(first, 400, acknowledged, stop))
    burst.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 100 and burst.is_alive():
        assert time.monotonic() < deadline, f"only {len(acknowledged)} responses acknowledged in 60 s"
        time.sleep(0.01)
    started = time.monotonic()
    first.kill(sig)
    code = first.process.wait(30)
    stop.set()
    burst.join()
    if sig == signal.SIGTERM:
        assert time.monotonic() - started < 25, "SIGTERM must finish within Heroku's 30 s"
        assert code == 0, first.logs()[-2000:]
        assert "delivery worker exited" not in first.logs(), "the supervisor took the group's SIGTERM for a crash"
    assert 100 <= len(acknowledged) < 400, "the kill did not land mid-burst"
    assert segment.received() == []

    segment.down = False
    second = make_service(PORT=str(port)).start()
    received = segment.wait_for(lambda r: tracks(r) >= set(acknowledged), timeout=90)
    assert tracks(received) >= set(acknowledged)
    assert second.process.poll() is None


def test_e2e_chunked_body_over_1_mib_answers_413(make_service):
    service = make_service().start()

    def chunks():
        yield b'{"triggered_event": "Completed Survey", "pad": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}'

    response = requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", data=chunks(), timeout=10)
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"


def test_e2e_sigterm_to_the_master_alone_stops_the_delivery_worker_too(make_service, segment):
    service = make_service().start()
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)  # `kill <pid>` of serve, not of its group
    assert service.process.wait(30) == 0
    assert time.monotonic() - started < 25
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-g", str(service.process.pid)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "a process of the tree outlived the master"
    assert "delivery worker exited" not in service.logs()


def test_e2e_schemathesis_against_openapi_json_finds_no_5xx_and_no_undocumented_answer(make_service, tmp_path):
    # Both directions on, one secret for both routes, so that the Bearer header opens each.
    service = make_service(SEGMENT_SHARED_SECRET=SECRET, REFINER_API_KEY="refiner-key", REFINER_API_URL="http://127.0.0.1:9/v1").start()
    document = requests.get(service.url + "/openapi.json", timeout=10).json()
    assert set(document["paths"]) == {"/", "/webhooks/refiner", "/webhooks/segment", "/healthz", "/readyz", "/openapi.json"}
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [
            str(cli),
            "run",
            service.url + "/openapi.json",
            "--header",
            f"Authorization: Bearer {SECRET}",
            "--max-examples",
            "40",
            "--checks",
            "all",
            # The webhook is lenient by design: unknown fields pass, and a body whose event is
            # not forwarded is acknowledged "ignored" unvalidated (docs/http.md), so a body the
            # schema calls invalid may rightly get a 200. Everything else is checked.
            "--exclude-checks",
            "negative_data_rejection,positive_data_acceptance",
            # Every warning but "validation mismatch" (most of an operation's random bodies answered
            # 4xx): whether it fires depends on the examples drawn, and it was seen, once in a full
            # run, with every check passing. The others cannot fire by chance here.
            "--warnings",
            "missing_auth,missing_test_data,missing_deserializer,unused_openapi_auth,method_not_allowed",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
    )
    assert result.returncode == 0, result.stdout[-5000:]
    assert "No issues found" in result.stdout, result.stdout[-3000:]


def test_e2e_group_sigterm_with_a_request_in_flight_does_not_restart_the_delivery_worker(make_service):
    import socket

    service = make_service().start()
    slow = socket.create_connection(("127.0.0.1", service.port))
    slow.sendall(b"POST /webhooks/refiner?token=" + SECRET.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(0.3)  # the request is now in a web worker, which gunicorn lets finish on SIGTERM
    started = time.monotonic()
    service.kill(signal.SIGTERM)  # Heroku signals every process of the dyno at once
    time.sleep(3.0)  # the master is still stopping, the delivery worker long gone
    slow.close()
    assert service.process.wait(30) == 0
    assert time.monotonic() - started < 25
    assert "delivery worker exited" not in service.logs(), "the supervisor took the group's SIGTERM for a crash"


def hostile_requests(count: int, seed: int = 7):
    """(description, query token, headers, body bytes) of requests that must all get a 4xx."""
    import random

    rng = random.Random(seed)
    good = json.dumps(load_fixture("webhook_completed_survey.json")).encode()
    makers = [
        ("garbage bytes", lambda: (SECRET, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))),
        ("not utf-8", lambda: (SECRET, b'{"triggered_event": "\xff\xfe"}')),
        ("empty", lambda: (SECRET, b"")),
        ("not an object", lambda: (SECRET, json.dumps(rng.choice([[], 1, "x", None, True, [good.decode()]])).encode())),
        ("wrong types", lambda: (SECRET, json.dumps({**json.loads(good), "response": rng.choice([1, "r", [], True])}).encode())),
        ("event wrong type", lambda: (SECRET, json.dumps({**json.loads(good), "triggered_event": rng.choice([1, [], {}, None])}).encode())),
        ("deep", lambda: (SECRET, b'{"triggered_event": "Completed Survey", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")),
        ("too many answers", lambda: (SECRET, _with_answers(good, 501))),
        ("missing token", lambda: (None, good)),
        ("wrong token", lambda: ("w" * len(SECRET), good)),
        ("NaN", lambda: (SECRET, good.replace(b'"8"', b"NaN"))),
        ("blank uuid", lambda: (SECRET, good.replace(b'"a3e1c2f0-a5d1-11ef-b050-03a44b320007"', b'"  "'))),
    ]
    for i in range(count):
        name, make = makers[i % len(makers)]
        token, body = make()
        yield name, token, body


def _huge_body_answer(service: Service) -> int:
    """Announce 50 MiB, send a little, read the answer: it comes before the body is read.

    (A client that pushes the whole body before reading, without Expect: 100-continue, may
    instead see the connection closed under it: the server refuses to read the rest.)"""
    import socket

    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        head = f"POST /webhooks/refiner?token={SECRET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {50 << 20}\r\n\r\n".encode() + b'{"pad": "' + b"x" * 1000)
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def _with_answers(good: bytes, n: int) -> bytes:
    body = json.loads(good)
    body["response"]["data"] = {f"q{i}": i for i in range(n)}
    return json.dumps(body).encode()


def test_e2e_thousands_of_hostile_bodies_all_get_4xx_none_forwarded_service_still_delivers(make_service, segment):
    service = make_service().start()
    session = requests.Session()
    answers: Counter = Counter()
    for name, token, body in hostile_requests(3000):
        url = f"{service.url}/webhooks/refiner" + (f"?token={token}" if token else "")
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        assert response.json()["error"] and response.json()["message"]
        answers[(name, response.status_code)] += 1
    for _ in range(3):
        assert _huge_body_answer(service) == 413
    assert {status for _, status in answers} == {400, 401, 422}
    time.sleep(1.0)
    assert segment.received() == [], "a hostile body was forwarded"
    assert post(service, load_fixture("webhook_completed_survey.json")).status_code == 202
    assert len(segment.wait_for(lambda r: len(r) >= 3)) == 3
    assert "Traceback" not in service.logs()
