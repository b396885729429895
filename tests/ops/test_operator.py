"""The operator's view: GET /status (its chart, refresh, stalled hint, recovery, dead letters),
GET /status/event/<id> and /status/events/<key>, POST /status/replay and /status/delete, GET /metrics.

Fast tests with Flask's test client on SQLite and PostgreSQL, then one end-to-end scrape of
/metrics from the real `refiner-source serve` after a known burst across two gunicorn workers and
the delivery worker.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from refiner_source import create_app
from refiner_source.directions import DIRECTIONS, REFINER, SEGMENT
from refiner_source.store import DeadLetter
from refiner_source.to_segment.delivery import segment_loop
from tests.conftest import SECRET, entry_for, survey_body
from tests.segment_stub import SegmentStub
from tests.service import Service, free_port

PASSWORD = "operator-password-0123456789"
SEGMENT_SECRET = "segment-shared-secret-0123456789"
ANSWER = "Chief Llama Wrangler"  # an answer found nowhere else in the fixture
EMAIL = "ada@initech.example"  # the fixture contact's email
SEGMENT_EMAIL = "grace@hopper.example"
PAGES = ["/status", "/status?q=r1", "/status/event/1", "/metrics"]


def basic(password: str = PASSWORD, user: str = "admin") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def admin_app(settings, outbox):
    app = create_app(replace(settings, admin_password=PASSWORD, segment_shared_secret=SEGMENT_SECRET, refiner_api_key="refiner-api-key"))
    yield app
    app.extensions["refiner_source"].tally.flush()  # before the store goes: its thread would retry forever
    app.extensions["refiner_source"].outbox.dispose()


@pytest.fixture
def admin(admin_app):
    return admin_app.test_client()


def post_refiner(client, body) -> object:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(f"/webhooks/refiner?token={SECRET}", data=data, content_type="application/json")


def segment_identify(i: int) -> dict:
    return {
        "type": "identify",
        "messageId": f"msg-{i}",
        "userId": f"seg-user-{i}",
        "timestamp": "2030-01-02T03:04:05.000Z",
        "traits": {"email": SEGMENT_EMAIL, "plan": "pro"},
    }


def post_segment(client, body) -> object:
    return client.post(
        "/webhooks/segment", data=json.dumps(body), content_type="application/json", headers={"Authorization": f"Bearer {SEGMENT_SECRET}"}
    )


def make_dead_letter(outbox, i: int = 1) -> int:
    """Response r<i> stored, claimed and dead-lettered, as a 400 from Segment would; its event id."""
    outbox.store_many([entry_for(i, answer=ANSWER)])
    (claimed,) = outbox.claim(SEGMENT, 1, 60, "w")
    outbox.settle("w", dead=[DeadLetter(claimed.id, f"m-{i}", "track", "HTTP 400 invalid: rejected by the test")], destination=SEGMENT)
    return claimed.id


# --- the password ---------------------------------------------------------------------------


def test_status_metrics_and_replay_answer_404_while_the_password_is_unset(client, outbox):
    make_dead_letter(outbox)
    for path in PAGES:
        for headers in ({}, basic()):
            response = client.get(path, headers=headers)
            assert response.status_code == 404, path
            assert "WWW-Authenticate" not in response.headers
    assert client.post("/status/replay", data={"csrf": "x"}, headers=basic()).status_code == 404
    assert outbox.stats(SEGMENT).dead == 1, "a replay went through while the operator's view is off"


def test_401_with_a_basic_challenge_without_the_password_or_with_a_wrong_one(admin, outbox):
    make_dead_letter(outbox)
    wrong = [
        {},
        basic("not-the-password-0123456789"),
        basic(PASSWORD[:-1]),
        basic(""),
        {"Authorization": f"Bearer {PASSWORD}"},
        {"Authorization": "Basic !!!not-base64"},
    ]
    for path in PAGES:
        for headers in wrong:
            response = admin.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Basic realm="), path
            assert ANSWER not in response.get_data(as_text=True)
    for headers in wrong:
        assert admin.post("/status/replay", data={"destination": SEGMENT}, headers=headers).status_code == 401
    assert outbox.stats(SEGMENT).dead == 1


def test_200_with_the_password_and_any_user_name(admin, outbox):
    event_id = make_dead_letter(outbox)
    for user in ("admin", "someone-else", ""):
        status = admin.get("/status", headers=basic(user=user))
        assert status.status_code == 200 and status.mimetype == "text/html"
        assert "Refiner to Segment" in status.get_data(as_text=True) and "Segment to Refiner" in status.get_data(as_text=True)
        assert admin.get(f"/status/event/{event_id}", headers=basic(user=user)).status_code == 200
        assert admin.get("/metrics", headers=basic(user=user)).status_code == 200
    assert admin.get(f"/status/event/{event_id + 1000}", headers=basic()).status_code == 404


# --- no answer or email before an event is opened ------------------------------------------


def test_no_answer_or_email_on_the_page_or_its_search_until_the_event_is_opened(admin, outbox):
    dead_id = make_dead_letter(outbox, 1)
    assert post_refiner(admin, survey_body(2, answer=ANSWER)).status_code == 202
    answered = post_segment(admin, [segment_identify(7)])
    assert answered.status_code == 200 and answered.json["accepted"] == 1

    page = admin.get("/status", headers=basic()).get_data(as_text=True)
    assert 'data-figure="segment-dead">1<' in page and ">r1</a>" in page  # the dead letter is listed, by response id
    for text in (ANSWER, EMAIL, SEGMENT_EMAIL, "Ada Park"):
        assert text not in page

    opened = {}
    for query, state in (("r1", "dead"), ("r2", "pending"), ("msg-7", "pending")):
        found = admin.get(f"/status?q={query}", headers=basic())
        html = found.get_data(as_text=True)
        assert found.status_code == 200
        rows = re.findall(r'<tr class="event">(.*?)</tr>', html, re.S)
        assert len(rows) == 1, (query, html)
        assert re.search(r'class="[^"]*\bstate">' + state + "<", rows[0]), rows[0]
        for text in (ANSWER, EMAIL, SEGMENT_EMAIL, "Ada Park"):
            assert text not in html, (query, text)
        (link,) = re.findall(r'href="(/status/event/\d+)"', rows[0])
        opened[query] = link
    assert opened["r1"] == f"/status/event/{dead_id}"
    # The page and the search show an error's kind; the destination's answer, which may quote the
    # data, only on the opened event.
    searched = admin.get("/status?q=r1", headers=basic()).get_data(as_text=True)
    assert "HTTP 400 invalid" in searched and "rejected by the test" not in searched
    assert "HTTP 400 invalid: rejected by the test" in admin.get(opened["r1"], headers=basic()).get_data(as_text=True)

    for query in ("r1", "r2"):
        event = admin.get(opened[query], headers=basic()).get_data(as_text=True)
        assert ANSWER in event and EMAIL in event, query
    event = admin.get(opened["msg-7"], headers=basic()).get_data(as_text=True)
    assert SEGMENT_EMAIL in event

    nothing = admin.get("/status?q=no-such-response", headers=basic()).get_data(as_text=True)
    assert "Nothing stored under that id." in nothing and '<tr class="event">' not in nothing


# --- replay ---------------------------------------------------------------------------------


def csrf_of(page: str) -> str:
    (token,) = set(re.findall(r'name="csrf" value="([^"]+)"', page))
    return token


def test_replay_needs_the_forms_csrf_token_then_puts_the_dead_letter_back_in_line(admin, outbox):
    make_dead_letter(outbox)
    page = admin.get("/status", headers=basic()).get_data(as_text=True)
    assert 'id="replay-segment"' in page and 'id="replay-refiner"' not in page  # a button only where something died
    token = csrf_of(page)
    wrong = token[:-1] + ("1" if token[-1] == "0" else "0")

    for form in ({"destination": SEGMENT}, {"destination": SEGMENT, "csrf": ""}, {"destination": SEGMENT, "csrf": wrong}):
        refused = admin.post("/status/replay", data=form, headers=basic())
        assert refused.status_code == 403, form
        stats = outbox.stats(SEGMENT)
        assert (stats.dead, stats.pending) == (1, 0), "replayed without the form's token"
    # The token in the query string is not the form's.
    assert admin.post(f"/status/replay?csrf={token}", data={"destination": SEGMENT}, headers=basic()).status_code == 403
    assert outbox.stats(SEGMENT).dead == 1

    done = admin.post("/status/replay", data={"destination": SEGMENT, "csrf": token}, headers=basic())
    assert done.status_code == 303
    assert done.headers["Location"].endswith("/status?replayed=1")
    stats = outbox.stats(SEGMENT)
    assert (stats.dead, stats.pending) == (0, 1)
    assert outbox.dead_letters(destination=SEGMENT) == []
    after = admin.get(done.headers["Location"], headers=basic()).get_data(as_text=True)
    assert "Queued again: 1 event." in after and 'id="replay-segment"' not in after
    assert 'data-figure="segment-pending">1<' in after and 'data-figure="segment-dead">0<' in after


# --- /metrics -------------------------------------------------------------------------------


def scrape(get) -> tuple[dict, str]:
    """/metrics parsed by prometheus_client's parser: ({family name: family}, content type)."""
    response = get()
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    return families, response.headers["Content-Type"]


