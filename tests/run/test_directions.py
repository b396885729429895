"""Each direction on alone, end to end: the installed `refiner-source serve` (or `worker`) with one
pair of variables set, real ports, and local servers standing in for Segment, Refiner's REST API and
the alert webhook. The direction that is off answers 404 not_enabled and shows as off in `status`;
the store's upkeep (retention, alerts) runs whichever direction is on; and neither pair, or half of
one, is refused in one line before anything starts."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

import pytest
import requests
from sqlalchemy import text

from refiner_source.store import REFINER, SEGMENT, DeadLetter, Store
from refiner_source.to_refiner.events import load
from refiner_source.to_refiner.intake import prepare
from tests.conftest import SECRET, entry_for, load_fixture
from tests.ops.test_alerts import AlertReceiver
from tests.refiner_stub import RefinerStub
from tests.run.test_cli import one_line_error, run
from tests.service import Service, free_port, wait_until

SHARED_SECRET = "segment-shared-secret-0123456789"
API_KEY = "refiner-directions-key"
WRITE_KEY = "directions-write-key"

TO_SEGMENT = {"SEGMENT_WRITE_KEY": WRITE_KEY, "REFINER_WEBHOOK_SECRET": SECRET}
TO_REFINER = {"SEGMENT_SHARED_SECRET": SHARED_SECRET, "REFINER_API_KEY": API_KEY}
# Whatever the developer's shell has set must not turn a direction on behind the test's back.
OURS = ("SEGMENT_", "REFINER_", "DATABASE_URL", "ALERT_", "PORT", "WEB_CONCURRENCY")


@pytest.fixture
def refiner():
    with RefinerStub(api_key=API_KEY) as stub:
        yield stub


@pytest.fixture
def start(tmp_path):
    """start(args, env): the command with exactly `env` over a clean environment; stopped by SIGTERM
    afterwards, which it must obey at once, with exit 0."""
    started: list[Service] = []

    def start(args: list[str], env: dict[str, str]) -> Service:
        service = Service(args, env, tmp_path / f"{args[0]}-{len(started)}.log")
        service.env = {k: v for k, v in os.environ.items() if not k.startswith(OURS)} | env
        started.append(service)
        return service.start()

    yield start
    problems = []
    for service in started:
        running = service.process.poll() is None
        began = time.monotonic()
        code = service.stop()
        if running and (code != 0 or time.monotonic() - began > 10):
            problems.append(f"SIGTERM: exit {code} after {time.monotonic() - began:.1f}s:\n{service.logs()[-2000:]}")
    assert not problems, problems[0]


def serve_env(store_url: str, **env: str) -> dict[str, str]:
    return {"PORT": str(free_port()), "WEB_CONCURRENCY": "1", "DATABASE_URL": store_url, **env}


def status(service: Service, *args: str) -> str:
    done = run(["status", *args], {k: v for k, v in service.env.items() if k.startswith(OURS)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def sign(raw: bytes) -> str:
    return hmac.new(SHARED_SECRET.encode(), raw, hashlib.sha1).hexdigest()


def identify(message_id: str = "ajs-directions-1", email: str = "ada@example.com") -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": message_id,
        "userId": "u1",
        "traits": {"email": email, "plan": "pro"},
        "timestamp": "2026-11-18T16:42:57.000Z",
    }


def post_refiner_webhook(service: Service) -> requests.Response:
    return requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=load_fixture("webhook_completed_survey.json"), timeout=10)


# --- one direction on, the other off --------------------------------------------------------------------


def test_only_segment_to_refiner_serves_it_and_refuses_refiners_webhook(start, store_url, refiner):
    service = start(["serve"], serve_env(store_url, REFINER_API_URL=refiner.url, **TO_REFINER))

    raw = json.dumps(identify()).encode()
    answer = requests.post(f"{service.url}/webhooks/segment", data=raw, headers={"X-Signature": sign(raw)}, timeout=10)
    assert answer.status_code == 200 and answer.json()["accepted"] == 1, answer.text
    (call,) = refiner.wait_for_calls(lambda calls: len(calls) >= 1, timeout=20)
    assert call["path"] == "/identify-user" and call["body"]["id"] == "u1" and call["body"]["email"] == "ada@example.com"
    assert call["auth"] == f"Bearer {API_KEY}"

    off = post_refiner_webhook(service)
    assert off.status_code == 404 and off.json()["error"] == "not_enabled", off.text

    text_status = status(service)
    assert "Refiner to Segment: off (SEGMENT_WRITE_KEY and REFINER_WEBHOOK_SECRET turn it on)" in text_status, text_status
    assert "Segment to Refiner: off" not in text_status and "Segment to Refiner" in text_status
    directions = json.loads(status(service, "--json"))["directions"]
    assert directions["segment"]["on"] is False and directions["refiner"]["on"] is True
    wait_until(lambda: json.loads(status(service, "--json"))["directions"]["refiner"]["delivered"] == 1, 20, "the identify settled")
    assert json.loads(status(service, "--json"))["directions"]["segment"]["pending"] == 0  # the refused webhook stored nothing


def test_only_refiner_to_segment_serves_it_and_refuses_segments_webhook(start, store_url, segment):
    service = start(["serve"], serve_env(store_url, SEGMENT_HOST=segment.url, **TO_SEGMENT))

    answer = post_refiner_webhook(service)
    assert answer.status_code == 202 and answer.json()["messages"] == 3, answer.text
    received = segment.wait_for(lambda r: len(r) >= 3, timeout=20)
    assert sorted(m["type"] for m in received) == ["group", "identify", "track"]
    assert segment.requests[0]["body"]["writeKey"] == WRITE_KEY

    raw = json.dumps(identify()).encode()
    off = requests.post(f"{service.url}/webhooks/segment", data=raw, headers={"X-Signature": sign(raw)}, timeout=10)
    assert off.status_code == 404 and off.json()["error"] == "not_enabled", off.text

    text_status = status(service)
    assert "Segment to Refiner: off (SEGMENT_SHARED_SECRET and REFINER_API_KEY turn it on)" in text_status, text_status
    assert "Refiner to Segment: off" not in text_status
    directions = json.loads(status(service, "--json"))["directions"]
    assert directions["segment"]["on"] is True and directions["refiner"]["on"] is False
    assert directions["refiner"]["pending"] == directions["refiner"]["delivered"] == 0  # the refused event stored nothing


# --- neither pair, or half of one: refused in one line -----------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "worker"])
@pytest.mark.parametrize(
    "env, missing",
    [
        ({}, ["SEGMENT_WRITE_KEY", "REFINER_WEBHOOK_SECRET", "SEGMENT_SHARED_SECRET", "REFINER_API_KEY"]),
        ({"SEGMENT_WRITE_KEY": WRITE_KEY}, ["REFINER_WEBHOOK_SECRET"]),
        ({"REFINER_WEBHOOK_SECRET": SECRET}, ["SEGMENT_WRITE_KEY"]),
        ({"SEGMENT_SHARED_SECRET": SHARED_SECRET}, ["REFINER_API_KEY"]),
    ],
    ids=["neither", "write-key-alone", "webhook-secret-alone", "shared-secret-alone"],
)
def test_neither_pair_or_half_a_pair_is_refused_in_one_line_naming_what_is_missing(command, env, missing, tmp_path):
    database = tmp_path / "never-created.db"
    line = one_line_error(run([command], {"DATABASE_URL": f"sqlite:///{database}", "PORT": str(free_port()), **env}))
    for name in missing:
        assert name in line, line
    for given in env:  # what is set is never asked for
        assert f"needs {given}" not in line and not line.startswith(f"Error: {given} is not set"), line
    assert not database.exists()  # refused before the store is touched


# --- upkeep with only Segment -> Refiner on ------------------------------------------------------------------


def settle_refiner_event(outbox: Store, message_id: str, *, dead: bool = False, email: str = "ada@example.com") -> None:
    outbox.store_many([prepare(load(identify(message_id, email)))])
    (claimed,) = outbox.claim(REFINER, 1, 60, "prep")
    if dead:
        outbox.settle("prep", dead=[DeadLetter(claimed.id, message_id, "identify-user", "HTTP 422: invalid")], destination=REFINER)
    else:
        outbox.settle("prep", delivered=[claimed.id], destination=REFINER)


def test_worker_with_only_segment_to_refiner_purges_and_alerts(start, store_url, outbox, refiner):
    """The store's upkeep is no part of a direction: the worker runs it with Segment -> Refiner alone,
    and it forgets old answers of both directions' events (Refiner -> Segment's stored before it was off)."""
    days = 86400
    settle_refiner_event(outbox, "ajs-old", email="old@example.com")
    settle_refiner_event(outbox, "ajs-recent")
    settle_refiner_event(outbox, "ajs-dead", dead=True, email="dead@example.com")
    outbox.store_many([entry_for("old-response")])
    (response,) = outbox.claim(SEGMENT, 1, 60, "prep")
    outbox.settle("prep", delivered=[response.id], destination=SEGMENT)
    old = ("ajs-old", "rold-response")  # entry_for(i) is response r<i>
    with outbox.engine.begin() as conn:  # delivered 30 days ago, with 1 day of retention
        for key in old:
            sql = text("UPDATE refiner_events SET delivered_at = :at WHERE response_id = :key")
            conn.execute(sql, {"at": time.time() - 30 * days, "key": key})

    def kept() -> dict[str, bool]:
        """response_id -> whether the event's content is still kept, for each row still there."""
        with outbox.engine.connect() as conn:
            rows = conn.execute(text("SELECT response_id, event, messages FROM refiner_events")).all()
        return {r.response_id: r.event is not None for r in rows}

    assert kept() == {"ajs-old": True, "ajs-recent": True, "ajs-dead": True, "rold-response": True}
    with AlertReceiver() as receiver:
        env = {
            "DATABASE_URL": store_url,
            "REFINER_API_URL": refiner.url,
            "REFINER_RETENTION_DAYS": "1",
            "ALERT_WEBHOOK_URL": receiver.url,
            "ALERT_PENDING_SECONDS": "3",
            **TO_REFINER,
        }
        start(["worker"], env)
        (alert,) = receiver.wait_for(1, timeout=20)
        assert "Segment to Refiner" in alert and "1 new dead letter" in alert and "--to refiner" in alert, alert
        wait_until(lambda: not kept()["ajs-old"], 20, "the old event's content forgotten")
    # The old events' receipts stay (a resend is still a duplicate); their content is gone; the rest is kept.
    assert kept() == {"ajs-old": False, "ajs-recent": True, "ajs-dead": True, "rold-response": False}
    assert "dead@example.com" not in json.dumps(receiver.bodies)
    assert refiner.posted(status=None) == []  # nothing was pending: the delivery loop had nothing to send
