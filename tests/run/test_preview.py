"""`refiner-source preview`: what a body becomes, by the same code as the webhook and the delivery.

The proof that preview "runs the same code as delivery": for every example body of the tests, the
real service is sent the body and the stand-in's received calls are compared with what preview
printed for it, one for one (Segment adds `sentAt` when a batch is sent: that field alone differs).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess

import pytest
import requests

from tests.conftest import SECRET, load_fixture, survey_body
from tests.refiner_stub import RefinerStub
from tests.service import Service, command, free_port, wait_until

SHARED_SECRET = "preview-shared-secret-0123456789"
MAPPING = """
account_questions = ["employee_count"]
[traits]
"What is your job role?" = "job_role"
[types]
"How likely are you to recommend us?" = "number"
[nps]
question = "How likely are you to recommend us?"
[events]
per_answer = "Survey Question Answered"
"Dismissed Survey" = "Survey Closed"
[to_refiner]
page_event = "Viewed a page"
"""


def refiner_bodies() -> list[dict]:
    """The example Refiner webhook bodies of the tests: the completed survey (with an account and
    without one, anonymous), a viewed one and a dismissed one."""
    full = load_fixture("webhook_completed_survey.json")
    no_account = copy.deepcopy(full)
    no_account["response"]["uuid"] = "preview-no-account"
    no_account["account"]["remote_id"] = None
    no_account["remote_id"] = None
    return [full, no_account, survey_body("preview-seen", "Saw Survey"), survey_body("preview-dismissed", "Dismissed Survey")]


def segment_bodies() -> list[dict | list]:
    context = {"traits": {"email": "member@globex.example"}}
    return [
        {
            "type": "identify",
            "messageId": "p-1",
            "userId": "u-1",
            "traits": {"email": "ada@example.com", "plan": "pro", "address": {"city": "Lyon"}},
        },
        {
            "type": "group",
            "messageId": "p-2",
            "userId": "u-1",
            "groupId": "g-1",
            "traits": {"name": "Globex", "email": "billing@globex.example"},
            "context": context,
        },
        {"type": "track", "messageId": "p-3", "userId": "u-2", "event": "Signed Up", "properties": {"plan": "pro"}},
        [
            {"type": "page", "messageId": "p-4", "userId": "u-3", "name": "Pricing"},
            {
                "type": "track",
                "messageId": "p-5",
                "userId": "u-4",
                "event": "Audience Entered",
                "context": {"personas": {"computation_key": "power_users"}},
            },
            {"type": "screen", "messageId": "p-6", "userId": "u-4"},
        ],
    ]


def preview(args: list[str], body: bytes, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), "preview", *args], input=body, env=env, capture_output=True, timeout=60)


@pytest.fixture
def env(tmp_path):
    import os

    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SEGMENT_", "REFINER_", "DATABASE_URL"))}
    return {**clean, "REFINER_MAPPING_FILE": str(mapping), "DATABASE_URL": f"sqlite:///{tmp_path}/store.db"}


def test_preview_prints_exactly_what_segment_receives_for_every_example_body(env, tmp_path, segment):
    previews = []
    for body in refiner_bodies():
        done = preview([], json.dumps(body).encode(), env)
        assert done.returncode == 0, done.stderr
        previews.append(json.loads(done.stdout))
    assert not (tmp_path / "store.db").exists()  # preview stores nothing

    serve_env = {**env, "PORT": str(free_port()), "WEB_CONCURRENCY": "1", "SEGMENT_WRITE_KEY": "wk", "REFINER_WEBHOOK_SECRET": SECRET}
    serve_env["SEGMENT_HOST"] = segment.url
    service = Service(["serve"], serve_env, tmp_path / "serve.log").start()
    try:
        for body, printed in zip(refiner_bodies(), previews, strict=True):
            before = len(segment.received())
            answer = requests.post(f"{service.url}/webhooks/refiner?token={SECRET}", json=body, timeout=10)
            assert answer.status_code == 202 and answer.json()["messages"] == len(printed), answer.text
            wanted = before + len(printed)
            wait_until(lambda n=wanted: len(segment.received()) >= n, 20, f"{wanted} messages at the stand-in")
            received = segment.received()[before:wanted]
            assert [{k: v for k, v in m.items() if k != "sentAt"} for m in received] == printed
    finally:
        assert service.stop() == 0
    kinds = [[m.get("event", m["type"]) for m in p] for p in previews]
    assert kinds[0][:3] == ["identify", "group", "Survey Completed"] and kinds[0][3:] == ["Survey Question Answered"] * 3
    assert kinds[2] == ["Survey Viewed"] and kinds[3] == ["Survey Closed"]


def test_preview_segment_prints_exactly_what_refiner_receives_for_every_example_event(env, tmp_path):
    printed_per_body = []
    for body in segment_bodies():
        done = preview(["--segment"], json.dumps(body).encode(), env)
        assert done.returncode == 0, done.stderr
        printed_per_body.append(json.loads(done.stdout))
    printed_calls = [call for printed in printed_per_body for call in printed]
    assert "event 2 (p-6) is ignored" in preview(["--segment"], json.dumps(segment_bodies()[3]).encode(), env).stderr.decode()

    with RefinerStub() as refiner:
        serve_env = {**env, "PORT": str(free_port()), "WEB_CONCURRENCY": "1", "SEGMENT_SHARED_SECRET": SHARED_SECRET}
        serve_env |= {"REFINER_API_KEY": "refiner-key", "REFINER_API_URL": refiner.url, "REFINER_API_CONCURRENCY": "1"}
        service = Service(["serve"], serve_env, tmp_path / "serve.log").start()
        try:
            # One body at a time, each delivered before the next is sent: identify calls of one contact
            # that wait together are merged by delivery (docs/mapping.md), which a preview of one body cannot know.
            expected = 0
            for body, printed in zip(segment_bodies(), printed_per_body, strict=True):
                raw = json.dumps(body).encode()
                signature = hmac.new(SHARED_SECRET.encode(), raw, hashlib.sha1).hexdigest()
                answer = requests.post(f"{service.url}/webhooks/segment", data=raw, headers={"X-Signature": signature}, timeout=10)
                assert answer.status_code == 200, answer.text
                expected += len(printed)
                calls = refiner.wait_for_calls(lambda c, n=expected: len(c) >= n, timeout=30)
        finally:
            assert service.stop() == 0
    assert [{"path": c["path"], "body": c["body"]} for c in calls] == printed_calls
    group_call = next(c for c in printed_calls if "account" in c["body"])
    assert group_call["body"]["email"] == "member@globex.example" and group_call["body"]["account"]["email"] == "billing@globex.example"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"{not json",
        b"[1, 2]",
        b'{"triggered_event": "Completed Survey"}',
        json.dumps({**load_fixture("webhook_completed_survey.json"), "deep": json.loads("[" * 60 + "]" * 60)}).encode(),
        b"{" + b'"a": "' + b"x" * (1 << 20) + b'"}',
    ],
    # Named, not shown: a test's id goes into the environment of the commands it runs (PYTEST_CURRENT_TEST),
    # and a 1 MiB one is more than an exec accepts.
    ids=["empty", "not-utf8", "not-json", "array", "wrong-shape", "too-deep", "over-1-mib"],
)
def test_a_body_the_webhook_refuses_gets_the_webhooks_error_from_preview(env, raw, client):
    from_webhook = client.post(f"/webhooks/refiner?token={SECRET}", data=raw, content_type="application/json")
    done = preview([], raw, env)
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode().strip() == f"the webhook would answer HTTP {from_webhook.status_code}: " + json.dumps(
        from_webhook.json, ensure_ascii=False
    )


def test_an_event_the_webhook_ignores_previews_as_nothing_with_the_reason(env):
    done = preview([], json.dumps(survey_body("p-ignored", "Viewed Page")).encode(), env)
    assert done.returncode == 0 and json.loads(done.stdout) == []
    assert "ignored: triggered_event 'Viewed Page': not a forwarded event" in done.stderr.decode()


def test_preview_reads_a_file_named_on_the_command_line(env, tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(load_fixture("webhook_completed_survey.json")))
    done = subprocess.run([*command(), "preview", str(path)], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0 and [m["type"] for m in json.loads(done.stdout)][:2] == ["identify", "group"]


def test_preview_of_the_documented_example_body_prints_what_the_docs_say_segment_receives(env):
    from tests.test_readme import MAPPING_DOC, _json_objects

    shown = _json_objects(MAPPING_DOC.split("### Worked example")[1])
    env = {k: v for k, v in env.items() if k != "REFINER_MAPPING_FILE"}  # the example is with no mapping file
    done = preview([], json.dumps(load_fixture("webhook_completed_survey.json")).encode(), env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [m["type"] for m in printed] == [m["type"] for m in shown]
    for expected, actual in zip(shown, printed, strict=True):
        assert {key: actual[key] for key in expected} == expected  # what the docs show is exact; the rest is trimmed there


def test_a_body_delivery_would_keep_as_a_dead_letter_is_said_so_by_preview(monkeypatch):
    from click.testing import CliRunner

    from refiner_source.run.cli import main
    from refiner_source.to_segment import delivery
    from refiner_source.to_segment.mapping import MessageTooLarge

    def too_large(event, *args, **kwargs):  # what the mapping raises when nothing is left to shorten
        raise MessageTooLarge(f"identify for response {event.response_uuid} is over 32 KB with nothing left to shorten")

    monkeypatch.setattr(delivery, "map_event", too_large)
    for name in ("REFINER_MAPPING_FILE", "REFINER_MAPPING"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["preview"], input=json.dumps(load_fixture("webhook_completed_survey.json")))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("would be a dead letter (it cannot be mapped): MessageTooLarge: identify for response")
