"""Backfill from Refiner's REST API, and replay."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
import responses

from refiner_source.config import normalize_database_url
from refiner_source.directions.mapping_file import MappingRules
from refiner_source.refiner_rest import RefinerClient
from refiner_source.store import SEGMENT, Store
from refiner_source.to_segment.backfill import BackfillError, filters, run_backfill
from refiner_source.to_segment.events import ApiResponseSchema, WebhookSchema, event_from_json, event_to_json
from refiner_source.to_segment.intake import map_api_page, prepare
from refiner_source.to_segment.mapping import map_event
from tests.conftest import load_fixture
from tests.refiner_stub import RefinerStub, api_item

API = "https://refiner.test/v1"
URL = API + "/responses"
RULES = MappingRules()
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def api(**kwargs) -> RefinerClient:
    sleeps: list[float] = []
    client = RefinerClient(API, "key-123", sleep=sleeps.append, **kwargs)
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def mapped(entry) -> list[dict]:
    """The messages the delivery worker will make of a stored entry."""
    return map_event(event_from_json(entry.event), RULES, NOW)


def page(items, **pagination) -> dict:
    return {"items": items, "pagination": {"current_page": 1, "last_page": 1, "page_length": 100, **pagination}}


# --- the API client ------------------------------------------------------------------------


@responses.activate
def test_pages_follow_next_page_cursor_as_page_cursor():
    responses.get(URL, json=page([api_item(0)], next_page_cursor="CUR2", last_page=2))
    responses.get(URL, json=page([api_item(1)], current_page=2, last_page=2, next_page_cursor=None))
    client = api()
    first = client.fetch({"form_uuid": "f"})
    second = client.fetch({"form_uuid": "f"}, cursor=first.next_cursor)
    assert first.next_cursor == "CUR2" and second.next_cursor is None and second.next_page is None
    assert responses.calls[1].request.params["page_cursor"] == "CUR2"
    assert responses.calls[0].request.headers["Authorization"] == "Bearer key-123"
    assert responses.calls[0].request.params["form_uuid"] == "f"


@responses.activate
def test_backfill_asks_for_attributes_completed_responses_and_large_pages():
    # with_attributes=1: the contact's attributes, which split answers between user and account as a
    # webhook's do; include=completed: only what the backfill sends crosses the network.
    responses.get(URL, json=page([api_item(0)]))
    api().fetch({})
    params = responses.calls[0].request.params
    assert params["with_attributes"] == "1" and params["include"] == "completed" and params["page_length"] == "500"


@responses.activate
def test_pages_without_cursor_count_page_up_to_last_page():
    responses.get(URL, json=page([api_item(0)], current_page=1, last_page=3))
    first = api().fetch({})
    assert first.next_cursor is None and first.next_page == 2
    responses.replace(responses.GET, URL, json=page([api_item(9)], current_page=3, last_page=3))
    last = api().fetch({}, page=3)
    assert last.next_page is None
    assert responses.calls[1].request.params["page"] == "3"


@responses.activate
def test_429_with_retry_after_is_retried_after_the_wait():
    responses.get(URL, status=429, headers={"Retry-After": "7"}, json={"message": "slow down"})
    responses.get(URL, json=page([api_item(0)]))
    client = api()
    assert len(client.fetch({}).items) == 1
    assert client.sleeps == [7]


@responses.activate
@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retried_with_backoff(status):
    responses.get(URL, status=status)
    responses.get(URL, status=status)
    responses.get(URL, json=page([]))
    client = api()
    assert client.fetch({}).items == []
    assert len(client.sleeps) == 2 and all(0 < s <= 60 for s in client.sleeps)


@responses.activate
@pytest.mark.parametrize("status", [408, 423, 429])
def test_408_423_and_429_are_retried(status):
    responses.get(URL, status=status)
    responses.get(URL, json=page([]))
    client = api()
    assert client.fetch({}).items == []
    assert len(client.sleeps) == 1


@responses.activate
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_stops_naming_refiner_api_url_and_where_it_leads(status):
    responses.get(URL, status=status, headers={"Location": "https://elsewhere.test/v1/responses"})
    elsewhere = responses.get("https://elsewhere.test/v1/responses", json=page([]))
    with pytest.raises(BackfillError, match=r"REFINER_API_URL") as info:
        api().fetch({})
    assert "https://elsewhere.test/v1/responses" in str(info.value)
    assert elsewhere.call_count == 0 and len(responses.calls) == 1


@responses.activate
def test_404_stops_naming_refiner_api_url():
    responses.get(URL, status=404, body="Not Found")
    with pytest.raises(BackfillError, match=r"HTTP 404 .*check REFINER_API_URL"):
        api().fetch({})
    assert len(responses.calls) == 1


@responses.activate
def test_401_stops_with_a_clear_line_about_the_key():
    responses.get(URL, status=401, json={"message": "Unauthenticated."})
    with pytest.raises(BackfillError, match="REFINER_API_KEY"):
        api().fetch({})
    assert len(responses.calls) == 1


@responses.activate
def test_api_that_never_recovers_gives_up_with_a_clear_line():
    responses.get(URL, status=503)
    with pytest.raises(BackfillError, match="did not answer after 3 attempts"):
        api(max_attempts=3).fetch({})


@responses.activate
def test_answer_that_is_not_a_page_is_a_clear_error():
    responses.get(URL, body="<html>maintenance</html>")
    with pytest.raises(BackfillError, match="not a page of responses"):
        api().fetch({})


def test_filters_are_the_command_options_in_refiners_format():
    assert filters(datetime(2026, 1, 1), datetime(2026, 2, 1, 12, 30), "form-9") == {
        "date_range_start": "2026-01-01",
        "date_range_end": "2026-02-01 12:30:00",
        "form_uuid": "form-9",
    }
    assert filters(None, None, None) == {}


# --- the mapping is the webhook's ----------------------------------------------------------


def test_api_item_maps_to_the_same_trait_names_and_message_ids_as_the_webhook():
    item = load_fixture("api_responses_page.json")["items"][0]
    webhook = load_fixture("webhook_completed_survey.json")
    from_api = prepare(ApiResponseSchema().load(item), RULES)
    from_webhook = prepare(WebhookSchema().load(webhook), RULES)
    assert from_api.receipt_key == from_webhook.receipt_key
    api_msgs = {m["type"]: m for m in mapped(from_api)}
    hook_msgs = {m["type"]: m for m in mapped(from_webhook)}
    assert {t: m["messageId"] for t, m in api_msgs.items()} == {t: m["messageId"] for t, m in hook_msgs.items()}
    assert api_msgs["track"]["timestamp"] == hook_msgs["track"]["timestamp"]  # API times are UTC
    for name in api_msgs["track"]["properties"]:
        assert name in hook_msgs["track"]["properties"]
    assert api_msgs["identify"]["userId"] == "user-8812" and api_msgs["group"]["groupId"] == "acct-initech"


@pytest.mark.parametrize(
    "kwargs, calls", [({}, ["identify", "group", "track"]), ({"account": False}, ["identify", "track"]), ({"remote_id": False}, None)]
)
def test_items_with_and_without_account_or_remote_id(kwargs, calls):
    messages = mapped(prepare(ApiResponseSchema().load(api_item(1, **kwargs)), RULES))
    if calls:
        assert [m["type"] for m in messages] == calls and messages[0]["userId"] == "user-1"
    else:
        assert all(m["anonymousId"] == "contact-1" and m.get("userId") is None for m in messages)


def test_stored_event_round_trips_for_replay(webhook_body):
    event = WebhookSchema().load(webhook_body)
    assert event_from_json(event_to_json(event)) == event


# --- runs ----------------------------------------------------------------------------------


@pytest.fixture
def refiner():
    with RefinerStub(total=230) as stub:
        yield stub


def test_backfill_stores_every_completed_response_once(outbox, refiner):
    progress = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {})
    assert (progress.pages, progress.seen, progress.stored, progress.duplicates) == (3, 230, 230, 0)
    assert outbox.stats(SEGMENT).pending == 230


def test_backfill_by_page_numbers_when_there_is_no_cursor(outbox):
    with RefinerStub(total=120, cursor=False) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=100), outbox, RULES, {})
        assert [r["query"].get("page") for r in stub.requests] == [None, "2"]
    assert progress.stored == 120


def test_second_run_sends_nothing_new(outbox, refiner):
    run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {})
    again = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {})
    assert (again.seen, again.stored, again.duplicates) == (230, 0, 230)
    assert outbox.stats(SEGMENT).pending == 230


def test_response_already_received_by_webhook_is_not_sent_again(outbox):
    webhook = prepare(WebhookSchema().load(load_fixture("webhook_completed_survey.json")), RULES)
    outbox.store_many([webhook])
    item = load_fixture("api_responses_page.json")["items"][0]
    with RefinerStub(total=1, make=lambda i: item) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=100), outbox, RULES, {})
    assert (progress.stored, progress.duplicates) == (0, 1)
    assert outbox.stats(SEGMENT).pending == 1


def test_interrupted_run_resumes_where_it_stopped(outbox, refiner):
    pages_done = []
    first = run_backfill(
        RefinerClient(refiner.url, "refiner-key", page_length=100),
        outbox,
        RULES,
        {},
        report=lambda p: pages_done.append(p.pages),
        should_stop=lambda: len(pages_done) >= 2,
    )
    assert first.pages == 2 and first.stored == 200
    asked = len(refiner.requests)
    resumed = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {})
    assert resumed.resumed and resumed.pages == 3 and resumed.stored == 230
    assert len(refiner.requests) == asked + 1  # only the third page was asked for again
    assert "page_cursor" in refiner.requests[-1]["query"]
    assert outbox.stats(SEGMENT).pending == 230


def test_runs_with_other_filters_keep_their_own_progress(outbox, refiner):
    run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {"form_uuid": "a"}, should_stop=lambda: False)
    other = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {"form_uuid": "b"})
    assert not other.resumed and other.pages == 3


def test_dry_run_stores_nothing_and_shows_the_first_messages(outbox, refiner):
    progress = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {}, dry_run=True)
    assert progress.stored == 230 and len(progress.sample) == 3
    assert [m["type"] for m in progress.sample] == ["identify", "group", "track"]
    assert outbox.stats(SEGMENT).pending == 0
    assert not run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {}, dry_run=True).resumed


def test_not_completed_and_invalid_items_are_skipped_and_counted(outbox):
    def make(i):
        if i == 0:
            return api_item(0, completed=False)
        if i == 1:
            return {"uuid": "broken", "completed_at": "2026-11-18 16:42:57", "contact": "nobody"}
        return api_item(i)

    with RefinerStub(total=5, make=make) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=100), outbox, RULES, {})
    # include=completed: the API leaves the response without completed_at out...
    assert (progress.seen, progress.stored, progress.not_completed, progress.invalid) == (4, 3, 0, 1)
    # ...and one that comes all the same is skipped and counted.
    mapped = map_api_page([api_item(0, completed=False), api_item(1)], RULES)
    assert mapped.not_completed == 1 and [e.source_id for e in mapped.entries] == ["response-0000001"]


def test_empty_result_finishes_at_once(outbox):
    with RefinerStub(total=0) as stub:
        progress = run_backfill(RefinerClient(stub.url, "refiner-key", page_length=100), outbox, RULES, {})
    assert (progress.pages, progress.seen) == (1, 0)


def test_replay_response_resends_it_remapped_with_its_original_message_ids(store_url, outbox, webhook_body, tmp_path):
    from tests.run.test_cli import run

    outbox.store_many([prepare(WebhookSchema().load(webhook_body), RULES)])
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[traits]\n"what_is_your_job_role" = "job_role"\n')
    env = {"DATABASE_URL": store_url, "REFINER_MAPPING_FILE": str(mapping)}
    deliver_all(outbox)
    result = run(["replay", "--response", webhook_body["response"]["uuid"]], env)
    assert result.returncode == 0, result.stderr
    assert "1 response(s) queued again, to be mapped with the current mapping file, with their original messageIds" in result.stdout
    (claimed,) = outbox.claim(SEGMENT, 10, 60, "t")
    assert claimed.generation is None
    ids = [m["messageId"] for m in map_event(event_from_json(claimed.event), RULES, NOW)]
    assert ids == [m["messageId"] for m in mapped(prepare(WebhookSchema().load(webhook_body), RULES))]
    outbox.settle("t", delivered=[claimed.id], destination=SEGMENT)

    fresh = run(["replay", "--form", webhook_body["form"]["uuid"], "--new-ids"], env)
    assert fresh.returncode == 0 and "with new messageIds" in fresh.stdout
    (again,) = outbox.claim(SEGMENT, 10, 60, "t")
    new_ids = [m["messageId"] for m in map_event(event_from_json(again.event), RULES, NOW, again.generation)]
    assert len(new_ids) == 3 and not set(new_ids) & set(ids)
    assert all(len(i) <= 100 for i in new_ids)


def deliver_all(outbox) -> None:
    while claimed := outbox.claim(SEGMENT, 500, 60, "t"):
        outbox.settle("t", delivered=[c.id for c in claimed], destination=SEGMENT)


def test_replay_by_time_range_and_events_past_retention(store_url, outbox, webhook_body):
    from tests.run.test_cli import run

    outbox.store_many([prepare(WebhookSchema().load(webhook_body), RULES)])
    env = {"DATABASE_URL": store_url}
    none = run(["replay", "--since", "2026-11-19"], env)
    assert none.returncode == 1 and "nothing matched --since 2026-11-19 00:00:00" in none.stderr
    assert "1 response(s)" in run(["replay", "--since", "2026-11-18", "--until", "2026-11-19"], env).stdout
    deliver_all(outbox)
    outbox.purge(delivered_before=9e12, receipts_before=0)  # the answers are forgotten, the receipt kept
    result = run(["replay", "--response", webhook_body["response"]["uuid"]], env)
    assert "0 response(s) queued" in result.stdout and "older than REFINER_RETENTION_DAYS" in result.stdout


def test_replay_new_ids_alone_is_a_usage_error(store_url, outbox):
    from tests.run.test_cli import run

    result = run(["replay", "--new-ids"], {"DATABASE_URL": store_url})
    assert result.returncode == 2 and "--new-ids goes with" in result.stderr


def test_event_json_holds_the_answers_so_purge_forgets_it(outbox, webhook_body, monkeypatch):
    import time

    from sqlalchemy import select

    from refiner_source.store import events

    def stored_row() -> dict:
        with outbox.engine.connect() as conn:
            return dict(conn.execute(select(events)).one()._mapping)

    outbox.store_many([prepare(WebhookSchema().load(webhook_body), RULES)])
    ((claimed),) = outbox.claim(SEGMENT, 10, 60, "t")
    assert "Product Manager" in json.loads(claimed.event)["data"].values()
    outbox.settle("t", delivered=[claimed.id], destination=SEGMENT)
    assert "Product Manager" in json.dumps(stored_row())  # delivered, but still within retention

    day, now = 86400, time.time()
    monkeypatch.setattr(time, "time", lambda: now + 8 * day)  # past the 7 days of REFINER_RETENTION_DAYS
    assert outbox.purge(delivered_before=time.time() - 7 * day, receipts_before=time.time() - 90 * day) == (1, 0)
    row = stored_row()  # the receipt is kept (a resend stays a duplicate)...
    assert row["id"] == claimed.id and row["event"] is None and row["messages"] is None
    assert "Product Manager" not in json.dumps(row)  # ...and no column holds an answer any more
    assert outbox.store_many([prepare(WebhookSchema().load(webhook_body), RULES)]) == 0


# --- end to end: the command, a stand-in for Refiner's API and one for Segment ----------------


def requested_page(query: dict[str, str]) -> int:
    """The page a request to the Refiner stand-in asked for: by its cursor, by number, or the first."""
    if "page_cursor" in query:
        return json.loads(base64.urlsafe_b64decode(query["page_cursor"]))["page"]
    return int(query.get("page", 1))


def test_e2e_backfill_command_interrupted_resumed_delivered_once_and_idempotent(store_url, tmp_path):
    import os
    import signal
    import subprocess
    import time
    from collections import Counter

    from tests.segment_stub import SegmentStub
    from tests.service import Service, command

    with RefinerStub(total=2250, delay=0.3) as refiner, SegmentStub() as segment:  # 5 pages of 500
        env = {
            "DATABASE_URL": store_url,
            "REFINER_API_URL": refiner.url,
            "REFINER_API_KEY": "refiner-key",
            "SEGMENT_HOST": segment.url,
            "SEGMENT_WRITE_KEY": "wk",
            "REFINER_WEBHOOK_SECRET": "webhook-secret-0123456789",  # Refiner -> Segment is on with its pair
        }
        full_env = {**os.environ, **env}
        first = subprocess.Popen(
            [*command(), "backfill"], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while len(refiner.requests) < 2:
            assert time.monotonic() < deadline and first.poll() is None, f"the backfill did not ask for a second page: {first.returncode}"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, mapping processes included
        out, err = first.communicate(timeout=30)
        assert first.returncode == 130, err
        assert "run the same command again to resume" in err and "Traceback" not in err
        assert "page 1/5" in err  # not a terminal: a line per page
        box = Store(normalize_database_url(store_url))
        saved = box.backfill_state(json.dumps({}))
        box.dispose()
        assert saved is not None and not saved.done and 1 <= saved.pages < 5, saved  # stopped with pages stored and pages to go
        asked_before = len(refiner.requests)

        second = subprocess.run([*command(), "backfill"], env=full_env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "2250 response(s) read in 5 page(s)" in second.stdout
        # Resumed: it asked for the remaining pages, each once, and for none of those already stored.
        assert [requested_page(r["query"]) for r in refiner.requests[asked_before:]] == list(range(saved.pages + 1, 6))

        worker = Service(["worker"], env, tmp_path / "worker.log").start()
        try:
            received = segment.wait_for(lambda r: len(r) >= 2250 * 3, timeout=60)
            time.sleep(0.5)
            counts = Counter(m["messageId"] for m in segment.received())
            assert len(counts) == 2250 * 3 and set(counts.values()) == {1}
            assert {m["type"] for m in received} == {"identify", "group", "track"}

            third = subprocess.run([*command(), "backfill"], env=full_env, capture_output=True, text=True, timeout=60)
            assert third.returncode == 0 and "0 stored for delivery, 2250 already sent" in third.stdout
            time.sleep(1.0)
            assert len(segment.received()) == 2250 * 3
        finally:
            assert worker.stop() == 0


def test_e2e_backfill_without_api_key_or_with_a_wrong_one_says_so(store_url):
    from tests.run.test_cli import run

    missing = run(["backfill"], {"DATABASE_URL": store_url})
    assert missing.returncode == 1 and "REFINER_API_KEY is not set" in missing.stderr
    with RefinerStub(total=3) as refiner:
        wrong = run(["backfill"], {"DATABASE_URL": store_url, "REFINER_API_URL": refiner.url, "REFINER_API_KEY": "nope"})
    assert wrong.returncode == 1 and "Refiner refused REFINER_API_KEY (HTTP 401)" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_e2e_backfill_dry_run_prints_counts_and_messages(store_url):
    from tests.run.test_cli import run

    with RefinerStub(total=12) as refiner:
        env = {"DATABASE_URL": store_url, "REFINER_API_URL": refiner.url, "REFINER_API_KEY": "refiner-key"}
        result = run(["backfill", "--dry-run", "--since", "2026-01-01", "--form", "form-1"], env)
    assert result.returncode == 0, result.stderr
    assert "12 response(s) read in 1 page(s): 12 would be new" in result.stdout
    assert '"type": "identify"' in result.stdout
    assert refiner.requests[0]["query"]["date_range_start"] == "2026-01-01" and refiner.requests[0]["query"]["form_uuid"] == "form-1"
    assert Store(store_url).stats(SEGMENT).pending == 0


def test_api_failure_mid_run_stores_the_pages_already_fetched_then_fails(outbox):
    with RefinerStub(total=500) as refiner:
        real_page = refiner.page

        def failing(query):
            if query.get("page_cursor") and json.loads(__import__("base64").urlsafe_b64decode(query["page_cursor"]))["page"] == 3:
                raise RuntimeError
            return real_page(query)

        api = RefinerClient(refiner.url, "refiner-key", page_length=100, max_attempts=1)
        refiner.page = failing  # page 3 answers 500 (the stub turns the exception into a dropped request)
        with pytest.raises(BackfillError):
            run_backfill(api, outbox, RULES, {}, workers=2)
        state = outbox.backfill_state(json.dumps({}, sort_keys=True))
        assert state is not None and state.pages == 2 and not state.done
        assert outbox.stats(SEGMENT).pending == 200
        refiner.page = real_page
        resumed = run_backfill(RefinerClient(refiner.url, "refiner-key", page_length=100), outbox, RULES, {}, workers=2)
    assert resumed.resumed and resumed.stored == 500 and outbox.stats(SEGMENT).pending == 500


def test_mapping_processes_import_neither_the_web_app_nor_the_database():
    """What keeps a backfill's memory flat: its spawned mapping processes import intake only."""
    import subprocess
    import sys

    code = (
        "import sys, refiner_source.to_segment.intake, refiner_source.run.cli\n"
        "heavy = {m for m in ('flask', 'sqlalchemy', 'refiner_source.to_segment.backfill', 'refiner_source.store') if m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # ...and everything the pool sends them (the function, the initializer) lives in that module.
    from refiner_source.to_segment import backfill

    assert backfill.map_api_page.__module__ == backfill.ignore_stop_signals.__module__ == "refiner_source.to_segment.intake"


def test_replay_reads_and_queues_more_than_one_page_of_responses(outbox):
    entries = [prepare(ApiResponseSchema().load(api_item(i)), RULES) for i in range(1203)]
    outbox.store_many(entries)
    deliver_all(outbox)
    assert outbox.requeue(form_uuid="form-1", destination=SEGMENT).queued == 1203  # all of them, in chunks of 500
    assert outbox.stats(SEGMENT).pending == 1203


@pytest.mark.parametrize("dry_run", [False, True])
def test_e2e_ctrl_c_while_the_api_is_down_stops_at_once_and_each_retry_is_a_line(store_url, dry_run):
    import os
    import signal
    import subprocess
    import time

    from tests.service import command

    with RefinerStub(total=10) as refiner:
        refiner.script.extend([(503, {"Retry-After": "60"})] * 10)  # down, and asking for a minute between tries
        env = {**os.environ, "DATABASE_URL": store_url, "REFINER_API_URL": refiner.url, "REFINER_API_KEY": "refiner-key"}
        run = subprocess.Popen(
            [*command(), "backfill", "--workers", "0", *(["--dry-run"] if dry_run else [])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not refiner.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # now in the 60 s wait before the second try
        stopped_at = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 5, "the wait between retries did not wake on Ctrl-C"
    assert run.returncode == 130 and "Traceback" not in err
    assert "Refiner's API: HTTP 503; retry 1 of 9 in 60.0 s" in err.splitlines()
    assert len(refiner.requests) == 1
    if dry_run:
        assert "progress is saved" not in err and "resume" not in err
    else:
        assert "progress is saved" in err and "run the same command again to resume" in err
