"""Erasing a person (refiner-source forget) and the suppression list, on both stores: what is
erased and what is not, no dead row versions left on PostgreSQL, the list holding hashes only, the
key, the webhooks, and the worker."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from refiner_source import create_app
from refiner_source.config import Settings, key_of
from refiner_source.delivery.destination import Call
from refiner_source.delivery.loop import Loop
from refiner_source.erasure import erase, like_patterns, suppression_status
from refiner_source.privacy import Suppressed, digest, fingerprint, pairs
from refiner_source.run.cli import main
from refiner_source.store import PENDING, PURGED, REFINER, SEGMENT, DeadLetter, Store, dead_letters, events, last_errors, suppressed
from refiner_source.store.suppression import ERASED_ERROR
from refiner_source.to_refiner.events import load as load_segment_event
from refiner_source.to_refiner.intake import prepare as prepare_segment_event
from tests.conftest import SECRET, dead_row_versions, entry_for, survey_body

SHARED = "segment-shared-secret-0123456789"


def segment_event(message_id: str, user: str | None = None, email: str | None = None, anonymous: str | None = None, kind="identify"):
    event: dict = {"type": kind, "messageId": message_id}
    if kind == "track":
        event["event"] = "Signed Up"
    if user:
        event["userId"] = user
    if anonymous:
        event["anonymousId"] = anonymous
    if email:
        event["context"] = {"traits": {"email": email}}
    return prepare_segment_event(load_segment_event(event))


@pytest.fixture
def both(settings):
    return replace(settings, segment_shared_secret=SHARED, refiner_api_key="refiner-key")


def fill(outbox: Store) -> None:
    """user-1's events in every state, both directions, and other people's."""
    outbox.store_many([entry_for(1, "Saw Survey"), entry_for(1), entry_for(11), entry_for(2)])
    claimed = outbox.claim(SEGMENT, 10, 60, "w")
    # r1's Saw Survey delivered, r1's Completed Survey dead, r11 and r2 left waiting
    first, second = [c for c in claimed if c.source_id == "r1"]
    outbox.settle("w", delivered=[first.id], dead=[DeadLetter(second.id, "m", "track", "HTTP 400 no")], destination=SEGMENT)
    outbox.settle("w", released=[c.id for c in claimed if c.source_id != "r1"], destination=SEGMENT)
    outbox.store_many(
        [
            segment_event("m-user", user="user-1"),
            segment_event("m-mail", email="  Ada.Lovelace@Example.COM ", kind="track"),
            segment_event("m-anon", anonymous="anon-1", email="someone@example.com"),
            segment_event("m-other", user="user-2", email="b@example.com"),
        ]
    )


def rows(outbox: Store) -> dict[tuple[str, str], dict]:
    with outbox.engine.connect() as conn:
        found = conn.execute(select(events)).all()
    return {(r.destination, r.source_id + ("" if r.destination == REFINER else "|" + r.triggered_event)): dict(r._mapping) for r in found}


def test_forget_erases_the_person_in_every_state_and_both_directions_and_no_one_else(outbox, both):
    fill(outbox)
    person = frozenset(pairs(user="user-1", email="ada.lovelace@example.com"))
    erased = erase(outbox, both, person)
    assert (erased[SEGMENT].events, erased[SEGMENT].dead_letters, erased[SEGMENT].waiting) == (2, 1, 0)
    assert (erased[REFINER].events, erased[REFINER].dead_letters, erased[REFINER].waiting) == (2, 0, 2)
    after = rows(outbox)
    gone = [
        after[(SEGMENT, "r1|Saw Survey")],
        after[(SEGMENT, "r1|Completed Survey")],
        after[(REFINER, "m-user")],
        after[(REFINER, "m-mail")],
    ]
    for row in gone:  # a bare receipt: nothing personal, never sent
        assert row["status"] == PURGED and row["event"] is None and row["contact"] is None and row["last_error"] is None
    kept = [after[(SEGMENT, "r11|Completed Survey")], after[(SEGMENT, "r2|Completed Survey")], after[(REFINER, "m-anon")]]
    assert all(r["status"] == PENDING and r["event"] for r in kept + [after[(REFINER, "m-other")]])
    with outbox.engine.connect() as conn:
        assert conn.execute(select(dead_letters)).all() == []
    assert outbox.stats(SEGMENT).dead == 0 and outbox.stats(SEGMENT).pending == 2


def test_a_forget_on_postgresql_leaves_no_dead_row_versions_in_the_tables_it_wrote(pg_database_url):
    both = Settings(webhook_secrets=(SECRET,), database_url=pg_database_url, segment_shared_secret=SHARED, refiner_api_key="refiner-key")
    box = Store(pg_database_url)
    box.init_schema()
    try:
        fill(box)
        with box._write() as conn:
            box._record_error(conn, REFINER, 'HTTP 400 {"message": "invalid email ada.lovelace@example.com"}', time.time())
        with box.engine.connect() as conn:
            assert dead_row_versions(conn, events.name) > 0  # the claims and settles of fill() left some already
        erase(box, both, frozenset(pairs(user="user-1", email="ada.lovelace@example.com")))
        with box.engine.connect() as conn:
            dead = {t.name: dead_row_versions(conn, t.name) for t in (events, dead_letters, last_errors)}
            assert dead == dict.fromkeys(dead, 0)
            quoted = select(last_errors.c.error).where(last_errors.c.destination == REFINER)
            assert conn.execute(quoted).scalar() == ERASED_ERROR  # the erase did write there
    finally:
        box.dispose()


def test_forget_matches_an_email_in_any_case_and_trimmed_and_ids_exactly(outbox, both):
    fill(outbox)
    assert erase(outbox, both, frozenset(pairs(email=" ADA.lovelace@example.com")), dry_run=True)[REFINER].events == 1
    assert erase(outbox, both, frozenset(pairs(user="user")), dry_run=True)[SEGMENT].events == 0  # not a prefix match
    assert erase(outbox, both, frozenset(pairs(user="USER-1")), dry_run=True)[REFINER].events == 0  # ids are exact
    assert erase(outbox, both, frozenset(pairs(anonymous="anon-1")), dry_run=True)[REFINER].events == 1


def test_forget_matches_a_refiner_contact_uuid_as_the_anonymous_id(outbox, both):
    body = survey_body(5)
    outbox.store_many([entry_for(5)])
    assert erase(outbox, both, frozenset(pairs(anonymous=body["uuid"])), dry_run=True)[SEGMENT].events == 1


def test_a_dry_run_counts_and_erases_nothing_and_suppresses_no_one(outbox, both):
    fill(outbox)
    before = rows(outbox)
    counted = erase(outbox, both, frozenset(pairs(user="user-1")), dry_run=True)
    assert counted[SEGMENT].events == 2 and counted[REFINER].events == 1
    assert rows(outbox) == before and suppression_status(outbox, both) == (0, 0)


def test_a_delivered_event_past_retention_loses_its_contact_too(outbox, both):
    outbox.store_many([segment_event("m-old", user="user-1")])
    (claim,) = outbox.claim(REFINER, 1, 60, "w")
    outbox.settle("w", delivered=[claim.id], destination=SEGMENT)
    outbox.purge(time.time() + 1, 0)  # retention: the event's content is gone, the receipt and contact stay
    assert rows(outbox)[(REFINER, "m-old")]["contact"] == "id:user-1"
    assert erase(outbox, both, frozenset(pairs(user="user-1")))[REFINER].events == 1
    assert rows(outbox)[(REFINER, "m-old")]["contact"] is None


def test_the_suppression_list_holds_no_plain_identifier(outbox, both):
    fill(outbox)
    erase(outbox, both, frozenset(pairs(user="user-1", email="Ada.Lovelace@example.com", anonymous="anon-1")))
    with outbox.engine.connect() as conn:
        table = conn.execute(select(suppressed)).all()
        dumped = json.dumps([list(map(str, r)) for r in table]).lower()
    assert len(table) == 3
    for plain in ("user-1", "ada.lovelace", "example.com", "anon-1", SECRET.lower()):
        assert plain not in dumped
    key = key_of(both)
    assert {(r.kind, r.hash) for r in table} == {
        ("user", digest(key, "user", "user-1")),
        ("email", digest(key, "email", "ada.lovelace@example.com")),
        ("anonymous", digest(key, "anonymous", "anon-1")),
    }
    assert {r.key_id for r in table} == {fingerprint(key)}


def test_the_suppression_key_is_the_variable_else_the_first_secret_in_a_fixed_order():
    first = Settings(webhook_secrets=("a" * 16, "b" * 16), segment_shared_secret="c" * 16, refiner_api_key="d")
    assert key_of(first) == key_of(Settings(webhook_secrets=("a" * 16,)))  # the first token; appending keeps it
    assert key_of(first) != key_of(Settings(webhook_secrets=("b" * 16, "a" * 16)))
    assert key_of(Settings(segment_shared_secret="c" * 16, refiner_api_key="d")) == key_of(Settings(segment_shared_secret="c" * 16))
    assert key_of(Settings(refiner_api_key="d")) is not None and key_of(Settings()) is None
    assert key_of(replace(first, suppression_key="a" * 16)) == key_of(first)  # the old secret as the key keeps the list
    assert key_of(replace(first, suppression_key="k" * 16)) != key_of(first)
    assert key_of(first) not in (b"a" * 16,)  # derived, not a token the webhook accepts


def test_refiner_suppression_key_keeps_the_list_when_the_webhook_secret_rotates():
    from refiner_source.config import load_settings

    env = {"SEGMENT_WRITE_KEY": "wk", "REFINER_SUPPRESSION_KEY": "k" * 32}
    before = key_of(load_settings({**env, "REFINER_WEBHOOK_SECRET": "old-secret-0123456789"}))
    after = key_of(load_settings({**env, "REFINER_WEBHOOK_SECRET": "new-secret-0123456789"}))
    assert before == after
    assert before != key_of(load_settings({"SEGMENT_WRITE_KEY": "wk", "REFINER_WEBHOOK_SECRET": "old-secret-0123456789"}))


class _List:
    """The two reads `Suppressed` makes of a store, answered from memory: whether the list changed
    (its version) and, when it has, its hashes and how many people were hashed with another key."""

    def __init__(self, hashes: set[tuple[str, str]], stale: int) -> None:
        self.hashes, self.stale, self.version, self.reads = hashes, stale, 1, 0

    def suppression_version(self):
        return (self.version, 0.0)

    def suppressed_hashes(self, key_id):
        self.reads += 1
        return set(self.hashes), self.stale


def _stale_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "key no longer set" in r.getMessage()]


def test_people_hashed_with_an_old_key_are_warned_of_once_per_process_not_on_every_read(caplog):
    key = b"k" * 32
    store = _List({("user", digest(key, "user", "user-1"))}, stale=2)
    view = Suppressed(store, key, refresh=0)
    with caplog.at_level("WARNING"):
        assert view.forgotten(pairs(user="user-1")) and not view.forgotten(pairs(user="user-2"))
        store.version += 1  # the list changed: read again, the stale people still there
        assert view.active()
    assert store.reads == 2
    assert [r.stale_suppressions for r in caplog.records if "key no longer set" in r.getMessage()] == [2]  # a field of the JSON log
    assert _stale_warnings(caplog) == [
        "2 suppressed people were hashed with a key no longer set: they are no longer suppressed; "
        "set the old secret as REFINER_SUPPRESSION_KEY or forget them again"
    ]


def test_a_refresh_of_0_reads_the_list_again_at_every_question_however_fast(monkeypatch):
    import refiner_source.privacy

    monkeypatch.setattr(refiner_source.privacy.time, "monotonic", lambda: 100.0)  # no time passes between two questions
    key = b"k" * 32
    store = _List(set(), stale=0)
    view = Suppressed(store, key, refresh=0)  # as the delivery loops ask, before each claim is sent
    assert not view.forgotten(pairs(user="user-1"))
    store.hashes, store.version = {("user", digest(key, "user", "user-1"))}, 2
    assert view.forgotten(pairs(user="user-1"))


def test_no_stale_key_warning_when_every_person_is_hashed_with_the_current_key(caplog):
    key = b"k" * 32
    with caplog.at_level("WARNING"):
        assert Suppressed(_List({("user", digest(key, "user", "user-1"))}, stale=0), key, refresh=0).active()
    assert _stale_warnings(caplog) == []


def test_without_a_key_nobody_is_suppressed_whatever_the_store_holds():
    view = Suppressed(_List({("user", "some-hash")}, stale=0), None, refresh=0)
    assert not view.active() and not view.forgotten(pairs(user="user-1"))


def test_an_identifier_with_a_lone_surrogate_is_hashed_not_refused():
    key = b"k" * 32  # a command-line argument of bytes that are not UTF-8 reaches forget as lone surrogates
    assert digest(key, "user", "a\udcff") != digest(key, "user", "a\udcfe") != digest(key, "user", "a")


def test_an_identifier_that_is_a_whole_number_is_compared_as_its_digits():
    from refiner_source.privacy import normal

    assert normal("user", 42.0) == normal("user", 42) == normal("user", " 42 ") == "42"
    assert normal("user", 4.5) == "4.5" and normal("user", True) is None


def test_unsuppress_takes_the_person_off_the_list_and_erases_nothing(outbox, both):
    erase(outbox, both, frozenset(pairs(user="user-1", email="a@example.com")))
    assert suppression_status(outbox, both) == (1, 0)
    outbox.store_many([segment_event("m-new", user="user-1")])
    assert (
        outbox.unsuppress({("user", digest(key_of(both), "user", "user-1")), ("email", digest(key_of(both), "email", "a@example.com"))})
        == 2
    )
    assert suppression_status(outbox, both) == (0, 0) and outbox.stats(REFINER).pending == 1


def test_people_hashed_with_a_key_no_longer_set_are_reported_as_no_longer_suppressed(store_url, outbox, both):
    erase(outbox, both, frozenset(pairs(user="user-1")))
    rotated = replace(both, webhook_secrets=("another-secret-0123456789",))
    assert suppression_status(outbox, rotated) == (0, 1)
    assert not Suppressed(outbox, key_of(rotated)).forgotten(pairs(user="user-1"))
    env = {"DATABASE_URL": store_url, "REFINER_WEBHOOK_SECRET": "another-secret-0123456789", "SEGMENT_WRITE_KEY": "k"}
    printed = CliRunner().invoke(main, ["status"], env=env)
    assert "1 suppressed people were hashed with a key no longer set: they are no longer suppressed" in printed.output
    assert json.loads(CliRunner().invoke(main, ["status", "--json"], env=env).output)["suppressed"] == {"people": 0, "other_key": 1}


def test_a_resent_webhook_after_forget_without_suppression_is_still_a_duplicate(outbox, both):
    outbox.store_many([entry_for(1)])
    erase(outbox, both, frozenset(pairs(user="user-1")), suppress=False)
    assert suppression_status(outbox, both) == (0, 0)
    assert outbox.store_many([entry_for(1)]) == 0  # the receipt stays


def test_a_worker_settling_a_claim_erased_meanwhile_changes_nothing(outbox, both):
    outbox.store_many([entry_for(1), entry_for(2)])
    one, two = outbox.claim(SEGMENT, 2, 60, "w")
    erase(outbox, both, frozenset(pairs(user="user-1")))
    outbox.settle("w", delivered=[one.id, two.id], dead=[DeadLetter(one.id, "m", "track", "late")], destination=SEGMENT)
    after = rows(outbox)
    assert after[(SEGMENT, "r1|Completed Survey")]["status"] == PURGED and after[(SEGMENT, "r2|Completed Survey")]["status"] == "delivered"
    with outbox.engine.connect() as conn:
        assert conn.execute(select(dead_letters)).all() == []


class _Recording:
    """A destination that records what it is asked to send."""

    name, title, id_name, key_hint, contact_order, concurrency = SEGMENT, "Stub", "response_id", "", False, 1

    def __init__(self) -> None:
        self.sent: list[str] = []

    def plan(self, claimed):
        return [[Call(c.source_id, (c,)) for c in claimed]], []

    def send(self, call):
        self.sent.append(call.body)

    def split(self, call):
        return []

    def describe(self):
        return {}

    def people(self, claim):
        from refiner_source.to_segment.people import people_of_stored

        return people_of_stored(claim.event)


def test_the_delivery_worker_drops_a_claimed_event_of_a_suppressed_person(outbox, both):
    outbox.store_many([entry_for(1), entry_for(2)])
    key = key_of(both)
    with outbox._write() as conn:  # on the list, the way a forget that raced the webhook leaves it
        outbox._suppress(conn, {("user", digest(key, "user", "user-1"))}, fingerprint(key))
    destination = _Recording()
    loop = Loop(outbox, destination, batch_size=10)
    loop.suppressed = Suppressed(outbox, key)
    loop.run_once()
    assert destination.sent == ["r2"]
    assert rows(outbox)[(SEGMENT, "r1|Completed Survey")]["status"] == PURGED


def test_like_patterns_escape_wildcards_and_keep_only_what_json_writes_as_is():
    assert like_patterns(frozenset({("user", "a_b%c")})) == ["%a!_b!%c%"]
    assert like_patterns(frozenset({("email", "zoé@x.io")})) == ["%zo%@x.io%"]
    assert like_patterns(frozenset({("user", 'a"b')})) == ["%a%b%"]


def test_forget_by_email_with_an_accent_in_any_case(outbox, both):
    outbox.store_many([segment_event("m-acc", email="Zoé@Example.com")])
    assert erase(outbox, both, frozenset(pairs(email="zoé@example.com")), dry_run=True)[REFINER].events == 1


# --- the webhooks ----------------------------------------------------------------------------------


def test_webhooks_of_a_forgotten_person_are_ignored_with_reason_forgotten_and_not_stored(outbox, both):
    erase(outbox, both, frozenset(pairs(user="user-1", email="c@example.com")))
    client = create_app(both).test_client()
    answer = client.post(f"/webhooks/refiner?token={SECRET}", json=survey_body(1))
    assert answer.status_code == 200 and answer.json == {"status": "ignored", "reason": "forgotten"}
    assert client.post(f"/webhooks/refiner?token={SECRET}", json=survey_body(2)).status_code == 202
    batch = [
        {"type": "identify", "messageId": "x1", "userId": "user-1"},
        {"type": "identify", "messageId": "x2", "userId": "user-2", "traits": {"email": "C@example.com"}},
        {"type": "identify", "messageId": "x3", "userId": "user-3"},
    ]
    answer = client.post("/webhooks/segment", json=batch, headers={"Authorization": f"Bearer {SHARED}"})
    assert answer.json["accepted"] == 1 and answer.json["ignored"] == 2
    assert [r["reason"] for r in answer.json["ignored_reasons"]] == ["forgotten", "forgotten"]
    assert outbox.stats(SEGMENT).pending == 1 and outbox.stats(REFINER).pending == 1


def test_a_forget_holds_for_new_webhooks_within_the_refresh_bound(outbox, both):
    suppressed_view = Suppressed(outbox, key_of(both), refresh=0.2)
    assert not suppressed_view.forgotten(pairs(user="user-1"))  # read now: empty
    erase(outbox, both, frozenset(pairs(user="user-1")))
    time.sleep(0.25)
    assert suppressed_view.forgotten(pairs(user="user-1"))


# --- the command ----------------------------------------------------------------------------------


def env_of(store_url: str) -> dict[str, str]:
    return {"DATABASE_URL": store_url, "REFINER_WEBHOOK_SECRET": SECRET, "SEGMENT_WRITE_KEY": "k", "SEGMENT_SHARED_SECRET": None}


def test_forget_prints_counts_per_direction_and_never_a_value(store_url, outbox):
    fill(outbox)
    done = CliRunner().invoke(main, ["forget", "--user", "user-1", "--email", "Ada.Lovelace@example.com"], env=env_of(store_url))
    assert done.exit_code == 0, done.output
    assert "Refiner to Segment: 2 event(s) erased, of which 1 dead letter(s) and 0 waiting to be sent" in done.output
    assert "Segment to Refiner: 2 event(s) erased, of which 0 dead letter(s) and 2 waiting to be sent" in done.output
    assert "user-1" not in done.output and "lovelace" not in done.output.lower()
    again = CliRunner().invoke(main, ["forget", "--user", "user-1", "--json", "--dry-run"], env=env_of(store_url))
    assert json.loads(again.output) == {
        "dry_run": True,
        "suppressed": False,
        "identifiers": 1,
        "directions": {s: {"events": 0, "dead_letters": 0, "waiting": 0} for s in (SEGMENT, REFINER)},
    }


@pytest.mark.parametrize(
    "args",
    [[], ["--user", "  "], ["--user", "u", "--unsuppress", "--dry-run"], ["--user", "u", "--unsuppress", "--no-suppress"]],
    ids=["nobody", "blank", "unsuppress-dry-run", "unsuppress-no-suppress"],
)
def test_forget_usage_errors_exit_2_with_one_line(tmp_path, args):
    done = CliRunner().invoke(main, ["forget", *args], env={"DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    assert done.exit_code == 2 and done.output.strip().splitlines()[-1].startswith("Error:")


def test_forget_without_any_secret_for_the_key_refuses_in_one_line(store_url, outbox):
    env = {"DATABASE_URL": store_url, "REFINER_WEBHOOK_SECRET": None, "SEGMENT_SHARED_SECRET": None, "REFINER_API_KEY": None}
    env["SEGMENT_WRITE_KEY"] = None
    done = CliRunner().invoke(main, ["forget", "--user", "user-1"], env=env)
    assert done.exit_code == 1 and done.output.strip().count("\n") == 0 and "REFINER_SUPPRESSION_KEY" in done.output
    assert CliRunner().invoke(main, ["forget", "--user", "user-1", "--no-suppress"], env=env).exit_code == 0


def test_forget_unsuppress_then_status_counts_nobody(store_url, outbox):
    assert CliRunner().invoke(main, ["forget", "--user", "user-1"], env=env_of(store_url)).exit_code == 0
    assert "suppressed people (refiner-source forget): 1" in CliRunner().invoke(main, ["status"], env=env_of(store_url)).output
    undone = CliRunner().invoke(main, ["forget", "--user", "user-1", "--unsuppress"], env=env_of(store_url))
    assert undone.exit_code == 0 and "1 identifier(s) taken off the suppression list" in undone.output
    assert "suppressed people" not in CliRunner().invoke(main, ["status"], env=env_of(store_url)).output


def test_replay_skips_and_counts_the_events_of_a_suppressed_person(store_url, outbox, both):
    outbox.store_many([entry_for(1), entry_for(2)])
    claimed = outbox.claim(SEGMENT, 2, 60, "w")
    outbox.settle("w", delivered=[c.id for c in claimed], destination=SEGMENT)
    key = key_of(both)
    with outbox._write() as conn:  # on the list, the way a forget that raced the webhook leaves the event
        outbox._suppress(conn, {("user", digest(key, "user", "user-1"))}, fingerprint(key))
    queued = CliRunner().invoke(main, ["replay", "--response", "r2"], env=env_of(store_url))
    assert queued.exit_code == 0 and "1 response(s) queued again" in queued.output and "erased" not in queued.output
    assert outbox.stats(SEGMENT).pending == 1
    skipped = CliRunner().invoke(main, ["replay", "--response", "r1"], env=env_of(store_url))
    assert "0 response(s) queued again" in skipped.output
    assert "1 event(s) of people erased by `refiner-source forget` skipped (forgotten): not queued" in skipped.output
    assert outbox.stats(SEGMENT).pending == 1
