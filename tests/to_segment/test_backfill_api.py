"""Backfill: what Refiner's REST API gives for a response, and how the backfill uses it (docs/backfill.md);
a dry run's sample; what a skipped item leaves in the log; an API URL that refuses the connection."""

from __future__ import annotations

import json

import pytest
import responses

from refiner_source.directions.mapping_file import MappingRules
from refiner_source.refiner_rest import RefinerClient
from refiner_source.store import SEGMENT, Store
from refiner_source.to_segment.backfill import BackfillError, run_backfill
from refiner_source.to_segment.events import ApiResponseSchema, WebhookSchema, event_from_json
from refiner_source.to_segment.intake import prepare
from refiner_source.to_segment.mapping import map_event
from tests.refiner_stub import RefinerStub, api_item, api_item_of_webhook
from tests.to_segment.test_backfill import NOW, RULES, URL, api, page

# --- what Refiner's API gives for a response, used in full (docs/backfill.md) --------------------


def test_the_stand_in_lists_attributes_and_incomplete_responses_only_as_asked():
    with RefinerStub(total=2, make=lambda i: api_item(i, completed=i == 0)) as stub:
        plain = stub.page({"page_length": "10"})["items"]
        asked = stub.page({"page_length": "10", "include": "completed", "with_attributes": "1"})["items"]
    assert [i["uuid"] for i in plain] == ["response-0000000", "response-0000001"]
    assert all("attributes" not in i["contact"] for i in plain)
    assert [i["uuid"] for i in asked] == ["response-0000000"]
    assert asked[0]["contact"]["attributes"]["first_name"] == "Person 0"


def backfilled(outbox, item, rules: MappingRules) -> dict[str, dict]:
    """The messages the delivery worker makes of `item` read by a backfill through the stand-in, by type."""
    with RefinerStub(total=1, make=lambda i: item) as stub:
        assert run_backfill(RefinerClient(stub.url, "refiner-key"), outbox, rules, {}).stored == 1
    (claimed,) = outbox.claim(SEGMENT, 10, 60, "t")
    return {m["type"]: m for m in map_event(event_from_json(claimed.event), rules, NOW)}


def of_webhook(body, rules: MappingRules) -> dict[str, dict]:
    return {m["type"]: m for m in map_event(WebhookSchema().load(body), rules, NOW)}


def test_backfilled_identify_and_group_carry_the_webhooks_traits_where_the_api_gives_them(outbox, webhook_body):
    # The API lists the account's uuid, remote_id, display_name and domain, not its attributes: the
    # group lacks the traits that come from account.attributes alone, and an answer is the account's
    # through account_questions (employee_count here), not by being one of its attributes.
    rules = MappingRules(account_questions=frozenset({"employee_count"}))
    hook = of_webhook(webhook_body, rules)
    api = backfilled(outbox, api_item_of_webhook(webhook_body), rules)
    assert api["identify"]["traits"] == hook["identify"]["traits"]
    assert api["track"]["properties"] == hook["track"]["properties"]
    assert api["group"]["groupId"] == hook["group"]["groupId"] == "acct-initech"
    assert api["group"]["traits"] == {"refiner_employee_count": "250-1000"}
    assert hook["group"]["traits"] == {**api["group"]["traits"], "refiner_name": "Initech", "refiner_plan": "enterprise"}


@pytest.mark.parametrize("also_the_contacts", [False, True])
def test_with_the_accounts_attributes_too_a_backfilled_response_maps_exactly_as_its_webhook(outbox, webhook_body, also_the_contacts):
    # Should the API list contact.account.attributes, they are used as the webhook's; and the contact's
    # attributes (with_attributes=1) decide, as in the webhook, that an answer which is an attribute of
    # both is the user's.
    if also_the_contacts:
        webhook_body["attributes"]["employee_count"] = "250-1000"
    hook = of_webhook(webhook_body, RULES)
    assert ("refiner_employee_count" in hook["identify"]["traits"]) is also_the_contacts
    assert backfilled(outbox, api_item_of_webhook(webhook_body, account_attributes=True), RULES) == hook


def test_dry_run_shows_messages_of_new_responses_only(outbox):
    outbox.store_many([prepare(ApiResponseSchema().load(api_item(i)), RULES) for i in range(0, 10, 2)])
    with RefinerStub(total=10) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=4), outbox, RULES, {}, dry_run=True, sample_size=6)
    assert (progress.seen, progress.stored, progress.duplicates) == (10, 5, 5)
    ids = [m["messageId"] for m in progress.sample]
    assert ids == [f"refiner-response-000000{i}-completed-survey-{call}" for i in (1, 3) for call in ("identify", "group", "track")]
    assert outbox.stats(SEGMENT).pending == 5


