"""End to end, erasing a person: `refiner-source serve` with both directions on, stand-ins for
Segment and Refiner, and `refiner-source forget` run as the operator would. A person's events,
delivered and kept, dead, and waiting, in both directions, are erased; nothing more of theirs
reaches either stand-in; other people's events go on; and a resent webhook, a Segment event and a
backfill page for them are all ignored with the reason `forgotten`."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from refiner_source.to_segment.mapping import message_id
from tests.conftest import SECRET, survey_body
from tests.refiner_stub import RefinerStub
from tests.service import Service, command, free_port, wait_until

SHARED_SECRET = "segment-shared-secret-0123456789"


def both_directions(tmp_path, store_url: str, refiner: RefinerStub, segment) -> Service:
    """`refiner-source serve` on `store_url` with both directions on, started."""
    return Service(
        ["serve"],
        {
            "PORT": str(free_port()),
            "WEB_CONCURRENCY": "2",
            "DATABASE_URL": store_url,
            "SEGMENT_HOST": segment.url,
            "SEGMENT_WRITE_KEY": "e2e-write-key",
            "REFINER_WEBHOOK_SECRET": SECRET,
            "SEGMENT_SHARED_SECRET": SHARED_SECRET,
            "REFINER_API_KEY": refiner.api_key,
            "REFINER_API_URL": refiner.url,
        },
        tmp_path / "service.log",
    ).start()


@pytest.fixture
def service(tmp_path, store_url, refiner, segment):
    running = both_directions(tmp_path, store_url, refiner, segment)
    yield running
    running.stop()


@pytest.fixture
def sqlite_service(tmp_path, refiner, segment):
    (tmp_path / "store").mkdir()  # a folder of the store's files alone
    running = both_directions(tmp_path, f"sqlite:///{tmp_path / 'store' / 'refiner-source.db'}", refiner, segment)
    yield running
    running.stop()


def cli(service: Service, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*command(), *args], env={**service.env, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def status(service: Service) -> dict[str, Any]:
    return json.loads(cli(service, "status", "--json").stdout)


def post_refiner(service: Service, body: dict) -> requests.Response:
    return requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=body, timeout=10)


def post_segment(service: Service, event: dict) -> requests.Response:
    return requests.post(f"{service.url}/webhooks/segment", json=event, headers={"Authorization": f"Bearer {SHARED_SECRET}"}, timeout=10)


def identify(mid: str, user: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "messageId": mid, "userId": user, "traits": {"email": f"{user}@example.com", **traits}}


def of_user(messages: list[dict], user: str) -> list[dict]:
    return [m for m in messages if m.get("userId") == user]


def test_e2e_forget_erases_a_person_in_both_directions_and_keeps_them_out(service, segment, refiner, tmp_path):
    # Refiner -> Segment: user-1's Saw Survey delivered and kept, Dismissed Survey dead, Completed Survey waiting.
    saw, dismissed, completed = survey_body("a", "Saw Survey"), survey_body("b", "Dismissed Survey"), survey_body("c")
    for body in (saw, dismissed, completed):
        body["remote_id"] = "user-1"
    assert post_refiner(service, saw).status_code == 202
    segment.wait_for(lambda r: len(of_user(r, "user-1")) == 1)
    segment.reject[message_id("rb", "Dismissed Survey", "track")] = (400, {"code": "invalid_request", "message": "no"})
    assert post_refiner(service, dismissed).status_code == 202
    wait_until(lambda: status(service)["directions"]["segment"]["dead"] == 1, 30, "the Dismissed Survey dead")

    # Segment -> Refiner: user-1's first identify delivered, a second dead, a third waiting on retries.
    def answer(path: str, body: dict):
        if body.get("id") == "user-1" and body.get("step") == "dead":
            return (400, {}, {"message": "refused"})
        if body.get("id") == "user-1" and body.get("step") == "wait":
            # In line, not tried again for 10 s (the forget comes in between, so no call is in flight when it does).
            return (503, {"Retry-After": "10"}, {"message": "later"})
        return None

    refiner.respond = answer
    assert post_segment(service, identify("m-1", "user-1", step="kept")).status_code == 200
    refiner.wait_for_calls(lambda calls: any(c["body"].get("step") == "kept" for c in calls))
    assert post_segment(service, identify("m-2", "user-1", step="dead")).status_code == 200
    wait_until(lambda: status(service)["directions"]["refiner"]["dead"] == 1, 30, "m-2 dead")
    assert post_segment(service, identify("m-3", "user-1", step="wait")).status_code == 200
    refiner.wait_for_calls(lambda calls: any(c["body"].get("step") == "wait" for c in calls), status=503)

    segment.down = True  # Segment out: user-1's Completed Survey and user-2's wait in line
    other = survey_body("d")
    other["remote_id"] = "user-2"
    assert post_refiner(service, completed).status_code == 202
    assert post_refiner(service, other).status_code == 202
    wait_until(lambda: status(service)["directions"]["segment"]["pending"] == 2, 30, "two waiting for Segment")

    done = json.loads(cli(service, "forget", "--user", "user-1", "--json").stdout)
    forgotten_at = time.monotonic()
    assert done["suppressed"] is True
    assert done["directions"]["segment"] == {"events": 3, "dead_letters": 1, "waiting": 1}
    assert done["directions"]["refiner"] == {"events": 3, "dead_letters": 1, "waiting": 1}
    after = status(service)
    assert after["suppressed"] == {"people": 1, "other_key": 0}
    assert after["directions"]["segment"]["dead"] == 0 and after["directions"]["refiner"]["dead"] == 0
    assert after["directions"]["segment"]["pending"] == 1 and after["directions"]["refiner"]["pending"] == 0

    # Everyone else goes on; nothing more of user-1 reaches either stand-in.
    segment.down = False
    refiner.respond = lambda path, body: None
    received = segment.wait_for(lambda r: len(of_user(r, "user-2")) >= 2, timeout=60)
    assert len(of_user(received, "user-1")) == 1  # the Saw Survey delivered before
    assert post_segment(service, identify("m-4", "user-2")).status_code == 200
    refiner.wait_for_calls(lambda calls: any(c["body"].get("id") == "user-2" for c in calls))

    # Whatever comes for user-1 now is ignored as forgotten (within the refresh bound: wait for it, the
    # resend meanwhile being a duplicate of the receipt that stays).
    again = wait_until(lambda: (a := post_refiner(service, saw).json()).get("status") == "ignored" and a, 10, "the resend ignored")
    assert again == {"status": "ignored", "reason": "forgotten"}
    resent = post_segment(service, identify("m-1", "user-1")).json()
    assert resent["ignored"] == 1 and resent["ignored_reasons"][0]["reason"] == "forgotten"
    fresh = post_segment(service, identify("m-new", "user-1", plan="pro")).json()
    assert fresh["accepted"] == 0 and fresh["ignored_reasons"][0]["reason"] == "forgotten"
    assert post_refiner(service, survey_body("e") | {"remote_id": "user-1"}).json() == {"status": "ignored", "reason": "forgotten"}

    with RefinerStub(total=3, api_key=refiner.api_key) as api:  # a backfill page: user-0, user-1, user-2
        filled = cli(service, "backfill", "--workers", "0", REFINER_API_URL=api.url)
    assert "2 stored for delivery" in filled.stdout and "1 forgotten" in filled.stdout
    segment.wait_for(lambda r: {"user-0"} <= {m.get("userId") for m in r} and len(of_user(r, "user-2")) >= 4, timeout=60)

    time.sleep(0.5)  # anything of user-1 still on its way would have arrived by now
    assert len(of_user(segment.received(), "user-1")) == 1
    assert not [c for c in refiner.posted(status=None) if c["body"].get("id") == "user-1" and c["at"] > forgotten_at]
    logs = service.logs()
    assert "user-1@example.com" not in logs


def test_after_a_forget_no_file_of_a_sqlite_store_holds_their_id_or_email_even_after_a_crash(sqlite_service, segment, refiner, tmp_path):
    user, email = "zq7-erased-user-4711", "zq7.erased.4711@bytes.example"
    body = survey_body("bytes")
    body.update(remote_id=user, email=email)
    body["attributes"]["email"] = email
    assert post_refiner(sqlite_service, body).status_code == 202
    segment.wait_for(lambda r: len(of_user(r, user)) == 3)
    refiner.respond = lambda path, call: (400, {}, {"message": f"refused {email}"}) if call.get("step") == "dead" else None
    assert post_segment(sqlite_service, identify("zq7-m-1", user, email=email)).status_code == 200
    assert post_segment(sqlite_service, identify("zq7-m-2", user, email=email, step="dead")).status_code == 200
    # A dead letter, and the last error, quoting the email:
    wait_until(lambda: status(sqlite_service)["directions"]["refiner"]["dead"] == 1, 30, "the dead identify")

    def store_bytes() -> dict[str, bytes]:  # the database, its -wal and -shm, the writer lock: all beside one another
        return {p.name: p.read_bytes() for p in sorted(Path(tmp_path / "store").iterdir())}

    before = store_bytes()
    assert any(user.encode() in b for b in before.values()) and any(email.encode() in b for b in before.values())
    cli(sqlite_service, "forget", "--user", user, "--email", email)
    sqlite_service.kill(signal.SIGKILL)  # no clean shutdown: no last connection's checkpoint
    sqlite_service.process.wait(10)
    time.sleep(0.3)  # the rest of the process group

    after = store_bytes()
    assert {"refiner-source.db", "refiner-source.db-wal", "refiner-source.db-writer.lock"} <= set(after)
    assert [(name, what) for name, data in after.items() for what in (user, email) if what.encode() in data] == []
