"""The operator's view: GET /status, GET /status/event/<id>, POST /status/replay and GET /metrics.

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
from refiner_source.config import DIRECTION_VARIABLES
from refiner_source.directions import REFINER, SEGMENT
from refiner_source.ops.tally import DELIVERY, Tally
from refiner_source.store import DeadLetter
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
    assert "1 dead letter(s) queued again." in after and 'id="replay-segment"' not in after
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


def test_metrics_are_prometheus_text_with_exact_counts_and_conventional_names(admin_app, admin, outbox):
    for i in range(3):
        assert post_refiner(admin, survey_body(i)).status_code == 202
    assert post_refiner(admin, survey_body(0)).json["status"] == "duplicate"
    assert post_refiner(admin, survey_body(9, event="Created Contact")).json["status"] == "ignored"
    assert post_refiner(admin, {"triggered_event": "Completed Survey"}).status_code == 422
    segment = post_segment(admin, [segment_identify(1), segment_identify(2), segment_identify(1), {"type": "identify"}])
    assert segment.status_code == 200 and (segment.json["accepted"], segment.json["duplicate"], len(segment.json["invalid"])) == (2, 1, 1)
    admin_app.extensions["refiner_source"].tally.flush()

    (claimed,) = outbox.claim(SEGMENT, 1, 60, "w")
    outbox.settle("w", dead=[DeadLetter(claimed.id, "m", "track", "HTTP 400")], destination=SEGMENT)
    worker = Tally(outbox, background=False)  # as the delivery worker counts, after a round
    worker.add(DELIVERY, SEGMENT, "delivered", 2)
    worker.add(DELIVERY, SEGMENT, "dead", 1)
    worker.latency(SEGMENT, 0.3)
    worker.latency(SEGMENT, 1.7)
    worker.flush()

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
    assert value(families, "refiner_source_pending_events", destination=SEGMENT) == 2
    assert value(families, "refiner_source_pending_events", destination=REFINER) == 2
    assert value(families, "refiner_source_dead_events", destination=SEGMENT) == 1
    assert value(families, "refiner_source_dead_events", destination=REFINER) == 0
    assert 0 <= value(families, "refiner_source_oldest_pending_age_seconds", destination=SEGMENT) < 60
    latency = {
        float(s.labels["le"]): s.value
        for s in families["refiner_source_delivery_latency_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["destination"] == SEGMENT
    }
    assert (latency[0.25], latency[0.5], latency[1.0], latency[2.5], latency[math.inf]) == (0, 1, 1, 2, 2)
    assert value(families, "refiner_source_delivery_latency_seconds_count", destination=SEGMENT) == 2
    assert value(families, "refiner_source_delivery_latency_seconds_sum", destination=SEGMENT) == pytest.approx(2.0)
    assert value(families, "refiner_source_delivery_latency_seconds_count", destination=REFINER) == 0
    assert value(families, "refiner_source_direction_enabled", destination=SEGMENT) == 1
    assert value(families, "refiner_source_direction_enabled", destination=REFINER) == 1

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
    first, second = DIRECTION_VARIABLES[off]
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