def value(families: dict, sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    found = [s.value for s in families[family].samples if s.name == sample_name and s.labels == labels]
    assert len(found) == 1, (sample_name, labels, families[family].samples)
    return found[0]


def check_conventions(families: dict, content_type: str) -> None:
    # The exposition format generate_latest() speaks, with its version (Prometheus 3 is strict about it).
    assert content_type == CONTENT_TYPE_LATEST and content_type.startswith("text/plain; version=")
    assert set(families) == {
        "refiner_source_webhooks",
        "refiner_source_deliveries",
        "refiner_source_pending_events",
        "refiner_source_dead_events",
        "refiner_source_oldest_pending_age_seconds",
        "refiner_source_delivery_latency_seconds",
        "refiner_source_direction_enabled",
        "refiner_source_suppressed_people",
    }
    for name, family in families.items():
        assert name.startswith("refiner_source_") and re.fullmatch(r"[a-z_]+", name), name
        assert family.documentation, name
        assert not re.search(r"_(ms|milliseconds|minutes|hours)(_|$)", name), name
        if family.type == "counter":
            assert {s.name for s in family.samples} == {name + "_total"}, name
        else:
            assert not name.endswith("_total"), name
        if family.type == "gauge":
            assert {s.name for s in family.samples} == {name}
    assert {n: f.type for n, f in families.items()} == {
        "refiner_source_webhooks": "counter",
        "refiner_source_deliveries": "counter",
        "refiner_source_pending_events": "gauge",
        "refiner_source_dead_events": "gauge",
        "refiner_source_oldest_pending_age_seconds": "gauge",
        "refiner_source_delivery_latency_seconds": "histogram",
        "refiner_source_direction_enabled": "gauge",
        "refiner_source_suppressed_people": "gauge",
    }
    for s in families["refiner_source_webhooks"].samples:
        assert set(s.labels) == {"source", "outcome"}
    for s in families["refiner_source_deliveries"].samples:
        assert set(s.labels) == {"destination", "outcome"}
    for destination in (SEGMENT, REFINER):
        buckets = [
            (float(s.labels["le"]), s.value)
            for s in families["refiner_source_delivery_latency_seconds"].samples
            if s.name.endswith("_bucket") and s.labels["destination"] == destination
        ]
        assert buckets == sorted(buckets) and buckets[-1][0] == math.inf
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets must be cumulative"
        assert buckets[-1][1] == value(families, "refiner_source_delivery_latency_seconds_count", destination=destination)


def wait_for_scrape(get, ready, timeout: float = 10.0) -> dict:
    """Scrape until `ready(families)` (the counts are added to the store once a second), then once more."""
    deadline = time.monotonic() + timeout
    while True:
        families, _ = scrape(get)
        if ready(families):
            return families
        if time.monotonic() > deadline:
            raise AssertionError(f"the counts did not arrive in {timeout}s: {[s for f in families.values() for s in f.samples]}")
        time.sleep(0.1)


def test_metrics_are_prometheus_text_with_exact_counts_and_conventional_names(admin_app, admin, outbox, monkeypatch):
    # The webhooks are stored at one instant of a stopped clock, and each delivery round runs at a known
    # time after it, so that the latencies are exact however slowly the machine runs the test.
    real_time = time.time
    stored_at = real_time()
    with monkeypatch.context() as clock:
        clock.setattr(time, "time", lambda: stored_at)
        for i in range(3):
            assert post_refiner(admin, survey_body(i)).status_code == 202
        assert post_refiner(admin, survey_body(0)).json["status"] == "duplicate"
        assert post_refiner(admin, survey_body(9, event="Created Contact")).json["status"] == "ignored"
        assert post_refiner(admin, {"triggered_event": "Completed Survey"}).status_code == 422
        segment = post_segment(admin, [segment_identify(1), segment_identify(2), segment_identify(1), {"type": "identify"}])
        assert segment.status_code == 200
        assert (segment.json["accepted"], segment.json["duplicate"], len(segment.json["invalid"])) == (2, 1, 1)
        admin_app.extensions["refiner_source"].tally.flush()

    # The delivery worker's rounds against a stand-in for Segment, one event each: r0 delivered,
    # r1 dead (Segment refuses its track), r2 delivered, 0.26 s, 1.0 s and 1.7 s after the webhooks
    # were stored, so that the latencies land in known buckets.
    with SegmentStub() as segment:
        segment.reject["refiner-r1-completed-survey-track"] = (400, {"code": "invalid_request", "message": "bad message"})
        worker = segment_loop(outbox, "wk", segment.url, batch_size=1, idle_poll=0.01)
        for later in (0.26, 1.0, 1.7):
            with monkeypatch.context() as clock:
                clock.setattr(time, "time", lambda later=later: stored_at + later)
                worker.run_once()
        worker.tally.flush()  # as the worker does after each round
        assert {m["messageId"] for m in segment.received()} == {
            f"refiner-r{i}-completed-survey-{call}" for i in range(3) for call in ("identify", "group", "track")
        } - {"refiner-r1-completed-survey-track"}
    assert [letter[0] for letter in outbox.dead_letters(destination=SEGMENT)] == ["r1"]

    def get():
        return admin.get("/metrics", headers=basic())

    families = wait_for_scrape(get, lambda f: sum(s.value for s in f["refiner_source_webhooks"].samples) >= 10)
    families, content_type = scrape(get)
    check_conventions(families, content_type)

    webhooks = {(s.labels["source"], s.labels["outcome"]): s.value for s in families["refiner_source_webhooks"].samples if s.value}
    assert webhooks == {
        ("refiner", "accepted"): 3,
        ("refiner", "duplicate"): 1,
        ("refiner", "ignored"): 1,
        ("refiner", "rejected"): 1,
        ("segment", "accepted"): 2,
        ("segment", "duplicate"): 1,
        ("segment", "rejected"): 1,
    }
    assert value(families, "refiner_source_deliveries_total", destination=SEGMENT, outcome="delivered") == 2
    assert value(families, "refiner_source_deliveries_total", destination=SEGMENT, outcome="dead") == 1
    assert value(families, "refiner_source_deliveries_total", destination=REFINER, outcome="delivered") == 0
    assert value(families, "refiner_source_pending_events", destination=SEGMENT) == 0
    assert value(families, "refiner_source_pending_events", destination=REFINER) == 2
    assert value(families, "refiner_source_dead_events", destination=SEGMENT) == 1
    assert value(families, "refiner_source_dead_events", destination=REFINER) == 0
    assert value(families, "refiner_source_oldest_pending_age_seconds", destination=SEGMENT) == 0
    assert 0 <= value(families, "refiner_source_oldest_pending_age_seconds", destination=REFINER) < 60
    latency = {
        float(s.labels["le"]): s.value
        for s in families["refiner_source_delivery_latency_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["destination"] == SEGMENT
    }
    assert (latency[0.25], latency[0.5], latency[1.0], latency[2.5], latency[math.inf]) == (0, 1, 1, 2, 2)
    assert value(families, "refiner_source_delivery_latency_seconds_count", destination=SEGMENT) == 2
    assert value(families, "refiner_source_delivery_latency_seconds_sum", destination=SEGMENT) == pytest.approx(0.26 + 1.7)
    assert value(families, "refiner_source_delivery_latency_seconds_count", destination=REFINER) == 0
    assert value(families, "refiner_source_direction_enabled", destination=SEGMENT) == 1
    assert value(families, "refiner_source_direction_enabled", destination=REFINER) == 1
    assert value(families, "refiner_source_suppressed_people", key="current") == 0

    # The page shows the same figures.
    page = admin.get("/status", headers=basic()).get_data(as_text=True)
    for name, expected in {"received": 6, "accepted": 3, "duplicate": 1, "ignored": 1, "rejected": 1, "delivered": 2, "dead": 1}.items():
        assert f'data-figure="segment-hour-{name}">{expected}<' in page, name
        assert f'data-figure="segment-day-{name}">{expected}<' in page, name
    assert 'data-figure="refiner-hour-received">4<' in page and 'data-figure="refiner-hour-accepted">2<' in page


# --- a direction that is off ---------------------------------------------------------------

ONLY_TO_REFINER = {"segment_write_key": None, "webhook_secrets": (), "segment_shared_secret": SEGMENT_SECRET, "refiner_api_key": "k"}
ONLY_TO_SEGMENT = {"segment_shared_secret": None, "refiner_api_key": None}


@pytest.fixture
def admin_of(settings, outbox):
    """A client of an app whose settings are the test's, with the password and `overrides`."""
    apps = []

    def make(**overrides):
        apps.append(create_app(replace(settings, admin_password=PASSWORD, **overrides)))
        return apps[-1].test_client()

    yield make
    for app in apps:
        app.extensions["refiner_source"].tally.flush()
        app.extensions["refiner_source"].outbox.dispose()


def off_note(page: str, destination: str) -> str | None:
    """The note under a direction's heading when it is off (the text of the paragraph after it), else None."""
    section = re.search(rf'<section class="direction" id="{destination}">(.*?)</section>', page, re.S)
    assert section, page
    if f'data-off="{destination}">off<' not in section.group(1):
        return None
    return re.sub(r"<[^>]+>", "", re.search(r"</h2>\s*<p[^>]*>(.*?)</p>", section.group(1), re.S).group(1))


@pytest.mark.parametrize(
    "overrides, off, on",
    [(ONLY_TO_REFINER, SEGMENT, REFINER), (ONLY_TO_SEGMENT, REFINER, SEGMENT)],
    ids=["only-segment-to-refiner", "only-refiner-to-segment"],
)
def test_a_direction_that_is_off_shows_as_off_with_what_turns_it_on_and_as_0_in_metrics(admin_of, overrides, off, on):
    admin = admin_of(**overrides)
    page = admin.get("/status", headers=basic()).get_data(as_text=True)
    note = off_note(page, off)
    assert note is not None and off_note(page, on) is None
    first, second = DIRECTIONS[off].variables
    assert f"{first} and {second} turn it on." in note
    assert f'data-figure="{off}-pending"' not in page, "an off direction that holds nothing shows no figures"
    assert f'data-figure="{on}-pending">0<' in page

    families, _ = scrape(lambda: admin.get("/metrics", headers=basic()))
    assert value(families, "refiner_source_direction_enabled", destination=off) == 0
    assert value(families, "refiner_source_direction_enabled", destination=on) == 1
    text = admin.get("/metrics", headers=basic()).get_data(as_text=True)
    assert f'refiner_source_direction_enabled{{destination="{off}"}} 0.0' in text
    assert f'refiner_source_direction_enabled{{destination="{on}"}} 1.0' in text


def test_a_direction_turned_off_still_shows_the_events_it_stored(admin_of, outbox):
    make_dead_letter(outbox)
    outbox.store_many([entry_for(2)])
    admin = admin_of(**ONLY_TO_REFINER)
    page = admin.get("/status", headers=basic()).get_data(as_text=True)
    assert "stored before it was turned off" in off_note(page, SEGMENT)
    assert 'data-figure="segment-pending">1<' in page and 'data-figure="segment-dead">1<' in page
    assert ">r1</a>" in page and 'id="replay-segment"' in page  # its dead letters can still be queued again for when it is back on


# --- end to end: the real service, two gunicorn workers and the delivery worker ------------


def start_service(tmp_path: Path, store_url: str, segment: SegmentStub) -> Service:
    env = {
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        "DATABASE_URL": store_url,
        "SEGMENT_HOST": segment.url,
        "SEGMENT_WRITE_KEY": "e2e-write-key",
        "REFINER_WEBHOOK_SECRET": SECRET,
        "REFINER_ADMIN_PASSWORD": PASSWORD,
    }
    return Service(["serve"], env, tmp_path / "service.log").start()


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def web_workers(service: Service) -> list[int]:
    """The pids of gunicorn's workers: the children of the supervisor's child that has children."""
    (master,) = [c for c in _children(service.process.pid) if _children(c)]
    return _children(master)


def serving_pid(connection: http.client.HTTPConnection, service_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server end of this open (kept-alive) connection, from /proc."""
    client_port = connection.sock.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == service_port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except FileNotFoundError:
                continue
    return None


def connections_to_each_worker(service: Service, per_worker: int, timeout: float = 20.0) -> dict[int, list[http.client.HTTPConnection]]:
    """Fresh kept-alive connections, `per_worker` held by each gunicorn worker. New connections
    until both workers hold theirs (this also waits until both have loaded the app); a round that
    does not reach both is closed and tried again, so that none idles past gunicorn's keepalive."""
    pids = web_workers(service)
    assert len(pids) == 2, pids
    deadline = time.monotonic() + timeout
    while True:
        held: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}
        spare = []
        for _ in range(8 * per_worker):
            connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
            connection.request("GET", "/readyz")
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200
            pid = serving_pid(connection, service.port, pids)
            assert pid is not None, "no web worker holds the connection"
            (held[pid] if len(held[pid]) < per_worker else spare).append(connection)
            if all(len(c) == per_worker for c in held.values()):
                break
        for connection in spare:
            connection.close()
        if all(len(c) == per_worker for c in held.values()):
            return held
        for connection in (c for cs in held.values() for c in cs):
            connection.close()
        assert time.monotonic() < deadline, f"connections did not reach both workers: { ({p: len(c) for p, c in held.items()}) }"
        time.sleep(0.2)


def post_on(connection: http.client.HTTPConnection, body) -> tuple[int, str | None]:
    data = body if isinstance(body, str) else json.dumps(body)
    connection.request("POST", f"/webhooks/refiner?token={SECRET}", body=data.encode(), headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    payload = json.loads(answer.read())
    return answer.status, (payload.get("status") if answer.status < 300 else None)


def post_burst(connections: list[http.client.HTTPConnection], bodies: list) -> list[tuple[int, str | None]]:
    """The bodies dealt round-robin to the connections, each connection posting its share from a thread of its own."""
    shares = [list(range(k, len(bodies), len(connections))) for k in range(len(connections))]
    answers: list = [None] * len(bodies)

    def post_share(k: int) -> None:
        port = connections[k].sock.getsockname()[1]
        for i in shares[k]:
            answers[i] = post_on(connections[k], bodies[i])
        assert connections[k].sock.getsockname()[1] == port, "the connection was replaced: it may have reached another worker"

    with ThreadPoolExecutor(len(connections)) as pool:
        list(pool.map(post_share, range(len(connections))))
    return answers


def test_e2e_metrics_after_a_known_burst_across_two_web_workers_and_the_delivery_worker_are_exact(tmp_path, store_url, segment):
    service = start_service(tmp_path, store_url, segment)
    try:
        held = connections_to_each_worker(service, per_worker=3)
        a, b = held.values()
        connections = [c for pair in zip(a, b, strict=True) for c in pair]  # alternately one of each worker's

        invalid = [json.dumps({"triggered_event": "Completed Survey", "response": {"uuid": f"bad-{i}"}}) for i in range(3)]
        first = [survey_body(i) for i in range(30)] + invalid + [survey_body(90 + i, event="Created Contact") for i in range(2)]
        answers = post_burst(connections, first)
        assert answers == [(202, "accepted")] * 30 + [(422, None)] * 3 + [(200, "ignored")] * 2
        resent = post_burst(connections, [survey_body(i) for i in (0, 7, 14, 21, 28)])  # five resent: duplicates
        assert resent == [(200, "duplicate")] * 5
        for connection in connections:
            connection.close()

        segment.wait_for(lambda r: len(r) >= 90, timeout=30)

        def get():
            return requests.get(f"{service.url}/metrics", auth=("prometheus", PASSWORD), timeout=5)

        def settled(f) -> bool:
            received = sum(s.value for s in f["refiner_source_webhooks"].samples)
            delivered = value(f, "refiner_source_deliveries_total", destination=SEGMENT, outcome="delivered")
            return received >= 40 and delivered >= 30

        wait_for_scrape(get, settled, timeout=15)
        time.sleep(2.0)  # anything counted twice would have been added by now
        families, content_type = scrape(get)
        check_conventions(families, content_type)

        webhooks = {(s.labels["source"], s.labels["outcome"]): s.value for s in families["refiner_source_webhooks"].samples}
        assert webhooks == {
            ("refiner", "accepted"): 30,
            ("refiner", "duplicate"): 5,
            ("refiner", "ignored"): 2,
            ("refiner", "rejected"): 3,
            ("refiner", "unavailable"): 0,
            ("segment", "accepted"): 0,
            ("segment", "duplicate"): 0,
            ("segment", "ignored"): 0,
            ("segment", "rejected"): 0,
            ("segment", "unavailable"): 0,
        }
        deliveries = {(s.labels["destination"], s.labels["outcome"]): s.value for s in families["refiner_source_deliveries"].samples}
        assert deliveries == {
            (SEGMENT, "delivered"): 30,
            (SEGMENT, "dead"): 0,
            (SEGMENT, "retry"): 0,
            (REFINER, "delivered"): 0,
            (REFINER, "dead"): 0,
            (REFINER, "retry"): 0,
        }
        assert len(segment.received()) == 90 and len({m["messageId"] for m in segment.received()}) == 90
        assert value(families, "refiner_source_pending_events", destination=SEGMENT) == 0
        assert value(families, "refiner_source_dead_events", destination=SEGMENT) == 0
        assert value(families, "refiner_source_oldest_pending_age_seconds", destination=SEGMENT) == 0
        assert value(families, "refiner_source_delivery_latency_seconds_count", destination=SEGMENT) == 30
        assert value(families, "refiner_source_delivery_latency_seconds_bucket", destination=SEGMENT, le="+Inf") == 30
        assert 0 < value(families, "refiner_source_delivery_latency_seconds_sum", destination=SEGMENT) < 30 * 30
        assert value(families, "refiner_source_delivery_latency_seconds_count", destination=REFINER) == 0
        assert value(families, "refiner_source_direction_enabled", destination=SEGMENT) == 1
        assert value(families, "refiner_source_direction_enabled", destination=REFINER) == 0  # its variables are unset
    finally:
        service.stop()
    assert PASSWORD not in service.logs()


def test_a_destinations_answer_quoting_an_email_is_shown_only_on_the_opened_event(admin, outbox):
    # Refiner answers a refused call with a body that may quote what it refused.
    outbox.store_many([entry_for(1)])
    (claimed,) = outbox.claim(SEGMENT, 1, 60, "w")
    quoted = 'HTTP 422: {"errors": {"email": ["grace@hopper.example is not a valid email"]}}'
    outbox.settle("w", dead=[DeadLetter(claimed.id, None, "/identify-user", quoted)], destination=SEGMENT)
    for page in ("/status", "/status?q=r1"):
        html = admin.get(page, headers=basic()).get_data(as_text=True)
        assert "grace@hopper.example" not in html and "HTTP 422" in html
    assert "grace@hopper.example" in admin.get(f"/status/event/{claimed.id}", headers=basic()).get_data(as_text=True)


def test_an_event_that_cannot_be_mapped_opens_as_stored_with_the_reason(admin, outbox):
    from sqlalchemy import update

    from refiner_source.store import events

    outbox.store_many([entry_for(1)])
    with outbox.engine.begin() as conn:
        conn.execute(update(events).values(event='{"not": "a survey event"}'))
    (claimed,) = outbox.claim(SEGMENT, 1, 60, "w")
    response = admin.get(f"/status/event/{claimed.id}", headers=basic())
    assert response.status_code == 200 and "cannot be mapped now" in response.get_data(as_text=True)
    assert response.headers["X-Frame-Options"] == "DENY"


# --- the page an operator lives on: chart, refresh, stalled, dead letters one by one, events by key ---


def status_html(admin, path: str = "/status") -> str:
    response = admin.get(path, headers=basic())
    assert response.status_code == 200, (path, response.status_code)
    return response.get_data(as_text=True)


def section_of(page: str, destination: str) -> str:
    found = re.search(rf'<section class="direction" id="{destination}">(.*?)</section>', page, re.S)
    assert found, page
    return found.group(1)


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def make_refiner_dead_letter(admin, outbox, i: int) -> int:
    """Segment event msg-<i> accepted, claimed and dead-lettered as Refiner's 422 would; its event id."""
    assert post_segment(admin, [segment_identify(i)]).json["accepted"] == 1
    (claimed,) = outbox.claim(REFINER, 1, 60, "w")
    outbox.settle("w", dead=[DeadLetter(claimed.id, f"msg-{i}", "/identify-user", "HTTP 422: refused")], destination=REFINER)
    return claimed.id


def test_chart_time_labels_fall_on_the_utc_clock_every_10_minutes_for_an_hour_and_every_3_hours_for_a_day():
    from datetime import UTC, datetime

    from refiner_source.ops.chart import RANGES, chart

    minute = int(datetime(2030, 1, 2, 12, 34, tzinfo=UTC).timestamp() // 60)
    hour = chart({minute: 3}, {minute - 5: 1}, minute, RANGES["1h"])
    assert [text for _, text in hour.labels] == ["11:40", "11:50", "12:00", "12:10", "12:20", "12:30"]
    assert hour.per == "per minute" and hour.peak == 3 and not hour.empty
    assert len(hour.received.split()) == 60 and len(hour.delivered.split()) == 60
    xs = [x for x, _ in hour.labels]
    assert xs == sorted(xs) and hour.plot[0] <= xs[0] and xs[-1] <= hour.plot[2]
    # 12:30 is 4 minutes before the last point, at the right edge: its x says so.
    left, _, right, _ = hour.plot
    assert xs[-1] == pytest.approx(right - 4 * (right - left) / 59)

    day = chart({minute - 600: 7, minute - 601: 5}, {}, minute, RANGES["24h"])
    assert [text for _, text in day.labels] == ["15:00", "18:00", "21:00", "Jan 2", "03:00", "06:00", "09:00", "12:00"]
    assert day.per == "per 10 minutes" and day.peak == 12, "a day's points are 10-minute bins"
    assert len(day.received.split()) == 144
    assert chart({}, {}, minute, RANGES["1h"]).empty and chart({minute - 61: 4}, {}, minute, RANGES["1h"]).empty


def test_the_chart_shows_the_last_hour_by_default_and_24_hours_on_request_with_utc_time_labels(admin_app, admin, outbox):
    from datetime import UTC, datetime

    now = int(time.time() // 60)
    outbox.add_traffic({(now - 5, "webhook", "refiner", "accepted"): 4, (now - 120, "webhook", "refiner", "accepted"): 9})
    outbox.add_traffic({(now - 4, "delivery", SEGMENT, "delivered"): 4})

    def labels(page: str) -> list[str]:
        return re.findall(r'class="time">([^<]+)</text>', section_of(page, SEGMENT))

    hour = status_html(admin)
    expected = [datetime.fromtimestamp(m * 60, UTC).strftime("%H:%M") for m in range(now - 59, now + 1) if m % 10 == 0]
    assert labels(hour) == expected and len(expected) == 6
    assert "per minute, last hour, times in UTC." in text_of(section_of(hour, SEGMENT))
    assert 'class="peak">4<' in section_of(hour, SEGMENT), "the 9 of two hours ago is not in the last hour"
    assert "<strong>last hour</strong>" in hour and 'href="/status?range=24h#segment"' in hour

    day = status_html(admin, "/status?range=24h")
    assert all(re.fullmatch(r"(00|03|06|09|12|15|18|21):00|[A-Z][a-z]{2} \d{1,2}", t) for t in labels(day)), labels(day)
    assert len(labels(day)) in (7, 8)
    assert "per 10 minutes, last 24 hours, times in UTC." in text_of(section_of(day, SEGMENT))
    assert 'class="peak">9<' in section_of(day, SEGMENT)
    assert "<strong>last 24 hours</strong>" in day and 'href="/status#segment"' in day
    # An unknown range is the default one.
    assert labels(status_html(admin, "/status?range=7d")) == expected


def test_a_fresh_install_says_nothing_yet_instead_of_an_empty_chart(admin_app, admin, outbox):
    page = status_html(admin)
    for destination in (SEGMENT, REFINER):
        mine = section_of(page, destination)
        assert "Nothing yet: no webhook received and nothing delivered" in text_of(mine), destination
        assert "<svg" not in mine and "<polyline" not in mine
    # Traffic, but none in the range: said so, not a flat box.
    outbox.add_traffic({(int(time.time() // 60) - 180, "webhook", "refiner", "accepted"): 2})
    page = status_html(admin)
    assert "Nothing received or delivered in the last hour." in text_of(section_of(page, SEGMENT))
    assert "<svg" not in section_of(page, SEGMENT) and "Nothing yet" in text_of(section_of(page, REFINER))
    assert "<polyline" in section_of(status_html(admin, "/status?range=24h"), SEGMENT)


def test_the_page_says_as_of_when_in_utc_and_refreshes_itself_keeping_the_search_and_the_range(admin):
    before = time.time()
    page = status_html(admin, "/status?q=r9&range=24h")
    (as_of,) = re.findall(r'id="as-of">as of (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC<', page)
    from datetime import UTC, datetime

    stamp = datetime.strptime(as_of, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    assert before - 1 <= stamp <= time.time()
    # The script reloads the same view (and restores the scroll position); without script, a meta refresh does.
    (every, url) = re.findall(r'<body data-refresh="(\d+)" data-refresh-url="([^"]+)"', page)[0]
    assert every == "10" and url == "/status?q=r9&amp;range=24h"
    assert '<noscript><meta http-equiv="refresh" content="10; url=/status?q=r9&amp;range=24h"></noscript>' in page
    assert "sessionStorage" in page and "scrollTo" in page
    # A one-shot notice is not refreshed into the next page; the refresh can be stopped.
    assert 'data-refresh-url="/status"' in status_html(admin, "/status?replayed=1")
    stopped = status_html(admin, "/status?q=r9&refresh=off")
    assert "data-refresh" not in stopped and 'http-equiv="refresh"' not in stopped
    assert 'href="/status?q=r9&amp;refresh=off">stop<' in page.replace("range=24h&amp;", "")


def test_the_inline_script_runs_by_its_nonce_and_nothing_else_does(admin):
    response = admin.get("/status", headers=basic())
    policy = response.headers["Content-Security-Policy"]
    (nonce,) = re.findall(r"script-src 'nonce-([^']+)'", policy)
    assert "frame-ancestors 'none'" in policy and len(nonce) >= 16
    scripts = re.findall(r"<script([^>]*)>", response.get_data(as_text=True))
    assert scripts == [f' nonce="{nonce}"']
    assert nonce not in admin.get("/status", headers=basic()).headers["Content-Security-Policy"], "a nonce is used once"


def test_the_stalled_hint_of_refiner_source_status_is_on_the_page_per_direction(admin, outbox):
    from sqlalchemy import update

    from refiner_source.store import events

    outbox.store_many([entry_for(1)])
    assert "data-stalled" not in status_html(admin), "an event that just arrived is not a stall"
    with outbox.engine.begin() as conn:
        conn.execute(update(events).values(created_at=time.time() - 300, queued_at=time.time() - 300))
    page = status_html(admin)
    (hint,) = re.findall(r'data-stalled="segment">(.*?)</p>', page, re.S)
    assert re.fullmatch(
        r"nothing delivered for 30\ds while 1 event\(s\) wait: is a delivery worker running \(<code>refiner-source serve</code> runs one; "
        r"<code>refiner-source worker</code> runs one alone\), and can it reach Segment \(see its log\)\?",
        hint,
    ), hint
    assert 'data-stalled="refiner"' not in page
    assert re.search(r'data-health="segment">stalled<', page) and re.search(r'data-health="refiner">ok<', page)


def test_dead_letters_are_listed_by_event_and_the_replay_all_button_counts_events(admin, outbox):
    outbox.store_many([entry_for(1), entry_for(2)])
    first, second = outbox.claim(SEGMENT, 2, 60, "w")
    letters = [DeadLetter(first.id, f"m-1-{call}", call, f"HTTP 400 invalid: {call}") for call in ("identify", "group", "track")]
    outbox.settle("w", dead=[*letters, DeadLetter(second.id, "m-2-track", "track", "HTTP 400 invalid: track")], destination=SEGMENT)
    mine = section_of(status_html(admin), SEGMENT)
    assert 'data-dead-count="segment">4 messages of 2 events<' in mine
    assert re.search(r'id="replay-segment">Replay 2 events<', mine)
    rows = re.findall(r'<tr class="dead-letter" data-event="(\d+)">(.*?)</tr>', mine, re.S)
    assert [int(event) for event, _ in rows] == [second.id, first.id, first.id, first.id], "newest first, each event's letters together"
    assert 'rowspan="3"' in rows[1][1] and rows[1][1].count("data-replay=") == 1 and rows[2][1].count("data-replay=") == 0
    for call in ("identify", "group", "track"):
        assert f"m-1-{call}" in mine
    outbox.store_many([entry_for(3)])
    (third,) = outbox.claim(SEGMENT, 1, 60, "w")
    outbox.settle("w", dead=[DeadLetter(third.id, "m-3-track", "track", "HTTP 400 invalid")], destination=SEGMENT)
    admin.post("/status/replay", data={"csrf": csrf_of(status_html(admin)), "event": str(first.id)}, headers=basic())
    mine = section_of(status_html(admin), SEGMENT)
    assert 'data-dead-count="segment">2 messages of 2 events<' in mine and ">Replay 2 events<" in mine


def test_segment_to_refiner_dead_letters_show_the_messageid_once_and_the_refiner_call(admin, outbox):
    make_refiner_dead_letter(admin, outbox, 7)
    mine = section_of(status_html(admin), REFINER)
    table = re.search(r'<table class="dead-letters">(.*?)</table>', mine, re.S).group(1)
    assert "<th>Segment messageId</th><th>call</th>" in table
    assert table.count("msg-7") == 2, "the id is shown once (its search link's address holds it too)"
    assert "<code>/identify-user</code>" in table and "HTTP 422" in table
    assert 'data-dead-count="refiner">1 message of 1 event<' in mine


def test_one_dead_event_is_replayed_with_its_own_button_the_others_stay_dead(admin, outbox):
    one, two = make_dead_letter(outbox, 1), make_dead_letter(outbox, 2)
    page = status_html(admin, "/status?q=r1&range=24h")
    assert f'data-replay="{one}"' in page and f'data-replay="{two}"' in page
    done = admin.post("/status/replay", data={"csrf": csrf_of(page), "event": str(one), "q": "r1", "range": "24h"}, headers=basic())
    assert done.status_code == 303 and done.headers["Location"].endswith("/status?q=r1&range=24h&replayed=1")
    assert [e["status"] for e in outbox.find_events("r1")] == ["pending"] and [e["status"] for e in outbox.find_events("r2")] == ["dead"]
    assert [source for source, _, _ in outbox.dead_letters(destination=SEGMENT)] == ["r2"]
    after = status_html(admin, done.headers["Location"])
    assert "Queued again: 1 event." in after and ">Replay 1 event<" in after
    again = admin.post("/status/replay", data={"csrf": csrf_of(page), "event": str(one)}, headers=basic())
    assert again.headers["Location"].endswith("/status?replayed=0")
    assert "Nothing queued again" in status_html(admin, again.headers["Location"])
    assert outbox.stats(SEGMENT).pending == 1


def test_one_dead_event_is_deleted_with_its_own_button_its_receipt_kept(admin, outbox):
    one, two = make_dead_letter(outbox, 1), make_dead_letter(outbox, 2)
    page = status_html(admin)
    assert f'data-delete="{two}"' in page and f'data-delete="{one}"' in page and "data-confirm=" in page
    done = admin.post("/status/delete", data={"csrf": csrf_of(page), "event": str(one)}, headers=basic())
    assert done.status_code == 303 and done.headers["Location"].endswith("/status?deleted=1")
    (gone,) = outbox.find_events("r1")
    assert gone["status"] == "purged" and gone["dead_letters"] == []
    assert outbox.event_content(one)[1] is None, "its answers are deleted"
    assert outbox.stats(SEGMENT).dead == 1 and [source for source, _, _ in outbox.dead_letters(destination=SEGMENT)] == ["r2"]
    assert "Deleted the dead letters of 1 event" in status_html(admin, done.headers["Location"])
    # The receipt stays: Refiner resending the response is a duplicate, not a new event.
    assert post_refiner(admin, survey_body(1, answer=ANSWER)).json["status"] == "duplicate"
    assert (
        admin.post("/status/delete", data={"csrf": csrf_of(page), "event": str(one)}, headers=basic())
        .headers["Location"]
        .endswith("deleted=0")
    )
    assert admin.post("/status/delete", data={"csrf": csrf_of(page)}, headers=basic()).status_code == 400
    assert admin.post("/status/delete", data={"csrf": csrf_of(page), "event": "1; drop"}, headers=basic()).status_code == 400
    assert admin.post("/status/delete", data={"csrf": csrf_of(page), "event": "99999999999"}, headers=basic()).status_code == 400
    assert (
        admin.post("/status/delete", data={"csrf": csrf_of(page), "event": "4294967296"}, headers=basic())
        .headers["Location"]
        .endswith("deleted=0")
    )
    assert outbox.stats(SEGMENT).dead == 1


@pytest.mark.parametrize("route", ["/status/replay", "/status/delete"])
def test_replay_one_and_delete_one_refuse_a_form_without_the_csrf_token(admin, outbox, route):
    one = make_dead_letter(outbox, 1)
    token = csrf_of(status_html(admin))
    for form in ({"event": str(one)}, {"event": str(one), "csrf": ""}, {"event": str(one), "csrf": token[::-1]}):
        refused = admin.post(route, data=form, headers=basic())
        assert refused.status_code == 403 and refused.json["error"] == "csrf", form
    assert admin.post(f"{route}?csrf={token}", data={"event": str(one)}, headers=basic()).status_code == 403
    assert admin.post(route, data={"event": str(one), "csrf": token}, headers=basic(PASSWORD + "x")).status_code == 401
    assert outbox.stats(SEGMENT).dead == 1 and outbox.find_events("r1")[0]["dead_letters"], "nothing changed"


def test_an_event_opens_by_its_response_id_its_messageid_or_its_internal_id(admin, outbox):
    dead = make_dead_letter(outbox, 1)
    segment_event = make_refiner_dead_letter(admin, outbox, 7)
    for key, expected in (("r1", dead), ("m-1", dead), ("msg-7", segment_event), (str(dead), dead), (str(segment_event), segment_event)):
        page = status_html(admin, f"/status/events/{key}")
        assert f"internal id {expected}." in page, key
    assert ANSWER in status_html(admin, "/status/events/r1") and SEGMENT_EMAIL in status_html(admin, "/status/events/msg-7")
    for unknown in ("nothing-here", "999999", "99999999999999999999", "x" * 300):
        answer = admin.get(f"/status/events/{unknown}", headers=basic())
        assert answer.status_code == 404 and answer.json["error"] == "not_found", unknown
    assert admin.get("/status/event/99999999999999", headers=basic()).status_code == 404
    assert admin.get("/status/events/r1").status_code == 401
    # A messageId with a slash in it is a key like any other.
    assert post_segment(admin, [{**segment_identify(8), "messageId": "api/8"}]).json["accepted"] == 1
    assert "internal id" in status_html(admin, "/status/events/api/8")


def test_a_key_that_is_both_an_internal_id_and_another_events_id_lists_both(admin, outbox):
    dead = make_dead_letter(outbox, 1)
    # A Segment messageId made of digits, equal to the dead event's internal id.
    assert post_segment(admin, [{**segment_identify(3), "messageId": str(dead)}]).json["accepted"] == 1
    page = status_html(admin, f"/status/events/{dead}")
    assert f"2 events are named <code>{dead}</code>" in page
    rows = re.findall(r'<tr class="event">(.*?)</tr>', page, re.S)
    assert len(rows) == 2 and "internal id" in rows[0] and "Segment messageId" in rows[1]
    links = [re.search(r'href="(/status/event/\d+)"', row).group(1) for row in rows]
    assert links[0] == f"/status/event/{dead}" and links[1] != links[0]
    assert ANSWER not in page, "a list shows no answers"
    # A response id shared by two events of one response lists both too.
    outbox.store_many([entry_for(1, event="Shown Survey")])
    assert "2 events are named <code>r1</code>" in status_html(admin, "/status/events/r1")


def test_the_last_delivery_error_says_when_delivery_recovered_and_stays_red_only_until_then(admin, outbox):
    from sqlalchemy import update

    from refiner_source.store import last_errors

    outbox.store_many([entry_for(1), entry_for(2), entry_for(3)])
    a, b, c = outbox.claim(SEGMENT, 3, 60, "w")
    outbox.settle("w", released=[a.id], delay=0, error="HTTP 503: later", destination=SEGMENT)
    failing = section_of(status_html(admin), SEGMENT)
    assert re.search(r'class="bad last-error">HTTP 503<', failing) and "nothing delivered since" in failing and "recovered" not in failing
    with outbox.engine.begin() as conn:
        conn.execute(update(last_errors).values(at=time.time() - 180))
    outbox.settle("w", delivered=[b.id], destination=SEGMENT)
    recovered = section_of(status_html(admin), SEGMENT)
    (line,) = re.findall(r'class="ok recovered">(.*?)<', recovered)
    assert re.fullmatch(r"recovered \d\d:\d\d UTC, 3 min after", line), line
    assert 'class="muted last-error">HTTP 503<' in recovered and "nothing delivered since" not in recovered
    # Failing again after the recovery: red again.
    time.sleep(0.01)
    outbox.settle("w", released=[c.id], delay=0, error="HTTP 502: again", destination=SEGMENT)
    again = section_of(status_html(admin), SEGMENT)
    assert 'class="bad last-error">HTTP 502<' in again and "recovered" not in again


def test_cli_status_shows_the_refiner_call_once_per_segment_dead_letter_and_json_keeps_its_fields(admin_app, admin, outbox, store_url):
    from click.testing import CliRunner

    from refiner_source.run.cli import main

    make_dead_letter(outbox, 1)
    make_refiner_dead_letter(admin, outbox, 7)
    env = {"DATABASE_URL": store_url, "SEGMENT_SHARED_SECRET": SEGMENT_SECRET, "REFINER_API_KEY": "k"}
    text = CliRunner().invoke(main, ["status"], env=env).output
    assert "newest dead letters (Segment messageId, call, error)" in text
    (line,) = [row for row in text.splitlines() if "msg-7" in row]
    assert line.split() == ["msg-7", "/identify-user", "HTTP", "422:", "refused"]
    assert "newest dead letters (response id, message id, error)" in text and "  r1  m-1  HTTP 400 invalid" in text
    report = json.loads(CliRunner().invoke(main, ["status", "--json"], env=env).output)
    assert report["directions"][REFINER]["dead_letters"] == [{"id": "msg-7", "message_id": "msg-7", "error": "HTTP 422: refused"}]
    rejected = {"id": "r1", "message_id": "m-1", "error": "HTTP 400 invalid: rejected by the test"}
    assert report["directions"][SEGMENT]["dead_letters"] == [rejected]