def test_e2e_dry_run_of_responses_all_sent_before_shows_no_message(store_url):
    from tests.run.test_cli import run

    box = Store(store_url)
    box.init_schema()
    box.store_many([prepare(ApiResponseSchema().load(api_item(i)), RULES) for i in range(3)])
    box.dispose()
    with RefinerStub(total=3) as refiner:
        env = {"DATABASE_URL": store_url, "REFINER_API_URL": refiner.url, "REFINER_API_KEY": "refiner-key"}
        result = run(["backfill", "--dry-run", "--workers", "0"], env)
    assert result.returncode == 0, result.stderr
    assert "3 response(s) read in 1 page(s): 0 would be new, 3 already sent" in result.stdout
    assert "no message would be sent" in result.stdout and '"type"' not in result.stdout


def broken_second(i: int) -> dict:
    """api_item(i), except that the second is not a valid response (a contact that is a text, answers that are one)."""
    if i == 1:
        return {"uuid": "broken", "completed_at": "2026-11-18 16:42:57", "contact": "nobody", "data": "a secret answer"}
    return api_item(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_skipped_item_is_logged_with_its_id_and_fields_whatever_the_workers(outbox, caplog, workers):
    import logging

    with caplog.at_level(logging.WARNING), RefinerStub(total=3, make=broken_second) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=2), outbox, RULES, {}, workers=workers)
    assert (progress.stored, progress.invalid) == (2, 1)
    (record,) = [r for r in caplog.records if r.getMessage() == "skipped an API item that is not a valid response"]
    assert record.response_id == "broken" and record.fields == ["contact._schema", "data"]
    assert "nobody" not in str(record.__dict__) and "a secret answer" not in str(record.__dict__)


def test_e2e_the_command_logs_a_skipped_item_with_its_default_workers(store_url):
    from tests.run.test_cli import run

    with RefinerStub(total=3, make=broken_second) as refiner:
        env = {"DATABASE_URL": store_url, "REFINER_API_URL": refiner.url, "REFINER_API_KEY": "refiner-key"}
        result = run(["backfill"], env)  # --workers: the number of CPUs
    assert result.returncode == 0, result.stderr
    assert "1 not valid (see the log)" in result.stdout
    logged = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (line,) = [entry for entry in logged if entry["msg"] == "skipped an API item that is not a valid response"]
    assert line["response_id"] == "broken" and line["fields"] == ["contact._schema", "data"]
    assert "a secret answer" not in result.stdout + result.stderr


def refused() -> Exception:
    """What requests raises when nothing listens: ConnectionRefusedError, wrapped."""
    import requests

    return requests.ConnectionError(ConnectionRefusedError(111, "Connection refused"))


@responses.activate
def test_a_refused_connection_before_any_answer_fails_at_once_naming_the_url():
    responses.get(URL, body=refused())
    client = api()
    with pytest.raises(BackfillError, match=r"^Refiner's API at https://refiner.test/v1 refused the connection: check REFINER_API_URL$"):
        client.fetch({})
    assert len(responses.calls) == 1 and client.sleeps == []


@responses.activate
def test_a_refused_connection_after_an_answer_is_a_blip_and_retried():
    responses.get(URL, json=page([api_item(0)], next_page_cursor="CUR2", last_page=2))
    responses.get(URL, body=refused())
    responses.get(URL, body=refused())
    responses.get(URL, json=page([api_item(1)], current_page=2, last_page=2))
    client = api()
    second = client.fetch({}, cursor=client.fetch({}).next_cursor)
    assert [i["uuid"] for i in second.items] == ["response-0000001"]
    assert len(client.sleeps) == 2 and len(responses.calls) == 4


@pytest.mark.parametrize("dry_run", [False, True])
def test_e2e_an_api_url_that_refuses_the_connection_fails_at_once_naming_it(store_url, dry_run):
    import time

    from tests.run.test_cli import run
    from tests.service import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    env = {"DATABASE_URL": store_url, "REFINER_API_URL": url, "REFINER_API_KEY": "refiner-key"}
    started = time.monotonic()
    result = run(["backfill", *(["--dry-run"] if dry_run else [])], env, timeout=60)
    assert time.monotonic() - started < 20, "the refused connection was retried"
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"Refiner's API at {url} refused the connection: check REFINER_API_URL" in result.stderr
    assert "retry" not in result.stderr
    if dry_run:
        assert "progress is saved" not in result.stderr and "resume" not in result.stderr
    else:
        assert "progress is saved: run the same command again to resume" in result.stderr
